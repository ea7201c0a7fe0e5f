/* The innermost loops of bncore: contiguous runs of one dtype, no threads,
 * no allocation. Everything around them (blocks, merges, threads) lives in
 * _kernels.pyx.
 *
 * Reductions keep BN_LANES independent float64 partial sums and element i of
 * a run always goes to lane i % BN_LANES, then the lanes are added in a fixed
 * order. The compiler can vectorise that without reassociating anything, so
 * the result is the same bits whatever the vector width of the machine
 * (and -ffast-math is never needed).
 *
 * The file is a template: _leaf_loops_impl.h is included once per dtype. */
#ifndef BNCORE_LEAF_LOOPS_H
#define BNCORE_LEAF_LOOPS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Independent float64 partial sums per reduction: two vectors of eight, so
 * that consecutive additions do not wait on each other's latency. The loops
 * below are written for exactly two vectors of eight. */
#define BN_LANES 16
_Static_assert(BN_LANES == 16, "the lane loops use two 8-lane vectors");

/* Lane sums kept in memory between calls (a block of whole runs is one
 * call per run), aligned to whole lines, so that the vector loops' 64-byte
 * stores of them and the next call's loads never split across two lines. */
typedef double bn_lanes[BN_LANES] __attribute__((aligned(64)));

/* One channel's two lane arrays, for walks that carry many channels' sums
 * at once (an array of these keeps every array on its own lines). */
typedef struct {
    bn_lanes a;
    bn_lanes b;
} bn_lane_pair;

/* A lane array's total: the lanes added in order from 0.0, the one order
 * every reduction of lanes uses. */
static inline double bn_lanes_total(const double *lanes)
{
    double total = 0.0;
    for (int k = 0; k < BN_LANES; k++)
        total += lanes[k];
    return total;
}

/* Eight float64 values: the compiler maps operations on this GCC/Clang vector
 * type onto whatever the target clone has (one zmm, two ymm, four xmm). */
typedef double bn_v8df __attribute__((vector_size(64)));
typedef float bn_v8sf __attribute__((vector_size(32)));

/* Eight consecutive values, unaligned, as float64 (exactly). Always inlined:
 * the AVX-512 clones call them, and a real call would pass a 64-byte vector
 * between code built for different instruction sets (a crash at -O0). */
#if defined(__GNUC__)
/* GCC warns that a 64-byte vector return changes the ABI without AVX-512:
 * no call is ever made, so there is no ABI to change. */
#pragma GCC diagnostic ignored "-Wpsabi"
#define BN_INLINE static inline __attribute__((always_inline))
#else
#define BN_INLINE static inline
#endif

BN_INLINE bn_v8df bn_load8_f64(const double *p)
{
    bn_v8df v;
    memcpy(&v, p, sizeof v);
    return v;
}

BN_INLINE bn_v8df bn_load8_f32(const float *p)
{
    bn_v8sf v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, bn_v8df);
}

/* Streaming (non-temporal) stores write an output larger than the caches
 * straight to memory instead of first reading its lines into the cache:
 * that saves a third of the memory traffic of y = f(x). SSE's 16-byte
 * streaming stores are part of baseline x86-64 and measured here as fast as
 * AVX-512's 64-byte ones (a 205 MB copy: 39 vs 38 GB/s on one core, 47 vs
 * 46 on two), so they need no dispatch. Elsewhere outputs use normal stores. */
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define BN_HAVE_STREAM 1
#define BN_STREAM_F32(p, v) _mm_stream_ps((p), _mm_load_ps(v))
#define BN_STREAM_F64(p, v) _mm_stream_pd((p), _mm_load_pd(v))
#define BN_STREAM_FENCE() _mm_sfence()
#else
#define BN_HAVE_STREAM 0
#endif

/* A cache line: the unit a streaming loop writes. */
#define BN_LINE_BYTES 64

/* The streaming loops load this many lines (of each input) before they
 * store any of them. A loop that loads a line and then stores its result,
 * line after line, ran up to 2.2 times slower when the output lay 16-176
 * bytes past the input modulo 4 KiB, as NumPy often places two arrays
 * allocated one after the other: each load then looks like it reads a
 * store just issued (the addresses agree in their low 12 bits), and waits
 * for it, which chains every line's load to the previous line's
 * arithmetic. In groups of four the chain links a group, not a line, and
 * hides behind memory: eval of (8, 8, 256, 256) float32 on one thread at
 * its worst offset from 1.48 times a streaming copy's time to 1.06 (median
 * over offsets 1.01 -> 0.93; benchmarks/page_offsets.py). */
#define BN_GROUP_LINES 4
/* The AVX-512 loops below unroll their groups by hand (v0..v3). */
_Static_assert(BN_GROUP_LINES == 4, "the hand-unrolled groups hold four vectors");

/* How many of the n values (itemsize bytes each) at p lie before p's first
 * line boundary: where whole-line streaming stores can begin. */
static inline ptrdiff_t bn_line_head(const void *p, size_t itemsize, ptrdiff_t n)
{
    ptrdiff_t head = (ptrdiff_t)(((BN_LINE_BYTES - ((uintptr_t)p & (BN_LINE_BYTES - 1)))
                                  & (BN_LINE_BYTES - 1)) / itemsize);
    return head < n ? head : n;
}

/* Ask for the nbytes at run to be brought into L2 (prefetcht1), all at
 * once: the pipelined loops' next run, when a channel does not fit in L2.
 *
 * Always inlined: GCC 12 takes a function whose only statements are
 * prefetches for one without effects and deletes its calls
 * (-fipa-pure-const, at -O2 and -O3). This function used to take a flag for
 * prefetcht0, "into L1", for channels that fit in L2; as a plain `static
 * inline` function that branch was deleted, so it was never issued, and
 * what had been measured as L1 against L2 was no prefetch against
 * prefetcht1. Issued, it measured no better than none (the call sites say
 * by how much), so those channels are not asked for. */
BN_INLINE void bn_prefetch_to_l2(const void *run, ptrdiff_t nbytes)
{
    const char *p = (const char *)run;
    if (nbytes <= 0)
        return;
    for (ptrdiff_t k = 0; k < nbytes; k += BN_LINE_BYTES)
        __builtin_prefetch(p + k, 0, 2);
    __builtin_prefetch(p + nbytes - 1, 0, 2);   /* the last line, when p does not start one */
}

/* Ask for the lines that hold bytes [at, at + nbytes) into L1 (prefetcht0).
 * An address, not a pointer: the blocks of runs below ask for runs past
 * their last row's end, which may lie past the array (a prefetch may name
 * any address; a pointer may not point there). Always inlined, as
 * bn_prefetch_to_l2 says why. */
BN_INLINE void bn_prefetch_span(uintptr_t at, ptrdiff_t nbytes)
{
    uintptr_t stop = at + (uintptr_t)nbytes;
    for (uintptr_t line = at & ~(uintptr_t)(BN_LINE_BYTES - 1); line < stop;
         line += BN_LINE_BYTES)
        __builtin_prefetch((const void *)line, 0, 3);
}

/* Where a vector loop over the n values of `out` begins its whole lines:
 * the values before out's first line boundary, which it writes masked.
 * Streamed or not: NumPy's arrays start 16 bytes past a line, and there
 * every vector load and store of a loop begun at out itself straddles two
 * lines. In cache, float32, one thread, the row-run loops (bn_grad_runs,
 * bn_affine_runs, called from C) of (8, 64, 7, 7), (8, 256, 4, 4) and (8,
 * 16, 14, 14) took 0.83-0.87 of the time begun on the line, as long as
 * when out is itself on a line. Clears *stream when out is not aligned to
 * its values (none of its lines would be whole), and then returns 0. */
static inline ptrdiff_t bn_store_head(const void *out, size_t itemsize, ptrdiff_t n,
                                      int *stream)
{
    if ((uintptr_t)out % itemsize == 0)
        return bn_line_head(out, itemsize, n);
    *stream = 0;
    return 0;
}

#if defined(__GNUC__) || defined(__clang__)
#define BN_RESTRICT __restrict__
#else
#define BN_RESTRICT
#endif

/* Run-time dispatch: GCC compiles each leaf loop for AVX-512 (x86-64-v4),
 * AVX2 (x86-64-v3) and the baseline, and the dynamic loader picks the best
 * one the CPU has (an ifunc), so one portable binary gets wide vectors
 * without -march=native. The lane order above makes all three give the same
 * bits, and -ffp-contract=off keeps FMA out. Other compilers and platforms
 * get the baseline. BNCORE_NO_DISPATCH=1 at build time turns it off, and
 * BNCORE_NO_AVX512=1 (BN_NO_AVX512) builds the library as an AVX2 machine
 * runs it: no AVX-512 clone and no hand-written AVX-512 loop is chosen, so
 * that those paths are tested and measured on a machine that has AVX-512. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) \
    && defined(__linux__) && !defined(BN_NO_DISPATCH) && !defined(BN_NO_AVX512)
#define BN_LEAF __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) static
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) \
    && defined(__linux__) && !defined(BN_NO_DISPATCH)
#define BN_LEAF __attribute__((target_clones("arch=x86-64-v3", "default"))) static
#else
#define BN_LEAF static inline
#endif

/* BN_BITS: the signed integer of BN_T's width, for bit operations on lines. */
#define BN_T float
#define BN_BITS int32_t
#define BN_SFX(name) name##_f32
#define BN_STREAM_XMM BN_STREAM_F32
#include "_leaf_loops_impl.h"
#undef BN_T
#undef BN_BITS
#undef BN_SFX
#undef BN_STREAM_XMM

#define BN_T double
#define BN_BITS int64_t
#define BN_SFX(name) name##_f64
#define BN_STREAM_XMM BN_STREAM_F64
#include "_leaf_loops_impl.h"
#undef BN_T
#undef BN_BITS
#undef BN_SFX
#undef BN_STREAM_XMM

/* float32 reductions: GCC 12 converts float vectors to double ones badly
 * (half vectors and inserts; 21 GB/s in L1 against 58 for float64 input),
 * so these have hand-written AVX-512 and AVX2 versions, chosen per call from
 * the CPU's features. They keep the generic version's lanes (element i to
 * lane i % 16) but square-and-add with one fused multiply-add (rounded once,
 * so slightly more accurate): the float64 adds are what bounds this loop,
 * and the FMA took it from 26 to 37 GB/s in L1 on Zen 4. Results are
 * therefore identical for any thread count on one machine, and may differ
 * in the last bits between a machine with AVX2 and one without. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(BN_NO_DISPATCH)
#include <immintrin.h>
#define BN_X86_DISPATCH 1

/* The widest loops the dispatch may choose: 2 AVX-512, 1 AVX2, 0 the
 * baseline. Tests lower it (set_vector_isa_cap) to compare, in one process,
 * the bits of each set of loops the CPU can run. */
static int bn_isa_cap = 2;

/* The CPU features the hand-written loops are chosen by, per call (a test
 * of the flags libgcc reads once at start-up), under that cap. */
static inline int bn_cpu_avx512(void)
{
#ifdef BN_NO_AVX512
    return 0;
#else
    return bn_isa_cap >= 2 && __builtin_cpu_supports("avx512f");
#endif
}

static inline int bn_cpu_avx2(void)
{
    return bn_isa_cap >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* The r (< 16) values at x in lanes 0 to r - 1 (the others 0), read
 * without touching memory past them where `before` >= 16 - r values lie
 * before x: a masked load does not fetch its masked-off values, but it
 * waits for every line its 64 bytes cover, and at the end of a short run
 * that is often a line of another channel, not in cache (34 % of the
 * pipelined forward's samples on (64, 512, 14, 28) float32 were that
 * wait). So: the 16 values that end with them, rotated down. */
BN_INLINE __m512 bn_load_tail_avx512(const float *x, ptrdiff_t r, ptrdiff_t before)
    __attribute__((target("avx512f")));
BN_INLINE __m512 bn_load_tail_avx512(const float *x, ptrdiff_t r, ptrdiff_t before)
{
    __mmask16 first = (__mmask16)((1u << r) - 1);
    if (before < 16 - r)
        return _mm512_maskz_loadu_ps(first, x);
    __m512i from = _mm512_add_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32((int)(16 - r)));
    return _mm512_maskz_permutexvar_ps(first, from, _mm512_loadu_ps(x + r - 16));
}

/* Lanes 0-7 of v as float64; then lanes 8-15. */
BN_INLINE __m512d bn_low_lanes_pd_avx512(__m512 v) __attribute__((target("avx512f")));
BN_INLINE __m512d bn_low_lanes_pd_avx512(__m512 v)
{
    return _mm512_cvtps_pd(_mm512_castps512_ps256(v));
}

BN_INLINE __m512d bn_high_lanes_pd_avx512(__m512 v) __attribute__((target("avx512f")));
BN_INLINE __m512d bn_high_lanes_pd_avx512(__m512 v)
{
    return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

/* The last r (< 16) values of a run added into lanes 0 to r - 1 in
 * registers, with the operations of the generic loops' scalar tails (the
 * square or product rounded before its add, so the same bits): the lanes
 * then leave the loop in four whole-vector stores. Lane sums run on from
 * one short run to the next (a block of whole runs), and the next call
 * loads them straight back as whole vectors, which an earlier tail's
 * 8-byte stores to them would have made wait. A tail of at most 8 values
 * leaves lanes 8-15 alone, so it skips their work, which masks would
 * have discarded: runs of 49 values (7 x 7 maps, 3 x 16 + 1) took
 * 0.93-0.95 of the time in the backward in cache on one thread, 0.95-0.97
 * in the training forward. */
BN_INLINE void bn_tail_shifted_sums_avx512(const float *x, ptrdiff_t r, ptrdiff_t before,
                                           __m512d origin, __m512d *a1, __m512d *b1,
                                           __m512d *a2, __m512d *b2)
    __attribute__((target("avx512f")));
BN_INLINE void bn_tail_shifted_sums_avx512(const float *x, ptrdiff_t r, ptrdiff_t before,
                                           __m512d origin, __m512d *a1, __m512d *b1,
                                           __m512d *a2, __m512d *b2)
{
    __mmask8 in_a = (__mmask8)((1u << r) - 1), in_b = (__mmask8)(((1u << r) - 1) >> 8);
    __m512 v = bn_load_tail_avx512(x, r, before);
    __m512d d = _mm512_sub_pd(bn_low_lanes_pd_avx512(v), origin);
    *a1 = _mm512_mask_add_pd(*a1, in_a, *a1, d);
    *a2 = _mm512_mask_add_pd(*a2, in_a, *a2, _mm512_mul_pd(d, d));
    if (r > 8) {
        __m512d e = _mm512_sub_pd(bn_high_lanes_pd_avx512(v), origin);
        *b1 = _mm512_mask_add_pd(*b1, in_b, *b1, e);
        *b2 = _mm512_mask_add_pd(*b2, in_b, *b2, _mm512_mul_pd(e, e));
    }
}

BN_INLINE void bn_tail_grad_sums_avx512(const float *x, const float *dy, ptrdiff_t r,
                                        ptrdiff_t before, __m512d mean, __m512d *a1,
                                        __m512d *b1, __m512d *a2, __m512d *b2)
    __attribute__((target("avx512f")));
BN_INLINE void bn_tail_grad_sums_avx512(const float *x, const float *dy, ptrdiff_t r,
                                        ptrdiff_t before, __m512d mean, __m512d *a1,
                                        __m512d *b1, __m512d *a2, __m512d *b2)
{
    __mmask8 in_a = (__mmask8)((1u << r) - 1), in_b = (__mmask8)(((1u << r) - 1) >> 8);
    __m512 vg = bn_load_tail_avx512(dy, r, before), vx = bn_load_tail_avx512(x, r, before);
    __m512d g = bn_low_lanes_pd_avx512(vg);
    *a1 = _mm512_mask_add_pd(*a1, in_a, *a1, g);
    *a2 = _mm512_mask_add_pd(*a2, in_a, *a2,
                              _mm512_mul_pd(g, _mm512_sub_pd(bn_low_lanes_pd_avx512(vx), mean)));
    if (r > 8) {
        __m512d h = bn_high_lanes_pd_avx512(vg);
        *b1 = _mm512_mask_add_pd(*b1, in_b, *b1, h);
        *b2 = _mm512_mask_add_pd(
            *b2, in_b, *b2, _mm512_mul_pd(h, _mm512_sub_pd(bn_high_lanes_pd_avx512(vx), mean)));
    }
}

/* Two lane arrays (16 float64 each) to and from registers: lanes 0-7 of
 * s1 in a1, 8-15 in b1; of s2 in a2 and b2. */
BN_INLINE void bn_lanes_load_avx512(const double *s1, const double *s2, __m512d *a1,
                                    __m512d *b1, __m512d *a2, __m512d *b2)
    __attribute__((target("avx512f")));
BN_INLINE void bn_lanes_load_avx512(const double *s1, const double *s2, __m512d *a1,
                                    __m512d *b1, __m512d *a2, __m512d *b2)
{
    *a1 = _mm512_loadu_pd(s1);
    *b1 = _mm512_loadu_pd(s1 + 8);
    *a2 = _mm512_loadu_pd(s2);
    *b2 = _mm512_loadu_pd(s2 + 8);
}

BN_INLINE void bn_lanes_store_avx512(double *s1, double *s2, __m512d a1, __m512d b1,
                                     __m512d a2, __m512d b2)
    __attribute__((target("avx512f")));
BN_INLINE void bn_lanes_store_avx512(double *s1, double *s2, __m512d a1, __m512d b1,
                                     __m512d a2, __m512d b2)
{
    _mm512_storeu_pd(s1, a1);
    _mm512_storeu_pd(s1 + 8, b1);
    _mm512_storeu_pd(s2, a2);
    _mm512_storeu_pd(s2 + 8, b2);
}

/* One run's shifted sums (offset 0) added into lanes held in registers. */
BN_INLINE void bn_run_shifted_sums_avx512(const float *BN_RESTRICT x, ptrdiff_t n,
                                          __m512d o, __m512d *a1, __m512d *b1, __m512d *a2,
                                          __m512d *b2)
    __attribute__((target("avx512f")));
BN_INLINE void bn_run_shifted_sums_avx512(const float *BN_RESTRICT x, ptrdiff_t n,
                                          __m512d o, __m512d *a1, __m512d *b1, __m512d *a2,
                                          __m512d *b2)
{
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512d d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + i)), o);
        __m512d e = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8)), o);
        *a1 = _mm512_add_pd(*a1, d);
        *a2 = _mm512_fmadd_pd(d, d, *a2);
        *b1 = _mm512_add_pd(*b1, e);
        *b2 = _mm512_fmadd_pd(e, e, *b2);
    }
    if (i < n)
        bn_tail_shifted_sums_avx512(x + i, n - i, i, o, a1, b1, a2, b2);
}

__attribute__((target("avx512f"))) static void bn_lane_shifted_sums_f32_avx512(
    const float *BN_RESTRICT x, ptrdiff_t n, double origin, double offset,
    double *BN_RESTRICT s1, double *BN_RESTRICT s2)
{
    __m512d a1, b1, a2, b2;
    (void)offset;  /* 0: see bn_lane_shifted_sums_f32 */
    bn_lanes_load_avx512(s1, s2, &a1, &b1, &a2, &b2);
    bn_run_shifted_sums_avx512(x, n, _mm512_set1_pd(origin), &a1, &b1, &a2, &b2);
    bn_lanes_store_avx512(s1, s2, a1, b1, a2, b2);
}

/* One run's gradient sums added into lanes held in registers. */
BN_INLINE void bn_run_grad_sums_avx512(const float *BN_RESTRICT x,
                                       const float *BN_RESTRICT dy, ptrdiff_t n, __m512d m,
                                       __m512d *a1, __m512d *b1, __m512d *a2, __m512d *b2)
    __attribute__((target("avx512f")));
BN_INLINE void bn_run_grad_sums_avx512(const float *BN_RESTRICT x,
                                       const float *BN_RESTRICT dy, ptrdiff_t n, __m512d m,
                                       __m512d *a1, __m512d *b1, __m512d *a2, __m512d *b2)
{
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512d g = _mm512_cvtps_pd(_mm256_loadu_ps(dy + i));
        __m512d h = _mm512_cvtps_pd(_mm256_loadu_ps(dy + i + 8));
        *a1 = _mm512_add_pd(*a1, g);
        *a2 = _mm512_fmadd_pd(g, _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + i)), m),
                              *a2);
        *b1 = _mm512_add_pd(*b1, h);
        *b2 = _mm512_fmadd_pd(h, _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8)), m),
                              *b2);
    }
    if (i < n)
        bn_tail_grad_sums_avx512(x + i, dy + i, n - i, i, m, a1, b1, a2, b2);
}

/* One run's gradient sums added into lanes in memory (loaded, carried in
 * registers through the run by RUN, one run's sums of element type T into
 * lanes held in registers, then stored): for a call per run and for the
 * channel-group walk. Float32 here, float64 below. */
#define BN_DEFINE_CARRIED_GRAD_SUMS_AVX512(T, NAME, RUN)                                   \
BN_INLINE void NAME(const T *BN_RESTRICT x, const T *BN_RESTRICT dy, ptrdiff_t n,          \
                    double mean, double *BN_RESTRICT s_dy, double *BN_RESTRICT s_dy_dev)   \
    __attribute__((target("avx512f")));                                                    \
BN_INLINE void NAME(const T *BN_RESTRICT x, const T *BN_RESTRICT dy, ptrdiff_t n,          \
                    double mean, double *BN_RESTRICT s_dy, double *BN_RESTRICT s_dy_dev)   \
{                                                                                          \
    __m512d a1, b1, a2, b2;                                                                \
    bn_lanes_load_avx512(s_dy, s_dy_dev, &a1, &b1, &a2, &b2);                             \
    RUN(x, dy, n, _mm512_set1_pd(mean), &a1, &b1, &a2, &b2);                              \
    bn_lanes_store_avx512(s_dy, s_dy_dev, a1, b1, a2, b2);                                 \
}
BN_DEFINE_CARRIED_GRAD_SUMS_AVX512(float, bn_carried_grad_sums_avx512, bn_run_grad_sums_avx512)

