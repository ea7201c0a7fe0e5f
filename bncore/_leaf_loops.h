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

#define BN_LANES 8

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
#include "_leaf_loops_impl.h"
#undef BN_T
#undef BN_SFX

#define BN_T double
#define BN_SFX(name) name##_f64
#include "_leaf_loops_impl.h"
#undef BN_T
#undef BN_SFX

#endif
