/* OpenMP when the build has it, serial stand-ins when it does not, so that
 * one Cython source compiles either way (setup.py decides). */
#ifndef BNCORE_OPENMP_H
#define BNCORE_OPENMP_H

#ifdef _OPENMP
#include <omp.h>
#define BN_OPENMP_ENABLED 1
#define BN_OPENMP_VERSION _OPENMP
static inline int bn_omp_max_threads(void) { return omp_get_max_threads(); }
#else
#define BN_OPENMP_ENABLED 0
#define BN_OPENMP_VERSION 0
static inline int bn_omp_max_threads(void) { return 1; }
#endif

#if defined(__clang__)
#define BN_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define BN_COMPILER "gcc " __VERSION__
#elif defined(_MSC_VER)
#define BN_COMPILER "msvc"
#else
#define BN_COMPILER "unknown"
#endif

#endif