__attribute__((target("avx512f"))) static void bn_lane_grad_sums_f32_avx512(
    const float *BN_RESTRICT x, const float *BN_RESTRICT dy, ptrdiff_t n, double mean,
    double *BN_RESTRICT s_dy, double *BN_RESTRICT s_dy_dev)
{
    bn_carried_grad_sums_avx512(x, dy, n, mean, s_dy, s_dy_dev);
}

/* The lanes of a block, a1 and b1 (lanes 0-7, 8-15) into *t1 and a2, b2
 * into *t2, each added in lane order from 0.0 (as every block's lanes
 * are). */
BN_INLINE void bn_lanes_totals_avx512(__m512d a1, __m512d b1, __m512d a2, __m512d b2,
                                      double *t1, double *t2)
    __attribute__((target("avx512f")));
BN_INLINE void bn_lanes_totals_avx512(__m512d a1, __m512d b1, __m512d a2, __m512d b2,
                                      double *t1, double *t2)
{
    bn_lanes s1, s2;
    bn_lanes_store_avx512(s1, s2, a1, b1, a2, b2);
    *t1 = bn_lanes_total(s1);
    *t2 = bn_lanes_total(s2);
}

/* A block of whole runs in one call, its lanes in registers from the first
 * run to the last (called a run at a time, they went to memory and back
 * between runs): the same operations in the same order, so the same bits.
 * Float32 statistics on one thread took 0.86 of the time a run at a time
 * on (512, 512, 7, 7), 0.80 on (1024, 512, 4, 4). With ahead_bytes > 0,
 * each run's bytes that far on are asked for as the run is summed (the
 * caller's rule: stats_blocks_ahead in _kernels.pyx). */
__attribute__((target("avx512f"))) static void bn_block_shifted_sums_f32_avx512(
    const float *BN_RESTRICT x, ptrdiff_t nruns, ptrdiff_t stride, ptrdiff_t n,
    double origin, ptrdiff_t ahead_bytes, double *t1, double *t2)
{
    __m512d a1 = _mm512_setzero_pd(), b1 = a1, a2 = a1, b2 = a1;
    const __m512d o = _mm512_set1_pd(origin);
    const ptrdiff_t run_bytes = n * (ptrdiff_t)sizeof(float);
    for (ptrdiff_t r = 0; r < nruns; r++) {
        if (ahead_bytes > 0)
            bn_prefetch_span((uintptr_t)(x + r * stride) + (uintptr_t)ahead_bytes, run_bytes);
        bn_run_shifted_sums_avx512(x + r * stride, n, o, &a1, &b1, &a2, &b2);
    }
    bn_lanes_totals_avx512(a1, b1, a2, b2, t1, t2);
}

/* The gradient sums of a block, as bn_block_shifted_sums_f32_avx512 takes
 * its statistics, RUN summing each run of element type T. Float32 here,
 * float64 below. */
#define BN_DEFINE_BLOCK_GRAD_SUMS_AVX512(T, NAME, RUN)                                     \
__attribute__((target("avx512f"))) static void NAME(                                      \
    const T *BN_RESTRICT x, const T *BN_RESTRICT dy, ptrdiff_t nruns, ptrdiff_t stride,   \
    ptrdiff_t n, double mean, double *t_dy, double *t_dev)                                 \
{                                                                                          \
    __m512d a1 = _mm512_setzero_pd(), b1 = a1, a2 = a1, b2 = a1;                          \
    const __m512d m = _mm512_set1_pd(mean);                                                \
    for (ptrdiff_t r = 0; r < nruns; r++)                                                 \
        RUN(x + r * stride, dy + r * stride, n, m, &a1, &b1, &a2, &b2);                    \
    bn_lanes_totals_avx512(a1, b1, a2, b2, t_dy, t_dev);                                   \
}
BN_DEFINE_BLOCK_GRAD_SUMS_AVX512(float, bn_block_grad_sums_f32_avx512, bn_run_grad_sums_avx512)

/* Float64 runs with AVX-512, for the block and group loops: the generic
 * loop's operations lane by lane
 * (d = (x - origin) - offset; s1 += d and s2 += d * d, the square rounded
 * before its add; for the gradient s_dy += dy and s_dev += dy * (x - mean)),
 * a run's last 1-15 values added into lanes 0-14 under masks, so the
 * generic loop's bits. The generic loop stored its lanes after the whole
 * groups and added the tail with scalar stores, which the next run's
 * vector loads of the lanes then waited on: runs of 17-31 values took
 * about twice the time per value of runs of 16. The masks of a tail of t
 * values: lanes 0-7 and 8-15. */
BN_INLINE __mmask8 bn_first_of_eight(ptrdiff_t t)
{
    return (__mmask8)(t >= 8 ? 0xFF : t <= 0 ? 0 : (1u << t) - 1);
}

BN_INLINE void bn_run_shifted_sums_f64_avx512(const double *BN_RESTRICT x, ptrdiff_t n,
                                              __m512d o, __m512d f, __m512d *a1,
                                              __m512d *b1, __m512d *a2, __m512d *b2)
    __attribute__((target("avx512f")));
BN_INLINE void bn_run_shifted_sums_f64_avx512(const double *BN_RESTRICT x, ptrdiff_t n,
                                              __m512d o, __m512d f, __m512d *a1,
                                              __m512d *b1, __m512d *a2, __m512d *b2)
{
    ptrdiff_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES) {
        __m512d d = _mm512_sub_pd(_mm512_sub_pd(_mm512_loadu_pd(x + i), o), f);
        __m512d e = _mm512_sub_pd(_mm512_sub_pd(_mm512_loadu_pd(x + i + 8), o), f);
        *a1 = _mm512_add_pd(*a1, d);
        *a2 = _mm512_add_pd(*a2, _mm512_mul_pd(d, d));
        *b1 = _mm512_add_pd(*b1, e);
        *b2 = _mm512_add_pd(*b2, _mm512_mul_pd(e, e));
    }
    if (i < n) {
        __mmask8 in_a = bn_first_of_eight(n - i), in_b = bn_first_of_eight(n - i - 8);
        __m512d d = _mm512_sub_pd(_mm512_sub_pd(_mm512_maskz_loadu_pd(in_a, x + i), o), f);
        *a1 = _mm512_mask_add_pd(*a1, in_a, *a1, d);
        *a2 = _mm512_mask_add_pd(*a2, in_a, *a2, _mm512_mul_pd(d, d));
        if (in_b) {     /* x + i + 8 is then inside the run */
            __m512d e = _mm512_sub_pd(_mm512_sub_pd(_mm512_maskz_loadu_pd(in_b, x + i + 8),
                                                    o), f);
            *b1 = _mm512_mask_add_pd(*b1, in_b, *b1, e);
            *b2 = _mm512_mask_add_pd(*b2, in_b, *b2, _mm512_mul_pd(e, e));
        }
    }
}

BN_INLINE void bn_run_grad_sums_f64_avx512(const double *BN_RESTRICT x,
                                           const double *BN_RESTRICT dy, ptrdiff_t n,
                                           __m512d mean, __m512d *a1, __m512d *b1,
                                           __m512d *a2, __m512d *b2)
    __attribute__((target("avx512f")));
BN_INLINE void bn_run_grad_sums_f64_avx512(const double *BN_RESTRICT x,
                                           const double *BN_RESTRICT dy, ptrdiff_t n,
                                           __m512d mean, __m512d *a1, __m512d *b1,
                                           __m512d *a2, __m512d *b2)
{
    ptrdiff_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES) {
        __m512d g = _mm512_loadu_pd(dy + i), h = _mm512_loadu_pd(dy + i + 8);
        *a1 = _mm512_add_pd(*a1, g);
        *a2 = _mm512_add_pd(*a2, _mm512_mul_pd(g, _mm512_sub_pd(_mm512_loadu_pd(x + i), mean)));
        *b1 = _mm512_add_pd(*b1, h);
        *b2 = _mm512_add_pd(*b2,
                            _mm512_mul_pd(h, _mm512_sub_pd(_mm512_loadu_pd(x + i + 8), mean)));
    }
    if (i < n) {
        __mmask8 in_a = bn_first_of_eight(n - i), in_b = bn_first_of_eight(n - i - 8);
        __m512d g = _mm512_maskz_loadu_pd(in_a, dy + i);
        __m512d d = _mm512_sub_pd(_mm512_maskz_loadu_pd(in_a, x + i), mean);
        *a1 = _mm512_mask_add_pd(*a1, in_a, *a1, g);
        *a2 = _mm512_mask_add_pd(*a2, in_a, *a2, _mm512_mul_pd(g, d));
        if (in_b) {     /* x + i + 8 is then inside the run */
            __m512d h = _mm512_maskz_loadu_pd(in_b, dy + i + 8);
            __m512d e = _mm512_sub_pd(_mm512_maskz_loadu_pd(in_b, x + i + 8), mean);
            *b1 = _mm512_mask_add_pd(*b1, in_b, *b1, h);
            *b2 = _mm512_mask_add_pd(*b2, in_b, *b2, _mm512_mul_pd(h, e));
        }
    }
}

BN_DEFINE_CARRIED_GRAD_SUMS_AVX512(double, bn_carried_grad_sums_f64_avx512,
                                   bn_run_grad_sums_f64_avx512)
#undef BN_DEFINE_CARRIED_GRAD_SUMS_AVX512

/* Blocks of whole runs, the lanes in registers from the first run to the
 * last, as bn_block_shifted_sums_f32_avx512. */
__attribute__((target("avx512f"))) static void bn_block_shifted_sums_f64_avx512(
    const double *BN_RESTRICT x, ptrdiff_t nruns, ptrdiff_t stride, ptrdiff_t n,
    double origin, double offset, ptrdiff_t ahead_bytes, double *t1, double *t2)
{
    __m512d a1 = _mm512_setzero_pd(), b1 = a1, a2 = a1, b2 = a1;
    const __m512d o = _mm512_set1_pd(origin), f = _mm512_set1_pd(offset);
    const ptrdiff_t run_bytes = n * (ptrdiff_t)sizeof(double);
    for (ptrdiff_t r = 0; r < nruns; r++) {
        if (ahead_bytes > 0)
            bn_prefetch_span((uintptr_t)(x + r * stride) + (uintptr_t)ahead_bytes, run_bytes);
        bn_run_shifted_sums_f64_avx512(x + r * stride, n, o, f, &a1, &b1, &a2, &b2);
    }
    bn_lanes_totals_avx512(a1, b1, a2, b2, t1, t2);
}

BN_DEFINE_BLOCK_GRAD_SUMS_AVX512(double, bn_block_grad_sums_f64_avx512,
                                 bn_run_grad_sums_f64_avx512)
#undef BN_DEFINE_BLOCK_GRAD_SUMS_AVX512

/* AVX2 holds a pair of lane arrays in eight vectors of four: lanes 4q to
 * 4q + 3 of the first array in s1[q], of the second in s2[q]. */
typedef struct {
    __m256d s1[4];
    __m256d s2[4];
} bn_lanes_avx2;

/* The first min(v, 4) values at x, `before` values into a run that ends
 * v values on, in lanes 0 to v - 1 (the others any value). A last partial
 * quad is the four values that end the run, moved down, where the run holds
 * the 4 - v values before x; else a masked load. Neither reads past the run
 * (bn_load_tail_avx512 says why that matters). */
BN_INLINE __m128 bn_load_quad_avx2(const float *x, int v, ptrdiff_t before)
    __attribute__((target("avx2,fma")));
BN_INLINE __m128 bn_load_quad_avx2(const float *x, int v, ptrdiff_t before)
{
    const __m128i lanes = _mm_setr_epi32(0, 1, 2, 3);
    if (v >= 4)
        return _mm_loadu_ps(x);
    if (before >= 4 - v)
        return _mm_permutevar_ps(_mm_loadu_ps(x + v - 4),
                                 _mm_add_epi32(lanes, _mm_set1_epi32(4 - v)));
    return _mm_maskload_ps(x, _mm_cmpgt_epi32(_mm_set1_epi32(v), lanes));
}

/* Lanes 0 to v - 1 of `sum`, the others (where v < 4) of `old`. */
BN_INLINE __m256d bn_keep_first_avx2(__m256d old, __m256d sum, int v)
    __attribute__((target("avx2,fma")));
BN_INLINE __m256d bn_keep_first_avx2(__m256d old, __m256d sum, int v)
{
    if (v >= 4)
        return sum;
    __m256i in = _mm256_cmpgt_epi64(_mm256_set1_epi64x(v), _mm256_setr_epi64x(0, 1, 2, 3));
    return _mm256_blendv_pd(old, sum, _mm256_castsi256_pd(in));
}

/* The last r (< 16) values of a run, `before` values into it, added into
 * lanes 0 to r - 1 held in registers with the operations of the generic
 * loops' scalar tails (the square or product rounded before its add), as
 * bn_tail_shifted_sums_avx512 does: an earlier version added them to the
 * lanes in memory, and the next run's vector loads of those lanes waited on
 * the scalar stores. */
BN_INLINE void bn_tail_shifted_sums_avx2(const float *x, ptrdiff_t r, ptrdiff_t before,
                                         __m256d origin, bn_lanes_avx2 *l)
    __attribute__((target("avx2,fma")));
BN_INLINE void bn_tail_shifted_sums_avx2(const float *x, ptrdiff_t r, ptrdiff_t before,
                                         __m256d origin, bn_lanes_avx2 *l)
{
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) {
        int v = (int)(r - 4 * q);
        if (v <= 0)
            break;
        __m256d d = _mm256_sub_pd(
            _mm256_cvtps_pd(bn_load_quad_avx2(x + 4 * q, v, before + 4 * q)), origin);
        l->s1[q] = bn_keep_first_avx2(l->s1[q], _mm256_add_pd(l->s1[q], d), v);
        l->s2[q] = bn_keep_first_avx2(l->s2[q], _mm256_add_pd(l->s2[q], _mm256_mul_pd(d, d)),
                                      v);
    }
}

BN_INLINE void bn_tail_grad_sums_avx2(const float *x, const float *dy, ptrdiff_t r,
                                      ptrdiff_t before, __m256d mean, bn_lanes_avx2 *l)
    __attribute__((target("avx2,fma")));
BN_INLINE void bn_tail_grad_sums_avx2(const float *x, const float *dy, ptrdiff_t r,
                                      ptrdiff_t before, __m256d mean, bn_lanes_avx2 *l)
{
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) {
        int v = (int)(r - 4 * q);
        if (v <= 0)
            break;
        __m256d g = _mm256_cvtps_pd(bn_load_quad_avx2(dy + 4 * q, v, before + 4 * q));
        __m256d d = _mm256_sub_pd(
            _mm256_cvtps_pd(bn_load_quad_avx2(x + 4 * q, v, before + 4 * q)), mean);
        l->s1[q] = bn_keep_first_avx2(l->s1[q], _mm256_add_pd(l->s1[q], g), v);
        l->s2[q] = bn_keep_first_avx2(l->s2[q], _mm256_add_pd(l->s2[q], _mm256_mul_pd(g, d)),
                                      v);
    }
}

/* One run's shifted sums (offset 0), or gradient sums, added into lanes
 * held in registers. */
BN_INLINE void bn_run_shifted_sums_avx2(const float *BN_RESTRICT x, ptrdiff_t n,
                                        __m256d origin, bn_lanes_avx2 *l)
    __attribute__((target("avx2,fma")));
BN_INLINE void bn_run_shifted_sums_avx2(const float *BN_RESTRICT x, ptrdiff_t n,
                                        __m256d origin, bn_lanes_avx2 *l)
{
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int q = 0; q < 4; q++) {
            __m256d d = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i + 4 * q)), origin);
            l->s1[q] = _mm256_add_pd(l->s1[q], d);
            l->s2[q] = _mm256_fmadd_pd(d, d, l->s2[q]);
        }
    if (i < n)
        bn_tail_shifted_sums_avx2(x + i, n - i, i, origin, l);
}

BN_INLINE void bn_run_grad_sums_avx2(const float *BN_RESTRICT x, const float *BN_RESTRICT dy,
                                     ptrdiff_t n, __m256d mean, bn_lanes_avx2 *l)
    __attribute__((target("avx2,fma")));
BN_INLINE void bn_run_grad_sums_avx2(const float *BN_RESTRICT x, const float *BN_RESTRICT dy,
                                     ptrdiff_t n, __m256d mean, bn_lanes_avx2 *l)
{
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int q = 0; q < 4; q++) {
            __m256d g = _mm256_cvtps_pd(_mm_loadu_ps(dy + i + 4 * q));
            __m256d d = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i + 4 * q)), mean);
            l->s1[q] = _mm256_add_pd(l->s1[q], g);
            l->s2[q] = _mm256_fmadd_pd(g, d, l->s2[q]);
        }
    if (i < n)
        bn_tail_grad_sums_avx2(x + i, dy + i, n - i, i, mean, l);
}

BN_INLINE void bn_lanes_load_avx2(const double *s1, const double *s2, bn_lanes_avx2 *l)
    __attribute__((target("avx2,fma")));
BN_INLINE void bn_lanes_load_avx2(const double *s1, const double *s2, bn_lanes_avx2 *l)
{
    for (int q = 0; q < 4; q++) {
        l->s1[q] = _mm256_loadu_pd(s1 + 4 * q);
        l->s2[q] = _mm256_loadu_pd(s2 + 4 * q);
    }
}

BN_INLINE void bn_lanes_store_avx2(double *s1, double *s2, const bn_lanes_avx2 *l)
    __attribute__((target("avx2,fma")));
BN_INLINE void bn_lanes_store_avx2(double *s1, double *s2, const bn_lanes_avx2 *l)
{
    for (int q = 0; q < 4; q++) {
        _mm256_storeu_pd(s1 + 4 * q, l->s1[q]);
        _mm256_storeu_pd(s2 + 4 * q, l->s2[q]);
    }
}

/* The lanes' two totals, each added in lane order from 0.0. */
BN_INLINE void bn_lanes_totals_avx2(const bn_lanes_avx2 *l, double *t1, double *t2)
    __attribute__((target("avx2,fma")));
BN_INLINE void bn_lanes_totals_avx2(const bn_lanes_avx2 *l, double *t1, double *t2)
{
    bn_lanes s1, s2;
    bn_lanes_store_avx2(s1, s2, l);
    *t1 = bn_lanes_total(s1);
    *t2 = bn_lanes_total(s2);
}

__attribute__((target("avx2,fma"))) static void bn_lane_shifted_sums_f32_avx2(
    const float *BN_RESTRICT x, ptrdiff_t n, double origin, double offset,
    double *BN_RESTRICT s1, double *BN_RESTRICT s2)
{
    bn_lanes_avx2 l;
    (void)offset;  /* 0: see bn_lane_shifted_sums_f32 */
    bn_lanes_load_avx2(s1, s2, &l);
    bn_run_shifted_sums_avx2(x, n, _mm256_set1_pd(origin), &l);
    bn_lanes_store_avx2(s1, s2, &l);
}

BN_INLINE void bn_carried_grad_sums_avx2(const float *BN_RESTRICT x,
                                         const float *BN_RESTRICT dy, ptrdiff_t n,
                                         double mean, double *BN_RESTRICT s_dy,
                                         double *BN_RESTRICT s_dy_dev)
    __attribute__((target("avx2,fma")));
BN_INLINE void bn_carried_grad_sums_avx2(const float *BN_RESTRICT x,
                                         const float *BN_RESTRICT dy, ptrdiff_t n,
                                         double mean, double *BN_RESTRICT s_dy,
                                         double *BN_RESTRICT s_dy_dev)
{
    bn_lanes_avx2 l;
    bn_lanes_load_avx2(s_dy, s_dy_dev, &l);
    bn_run_grad_sums_avx2(x, dy, n, _mm256_set1_pd(mean), &l);
    bn_lanes_store_avx2(s_dy, s_dy_dev, &l);
}

__attribute__((target("avx2,fma"))) static void bn_lane_grad_sums_f32_avx2(
    const float *BN_RESTRICT x, const float *BN_RESTRICT dy, ptrdiff_t n, double mean,
    double *BN_RESTRICT s_dy, double *BN_RESTRICT s_dy_dev)
{
    bn_carried_grad_sums_avx2(x, dy, n, mean, s_dy, s_dy_dev);
}

/* Blocks of whole runs with their lanes in registers throughout, as
 * bn_block_shifted_sums_f32_avx512 and bn_block_grad_sums_f32_avx512. */
__attribute__((target("avx2,fma"))) static void bn_block_shifted_sums_f32_avx2(
    const float *BN_RESTRICT x, ptrdiff_t nruns, ptrdiff_t stride, ptrdiff_t n,
    double origin, ptrdiff_t ahead_bytes, double *t1, double *t2)
{
    bn_lanes_avx2 l;
    const __m256d o = _mm256_set1_pd(origin);
    const ptrdiff_t run_bytes = n * (ptrdiff_t)sizeof(float);
    for (int q = 0; q < 4; q++)
        l.s1[q] = l.s2[q] = _mm256_setzero_pd();
    for (ptrdiff_t r = 0; r < nruns; r++) {
        if (ahead_bytes > 0)
            bn_prefetch_span((uintptr_t)(x + r * stride) + (uintptr_t)ahead_bytes, run_bytes);
        bn_run_shifted_sums_avx2(x + r * stride, n, o, &l);
    }
    bn_lanes_totals_avx2(&l, t1, t2);
}

__attribute__((target("avx2,fma"))) static void bn_block_grad_sums_f32_avx2(
    const float *BN_RESTRICT x, const float *BN_RESTRICT dy, ptrdiff_t nruns,
    ptrdiff_t stride, ptrdiff_t n, double mean, double *t_dy, double *t_dev)
{
    bn_lanes_avx2 l;
    const __m256d m = _mm256_set1_pd(mean);
    for (int q = 0; q < 4; q++)
        l.s1[q] = l.s2[q] = _mm256_setzero_pd();
    for (ptrdiff_t r = 0; r < nruns; r++)
        bn_run_grad_sums_avx2(x + r * stride, dy + r * stride, n, m, &l);
    bn_lanes_totals_avx2(&l, t_dy, t_dev);
}

