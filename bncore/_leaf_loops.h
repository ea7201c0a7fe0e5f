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
