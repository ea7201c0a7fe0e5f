/* A stripped-down model of bncore's pipelined float32 training forward on
 * one thread, to tell what its memory walk can reach from what its
 * bookkeeping costs: benchmarks/pipelined_model.py builds it and times it
 * beside bncore and a streaming copy.
 *
 * The walk is bncore's (pipelined_item in bncore/_kernels.pyx): an NCHW
 * tensor of N rows of C runs of R values; while channel c + 1's runs are
 * read for their statistics (float64 lanes of x - origin and its square,
 * the operations of bn_stats_and_affine_f32_avx512), channel c's runs are
 * normalised from cache with streaming stores, last row first; each run
 * asks for the statistics run `ahead` runs on (prefetcht1, a line per
 * sixteen values) and for the next run to normalise (prefetcht0; bncore
 * asks for it into L2 instead for channels over 512 KiB). What it
 * leaves out: blocks, their totals and merges, the per-channel constants,
 * seams, and masked heads and tails. So x and y must be 64-byte aligned
 * and R a multiple of 16. It returns the lanes' sum only so that the
 * compiler keeps the statistics loop. */
#include <immintrin.h>
#include <stddef.h>

#define MODEL_LINE 64

__attribute__((target("avx512f"))) static void prefetch_run_l1(const float *run, ptrdiff_t n)
{
    for (ptrdiff_t b = 0; b < n * (ptrdiff_t)sizeof(float); b += MODEL_LINE)
        _mm_prefetch((const char *)run + b, _MM_HINT_T0);
}

__attribute__((target("avx512f"))) double bnm_pipelined_forward(
    const float *x, float *y, ptrdiff_t rows, ptrdiff_t channels, ptrdiff_t run, ptrdiff_t ahead)
{
    __m512d a1 = _mm512_setzero_pd(), b1 = a1, a2 = a1, b2 = a1;
    const __m512d origin = _mm512_set1_pd(0.25);
    const __m512 hi = _mm512_set1_ps(0.125f), lo = _mm512_set1_ps(1e-9f);
    const __m512 scale = _mm512_set1_ps(1.5f), shift = _mm512_set1_ps(0.5f);
    for (ptrdiff_t c = -1; c < channels; c++) {
        for (ptrdiff_t n = 0; n < rows; n++) {
            const float *xs = c + 1 < channels ? x + (n * channels + c + 1) * run : NULL;
            ptrdiff_t m = rows - 1 - n;      /* normalised last read first */
            const float *xn = c >= 0 ? x + (m * channels + c) * run : NULL;
            float *yn = y + (m * channels + c) * run;
            const float *pf = NULL;
            if (xs != NULL) {
                ptrdiff_t n2 = n + ahead, c2 = c + 1;
                while (n2 >= rows) {
                    n2 -= rows;
                    c2++;
                }
                if (c2 < channels)
                    pf = x + (n2 * channels + c2) * run;
            }
            if (xn != NULL && m > 0)
                prefetch_run_l1(x + ((m - 1) * channels + c) * run, run);
            for (ptrdiff_t i = 0; i < run; i += 16) {
                if (xs != NULL) {
                    __m512d d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(xs + i)), origin);
                    __m512d e = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(xs + i + 8)),
                                              origin);
                    a1 = _mm512_add_pd(a1, d);
                    a2 = _mm512_fmadd_pd(d, d, a2);
                    b1 = _mm512_add_pd(b1, e);
                    b2 = _mm512_fmadd_pd(e, e, b2);
                    if (pf != NULL)
                        _mm_prefetch((const char *)(pf + i + 15), _MM_HINT_T1);
                }
                if (xn != NULL) {
                    __m512 v = _mm512_sub_ps(_mm512_sub_ps(_mm512_load_ps(xn + i), hi), lo);
                    _mm512_stream_ps(yn + i, _mm512_add_ps(_mm512_mul_ps(v, scale), shift));
                }
            }
        }
    }
    _mm_sfence();
    return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a1, b1), _mm512_add_pd(a2, b2)));
}