/* The gradient sums of a group of channels' blocks at once: nchan runs of
 * n values side by side in each of nrows rows, `stride` apart, row by row
 * in memory order, each channel's lanes (pairs[c]) carried from run to run
 * in memory by CARRIED (always inlined: as a call per run, the walk was a
 * call per run). The operations of a call of bn_lane_grad_sums_<SFX>_<isa>
 * per run, so its bits. Runs of at most ask_max_bytes ask for the run a
 * row on, and the last row's for the run `after` values past its first
 * row's (the next group's, or the next block's of the same group). They
 * are asked for by address, as integers: the last group's next row lies
 * past the arrays, which a prefetch may name but a pointer may not. */
#define BN_DEFINE_GROUP_GRAD_SUMS(T, SFX, ISA, TARGET, CARRIED)                            \
__attribute__((target(TARGET))) static void bn_group_grad_sums_##SFX##_##ISA(            \
    const T *BN_RESTRICT x, const T *BN_RESTRICT dy, ptrdiff_t nrows,                     \
    ptrdiff_t stride, ptrdiff_t nchan, ptrdiff_t n, const double *mean,                  \
    bn_lane_pair *pairs, ptrdiff_t after, ptrdiff_t ask_max_bytes)                        \
{                                                                                          \
    const ptrdiff_t run_bytes = n * (ptrdiff_t)sizeof(T);                                 \
    const ptrdiff_t ask_bytes = run_bytes <= ask_max_bytes ? run_bytes : 0;               \
    for (ptrdiff_t r = 0; r < nrows; r++)                                                 \
        for (ptrdiff_t c = 0; c < nchan; c++) {                                           \
            ptrdiff_t at = r * stride + c * n;                                            \
            uintptr_t next = (uintptr_t)((r + 1 < nrows ? at + stride : c * n + after)    \
                                         * (ptrdiff_t)sizeof(T));                         \
            for (ptrdiff_t b = 0; b < ask_bytes; b += BN_LINE_BYTES) {                    \
                _mm_prefetch((const char *)((uintptr_t)x + next + b), _MM_HINT_T0);       \
                _mm_prefetch((const char *)((uintptr_t)dy + next + b), _MM_HINT_T0);      \
            }                                                                              \
            CARRIED(x + at, dy + at, n, mean[c], pairs[c].a, pairs[c].b);                 \
        }                                                                                  \
}
BN_DEFINE_GROUP_GRAD_SUMS(float, f32, avx512, "avx512f", bn_carried_grad_sums_avx512)
BN_DEFINE_GROUP_GRAD_SUMS(float, f32, avx2, "avx2,fma", bn_carried_grad_sums_avx2)
BN_DEFINE_GROUP_GRAD_SUMS(double, f64, avx512, "avx512f", bn_carried_grad_sums_f64_avx512)
#undef BN_DEFINE_GROUP_GRAD_SUMS

/* Interleaved rows: columns in groups whose sums stay in registers while
 * the rows stream past front to back (same per-column order as the generic
 * loop). One template for both element types and both instruction sets:
 * groups of 8, 4 and 2 vectors, so 64, 32 and 16 float32 columns with
 * AVX-512, 32, 16 and 8 with AVX2, whose 16 registers then spill: AVX2
 * groups of 4, 2 and 1 vectors left (400000, 128) float32 training at 3.1
 * streaming-copy times on one thread and made the backward slower than the
 * generic loop (6.8 against 5.3); 8, 4 and 2 took them to 2.6-2.7 and
 * 3.8-4.1. BNV_<isa>_* are the vector
 * operations on float64 of each; LOAD_F32/LOAD_F64 read a vector's worth of
 * values as float64, MULADD_<dtype>(a, b, c) is a * b + c: fused for
 * float32 (as its other reductions, above), rounded twice for float64, so
 * that float64 keeps the generic loop's bits on every machine. Either set
 * gives each column the same operations in the same order, so the same
 * bits. With an offset (float64's second pass), d = (x - origin) - offset
 * as the generic loop; without, d = x - origin. */
#define BNV_avx512_TARGET "avx512f"
#define BNV_avx512_VEC __m512d
#define BNV_avx512_WIDTH 8
#define BNV_avx512_LOADU(p) _mm512_loadu_pd(p)
#define BNV_avx512_STOREU(p, v) _mm512_storeu_pd(p, v)
#define BNV_avx512_ADD(a, b) _mm512_add_pd(a, b)
#define BNV_avx512_SUB(a, b) _mm512_sub_pd(a, b)
#define BNV_avx512_LOAD_F32(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))
#define BNV_avx512_LOAD_F64(p) _mm512_loadu_pd(p)
#define BNV_avx512_MULADD_F32(a, b, c) _mm512_fmadd_pd(a, b, c)
#define BNV_avx512_MULADD_F64(a, b, c) _mm512_add_pd(_mm512_mul_pd(a, b), c)
#define BNV_avx512_TOUCH_MIN_ROW_BYTES 512
#define BNV_avx512_GRAD_ROWS_AHEAD 1
#define BNV_avx2_TARGET "avx2,fma"
#define BNV_avx2_VEC __m256d
#define BNV_avx2_WIDTH 4
#define BNV_avx2_LOADU(p) _mm256_loadu_pd(p)
#define BNV_avx2_STOREU(p, v) _mm256_storeu_pd(p, v)
#define BNV_avx2_ADD(a, b) _mm256_add_pd(a, b)
#define BNV_avx2_SUB(a, b) _mm256_sub_pd(a, b)
#define BNV_avx2_LOAD_F32(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
#define BNV_avx2_LOAD_F64(p) _mm256_loadu_pd(p)
#define BNV_avx2_MULADD_F32(a, b, c) _mm256_fmadd_pd(a, b, c)
#define BNV_avx2_MULADD_F64(a, b, c) _mm256_add_pd(_mm256_mul_pd(a, b), c)
#define BNV_avx2_TOUCH_MIN_ROW_BYTES 256
#define BNV_avx2_GRAD_ROWS_AHEAD 0

#define BN_ROWS_SUMS_LOOP(ISA, SHIFTED, MULADD)                                            \
    for (ptrdiff_t r = 0; r < nrows; r++) {                                            \
        const T *p = x + r * stride + j;                                               \
        for (int t = 0; t < NV; t++) {                                                 \
            BNV_##ISA##_VEC d = SHIFTED;                                               \
            a[t] = BNV_##ISA##_ADD(a[t], d);                                           \
            b[t] = MULADD(d, d, b[t]);                                                 \
        }                                                                              \
    }
/* bn_rows_sums_<dtype>_<isa>_<NV>: the columns of whole groups of NV
 * vectors; returns how many. */
#define BN_DEFINE_ROWS_SUMS(ISA, TYPE, SFX, DT, NVECS)                                  \
__attribute__((target(BNV_##ISA##_TARGET))) static ptrdiff_t                            \
bn_rows_sums_##SFX##_##ISA##_##NVECS(                                                  \
    const TYPE *BN_RESTRICT x, ptrdiff_t nrows, ptrdiff_t stride, ptrdiff_t ncols,    \
    const double *BN_RESTRICT origin, const double *BN_RESTRICT offset,                \
    double *BN_RESTRICT s1, double *BN_RESTRICT s2)                                    \
{                                                                                      \
    typedef TYPE T;                                                                    \
    enum { NV = NVECS, W = BNV_##ISA##_WIDTH };                                        \
    ptrdiff_t j = 0;                                                                   \
    for (; j + W * NV <= ncols; j += W * NV) {                                         \
        BNV_##ISA##_VEC o[NV], a[NV], b[NV];                                           \
        for (int t = 0; t < NV; t++) {                                                 \
            o[t] = BNV_##ISA##_LOADU(origin + j + W * t);                              \
            a[t] = BNV_##ISA##_LOADU(s1 + j + W * t);                                  \
            b[t] = BNV_##ISA##_LOADU(s2 + j + W * t);                                  \
        }                                                                              \
        if (offset == NULL) {                                                          \
            BN_ROWS_SUMS_LOOP(ISA, BNV_##ISA##_SUB(BNV_##ISA##_LOAD_##DT(p + W * t), o[t]), \
                              BNV_##ISA##_MULADD_##DT)                                 \
        } else {                                                                       \
            BN_ROWS_SUMS_LOOP(ISA, BNV_##ISA##_SUB(                                    \
                                  BNV_##ISA##_SUB(BNV_##ISA##_LOAD_##DT(p + W * t), o[t]), \
                                  BNV_##ISA##_LOADU(offset + j + W * t)),              \
                              BNV_##ISA##_MULADD_##DT)                                 \
        }                                                                              \
        for (int t = 0; t < NV; t++) {                                                 \
            BNV_##ISA##_STOREU(s1 + j + W * t, a[t]);                                  \
            BNV_##ISA##_STOREU(s2 + j + W * t, b[t]);                                  \
        }                                                                              \
    }                                                                                  \
    return j;                                                                          \
}

/* Rows wider than the widest column group (64 float32 columns with
 * AVX-512, 32 with AVX2) are taken 8 rows at a time (4 KB for 128 float32
 * columns, in L1): each group's sums load into registers, run down the 8
 * rows and go back. Measured with AVX-512 on (N, W) float32, one core: W = 128 from 7
 * GB/s (all the rows of a slab per group, or whole rows with the sums in
 * memory) to 20, W = 1024 from 10 to 16. (4, 16, 32 and 64 rows measured
 * no better.) */
#define BN_WIDE_ROWS 8

/* Rows wider than one column group, read from memory by the column groups
 * in pieces, ran at half the speed of a sequential read: float64 (N, 128)
 * on one core 12 GB/s against 23 for (N, 64), with any number of rows at a
 * time (1 to all). (The cause is not known: this VM has no hardware
 * counters to tell.) So the rows are first brought in in memory order:
 * - rows wider than 512 bytes with AVX-512, 256 with AVX2 (more than two
 *   groups of float32 either way; BNV_<isa>_TOUCH_MIN_ROW_BYTES): the
 *   whole slab (its callers keep it to
 *   256 KiB, in L2), then summed from L2 (float64 (N, 128) at 17 GB/s).
 *   Loaded BN_WIDE_ROWS rows at a time instead, (N, 256) and (N, 512)
 *   float32 ran 20 % slower.
 * - narrower rows of the statistics, when contiguous: asked for
 *   (prefetcht0) two steps of BN_WIDE_ROWS rows ahead of the step being
 *   summed (bn_wide_rows_ahead, bn_prefetch_rows_ahead).
 * - narrower rows of the gradient sums, when contiguous: each BN_WIDE_ROWS
 *   rows (4 KB or less) of x and of dy loaded just before the column
 *   groups sum them from L1, and asked for two steps ahead as the
 *   statistics' rows are. Float32 (N, 128) sums, 205 and 51 MB, in
 *   streaming-copy times at x and dy 0, 16 and 32 bytes past a page
 *   (NumPy places large arrays 16 past one, PyTorch on a page): one
 *   thread 1.33-1.44 at each, against 1.69-2.02, 1.60-1.78 and 1.31-1.36
 *   by the rule before (loaded when on line starts, else as they come);
 *   two threads 1.23-1.27 against 1.14-1.21, 1.34-1.36 and 1.16-1.19.
 *   Asked for without the loading, 1.69-1.75 at offset 0. (N, 96) and
 *   (N, 72) even. With AVX-512 only (BNV_<isa>_GRAD_ROWS_AHEAD): with AVX2,
 *   float32 (N, 64) on one thread took 1.64-1.77 against 1.34-1.62
 *   (1.22-1.25 against 1.26-1.32 on two).
 * - the other narrower rows of the gradient sums (with AVX2, or a tile of
 *   wider rows), when every row starts on a cache line: loaded just
 *   before they are summed, as above. Float32 (400000, 128) moments, one
 *   core, took 1.2-1.6 streaming-copy times with the rows on line starts
 *   against 0.74-1.07 off them; loaded ahead, 0.8-1.2. Off line starts,
 *   loading ahead measured slower (0.85-1.38), so those rows are summed
 *   as they come. (Zen 4.)
 * Measured with AVX-512. With AVX2, the slab rule from 256 bytes took
 * (400000, 128) float32 moments from 1.65 streaming-copy times to 1.30 on
 * one thread (1.33 from 128 bytes, but (N, 32) and (N, 64) then 1.4
 * against 0.8). */
static inline int bn_touch_each_rows(const void *x, ptrdiff_t stride_bytes, ptrdiff_t ncols,
                                     ptrdiff_t row_bytes, ptrdiff_t group_cols,
                                     ptrdiff_t touch_min_row_bytes)
{
    return ncols > group_cols && row_bytes <= touch_min_row_bytes
           && (((uintptr_t)x | (uintptr_t)stride_bytes) & (BN_LINE_BYTES - 1)) == 0;
}

/* The statistics' narrower rows, in streaming-copy times, float32 (N, W)
 * moments, 205 MB, one thread, Zen 5, x 0, 16 and 32 bytes past a page:
 * - as they come: W = 128 0.78-1.05 (at 16 bytes, where half its 32-byte
 *   loads split lines, the worst); the loading rule of the gradient sums
 *   0.78-0.86 where it applies;
 * - asked for 1, 2 and 3 steps ahead: 0.68-0.75, 0.64-0.74, 0.66-0.78, at
 *   every offset; W = 96 from 0.70-0.78 to 0.63-0.65, W = 72 from 0.95 to
 *   0.84. (Wider rows keep the slab loading above: asked for ahead they ran
 *   10-35 % slower.)
 * Tiles narrower than their rows are left as they come (not measured). */
#define BN_WIDE_ROWS_AHEAD 2
/* Float64 statistics ask for rows of up to 1 KiB ahead rather than
 * touching them first: their one pass of sums, from memory, (N, 128) and
 * (N, 96) moments on one thread, Zen 5, took 0.75-0.80 streaming-copy times
 * against 0.84-0.85 touched (interleaved medians of 21). Wider rows are
 * still touched (measured for a pass of s1 alone: 2 KiB rows asked for
 * took 1.16 against 1.13). */
#define BN_F64_TOUCH_MIN_ROW_BYTES 1024
static inline int bn_wide_rows_ahead(ptrdiff_t ncols, ptrdiff_t row_bytes,
                                     ptrdiff_t stride_bytes, ptrdiff_t group_cols,
                                     ptrdiff_t touch_min_row_bytes)
{
    return ncols > group_cols && row_bytes <= touch_min_row_bytes && stride_bytes == row_bytes;
}
/* Ask for the lines of contiguous rows [r + ahead, r + ahead + step) of the
 * nrows at x (row_bytes each), those that exist, into L1.
 *
 * A call, not inlined: inlined into the walk, the same prefetches ran
 * (N, 128) at 1.2-1.5 times the time of none in some builds and 0.65 in
 * others, with the code's placement (not understood); as a call, 0.62-0.95
 * of none in every build tried (-falign-loops=64, -falign-functions=64).
 * The empty asm statement gives the function an effect, so that GCC keeps
 * its calls (bn_prefetch_to_l2 says why it would not). */
__attribute__((noinline)) static void bn_prefetch_rows_ahead(const void *x, ptrdiff_t r,
                                                             ptrdiff_t step, ptrdiff_t nrows,
                                                             ptrdiff_t row_bytes)
{
    ptrdiff_t first = r + BN_WIDE_ROWS_AHEAD * step;
    ptrdiff_t end = first + step < nrows ? first + step : nrows;
    uintptr_t line = ((uintptr_t)x + (uintptr_t)(first * row_bytes))
                     & ~(uintptr_t)(BN_LINE_BYTES - 1);
    uintptr_t stop = (uintptr_t)x + (uintptr_t)(end * row_bytes);
    __asm__ volatile("");
    for (; line < stop; line += BN_LINE_BYTES)
        __builtin_prefetch((const void *)line, 0, 3);
}
__attribute__((target("avx512f"))) static void bn_touch_rows_avx512(
    const void *x, ptrdiff_t nrows, ptrdiff_t stride_bytes, ptrdiff_t row_bytes)
{
    __m512i seen = _mm512_setzero_si512();
    volatile long long sink;
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const char *p = (const char *)x + r * stride_bytes;
        for (ptrdiff_t k = 0; k + 64 <= row_bytes; k += 64)
            seen = _mm512_or_si512(seen, _mm512_loadu_si512((const void *)(p + k)));
        seen = _mm512_or_si512(seen, _mm512_loadu_si512((const void *)(p + row_bytes - 64)));
    }
    sink = _mm512_reduce_or_epi64(seen);    /* keeps the loads */
    (void)sink;
}
/* The same with two 32-byte loads a line. */
__attribute__((target("avx2"))) static void bn_touch_rows_avx2(
    const void *x, ptrdiff_t nrows, ptrdiff_t stride_bytes, ptrdiff_t row_bytes)
{
    __m256i seen = _mm256_setzero_si256();
    volatile long long sink;
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const char *p = (const char *)x + r * stride_bytes;
        for (ptrdiff_t k = 0; k + 32 <= row_bytes; k += 32)
            seen = _mm256_or_si256(seen, _mm256_loadu_si256((const __m256i *)(p + k)));
        seen = _mm256_or_si256(seen, _mm256_loadu_si256((const __m256i *)(p + row_bytes - 32)));
    }
    sink = _mm256_extract_epi64(seen, 0) | _mm256_extract_epi64(seen, 1)
           | _mm256_extract_epi64(seen, 2) | _mm256_extract_epi64(seen, 3);
    (void)sink;
}

/* The column groups of NV1, NV2 and NV3 vectors over rows BN_WIDE_ROWS at
 * a time, the rest of the columns by the generic loop. */
#define BN_DEFINE_ROWS_SHIFTED_SUMS(ISA, TYPE, SFX, DT, NV1, NV2, NV3)                  \
BN_DEFINE_ROWS_SUMS(ISA, TYPE, SFX, DT, NV1)                                           \
BN_DEFINE_ROWS_SUMS(ISA, TYPE, SFX, DT, NV2)                                           \
BN_DEFINE_ROWS_SUMS(ISA, TYPE, SFX, DT, NV3)                                           \
__attribute__((target(BNV_##ISA##_TARGET))) static void bn_rows_shifted_sums_##SFX##_##ISA( \
    const TYPE *BN_RESTRICT x, ptrdiff_t nrows, ptrdiff_t stride, ptrdiff_t ncols,    \
    const double *BN_RESTRICT origin, const double *BN_RESTRICT offset,                \
    double *BN_RESTRICT s1, double *BN_RESTRICT s2)                                    \
{                                                                                      \
    ptrdiff_t group_cols = (NV1) * BNV_##ISA##_WIDTH;                                  \
    ptrdiff_t step = ncols > group_cols ? BN_WIDE_ROWS : nrows, j = 0;                 \
    ptrdiff_t row_bytes = ncols * (ptrdiff_t)sizeof(TYPE);                             \
    ptrdiff_t stride_bytes = stride * (ptrdiff_t)sizeof(TYPE);                         \
    int from_memory = offset == NULL;  /* with an offset, the second pass: in cache */ \
    ptrdiff_t touch_min = sizeof(TYPE) == sizeof(double) ? BN_F64_TOUCH_MIN_ROW_BYTES     \
                                                         : BNV_##ISA##_TOUCH_MIN_ROW_BYTES; \
    int ask_ahead = from_memory && bn_wide_rows_ahead(ncols, row_bytes, stride_bytes,    \
                                                      group_cols, touch_min);          \
    if (from_memory && row_bytes > touch_min)                                          \
        bn_touch_rows_##ISA(x, nrows, stride_bytes, row_bytes);                        \
    for (ptrdiff_t r = 0; r < nrows; r += step) {                                      \
        const TYPE *p = x + r * stride;                                                \
        ptrdiff_t n = nrows - r < step ? nrows - r : step;                             \
        if (ask_ahead)                                                                 \
            bn_prefetch_rows_ahead(x, r, step, nrows, row_bytes);                      \
        j = bn_rows_sums_##SFX##_##ISA##_##NV1(p, n, stride, ncols, origin, offset, s1, s2); \
        j += bn_rows_sums_##SFX##_##ISA##_##NV2(p + j, n, stride, ncols - j, origin + j, \
                                                offset ? offset + j : NULL, s1 + j, s2 + j); \
        j += bn_rows_sums_##SFX##_##ISA##_##NV3(p + j, n, stride, ncols - j, origin + j, \
                                                offset ? offset + j : NULL, s1 + j, s2 + j); \
    }                                                                                  \
    if (j < ncols)                                                                     \
        bn_rows_shifted_sums_generic_##SFX(x + j, nrows, stride, ncols - j, origin + j, \
                                           offset ? offset + j : NULL, s1 + j, s2 + j); \
}
BN_DEFINE_ROWS_SHIFTED_SUMS(avx512, float, f32, F32, 8, 4, 2)
BN_DEFINE_ROWS_SHIFTED_SUMS(avx512, double, f64, F64, 8, 4, 2)
BN_DEFINE_ROWS_SHIFTED_SUMS(avx2, float, f32, F32, 8, 4, 2)
/* (float64 statistics keep the generic loop with AVX2: (400000, 128)
 * training took 1.03-1.21 times as long in these groups.) */
#undef BN_DEFINE_ROWS_SHIFTED_SUMS
#undef BN_DEFINE_ROWS_SUMS
#undef BN_ROWS_SUMS_LOOP

/* The gradient sums' version of the blocked loops above: s_dy[j] += dy and
 * s_dy_dev[j] += dy * (x - mean[j]) (MULADD) down the rows, in the same
 * column groups, rows wider than the widest taken BN_WIDE_ROWS at a time.
 * Each column's sums take its rows in order, so the group width does not
 * change the bits. (N, 128) float32 sums ran at 3.8 times a streaming
 * copy's time on one thread when each 16 columns walked all the rows of a
 * slab in turn, 1.6 with the AVX-512 groups. */
#define BN_DEFINE_ROWS_GRAD_SUMS_GROUP(ISA, TYPE, SFX, DT, NVECS)                       \
__attribute__((target(BNV_##ISA##_TARGET))) static ptrdiff_t                            \
bn_rows_grad_sums_##SFX##_##ISA##_##NVECS(                                             \
    const TYPE *BN_RESTRICT x, const TYPE *BN_RESTRICT dy, ptrdiff_t nrows,            \
    ptrdiff_t stride, ptrdiff_t ncols, const double *BN_RESTRICT mean,                 \
    double *BN_RESTRICT s_dy, double *BN_RESTRICT s_dy_dev)                            \
{                                                                                      \
    enum { NV = NVECS, W = BNV_##ISA##_WIDTH };                                        \
    ptrdiff_t j = 0;                                                                   \
    for (; j + W * NV <= ncols; j += W * NV) {                                         \
        BNV_##ISA##_VEC m[NV], a[NV], b[NV];                                           \
        for (int t = 0; t < NV; t++) {                                                 \
            m[t] = BNV_##ISA##_LOADU(mean + j + W * t);                                \
            a[t] = BNV_##ISA##_LOADU(s_dy + j + W * t);                                \
            b[t] = BNV_##ISA##_LOADU(s_dy_dev + j + W * t);                            \
        }                                                                              \
        for (ptrdiff_t r = 0; r < nrows; r++) {                                        \
            const TYPE *p = x + r * stride + j, *q = dy + r * stride + j;              \
            for (int t = 0; t < NV; t++) {                                             \
                BNV_##ISA##_VEC g = BNV_##ISA##_LOAD_##DT(q + W * t);                  \
                BNV_##ISA##_VEC d = BNV_##ISA##_SUB(BNV_##ISA##_LOAD_##DT(p + W * t), m[t]); \
                a[t] = BNV_##ISA##_ADD(a[t], g);                                       \
                b[t] = BNV_##ISA##_MULADD_##DT(g, d, b[t]);                            \
            }                                                                          \
        }                                                                              \
        for (int t = 0; t < NV; t++) {                                                 \
            BNV_##ISA##_STOREU(s_dy + j + W * t, a[t]);                                \
            BNV_##ISA##_STOREU(s_dy_dev + j + W * t, b[t]);                            \
        }                                                                              \
    }                                                                                  \
    return j;                                                                          \
}
#define BN_DEFINE_ROWS_GRAD_SUMS(ISA, TYPE, SFX, DT, NV1, NV2, NV3)                     \
BN_DEFINE_ROWS_GRAD_SUMS_GROUP(ISA, TYPE, SFX, DT, NV1)                                \
BN_DEFINE_ROWS_GRAD_SUMS_GROUP(ISA, TYPE, SFX, DT, NV2)                                \
BN_DEFINE_ROWS_GRAD_SUMS_GROUP(ISA, TYPE, SFX, DT, NV3)                                \
__attribute__((target(BNV_##ISA##_TARGET))) static void bn_rows_grad_sums_##SFX##_##ISA( \
    const TYPE *BN_RESTRICT x, const TYPE *BN_RESTRICT dy, ptrdiff_t nrows,            \
    ptrdiff_t stride, ptrdiff_t ncols, const double *BN_RESTRICT mean,                 \
    double *BN_RESTRICT s_dy, double *BN_RESTRICT s_dy_dev)                            \
{                                                                                      \
    ptrdiff_t group_cols = (NV1) * BNV_##ISA##_WIDTH;                                  \
    ptrdiff_t step = ncols > group_cols ? BN_WIDE_ROWS : nrows, j = 0;                 \
    ptrdiff_t row_bytes = ncols * (ptrdiff_t)sizeof(TYPE);                             \
    ptrdiff_t stride_bytes = stride * (ptrdiff_t)sizeof(TYPE);                         \
    ptrdiff_t touch_min = BNV_##ISA##_TOUCH_MIN_ROW_BYTES;                             \
    int ask_ahead = BNV_##ISA##_GRAD_ROWS_AHEAD                                         \
                    && bn_wide_rows_ahead(ncols, row_bytes, stride_bytes, group_cols, touch_min); \
    int touch_x_slabs = ask_ahead || bn_touch_each_rows(x, stride_bytes, ncols, row_bytes, \
                                                        group_cols, touch_min);        \
    int touch_dy_slabs = ask_ahead || bn_touch_each_rows(dy, stride_bytes, ncols, row_bytes, \
                                                         group_cols, touch_min);       \
    if (row_bytes > touch_min) {                                                       \
        bn_touch_rows_##ISA(x, nrows, stride_bytes, row_bytes);                        \
        bn_touch_rows_##ISA(dy, nrows, stride_bytes, row_bytes);                       \
    }                                                                                  \
    for (ptrdiff_t r = 0; r < nrows; r += step) {                                      \
        const TYPE *p = x + r * stride, *q = dy + r * stride;                          \
        ptrdiff_t n = nrows - r < step ? nrows - r : step;                             \
        if (touch_x_slabs)                                                             \
            bn_touch_rows_##ISA(p, n, stride_bytes, row_bytes);                        \
        if (touch_dy_slabs)                                                            \
            bn_touch_rows_##ISA(q, n, stride_bytes, row_bytes);                        \
        if (ask_ahead) {                                                               \
            bn_prefetch_rows_ahead(x, r, step, nrows, row_bytes);                      \
            bn_prefetch_rows_ahead(dy, r, step, nrows, row_bytes);                     \
        }                                                                              \
        j = bn_rows_grad_sums_##SFX##_##ISA##_##NV1(p, q, n, stride, ncols, mean, s_dy, \
                                                    s_dy_dev);                         \
        j += bn_rows_grad_sums_##SFX##_##ISA##_##NV2(p + j, q + j, n, stride, ncols - j, \
                                                     mean + j, s_dy + j, s_dy_dev + j); \
        j += bn_rows_grad_sums_##SFX##_##ISA##_##NV3(p + j, q + j, n, stride, ncols - j, \
                                                     mean + j, s_dy + j, s_dy_dev + j); \
    }                                                                                  \
    if (j < ncols)                                                                     \
        bn_rows_grad_sums_generic_##SFX(x + j, dy + j, nrows, stride, ncols - j,       \
                                        mean + j, s_dy + j, s_dy_dev + j);             \
}
BN_DEFINE_ROWS_GRAD_SUMS(avx512, float, f32, F32, 8, 4, 2)
BN_DEFINE_ROWS_GRAD_SUMS(avx512, double, f64, F64, 8, 4, 2)
BN_DEFINE_ROWS_GRAD_SUMS(avx2, float, f32, F32, 8, 4, 2)
BN_DEFINE_ROWS_GRAD_SUMS(avx2, double, f64, F64, 8, 4, 2)
#undef BN_DEFINE_ROWS_GRAD_SUMS
#undef BN_DEFINE_ROWS_GRAD_SUMS_GROUP
#else
#define BN_X86_DISPATCH 0
#endif

static inline void bn_lane_shifted_sums_f32(
    const float *x, ptrdiff_t n, double origin, double offset, double *s1, double *s2)
{
#if BN_X86_DISPATCH
    /* float32 blocks take one pass with offset 0, where (x - origin) - 0 is
     * x - origin exactly: the fast versions skip that subtraction, the
     * one add a value that bounds them (6 vector adds per 16 floats). */
    if (offset != 0.0) {
        bn_lane_shifted_sums_generic_f32(x, n, origin, offset, s1, s2);
        return;
    }
    if (bn_cpu_avx512()) {
        bn_lane_shifted_sums_f32_avx512(x, n, origin, offset, s1, s2);
        return;
    }
    if (bn_cpu_avx2()) {
        bn_lane_shifted_sums_f32_avx2(x, n, origin, offset, s1, s2);
        return;
    }
#endif
    bn_lane_shifted_sums_generic_f32(x, n, origin, offset, s1, s2);
}

static inline void bn_lane_grad_sums_f32(
    const float *x, const float *dy, ptrdiff_t n, double mean, double *s_dy, double *s_dy_dev)
{
#if BN_X86_DISPATCH
    if (bn_cpu_avx512()) {
        bn_lane_grad_sums_f32_avx512(x, dy, n, mean, s_dy, s_dy_dev);
        return;
    }
    if (bn_cpu_avx2()) {
        bn_lane_grad_sums_f32_avx2(x, dy, n, mean, s_dy, s_dy_dev);
        return;
    }
#endif
    bn_lane_grad_sums_generic_f32(x, dy, n, mean, s_dy, s_dy_dev);
}

static inline void bn_rows_shifted_sums_f32(
    const float *x, ptrdiff_t nrows, ptrdiff_t stride, ptrdiff_t ncols,
    const double *origin, const double *offset, double *s1, double *s2)
{
#if BN_X86_DISPATCH
    if (offset == NULL && bn_cpu_avx512()) {
        bn_rows_shifted_sums_f32_avx512(x, nrows, stride, ncols, origin, NULL, s1, s2);
        return;
    }
    if (offset == NULL && bn_cpu_avx2()) {
        bn_rows_shifted_sums_f32_avx2(x, nrows, stride, ncols, origin, NULL, s1, s2);
        return;
    }
#endif
    bn_rows_shifted_sums_generic_f32(x, nrows, stride, ncols, origin, offset, s1, s2);
}

static inline void bn_rows_grad_sums_f32(
    const float *x, const float *dy, ptrdiff_t nrows, ptrdiff_t stride, ptrdiff_t ncols,
    const double *mean, double *s_dy, double *s_dy_dev)
{
#if BN_X86_DISPATCH
    if (bn_cpu_avx512()) {
        bn_rows_grad_sums_f32_avx512(x, dy, nrows, stride, ncols, mean, s_dy, s_dy_dev);
        return;
    }
    if (bn_cpu_avx2()) {
        bn_rows_grad_sums_f32_avx2(x, dy, nrows, stride, ncols, mean, s_dy, s_dy_dev);
        return;
    }
#endif
    bn_rows_grad_sums_generic_f32(x, dy, nrows, stride, ncols, mean, s_dy, s_dy_dev);
}

/* float64 runs need no conversion: the generic versions vectorise well,
 * but for their tails, which the AVX-512 block and group loops take
 * (bn_run_shifted_sums_f64_avx512 says why). The gradient sums take those
 * for runs of up to this many values only: from memory, longer runs ran
 * slower in them, for a cause not found (the same instructions but for the
 * lanes' loads and stores around each run): float64 (128, 128, 14, 14)
 * gradient sums 1.12 -> 1.49 ms, (410, 128, 10, 10) 2.30 -> 2.81, where
 * (256, 256, 8, 8) took 2.48 -> 2.14 and runs of 25 values half the time
 * (one thread). */
#define BN_F64_GRAD_LANES_MAX 64

#define bn_lane_shifted_sums_f64 bn_lane_shifted_sums_generic_f64
#define bn_lane_grad_sums_f64 bn_lane_grad_sums_generic_f64

/* The totals of a block of whole runs (nruns runs of n values, stride
 * apart), its lanes carried from run to run as a call per run carries them:
 * float32 with AVX-512 or AVX2 in registers (bn_block_*_f32_avx512, _avx2),
 * else in memory; with ahead_bytes > 0, each run's bytes that far on asked
 * for as it is summed. And the lanes of a group of channels' blocks
 * (BN_DEFINE_GROUP_GRAD_SUMS says how). */
#define BN_DEFINE_BLOCK_SUMS(TYPE, SFX)                                                    \
static inline void bn_block_shifted_sums_##SFX(const TYPE *x, ptrdiff_t nruns,            \
                                               ptrdiff_t stride, ptrdiff_t n,             \
                                               double origin, double offset,              \
                                               ptrdiff_t ahead_bytes, double *t1,         \
                                               double *t2)                                \
{                                                                                          \
    BN_BLOCK_SHIFTED_SUMS_FAST_##SFX                                                       \
    bn_lanes s1 = {0}, s2 = {0};                                                          \
    for (ptrdiff_t r = 0; r < nruns; r++) {                                               \
        if (ahead_bytes > 0)                                                               \
            bn_prefetch_span((uintptr_t)(x + r * stride) + (uintptr_t)ahead_bytes,        \
                             n * (ptrdiff_t)sizeof(TYPE));                                 \
        bn_lane_shifted_sums_##SFX(x + r * stride, n, origin, offset, s1, s2);            \
    }                                                                                      \
    *t1 = bn_lanes_total(s1);                                                              \
    *t2 = bn_lanes_total(s2);                                                              \
}                                                                                          \
static inline void bn_block_grad_sums_##SFX(const TYPE *x, const TYPE *dy,               \
                                            ptrdiff_t nruns, ptrdiff_t stride,            \
                                            ptrdiff_t n, double mean, double *t_dy,       \
                                            double *t_dev)                                 \
{                                                                                          \
    BN_BLOCK_GRAD_SUMS_FAST_##SFX                                                          \
    bn_lanes s_dy = {0}, s_dev = {0};                                                     \
    for (ptrdiff_t r = 0; r < nruns; r++)                                                 \
        bn_lane_grad_sums_##SFX(x + r * stride, dy + r * stride, n, mean, s_dy, s_dev);   \
    *t_dy = bn_lanes_total(s_dy);                                                          \
    *t_dev = bn_lanes_total(s_dev);                                                        \
}                                                                                          \
static inline void bn_group_grad_sums_##SFX(const TYPE *x, const TYPE *dy,               \
                                            ptrdiff_t nrows, ptrdiff_t stride,            \
                                            ptrdiff_t nchan, ptrdiff_t n,                 \
                                            const double *mean, bn_lane_pair *pairs,      \
                                            ptrdiff_t after, ptrdiff_t ask_max_bytes)     \
{                                                                                          \
    BN_GROUP_GRAD_SUMS_FAST_##SFX                                                          \
    (void)after; /* for the fast loops' prefetches only */                                \
    (void)ask_max_bytes;                                                                   \
    for (ptrdiff_t r = 0; r < nrows; r++)                                                 \
        for (ptrdiff_t c = 0; c < nchan; c++)                                             \
            bn_lane_grad_sums_##SFX(x + r * stride + c * n, dy + r * stride + c * n, n,   \
                                    mean[c], pairs[c].a, pairs[c].b);                      \
}
#if BN_X86_DISPATCH
/* float32 blocks and groups take the AVX-512 loop, else the AVX2 one, with
 * the same arguments: STEM_f32_avx512(...) or STEM_f32_avx2(...), then
 * return. */
