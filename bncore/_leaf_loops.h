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
 * that consecutive additions do not wait on each other's latency. */
#define BN_LANES 16

/* Eight float64 values: the compiler maps operations on this GCC/Clang vector
 * type onto whatever the target clone has (one zmm, two ymm, four xmm). */
typedef double bn_v8df __attribute__((vector_size(64)));
typedef float bn_v8sf __attribute__((vector_size(32)));

/* Eight consecutive values, unaligned, as float64 (exactly). */
static inline bn_v8df bn_load8_f64(const double *p)
{
    bn_v8df v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline bn_v8df bn_load8_f32(const float *p)
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

/* Values per 64-byte line, the unit a streaming loop writes. */
#define BN_LINE_BYTES 64

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
 * get the baseline. BNCORE_NO_DISPATCH=1 at build time turns it off. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) \
    && defined(__linux__) && !defined(BN_NO_DISPATCH)
#define BN_LEAF __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) static
#else
#define BN_LEAF static inline
#endif

#define BN_T float
#define BN_SFX(name) name##_f32
#define BN_STREAM_XMM BN_STREAM_F32
#include "_leaf_loops_impl.h"
#undef BN_T
#undef BN_SFX
#undef BN_STREAM_XMM

#define BN_T double
#define BN_SFX(name) name##_f64
#define BN_STREAM_XMM BN_STREAM_F64
#include "_leaf_loops_impl.h"
#undef BN_T
#undef BN_SFX
#undef BN_STREAM_XMM

/* Make streaming stores visible to other threads before they read the
 * output: call once after a parallel region that streamed. */
static inline void bn_stream_fence(void)
{
#if BN_HAVE_STREAM
    BN_STREAM_FENCE();
#endif
}

#endif
