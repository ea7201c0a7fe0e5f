/* How this machine's memory serves one sequential stream against several
 * walked in step: a read (AVX-512 sums) and a streaming copy of a buffer,
 * split into S equal parts whose vectors are taken in turn, S = 1, 2, 3, 4,
 * 8; each a median of 21 timings, as a ratio to S = 1's streaming copy.
 * The measurement behind the paired-stream loops of bncore's normalisation
 * (see "Why it is fast" in the README).
 *
 *   gcc -O2 -fopenmp benchmarks/memory_streams.c -o /tmp/memory_streams
 *   /tmp/memory_streams [values]      # float32 values, default 51200000
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define REPEATS 21

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Parts of a multiple of 16 values, so that every vector is aligned. */
static long part_length(long n, int parts) { return n / parts / 16 * 16; }

__attribute__((target("avx512f"))) static float read_parts(const float *x, long n, int parts)
{
    __m512 sums[8] = {0};
    long q = part_length(n, parts);
    for (int s = 0; s < parts; s++)
        sums[s] = _mm512_setzero_ps();
    for (long i = 0; i < q; i += 16)
        for (int s = 0; s < parts; s++)
            sums[s] = _mm512_add_ps(sums[s], _mm512_load_ps(x + s * q + i));
    for (int s = 1; s < parts; s++)
        sums[0] = _mm512_add_ps(sums[0], sums[s]);
    return _mm512_reduce_add_ps(sums[0]);
}

__attribute__((target("avx512f"))) static void copy_parts(const float *x, float *y, long n,
                                                          int parts)
{
    long q = part_length(n, parts);
    for (long i = 0; i < q; i += 16)
        for (int s = 0; s < parts; s++)
            _mm512_stream_ps(y + s * q + i, _mm512_load_ps(x + s * q + i));
    _mm_sfence();
}

static int by_value(const void *a, const void *b)
{
    double p = *(const double *)a, q = *(const double *)b;
    return (p > q) - (p < q);
}

int main(int argc, char **argv)
{
    static const int parts[] = {1, 2, 3, 4, 8};
    enum { NPARTS = sizeof parts / sizeof parts[0] };
    long n = argc > 1 ? atol(argv[1]) : 51200000;
    float *x = aligned_alloc(64, n * sizeof(float)), *y = aligned_alloc(64, n * sizeof(float));
    volatile float sink;
    if (x == NULL || y == NULL)
        return 1;
    memset(x, 0, n * sizeof(float));
    memset(y, 0, n * sizeof(float));
    printf("%ld float32 values (%.0f MB)\n", n, n * 4e-6);
    for (int threads = 1; threads <= 2; threads++) {
        double t[2][NPARTS][REPEATS], median[2][NPARTS];
        for (int r = 0; r < REPEATS; r++)
            for (int kind = 0; kind < 2; kind++)
                for (int k = 0; k < NPARTS; k++) {
                    double t0 = now();
#pragma omp parallel num_threads(threads)
                    {
                        long m = n / threads / 16 * 16, start = omp_get_thread_num() * m;
                        if (kind == 0)
                            sink = read_parts(x + start, m, parts[k]);
                        else
                            copy_parts(x + start, y + start, m, parts[k]);
                    }
                    t[kind][k][r] = now() - t0;
                }
        for (int kind = 0; kind < 2; kind++)
            for (int k = 0; k < NPARTS; k++) {
                qsort(t[kind][k], REPEATS, sizeof(double), by_value);
                median[kind][k] = t[kind][k][REPEATS / 2];
            }
        printf("%d thread(s): streaming copy, one stream: %.2f ms\n", threads,
               median[1][0] * 1e3);
        for (int kind = 0; kind < 2; kind++) {
            printf("  %-5s time / that copy's, streams", kind == 0 ? "read" : "copy");
            for (int k = 0; k < NPARTS; k++)
                printf("  %d: %.2f", parts[k], median[kind][k] / median[1][0]);
            printf("\n");
        }
    }
    (void)sink;
    free(x);
    free(y);
    return 0;
}