#define BN_FAST_F32(STEM, ...)                                                            \
    if (bn_cpu_avx512()) {                                                                \
        STEM##_f32_avx512(__VA_ARGS__);                                                   \
        return;                                                                            \
    }                                                                                      \
    if (bn_cpu_avx2()) {                                                                  \
        STEM##_f32_avx2(__VA_ARGS__);                                                     \
        return;                                                                            \
    }
#define BN_BLOCK_SHIFTED_SUMS_FAST_f32                                                    \
    if (offset == 0.0) {                                                                  \
        BN_FAST_F32(bn_block_shifted_sums, x, nruns, stride, n, origin, ahead_bytes, t1,  \
                    t2)                                                                    \
    }
#define BN_BLOCK_GRAD_SUMS_FAST_f32                                                       \
    BN_FAST_F32(bn_block_grad_sums, x, dy, nruns, stride, n, mean, t_dy, t_dev)
#define BN_GROUP_GRAD_SUMS_FAST_f32                                                       \
    BN_FAST_F32(bn_group_grad_sums, x, dy, nrows, stride, nchan, n, mean, pairs, after,    \
                ask_max_bytes)
#define BN_BLOCK_SHIFTED_SUMS_FAST_f64                                                    \
    if (bn_cpu_avx512()) {                                                                \
        bn_block_shifted_sums_f64_avx512(x, nruns, stride, n, origin, offset, ahead_bytes, \
                                         t1, t2);                                          \
        return;                                                                            \
    }
#define BN_BLOCK_GRAD_SUMS_FAST_f64                                                       \
    if (bn_cpu_avx512() && n <= BN_F64_GRAD_LANES_MAX) {                                  \
        bn_block_grad_sums_f64_avx512(x, dy, nruns, stride, n, mean, t_dy, t_dev);       \
        return;                                                                            \
    }
#define BN_GROUP_GRAD_SUMS_FAST_f64                                                       \
    if (bn_cpu_avx512() && n <= BN_F64_GRAD_LANES_MAX) {                                  \
        bn_group_grad_sums_f64_avx512(x, dy, nrows, stride, nchan, n, mean, pairs, after, \
                                      ask_max_bytes);                                     \
        return;                                                                            \
    }
#else
#define BN_BLOCK_SHIFTED_SUMS_FAST_f32
#define BN_BLOCK_GRAD_SUMS_FAST_f32
#define BN_GROUP_GRAD_SUMS_FAST_f32
#define BN_BLOCK_SHIFTED_SUMS_FAST_f64
#define BN_BLOCK_GRAD_SUMS_FAST_f64
#define BN_GROUP_GRAD_SUMS_FAST_f64
#endif
BN_DEFINE_BLOCK_SUMS(float, f32)
BN_DEFINE_BLOCK_SUMS(double, f64)
#undef BN_DEFINE_BLOCK_SUMS
#undef BN_FAST_F32

/* The pipelined training forward's inner loop: two runs of n values at
 * once, the statistics of xs (as bn_lane_shifted_sums_f32 with offset 0,
 * into s1 and s2) and xn normalised into yn (as bn_affine_f32), asking on
 * the way for the n values at `ahead` to be brought into L2 (prefetcht1).
 * xs, ahead or xn may be NULL for none. With streaming stores, `leave`
 * (BN_LEAVE_HEAD, BN_LEAVE_TAIL, below) names the partial end lines of yn
 * left for the caller.
 *
 * It reads the statistics of one channel from memory while it normalises
 * the previous one from cache. Interleaved a line at a time, the streaming
 * stores keep draining while the statistics are computed; the software
 * prefetch of the channel's next run, a whole run ahead, keeps the loads of
 * short runs (scattered C * inner apart) from waiting on memory at each
 * run's start. Both halves do exactly the operations of the separate loops,
 * in the same order for each lane: the results are bitwise theirs. */
#define BN_PIPE_SPAN 256

/* The partial lines a pipelined kernel may leave unwritten (its `leave`
 * argument, with streaming stores only): the first line of the run it
 * writes, which it shares with the run before, and the last, shared with
 * the run after. The caller writes each such line whole, once both runs'
 * constants are known (bn_affine_seam, bn_grad_seam): written in two parts,
 * a normal store beside the streaming ones, that line is read from memory
 * first and stalls the stores behind it. */
#define BN_LEAVE_HEAD 1
#define BN_LEAVE_TAIL 2

/* Values [*begin, *end) of a run of n values at out are written under
 * `leave`: all but a partial first line (BN_LEAVE_HEAD) and a partial last
 * one (BN_LEAVE_TAIL). */
static inline void bn_written_span(const void *out, size_t itemsize, ptrdiff_t n, int leave,
                                   ptrdiff_t *begin, ptrdiff_t *end)
{
    *begin = (leave & BN_LEAVE_HEAD) ? bn_line_head(out, itemsize, n) : 0;
    *end = n;
    if (leave & BN_LEAVE_TAIL) {
        ptrdiff_t tail = (ptrdiff_t)(((uintptr_t)out + (size_t)n * itemsize)
                                     & (BN_LINE_BYTES - 1)) / (ptrdiff_t)itemsize;
        *end = n - tail > *begin ? n - tail : *begin;
    }
}

/* The fused pipelined loops below read a statistics stream from memory and,
 * in the same loop, store another run: a store to an address equal to a
 * later load's modulo 4 KiB, a few lines ahead of it, stalls that load as
 * if it depended on the store, iteration after iteration (runs of 4 KiB
 * keep that distance for a whole call). So where the store at `store`
 * would run up to BN_ALIAS_WINDOW bytes ahead of the stream at `load`
 * (modulo 4 KiB), the loop first reads that many of the stream's steps of
 * `step` bytes alone, and its stores then stay behind every later load.
 * Measured on (32, 128, 32, 32) float32 (runs of 4 KiB), x and y 16 bytes
 * past a page start as NumPy places large arrays, against no lead: training
 * forward 0.80-0.82 of the time on one thread, 0.96 on two; backward 0.86
 * and 0.81; other shapes and float64 0.90-1.03. benchmarks/page_offsets.py
 * times the calls with the output at each offset. */
#define BN_ALIAS_SPAN 4096
#define BN_ALIAS_WINDOW 512
static inline ptrdiff_t bn_alias_lead(const void *store, const void *load, ptrdiff_t step)
{
    ptrdiff_t gap = (ptrdiff_t)(((uintptr_t)store - (uintptr_t)load) & (BN_ALIAS_SPAN - 1));
    return gap > 0 && gap < BN_ALIAS_WINDOW ? gap / step + 1 : 0;
}

#if BN_X86_DISPATCH
BN_INLINE __m512 bn_affine16_avx512(__m512 v, __m512 hi, __m512 lo, __m512 scale,
                                     __m512 shift, int relu)
    __attribute__((target("avx512f")));
BN_INLINE __m512 bn_affine16_avx512(__m512 v, __m512 hi, __m512 lo, __m512 scale,
                                     __m512 shift, int relu)
{
    v = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(v, hi), lo), scale), shift);
    if (relu)   /* bn_relu_line: +0 where v < 0; NaN and -0 kept */
        v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ),
                               _mm512_setzero_ps());
    return v;
}

/* The first `count` (< a vector) values of v into y, which is within a line:
 * with `stream`, whole 16-byte pieces with streaming stores and only what
 * is not 16-byte aligned with normal ones, as BN_ELEMENTWISE does. A
 * normal store to a line the streaming stores leave untouched would read
 * it from memory first, and stall the stores behind it while it does:
 * with NumPy's usual 16-byte offset, two such lines per run (of 50) cost
 * the pipelined forward a third of its speed. */
#define BN_DEFINE_STORE_PART(T, NAME, VEC, SFX)                                           \
BN_INLINE void NAME(T *y, ptrdiff_t count, VEC v, int stream)                             \
    __attribute__((target("avx512f")));                                                   \
BN_INLINE void NAME(T *y, ptrdiff_t count, VEC v, int stream)                             \
{                                                                                         \
    T part[64 / sizeof(T)] __attribute__((aligned(64)));                                  \
    ptrdiff_t j = 0;                                                                      \
    _mm512_store_##SFX(part, v);                                                          \
    if (stream) {                                                                         \
        for (; j < count && ((uintptr_t)(y + j) & 15); j++)                               \
            y[j] = part[j];                                                               \
        for (; j + (ptrdiff_t)(16 / sizeof(T)) <= count; j += 16 / sizeof(T))             \
            _mm_stream_##SFX(y + j, _mm_loadu_##SFX(part + j));                           \
    }                                                                                     \
    for (; j < count; j++)                                                                \
        y[j] = part[j];                                                                   \
}
BN_DEFINE_STORE_PART(float, bn_store_part_avx512, __m512, ps)
BN_DEFINE_STORE_PART(double, bn_store_part8_avx512, __m512d, pd)
#undef BN_DEFINE_STORE_PART

/* Vector v into p: streamed when the kernel's `stream` is set. */
#define BN_STORE_VEC(SFX, p, v)                                                           \
    do {                                                                                  \
        if (stream)                                                                       \
            _mm512_stream_##SFX(p, v);                                                    \
        else                                                                              \
            _mm512_storeu_##SFX(p, v);                                                    \
    } while (0)

__attribute__((target("avx512f"))) static void bn_stats_and_affine_f32_avx512(
    const float *BN_RESTRICT xs, ptrdiff_t n, double origin, double *BN_RESTRICT s1,
    double *BN_RESTRICT s2, const float *ahead, const float *xn, float *yn, float mean_hi,
    float mean_lo, float scale, float shift, int relu, int stream, int leave)
{
    __m512d a1 = _mm512_setzero_pd(), b1 = a1, a2 = a1, b2 = a1;
    const __m512d o = _mm512_set1_pd(origin);
    const __m512 h = _mm512_set1_ps(mean_hi), l = _mm512_set1_ps(mean_lo);
    const __m512 sc = _mm512_set1_ps(scale), sh = _mm512_set1_ps(shift);
    /* Statistics: values [0, ns) sixteen at a time, then a tail in registers.
     * Normalisation: a scalar head [0, k0) up to a 64-byte boundary of yn
     * (streaming stores take whole aligned lines), whole vectors, a tail. */
    ptrdiff_t ns = xs == NULL ? 0 : n - n % 16;
    ptrdiff_t k0 = 0, k, i = 0;
    if (xn != NULL && stream)
        k0 = bn_line_head(yn, sizeof(float), n);
    /* The run ahead: the loop asks for the line of each vector's last value,
     * so the run's first line (where it does not start one) and its tail are
     * left to the hardware. Asking for those two here as well, as the
     * backward does, was measured slower: 1.01-1.09x the time on one thread,
     * (N, C, H, W) of 16-205 MB. */
    if (xs != NULL) {
        bn_lanes_load_avx512(s1, s2, &a1, &b1, &a2, &b2);
    }
    /* The head and tail of the normalisation are masked vectors (the same
     * operations on each value). */
    if (xn != NULL && k0 > 0 && !(leave & BN_LEAVE_HEAD)) {
        __mmask16 m = (__mmask16)((1u << k0) - 1);
        bn_store_part_avx512(yn, k0, bn_affine16_avx512(_mm512_maskz_loadu_ps(m, xn), h, l, sc,
                                                        sh, relu), stream);
    }
    k = xn == NULL ? n : k0;
#define BN_STATS16                                                                    \
    do {                                                                              \
        __m512d d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(xs + i)), o);        \
        __m512d e = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(xs + i + 8)), o);    \
        a1 = _mm512_add_pd(a1, d);                                                    \
        a2 = _mm512_fmadd_pd(d, d, a2);                                               \
        b1 = _mm512_add_pd(b1, e);                                                    \
        b2 = _mm512_fmadd_pd(e, e, b2);                                               \
        if (ahead != NULL)                                                            \
            _mm_prefetch((const char *)(ahead + i + 15), _MM_HINT_T1);                \
        i += 16;                                                                      \
    } while (0)
#define BN_AFFINE16                                                                   \
    do {                                                                              \
        __m512 v = _mm512_loadu_ps(xn + k);                                            \
        BN_STORE_VEC(ps, yn + k, bn_affine16_avx512(v, h, l, sc, sh, relu));           \
        k += 16;                                                                      \
    } while (0)
    /* BN_GROUP_LINES vectors loaded before any is stored. */
#define BN_AFFINE64                                                                   \
    do {                                                                              \
        __m512 v0 = _mm512_loadu_ps(xn + k), v1 = _mm512_loadu_ps(xn + k + 16);        \
        __m512 v2 = _mm512_loadu_ps(xn + k + 32), v3 = _mm512_loadu_ps(xn + k + 48);   \
        BN_STORE_VEC(ps, yn + k, bn_affine16_avx512(v0, h, l, sc, sh, relu));          \
        BN_STORE_VEC(ps, yn + k + 16, bn_affine16_avx512(v1, h, l, sc, sh, relu));     \
        BN_STORE_VEC(ps, yn + k + 32, bn_affine16_avx512(v2, h, l, sc, sh, relu));     \
        BN_STORE_VEC(ps, yn + k + 48, bn_affine16_avx512(v3, h, l, sc, sh, relu));     \
        k += 64;                                                                      \
    } while (0)
    /* A vector of each in turn: four statistics vectors before four
     * normalised ones (BN_AFFINE64) measured 1.04-1.10x the time on runs of
     * 28 x 28 and 56 x 56 values, one thread. */
    if (xs != NULL && xn != NULL)
        for (ptrdiff_t lead = bn_alias_lead(yn + k, xs, 64); lead > 0 && i < ns; lead--)
            BN_STATS16;
    while (i < ns && k + 16 <= n) {
        BN_STATS16;
        BN_AFFINE16;
    }
    while (i < ns)
        BN_STATS16;
    while (k + 64 <= n)
        BN_AFFINE64;
    while (k + 16 <= n)
        BN_AFFINE16;
#undef BN_STATS16
#undef BN_AFFINE64
#undef BN_AFFINE16
    if (k < n && !(leave & BN_LEAVE_TAIL)) {
        __m512 v = bn_load_tail_avx512(xn + k, n - k, k);
        bn_store_part_avx512(yn + k, n - k, bn_affine16_avx512(v, h, l, sc, sh, relu), stream);
    }
    if (xs != NULL) {
        if (ns < n)
            bn_tail_shifted_sums_avx512(xs + ns, n - ns, ns, o, &a1, &b1, &a2, &b2);
        bn_lanes_store_avx512(s1, s2, a1, b1, a2, b2);
    }
}
#endif

/* float64's: the same, eight values a vector, so sixteen (the lanes) in
 * two. The generic loops it matches (bn_lane_shifted_sums_generic_f64,
 * bn_affine_f64) round each product before its add (no FMA), and so does
 * it. */
#if BN_X86_DISPATCH
BN_INLINE __m512d bn_affine8_avx512(__m512d v, __m512d hi, __m512d lo, __m512d scale,
                                     __m512d shift, int relu)
    __attribute__((target("avx512f")));
BN_INLINE __m512d bn_affine8_avx512(__m512d v, __m512d hi, __m512d lo, __m512d scale,
                                     __m512d shift, int relu)
{
    v = _mm512_add_pd(_mm512_mul_pd(_mm512_sub_pd(_mm512_sub_pd(v, hi), lo), scale), shift);
    if (relu)
        v = _mm512_mask_mov_pd(v, _mm512_cmp_pd_mask(v, _mm512_setzero_pd(), _CMP_LT_OQ),
                               _mm512_setzero_pd());
    return v;
}

__attribute__((target("avx512f"))) static void bn_stats_and_affine_f64_avx512(
    const double *BN_RESTRICT xs, ptrdiff_t n, double origin, double *BN_RESTRICT s1,
    double *BN_RESTRICT s2, const double *ahead, const double *xn, double *yn,
    double mean_hi, double mean_lo, double scale, double shift, int relu, int stream,
    int leave)
{
    __m512d a1 = _mm512_setzero_pd(), b1 = a1, a2 = a1, b2 = a1;
    const __m512d o = _mm512_set1_pd(origin);
    const __m512d h = _mm512_set1_pd(mean_hi), l = _mm512_set1_pd(mean_lo);
    const __m512d sc = _mm512_set1_pd(scale), sh = _mm512_set1_pd(shift);
    /* Statistics: values [0, ns) sixteen at a time, then a masked tail.
     * Normalisation: a masked head [0, k0) up to a line of yn, whole
     * vectors, a masked tail. */
    ptrdiff_t ns = xs == NULL ? 0 : n - n % 16;
    ptrdiff_t k0 = 0, k, i = 0;
    if (xn != NULL && stream)
        k0 = bn_line_head(yn, sizeof(double), n);
    if (ahead != NULL && n > 0) {
        _mm_prefetch((const char *)ahead, _MM_HINT_T1);
        _mm_prefetch((const char *)(ahead + n - 1), _MM_HINT_T1);
    }
    if (xs != NULL)
        bn_lanes_load_avx512(s1, s2, &a1, &b1, &a2, &b2);
    if (xn != NULL && k0 > 0 && !(leave & BN_LEAVE_HEAD)) {
        __mmask8 head = (__mmask8)((1u << k0) - 1);
        bn_store_part8_avx512(yn, k0, bn_affine8_avx512(_mm512_maskz_loadu_pd(head, xn), h, l,
                                                        sc, sh, relu), stream);
    }
    k = xn == NULL ? n : k0;
#define BN_STATS16                                                                    \
    do {                                                                              \
        __m512d d = _mm512_sub_pd(_mm512_loadu_pd(xs + i), o);                        \
        __m512d e = _mm512_sub_pd(_mm512_loadu_pd(xs + i + 8), o);                    \
        a1 = _mm512_add_pd(a1, d);                                                    \
        a2 = _mm512_add_pd(a2, _mm512_mul_pd(d, d));                                  \
        b1 = _mm512_add_pd(b1, e);                                                    \
        b2 = _mm512_add_pd(b2, _mm512_mul_pd(e, e));                                  \
        if (ahead != NULL) {                                                          \
            /* Both lines of these sixteen values, of the run ahead. */              \
            _mm_prefetch((const char *)(ahead + i + 7), _MM_HINT_T1);                 \
            _mm_prefetch((const char *)(ahead + i + 15), _MM_HINT_T1);                \
        }                                                                             \
        i += 16;                                                                      \
    } while (0)
#define BN_AFFINE8                                                                    \
    do {                                                                              \
        BN_STORE_VEC(pd, yn + k, bn_affine8_avx512(_mm512_loadu_pd(xn + k), h, l, sc,  \
                                                   sh, relu));                        \
        k += 8;                                                                       \
    } while (0)
    /* BN_GROUP_LINES vectors loaded before any is stored, as float32's. */
#define BN_AFFINE32                                                                   \
    do {                                                                              \
        __m512d v0 = _mm512_loadu_pd(xn + k), v1 = _mm512_loadu_pd(xn + k + 8);       \
        __m512d v2 = _mm512_loadu_pd(xn + k + 16), v3 = _mm512_loadu_pd(xn + k + 24);  \
        BN_STORE_VEC(pd, yn + k, bn_affine8_avx512(v0, h, l, sc, sh, relu));           \
        BN_STORE_VEC(pd, yn + k + 8, bn_affine8_avx512(v1, h, l, sc, sh, relu));       \
        BN_STORE_VEC(pd, yn + k + 16, bn_affine8_avx512(v2, h, l, sc, sh, relu));      \
        BN_STORE_VEC(pd, yn + k + 24, bn_affine8_avx512(v3, h, l, sc, sh, relu));      \
        k += 32;                                                                      \
    } while (0)
    if (xs != NULL && xn != NULL)
        for (ptrdiff_t lead = bn_alias_lead(yn + k, xs, 128); lead > 0 && i < ns; lead--)
            BN_STATS16;
    while (i + 32 <= ns && k + 32 <= n) {
        BN_STATS16;
        BN_STATS16;
        BN_AFFINE32;
    }
    while (i < ns && k + 16 <= n) {
        BN_STATS16;
        BN_AFFINE8;
        BN_AFFINE8;
    }
    while (i < ns)
        BN_STATS16;
    while (k + 32 <= n)
        BN_AFFINE32;
    while (k + 8 <= n)
        BN_AFFINE8;
#undef BN_STATS16
#undef BN_AFFINE32
#undef BN_AFFINE8
    if (k < n && !(leave & BN_LEAVE_TAIL)) {
        __mmask8 tail = (__mmask8)((1u << (n - k)) - 1);
        bn_store_part8_avx512(yn + k, n - k, bn_affine8_avx512(_mm512_maskz_loadu_pd(tail, xn + k),
                                                               h, l, sc, sh, relu), stream);
    }
    if (xs != NULL) {
        if (ns < n) {
            /* Values ns + t into lanes t, as the generic loop's scalar tail. */
            unsigned r = (unsigned)(n - ns);
            __mmask8 in_a = (__mmask8)((1u << r) - 1), in_b = (__mmask8)(((1u << r) - 1) >> 8);
            __m512d d = _mm512_sub_pd(_mm512_maskz_loadu_pd(in_a, xs + ns), o);
            __m512d e = _mm512_sub_pd(_mm512_maskz_loadu_pd(in_b, xs + ns + 8), o);
            a1 = _mm512_mask_add_pd(a1, in_a, a1, d);
            a2 = _mm512_mask_add_pd(a2, in_a, a2, _mm512_mul_pd(d, d));
            b1 = _mm512_mask_add_pd(b1, in_b, b1, e);
            b2 = _mm512_mask_add_pd(b2, in_b, b2, _mm512_mul_pd(e, e));
        }
        bn_lanes_store_avx512(s1, s2, a1, b1, a2, b2);
    }
}
#endif

/* Where the elementwise loops (BN_ELEMENTWISE) begin to stream a call's n
 * values at out: after a scalar head up to 16-byte alignment, from which
 * they stream groups of 64 bytes. 0 when out is not aligned to its values
 * (they then stream nothing). */
static inline ptrdiff_t bn_elementwise_head(const void *out, size_t itemsize, ptrdiff_t n)
{
    if ((uintptr_t)out % itemsize != 0)
        return 0;
    ptrdiff_t head = (ptrdiff_t)(((16 - ((uintptr_t)out & 15)) & 15) / itemsize);
    return head < n ? head : n;
}

/* The output values [*lo, *hi) that go with the input piece [j, j + m) of
 * a run of n values in the piecewise loops below, whose output is written
 * in [begin, end) by elementwise loops that begin streaming at `head`.
 * Pieces after the first start head values later, on the grid of the
 * first call's streamed groups, so that only the run's ends take scalar
 * stores. A piece cut off that grid ends in scalar stores to a line whose
 * other values are streamed: float64 training on 28x28 maps, two threads,
 * pieces cut on cache lines instead measured 1.3-1.4x slower. */
static inline void bn_output_piece(ptrdiff_t j, ptrdiff_t m, ptrdiff_t n, ptrdiff_t begin,
                                   ptrdiff_t end, ptrdiff_t head, ptrdiff_t *lo,
                                   ptrdiff_t *hi)
{
    *lo = j == 0 ? begin : (j + head > begin ? j + head : begin);
    *hi = j + m == n ? end : (j + m + head < end ? j + m + head : end);
}

/* The same work as the separate loops, piece by piece (pieces of a multiple
 * of BN_LANES values keep every value's lane): the statistics of a piece of
 * xs, then the normalisation of a piece of xn. The loop without AVX-512,
 * bitwise the fused ones, without their speed: float64 pipelined training
 * on two threads, runs of 6272 to 25088 bytes, took it at 0.49-0.69 of a
 * streaming copy, the fused loop at 0.51-0.72 (medians, shuffled order). */
#define BN_DEFINE_STATS_AND_AFFINE_PIECES(T, SFX)                                      \
static inline void bn_stats_and_affine_pieces_##SFX(                                   \
    const T *xs, ptrdiff_t n, double origin, double *s1, double *s2, const T *ahead,   \
    const T *xn, T *yn, T mean_hi, T mean_lo, T scale, T shift, int relu, int stream,  \
    int leave)                                                                         \
{                                                                                      \
    ptrdiff_t begin = 0, end = n, head = 0;                                            \
    if (xn != NULL && stream) {                                                        \
        bn_written_span(yn, sizeof(T), n, leave, &begin, &end);                        \
        head = begin + bn_elementwise_head(yn + begin, sizeof(T), end - begin);        \
    }                                                                                  \
    for (ptrdiff_t j = 0; j < n; j += BN_PIPE_SPAN) {                                  \
        ptrdiff_t m = n - j < BN_PIPE_SPAN ? n - j : BN_PIPE_SPAN, lo, hi;             \
        bn_output_piece(j, m, n, begin, end, head, &lo, &hi);                          \
        if (ahead != NULL)                                                             \
            for (ptrdiff_t k = 0; k < m; k += BN_LINE_BYTES / (ptrdiff_t)sizeof(T))    \
                __builtin_prefetch(ahead + j + k, 0, 2);                               \
        if (xs != NULL)                                                                \
            bn_lane_shifted_sums_##SFX(xs + j, m, origin, 0.0, s1, s2);                \
        if (xn != NULL && lo < hi)                                                     \
            bn_affine_##SFX(xn + lo, yn + lo, hi - lo, mean_hi, mean_lo, scale, shift,  \
                            relu, stream);                                             \
    }                                                                                  \
}
BN_DEFINE_STATS_AND_AFFINE_PIECES(float, f32)
BN_DEFINE_STATS_AND_AFFINE_PIECES(double, f64)
#undef BN_DEFINE_STATS_AND_AFFINE_PIECES

static inline void bn_stats_and_affine_f32(
    const float *xs, ptrdiff_t n, double origin, double *s1, double *s2, const float *ahead,
    const float *xn, float *yn, float mean_hi, float mean_lo, float scale, float shift,
    int relu, int stream, int leave)
{
#if BN_X86_DISPATCH
    if (bn_cpu_avx512()) {
        bn_stats_and_affine_f32_avx512(xs, n, origin, s1, s2, ahead, xn, yn, mean_hi,
                                       mean_lo, scale, shift, relu, stream, leave);
        return;
    }
#endif
    bn_stats_and_affine_pieces_f32(xs, n, origin, s1, s2, ahead, xn, yn, mean_hi, mean_lo,
                                   scale, shift, relu, stream, leave);
}

static inline void bn_stats_and_affine_f64(
    const double *xs, ptrdiff_t n, double origin, double *s1, double *s2,
    const double *ahead, const double *xn, double *yn, double mean_hi, double mean_lo,
    double scale, double shift, int relu, int stream, int leave)
{
#if BN_X86_DISPATCH
    if (bn_cpu_avx512()) {
        bn_stats_and_affine_f64_avx512(xs, n, origin, s1, s2, ahead, xn, yn, mean_hi,
                                       mean_lo, scale, shift, relu, stream, leave);
        return;
    }
#endif
    bn_stats_and_affine_pieces_f64(xs, n, origin, s1, s2, ahead, xn, yn, mean_hi, mean_lo,
                                   scale, shift, relu, stream, leave);
}

/* Whether bn_stats_and_affine_f32 and _f64 have their fused AVX-512 loops
 * here: the pipelined forward was measured only on such machines. The
 * piecewise fallbacks are bitwise the same, and run when forced. */
static inline int bn_pipelined_fused(void)
{
#if BN_X86_DISPATCH
    return bn_cpu_avx512();
#else
    return 0;
#endif
}

/* The interleaved normalisation as one flat loop. Rows of W values laid end
 * to end repeat their per-column constants every W values, so a span of
 * them is one run whose constants come from a periodic pattern: value i of
 * the span takes those of pattern column (phase + i) % period, where period
 * is a multiple of W of at least one vector and `pattern` holds hi, lo,
 * scale and shift, each period + one vector long (the extra vector repeats
 * its start, so a vector at any column loads without wrapping).
 *
 * Walked row by row, narrow rows (W = 8, 128) ran at 0.71-0.79 of a
 * streaming copy on one thread: every row began and ended off a line
 * boundary, with normal stores into lines the streaming stores also wrote.
 * Here the stores are whole aligned 64-byte lines but for a masked head and
 * tail; the loads of the pattern come from L1, from whole lines when the
 * caller aligns it (W = 128 on one thread: 0.83 of a streaming copy with
 * loads split across lines, 0.97 without). Same operations per value as
 * bn_rows_affine (BN_AFFINE, then bn_relu), so the results are bitwise
 * those of the row loop. AVX-512 only: bn_periodic_affine returns 0 without
 * touching anything elsewhere, and the caller walks the rows. */
#if BN_X86_DISPATCH
BN_INLINE __m512 bn_grad16_avx512(__m512 x, __m512 dy, __m512 hi, __m512 lo, __m512 k,
                                   __m512 c1, __m512 c0)
    __attribute__((target("avx512f")));
BN_INLINE __m512 bn_grad16_avx512(__m512 x, __m512 dy, __m512 hi, __m512 lo, __m512 k,
                                   __m512 c1, __m512 c0)
{
    /* dy * k + (((x - hi) - lo) * c1 + c0), rounded after every operation
     * as bn_grad_input_f32 is (built with -ffp-contract=off: no FMA). */
    __m512 dev = _mm512_sub_ps(_mm512_sub_ps(x, hi), lo);
    return _mm512_add_ps(_mm512_mul_ps(dy, k), _mm512_add_ps(_mm512_mul_ps(dev, c1), c0));
}

BN_INLINE __m512d bn_grad8_avx512(__m512d x, __m512d dy, __m512d hi, __m512d lo, __m512d k,
                                   __m512d c1, __m512d c0)
    __attribute__((target("avx512f")));
BN_INLINE __m512d bn_grad8_avx512(__m512d x, __m512d dy, __m512d hi, __m512d lo, __m512d k,
                                   __m512d c1, __m512d c0)
{
    __m512d dev = _mm512_sub_pd(_mm512_sub_pd(x, hi), lo);
    return _mm512_add_pd(_mm512_mul_pd(dy, k), _mm512_add_pd(_mm512_mul_pd(dev, c1), c0));
}

/* The loop both periodic kernels share, for either width: VEC the vector
 * type, L its lanes, MASK its mask, SFX the intrinsics' suffix; VALUE(LOAD,
 * SFX, i, p) the vector of values i.. of OUT with pattern column p, its
 * inputs read with LOAD(SFX, pointer): whole vectors in the body, masked by
 * the loop's `m` at the head and tail (which may end at the buffer's). A
 * masked head up to OUT's first line, then whole lines (streamed with
 * `stream`), then a masked tail.
 *
 * The whole lines go in two streams at once: those of the first `half`
 * values paired with those `half` later, then the rest. `half` is a
 * multiple of the period (so both share the pattern column p) and of a
 * line, an odd number of those units, so that the two streams are not a
 * large power of two apart. On this machine (Zen 4) memory serves two
 * streams faster than one: a streaming copy in two 10-15 % faster on one
 * core, 5-8 % on two; this loop's eval, (N, 8), (N, 32) and (N, 128)
 * float32 and float64, 0.92-1.00 -> 1.03-1.14 of a streaming copy on one
 * thread, 0.94-1.06 -> 0.96-1.15 on two. */
/* The vector kernels by intrinsics suffix (BN_AFFINE_##SFX, BN_GRAD_##SFX),
 * for the loop macros below, each written once for both widths. */
#define BN_AFFINE_ps bn_affine16_avx512
#define BN_AFFINE_pd bn_affine8_avx512
#define BN_GRAD_ps bn_grad16_avx512
#define BN_GRAD_pd bn_grad8_avx512

#define BN_PERIODIC_FULL(SFX, ptr) _mm512_loadu_##SFX(ptr)
#define BN_PERIODIC_MASKED(SFX, ptr) _mm512_maskz_loadu_##SFX(m, ptr)
#define BN_PERIODIC_LOOP(T, VEC, L, MASK, SFX, OUT, VALUE)                               \
    ptrdiff_t i = 0, p = phase, k0 = bn_store_head(OUT, sizeof(T), n, &stream);           \
    if (k0 > 0) {                                                                         \
        MASK m = (MASK)((1u << k0) - 1);                                                  \
        _mm512_mask_storeu_##SFX(OUT, m, VALUE(BN_PERIODIC_MASKED, SFX, 0, p));           \
        i = k0;                                                                           \
        p += k0;                                                                          \
        if (p >= period)                                                                  \
            p -= period;                                                                  \
    }                                                                                     \
    {                                                                                     \
        ptrdiff_t unit = period % (L) == 0 ? period : period * (L);                       \
        ptrdiff_t units = (n - i) / 2 / unit;                                             \
        ptrdiff_t half = (units - (units > 0 && units % 2 == 0)) * unit, end = i + half;  \
        for (; i < end; i += (L)) {                                                       \
            VEC v = VALUE(BN_PERIODIC_FULL, SFX, i, p);                                   \
            VEC w = VALUE(BN_PERIODIC_FULL, SFX, i + half, p);                            \
            BN_STORE_VEC(SFX, (OUT) + i, v);                                              \
            BN_STORE_VEC(SFX, (OUT) + i + half, w);                                       \
            p += (L);                                                                     \
            if (p >= period)                                                              \
                p -= period;                                                              \
        }                                                                                 \
        i += half;                                                                        \
    }                                                                                     \
    for (; i + (L) <= n; i += (L)) {                                                      \
        BN_STORE_VEC(SFX, (OUT) + i, VALUE(BN_PERIODIC_FULL, SFX, i, p));                 \
        p += (L);                                                                         \
        if (p >= period)                                                                  \
            p -= period;                                                                  \
    }                                                                                     \
    if (i < n) {                                                                          \
        MASK m = (MASK)((1u << (n - i)) - 1);                                             \
        _mm512_mask_storeu_##SFX((OUT) + i, m, VALUE(BN_PERIODIC_MASKED, SFX, i, p));     \
    }

/* y = affine(x) (then relu): pattern holds hi, lo, scale and shift. */
#define BN_DEFINE_PERIODIC_AFFINE(T, NAME, VEC, L, MASK, SFX)                             \
__attribute__((target("avx512f"))) static void NAME(                                     \
    const T *x, T *y, ptrdiff_t n, const T *BN_RESTRICT pattern, ptrdiff_t period,        \
    ptrdiff_t phase, int relu, int stream)                                                \
{                                                                                         \
    const ptrdiff_t stretch = period + (L);                                               \
    const T *ph = pattern, *pl = pattern + stretch;                                       \
    const T *ps = pattern + 2 * stretch, *pt = pattern + 3 * stretch;                     \
    BN_PERIODIC_LOOP(T, VEC, L, MASK, SFX, y, BN_PERIODIC_AFFINE_VALUE)                   \
}
#define BN_PERIODIC_AFFINE_VALUE(LOAD, SFX, i, p)                                         \
    BN_AFFINE_##SFX(LOAD(SFX, x + (i)), _mm512_loadu_##SFX(ph + (p)),                     \
                    _mm512_loadu_##SFX(pl + (p)), _mm512_loadu_##SFX(ps + (p)),           \
                    _mm512_loadu_##SFX(pt + (p)), relu)
BN_DEFINE_PERIODIC_AFFINE(float, bn_periodic_affine_f32_avx512, __m512, 16, __mmask16, ps)
BN_DEFINE_PERIODIC_AFFINE(double, bn_periodic_affine_f64_avx512, __m512d, 8, __mmask8, pd)

/* The training input gradient, dx = dy * k + (((x - hi) - lo) * c1 + c0)
 * (bn_rows_grad_input's operations, so its bits): pattern holds hi, lo, k,
 * c1 and c0. dx may be x or dy. */
#define BN_DEFINE_PERIODIC_GRAD(T, NAME, VEC, L, MASK, SFX)                              \
__attribute__((target("avx512f"))) static void NAME(                                     \
    const T *x, const T *dy, T *dx, ptrdiff_t n, const T *BN_RESTRICT pattern,            \
    ptrdiff_t period, ptrdiff_t phase, int stream)                                        \
{                                                                                         \
    const ptrdiff_t stretch = period + (L);                                               \
    const T *ph = pattern, *pl = pattern + stretch, *pk = pattern + 2 * stretch;          \
    const T *p1 = pattern + 3 * stretch, *p0 = pattern + 4 * stretch;                    \
    BN_PERIODIC_LOOP(T, VEC, L, MASK, SFX, dx, BN_PERIODIC_GRAD_VALUE)                    \
}
#define BN_PERIODIC_GRAD_VALUE(LOAD, SFX, i, p)                                           \
    BN_GRAD_##SFX(LOAD(SFX, x + (i)), LOAD(SFX, dy + (i)), _mm512_loadu_##SFX(ph + (p)),  \
                  _mm512_loadu_##SFX(pl + (p)), _mm512_loadu_##SFX(pk + (p)),             \
                  _mm512_loadu_##SFX(p1 + (p)), _mm512_loadu_##SFX(p0 + (p)))
BN_DEFINE_PERIODIC_GRAD(float, bn_periodic_grad_f32_avx512, __m512, 16, __mmask16, ps)
BN_DEFINE_PERIODIC_GRAD(double, bn_periodic_grad_f64_avx512, __m512d, 8, __mmask8, pd)

/* Rows too wide for a periodic pattern in L1 (over 64 vectors: 1024
 * float32 or 512 float64 values), walked one at a time, take four
 * constants per value from L2 for one value of x from memory: float32
 * eval ran at 1.5 times a streaming copy's time with a periodic pattern of
 * 1536-2048 values, and at 2.0-2.7 by column tiles (every row read in
 * 2 KiB pieces) past 2048. Walking up to BN_ROW_GROUP_ROWS rows side by
 * side, column vector by column vector, loads each vector of constants
 * once for all of them, so the constants cost an eighth as much, and each
 * row is still read and written front to back: (N, 1536) to (N, 8192)
 * float32 eval at 0.95-1.25 of a copy's time on one thread. The rows of a
 * group share their line phase (every `phases`-th row of the chunk), so a
 * column vector lies on whole output lines in all of them; each vector of
 * all the rows is loaded before any is stored. Same operations per value
 * as bn_rows_affine and bn_rows_grad_input, so the same bits. */
#define BN_ROW_GROUP_ROWS 8

/* Rows of a chunk until the line phase of a row (its start modulo a line)
 * comes round again: 1 when rows are whole lines long. */
static inline ptrdiff_t bn_line_phases(ptrdiff_t stride, size_t itemsize)
{
    ptrdiff_t bytes = (ptrdiff_t)((size_t)stride * itemsize) % BN_LINE_BYTES, phases = 1;
    while ((bytes * phases) % BN_LINE_BYTES)
        phases++;
    return phases;
}

/* One group: `count` rows `step` values apart from OUT, columns [0, ncols):
 * a masked head up to OUT's first line, whole vectors, a masked tail.
 * CONSTANTS(LOAD, SFX, c) loads the vectors of constants of columns c..;
 * VALUE(LOAD, SFX, at) is the output vector at OUT + at. */
#define BN_ROW_GROUP_PART(SFX, c, CONSTANTS, VALUE, OUT)                                 \
    do {                                                                                  \
        CONSTANTS(BN_PERIODIC_MASKED, SFX, c)                                             \
        for (int g = 0; g < count; g++)                                                   \
            _mm512_mask_storeu_##SFX((OUT) + g * step + (c), m,                           \
                                     VALUE(BN_PERIODIC_MASKED, SFX, g * step + (c)));     \
    } while (0)
#define BN_ROW_GROUP_LOOP(T, VEC, L, MASK, SFX, OUT, CONSTANTS, VALUE)                   \
    ptrdiff_t c = 0, k0 = bn_store_head(OUT, sizeof(T), ncols, &stream);                  \
    if (k0 > 0) {                                                                         \
        MASK m = (MASK)((1u << k0) - 1);                                                  \
        BN_ROW_GROUP_PART(SFX, 0, CONSTANTS, VALUE, OUT);                                 \
        c = k0;                                                                           \
    }                                                                                     \
    for (; c + (L) <= ncols; c += (L)) {                                                  \
        VEC v[BN_ROW_GROUP_ROWS] = {0};                                                   \
        CONSTANTS(BN_PERIODIC_FULL, SFX, c)                                               \
        _Pragma("GCC unroll 8") for (int g = 0; g < BN_ROW_GROUP_ROWS; g++)               \
            if (g < count)                                                                \
                v[g] = VALUE(BN_PERIODIC_FULL, SFX, g * step + c);                        \
        _Pragma("GCC unroll 8") for (int g = 0; g < BN_ROW_GROUP_ROWS; g++)               \
            if (g < count)                                                                \
                BN_STORE_VEC(SFX, (OUT) + g * step + c, v[g]);                            \
    }                                                                                     \
    if (c < ncols) {                                                                      \
        MASK m = (MASK)((1u << (ncols - c)) - 1);                                         \
        BN_ROW_GROUP_PART(SFX, c, CONSTANTS, VALUE, OUT);                                 \
    }

/* CALL for each group of the nrows rows `stride` apart: `count` rows
 * (at most BN_ROW_GROUP_ROWS), every `phases`-th from row `first`, `step`
 * values apart. */
#define BN_EACH_ROW_GROUP(T, CALL)                                                        \
    do {                                                                                  \
        ptrdiff_t phases = bn_line_phases(stride, sizeof(T)), step = phases * stride;     \
        for (ptrdiff_t base = 0; base < nrows; base += phases * BN_ROW_GROUP_ROWS)        \
            for (ptrdiff_t first = base; first < base + phases && first < nrows;          \
                 first++) {                                                               \
                ptrdiff_t rest = (nrows - first + phases - 1) / phases;                   \
                int count = rest < BN_ROW_GROUP_ROWS ? (int)rest : BN_ROW_GROUP_ROWS;     \
                CALL;                                                                     \
            }                                                                             \
    } while (0)

/* y = affine(x) (then relu) over nrows rows of ncols values, `stride`
 * apart; the hi, lo, scale and shift of column j at constants[j],
 * [apart + j], [2 apart + j] and [3 apart + j]. */
#define BN_ROW_GROUP_AFFINE_CONSTANTS(LOAD, SFX, c)                                       \
    VEC_T h = LOAD(SFX, ch + (c)), l = LOAD(SFX, cl + (c));                               \
    VEC_T a = LOAD(SFX, ca + (c)), b = LOAD(SFX, cb + (c));
#define BN_ROW_GROUP_AFFINE_VALUE(LOAD, SFX, at)                                          \
    BN_AFFINE_##SFX(LOAD(SFX, x + (at)), h, l, a, b, relu)
#define BN_DEFINE_ROW_GROUPS_AFFINE(T, NAME, VEC, L, MASK, SFX)                           \
__attribute__((target("avx512f"))) static void NAME##_group(                             \
    const T *x, T *y, int count, ptrdiff_t step, ptrdiff_t ncols, const T *ch,            \
    const T *cl, const T *ca, const T *cb, int relu, int stream)                          \
{                                                                                         \
    typedef VEC VEC_T;                                                                    \
    BN_ROW_GROUP_LOOP(T, VEC, L, MASK, SFX, y, BN_ROW_GROUP_AFFINE_CONSTANTS,             \
                      BN_ROW_GROUP_AFFINE_VALUE)                                          \
}                                                                                         \
__attribute__((target("avx512f"))) static void NAME(                                     \
    const T *x, T *y, ptrdiff_t nrows, ptrdiff_t stride, ptrdiff_t ncols,                 \
    const T *constants, ptrdiff_t apart, int relu, int stream)                            \
{                                                                                         \
    BN_EACH_ROW_GROUP(T, NAME##_group(x + first * stride, y + first * stride, count,      \
                                      step, ncols, constants, constants + apart,          \
                                      constants + 2 * apart, constants + 3 * apart,       \
                                      relu, stream));                                     \
}
BN_DEFINE_ROW_GROUPS_AFFINE(float, bn_row_groups_affine_f32_avx512, __m512, 16, __mmask16, ps)
BN_DEFINE_ROW_GROUPS_AFFINE(double, bn_row_groups_affine_f64_avx512, __m512d, 8, __mmask8, pd)

/* The training input gradient (bn_rows_grad_input's operations) over the
 * rows: hi, lo, k, c1 and c0 of column j at constants[t apart + j]. dx may
 * be x or dy. */
#define BN_ROW_GROUP_GRAD_CONSTANTS(LOAD, SFX, c)                                         \
    VEC_T h = LOAD(SFX, ch + (c)), l = LOAD(SFX, cl + (c)), k = LOAD(SFX, ck + (c));      \
    VEC_T k1 = LOAD(SFX, c1 + (c)), k0 = LOAD(SFX, c0 + (c));
#define BN_ROW_GROUP_GRAD_VALUE(LOAD, SFX, at)                                            \
    BN_GRAD_##SFX(LOAD(SFX, x + (at)), LOAD(SFX, dy + (at)), h, l, k, k1, k0)
#define BN_DEFINE_ROW_GROUPS_GRAD(T, NAME, VEC, L, MASK, SFX)                             \
__attribute__((target("avx512f"))) static void NAME##_group(                             \
    const T *x, const T *dy, T *dx, int count, ptrdiff_t step, ptrdiff_t ncols,           \
    const T *ch, const T *cl, const T *ck, const T *c1, const T *c0, int stream)          \
{                                                                                         \
    typedef VEC VEC_T;                                                                    \
    BN_ROW_GROUP_LOOP(T, VEC, L, MASK, SFX, dx, BN_ROW_GROUP_GRAD_CONSTANTS,              \
                      BN_ROW_GROUP_GRAD_VALUE)                                            \
}                                                                                         \
__attribute__((target("avx512f"))) static void NAME(                                     \
    const T *x, const T *dy, T *dx, ptrdiff_t nrows, ptrdiff_t stride, ptrdiff_t ncols,   \
    const T *constants, ptrdiff_t apart, int stream)                                      \
{                                                                                         \
    BN_EACH_ROW_GROUP(T, NAME##_group(x + first * stride, dy + first * stride,            \
                                      dx + first * stride, count, step, ncols, constants, \
                                      constants + apart, constants + 2 * apart,           \
                                      constants + 3 * apart, constants + 4 * apart,       \
                                      stream));                                           \
}
BN_DEFINE_ROW_GROUPS_GRAD(float, bn_row_groups_grad_f32_avx512, __m512, 16, __mmask16, ps)
BN_DEFINE_ROW_GROUPS_GRAD(double, bn_row_groups_grad_f64_avx512, __m512d, 8, __mmask8, pd)
#undef BN_ROW_GROUP_PART
#undef BN_ROW_GROUP_LOOP
#undef BN_EACH_ROW_GROUP
#undef BN_ROW_GROUP_AFFINE_CONSTANTS
#undef BN_ROW_GROUP_AFFINE_VALUE
#undef BN_DEFINE_ROW_GROUPS_AFFINE
#undef BN_ROW_GROUP_GRAD_CONSTANTS
#undef BN_ROW_GROUP_GRAD_VALUE
#undef BN_DEFINE_ROW_GROUPS_GRAD

/* The values under mask m from `at` of both runs (the twin kernel's
 * head and tail, below). */
#define BN_TWIN_PART(SFX, at)                                                             \
    do {                                                                                  \
        _mm512_mask_storeu_##SFX(                                                         \
            y + (at), m,                                                                  \
            BN_AFFINE_##SFX(_mm512_maskz_loadu_##SFX(m, x + (at)), h, l, a, b, relu));    \
        _mm512_mask_storeu_##SFX(                                                         \
            y + apart + (at), m,                                                          \
            BN_AFFINE_##SFX(_mm512_maskz_loadu_##SFX(m, x + apart + (at)), h2, l2, a2,    \
                            b2, relu));                                                   \
    } while (0)
/* Vectors v and w into y + at and y + apart + at. */
#define BN_TWIN_STORE(SFX, at, v, w)                                                      \
    do {                                                                                  \
        BN_STORE_VEC(SFX, y + (at), v);                                                   \
        BN_STORE_VEC(SFX, y + apart + (at), w);                                           \
    } while (0)
/* Two runs' affines at once, x[0, n) into y and x[apart, apart + n) into
 * y + apart, for the two streams' sake (as the periodic loops): masked
 * heads up to y's first line, whole lines of both in step, masked tails.
 * Each run has its constants, {hi, lo, scale, shift} in p (the first) and
 * q (the second): the same channel's or two channels'. The caller keeps
 * apart * sizeof(T) a multiple of a line, so both runs' lines start at the
 * same index. bn_affine's operations, so its bits. */
#define BN_DEFINE_AFFINE_TWIN(T, NAME, VEC, L, MASK, SFX)                                 \
__attribute__((target("avx512f"))) static void NAME(                                      \
    const T *x, T *y, ptrdiff_t apart, ptrdiff_t n, const T *p, const T *q, int relu,     \
    int stream)                                                                           \
{                                                                                         \
    const VEC h = _mm512_set1_##SFX(p[0]), l = _mm512_set1_##SFX(p[1]);                   \
    const VEC a = _mm512_set1_##SFX(p[2]), b = _mm512_set1_##SFX(p[3]);                   \
    const VEC h2 = _mm512_set1_##SFX(q[0]), l2 = _mm512_set1_##SFX(q[1]);                 \
    const VEC a2 = _mm512_set1_##SFX(q[2]), b2 = _mm512_set1_##SFX(q[3]);                 \
    ptrdiff_t i = 0, k0 = bn_store_head(y, sizeof(T), n, &stream);                        \
    MASK m;                                                                               \
    if (k0 > 0) {                                                                         \
        m = (MASK)((1u << k0) - 1);                                                       \
        BN_TWIN_PART(SFX, 0);                                                             \
        i = k0;                                                                           \
    }                                                                                     \
    for (; i + 4 * (L) <= n; i += 4 * (L)) {  /* BN_GROUP_LINES of each */               \
        VEC v0 = _mm512_loadu_##SFX(x + i), v1 = _mm512_loadu_##SFX(x + i + (L));        \
        VEC v2 = _mm512_loadu_##SFX(x + i + 2 * (L));                                     \
        VEC v3 = _mm512_loadu_##SFX(x + i + 3 * (L));                                     \
        VEC w0 = _mm512_loadu_##SFX(x + apart + i);                                       \
        VEC w1 = _mm512_loadu_##SFX(x + apart + i + (L));                                 \
        VEC w2 = _mm512_loadu_##SFX(x + apart + i + 2 * (L));                             \
        VEC w3 = _mm512_loadu_##SFX(x + apart + i + 3 * (L));                             \
        BN_TWIN_STORE(SFX, i, BN_AFFINE_##SFX(v0, h, l, a, b, relu),                      \
                      BN_AFFINE_##SFX(w0, h2, l2, a2, b2, relu));                         \
        BN_TWIN_STORE(SFX, i + (L), BN_AFFINE_##SFX(v1, h, l, a, b, relu),                \
                      BN_AFFINE_##SFX(w1, h2, l2, a2, b2, relu));                         \
        BN_TWIN_STORE(SFX, i + 2 * (L), BN_AFFINE_##SFX(v2, h, l, a, b, relu),            \
                      BN_AFFINE_##SFX(w2, h2, l2, a2, b2, relu));                         \
        BN_TWIN_STORE(SFX, i + 3 * (L), BN_AFFINE_##SFX(v3, h, l, a, b, relu),            \
                      BN_AFFINE_##SFX(w3, h2, l2, a2, b2, relu));                         \
    }                                                                                     \
    for (; i + (L) <= n; i += (L)) {                                                      \
        VEC v = _mm512_loadu_##SFX(x + i), w = _mm512_loadu_##SFX(x + apart + i);         \
        BN_TWIN_STORE(SFX, i, BN_AFFINE_##SFX(v, h, l, a, b, relu),                       \
                      BN_AFFINE_##SFX(w, h2, l2, a2, b2, relu));                          \
    }                                                                                     \
    if (i < n) {                                                                          \
        m = (MASK)((1u << (n - i)) - 1);                                                  \
        BN_TWIN_PART(SFX, i);                                                             \
    }                                                                                     \
}
BN_DEFINE_AFFINE_TWIN(float, bn_affine_twin_f32_avx512, __m512, 16, __mmask16, ps)
BN_DEFINE_AFFINE_TWIN(double, bn_affine_twin_f64_avx512, __m512d, 8, __mmask8, pd)
#undef BN_DEFINE_AFFINE_TWIN
#undef BN_TWIN_PART
#undef BN_TWIN_STORE

/* nruns consecutive runs of len values, one after the other in one call,
 * with normal stores: runs in cache. Run r takes the NC constants at p +
 * NC r (in now0..now4, as the row-run loops'); VALUE(LOAD, SFX, i) is the
 * vector of outputs i.., its inputs read with LOAD(SFX, pointer) (masked
 * by `m` at each run's head, up to OUT's next line as bn_store_head's, and
 * tail, so len may be any length). A call per run cost about as much as a
 * short run's loads and stores: eval of (8, 32, 14, 14) float32 took 3.0
 * us in 160 calls (runs alone or paired), 2.2 us in 8 (a row each). The
 * per-value operations are the one-run kernels', so their bits.
 * Instantiated below, after the row-run loops' VALUE macros. */
#define BN_EACH_RUN_LOOP(T, VEC, L, MASK, SFX, NC, OUT, VALUE)                            \
    for (ptrdiff_t r = 0; r < nruns; r++, p += (NC)) {                                    \
        const VEC now0 = _mm512_set1_##SFX(p[0]), now1 = _mm512_set1_##SFX(p[1]);         \
        const VEC now2 = _mm512_set1_##SFX(p[2]), now3 = _mm512_set1_##SFX(p[3]);         \
        const VEC now4 = (NC) > 4 ? _mm512_set1_##SFX(p[4]) : _mm512_setzero_##SFX();     \
        ptrdiff_t i = r * len, end = i + len;                                             \
        ptrdiff_t head = bn_line_head((OUT) + i, sizeof(T), len);                         \
        MASK m;                                                                           \
        if (head > 0) {                                                                   \
            m = (MASK)((1u << head) - 1);                                                 \
            _mm512_mask_storeu_##SFX((OUT) + i, m, VALUE(BN_PERIODIC_MASKED, SFX, i));    \
            i += head;                                                                    \
        }                                                                                 \
        for (; i + 4 * (L) <= end; i += 4 * (L)) {                                        \
            VEC v0 = VALUE(BN_PERIODIC_FULL, SFX, i);                                     \
            VEC v1 = VALUE(BN_PERIODIC_FULL, SFX, i + (L));                               \
            VEC v2 = VALUE(BN_PERIODIC_FULL, SFX, i + 2 * (L));                           \
            VEC v3 = VALUE(BN_PERIODIC_FULL, SFX, i + 3 * (L));                           \
            _mm512_storeu_##SFX((OUT) + i, v0);                                           \
            _mm512_storeu_##SFX((OUT) + i + (L), v1);                                     \
            _mm512_storeu_##SFX((OUT) + i + 2 * (L), v2);                                 \
            _mm512_storeu_##SFX((OUT) + i + 3 * (L), v3);                                 \
        }                                                                                 \
        for (; i + (L) <= end; i += (L))                                                  \
            _mm512_storeu_##SFX((OUT) + i, VALUE(BN_PERIODIC_FULL, SFX, i));              \
        if (i < end) {                                                                    \
            m = (MASK)((1u << (end - i)) - 1);                                            \
            _mm512_mask_storeu_##SFX((OUT) + i, m, VALUE(BN_PERIODIC_MASKED, SFX, i));    \
        }                                                                                 \
        (void)now4;                                                                       \
    }

/* The normalisation: p holds (hi, lo, scale, shift) per run. */
#define BN_DEFINE_AFFINE_EACH_RUN(T, NAME, VEC, L, MASK, SFX)                             \
__attribute__((target("avx512f"))) static void NAME(                                      \
    const T *x, T *y, ptrdiff_t nruns, ptrdiff_t len, const T *p, int relu)               \
{                                                                                         \
    BN_EACH_RUN_LOOP(T, VEC, L, MASK, SFX, 4, y, BN_RUNS_AFFINE_VALUE)                    \
}
/* The training input gradient: p holds (hi, lo, k, c1, c0) per run. */
#define BN_DEFINE_GRAD_EACH_RUN(T, NAME, VEC, L, MASK, SFX)                               \
__attribute__((target("avx512f"))) static void NAME(                                      \
    const T *x, const T *dy, T *dx, ptrdiff_t nruns, ptrdiff_t len, const T *p)           \
{                                                                                         \
    BN_EACH_RUN_LOOP(T, VEC, L, MASK, SFX, 5, dx, BN_RUNS_GRAD_VALUE)                     \
}

/* One row's runs of consecutive channels, n values in all, each channel's
 * run `inner` (at least a vector) long, written as one stream of whole
 * lines (with streaming stores where asked), though the runs themselves
 * neither start nor end on lines: written one at a time, such runs could
 * only take normal stores (planar_normalize says why), which cap a pass
 * at about 0.75 of a streaming copy. p holds NC constants per channel
 * from the first. A vector holds values of at most two channels and gives
 * each value its own channel's constants (blended where a run ends inside
 * it); VALUE(LOAD, SFX, i) is the vector of outputs i.. from constants
 * now0..now4 (the first NC of them), its inputs read with LOAD(SFX,
 * pointer), as the periodic loops' (masked by `m`). The per-value
 * operations are the one-run kernel's, so its bits.
 *
 * Every vector blends the constants of its channel and the next, with no
 * branch on where a run ends: run ends fall every few vectors in a pattern
 * too long to predict. Eval of (512, 512, 7, 7), (512, 256, 8, 8) and
 * (256, 256, 10, 10) float32 on one thread ran at 0.64-0.84 of a streaming
 * copy with those branches, at 0.84-1.00 without (interleaved A/B). */
/* Constant j of the table rows `from` and `to` (NC constants a channel),
 * each lane taking `to`'s where mask NEXT is set: the row-run loops and the
 * seams give the values of two channels in one vector their own constants. */
#define BN_TWO_CONSTANTS(SFX, NEXT, from, to, j)                                          \
    _mm512_mask_blend_##SFX(NEXT, _mm512_set1_##SFX((from)[j]), _mm512_set1_##SFX((to)[j]))
#define BN_RUNS_CONSTANT(SFX, NEXT, j) BN_TWO_CONSTANTS(SFX, NEXT, q, r, j)
#define BN_RUNS_BLEND(SFX, NC, NEXT)                                                      \
    do {                                                                                  \
        now0 = BN_RUNS_CONSTANT(SFX, NEXT, 0), now1 = BN_RUNS_CONSTANT(SFX, NEXT, 1);     \
        now2 = BN_RUNS_CONSTANT(SFX, NEXT, 2), now3 = BN_RUNS_CONSTANT(SFX, NEXT, 3);     \
        if ((NC) > 4)                                                                     \
            now4 = BN_RUNS_CONSTANT(SFX, NEXT, 4);                                        \
    } while (0)
/* Sets now0.. for the len values from i on (mask m) and moves q, left past
 * them. Values [left, len) are the next channel's (none when left >= len);
 * the last channel has no next, and r then stays on it. */
#define BN_RUNS_STEP(T, MASK, SFX, NC, len, m)                                            \
    do {                                                                                  \
        const T *r = q < last ? q + (NC) : q;                                             \
        MASK next = (MASK)(left < (len) ? (m) & ~((1u << left) - 1) : 0);                 \
        ptrdiff_t step;                                                                   \
        BN_RUNS_BLEND(SFX, NC, next);                                                     \
        left -= (len);                        /* left > -len >= -inner */                 \
        step = left <= 0;                                                                 \
        q += (NC) * step;                                                                 \
        left += step ? inner : 0;                                                         \
    } while (0)
/* With TWIN (a constant), values [apart, apart + n) go in step with [0, n),
 * each vector of the second stream with the constants of the first's: the
 * caller makes apart a whole number of rows (so that the second stream's
 * values are of the same channels, in the same places) and of lines (so
 * that both streams share the head and the tail). Two streams far apart
 * are served faster than one (as the periodic loops'). */
#define BN_RUNS_LOOP(T, VEC, L, MASK, SFX, NC, OUT, VALUE, TWIN)                          \
    /* Named vectors, not arrays: GCC kept arrays of them on the stack. */                \
    VEC now0, now1, now2, now3, now4 = _mm512_setzero_##SFX();                            \
    const T *q = p;                           /* the constants of value i's channel */   \
    const T *last = p + (NC) * ((n - 1) / inner);                                         \
    ptrdiff_t left = inner;                   /* values of q's channel from i on */       \
    ptrdiff_t i = bn_store_head(OUT, sizeof(T), n, &stream);  /* the head, to a line */   \
    MASK m;                                                                               \
    if (i > 0) {                                                                          \
        m = (MASK)((1u << i) - 1);                                                        \
        BN_RUNS_STEP(T, MASK, SFX, NC, i, m);                                             \
        _mm512_mask_storeu_##SFX(OUT, m, VALUE(BN_PERIODIC_MASKED, SFX, 0));              \
        if (TWIN)                                                                         \
            _mm512_mask_storeu_##SFX((OUT) + apart, m,                                    \
                                     VALUE(BN_PERIODIC_MASKED, SFX, apart));              \
    }                                                                                     \
    /* BN_GROUP_LINES vectors computed, and so loaded, before any is stored. */         \
    for (; i + 4 * (L) <= n; i += 4 * (L)) {                                              \
        VEC v0, v1, v2, v3, w0, w1, w2, w3;                                               \
        BN_RUNS_STEP(T, MASK, SFX, NC, (L), (MASK)~0u);                                   \
        v0 = VALUE(BN_PERIODIC_FULL, SFX, i);                                             \
        w0 = TWIN ? VALUE(BN_PERIODIC_FULL, SFX, apart + i) : v0;                         \
        BN_RUNS_STEP(T, MASK, SFX, NC, (L), (MASK)~0u);                                   \
        v1 = VALUE(BN_PERIODIC_FULL, SFX, i + (L));                                       \
        w1 = TWIN ? VALUE(BN_PERIODIC_FULL, SFX, apart + i + (L)) : v1;                   \
        BN_RUNS_STEP(T, MASK, SFX, NC, (L), (MASK)~0u);                                   \
        v2 = VALUE(BN_PERIODIC_FULL, SFX, i + 2 * (L));                                   \
        w2 = TWIN ? VALUE(BN_PERIODIC_FULL, SFX, apart + i + 2 * (L)) : v2;               \
        BN_RUNS_STEP(T, MASK, SFX, NC, (L), (MASK)~0u);                                   \
        v3 = VALUE(BN_PERIODIC_FULL, SFX, i + 3 * (L));                                   \
        w3 = TWIN ? VALUE(BN_PERIODIC_FULL, SFX, apart + i + 3 * (L)) : v3;               \
        BN_RUNS_STORE(SFX, OUT, i, v0, w0, TWIN);                                         \
        BN_RUNS_STORE(SFX, OUT, i + (L), v1, w1, TWIN);                                   \
        BN_RUNS_STORE(SFX, OUT, i + 2 * (L), v2, w2, TWIN);                               \
        BN_RUNS_STORE(SFX, OUT, i + 3 * (L), v3, w3, TWIN);                               \
    }                                                                                     \
    for (; i + (L) <= n; i += (L)) {                                                      \
        BN_RUNS_STEP(T, MASK, SFX, NC, (L), (MASK)~0u);                                   \
        BN_RUNS_STORE(SFX, OUT, i, VALUE(BN_PERIODIC_FULL, SFX, i),                       \
                      TWIN ? VALUE(BN_PERIODIC_FULL, SFX, apart + i)                      \
                           : _mm512_setzero_##SFX(), TWIN);                               \
    }                                                                                     \
    if (i < n) {                                                                          \
        m = (MASK)((1u << (n - i)) - 1);                                                  \
        BN_RUNS_STEP(T, MASK, SFX, NC, n - i, m);                                         \
        _mm512_mask_storeu_##SFX((OUT) + i, m, VALUE(BN_PERIODIC_MASKED, SFX, i));        \
        if (TWIN)                                                                         \
            _mm512_mask_storeu_##SFX((OUT) + apart + i, m,                                \
                                     VALUE(BN_PERIODIC_MASKED, SFX, apart + i));          \
    }                                                                                     \
    (void)now4;
/* Vector v at OUT + i, and with TWIN w at OUT + apart + i. */
#define BN_RUNS_STORE(SFX, OUT, i, v, w, TWIN)                                            \
    do {                                                                                  \
        BN_STORE_VEC(SFX, (OUT) + (i), v);                                                \
        if (TWIN)                                                                         \
            BN_STORE_VEC(SFX, (OUT) + apart + (i), w);                                    \
    } while (0)
/* The kernel's body: one stream, or two `apart` values apart (apart > 0). */
#define BN_RUNS_BODY(T, VEC, L, MASK, SFX, NC, OUT, VALUE)                                \
    if (apart > 0) {                                                                      \
        BN_RUNS_LOOP(T, VEC, L, MASK, SFX, NC, OUT, VALUE, 1)                             \
    } else {                                                                              \
        BN_RUNS_LOOP(T, VEC, L, MASK, SFX, NC, OUT, VALUE, 0)                             \
    }

/* The normalisation: p holds (hi, lo, scale, shift) per channel. */
#define BN_DEFINE_AFFINE_RUNS(T, NAME, VEC, L, MASK, SFX)                                 \
__attribute__((target("avx512f"))) static void NAME(                                      \
    const T *x, T *y, ptrdiff_t n, ptrdiff_t inner, const T *p, int relu, int stream,     \
    ptrdiff_t apart)                                                                      \
{                                                                                         \
    BN_RUNS_BODY(T, VEC, L, MASK, SFX, 4, y, BN_RUNS_AFFINE_VALUE)                        \
}
#define BN_RUNS_AFFINE_VALUE(LOAD, SFX, i)                                                \
    BN_AFFINE_##SFX(LOAD(SFX, x + (i)), now0, now1, now2, now3, relu)
BN_DEFINE_AFFINE_RUNS(float, bn_affine_runs_f32_avx512, __m512, 16, __mmask16, ps)
BN_DEFINE_AFFINE_RUNS(double, bn_affine_runs_f64_avx512, __m512d, 8, __mmask8, pd)

/* The training input gradient (bn_grad_input's operations): p holds (hi,
 * lo, k, c1, c0) per channel. dx may be x or dy. One stream: x, dy and dx
 * are three already; a second, the rows of a chunk paired as the
 * normalisation pairs them, measured 1.00-1.05 of the time on one thread
 * and 0.93-1.02 on two (float32 backward of 4 x 4 to 17 x 17 maps). */
#define BN_DEFINE_GRAD_RUNS(T, NAME, VEC, L, MASK, SFX)                                   \
__attribute__((target("avx512f"))) static void NAME(                                      \
    const T *x, const T *dy, T *dx, ptrdiff_t n, ptrdiff_t inner, const T *p, int stream) \
{                                                                                         \
    const ptrdiff_t apart = 0;                                                            \
    BN_RUNS_LOOP(T, VEC, L, MASK, SFX, 5, dx, BN_RUNS_GRAD_VALUE, 0)                      \
}
#define BN_RUNS_GRAD_VALUE(LOAD, SFX, i)                                                  \
    BN_GRAD_##SFX(LOAD(SFX, x + (i)), LOAD(SFX, dy + (i)), now0, now1, now2, now3, now4)
BN_DEFINE_GRAD_RUNS(float, bn_grad_runs_f32_avx512, __m512, 16, __mmask16, ps)
BN_DEFINE_GRAD_RUNS(double, bn_grad_runs_f64_avx512, __m512d, 8, __mmask8, pd)
BN_DEFINE_AFFINE_EACH_RUN(float, bn_affine_each_run_f32_avx512, __m512, 16, __mmask16, ps)
BN_DEFINE_AFFINE_EACH_RUN(double, bn_affine_each_run_f64_avx512, __m512d, 8, __mmask8, pd)
BN_DEFINE_GRAD_EACH_RUN(float, bn_grad_each_run_f32_avx512, __m512, 16, __mmask16, ps)
BN_DEFINE_GRAD_EACH_RUN(double, bn_grad_each_run_f64_avx512, __m512d, 8, __mmask8, pd)
#undef BN_DEFINE_AFFINE_EACH_RUN
#undef BN_DEFINE_GRAD_EACH_RUN
#undef BN_EACH_RUN_LOOP
#undef BN_DEFINE_GRAD_RUNS

/* The line two runs share (BN_LEAVE_HEAD, BN_LEAVE_TAIL), written whole
 * with one streaming store: the aligned line at `out` holds the last
 * `split` values of a run (constants `before`) and the first values of the
 * run after it (constants `after`), NC constants each, in the order of the
 * row-run loops' tables. Each value takes its own run's constants and the
 * one-run kernel's operations, so its bits. */
#define BN_SEAM_CONSTANT(SFX, MASK, j)                                                    \
    BN_TWO_CONSTANTS(SFX, (MASK) ~((1u << split) - 1), before, after, j)
#define BN_DEFINE_AFFINE_SEAM(T, NAME, MASK, SFX)                                         \
__attribute__((target("avx512f"))) static void NAME(                                      \
    const T *x, T *y, int split, const T *before, const T *after, int relu)               \
{                                                                                         \
    _mm512_stream_##SFX(y, BN_AFFINE_##SFX(_mm512_loadu_##SFX(x),                         \
                                           BN_SEAM_CONSTANT(SFX, MASK, 0),                \
                                           BN_SEAM_CONSTANT(SFX, MASK, 1),                \
                                           BN_SEAM_CONSTANT(SFX, MASK, 2),                \
                                           BN_SEAM_CONSTANT(SFX, MASK, 3), relu));        \
}
BN_DEFINE_AFFINE_SEAM(float, bn_affine_seam_f32_avx512, __mmask16, ps)
BN_DEFINE_AFFINE_SEAM(double, bn_affine_seam_f64_avx512, __mmask8, pd)
#undef BN_DEFINE_AFFINE_SEAM

/* The training input gradient's: x, dy and dx's line, (hi, lo, k, c1, c0). */
#define BN_DEFINE_GRAD_SEAM(T, NAME, MASK, SFX)                                           \
__attribute__((target("avx512f"))) static void NAME(                                      \
    const T *x, const T *dy, T *dx, int split, const T *before, const T *after)           \
{                                                                                         \
    _mm512_stream_##SFX(dx, BN_GRAD_##SFX(_mm512_loadu_##SFX(x), _mm512_loadu_##SFX(dy),  \
                                          BN_SEAM_CONSTANT(SFX, MASK, 0),                 \
                                          BN_SEAM_CONSTANT(SFX, MASK, 1),                 \
                                          BN_SEAM_CONSTANT(SFX, MASK, 2),                 \
                                          BN_SEAM_CONSTANT(SFX, MASK, 3),                 \
                                          BN_SEAM_CONSTANT(SFX, MASK, 4)));               \
}
BN_DEFINE_GRAD_SEAM(float, bn_grad_seam_f32_avx512, __mmask16, ps)
BN_DEFINE_GRAD_SEAM(double, bn_grad_seam_f64_avx512, __mmask8, pd)
#undef BN_DEFINE_GRAD_SEAM
#undef BN_SEAM_CONSTANT
#undef BN_RUNS_GRAD_VALUE
#undef BN_RUNS_AFFINE_VALUE
#undef BN_RUNS_LOOP
#undef BN_RUNS_STORE
#undef BN_RUNS_BODY
#undef BN_RUNS_BLEND
#undef BN_RUNS_CONSTANT
#undef BN_TWO_CONSTANTS
#undef BN_RUNS_STEP
#undef BN_DEFINE_AFFINE_RUNS
#undef BN_DEFINE_PERIODIC_AFFINE
#undef BN_DEFINE_PERIODIC_GRAD
#undef BN_PERIODIC_AFFINE_VALUE
#undef BN_PERIODIC_GRAD_VALUE
#undef BN_AFFINE_ps
#undef BN_AFFINE_pd
#undef BN_GRAD_ps
#undef BN_GRAD_pd
#undef BN_PERIODIC_LOOP
#undef BN_PERIODIC_FULL
#undef BN_PERIODIC_MASKED
#endif

/* Values per vector of the periodic loops (their period holds at least one),
 * or 0 where it is not built or the CPU lacks AVX-512. */
static inline int bn_periodic_lanes(int itemsize)
{
#if BN_X86_DISPATCH
    if (bn_cpu_avx512())
        return 64 / itemsize;
#endif
    (void)itemsize;
    return 0;
}

#if BN_X86_DISPATCH
#define bn_periodic_affine_f32 bn_periodic_affine_f32_avx512
#define bn_periodic_affine_f64 bn_periodic_affine_f64_avx512
#define bn_periodic_grad_f32 bn_periodic_grad_f32_avx512
#define bn_periodic_grad_f64 bn_periodic_grad_f64_avx512
#define bn_row_groups_affine_f32 bn_row_groups_affine_f32_avx512
#define bn_row_groups_affine_f64 bn_row_groups_affine_f64_avx512
#define bn_row_groups_grad_f32 bn_row_groups_grad_f32_avx512
#define bn_row_groups_grad_f64 bn_row_groups_grad_f64_avx512
#define bn_affine_twin_f32 bn_affine_twin_f32_avx512
#define bn_affine_twin_f64 bn_affine_twin_f64_avx512
#define bn_affine_runs_f32 bn_affine_runs_f32_avx512
#define bn_affine_runs_f64 bn_affine_runs_f64_avx512
#define bn_affine_each_run_f32 bn_affine_each_run_f32_avx512
#define bn_affine_each_run_f64 bn_affine_each_run_f64_avx512
#define bn_grad_each_run_f32 bn_grad_each_run_f32_avx512
#define bn_grad_each_run_f64 bn_grad_each_run_f64_avx512
#define bn_grad_runs_f32 bn_grad_runs_f32_avx512
#define bn_grad_runs_f64 bn_grad_runs_f64_avx512
#define bn_affine_seam_f32 bn_affine_seam_f32_avx512
#define bn_affine_seam_f64 bn_affine_seam_f64_avx512
#define bn_grad_seam_f32 bn_grad_seam_f32_avx512
#define bn_grad_seam_f64 bn_grad_seam_f64_avx512
#else   /* never called there: bn_periodic_lanes is 0 */
#define bn_affine_seam_f32(...) ((void)0)
#define bn_affine_seam_f64(...) ((void)0)
#define bn_grad_seam_f32(...) ((void)0)
#define bn_grad_seam_f64(...) ((void)0)
#define bn_affine_twin_f32(...) ((void)0)
#define bn_affine_twin_f64(...) ((void)0)
#define bn_affine_runs_f32(...) ((void)0)
#define bn_affine_runs_f64(...) ((void)0)
#define bn_affine_each_run_f32(...) ((void)0)
#define bn_affine_each_run_f64(...) ((void)0)
#define bn_grad_each_run_f32(...) ((void)0)
#define bn_grad_each_run_f64(...) ((void)0)
#define bn_grad_runs_f32(...) ((void)0)
#define bn_grad_runs_f64(...) ((void)0)
#define bn_periodic_affine_f32(...) ((void)0)
#define bn_periodic_affine_f64(...) ((void)0)
#define bn_periodic_grad_f32(...) ((void)0)
#define bn_periodic_grad_f64(...) ((void)0)
#define bn_row_groups_affine_f32(...) ((void)0)
#define bn_row_groups_affine_f64(...) ((void)0)
#define bn_row_groups_grad_f32(...) ((void)0)
#define bn_row_groups_grad_f64(...) ((void)0)
#endif

/* The channel-tiled training backward's run loop, either half: the gradient
 * sums of a run of n values (xs, dys) (as bn_lane_grad_sums_f32, into s_dy
 * and s_dy_dev), asking on the way for the n values at ahead_x and ahead_dy
 * to be brought into L2 (prefetcht1); or the input gradient of a run
 * (xn, dyn) into dxn (as bn_grad_input_f32). xs (with dys), ahead_x (with
 * ahead_dy) or xn (with dyn and dxn) may be NULL for none (given both, of
 * runs that do not overlap, one after the other); dxn may be xn or dyn;
 * `leave` as the forward's. Each half does exactly the operations of the
 * separate loops, in the same order for each lane: the results are bitwise
 * theirs. (The pipelined walk that ran both halves in one loop, on two
 * channels, is gone: the tiled one, a half at a time, was as fast or
 * faster.) */
#if BN_X86_DISPATCH
__attribute__((target("avx512f"))) static void bn_grad_sums_and_input_f32_avx512(
    const float *xs, const float *dys, ptrdiff_t n, double mean, double *BN_RESTRICT s_dy,
    double *BN_RESTRICT s_dy_dev, const float *ahead_x, const float *ahead_dy,
    const float *xn, const float *dyn, float *dxn, float mean_hi, float mean_lo, float k,
    float c1, float c0, int stream, int leave)
{
    __m512d a1 = _mm512_setzero_pd(), b1 = a1, a2 = a1, b2 = a1;
    const __m512d m = _mm512_set1_pd(mean);
    const __m512 h = _mm512_set1_ps(mean_hi), l = _mm512_set1_ps(mean_lo);
    const __m512 kv = _mm512_set1_ps(k), c1v = _mm512_set1_ps(c1), c0v = _mm512_set1_ps(c0);
    /* Sums: values [0, ns) sixteen at a time, then a tail in registers. Input
     * gradient: a masked head [0, j0) up to a 64-byte boundary of dxn
     * (streaming stores take whole aligned lines), whole vectors, a masked
     * tail. */
    ptrdiff_t ns = xs == NULL ? 0 : n - n % 16;
    ptrdiff_t j0 = 0, j, i = 0;
    if (xn != NULL && stream)
        j0 = bn_line_head(dxn, sizeof(float), n);
    if (ahead_x != NULL && n > 0) {
        /* The loop asks for the line of each vector's last value: with
         * these, every line of both runs. */
        _mm_prefetch((const char *)ahead_x, _MM_HINT_T1);
        _mm_prefetch((const char *)(ahead_x + n - 1), _MM_HINT_T1);
        _mm_prefetch((const char *)ahead_dy, _MM_HINT_T1);
        _mm_prefetch((const char *)(ahead_dy + n - 1), _MM_HINT_T1);
    }
    if (xs != NULL) {
        bn_lanes_load_avx512(s_dy, s_dy_dev, &a1, &b1, &a2, &b2);
    }
    if (xn != NULL && j0 > 0 && !(leave & BN_LEAVE_HEAD)) {
        __mmask16 head = (__mmask16)((1u << j0) - 1);
        bn_store_part_avx512(dxn, j0, bn_grad16_avx512(_mm512_maskz_loadu_ps(head, xn),
                                                       _mm512_maskz_loadu_ps(head, dyn),
                                                       h, l, kv, c1v, c0v), stream);
    }
    j = xn == NULL ? n : j0;
#define BN_SUMS16                                                                     \
    do {                                                                              \
        __m512d g = _mm512_cvtps_pd(_mm256_loadu_ps(dys + i));                         \
        __m512d e = _mm512_cvtps_pd(_mm256_loadu_ps(dys + i + 8));                     \
        a1 = _mm512_add_pd(a1, g);                                                    \
        a2 = _mm512_fmadd_pd(g, _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(xs + i)), m), \
                             a2);                                                     \
        b1 = _mm512_add_pd(b1, e);                                                    \
        b2 = _mm512_fmadd_pd(e, _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(xs + i + 8)), \
                                              m), b2);                                \
        if (ahead_x != NULL) {                                                        \
            _mm_prefetch((const char *)(ahead_x + i + 15), _MM_HINT_T1);              \
            _mm_prefetch((const char *)(ahead_dy + i + 15), _MM_HINT_T1);             \
        }                                                                             \
        i += 16;                                                                      \
    } while (0)
#define BN_GRAD16                                                                     \
    do {                                                                              \
        __m512 v = bn_grad16_avx512(_mm512_loadu_ps(xn + j), _mm512_loadu_ps(dyn + j),  \
                                    h, l, kv, c1v, c0v);                              \
        BN_STORE_VEC(ps, dxn + j, v);                                                 \
        j += 16;                                                                      \
    } while (0)
    while (i < ns)
        BN_SUMS16;
    while (j + 16 <= n)
        BN_GRAD16;
#undef BN_SUMS16
#undef BN_GRAD16
    if (j < n && !(leave & BN_LEAVE_TAIL)) {
        bn_store_part_avx512(dxn + j, n - j,
                             bn_grad16_avx512(bn_load_tail_avx512(xn + j, n - j, j),
                                              bn_load_tail_avx512(dyn + j, n - j, j),
                                              h, l, kv, c1v, c0v), stream);
    }
    if (xs != NULL) {
        if (ns < n)
            bn_tail_grad_sums_avx512(xs + ns, dys + ns, n - ns, ns, m, &a1, &b1, &a2, &b2);
        bn_lanes_store_avx512(s_dy, s_dy_dev, a1, b1, a2, b2);
    }
}
#endif

/* float64's: the same, eight values a vector, so sixteen (the lanes) in
 * two. The generic loops it matches round each product before its add (no
 * FMA), and so does it. */
#if BN_X86_DISPATCH
__attribute__((target("avx512f"))) static void bn_grad_sums_and_input_f64_avx512(
    const double *xs, const double *dys, ptrdiff_t n, double mean, double *BN_RESTRICT s_dy,
    double *BN_RESTRICT s_dy_dev, const double *ahead_x, const double *ahead_dy,
    const double *xn, const double *dyn, double *dxn, double mean_hi, double mean_lo,
    double k, double c1, double c0, int stream, int leave)
{
    __m512d a1 = _mm512_setzero_pd(), b1 = a1, a2 = a1, b2 = a1;
    const __m512d m = _mm512_set1_pd(mean);
    const __m512d h = _mm512_set1_pd(mean_hi), l = _mm512_set1_pd(mean_lo);
    const __m512d kv = _mm512_set1_pd(k), c1v = _mm512_set1_pd(c1), c0v = _mm512_set1_pd(c0);
    /* Sums: values [0, ns) sixteen at a time, then a masked tail. Input
     * gradient: a masked head [0, j0) up to a line of dxn, whole vectors, a
     * masked tail. */
    ptrdiff_t ns = xs == NULL ? 0 : n - n % 16;
    ptrdiff_t j0 = 0, j, i = 0;
    if (xn != NULL && stream)
        j0 = bn_line_head(dxn, sizeof(double), n);
    if (ahead_x != NULL && n > 0) {
        _mm_prefetch((const char *)ahead_x, _MM_HINT_T1);
        _mm_prefetch((const char *)(ahead_x + n - 1), _MM_HINT_T1);
        _mm_prefetch((const char *)ahead_dy, _MM_HINT_T1);
        _mm_prefetch((const char *)(ahead_dy + n - 1), _MM_HINT_T1);
    }
    if (xs != NULL)
        bn_lanes_load_avx512(s_dy, s_dy_dev, &a1, &b1, &a2, &b2);
    if (xn != NULL && j0 > 0 && !(leave & BN_LEAVE_HEAD)) {
        __mmask8 head = (__mmask8)((1u << j0) - 1);
        bn_store_part8_avx512(dxn, j0, bn_grad8_avx512(_mm512_maskz_loadu_pd(head, xn),
                                                       _mm512_maskz_loadu_pd(head, dyn),
                                                       h, l, kv, c1v, c0v), stream);
    }
    j = xn == NULL ? n : j0;
#define BN_SUMS16                                                                     \
    do {                                                                              \
        __m512d g = _mm512_loadu_pd(dys + i), e = _mm512_loadu_pd(dys + i + 8);       \
        a1 = _mm512_add_pd(a1, g);                                                    \
        a2 = _mm512_add_pd(a2, _mm512_mul_pd(g, _mm512_sub_pd(_mm512_loadu_pd(xs + i), m))); \
        b1 = _mm512_add_pd(b1, e);                                                    \
        b2 = _mm512_add_pd(b2, _mm512_mul_pd(e, _mm512_sub_pd(_mm512_loadu_pd(xs + i + 8), \
                                                              m)));                   \
        if (ahead_x != NULL) {                                                        \
            /* Both lines of these sixteen values, of the run ahead. */              \
            _mm_prefetch((const char *)(ahead_x + i + 7), _MM_HINT_T1);               \
            _mm_prefetch((const char *)(ahead_x + i + 15), _MM_HINT_T1);              \
            _mm_prefetch((const char *)(ahead_dy + i + 7), _MM_HINT_T1);              \
            _mm_prefetch((const char *)(ahead_dy + i + 15), _MM_HINT_T1);             \
        }                                                                             \
        i += 16;                                                                      \
    } while (0)
#define BN_GRAD8                                                                      \
    do {                                                                              \
        __m512d v = bn_grad8_avx512(_mm512_loadu_pd(xn + j), _mm512_loadu_pd(dyn + j),  \
                                    h, l, kv, c1v, c0v);                              \
        BN_STORE_VEC(pd, dxn + j, v);                                                 \
        j += 8;                                                                       \
    } while (0)
    while (i < ns)
        BN_SUMS16;
    while (j + 8 <= n)
        BN_GRAD8;
#undef BN_SUMS16
#undef BN_GRAD8
    if (j < n && !(leave & BN_LEAVE_TAIL)) {
        __mmask8 tail = (__mmask8)((1u << (n - j)) - 1);
        bn_store_part8_avx512(dxn + j, n - j,
                              bn_grad8_avx512(_mm512_maskz_loadu_pd(tail, xn + j),
                                              _mm512_maskz_loadu_pd(tail, dyn + j),
                                              h, l, kv, c1v, c0v), stream);
    }
    if (xs != NULL) {
        if (ns < n) {
            /* Values ns + t into lanes t, as the generic loop's scalar tail. */
            unsigned r = (unsigned)(n - ns);
            __mmask8 in_a = (__mmask8)((1u << r) - 1), in_b = (__mmask8)(((1u << r) - 1) >> 8);
            __m512d g = _mm512_maskz_loadu_pd(in_a, dys + ns);
            __m512d e = _mm512_maskz_loadu_pd(in_b, dys + ns + 8);
            __m512d d = _mm512_maskz_loadu_pd(in_a, xs + ns);
            __m512d f = _mm512_maskz_loadu_pd(in_b, xs + ns + 8);
            a1 = _mm512_mask_add_pd(a1, in_a, a1, g);
            a2 = _mm512_mask_add_pd(a2, in_a, a2, _mm512_mul_pd(g, _mm512_sub_pd(d, m)));
            b1 = _mm512_mask_add_pd(b1, in_b, b1, e);
            b2 = _mm512_mask_add_pd(b2, in_b, b2, _mm512_mul_pd(e, _mm512_sub_pd(f, m)));
        }
        bn_lanes_store_avx512(s_dy, s_dy_dev, a1, b1, a2, b2);
    }
}
#undef BN_STORE_VEC
#endif

/* The same work as the separate loops, piece by piece (pieces of a multiple
 * of BN_LANES values keep every value's lane): the sums of a piece of
 * (xs, dys), then the input gradient of a piece of (xn, dyn): the loop
 * without AVX-512, bitwise the AVX-512 ones, without their speed (float64
 * runs of 6272 bytes in the pipelined walk, one / two threads, 0.39-0.47 /
 * 0.51-0.62 of the bound against 0.55-0.58 / 0.63-0.64), so the tiled walk
 * takes it only when forced (use_tiled_backward asks for AVX-512). */
#define BN_DEFINE_GRAD_SUMS_AND_INPUT_PIECES(T, SFX)                                    \
static inline void bn_grad_sums_and_input_pieces_##SFX(                                 \
    const T *xs, const T *dys, ptrdiff_t n, double mean, double *s_dy, double *s_dy_dev, \
    const T *ahead_x, const T *ahead_dy, const T *xn, const T *dyn, T *dxn, T mean_hi,   \
    T mean_lo, T k, T c1, T c0, int stream, int leave)                                   \
{                                                                                       \
    ptrdiff_t begin = 0, end = n, head = 0;                                             \
    if (xn != NULL && stream) {                                                         \
        bn_written_span(dxn, sizeof(T), n, leave, &begin, &end);                        \
        head = begin + bn_elementwise_head(dxn + begin, sizeof(T), end - begin);        \
    }                                                                                   \
    for (ptrdiff_t j = 0; j < n; j += BN_PIPE_SPAN) {                                   \
        ptrdiff_t m = n - j < BN_PIPE_SPAN ? n - j : BN_PIPE_SPAN, lo, hi;              \
        bn_output_piece(j, m, n, begin, end, head, &lo, &hi);                           \
        if (ahead_x != NULL)                                                            \
            for (ptrdiff_t q = 0; q < m; q += BN_LINE_BYTES / (ptrdiff_t)sizeof(T)) {   \
                __builtin_prefetch(ahead_x + j + q, 0, 2);                              \
                __builtin_prefetch(ahead_dy + j + q, 0, 2);                             \
            }                                                                           \
        if (xs != NULL)                                                                 \
            bn_lane_grad_sums_##SFX(xs + j, dys + j, m, mean, s_dy, s_dy_dev);          \
        if (xn != NULL && lo < hi)                                                      \
            bn_grad_input_##SFX(xn + lo, dyn + lo, dxn + lo, hi - lo, mean_hi, mean_lo, \
                                k, c1, c0, stream);                                     \
    }                                                                                   \
}
BN_DEFINE_GRAD_SUMS_AND_INPUT_PIECES(float, f32)
BN_DEFINE_GRAD_SUMS_AND_INPUT_PIECES(double, f64)
#undef BN_DEFINE_GRAD_SUMS_AND_INPUT_PIECES

static inline void bn_grad_sums_and_input_f32(
    const float *xs, const float *dys, ptrdiff_t n, double mean, double *s_dy,
    double *s_dy_dev, const float *ahead_x, const float *ahead_dy, const float *xn,
    const float *dyn, float *dxn, float mean_hi, float mean_lo, float k, float c1, float c0,
    int stream, int leave)
{
#if BN_X86_DISPATCH
    if (bn_cpu_avx512()) {
        bn_grad_sums_and_input_f32_avx512(xs, dys, n, mean, s_dy, s_dy_dev, ahead_x, ahead_dy,
                                          xn, dyn, dxn, mean_hi, mean_lo, k, c1, c0, stream,
                                          leave);
        return;
    }
#endif
    bn_grad_sums_and_input_pieces_f32(xs, dys, n, mean, s_dy, s_dy_dev, ahead_x, ahead_dy, xn,
                                      dyn, dxn, mean_hi, mean_lo, k, c1, c0, stream, leave);
}

static inline void bn_grad_sums_and_input_f64(
    const double *xs, const double *dys, ptrdiff_t n, double mean, double *s_dy,
    double *s_dy_dev, const double *ahead_x, const double *ahead_dy, const double *xn,
    const double *dyn, double *dxn, double mean_hi, double mean_lo, double k, double c1,
    double c0, int stream, int leave)
{
#if BN_X86_DISPATCH
    if (bn_cpu_avx512()) {
        bn_grad_sums_and_input_f64_avx512(xs, dys, n, mean, s_dy, s_dy_dev, ahead_x, ahead_dy,
                                          xn, dyn, dxn, mean_hi, mean_lo, k, c1, c0, stream,
                                          leave);
        return;
    }
#endif
    bn_grad_sums_and_input_pieces_f64(xs, dys, n, mean, s_dy, s_dy_dev, ahead_x, ahead_dy, xn,
                                      dyn, dxn, mean_hi, mean_lo, k, c1, c0, stream, leave);
}

/* float64's interleaved rows do not vectorise well in the generic loops
 * (their sums go through memory every row): the register-blocked loops take
 * them, with the generic loop's bits. (N, 32) moments from 3.2-3.5
 * streaming-copy times to 1.2-1.6. */

static inline void bn_rows_shifted_sums_f64(
    const double *x, ptrdiff_t nrows, ptrdiff_t stride, ptrdiff_t ncols,
    const double *origin, const double *offset, double *s1, double *s2)
{
#if BN_X86_DISPATCH
    if (bn_cpu_avx512()) {
        bn_rows_shifted_sums_f64_avx512(x, nrows, stride, ncols, origin, offset, s1, s2);
        return;
    }
#endif
    bn_rows_shifted_sums_generic_f64(x, nrows, stride, ncols, origin, offset, s1, s2);
}

static inline void bn_rows_grad_sums_f64(
    const double *x, const double *dy, ptrdiff_t nrows, ptrdiff_t stride, ptrdiff_t ncols,
    const double *mean, double *s_dy, double *s_dy_dev)
{
#if BN_X86_DISPATCH
    if (bn_cpu_avx512()) {
        bn_rows_grad_sums_f64_avx512(x, dy, nrows, stride, ncols, mean, s_dy, s_dy_dev);
        return;
    }
    if (bn_cpu_avx2()) {
        bn_rows_grad_sums_f64_avx2(x, dy, nrows, stride, ncols, mean, s_dy, s_dy_dev);
        return;
    }
#endif
    bn_rows_grad_sums_generic_f64(x, dy, nrows, stride, ncols, mean, s_dy, s_dy_dev);
}

/* float16 <-> float32 conversions of a run, with the F16C instructions
 * (round to nearest even, as NumPy's casts). NumPy converts float16 with
 * scalar code at 1.6 / 2.5 ns a value, which made float16 batch norm 15-20
 * times slower than float32; these run at memory speed. They return 0
 * without touching anything on a CPU without F16C, and the caller falls
 * back to NumPy. */
#if BN_X86_DISPATCH
__attribute__((target("avx,f16c"))) static void bn_f16_to_f32_f16c(
    const uint16_t *BN_RESTRICT src, float *BN_RESTRICT dst, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    uint16_t tail_in[8] = {0};
    float tail_out[8];
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    if (i < n) {
        memcpy(tail_in, src + i, (size_t)(n - i) * sizeof *src);
        _mm256_storeu_ps(tail_out, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tail_in)));
        memcpy(dst + i, tail_out, (size_t)(n - i) * sizeof *dst);
    }
}

__attribute__((target("avx,f16c"))) static void bn_f32_to_f16_f16c(
    const float *BN_RESTRICT src, uint16_t *BN_RESTRICT dst, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    float tail_in[8] = {0};
    uint16_t tail_out[8];
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    if (i < n) {
        memcpy(tail_in, src + i, (size_t)(n - i) * sizeof *src);
        _mm_storeu_si128((__m128i *)tail_out,
                         _mm256_cvtps_ph(_mm256_loadu_ps(tail_in), _MM_FROUND_TO_NEAREST_INT));
        memcpy(dst + i, tail_out, (size_t)(n - i) * sizeof *dst);
    }
}
#endif

static inline int bn_f16_to_f32(const uint16_t *src, float *dst, ptrdiff_t n)
{
#if BN_X86_DISPATCH
    if (__builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx")) {
        bn_f16_to_f32_f16c(src, dst, n);
        return 1;
    }
#endif
    (void)src, (void)dst, (void)n;
    return 0;
}

static inline int bn_f32_to_f16(const float *src, uint16_t *dst, ptrdiff_t n)
{
#if BN_X86_DISPATCH
    if (__builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx")) {
        bn_f32_to_f16_f16c(src, dst, n);
        return 1;
    }
#endif
    (void)src, (void)dst, (void)n;
    return 0;
}

/* The widest vector loops this build has, and the widest of them it
 * chooses on this CPU (the compiler's clones of the generic loops follow the
 * same features): for the build report and for tests of the fallbacks. */
#if BN_X86_DISPATCH && !defined(BN_NO_AVX512)
#define BN_VECTOR_ISA_CAP "AVX-512"
#elif BN_X86_DISPATCH
#define BN_VECTOR_ISA_CAP "AVX2"
#else
#define BN_VECTOR_ISA_CAP "baseline"
#endif

static inline const char *bn_vector_isa(void)
{
#if BN_X86_DISPATCH
    if (bn_cpu_avx512())
        return "AVX-512";
    if (bn_cpu_avx2())
        return "AVX2";
#endif
    return "baseline";
}

/* Cap the loops chosen from here on (see bn_isa_cap); with no run-time
 * dispatch there is nothing to cap, and the cap reads as none (2). Not
 * while kernels run. */
static inline void bn_set_isa_cap(int cap)
{
#if BN_X86_DISPATCH
    bn_isa_cap = cap;
#else
    (void)cap;
#endif
}

static inline int bn_get_isa_cap(void)
{
#if BN_X86_DISPATCH
    return bn_isa_cap;
#else
    return 2;
#endif
}

/* Make streaming stores visible to other threads before they read the
 * output: call once after a parallel region that streamed. */
static inline void bn_stream_fence(void)
{
#if BN_HAVE_STREAM
    BN_STREAM_FENCE();
#endif
}

#endif
