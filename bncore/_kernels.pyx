"""bncore's compiled layer: every hot loop, without the GIL.

The input arrives as a flat C-contiguous buffer seen as (outer, C, inner)
(DESIGN.md, "One canonical view"). Nothing here validates what functional.py
has already checked: an exception raised inside a parallel region can hang
the process. The entry points only check that the buffers they are handed are
of the dtype, alignment, layout and sizes they read, so that a wrong call
from Python is an exception instead of memory corruption.

Two loop orders:

* planar (planar_order: inner >= 32, runs longer than a few times the
  rows, down to 16 values in cache with AVX-512, or down to 9 float32 and
  16 float64 values in tensors too large for the cache): each (n, c) pair
  is a contiguous run of ``inner`` values, vectorised along the run;
* interleaved: rows of W = C * inner values, vectorised across the row;
  column j belongs to channel j // inner.

The training forward in planar order also has a pipelined form for large
outputs (use_pipelined): each thread walks a range of channels,
normalising one from cache while it reads the next one's statistics from
memory, so the input is read once instead of twice. It computes the same
blocks, merged in the same order, as the two passes: the same bits. The
training backward is tiled by channel (use_tiled_backward): each channel's
gradient sums read from memory, then its dx written from cache; short runs
are tiled by groups of channels (use_group_tiled_backward).

Statistics are the triple (count, mean, M2) per channel, with the mean kept
as an offset from the channel's origin, its first value: every block of the
channel subtracts the same origin, so the offsets are small numbers whose
differences (in Chan's merge) do not lose the digits a large mean would.
A block gives its triple from float64 sums of x - origin (planar: at most
BLOCK_LEN values, of one run or of the whole short runs of consecutive rows;
interleaved float32: a column's rows in one work item). float64 input keeps
that one pass where the shift lies within 4 standard deviations of the
block's mean (shifted_sums_keep_digits), and else takes a second, corrected
pass around the block's mean, from cache (Chan, Golub & LeVeque, "Algorithms
for computing the sample variance", 1983); its interleaved blocks of rows
shift by the block before's mean (the first by its first row). Blocks
merge into chunks and chunks into channels with Chan's pairwise update,
always in the same order. Block and chunk boundaries come from the shape
alone, never from the thread count, so every result is bitwise
identical for any number of threads. The final mean is returned as a float64
and the residual that float64 could not hold, so the normalization can
subtract it exactly.
"""

cimport numpy as cnp
import numpy as np
# Scratch tables come from Python's raw allocator: safe without the GIL, and
# traced by tracemalloc, so the memory tests see them.
from cpython.mem cimport (PyMem_RawFree as free, PyMem_RawMalloc as malloc,
                          PyMem_RawRealloc as realloc)
from cpython.pyport cimport PY_SSIZE_T_MAX
from cython.parallel cimport prange
from libc.float cimport DBL_MAX, FLT_MAX
from libc.math cimport INFINITY, fabs, sqrt
from libc.stdint cimport uintptr_t
from libc.string cimport memcpy, memset

cnp.import_array()

cdef extern from "_openmp.h" nogil:
    int BN_OPENMP_ENABLED
    int BN_OPENMP_VERSION
    const char *BN_COMPILER
    int bn_omp_max_threads()

cdef extern from "_leaf_loops.h" nogil:
    enum: BN_LANES
    const char *BN_VECTOR_ISA_CAP
    const char *bn_vector_isa()
    void bn_set_isa_cap(int cap)
    int bn_get_isa_cap()
    ctypedef double bn_lanes[BN_LANES]
    ctypedef struct bn_lane_pair:
        bn_lanes a
        bn_lanes b
    double bn_lanes_total(const double *lanes)
    void bn_prefetch_span(uintptr_t at, Py_ssize_t nbytes)
    void bn_block_shifted_sums_f32(const float *x, Py_ssize_t nruns, Py_ssize_t stride,
                                   Py_ssize_t n, double origin, double offset,
                                   Py_ssize_t ahead_bytes, double *t1, double *t2)
    void bn_block_shifted_sums_f64(const double *x, Py_ssize_t nruns, Py_ssize_t stride,
                                   Py_ssize_t n, double origin, double offset,
                                   Py_ssize_t ahead_bytes, double *t1, double *t2)
    void bn_block_grad_sums_f32(const float *x, const float *dy, Py_ssize_t nruns,
                                Py_ssize_t stride, Py_ssize_t n, double mean, double *t_dy,
                                double *t_dev)
    void bn_block_grad_sums_f64(const double *x, const double *dy, Py_ssize_t nruns,
                                Py_ssize_t stride, Py_ssize_t n, double mean, double *t_dy,
                                double *t_dev)
    void bn_group_grad_sums_f32(const float *x, const float *dy, Py_ssize_t nrows,
                                Py_ssize_t stride, Py_ssize_t nchan, Py_ssize_t n,
                                const double *mean, bn_lane_pair *pairs, Py_ssize_t after,
                                Py_ssize_t ask_max_bytes)
    void bn_group_grad_sums_f64(const double *x, const double *dy, Py_ssize_t nrows,
                                Py_ssize_t stride, Py_ssize_t nchan, Py_ssize_t n,
                                const double *mean, bn_lane_pair *pairs, Py_ssize_t after,
                                Py_ssize_t ask_max_bytes)
    void bn_rows_shifted_sums_f32(const float *x, Py_ssize_t nrows, Py_ssize_t stride,
                                  Py_ssize_t ncols, const double *origin,
                                  const double *offset, double *s1, double *s2)
    void bn_rows_shifted_sums_f64(const double *x, Py_ssize_t nrows, Py_ssize_t stride,
                                  Py_ssize_t ncols, const double *origin,
                                  const double *offset, double *s1, double *s2)
    void bn_affine_f32(const float *x, float *y, Py_ssize_t n,
                       float mean_hi, float mean_lo, float scale, float shift, int relu,
                       int stream)
    void bn_affine_f64(const double *x, double *y, Py_ssize_t n,
                       double mean_hi, double mean_lo, double scale, double shift, int relu,
                       int stream)
    void bn_rows_affine_f32(const float *x, float *y, Py_ssize_t nrows, Py_ssize_t stride,
                            Py_ssize_t ncols, const float *mean_hi, const float *mean_lo,
                            const float *scale, const float *shift, int relu, int stream)
    void bn_rows_affine_f64(const double *x, double *y, Py_ssize_t nrows, Py_ssize_t stride,
                            Py_ssize_t ncols, const double *mean_hi, const double *mean_lo,
                            const double *scale, const double *shift, int relu, int stream)
    void bn_relu_gate_f32(const float *x, const float *dy, float *out, Py_ssize_t n,
                          float mean_hi, float mean_lo, float scale, float shift,
                          float above, int stream)
    void bn_relu_gate_f64(const double *x, const double *dy, double *out, Py_ssize_t n,
                          double mean_hi, double mean_lo, double scale, double shift,
                          double above, int stream)
    void bn_rows_relu_gate_f32(const float *x, const float *dy, float *out, Py_ssize_t nrows,
                               Py_ssize_t stride, Py_ssize_t ncols, const float *mean_hi,
                               const float *mean_lo, const float *scale, const float *shift,
                               float above, int stream)
    void bn_rows_relu_gate_f64(const double *x, const double *dy, double *out,
                               Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t ncols,
                               const double *mean_hi, const double *mean_lo,
                               const double *scale, const double *shift, double above,
                               int stream)
    void bn_prefetch_to_l2(const void *run, Py_ssize_t nbytes)
    int bn_pipelined_fused()
    void bn_stats_and_affine_f32(const float *xs, Py_ssize_t n, double origin, double *s1,
                                 double *s2, const float *ahead, const float *xn, float *yn,
                                 float mean_hi, float mean_lo, float scale, float shift,
                                 int relu, int stream, int leave)
    void bn_stats_and_affine_f64(const double *xs, Py_ssize_t n, double origin, double *s1,
                                 double *s2, const double *ahead, const double *xn,
                                 double *yn, double mean_hi, double mean_lo, double scale,
                                 double shift, int relu, int stream, int leave)
    void bn_grad_sums_and_input_f32(const float *xs, const float *dys, Py_ssize_t n,
                                    double mean, double *s_dy, double *s_dy_dev,
                                    const float *ahead_x, const float *ahead_dy,
                                    const float *xn, const float *dyn, float *dxn,
                                    float mean_hi, float mean_lo, float k, float c1, float c0,
                                    int stream, int leave)
    void bn_grad_sums_and_input_f64(const double *xs, const double *dys, Py_ssize_t n,
                                    double mean, double *s_dy, double *s_dy_dev,
                                    const double *ahead_x, const double *ahead_dy,
                                    const double *xn, const double *dyn, double *dxn,
                                    double mean_hi, double mean_lo, double k, double c1,
                                    double c0, int stream, int leave)
    int BN_LINE_BYTES
    int BN_F64_GRAD_LANES_MAX
    int BN_LEAVE_HEAD
    int BN_LEAVE_TAIL
    void bn_affine_seam_f32(const float *x, float *y, int split, const float *before,
                            const float *after, int relu)
    void bn_affine_seam_f64(const double *x, double *y, int split, const double *before,
                            const double *after, int relu)
    void bn_grad_seam_f32(const float *x, const float *dy, float *dx, int split,
                          const float *before, const float *after)
    void bn_grad_seam_f64(const double *x, const double *dy, double *dx, int split,
                          const double *before, const double *after)
    Py_ssize_t bn_line_head(const void *p, size_t itemsize, Py_ssize_t n)
    int bn_periodic_lanes(int itemsize)
    void bn_periodic_affine_f32(const float *x, float *y, Py_ssize_t n, const float *pattern,
                                Py_ssize_t period, Py_ssize_t phase, int relu, int stream)
    void bn_periodic_affine_f64(const double *x, double *y, Py_ssize_t n,
                                const double *pattern, Py_ssize_t period, Py_ssize_t phase,
                                int relu, int stream)
    void bn_periodic_grad_f32(const float *x, const float *dy, float *dx, Py_ssize_t n,
                              const float *pattern, Py_ssize_t period, Py_ssize_t phase,
                              int stream)
    void bn_periodic_grad_f64(const double *x, const double *dy, double *dx, Py_ssize_t n,
                              const double *pattern, Py_ssize_t period, Py_ssize_t phase,
                              int stream)
    void bn_row_groups_affine_f32(const float *x, float *y, Py_ssize_t nrows,
                                  Py_ssize_t stride, Py_ssize_t ncols, const float *constants,
                                  Py_ssize_t apart, int relu, int stream)
    void bn_row_groups_affine_f64(const double *x, double *y, Py_ssize_t nrows,
                                  Py_ssize_t stride, Py_ssize_t ncols,
                                  const double *constants, Py_ssize_t apart, int relu,
                                  int stream)
    void bn_row_groups_grad_f32(const float *x, const float *dy, float *dx, Py_ssize_t nrows,
                                Py_ssize_t stride, Py_ssize_t ncols, const float *constants,
                                Py_ssize_t apart, int stream)
    void bn_row_groups_grad_f64(const double *x, const double *dy, double *dx,
                                Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t ncols,
                                const double *constants, Py_ssize_t apart, int stream)
    void bn_affine_twin_f32(const float *x, float *y, Py_ssize_t apart, Py_ssize_t n,
                            const float *p, const float *q, int relu, int stream)
    void bn_affine_twin_f64(const double *x, double *y, Py_ssize_t apart, Py_ssize_t n,
                            const double *p, const double *q, int relu, int stream)
    void bn_affine_runs_f32(const float *x, float *y, Py_ssize_t n, Py_ssize_t inner,
                            const float *p, int relu, int stream, Py_ssize_t apart)
    void bn_affine_each_run_f32(const float *x, float *y, Py_ssize_t nruns, Py_ssize_t length,
                                const float *p, int relu)
    void bn_affine_each_run_f64(const double *x, double *y, Py_ssize_t nruns,
                                Py_ssize_t length, const double *p, int relu)
    void bn_grad_each_run_f32(const float *x, const float *dy, float *dx, Py_ssize_t nruns,
                              Py_ssize_t length, const float *p)
    void bn_grad_each_run_f64(const double *x, const double *dy, double *dx,
                              Py_ssize_t nruns, Py_ssize_t length, const double *p)
    void bn_affine_runs_f64(const double *x, double *y, Py_ssize_t n, Py_ssize_t inner,
                            const double *p, int relu, int stream, Py_ssize_t apart)
    void bn_grad_runs_f32(const float *x, const float *dy, float *dx, Py_ssize_t n,
                          Py_ssize_t inner, const float *p, int stream)
    void bn_grad_runs_f64(const double *x, const double *dy, double *dx, Py_ssize_t n,
                          Py_ssize_t inner, const double *p, int stream)
    void bn_copy_f32(const float *x, float *y, Py_ssize_t n, int stream)
    void bn_copy_f64(const double *x, double *y, Py_ssize_t n, int stream)
    void bn_stream_fence()
    int bn_f16_to_f32(const unsigned short *src, float *dst, Py_ssize_t n)
    int bn_f32_to_f16(const float *src, unsigned short *dst, Py_ssize_t n)
    void bn_rows_grad_sums_f32(const float *x, const float *dy, Py_ssize_t nrows,
                               Py_ssize_t stride, Py_ssize_t ncols, const double *mean,
                               double *s_dy, double *s_dy_dev)
    void bn_rows_grad_sums_f64(const double *x, const double *dy, Py_ssize_t nrows,
                               Py_ssize_t stride, Py_ssize_t ncols, const double *mean,
                               double *s_dy, double *s_dy_dev)
    void bn_grad_input_f32(const float *x, const float *dy, float *dx, Py_ssize_t n,
                           float mean_hi, float mean_lo, float k, float c1, float c0,
                           int stream)
    void bn_grad_input_f64(const double *x, const double *dy, double *dx, Py_ssize_t n,
                           double mean_hi, double mean_lo, double k, double c1, double c0,
                           int stream)
    void bn_rows_grad_input_f32(const float *x, const float *dy, float *dx, Py_ssize_t nrows,
                                Py_ssize_t stride, Py_ssize_t ncols, const float *mean_hi,
                                const float *mean_lo, const float *k, const float *c1,
                                const float *c0, int stream)
    void bn_rows_grad_input_f64(const double *x, const double *dy, double *dx,
                                Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t ncols,
                                const double *mean_hi, const double *mean_lo, const double *k,
                                const double *c1, const double *c0, int stream)

ctypedef fused floating:
    float
    double

OPENMP_ENABLED = bool(BN_OPENMP_ENABLED)
OPENMP_VERSION = BN_OPENMP_VERSION
COMPILER = BN_COMPILER.decode("utf-8", "replace")
# "AVX-512", "AVX2" or "baseline": the widest vector loops in this build
# (BNCORE_NO_AVX512 and BNCORE_NO_DISPATCH cap them; setup.py), and those
# chosen on this CPU.
VECTOR_ISA_CAP = BN_VECTOR_ISA_CAP.decode("ascii")
VECTOR_ISA = bn_vector_isa().decode("ascii")

cdef enum:
    # Runs at least this long are walked as runs (planar order); shorter ones
    # are read as rows across channels, where the vector is the row: below 32
    # values (128 bytes of float32) the per-run calls and merges cost more
    # than the run while the tensor is in cache. (A judgement, checked
    # against the short runs below.)
    PLANAR_MIN_INNER = 32
    # ...but from memory, rows of NCHW maps (C * inner values, read by tiles
    # of whole channels far apart) are slower still: tensors of at least
    # stream_min_bytes take runs down to these lengths. Measured, planar
    # against rows, in streaming-copy times, one thread: float32 (2048,
    # 256, 4, 4) training 3.6 against 6.3, eval 1.0 against 2.9, backward
    # 5.3 against 8.3; (1024, 512, 3, 3) training 6.9 against 8.7; but
    # (1024, 512, 2, 4) training 7.5 against 6.2. float64 (1024, 256, 4,
    # 4) training 3.6 against 5.7, but (1024, 256, 3, 4) 8.5 against 6.0
    # (a second pass on every block then). In cache, rows won over runs in chunks
    # of a row (a block each): (256, 512, 4, 4) float32, 8 MB, training
    # 2.4 ms against 2.9 as runs; (32, 64, 4, 4) 28 us against 97.
    PLANAR_MIN_INNER_F32 = 9
    PLANAR_MIN_INNER_F64 = 16
    # ...but with AVX-512 (its row loops), float32 runs of 9-15 values from
    # memory are rows across channels again where a row (C * inner values)
    # is at most this long. On Zen 5, rows over runs, time over time, one /
    # two threads, moments, eval, training, backward: (116508, 8, 3, 3)
    # 0.11-0.13, 0.29-0.34, 0.15-0.17, 0.48-0.52; (310689, 3, 3, 3)
    # 0.26-0.30, 0.33-0.34, 0.25-0.29, 0.52-0.56; (14563, 64, 3, 3)
    # 0.19-0.22, 0.15-0.16, 0.17-0.19, 0.65-0.70; (3640, 256, 3, 3)
    # 0.31-0.38, 0.24-0.30, 0.28-0.33, 0.76-0.80; (65536, 8, 3, 4)
    # 0.16-0.24, 0.26-0.37, 0.19-0.29, 0.65-0.73; (14979, 64, 2, 7)
    # 0.23-0.26, 0.20-0.34, 0.23-0.30, 0.89-0.91; (2184, 256, 3, 5)
    # 0.99-1.00, 0.27-0.37, 0.46-0.52, 0.81-0.97. Wider rows, whose column
    # sums are slower, lost in the statistics and the backward: one thread,
    # (1820, 512, 3, 3) moments 1.17, (1365, 512, 3, 4) 1.29 and backward
    # 1.12, (1092, 512, 3, 5) 1.66 and 1.25, (1170, 512, 2, 7) 1.32 and
    # 1.23, but (910, 1024, 3, 3) 0.97 and 0.96. Capped to AVX2 rows lost:
    # (116508, 8, 3, 3) eval 4.7 and backward 2.3 times the time.
    SHORT_RUN_ROWS_MAX_BYTES = 16384
    # The normalisation (eval, and training's second pass) takes such rows
    # up to this long: one / two threads, (1170, 512, 2, 7) 0.30 / 0.40,
    # (546, 1024, 3, 5) 0.37 / 0.54, (341, 2048, 3, 4) 0.85 / 1.48,
    # (455, 2048, 3, 3) 1.15 / 1.24, (292, 2048, 2, 7) 1.46 / 1.52 (past
    # ROW_GROUPS_MAX_WIDTH values). Training, its statistics as rows too:
    # (1820, 512, 3, 3) 0.49, (1092, 512, 3, 5) 0.62, (546, 1024, 3, 5)
    # 0.73 of the time, one thread.
    NORMALIZE_SHORT_RUN_ROWS_MAX_BYTES = 65536
    # ...and so are runs of 16-31 values in cache, where AVX-512 writes
    # them a row at a time (rows_as_runs) and their statistics are blocks
    # of whole runs (IN_CACHE_BLOCK_MIN_RUNS). Measured, rows against runs,
    # training / eval / backward, one thread: float32 (8, 256, 4, 4) 52 /
    # 17 / 41 us against 10 / 3.7 / 12, (256, 512, 4, 4) 1137 / 365 / 1448
    # against 599 / 233 / 728, (512, 64, 16) 146 / 55 / 183 against 109 /
    # 54 / 146; float64 (8, 256, 4, 4) 63 / 22 / 54 against 33 / 6.9 / 21,
    # (64, 64, 16) 42 / 20 / 66 against 44 / 13 / 35. Shorter runs lost:
    # float32 (16, 64, 9) backward 8.4 against 9.8; float64 (64, 64, 9)
    # training 22 against 97 (a second pass on every block then).
    PLANAR_MIN_INNER_IN_CACHE = 16
    # ...and so are short runs in few rows: rows across channels take a
    # triple per column and merge each channel's columns, a cost per value
    # that few rows do not spread. Runs when outer * FEW_ROWS_F32 < inner
    # (float64: FEW_ROWS_F64, for the second pass that every float64
    # block took when this was measured). Measured,
    # rows against runs, training / eval / backward, one thread, float32:
    # (2, 128, 4, 4) 32 / 11 / 37 us against 10 / 4.4 / 25; (2, 4096, 4,
    # 4) 1037 / 298 / 666 against 295 / 64 / 204; (3, 256, 3, 4) 51 / 16 /
    # 47 against 33 / 8.5 / 36; (2, 256, 2, 3) 24 / 8.1 / 24 against 18 /
    # 4.8 / 22; but (8, 256, 4, 4) training 76 against 84 and (2, 512, 2,
    # 2) 39 / 14 / 43 against 52 / 14 / 56. float64: (2, 128, 4, 4) 42 /
    # 12 / 39 against 29 / 4.9 / 28, but (4, 256, 4, 4) training 90
    # against 107. (PyTorch took 13 us for the first, float32, training.)
    FEW_ROWS_F32 = 2
    FEW_ROWS_F64 = 4
    # Streamed runs shorter than this are normalised a row at a time, as one
    # stream (rows_as_runs), even where they are whole lines: each call
    # costs about as much as a few lines' stores. Eval, float32, 34-42 MB,
    # one call per run against a row at a time, of a streaming copy, 1 / 2
    # threads (Zen 4): runs of 512-640 bytes 0.39-0.46 / 0.43-0.59 against
    # 0.98-1.10 / 0.96-1.01; 1024 bytes 0.57 / 0.51 against 1.05 / 0.87
    # (float64 0.56 / 0.67 against 1.05 / 0.96). On Zen 5 rows win up to
    # 8 KiB: eval, 50-51 MB, time in streaming-copy times, a row at a time
    # against a call per run (set_row_runs, one process), 1 / 2 threads:
    # float32 runs of 2048 bytes 0.96 / 0.93 against 1.19 / 1.03, 3136
    # 0.95 / 0.99 against 1.06 / 0.99, 4096 0.91 / 0.97 against 1.16 /
    # 1.03, 6272 0.87 / 0.94 against 0.98 / 0.93; 8192 0.97 / 0.94 against
    # 1.01 / 0.93, 12544 0.90 / 0.97 against 0.89 / 0.92, 50176 0.97 /
    # 0.92 against 0.86 / 0.89; float64 6272 0.97 / 0.98 against 1.03 /
    # 0.97, 12544 1.01 on two threads against 0.92. The two-pass training
    # forward (float64; float32 of 4-8 channels) took 0.93-0.98 of the time
    # as rows on one thread, 0.99-1.02 on two.
    ROW_RUNS_MAX_BYTES = 8192
    # ...but where the row chunks pair (paired_chunks: chunk k's rows in
    # step with chunk k + P's, P about half the chunks), runs of every
    # length are written a row at a time, as two streams far apart: memory
    # serves those faster than one (the periodic loops' finding), and the
    # runs' shared lines (NumPy's arrays start 16 bytes past a line, so
    # every run of whole lines shares two) are written whole. Against the
    # walk before (one row stream, or a call per run with rows of a chunk
    # paired), NumPy-placed arrays, blocks of calls, time over time, one /
    # two threads, eval float32: (128, 128, 56, 56) 0.87 / 0.89, (64, 256,
    # 28, 28) 0.85 / 0.93, (512, 512, 7, 7) 0.89 / 0.91, (64, 2048, 7, 7)
    # 0.88 / 0.95, (64, 3, 224, 224) 0.88 / 0.96, (2048, 8, 28, 28) 0.90 /
    # 0.91, 17 x 17 and 35 x 35 maps 0.94-0.98; float64 0.84-0.95; the
    # two-pass training forward 0.90-1.03 (the pipelined walks do not take
    # it). Chunks of one row each could not pair within a chunk before.
    # The training backward's input gradient (bn_grad_runs) keeps the Zen 4
    # limit: on Zen 5 its rows of 2-4 KiB runs took 0.98-1.03 of the time
    # of a call per run (float32 and float64, 1 and 2 threads, 25-51 MB).
    GRAD_ROW_RUNS_MAX_BYTES = 2048
    # The row loops write rows shorter than this several a call, as many as
    # make this much, where a call's rows hold every channel (so that they
    # are one stream): few channels of short runs were a call per row of a
    # few hundred bytes. Float32, one thread, in streaming-copy times, one
    # row a call against rows of 8 / 16 / 64 KiB: eval (32768, 8, 7, 7)
    # 1.36 against 0.99 / 0.88 / 0.94, (65536, 4, 7, 7) 1.13 against 0.86
    # / 0.89 / 0.90; backward 3.44 against 2.94 / 2.79 / 2.83 and 3.33
    # against 3.01 / 2.91 / 2.99; training 2.11 against 1.84 / 1.59 / 1.64
    # and 1.99 against 1.64 / 1.57 / 1.55. Rows of 3-6 KiB ((16384, 4, 14,
    # 14), (8192, 8, 14, 14)) even but for the backward of the first, 2.55
    # -> 2.43. Two threads, 16 KiB: eval 0.93-0.97 of the time, backward
    # and training 0.94-1.05. Float64 (32768, 4, 7, 7) eval 1.37 -> 0.85,
    # backward 2.93 -> 2.48.
    ROWS_CALL_MIN_BYTES = 16384
    # In cache, with normal stores, only runs shorter than this. float32,
    # one thread, training / eval / backward, a call per run against a row
    # at a time: (32, 256, 36) 71 / 33 / 108 us against 66 / 29 / 92, (32,
    # 256, 49) 87 / 42 / 124 against 84 / 37 / 124; but (32, 256, 64) 86 /
    # 42 / 140 against 89 / 46 / 141, (32, 256, 81) 128 / 61 / 171 against
    # 138 / 66 / 177.
    ROW_RUNS_MAX_BYTES_IN_CACHE = 256
    # Channels whose blocks of whole runs the backward sums of a row chunk
    # walk at once, row by row in memory order, each channel's lane sums
    # carried from run to run (lane_group_grad_sums): 64 channels' lanes are
    # 16 KiB, half of L1.
    LANE_GROUP = 64
    # The two passes' group walk (bn_group_grad_sums) asks for the same runs
    # of the next row (or those after the block) as it reads them, for runs
    # of up to this many bytes (the group-tiled walk asks for runs of any
    # length). Such runs are too short for the prefetchers to learn: a
    # group's row is a few KiB, a row apart from the next. Measured on one
    # thread, backward of float32 (1024, 512, 4, 4) and (2048, 256, 4, 4),
    # 12 % faster; (512, 512, 7, 7) and (996, 256, 7, 7) even; but runs of
    # 784 bytes, (256, 256, 14, 14), 14-27 % slower with it. Up to 512 bytes
    # (it was 256), gradient sums in streaming-copy times: float32 (512,
    # 256, 10, 10) 1.95 -> 1.52, (256, 512, 11, 11) 1.97 -> 1.54; float64
    # (334, 256, 7, 7) 1.98 -> 1.63, (256, 256, 8, 8) 1.86 -> 1.62.
    GROUP_SUMS_ASK_MAX_BYTES = 512
    # In cache, row chunks of runs that a block holds at least this many of
    # take a block's rows at least (planar_geometry). Measured, chunks of
    # one row against blocks (runs under ROW_RUNS_MAX_BYTES_IN_CACHE also
    # written a row at a time), float32 training / eval / backward, one
    # thread: (32, 256, 7, 7) 192 / 40 / 179 us against 82 / 39 / 121,
    # (128, 64, 6, 6) 135 / 38 / 139 against 63 / 28 / 90, (32, 64, 14,
    # 14) 83 / 33 / 123 against 67 / 33 / 108; but runs of 28 x 28 (two a
    # block) gained in the backward only, and their eval of (64, 64, 28,
    # 28) took 1.2 times as long (its rows in step, twin_rows).
    IN_CACHE_BLOCK_MIN_RUNS = 4
    # From memory, such row chunks take a block's rows up to this many.
    # Chunks of one row (up to 64 rows, MAX_ROW_CHUNKS) made every run a
    # block: a triple and a merge per 49-value run left the statistics of
    # (64, 2048, 7, 7) at 3 streaming-copy times on one thread. Against
    # chunks of one row (or as many as 64 chunks give), time over time,
    # float32 moments / training / backward, one thread (two threads):
    #   (64, 2048, 7, 7)    0.37 / 0.50 / 0.65   (0.39 / 0.57 / 0.72)
    #   (128, 2048, 7, 7)   0.56 / 0.71 / 0.90   (0.61 / 0.78 / 0.95)
    #   (256, 1024, 7, 7)   0.76 / 0.85 / 1.00   (0.76 / 0.89 / 0.96)
    #   (64, 512, 14, 14)   0.54 / 0.71 / 0.99   (0.56 / 0.76 / 1.01)
    #   (32, 768, 17, 17)   0.61 / 0.79 / 1.00   (0.62 / 0.85 / 1.03)
    #   (384, 256, 7, 7)    0.88 / 0.91 / 0.89   (0.89 / 0.98 / 0.99)
    # float64 (64, 1024, 7, 7) 0.38 / 0.55 / 0.95 (0.38 / 0.63 / 0.87),
    # but its backward of 14 x 14 maps 0.98-1.10 on one thread (0.93-0.98
    # on two); eval 0.95-1.03. Up to 16 rows, (512, 512, 7, 7) (8 before)
    # took 1.13 times as long in the backward on one thread; up to 32,
    # (1024, 512, 4, 4) 1.17-1.20 in moments and training.
    FROM_MEMORY_BLOCK_ROWS = 8
    # Values per statistics block: 2048 float64 are 16 KiB, so a float64
    # block that needs a second (corrected) pass reads it from L1.
    BLOCK_LEN = 2048
    # Blocks per chunk when one run is long enough to be cut into chunks:
    # 64 Ki values, large enough that scheduling costs nothing, small enough
    # to balance a few channels over the threads.
    CHUNK_BLOCKS = 32
    CHUNK_VALUES = CHUNK_BLOCKS * BLOCK_LEN
    # Interleaved layout: columns per tile (a tile's per-column arrays, 4 x
    # 512 float64 and 512 triples, 28 KiB, stay in L1); row chunks are whole
    # multiples of ROW_BLOCK rows.
    COLUMN_TILE = 512
    ROW_BLOCK = 32
    # float64 columns take blocks of about this many bytes of rows (a
    # second pass, where one is needed, from L2): 64 rows of a whole tile,
    # more of a narrower one. Each block costs every column a triple and a
    # merge, with their divisions: with a second pass on every block,
    # blocks of 32 rows held (N, 64) float64 moments at 1.64 streaming-copy
    # times on one core, 128 KiB blocks at 1.02 and 256 KiB at 1.00 (0.77
    # on two threads).
    ROW_BLOCK_BYTES = 256 * 1024
    # Rows of an interleaved tile are walked in slabs of about this many
    # bytes: the register-blocked loops (tiles of up to 64 columns) pass over
    # a slab once per group of columns, and the later passes should find it
    # in L2.
    SLAB_BYTES = 256 * 1024
    # Rows wider than a tile are summed whole (sums_whole_rows: float32
    # statistics, the backward's sums) up to this width, when there are at
    # least this many row chunks a thread: fewer, and the tiles share the
    # work out better.
    WHOLE_ROWS_MAX_WIDTH = 8 * COLUMN_TILE
    WHOLE_ROWS_CHUNKS_PER_THREAD = 4
    # The flat interleaved loops keep their pattern (4 constants per column
    # of a period for the normalisation, 5 for the input gradient) in L1:
    # a period of at most 64 vectors is 4 KiB a constant. (A period is the
    # width's least common multiple with a vector, up to 16 times the width,
    # or else the width's least multiple that holds a vector.) Wider rows
    # are walked in row groups: (N, 1536) float32 eval on one thread, 1.55
    # streaming-copy times with a period of 96 vectors, 1.11 in row groups;
    # float64 (N, 768), 1.57 and 1.19; at 64 vectors the two are even.
    PERIODIC_MAX_VECTORS = 64
    # Row groups (bn_row_groups_*) read the constants of every column (5 x
    # 16384 float32 are 320 KiB) from L2; wider rows are walked by tiles, and
    # so are fewer rows than ROW_BLOCK (the table of constants would be more
    # than a sixth of the input) and fewer row chunks than threads (the
    # tiles share the work out).
    ROW_GROUPS_MAX_WIDTH = 16384
    # At most this many row chunks per column, so the chunk results kept for
    # the ordered merge stay O(C) in size.
    MAX_ROW_CHUNKS = 64
    # Up to this many values a call runs on the calling thread: waking an
    # OpenMP team costs a few microseconds, about what 64 Ki float32 values
    # take on one core. An estimate; benchmarks/compare.py's small workloads
    # are where to tune it.
    SERIAL_MAX_VALUES = 65536
    # The planar backward reads two inputs, twice, and does more arithmetic
    # per value: a team pays for itself at a quarter of the size, so its
    # values count this many times against SERIAL_MAX_VALUES
    # (backward_team_size). Float32, in cache, Zen 5, two threads against
    # one: maps of 16-51 Ki values took 0.55-0.89 of the time ((8,32,14,14)
    # 12.0 -> 6.6 us, (32,64,5,5) 16.9 -> 12.2), but 8 channels 1.03-1.10
    # ((8,8,16,16) 4.2 -> 4.6); 8-12 Ki values 0.68-0.98. Interleaved rows
    # ((256,128): 1.13) and training and eval at 25-51 Ki values (1.07-1.27,
    # but (32,64,5,5)) lost on two threads: they keep SERIAL_MAX_VALUES.
    BACKWARD_WORK_PER_VALUE = 4
    # Outputs at least this large are written with streaming stores: half of
    # this machine's 32 MiB L3, beyond which an output evicts its own input
    # before anything reads it again. Not yet tuned by a sweep
    # (_kernels.set_stream_min_bytes is the hook).
    STREAM_MIN_BYTES = 16 * 1024 * 1024
    # A chunk of a long run (planar, inner >= CHUNK_VALUES) of at least
    # this many bytes is normalised as two halves in step (twin_halves), so
    # that the halves are 16 KiB or more apart: streams closer than about
    # 6 KiB ran slower than one (benchmarks/memory_streams.c's finding).
    # Eval of (16, 8, 256, 256) float32 on one thread, 256 KiB chunks: 0.95
    # -> 1.04 of a streaming copy. Runs of a quarter of it and more are
    # paired across channels (twin_channels). Both only with streaming
    # stores: in cache one stream was as fast or faster. Eval, float32, in
    # pairs against one stream, one / two threads: (32, 32, 56, 56) and (8,
    # 128, 56, 56), 12.5 MB, 0.82 / 0.86-0.90 of the time; (1, 64, 56, 56)
    # 0.99; (2, 64, 112, 112) 0.98 / 0.97; training 0.88-0.98.
    TWIN_MIN_BYTES = 32 * 1024
    # The pipelined training forward holds two channels per thread in cache:
    # a channel of at most this many bytes is normalised from L2 (1 MiB per
    # core on Zen 4), a larger one from L3.
    PIPE_L2_SLICE = 512 * 1024
    # ... and is used only when each thread gets at least PIPE_MIN_CHANNELS
    # channels of at most PIPE_MAX_SLICE bytes. The channel count is a
    # judgement: a thread reads its first channel and normalises its last
    # one unpipelined. On Zen 4 (float32, 1 and 2 threads) channels of 0.2,
    # 0.4, 0.8 and 1.6 MB gained 15-50 % over the two passes, 3.2 MB broke
    # even, 6.4 MB lost 5-20 %. On Zen 5 (L2 1 MiB a core, L3 32 MiB),
    # forward, of a streaming copy, pipelined against two passes, interleaved
    # medians of 9-11, one / two threads: channels of 3.2 MB gain, float32
    # (16, 32, 224, 224) 0.90 / 0.85 against 0.64 / 0.64 and (256, 64, 56,
    # 56) 0.79 / 0.85 against 0.65 / 0.73, float64 (128, 128, 56, 56) 0.62 /
    # 0.83 against 0.59 / 0.70 and (8, 32, 224, 224) 0.68 / 0.77 against
    # 0.50 / 0.59; 4.0 MB too, float32 (320, 64, 56, 56) 0.78 / 0.78 against
    # 0.68 / 0.67, float64 (160, 64, 56, 56) 0.62 / 0.75 against 0.60 / 0.65.
    # Beyond that, runs decide: runs of 12.5-25 kB (56 x 56 planes) break
    # even at 4.8 MB and lose at 5.6-6.4 MB (float32 (512, 64, 56, 56) 0.65
    # / 0.73 against 0.70 / 0.75), while runs of 50 kB and more still gain
    # at 4.8-8 MB (float32 (128, 64, 112, 112) 0.81 / 0.78 against 0.73 /
    # 0.74, (40, 32, 224, 224) 0.80 / 0.74 against 0.68 / 0.60, float64 (14,
    # 32, 224, 224) 0.70 / 0.85 against 0.55 / 0.72): PIPE_MAX_SLICE_LONG_RUNS
    # for runs of PIPE_LONG_RUN_BYTES, a bound between the two (runs of
    # 25-50 kB were not measured). The backward holds x and dy, twice
    # the bytes, and takes less (PIPE_MAX_GRAD_SLICE; use_tiled_backward).
    PIPE_MIN_CHANNELS = 8
    PIPE_MAX_SLICE = 4 * 1024 * 1024
    PIPE_MAX_SLICE_LONG_RUNS = 8 * 1024 * 1024
    PIPE_LONG_RUN_BYTES = 32 * 1024
    PIPE_MAX_GRAD_SLICE = 3584 * 1024
    # ... and runs of at least PIPE_MIN_RUN_BYTES, forward and backward:
    # each run costs the pipelined loops a fixed overhead (the next runs
    # found and prefetched, a call), and the two passes walk short runs row
    # by row, front to back. Measured against the two passes, (N, 256, H,
    # W) float32 of 12.5 MB, 1 and 2 threads, in streaming-copy times:
    # runs of 196 and 400 bytes, forward 6.2-8.0 and 4.1-5.9 pipelined
    # against 2.1-2.7 and 1.9-2.2, backward 5.4-9.0 and 4.4-6.2 against
    # 4.6-6.1 and 3.9-4.7; 256 bytes even forward, slower backward; 576,
    # 784 and 1568 bytes pipelined 0-40 % faster but for the forward of
    # 784 on one thread (15 % slower); 1024 bytes mixed.
    PIPE_MIN_RUN_BYTES = 512
    # Runs that the two passes write a row at a time (rows_as_runs) need
    # more, forward and backward: measured (N, 256, H, W) float32 of 34-51
    # MB, two passes against pipelined, in streaming-copy times, forward and
    # backward, one thread: runs of 512-1024 bytes 1.9-2.9 against 2.0-3.6
    # and 3.2-3.9 against 3.8-5.1; 1536 and 1568 bytes 1.9-2.4 against
    # 2.2-2.3 and 3.1-3.3 against 3.4-4.2; on two threads 1.6-2.3 against
    # 1.6-2.5 and 2.8-3.4 against 3.1-4.9, and 1.9-2.0 against 1.9-2.2 and
    # 3.2-3.3 against 2.7-3.1.
    PIPE_MIN_ROW_RUN_BYTES = 2048
    # float64's forward (its own fused loop, then, when this was measured,
    # a second pass per block from L1 for the statistics) needs runs of 3
    # KiB: of a streaming copy,
    # (N, C, H, W) of 51-103 MB, medians of 31 in shuffled order, two runs,
    # pipelined against two passes (rerun in interleaved order:
    # benchmarks/results/pipelined_forward.py --dtype float64): on two
    # threads, runs of 2312 bytes 0.50-0.54 against 0.49-0.54, 3136
    # 0.43-0.67 against 0.43-0.53, 6272-25088 0.51-0.72 against 0.51-0.58.
    # On one thread it paid nothing on Zen 4 (3136-9800 bytes 0.41-0.49
    # against 0.42-0.52); on Zen 5 it does, at the same rule (26-103 MB,
    # interleaved, medians of 15, two runs): runs of 3200 bytes 0.69-0.72
    # against 0.53-0.56, 6272 0.66-0.71 against 0.52-0.58, 9800 0.59-0.69
    # against 0.51-0.52, 25088 0.59-0.67 against 0.57-0.58, 100352
    # 0.63-0.64 against 0.51-0.58; but 2312 bytes 0.44 against 0.52. Since
    # the second statistics pass asks for the runs ahead (second_pass_ahead),
    # two threads pay from shorter runs (medians of 31): 1568 bytes 0.87
    # against 0.69, 2048 1.06 against 0.67, 2312 0.85 against 0.65-0.69;
    # one thread still not (1568 and 2312 bytes 0.54-0.57 against
    # 0.55-0.56), nor two threads from 1152 bytes down (0.64 against 0.62,
    # 800 bytes 0.36 against 0.50).
    PIPE_MIN_RUN_BYTES_F64 = 1536
    PIPE_MIN_RUN_BYTES_F64_ONE_THREAD = 3072
    # Since a float64 block takes its second statistics pass only where its
    # shift lies far from its mean (shifted_sums_keep_digits), runs of whole
    # lines pay from 17 lines on one thread and two. Training, of a
    # streaming copy, two passes against pipelined (set_pipelined), one
    # process, interleaved medians of 15, one / two threads: (N, C, L) runs
    # of 1088 bytes (512, 256, 136) 0.64 -> 0.65 / 0.62 -> 0.80; 1152
    # (512, 256, 144) 0.62 -> 0.74 / 0.64 -> 0.90, (1024, 128, 144) 0.58
    # -> 0.66 / 0.64 -> 0.88, (128, 512, 12, 12) 0.65-0.75 -> 0.91-0.92 /
    # 0.68-0.73 -> 0.78-0.97, (256, 512, 12, 12) 0.60-0.61 -> 0.72-0.74 /
    # 0.59-0.64 -> 0.65-0.75; 1280 (512, 256, 160) 0.62 -> 0.75 / 0.66 ->
    # 0.83, (384, 256, 160) 0.61 -> 0.63 / 0.61 -> 0.77; 1536 (256, 256,
    # 192) 0.59 -> 0.67 (two threads took it already); 2048 (128, 256, 16,
    # 16) 0.60-0.61 -> 0.77-0.82, (256, 256, 16, 16) 0.55 -> 0.80. But
    # 1024 bytes (512, 256, 128) 0.64 -> 0.54 / 0.60 -> 0.47 ((256, 256,
    # 128) 0.68 -> 0.64 / 0.75 -> 0.95) and 512 (1024, 256, 8, 8) 0.59 ->
    # 0.48 / 0.61 -> 0.54. Runs that share lines stayed mixed on one thread:
    # 1568 bytes (256, 256, 14, 14) 0.61-0.63 -> 0.58-0.61, (128, 512, 14,
    # 14) 0.58-0.60 -> 0.64-0.67; 2312 (128, 256, 17, 17) 0.69 -> 0.61.
    PIPE_MIN_WHOLE_LINE_RUN_BYTES_F64 = 1088
    # The float64 backward (its own fused loop, seams and all) pays from
    # shorter runs: pipelined against two passes, of its bound, (N, C, H,
    # W) of 6-103 MB, 1 / 2 threads: runs of 2312 bytes 0.43-0.44 against
    # 0.45-0.53 / 0.60-0.62 against 0.48-0.50, 3136 0.50-0.53 against
    # 0.41-0.48 / 0.65-0.67 against 0.48-0.50, 6272-25088 0.55-0.64 against
    # 0.49-0.52 / 0.60-0.74 against 0.47-0.55; but 1568 bytes 0.37 against
    # 0.46 / 0.56 against 0.50. So from 2 KiB on two threads, 3 KiB on one.
    PIPE_MIN_GRAD_RUN_BYTES_F64 = 2048
    PIPE_MIN_GRAD_RUN_BYTES_F64_ONE_THREAD = 3072
    # In cache (normal stores), the float32 backward is tiled only on
    # two threads or more and under this size, where its one parallel region
    # costs less than the two passes' regions: two passes against the
    # pipeline, two threads, (8, 32, 14, 14) 200 kB 1.15-1.20 of the time,
    # 0.4-1.6 MB 0.82-1.05 (use_tiled_backward).
    PIPE_MAX_BACKWARD_BYTES_IN_CACHE_F32 = 256 * 1024
    # The group-tiled training backward (use_group_tiled_backward) takes
    # tiles of channels whose x and dy hold at most GROUP_TILE_BYTES, half
    # of L2, so that their dx is computed from it; a tile's rows must hold
    # GROUP_TILE_MIN_ROW_BYTES of each, and each thread at least
    # GROUP_TILE_MIN_TILES tiles.
    GROUP_TILE_BYTES = 512 * 1024
    GROUP_TILE_MIN_ROW_BYTES = 3 * 1024
    # In cache (normal stores), it pays on two threads too, in tiles of at
    # most a quarter of L2 (group_tile_channels, use_group_tiled_backward).
    GROUP_TILE_BYTES_IN_CACHE = 256 * 1024
    GROUP_TILE_MIN_TILES = 4
    # Per-channel tables of constants are filled by the team from this many
    # channels, on the calling thread below: entering a parallel region
    # costs about a microsecond, what some thousand channels' constants take.
    TABLE_PARALLEL_CHANNELS = 4096
    # Its statistics pass prefetches at least this far ahead (in whole runs):
    # one run of 3 KB ahead was too close on (64, 256, 28, 28), three 10 %
    # faster; on runs of 12.5 KB the distance made no difference.
    PIPE_AHEAD_BYTES = 8 * 1024
    # The statistics of blocks of several runs, from memory, ask for the
    # block this many blocks after each one they sum, in the order they read
    # them, in blocks of at least STATS_AHEAD_MIN_ROWS rows of runs of at
    # least STATS_AHEAD_MIN_RUN values, and chunks of several blocks a
    # channel (stats_blocks_ahead).
    STATS_RUNS_AHEAD = 6
    STATS_AHEAD_MIN_ROWS = 3
    # ... but no more blocks than hold about this many bytes, and at least
    # two: float64 read each block twice when this was measured, the second
    # time from L1.
    STATS_AHEAD_BYTES_F32 = 24 * 1024
    STATS_AHEAD_BYTES_F64 = 16 * 1024
    STATS_AHEAD_MIN_RUN = 9
    # Float64's second pass over a block computes from L1 while the memory
    # idles, so it asks for the blocks this many further on than the first
    # pass does (the pipelined walk's second_pass_ahead likewise). Measured
    # when every block took that pass, float64 training, two passes, of a
    # streaming copy, off / on, interleaved medians of 21-31, one thread:
    # (64, 512, 14, 14) 0.57-0.59 -> 0.58-0.67, (256, 512, 7, 7) 0.47-0.51
    # -> 0.58-0.60, (128, 256, 10, 10) 0.56-0.63 -> 0.62-0.70, (512, 256,
    # 5, 5) 0.48-0.55 -> 0.54-0.59; two threads: (256, 512, 7, 7)
    # 0.53-0.64 -> 0.59-0.69, (128, 256, 10, 10) 0.63-0.71 -> 0.57-0.84,
    # (512, 256, 5, 5) 0.65-0.78 -> 0.63-0.73 (one block further,
    # 0.61-0.87 on two threads but 0.49-0.63 on one; four, 0.55-0.82). A
    # block that needs no second pass asks for them all the same
    # (ask_for_runs): without / with, in-process medians of 21, one thread,
    # (256, 512, 7, 7) 0.53-0.68 -> 0.75-0.78, (128, 256, 10, 10)
    # 0.62-0.82 -> 0.65-0.85, (64, 512, 14, 14) 0.62 -> 0.66; two threads
    # (256, 512, 7, 7) 0.56-0.66 -> 0.62-0.72, (128, 256, 10, 10)
    # 0.69-0.83 -> 0.74-0.98.
    SECOND_PASS_BLOCKS_AHEAD = 2
    # Tensors of this many bytes and more ask ahead below the streaming
    # size too: beside their output (normal stores) they do not stay in
    # this machine's 32 MiB L3 from call to call. Float32 moments /
    # training, time with over time without (two builds, blocks of calls),
    # one thread (two threads): (64, 1280, 7, 7), 16 MB, 0.72-0.80 /
    # 0.61-0.73 (0.89-0.94 / 0.72-0.78); (80, 256, 14, 14), 16 MB, 0.68 /
    # 0.65 (0.91 / 0.80); (72, 256, 14, 14), 14 MB, 0.91 / 0.77 (0.88 /
    # 0.86); (64, 256, 14, 14), 12.8 MB, 0.96-1.02 / 0.73-0.83 (0.96-0.98
    # / 0.87-0.89); float64 (32, 1024, 7, 7) 1.12 / 0.88, (32, 256, 14,
    # 14) 1.06 / 0.89, (40, 256, 14, 14) 0.88 / 0.81; eval and backward
    # (which do not read ahead) 0.94-1.02. But 11-12 MB 1.01-1.11 /
    # 0.94-1.12, 8-10 MB 0.97-1.06 / 0.96-1.01, (32, 512, 7, 7), 3 MB,
    # 1.05-1.22 / 0.99-1.05.
    STATS_AHEAD_MIN_BYTES = 12 * 1024 * 1024


# --------------------------------------------------------------------------
# The statistics algebra: (count, mean, M2) triples.

cdef struct Moments:
    double count
    double mean     # an offset from the channel's origin (module docstring)
    double m2


cdef inline Moments empty_moments() noexcept nogil:
    cdef Moments m
    m.count = 0.0
    m.mean = 0.0
    m.m2 = 0.0
    return m


cdef inline void merge_moments(Moments *acc, Moments part) noexcept nogil:
    """Chan et al.'s pairwise update: acc <- acc merged with part."""
    cdef double n, delta
    if part.count == 0.0:
        return
    if acc.count == 0.0:
        acc[0] = part
        return
    n = acc.count + part.count
    delta = part.mean - acc.mean
    acc.mean = acc.mean + delta * (part.count / n)
    acc.m2 = acc.m2 + part.m2 + delta * delta * (acc.count * part.count / n)
    acc.count = n


cdef inline Moments moments_from_shifted_sums(double count, double offset,
                                              double s1, double s2) noexcept nogil:
    """The triple given s1 = sum(d) and s2 = sum(d^2), d = x - origin - offset.

    M2 = s2 - s1^2 / n is the corrected two-pass formula: it cannot cancel
    badly because origin + offset lies inside the data, so s1 is small
    against s2.
    """
    cdef Moments m
    m.count = count
    m.mean = offset + s1 / count
    m.m2 = s2 - s1 * s1 / count
    if m.m2 < 0.0:      # rounding only; a NaN fails the test and stays NaN
        m.m2 = 0.0
    return m


cdef inline void clear_lanes(double *a, double *b) noexcept nogil:
    """Zero two lane arrays: a new block's sums."""
    cdef int k
    for k in range(BN_LANES):
        a[k] = 0.0
        b[k] = 0.0


cdef inline bint shifted_sums_keep_digits(double count, double s1, double s2) noexcept nogil:
    """Whether one pass of sums of d = x - shift, s1 = sum(d) and s2 =
    sum(d^2) over count values, gives float64 data their variance to
    float64's precision: when s1^2 / count, the part of s2 that the
    corrected formula takes away, is at most 16/17 of s2. That is, the
    shift lies within 4 standard deviations of the mean, the subtraction
    cancels at most 4 bits (s2 <= 17 M2), and M2's rounding error grows by
    at most about that factor over a second pass's (tests/test_numerics.py
    holds it within 2e-14 of exactly rounded sums). Else a second pass
    around the mean is needed. NaN sums fail the test (and take the second
    pass, which keeps them NaN)."""
    return 17.0 * (s1 * (s1 / count)) <= 16.0 * s2


cdef inline void runs_shifted_sums(const floating *x, Py_ssize_t nruns, Py_ssize_t stride,
                                   Py_ssize_t n, double origin, double offset,
                                   Py_ssize_t ahead_bytes, double *s1, double *s2) noexcept nogil:
    """s1 and s2 of (x - origin) - offset over nruns runs of n contiguous
    values, stride apart, in one pass of lane sums over the runs in order,
    asking for each run's bytes ahead_bytes on as it goes (0: none)."""
    if floating is float:
        bn_block_shifted_sums_f32(x, nruns, stride, n, origin, offset, ahead_bytes, s1, s2)
    else:
        bn_block_shifted_sums_f64(x, nruns, stride, n, origin, offset, ahead_bytes, s1, s2)


cdef inline void ask_for_runs(const floating *x, Py_ssize_t nruns, Py_ssize_t stride,
                              Py_ssize_t n, Py_ssize_t ahead_bytes) noexcept nogil:
    """Ask for what a pass over nruns runs of n values with ahead_bytes
    (runs_shifted_sums) would, without the pass."""
    cdef Py_ssize_t r
    if ahead_bytes <= 0:
        return
    for r in range(nruns):
        bn_prefetch_span(<uintptr_t>(x + r * stride) + <uintptr_t>ahead_bytes,
                         n * <Py_ssize_t>sizeof(floating))


cdef Moments shifted_runs_moments(const floating *x, Py_ssize_t nruns, Py_ssize_t stride,
                                  Py_ssize_t n, double origin, double offset,
                                  Py_ssize_t ahead_bytes) noexcept nogil:
    """The triple of nruns runs of n contiguous values from their
    runs_shifted_sums."""
    cdef double s1 = 0.0, s2 = 0.0
    runs_shifted_sums(x, nruns, stride, n, origin, offset, ahead_bytes, &s1, &s2)
    return moments_from_shifted_sums(<double>(nruns * n), offset, s1, s2)


cdef Moments moments_after_first_pass(const floating *x, Py_ssize_t nruns, Py_ssize_t stride,
                                      Py_ssize_t n, double origin, double s1, double s2,
                                      Py_ssize_t second_ahead_bytes) noexcept nogil:
    """The triple of a block (as block_moments) from its first pass's sums s1,
    s2 of x - origin: float64's second pass where they did not keep their
    digits; where they did, what that pass would have asked for is still
    asked for (second_ahead_bytes on), as the memory would idle without.
    Float64 training, of a streaming copy, in-process medians of 21, one
    thread, with a second pass on every block / none and nothing asked /
    none and the runs asked: (64, 256, 28, 28) 0.84 / 0.77 / 0.90, (32,
    192, 35, 35) 0.74 / 0.74 / 0.86, (128, 128, 56, 56) 0.58 / 0.65 / 0.66
    (the pipelined walk; the two passes' figures are at
    SECOND_PASS_BLOCKS_AHEAD)."""
    cdef double count = <double>(nruns * n)
    cdef Moments m = moments_from_shifted_sums(count, 0.0, s1, s2)
    if floating is double:
        if shifted_sums_keep_digits(count, s1, s2):
            ask_for_runs(x, nruns, stride, n, second_ahead_bytes)
        else:
            m = shifted_runs_moments(x, nruns, stride, n, origin, m.mean, second_ahead_bytes)
    return m


cdef Moments block_moments(const floating *x, Py_ssize_t nruns, Py_ssize_t stride,
                           Py_ssize_t n, double origin, Py_ssize_t ahead_bytes=0,
                           Py_ssize_t second_ahead_bytes=0) noexcept nogil:
    """The triple of a block, nruns runs of n contiguous values stride apart
    (one piece of a run: nruns = 1), its mean an offset from ``origin``;
    ahead_bytes as runs_shifted_sums, for the pass that reads memory,
    and second_ahead_bytes for float64's second pass.

    For float32 input one pass of float64 sums of x - origin is exact
    enough: the accumulators have 29 bits to spare. So is it for float64
    input whose origin lies near the block's mean (shifted_sums_keep_digits);
    else a second pass around the first pass's mean (from L1: a block is at
    most BLOCK_LEN values) makes it as accurate as a two-pass algorithm. A
    constant block gives M2 = 0 exactly, since every shifted value is
    exactly 0.
    """
    cdef double s1 = 0.0, s2 = 0.0
    runs_shifted_sums(x, nruns, stride, n, origin, 0.0, ahead_bytes, &s1, &s2)
    return moments_after_first_pass(x, nruns, stride, n, origin, s1, s2, second_ahead_bytes)


cdef struct StatsOut:
    # Where a statistics pass stores each channel's results.
    double eps
    double *mean        # float64 mean
    double *residual    # origin + offset - mean, for the exact split; or NULL
    double *m2          # sum of squared deviations
    double *invstd      # 1 / sqrt(m2 / count + eps); or NULL


cdef struct Params:
    # A per-channel array as the caller keeps it, float32 or float64, so that
    # nothing is converted before a call; or absent (data NULL).
    const void *data
    bint single


cdef inline double param_at(Params p, Py_ssize_t c, double missing) noexcept nogil:
    if p.data == NULL:
        return missing
    if p.single:
        return (<const float *>p.data)[c]
    return (<const double *>p.data)[c]


cdef struct AffineIn:
    # What a normalization pass reads per channel: the batch statistics
    # (mean, residual, invstd) when mean is not NULL, else the running ones.
    const double *mean
    const double *residual    # or NULL
    const double *invstd
    Params running_mean
    Params running_var
    double eps
    Params weight             # absent: 1
    Params bias               # absent: 0
    int relu                  # y = max(y, 0)
    const void *gate          # or NULL; else y = gate where the affine output >
                              # gate_above, else 0: the backward of a fused relu
                              # (gate = dy)
    double gate_above
    int stream                # write the output with streaming stores
    const void *constants     # or NULL; else affine_params' results per channel,
                              # (hi, lo, scale, shift) of the input type


cdef inline double channel_origin(const floating *x, Py_ssize_t c,
                                  Py_ssize_t inner) noexcept nogil:
    """The first value of channel c, in either loop order."""
    return x[c * inner]


cdef inline void finish_channel(Moments m, double origin, Py_ssize_t c,
                                const StatsOut *out) noexcept nogil:
    """Store channel c's statistics; the residual is what the float64 mean
    could not hold of origin + offset."""
    out.mean[c] = origin + m.mean
    if out.residual != NULL:
        out.residual[c] = (origin - out.mean[c]) + m.mean
    out.m2[c] = m.m2
    if out.invstd != NULL:
        out.invstd[c] = 1.0 / sqrt(m.m2 / m.count + out.eps)


cdef inline void affine_params(const AffineIn *a, Py_ssize_t c, floating *hi, floating *lo,
                               floating *scale, floating *shift) noexcept nogil:
    """The per-channel constants of y = ((x - hi) - lo) * scale + shift.

    hi + lo is the mean (plus its residual, when known) split into two values
    of the input type, so the subtraction keeps the mean's low bits
    (bn_affine in _leaf_loops_impl.h).
    """
    cdef double w, b, extra, mean, invstd
    cdef const floating *known
    if a.constants != NULL:
        known = <const floating *>a.constants + 4 * c
        hi[0] = known[0]
        lo[0] = known[1]
        scale[0] = known[2]
        shift[0] = known[3]
        return
    w = param_at(a.weight, c, 1.0)
    b = param_at(a.bias, c, 0.0)
    extra = 0.0 if a.residual == NULL else a.residual[c]
    if a.mean != NULL:
        mean = a.mean[c]
        invstd = a.invstd[c]
    else:
        mean = param_at(a.running_mean, c, 0.0)
        invstd = 1.0 / sqrt(param_at(a.running_var, c, 1.0) + a.eps)
    hi[0] = <floating>mean
    lo[0] = <floating>((mean - <double>hi[0]) + extra)
    scale[0] = <floating>(w * invstd)
    shift[0] = <floating>b


cdef void *affine_table(const floating *x, const AffineIn *a, Py_ssize_t channels,
                        int nthreads) noexcept nogil:
    """Every channel's affine_params, computed once for a pass that would
    compute them run by run (eval: a division and a square root each, 16 %
    of eval of (512, 512, 7, 7) float32); NULL where memory is short, and
    the pass computes them per run, with the same bits. (x only names the
    type.)"""
    cdef floating *table = <floating *>malloc(4 * channels * sizeof(floating))
    cdef Py_ssize_t c
    if table == NULL:
        return NULL
    if nthreads == 1 or channels < TABLE_PARALLEL_CHANNELS:
        for c in range(channels):
            affine_params(a, c, table + 4 * c, table + 4 * c + 1, table + 4 * c + 2,
                          table + 4 * c + 3)
    else:
        for c in prange(channels, num_threads=nthreads, schedule="static"):
            affine_params(a, c, table + 4 * c, table + 4 * c + 1, table + 4 * c + 2,
                          table + 4 * c + 3)
    return table


cdef Py_ssize_t serial_max_values = SERIAL_MAX_VALUES


cdef inline bint may_take_team(Py_ssize_t nvalues) noexcept nogil:
    """Whether a call of nvalues values (as team_size counts them) is past
    the serial threshold."""
    return nvalues > serial_max_values


cdef inline int team_size(int requested, Py_ssize_t nitems, Py_ssize_t nvalues) noexcept nogil:
    if not may_take_team(nvalues) or nitems < 2 or requested < 2:
        return 1
    if requested > nitems:
        return <int>nitems
    return requested


cdef inline int backward_team_size(int requested, Py_ssize_t nitems,
                                   Py_ssize_t nvalues) noexcept nogil:
    return team_size(requested, nitems, BACKWARD_WORK_PER_VALUE * nvalues)


# --------------------------------------------------------------------------
# Planar order: channel c is `outer` runs of `inner` values, C * inner apart.
#
# A block is at most BLOCK_LEN values of one channel: a piece of one run
# (runs longer than BLOCK_LEN), or the whole runs of up to runs_per_block
# consecutive rows of a chunk (shorter runs), whose lane sums run on from one
# run to the next, so that a 49-value run costs no more than its reads. A
# chunk of a channel is either the whole runs of a range of rows or a range
# of pieces of one run (runs of CHUNK_VALUES or more); its triple is its
# blocks merged in row, then piece order. Channel c's statistics are its
# chunks merged in order. Work items are either one chunk of a group of
# channels (row chunks: walked row by row across the channels, in memory
# order, where every block is one run, else channel by channel) or one
# chunk of one channel; the pipelined forward does the same arithmetic.

cdef struct Planar:
    Py_ssize_t outer
    Py_ssize_t channels
    Py_ssize_t inner
    Py_ssize_t pieces_per_run
    Py_ssize_t runs_per_block       # rows per block of whole runs (1 with pieces)
    Py_ssize_t rows_per_chunk       # > 0: a chunk is whole runs of these rows
    Py_ssize_t pieces_per_chunk     # > 0: a chunk is pieces of one run
    Py_ssize_t chunks_per_run       # with pieces_per_chunk
    Py_ssize_t chunks_per_channel


cdef struct Span:
    # Rows [n0, n1) and, in each of them, pieces [p0, p1) of the run.
    Py_ssize_t n0
    Py_ssize_t n1
    Py_ssize_t p0
    Py_ssize_t p1


cdef inline bint few_rows(Py_ssize_t outer, Py_ssize_t inner, Py_ssize_t factor) noexcept nogil:
    """Whether `outer` rows of runs of inner values are few rows of short
    runs (FEW_ROWS_F32, FEW_ROWS_F64 as `factor`): walked as runs
    (planar_order), in one row chunk (planar_geometry)."""
    return inner < PLANAR_MIN_INNER and outer * factor < inner


cdef Planar planar_geometry(Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner,
                            Py_ssize_t itemsize) noexcept nogil:
    cdef Planar g
    cdef Py_ssize_t least_rows
    g.outer = outer
    g.channels = channels
    g.inner = inner
    g.pieces_per_run = (inner + BLOCK_LEN - 1) // BLOCK_LEN
    g.runs_per_block = max(<Py_ssize_t>1, BLOCK_LEN // max(inner, <Py_ssize_t>1))
    if inner >= CHUNK_VALUES:
        g.rows_per_chunk = 0
        g.pieces_per_chunk = CHUNK_BLOCKS
        g.chunks_per_run = (g.pieces_per_run + CHUNK_BLOCKS - 1) // CHUNK_BLOCKS
        g.chunks_per_channel = outer * g.chunks_per_run
    else:
        # As many row chunks as MAX_ROW_CHUNKS allows: the chunk table stays
        # O(C) and there are rows enough to share among threads; but short
        # runs in few rows (planar_order's float32 rule, FEW_ROWS_F32, for
        # either type) take one chunk, as rows across channels do: a triple
        # per row would make the table a third of such an input.
        g.rows_per_chunk = (outer + MAX_ROW_CHUNKS - 1) // MAX_ROW_CHUNKS
        if few_rows(outer, inner, FEW_ROWS_F32):
            g.rows_per_chunk = outer
        elif g.runs_per_block >= IN_CACHE_BLOCK_MIN_RUNS:
            # A chunk of short runs holds at least a block of them in cache,
            # FROM_MEMORY_BLOCK_ROWS rows of them from memory: chunks of one
            # row made each run a block of its own, a triple and a merge per
            # run (IN_CACHE_BLOCK_MIN_RUNS, FROM_MEMORY_BLOCK_ROWS).
            least_rows = g.runs_per_block
            if streamed_size(outer * channels * inner * itemsize):
                least_rows = min(least_rows, FROM_MEMORY_BLOCK_ROWS)
            g.rows_per_chunk = max(g.rows_per_chunk, min(least_rows, outer))
        g.pieces_per_chunk = 0
        g.chunks_per_run = 0
        g.chunks_per_channel = (outer + g.rows_per_chunk - 1) // g.rows_per_chunk
    return g


cdef inline Span chunk_span(const Planar *g, Py_ssize_t k) noexcept nogil:
    cdef Span s
    if g.rows_per_chunk > 0:
        s.n0 = k * g.rows_per_chunk
        s.n1 = min(s.n0 + g.rows_per_chunk, g.outer)
        s.p0 = 0
        s.p1 = g.pieces_per_run
    else:
        s.n0 = k // g.chunks_per_run
        s.n1 = s.n0 + 1
        s.p0 = (k % g.chunks_per_run) * g.pieces_per_chunk
        s.p1 = min(s.p0 + g.pieces_per_chunk, g.pieces_per_run)
    return s


cdef inline Py_ssize_t run_start(const Planar *g, Py_ssize_t n, Py_ssize_t c) noexcept nogil:
    return (n * g.channels + c) * g.inner


cdef inline Py_ssize_t pieces_end(const Planar *g, Py_ssize_t p1) noexcept nogil:
    return min(p1 * BLOCK_LEN, g.inner)


cdef inline int row_groups(const Planar *g, int nthreads) noexcept nogil:
    """Channel groups per row chunk: enough items for every thread. Any
    number gives the same results; it only shapes the work."""
    cdef Py_ssize_t wanted = 4 * nthreads
    if nthreads < 2 or g.chunks_per_channel >= wanted:
        return 1
    return <int>min(g.channels, (wanted + g.chunks_per_channel - 1) // g.chunks_per_channel)


cdef inline void group_channels(const Planar *g, Py_ssize_t group, int ngroups,
                                Py_ssize_t *c0, Py_ssize_t *c1) noexcept nogil:
    c0[0] = group * g.channels // ngroups
    c1[0] = (group + 1) * g.channels // ngroups


cdef inline void run_moments(const floating *run, const Planar *g, Py_ssize_t p0,
                             Py_ssize_t p1, double origin, Moments *acc) noexcept nogil:
    cdef Py_ssize_t p, start
    for p in range(p0, p1):
        start = p * BLOCK_LEN
        merge_moments(acc, block_moments(run + start, 1, 0,
                                         min(<Py_ssize_t>BLOCK_LEN, g.inner - start), origin))


cdef inline void run_affine(const floating *x, floating *y, Py_ssize_t start, Py_ssize_t n,
                            const AffineIn *a, Py_ssize_t c) noexcept nogil:
    """The n values from x[start] of channel c into y[start]."""
    cdef floating hi = 0, lo = 0, scale = 0, shift = 0
    cdef const floating *gate = <const floating *>a.gate
    affine_params(a, c, &hi, &lo, &scale, &shift)
    if gate != NULL:
        if floating is float:
            bn_relu_gate_f32(x + start, gate + start, y + start, n, hi, lo, scale, shift,
                             <float>a.gate_above, a.stream)
        else:
            bn_relu_gate_f64(x + start, gate + start, y + start, n, hi, lo, scale, shift,
                             a.gate_above, a.stream)
    elif floating is float:
        bn_affine_f32(x + start, y + start, n, hi, lo, scale, shift, a.relu, a.stream)
    else:
        bn_affine_f64(x + start, y + start, n, hi, lo, scale, shift, a.relu, a.stream)


cdef inline Py_ssize_t block_rows(const Planar *g, Py_ssize_t n, Py_ssize_t n1) noexcept nogil:
    """The rows of the block of whole runs that begins at row n of a chunk
    ending before row n1."""
    return min(g.runs_per_block, n1 - n)


cdef inline Py_ssize_t block_end_at(const Planar *g, Py_ssize_t n, Span s) noexcept nogil:
    """The rows of the block of whole runs of chunk s that ends at row n, or
    0 where the block goes on, as block_rows cuts them: blocks of
    runs_per_block rows from the chunk's first row, the last one short."""
    cdef Py_ssize_t done = (n - s.n0) % g.runs_per_block + 1
    return done if done == g.runs_per_block or n + 1 == s.n1 else 0


cdef inline bint one_run_blocks(const Planar *g) noexcept nogil:
    """Whether every block of a row chunk is (a piece of) one run: runs of
    more than half a block, or chunks of one row. Row chunks then are walked
    row by row across their channels, in memory order, as they were before
    blocks of several runs: channel by channel measured 15 % slower on
    (64, 256, 28, 28) float32 moments, one thread. ((64, 512, 14, 28), also
    measured so then, now takes chunks of five rows: FROM_MEMORY_BLOCK_ROWS.)"""
    return g.runs_per_block == 1 or g.rows_per_chunk == 1


cdef Py_ssize_t stats_runs_ahead = STATS_RUNS_AHEAD    # set_stats_runs_ahead


cdef inline Py_ssize_t stats_blocks_ahead(const Planar *g, Py_ssize_t itemsize) noexcept nogil:
    """How many blocks ahead, in the order they are read, the statistics of
    blocks of several runs ask for memory (block_ahead places them):
    STATS_RUNS_AHEAD, for tensors read from memory (streamed, or of
    STATS_AHEAD_MIN_BYTES and more); 0 (none) in cache, where it measured
    5-10 % slower.

    A channel's block reads a run from each of its rows, a row apart, and
    the next channel the runs just after them: as many streams as the
    block has rows, each a few lines long per channel. The prefetchers did
    not run ahead of them: float32 (512, 512, 7, 7) moments, one thread,
    took 2.0 streaming-copy times, reading at 12 GB/s. Asked for k runs
    ahead (the next channels' runs of the same rows), in copy-times, one
    thread, Zen 5 (k = 0, 2, 4, 6, 8, 12, 16):
      (512, 512, 7, 7)    2.00 1.22 0.99 0.92 0.91 0.95 0.97
      (256, 256, 14, 14)  2.11 0.72 0.59 0.58 0.61 0.63 0.64
      (1024, 512, 4, 4)   1.69 1.58 1.38 1.29 1.29 1.30 1.35
      (1024, 256, 5, 5)   1.73 1.34 1.24 1.27 1.26 1.28 1.23
    On two threads, k = 6: 1.27 -> 0.63, 1.26 -> 0.45, 1.03 -> 0.97,
    1.01 -> 0.92. Float64, one thread: (512, 256, 7, 7) 2.27 -> 1.48,
    (256, 128, 14, 14) 1.85 -> 1.09, (1024, 256, 4, 4) 2.61 -> 2.19.
    Float32 (256, 128, 20, 20), blocks of 4 rows: 0.86 -> 0.56; float64
    (512, 64, 20, 20), 5 rows: 1.62 -> 1.39. Blocks of three rows (129-192
    rows: chunks of three), float32 moments, one / two threads, time over
    time: (167, 256, 14, 14) 0.32 / 0.37, (180, 128, 22, 22) 0.25 / 0.31,
    (170, 128, 17, 17) 0.31 / 0.43, (167, 1024, 7, 7) 0.63 / 0.59. Runs
    of 9-15 values (3 x 3 to 3 x 5 maps), once measured no faster with it
    (1.00-1.07 of the time without), are asked for ahead too since the
    walk goes block by block: float32 moments, one / two threads, (682,
    1024, 3, 4) 0.88 / 0.85, (546, 1024, 3, 5) 0.83 / 0.82, (910, 1024, 3,
    3) 0.90 / 0.95; capped to AVX2, which reads all of them as runs,
    (3640, 256, 3, 3) 0.52, (65536, 8, 3, 4) 0.61, (116508, 8, 3, 3) 0.87
    (one thread). Where it is not asked for, it did not pay: chunks of one
    block of two rows, two streams the prefetchers follow, 0.92-1.21
    (float32 32 x 32 maps 1.06-1.21, 22 x 22 1.00, 17 x 17 0.92-0.98;
    float64 16 x 16 1.05, 17 x 17 0.99; on Zen 5 (96, 256, 28, 28) 1.10,
    (128, 1024, 7, 7) 0.98 / 1.19). (100, 256, 20, 20), listed here once at
    0.81 / 0.76 (a gain), now takes chunks of five rows
    (FROM_MEMORY_BLOCK_ROWS) and is asked for ahead.

    Chunks of several blocks a channel (few channels, many rows) turn back
    at the end of each block's rows, which the prefetchers did not follow
    either, blocks of two rows included. Asked for the blocks 6 ahead in
    the order read, the next block's rows once past the last channel,
    float32 moments in copy-times, 1 / 2 threads: (4096, 4, 28, 28) 1.37
    / 0.93 -> 0.72 / 0.51, (2048, 8, 28, 28) 0.99 / 0.69 -> 0.69 / 0.51,
    (32768, 8, 7, 7) 1.81 / 1.09 -> 0.71 / 0.46, (8192, 8, 14, 14) 1.40 ->
    0.65 one thread; float64 (2048, 4, 28, 28) 1.49 -> 1.07. Chunks of
    one block of two rows, asked for the same way: (128, 128, 28, 28) 0.66
    / 0.42 -> 0.60 / 0.45, (512, 32, 28, 28) 0.72 / 0.46 -> 0.63 / 0.48.

    Fewer than 6 where blocks are long: at most as many as hold
    STATS_AHEAD_BYTES_F32 (F64), at least two. Float64 moments of (256,
    128, 14, 14), blocks of 4 runs of 1568 bytes, took 0.42 ns a value six
    blocks ahead and 0.20 two ahead (one thread, its AVX-512 lane loops);
    (200, 128, 16, 16) 0.22 -> 0.20, (4096, 16, 7, 7) 0.30 -> 0.24; float32
    (256, 128, 20, 20) 0.081 -> 0.076 three ahead, (4096, 4, 28, 28) 0.114
    -> 0.102; where six fit, the same."""
    cdef Py_ssize_t nbytes = g.outer * g.channels * g.inner * itemsize
    if (stats_runs_ahead <= 0 or g.inner < STATS_AHEAD_MIN_RUN
            or not (streamed_size(nbytes) or nbytes >= STATS_AHEAD_MIN_BYTES)):
        return 0
    if (min(g.runs_per_block, g.rows_per_chunk) < STATS_AHEAD_MIN_ROWS
            and g.rows_per_chunk <= g.runs_per_block):
        return 0
    return min(stats_runs_ahead, max(<Py_ssize_t>2, (
        STATS_AHEAD_BYTES_F32 if itemsize == sizeof(float) else STATS_AHEAD_BYTES_F64) // (
        min(g.runs_per_block, g.rows_per_chunk) * g.inner * itemsize)))


cdef inline Py_ssize_t block_ahead(const Planar *g, Py_ssize_t c, Py_ssize_t c0,
                                   Py_ssize_t c1, Py_ssize_t nrows,
                                   Py_ssize_t blocks) noexcept nogil:
    """How many values after channel c's block of nrows rows starts the one
    read `blocks` blocks later by a walk of channels [c0, c1) block by
    block (planar_rows_moments), taking the next blocks to be nrows rows
    too: always ahead, within the current rows or past them."""
    cdef Py_ssize_t later = c - c0 + blocks
    cdef Py_ssize_t width = c1 - c0
    return ((later // width) * nrows * g.channels + c0 + later % width - c) * g.inner


cdef Moments planar_chunk_moments(const floating *x, const Planar *g, Py_ssize_t c,
                                  Py_ssize_t k) noexcept nogil:
    """Chunk k of channel c, pieces of one long run (row chunks are
    planar_rows_moments')."""
    cdef Moments acc = empty_moments()
    cdef Span s = chunk_span(g, k)
    cdef double origin = channel_origin(x, c, g.inner)
    cdef Py_ssize_t n
    for n in range(s.n0, s.n1):
        run_moments(x + run_start(g, n, c), g, s.p0, s.p1, origin, &acc)
    return acc


cdef void planar_rows_moments(const floating *x, const Planar *g, Py_ssize_t item, int ngroups,
                              Moments *table) noexcept nogil:
    """Item `item` of the row chunks: chunk k of a group of channels, into
    the chunk table (channel c's chunk k at c * chunks_per_channel + k)."""
    cdef Py_ssize_t k = item // ngroups
    cdef Py_ssize_t nchunks = g.chunks_per_channel
    cdef Span s = chunk_span(g, k)
    cdef Py_ssize_t n, c, nrows, ahead, ahead_bytes, second_ahead_bytes, c0 = 0, c1 = 0
    group_channels(g, item % ngroups, ngroups, &c0, &c1)
    for c in range(c0, c1):
        table[c * nchunks + k] = empty_moments()
    if one_run_blocks(g):
        # Row by row across the channels, in memory order.
        for n in range(s.n0, s.n1):
            for c in range(c0, c1):
                run_moments(x + run_start(g, n, c), g, s.p0, s.p1,
                            channel_origin(x, c, g.inner), &table[c * nchunks + k])
        return
    # Blocks of several runs: a block's rows across the channels, then the
    # next block's, as near memory order as blocks allow; each channel's
    # blocks merged in row order from the first, the order the pipelined
    # walk merges them in (so its bits). Taken channel by channel, a chunk
    # of several blocks a channel (few channels, many rows) was read as
    # short runs a row apart: float32 (4096, 4, 28, 28) moments took 2.1
    # streaming-copy times on one thread, 1.4 block by block, 0.7 with
    # blocks asked for ahead (stats_blocks_ahead).
    ahead = stats_blocks_ahead(g, sizeof(floating))
    n = s.n0
    while n < s.n1:
        nrows = block_rows(g, n, s.n1)
        for c in range(c0, c1):
            ahead_bytes = second_ahead_bytes = 0
            if ahead > 0:
                ahead_bytes = block_ahead(g, c, c0, c1, nrows, ahead) * sizeof(floating)
                if floating is double:
                    second_ahead_bytes = sizeof(floating) * block_ahead(
                        g, c, c0, c1, nrows, ahead + SECOND_PASS_BLOCKS_AHEAD)
            merge_moments(&table[c * nchunks + k],
                          block_moments(x + run_start(g, n, c), nrows, g.channels * g.inner,
                                        g.inner, channel_origin(x, c, g.inner), ahead_bytes,
                                        second_ahead_bytes))
        n = n + nrows


cdef inline bint planar_order(Py_ssize_t outer, Py_ssize_t nvalues, Py_ssize_t inner,
                              Py_ssize_t itemsize, Py_ssize_t short_rows_max_bytes) noexcept nogil:
    """Whether a tensor of nvalues in `outer` rows of runs of inner values is
    walked as runs (PLANAR_MIN_INNER; in few rows, FEW_ROWS_F32 and _F64;
    from memory, PLANAR_MIN_INNER_F32 and _F64, and with AVX-512 float32
    runs under PLANAR_MIN_INNER_IN_CACHE in rows of at most
    short_rows_max_bytes as rows: SHORT_RUN_ROWS_MAX_BYTES, the
    normalisation's NORMALIZE_SHORT_RUN_ROWS_MAX_BYTES), else as rows
    across channels."""
    if inner >= PLANAR_MIN_INNER:
        return True
    if few_rows(outer, inner, FEW_ROWS_F32 if itemsize == sizeof(float) else FEW_ROWS_F64):
        return True
    if not streamed_size(nvalues * itemsize):
        # In cache, such runs are written a row at a time (rows_as_runs,
        # AVX-512), with their statistics in blocks of whole runs.
        return bn_periodic_lanes(itemsize) != 0 and inner >= PLANAR_MIN_INNER_IN_CACHE
    if itemsize != sizeof(float):
        return inner >= PLANAR_MIN_INNER_F64
    if (bn_periodic_lanes(itemsize) != 0 and inner < PLANAR_MIN_INNER_IN_CACHE
            and nvalues // outer * itemsize <= short_rows_max_bytes):
        return False
    return inner >= PLANAR_MIN_INNER_F32


cdef inline bint runs_share_lines(const Planar *g, Py_ssize_t itemsize) noexcept nogil:
    """Whether runs are not whole 64-byte lines, so that each run's first
    and last lines are shared with its neighbours'."""
    return g.inner * itemsize % BN_LINE_BYTES != 0


cdef inline bint can_pair(const AffineIn *a, Py_ssize_t itemsize) noexcept nogil:
    """Whether the normalisation may write two runs in step
    (run_affine_twin): AVX-512 here, and no relu gate."""
    return a.gate == NULL and bn_periodic_lanes(itemsize) != 0


cdef inline Py_ssize_t odd_at_most(Py_ssize_t k) noexcept nogil:
    """The largest odd number up to k, or 0: two streams an odd number of
    rows, channels or lines apart are not a large power of two apart."""
    return k - (k % 2 == 0) if k > 0 else 0


cdef inline Py_ssize_t twin_rows(const Planar *g, Py_ssize_t nrows, Py_ssize_t itemsize,
                                  const AffineIn *a) noexcept nogil:
    """How many rows apart run_affine_twin pairs the runs of nrows rows, or
    0 to take them one at a time: about half of them, odd, and only where
    both runs' lines start at the same index (rows of whole lines)."""
    if not can_pair(a, itemsize) or g.channels * g.inner * itemsize % BN_LINE_BYTES:
        return 0
    return odd_at_most(nrows // 2)


cdef inline Py_ssize_t twin_halves(Py_ssize_t length, Py_ssize_t itemsize,
                                   const AffineIn *a) noexcept nogil:
    """How far apart run_affine_twin takes the two halves of a run of
    length values, or 0 for one stream: an odd number of lines of about
    half the run, for streamed runs of at least twin_min_bytes
    (TWIN_MIN_BYTES). The values after the second half (under four lines)
    are left to run_affine."""
    if not (can_pair(a, itemsize) and a.stream) or length * itemsize < twin_min_bytes:
        return 0
    return odd_at_most(length * itemsize // (2 * BN_LINE_BYTES)) * BN_LINE_BYTES // itemsize


cdef inline void run_affine_twin(const floating *x, floating *y, Py_ssize_t start,
                                 Py_ssize_t apart, Py_ssize_t n, const AffineIn *a,
                                 Py_ssize_t c, Py_ssize_t c2) noexcept nogil:
    """run_affine of the run of channel c at start and that of channel c2
    at start + apart, in step."""
    cdef floating p[4]
    cdef floating q[4]
    affine_params(a, c, &p[0], &p[1], &p[2], &p[3])
    affine_params(a, c2, &q[0], &q[1], &q[2], &q[3])
    if floating is float:
        bn_affine_twin_f32(x + start, y + start, apart, n, p, q, a.relu, a.stream)
    else:
        bn_affine_twin_f64(x + start, y + start, apart, n, p, q, a.relu, a.stream)


cdef void planar_chunk_affine(const floating *x, floating *y, const Planar *g, Py_ssize_t c,
                              Py_ssize_t k, const AffineIn *a) noexcept nogil:
    """Normalise chunk k of channel c, its two halves in step where
    twin_halves allows."""
    cdef Span s = chunk_span(g, k)
    cdef Py_ssize_t n, start, first = s.p0 * BLOCK_LEN
    cdef Py_ssize_t length = pieces_end(g, s.p1) - first
    cdef Py_ssize_t half = twin_halves(length, sizeof(floating), a)
    for n in range(s.n0, s.n1):
        start = run_start(g, n, c) + first
        if half > 0:
            run_affine_twin(x, y, start, half, half, a, c, c)
            run_affine(x, y, start + 2 * half, length - 2 * half, a, c)
        else:
            run_affine(x, y, start, length, a, c)
    if a.stream:
        bn_stream_fence()


cdef inline Py_ssize_t twin_channels(const Planar *g, Py_ssize_t nchannels,
                                     Py_ssize_t itemsize, const AffineIn *a) noexcept nogil:
    """How many channels apart the runs of one row are paired (the rows
    twin_rows leaves alone: all of them in chunks of one row, N <= 64), or
    0: about half the channels, odd, where streamed runs are whole lines of
    at least twin_min_bytes / 4. Measured on one thread, float32 eval: runs
    of 12.5 KB (64, 128, 56, 56) 7 % faster, 6.3 KB 6 % slower, 3.1 KB
    (64, 256, 28, 28) 8-28 % slower; in cache slower (TWIN_MIN_BYTES)."""
    if (not (can_pair(a, itemsize) and a.stream) or runs_share_lines(g, itemsize)
            or g.inner * itemsize < twin_min_bytes // 4):
        return 0
    return odd_at_most(nchannels // 2)


cdef void planar_row_affine(const floating *x, floating *y, const Planar *g, Py_ssize_t n,
                            Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t apart,
                            const AffineIn *a) noexcept nogil:
    """Normalise row n's runs of channels [c0, c1): channels c and c + apart
    in step (apart > 0; blocks of 2 * apart channels), the rest alone."""
    cdef Py_ssize_t c = c0, j
    if apart > 0:
        while c + 2 * apart <= c1:
            for j in range(c, c + apart):
                run_affine_twin(x, y, run_start(g, n, j), apart * g.inner, g.inner, a, j,
                                j + apart)
            c = c + 2 * apart
    for j in range(c, c1):
        run_affine(x, y, run_start(g, n, j), g.inner, a, j)


cdef Py_ssize_t rows_call_min_bytes = ROWS_CALL_MIN_BYTES    # set_rows_call_min_bytes


cdef inline Py_ssize_t rows_per_call(const Planar *g, int ngroups,
                                     Py_ssize_t itemsize) noexcept nogil:
    """How many rows the row loops (bn_affine_runs, bn_grad_runs) write in
    one call: rows of every channel (one channel group: consecutive rows
    are then one stream) shorter than ROWS_CALL_MIN_BYTES, as many as
    make that much, at most a chunk's; else 1. The table of constants is
    repeated for as many rows (repeat_table)."""
    cdef Py_ssize_t row_bytes = g.channels * g.inner * itemsize
    if ngroups != 1 or row_bytes >= rows_call_min_bytes:
        return 1
    return min(g.rows_per_chunk, (rows_call_min_bytes + row_bytes - 1) // row_bytes)


cdef Py_ssize_t repeat_table(void **table, Py_ssize_t nbytes, Py_ssize_t copies) noexcept nogil:
    """Grow the table of nbytes at table[0] to `copies` copies of itself, one
    a row, so that the row loops find each channel's constants in turn over
    that many rows; returns the copies there are (1 where memory is short:
    the table is left as it was)."""
    cdef char *grown
    cdef Py_ssize_t k
    if table[0] == NULL or copies <= 1:
        return 1
    grown = <char *>realloc(table[0], nbytes * copies)
    if grown == NULL:
        return 1
    for k in range(1, copies):
        memcpy(grown + k * nbytes, grown, nbytes)
    table[0] = grown
    return copies


cdef bint row_runs_enabled = True     # set_row_runs
cdef bint chunk_pairs_enabled = True  # set_chunk_pairs
cdef Py_ssize_t chunk_pair_count = 0   # chunk_pair_calls


cdef inline bint each_run_in_one_call(int stream, Py_ssize_t itemsize) noexcept nogil:
    """Whether the normalisation and the training input gradient write each
    row's runs in one call (bn_affine_each_run, bn_grad_each_run), one run
    after the other: in cache (normal stores), with AVX-512 (the callers
    also need their table of constants, and the normalisation no relu
    gate). A call per run (or per pair of runs) cost about as much as a
    short run's loads and stores.
    Eval, float32, against the runs alone or paired (twin_rows), one / two
    threads: (8, 32, 14, 14) 0.73 / 0.74 of the time, (1, 128, 28, 28)
    0.84 / 0.90, (64, 64, 14, 14) 0.92 / 0.92, (128, 64, 10, 10) 0.97 /
    0.81, (8, 256, 14, 14) 1.00 / 0.89, (16, 128, 28, 28) 0.96 / 0.95;
    runs of 12.5 KB and more 0.95-1.03."""
    return not stream and row_runs_enabled and bn_periodic_lanes(itemsize) != 0


cdef inline Py_ssize_t paired_chunks(const Planar *g, const AffineIn *a,
                                     Py_ssize_t itemsize) noexcept nogil:
    """How many row chunks apart the streamed normalisation writes the rows
    of two chunks in step, or 0: about half the chunks, odd, where a
    chunk's rows are whole lines (so that both streams share their line
    offsets, and the table's channel order). planar_normalize then writes
    the rows of every run length a row at a time (ROW_RUNS_MAX_BYTES)."""
    if not (chunk_pairs_enabled and a.stream and can_pair(a, itemsize)
            and g.rows_per_chunk > 0
            and g.rows_per_chunk * g.channels * g.inner * itemsize % BN_LINE_BYTES == 0):
        return 0
    return odd_at_most(g.chunks_per_channel // 2)


cdef void affine_rows(const floating *x, floating *y, const Planar *g, Py_ssize_t n0,
                      Py_ssize_t n1, Py_ssize_t c0, Py_ssize_t c1, const floating *constants,
                      const AffineIn *a, Py_ssize_t row_runs, Py_ssize_t apart) noexcept nogil:
    """Normalise rows [n0, n1) of channels [c0, c1), each row's runs as one
    stream, row_runs rows a call (bn_affine_runs), constants holding (hi,
    lo, scale, shift) of channel c0 and those after it, repeated for as
    many rows; with apart > 0 each call's rows in step with the same rows
    `apart` rows later, a second stream with the same constants."""
    cdef Py_ssize_t n = n0, nrows, start
    cdef Py_ssize_t apart_values = apart * g.channels * g.inner
    while n < n1:
        nrows = min(row_runs, n1 - n)
        start = run_start(g, n, c0)
        if floating is float:
            bn_affine_runs_f32(x + start, y + start, nrows * (c1 - c0) * g.inner, g.inner,
                               constants, a.relu, a.stream, apart_values)
        else:
            bn_affine_runs_f64(x + start, y + start, nrows * (c1 - c0) * g.inner, g.inner,
                               constants, a.relu, a.stream, apart_values)
        n = n + nrows


cdef void planar_rows_affine(const floating *x, floating *y, const Planar *g, Py_ssize_t item,
                             int ngroups, const AffineIn *a, Py_ssize_t row_runs,
                             Py_ssize_t pair_chunks) noexcept nogil:
    """Normalise a row chunk's group of channels: with row_runs > 0, each
    row's runs as one stream, row_runs rows a call (affine_rows;
    a.constants is the table, its channels repeated for as many rows), and
    with pair_chunks > 0 (paired_chunks) items below pair_chunks * ngroups
    take their chunk's rows in step with those of the chunk pair_chunks
    later, the items after them the chunks after those pairs; else in
    cache each row's runs in one call (each_run_in_one_call); else rows n
    and n + twin apart in step (twin_rows; blocks of 2 * twin rows), the
    rows left after the last block with their channels paired
    (planar_row_affine)."""
    cdef Py_ssize_t chunk = item // ngroups, apart = 0
    if chunk < pair_chunks:
        apart = pair_chunks * g.rows_per_chunk
    else:
        chunk = chunk + pair_chunks
    cdef Span s = chunk_span(g, chunk)
    cdef Py_ssize_t n = s.n0, j, c, start, c0 = 0, c1 = 0, twin, paired_end
    cdef const floating *table = <const floating *>a.constants
    group_channels(g, item % ngroups, ngroups, &c0, &c1)
    if row_runs > 0:
        # The partner is the same rows of a later chunk, or fewer of them
        # (the last chunk): the rows it lacks go alone.
        paired_end = min(s.n1, g.outer - apart) if apart > 0 else s.n0
        affine_rows(x, y, g, s.n0, paired_end, c0, c1, table + 4 * c0, a, row_runs, apart)
        affine_rows(x, y, g, paired_end, s.n1, c0, c1, table + 4 * c0, a, row_runs, 0)
        if a.stream:
            bn_stream_fence()
        return
    if (a.gate == NULL and a.constants != NULL
            and each_run_in_one_call(a.stream, sizeof(floating))):
        for j in range(n, s.n1):
            start = run_start(g, j, c0)
            if floating is float:
                bn_affine_each_run_f32(x + start, y + start, c1 - c0, g.inner, table + 4 * c0,
                                       a.relu)
            else:
                bn_affine_each_run_f64(x + start, y + start, c1 - c0, g.inner, table + 4 * c0,
                                       a.relu)
        return
    twin = twin_rows(g, s.n1 - s.n0, sizeof(floating), a)
    if twin > 0:
        while n + 2 * twin <= s.n1:
            for j in range(n, n + twin):
                for c in range(c0, c1):
                    start = run_start(g, j, c)
                    run_affine_twin(x, y, start, run_start(g, j + twin, c) - start, g.inner,
                                    a, c, c)
            n = n + 2 * twin
    twin = twin_channels(g, c1 - c0, sizeof(floating), a)
    for j in range(n, s.n1):
        planar_row_affine(x, y, g, j, c0, c1, twin, a)
    if a.stream:
        bn_stream_fence()


cdef void finish_from_table(const floating *x, const Moments *table, Py_ssize_t nchunks,
                            Py_ssize_t inner, Py_ssize_t c, const StatsOut *out) noexcept nogil:
    """Merge channel c's chunk triples (table[c * nchunks + k], either loop
    order) in chunk order and store its statistics."""
    finish_from_chunks(x, table + c * nchunks, nchunks, inner, c, out)


cdef void finish_from_chunks(const floating *x, const Moments *chunks, Py_ssize_t nchunks,
                             Py_ssize_t inner, Py_ssize_t c, const StatsOut *out) noexcept nogil:
    """Merge channel c's chunk triples chunks[0:nchunks] in order and store
    its statistics."""
    cdef Moments acc = empty_moments()
    cdef Py_ssize_t k
    for k in range(nchunks):
        merge_moments(&acc, chunks[k])
    finish_channel(acc, channel_origin(x, c, inner), c, out)


# Every prange body below is one call: the locals of the called function are
# private to its thread by construction, which Cython cannot guarantee for
# variables written through pointers inside the loop.
#
# The loops of the forward and the backward have a serial twin for a team
# of one thread (every call under the serial threshold): entering an
# OpenMP region costs about 0.6 us even for one thread, measured (an eval
# kernel call on (1, 64) took 1.95 us with its two regions, 0.67 us
# without; prange's use_threads_if gained nothing, as GCC still enters the
# region). libgomp frees a team of one at the region's end and allocates it
# again at the next (an aligned allocation that consolidates malloc's free
# lists), and its closing barrier makes a futex system call. The backward's
# three regions, gone, took a float32 call on one thread from 5.6 to 3.8 us
# for (2, 128, 4, 4), 10.0 to 8.3 for (8, 64, 7, 7), 3.7 to 2.1 for (2, 64).

cdef void planar_moments(const floating *x, const Planar *g, Moments *table,
                         const StatsOut *out, int nthreads) noexcept nogil:
    """Per-channel statistics via the table of chunk triples, merged in order."""
    cdef Py_ssize_t item, c
    cdef Py_ssize_t nchunks = g.chunks_per_channel
    cdef int ngroups = row_groups(g, nthreads)
    if nthreads == 1:
        if g.rows_per_chunk > 0:
            for item in range(nchunks * ngroups):
                planar_rows_moments(x, g, item, ngroups, table)
        else:
            for item in range(g.channels * nchunks):
                table[item] = planar_chunk_moments(x, g, item // nchunks, item % nchunks)
        for c in range(g.channels):
            finish_from_table(x, table, g.chunks_per_channel, g.inner, c, out)
        return
    if g.rows_per_chunk > 0:
        for item in prange(nchunks * ngroups, num_threads=nthreads, schedule="dynamic"):
            planar_rows_moments(x, g, item, ngroups, table)
    else:
        for item in prange(g.channels * nchunks, num_threads=nthreads, schedule="dynamic"):
            table[item] = planar_chunk_moments(x, g, item // nchunks, item % nchunks)
    # The per-channel merges run in parallel too: with a million channels
    # they are most of the work.
    for c in prange(g.channels, num_threads=nthreads, schedule="static"):
        finish_from_table(x, table, g.chunks_per_channel, g.inner, c, out)


cdef inline bint rows_as_runs(const Planar *g, bint stream, Py_ssize_t itemsize,
                              Py_ssize_t max_bytes) noexcept nogil:
    """Whether the two-pass normalisation and input gradient write each row's
    runs of a row chunk as one stream (bn_affine_runs, bn_grad_runs; the
    callers also need their table of constants): AVX-512, runs of at least
    a vector (the loop blends at most two channels' constants per vector),
    and with streaming stores runs that share lines or are shorter than
    max_bytes (ROW_RUNS_MAX_BYTES, any length where the normalisation pairs
    chunks; the input gradient's GRAD_ROW_RUNS_MAX_BYTES); with normal
    stores (in cache), where that loop measured 1.3-3.4 times slower than
    one call per run on long runs, only runs shorter than
    ROW_RUNS_MAX_BYTES_IN_CACHE."""
    if not (g.rows_per_chunk > 0 and bn_periodic_lanes(itemsize) != 0
            and g.inner >= bn_periodic_lanes(itemsize) and row_runs_enabled):
        return False
    if stream:
        return runs_share_lines(g, itemsize) or g.inner * itemsize < max_bytes
    return g.inner * itemsize < ROW_RUNS_MAX_BYTES_IN_CACHE


cdef inline int row_chunk_stream(const Planar *g, int stream, bint row_runs,
                                 Py_ssize_t itemsize) noexcept nogil:
    """Whether the two-pass normalisation and input gradient of row chunks
    write with streaming stores: as asked, but for runs that share lines
    and are written one at a time (not row_runs), which take normal ones.
    Each such run begins and ends with a masked store into a line its
    neighbour shares; with streaming stores between those, eval of (512,
    512, 7, 7) and (64, 512, 14, 28) float32 ran at 0.15 of a streaming copy
    on one thread, with normal stores at 0.70 and as rows at 0.90-1.06, and
    the backward of (996, 256, 7, 7) at 19 streaming-copy times, of (124,
    256, 14, 28) at 7.9. (Runs cut into chunks share a line only every 256
    KiB or more, and keep streaming stores.)"""
    return stream and not (runs_share_lines(g, itemsize) and not row_runs)


cdef void planar_normalize(const floating *x, floating *y, const Planar *g,
                           const AffineIn *a, int nthreads) noexcept nogil:
    cdef Py_ssize_t item
    cdef Py_ssize_t nchunks = g.chunks_per_channel
    cdef int ngroups = row_groups(g, nthreads)
    cdef AffineIn rows = a[0]
    global chunk_pair_count
    cdef Py_ssize_t row_runs = 0, pair_chunks, nitems
    cdef void *table
    # From memory (streaming stores) work items go to whichever thread is
    # free; in cache they go in the same static shares at every call, so
    # that a tensor normalised call after call stays in the L2 of the core
    # that wrote it. Row chunks, eval, float32, two threads, static against
    # dynamic: (1, 64, 56, 56) 0.91 of the time, (1, 64, 40, 40) 0.92, (16,
    # 512, 7, 7) 0.95; 3-12 MB 0.97-1.02.
    if g.rows_per_chunk == 0:
        if nthreads == 1:
            for item in range(g.channels * nchunks):
                planar_chunk_affine(x, y, g, item // nchunks, item % nchunks, a)
        elif a.stream:
            for item in prange(g.channels * nchunks, num_threads=nthreads,
                               schedule="dynamic"):
                planar_chunk_affine(x, y, g, item // nchunks, item % nchunks, a)
        else:
            for item in prange(g.channels * nchunks, num_threads=nthreads,
                               schedule="static"):
                planar_chunk_affine(x, y, g, item // nchunks, item % nchunks, a)
        return
    # Row chunks: runs of up to 64 Ki values, each asking for its channel's
    # constants; a table of them, made once.
    table = affine_table(x, a, g.channels, nthreads)
    pair_chunks = paired_chunks(g, a, sizeof(floating))
    if (table != NULL and can_pair(a, sizeof(floating))
            and rows_as_runs(g, a.stream, sizeof(floating),
                             PY_SSIZE_T_MAX if pair_chunks > 0 else ROW_RUNS_MAX_BYTES)):
        row_runs = repeat_table(&table, 4 * g.channels * sizeof(floating),
                                rows_per_call(g, ngroups, sizeof(floating)))
    if row_runs == 0:
        pair_chunks = 0
    elif pair_chunks > 0:
        chunk_pair_count += 1
    rows.constants = table
    rows.stream = row_chunk_stream(g, a.stream, row_runs > 0, sizeof(floating))
    nitems = (nchunks - pair_chunks) * ngroups
    if nthreads == 1:
        for item in range(nitems):
            planar_rows_affine(x, y, g, item, ngroups, &rows, row_runs, pair_chunks)
    elif a.stream:
        for item in prange(nitems, num_threads=nthreads, schedule="dynamic"):
            planar_rows_affine(x, y, g, item, ngroups, &rows, row_runs, pair_chunks)
    else:
        for item in prange(nitems, num_threads=nthreads, schedule="static"):
            planar_rows_affine(x, y, g, item, ngroups, &rows, row_runs, pair_chunks)
    free(<void *>rows.constants)


# --------------------------------------------------------------------------
# The pipelined training forward (planar order, row chunks): a work item is a
# range of consecutive channels. While channel c is normalised, from cache,
# the statistics of channel c + 1 are read from memory, run by run, each run
# asking for the next one ahead of use; so the memory sees one read and one
# write of the tensor, both at once, instead of two reads (statistics, then
# normalisation) and a write. Channel c + 1's chunks are computed and merged
# exactly as planar_rows_moments does, so the results are bitwise those of
# the two-pass path.

cdef inline const floating *run_after(const floating *x, const Planar *g, Py_ssize_t n,
                                      Py_ssize_t c, Py_ssize_t c_end,
                                      Py_ssize_t ahead) noexcept nogil:
    """The run read `ahead` runs after run (n, c) by a pass over the rows of
    channels up to c_end (excluded), or NULL."""
    n = n + ahead
    while n >= g.outer:
        n = n - g.outer
        c = c + 1
    if c >= c_end:
        return NULL
    return x + run_start(g, n, c)


cdef inline const floating *run_before(const floating *x, const Planar *g, Py_ssize_t n,
                                       Py_ssize_t c, Py_ssize_t c_end) noexcept nogil:
    """The run normalised after run (n, c) by a pass over the rows of
    channels up to c_end (excluded) from the last row to the first, or NULL."""
    if n > 0:
        return x + run_start(g, n - 1, c)
    if c + 1 < c_end:
        return x + run_start(g, g.outer - 1, c + 1)
    return NULL


cdef inline Py_ssize_t runs_ahead(const Planar *g, Py_ssize_t itemsize) noexcept nogil:
    """How many runs ahead the statistics pass asks for: at least
    PIPE_AHEAD_BYTES, so that the prefetches of short runs are not late."""
    cdef Py_ssize_t run_bytes = g.inner * itemsize
    return max(<Py_ssize_t>1, (PIPE_AHEAD_BYTES + run_bytes - 1) // run_bytes)


cdef inline bint can_seam(int stream, Py_ssize_t shortest,
                          Py_ssize_t itemsize) noexcept nogil:
    """Whether the pipelined passes write each line that two runs share
    whole, once (seams: BN_LEAVE_HEAD in _leaf_loops.h says why): with
    streaming stores, where the AVX-512 seam kernels run, and where the
    pieces they write at once, `shortest` values at least, span a line
    each, so that no line holds more than two of them.

    Measured, float64, with seams against without (two threads, of a copy
    or of the bound, interleaved): backward, runs of 29 x 29 and 35 x 35,
    one / two threads, 0.59-0.60 against 0.55-0.57 / 0.73-0.75 against
    0.68-0.69, (32, 256, 28, 28) even; forward, runs of 28 x 28, 35 x 35
    and 56 x 56 values, even (1.00-1.02 of the time)."""
    return (stream and shortest * itemsize >= BN_LINE_BYTES
            and bn_periodic_lanes(itemsize) != 0)


cdef inline Py_ssize_t last_piece(const Planar *g) noexcept nogil:
    """The length of a run's last piece (of BLOCK_LEN values but the last),
    its shortest."""
    return g.inner - (g.pieces_per_run - 1) * BLOCK_LEN


cdef inline int seam_ends(Py_ssize_t c, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """The partial end lines (BN_LEAVE_*) that a pipelined item, writing
    channels [c0, c1) in order, leaves of each run of channel c: its first,
    shared with channel c - 1's run, written before and finished by this
    run's seam; its last, shared with channel c + 1's, which finishes it.
    The lines an item shares with its neighbours' (and between rows) are
    written in parts.

    Measured float32, in streaming-copy times, written in parts against
    seams, one / two threads: the training forward of (64, 256, 29, 29)
    2.40 / 1.86 against 1.53 / 1.15, of (32, 192, 35, 35) 2.21 / 1.52
    against 1.34 / 1.02; their backward 3.35 / 2.50 against 2.41 / 1.98 and
    3.26 / 2.54 against 2.55 / 2.08. Runs of whole lines: the same."""
    return (BN_LEAVE_HEAD if c > c0 else 0) | (BN_LEAVE_TAIL if c + 1 < c1 else 0)


cdef inline void affine_head_seam(const floating *xn, floating *yn, Py_ssize_t n,
                                  const floating *before, const floating *now,
                                  int relu) noexcept nogil:
    """The line that the run of n values at xn (out at yn) shares with the
    run before it in memory, written whole: `before` holds that run's
    constants (hi, lo, scale, shift) and `now` this one's. Nothing where
    the run starts a line."""
    cdef Py_ssize_t line = BN_LINE_BYTES // sizeof(floating)
    cdef Py_ssize_t head = bn_line_head(yn, sizeof(floating), n)
    if head == 0:
        return
    if floating is float:
        bn_affine_seam_f32(xn + head - line, yn + head - line, <int>(line - head), before, now,
                           relu)
    else:
        bn_affine_seam_f64(xn + head - line, yn + head - line, <int>(line - head), before, now,
                           relu)


cdef inline Py_ssize_t second_pass_ahead(const floating *x, const Planar *g,
                                         const floating *xs, const floating *pf,
                                         Py_ssize_t block_end) noexcept nogil:
    """How far ahead, in bytes, float64's second statistics pass over a
    block of whole runs (the last one at xs) asks for memory in the
    pipelined walk: the runs that the next block's fused loop asks for, pf
    (this block's runs ahead) block_end rows on. That pass reads the block
    from L1 and the memory had idled through it. 0 (nothing asked) for
    pieces of long runs, where it measured 2-8 % slower (one thread, (16,
    64, 112, 112)), and where the runs ahead are not further on than the
    block (the walk has moved to the next channel) or lie past the tensor.
    Whole runs, float64, of a streaming copy, off / on, interleaved medians
    of 31, one / two threads: (64, 256, 28, 28) 0.77 -> 0.92 / 0.87 ->
    0.93, (32, 192, 35, 35) 0.68 -> 0.79 / 0.86 -> 0.92, (64, 256, 20, 20)
    0.79 -> 0.85 / 0.81 -> 0.86, (32, 512, 28, 28) 0.77 -> 0.89 / 0.82 ->
    0.98, (64, 96, 35, 35) 0.64 -> 0.77 / 0.78 -> 0.83, (128, 256, 14, 28)
    0.68 -> 0.76 / 0.76 -> 0.81."""
    cdef Py_ssize_t gap
    if pf == NULL or g.pieces_per_run != 1:
        return 0
    gap = (pf - xs) + block_end * g.channels * g.inner
    if gap <= 0 or (xs - x) + gap + g.inner > g.outer * g.channels * g.inner:
        return 0
    return gap * <Py_ssize_t>sizeof(floating)


cdef void pipelined_runs(const floating *x, floating *y, const Planar *g, Py_ssize_t n,
                         Py_ssize_t sc, double origin, double *s1, double *s2,
                         Py_ssize_t block_end, Moments *acc, const floating *ahead,
                         Py_ssize_t n_norm, Py_ssize_t nc, bint seams, int ends,
                         const floating *next_n, const AffineIn *a) noexcept nogil:
    """Channel sc's run in row n added into the lane sums s1, s2 (sc < 0:
    none), prefetching the run at ``ahead``, and channel nc's run in row
    n_norm normalised (nc < 0: none), block by block; with seams (the
    caller's can_seam), leaving its end lines `ends` (seam_ends) and the
    lines between its pieces to be written whole; next_n is the run to
    normalise next. A block that ends here (a piece of a long
    run, or block_end > 0 rows of whole runs ending with row n) is merged
    into acc, and its lanes cleared for the next."""
    cdef Py_ssize_t p, start, length
    cdef Py_ssize_t run_bytes = g.inner * <Py_ssize_t>sizeof(floating)
    cdef Py_ssize_t stride = g.channels * g.inner
    cdef floating now[4]        # hi, lo, scale, shift of channel nc
    cdef floating before[4]     # ... of channel nc - 1, for the seam of a first piece
    cdef const floating *xs = NULL
    cdef const floating *xn = NULL
    cdef const floating *pf = NULL
    cdef floating *yn = NULL
    cdef int leave = 0
    cdef Py_ssize_t ahead_bytes = 0
    cdef Moments block
    if nc >= 0:
        affine_params(a, nc, &now[0], &now[1], &now[2], &now[3])
        if ends & BN_LEAVE_HEAD:
            affine_params(a, nc - 1, &before[0], &before[1], &before[2], &before[3])
        if next_n != NULL and g.outer * run_bytes > PIPE_L2_SLICE:
            # A channel normalised from L3 is asked into L2 ahead. One that
            # fits in L2 is not asked for: into L1 (prefetcht0) it ran 0-17 %
            # slower on one thread, even on two (float32 (64,256,28,28),
            # (32,128,32,32), Zen 5).
            bn_prefetch_to_l2(next_n, run_bytes)
    for p in range(g.pieces_per_run):
        start = p * BLOCK_LEN
        length = min(<Py_ssize_t>BLOCK_LEN, g.inner - start)
        if sc >= 0:
            xs = x + run_start(g, n, sc) + start
        if ahead != NULL:
            pf = ahead + start
        if nc >= 0:
            xn = x + run_start(g, n_norm, nc) + start
            yn = y + run_start(g, n_norm, nc) + start
            if seams:
                leave = ((ends & BN_LEAVE_HEAD if p == 0 else BN_LEAVE_HEAD)
                         | (ends & BN_LEAVE_TAIL if p + 1 == g.pieces_per_run
                            else BN_LEAVE_TAIL))
                if leave & BN_LEAVE_HEAD:
                    affine_head_seam(xn, yn, length, &before[0] if p == 0 else &now[0],
                                     &now[0], a.relu)
        if floating is float:
            bn_stats_and_affine_f32(xs, length, origin, s1, s2, pf, xn, yn, now[0], now[1],
                                    now[2], now[3], a.relu, a.stream, leave)
        else:
            bn_stats_and_affine_f64(xs, length, origin, s1, s2, pf, xn, yn, now[0], now[1],
                                    now[2], now[3], a.relu, a.stream, leave)
        if sc >= 0 and block_end > 0:
            # block_moments' passes: the first one above, float64's second
            # one (where it needs one) here, from L1, asking for the runs
            # ahead (second_pass_ahead).
            if floating is double:
                ahead_bytes = second_pass_ahead(x, g, xs, pf, block_end)
            block = moments_after_first_pass(xs - (block_end - 1) * stride, block_end, stride,
                                             length, origin, bn_lanes_total(s1),
                                             bn_lanes_total(s2), ahead_bytes)
            merge_moments(acc, block)
            clear_lanes(s1, s2)


cdef inline bint short_split_runs(const Planar *g, Py_ssize_t itemsize) noexcept nogil:
    """Whether the pipelined passes write with normal stores even where the
    output is large: runs under PIPE_MIN_RUN_BYTES that are not whole lines,
    where most lines are shared by two runs written at different times
    (by size, such runs are not pipelined at all: this is for the forced
    modes). Measured float32, one thread, in streaming-copy times: (512,
    512, 7, 7) training 19 with streaming stores, 4.9 with normal ones,
    backward 19.6 and 8.4; runs of 784 and 1568 bytes ran 15-30 % faster
    with streaming stores."""
    return runs_share_lines(g, itemsize) and g.inner * itemsize < PIPE_MIN_RUN_BYTES


cdef void pipelined_item(const floating *x, floating *y, const Planar *g, Py_ssize_t c0,
                         Py_ssize_t c1, const StatsOut *out, const AffineIn *a) noexcept nogil:
    """Channels [c0, c1): statistics of c0 alone, then each channel normalised
    while the next one's statistics are read, then the last one normalised.
    One channel's chunk triples at a time, on the stack (row chunks: at most
    MAX_ROW_CHUNKS), so the call allocates nothing."""
    cdef Moments table[MAX_ROW_CHUNKS]
    cdef bn_lanes s1
    cdef bn_lanes s2
    cdef Py_ssize_t nchunks = g.chunks_per_channel
    cdef Py_ssize_t c, k, n, sc, nc, block_end
    cdef Span s
    cdef double origin = 0.0
    cdef Py_ssize_t ahead = runs_ahead(g, sizeof(floating))
    cdef AffineIn b = a[0]
    cdef bint seams
    if short_split_runs(g, sizeof(floating)):
        b.stream = False
    seams = can_seam(b.stream, last_piece(g), sizeof(floating))
    clear_lanes(s1, s2)
    for c in range(c0 - 1, c1):
        # Statistics of sc = c + 1 while normalising nc = c (-1: none).
        sc = c + 1 if c + 1 < c1 else -1
        nc = c if c >= c0 else -1
        if sc >= 0:
            origin = channel_origin(x, sc, g.inner)
        for k in range(nchunks):
            s = chunk_span(g, k)
            if sc >= 0:
                table[k] = empty_moments()
            for n in range(s.n0, s.n1):
                # Blocks of whole runs as planar_rows_moments cuts them.
                block_end = block_end_at(g, n, s)
                # Rows are normalised last read first: those still in L2.
                pipelined_runs(x, y, g, n, sc, origin, s1, s2, block_end, &table[k],
                               run_after(x, g, n, sc, c1, ahead) if sc >= 0 else NULL,
                               g.outer - 1 - n, nc, seams,
                               seam_ends(nc, c0, c1) if seams and nc >= 0 else 0,
                               run_before(x, g, g.outer - 1 - n, nc, c1) if nc >= 0 else NULL,
                               &b)
        if sc >= 0:
            finish_from_chunks(x, table, nchunks, g.inner, sc, out)
    if a.stream:
        bn_stream_fence()


cdef Py_ssize_t pipelined_items = 0     # 0: one per thread (set_pipelined)


cdef void planar_train_pipelined(const floating *x, floating *y, const Planar *g,
                                 const StatsOut *out, const AffineIn *a,
                                 int nthreads) noexcept nogil:
    cdef Py_ssize_t item
    cdef Py_ssize_t nitems = pipelined_items if pipelined_items > 0 else nthreads
    nitems = min(nitems, g.channels)
    for item in prange(nitems, num_threads=nthreads, schedule="static", chunksize=1):
        pipelined_item(x, y, g, item * g.channels // nitems,
                       (item + 1) * g.channels // nitems, out, a)


# --------------------------------------------------------------------------
# Interleaved order: `outer` rows of W = C * inner values; column j belongs to
# channel j // inner. Work items are (row chunk, column tile) pairs.

cdef struct Interleaved:
    Py_ssize_t rows
    Py_ssize_t width
    Py_ssize_t channels
    Py_ssize_t inner
    Py_ssize_t chunk_rows
    Py_ssize_t nchunks
    Py_ssize_t tile        # columns per tile: whole channels, at most COLUMN_TILE
    Py_ssize_t ntiles


cdef Interleaved interleaved_geometry(Py_ssize_t outer, Py_ssize_t channels,
                                      Py_ssize_t inner) noexcept nogil:
    cdef Interleaved g
    cdef Py_ssize_t min_rows
    g.rows = outer
    g.width = channels * inner
    g.channels = channels
    g.inner = inner
    # Whole row blocks per chunk, at most MAX_ROW_CHUNKS chunks, and chunks
    # of about CHUNK_BLOCKS * BLOCK_LEN values when the rows are short.
    min_rows = (CHUNK_BLOCKS * BLOCK_LEN) // g.width
    g.chunk_rows = max((outer + MAX_ROW_CHUNKS - 1) // MAX_ROW_CHUNKS, min_rows)
    g.chunk_rows = ((g.chunk_rows + ROW_BLOCK - 1) // ROW_BLOCK) * ROW_BLOCK
    g.nchunks = (outer + g.chunk_rows - 1) // g.chunk_rows
    # Tiles hold whole channels (inner < PLANAR_MIN_INNER <= COLUMN_TILE), so
    # an item can merge its columns into per-channel results: the tables
    # stay per channel, not per column.
    g.tile = (COLUMN_TILE // inner) * inner
    g.ntiles = (g.width + g.tile - 1) // g.tile
    return g


cdef inline void chunk_row_span(const Interleaved *g, Py_ssize_t chunk, Py_ssize_t *r0,
                                Py_ssize_t *nrows) noexcept nogil:
    """Rows [r0, r0 + nrows) of row chunk `chunk`."""
    r0[0] = chunk * g.chunk_rows
    nrows[0] = min(g.chunk_rows, g.rows - r0[0])


cdef inline void item_span(const Interleaved *g, Py_ssize_t item, Py_ssize_t *r0,
                           Py_ssize_t *nrows, Py_ssize_t *j0,
                           Py_ssize_t *ncols) noexcept nogil:
    """Rows [r0, r0 + nrows) and columns [j0, j0 + ncols) of an item."""
    chunk_row_span(g, item // g.ntiles, r0, nrows)
    j0[0] = (item % g.ntiles) * g.tile
    ncols[0] = min(g.tile, g.width - j0[0])


cdef inline void rows_shifted_sums(const floating *x, Py_ssize_t nrows, Py_ssize_t stride,
                                   Py_ssize_t ncols, const double *origin, const double *offset,
                                   double *s1, double *s2) noexcept nogil:
    if floating is float:
        bn_rows_shifted_sums_f32(x, nrows, stride, ncols, origin, offset, s1, s2)
    else:
        bn_rows_shifted_sums_f64(x, nrows, stride, ncols, origin, offset, s1, s2)


cdef inline Py_ssize_t least_common_multiple(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    cdef Py_ssize_t p = a, q = b, r
    while q:                 # Euclid: p ends as the greatest common divisor
        r = p % q
        p = q
        q = r
    return a // p * b


cdef inline Py_ssize_t stats_pack(const Interleaved *g, Py_ssize_t ncols) noexcept nogil:
    """How many rows the statistics take as one: a narrow row (a whole,
    single tile under 64 values) is read k rows at a time as one row of k
    times its columns, a multiple of 16 where it can be and at least 64,
    so that the register-blocked loops (16 columns and up) take it rather
    than the scalar one: (N, 8) float32 ran at 7 GB/s."""
    cdef Py_ssize_t width = g.width, period
    if ncols != width or width >= 64:
        return 1
    period = least_common_multiple(width, 16)
    if period <= COLUMN_TILE // 2:
        return (64 + period - 1) // period * period // width
    return (64 + width - 1) // width


cdef void columns_moments(const floating *x, Py_ssize_t nrows, Py_ssize_t stride,
                          Py_ssize_t ncols, const double *origin, Moments *acc) noexcept nogil:
    """Merge into acc[j] the triple of column j of nrows rows (stride apart).

    float32 takes a column's rows as one block, one pass of float64 sums of
    x minus its channel's origin (exact enough, as in block_moments), walked
    in slabs of rows. float64 takes blocks of ROW_BLOCK_BYTES, merged in row
    order, each in one pass of sums of x minus a shift near its mean: the
    block's first row for the first block, the block before's mean for the
    others. Where some column's shift was too far from its mean
    (shifted_sums_keep_digits), the block takes a second pass around its
    means, from L2, as block_moments does."""
    cdef double shift[COLUMN_TILE]      # float64: x - shift[j] for column j
    cdef double offset[COLUMN_TILE]     # shift[j] - origin[j], or the block's mean
    cdef double s1[COLUMN_TILE]
    cdef double s2[COLUMN_TILE]
    cdef Moments block
    cdef Py_ssize_t r, n, j
    cdef Py_ssize_t slab = max(<Py_ssize_t>1, SLAB_BYTES // (ncols * <Py_ssize_t>sizeof(floating)))
    cdef Py_ssize_t rows_per_block = max(<Py_ssize_t>1,
                                         ROW_BLOCK_BYTES // (ncols * <Py_ssize_t>sizeof(double)))
    if nrows == 0:
        return
    for j in range(ncols):
        s1[j] = 0.0
        s2[j] = 0.0
    if floating is float:
        r = 0
        while r < nrows:
            n = min(slab, nrows - r)
            rows_shifted_sums(x + r * stride, n, stride, ncols, origin, NULL, s1, s2)
            r = r + n
        for j in range(ncols):
            merge_moments(&acc[j], moments_from_shifted_sums(<double>nrows, 0.0, s1[j], s2[j]))
    else:
        for j in range(ncols):
            shift[j] = x[j]
        r = 0
        while r < nrows:
            n = min(rows_per_block, nrows - r)
            # One subtraction a value: the shift as the rows' origin, and the
            # offset that puts the mean back on the channel's origin. (Origin
            # and offset subtracted apart, (N, 128) and (N, 96) statistics took
            # 0.77-0.80 streaming-copy times on one thread against 0.74-0.77.)
            for j in range(ncols):
                offset[j] = shift[j] - origin[j]
            rows_shifted_sums(x + r * stride, n, stride, ncols, shift, NULL, s1, s2)
            for j in range(ncols):
                if not shifted_sums_keep_digits(<double>n, s1[j], s2[j]):
                    second_rows_pass(x + r * stride, n, stride, ncols, origin, offset, s1, s2)
                    break
            for j in range(ncols):
                block = moments_from_shifted_sums(<double>n, offset[j], s1[j], s2[j])
                merge_moments(&acc[j], block)
                # (A column with a NaN or an infinity keeps its first shift: a
                # mean of NaN would send every later block to the second pass.)
                if fabs(block.mean) <= DBL_MAX:
                    shift[j] = origin[j] + block.mean
                s1[j] = 0.0
                s2[j] = 0.0
            r = r + n


cdef void second_rows_pass(const floating *x, Py_ssize_t nrows, Py_ssize_t stride,
                           Py_ssize_t ncols, const double *origin, double *offset,
                           double *s1, double *s2) noexcept nogil:
    """For each column of a block of rows whose sums s1, s2 around origin +
    offset did not keep their digits, sums around the block's mean instead,
    which its offset becomes. The other columns keep theirs, so that each
    column's statistics depend on its values alone (a NaN in one column
    changes no other's bits)."""
    cdef double mean[COLUMN_TILE]
    cdef double t1[COLUMN_TILE]
    cdef double t2[COLUMN_TILE]
    cdef Py_ssize_t j
    for j in range(ncols):
        mean[j] = offset[j] + s1[j] / <double>nrows
        t1[j] = 0.0
        t2[j] = 0.0
    rows_shifted_sums(x, nrows, stride, ncols, origin, mean, t1, t2)
    for j in range(ncols):
        if not shifted_sums_keep_digits(<double>nrows, s1[j], s2[j]):
            offset[j] = mean[j]
            s1[j] = t1[j]
            s2[j] = t2[j]


cdef void interleaved_item_moments(const floating *x, const Interleaved *g, Py_ssize_t item,
                                   Moments *table) noexcept nogil:
    """Per-channel triples of one (row chunk, column tile) item, into the
    chunk table (channel c's chunk k at c * nchunks + k).

    Columns first (columns_moments; narrow rows packed, stats_pack, the
    rows left over after the last whole pack into the first row's
    columns), then each channel's columns merged in column order."""
    cdef double origin[COLUMN_TILE]
    cdef Moments acc[COLUMN_TILE]
    cdef Moments block
    cdef Py_ssize_t r0 = 0, nrows = 0, j0 = 0, ncols = 0
    cdef Py_ssize_t pack, packed, j, p, q
    cdef Py_ssize_t chunk = item // g.ntiles
    item_span(g, item, &r0, &nrows, &j0, &ncols)
    pack = stats_pack(g, ncols)
    for j in range(ncols * pack):
        acc[j] = empty_moments()
        origin[j] = channel_origin(x, ((j0 + j) % g.width) // g.inner, g.inner)
    packed = (nrows // pack) * pack
    columns_moments(x + r0 * g.width + j0, packed // pack, g.width * pack, ncols * pack,
                    origin, acc)
    columns_moments(x + (r0 + packed) * g.width + j0, nrows - packed, g.width, ncols,
                    origin, acc)
    j = 0
    while j < ncols:
        block = empty_moments()
        for p in range(pack):
            for q in range(g.inner):
                merge_moments(&block, acc[p * ncols + j + q])
        table[((j0 + j) // g.inner) * g.nchunks + chunk] = block
        j = j + g.inner


cdef void wide_chunk_moments(const floating *x, const Interleaved *g, Py_ssize_t chunk,
                             Moments *table) noexcept nogil:
    """The chunk table's entries of one row chunk of rows wider than a tile,
    float32: whole rows, a slab at a time, their sums in a heap buffer.

    As tiles, each of a chunk's tiles read its part of every row: (N, 1024)
    and wider float32 moments took 2.7-2.9 streaming-copy times on one
    thread, against 1.0-1.3 for (N, 512). Each column still takes its rows
    in order, in the same operations, so the bits are the tiles'. Out of
    memory for the sums, the chunk is taken by tiles."""
    cdef Py_ssize_t r0 = 0, nrows = 0
    cdef Py_ssize_t slab = max(<Py_ssize_t>1,
                               SLAB_BYTES // (g.width * <Py_ssize_t>sizeof(floating)))
    cdef double *origin = <double *>malloc(3 * g.width * sizeof(double))
    cdef double *s1
    cdef double *s2
    cdef Moments block
    cdef Py_ssize_t r, j, q, tile
    if origin == NULL:
        for tile in range(g.ntiles):
            interleaved_item_moments(x, g, chunk * g.ntiles + tile, table)
        return
    chunk_row_span(g, chunk, &r0, &nrows)
    s1 = origin + g.width
    s2 = s1 + g.width
    for j in range(g.width):
        origin[j] = channel_origin(x, j // g.inner, g.inner)
        s1[j] = 0.0
        s2[j] = 0.0
    r = 0
    while r < nrows:
        rows_shifted_sums(x + (r0 + r) * g.width, min(slab, nrows - r), g.width, g.width,
                          origin, NULL, s1, s2)
        r = r + slab
    j = 0
    while j < g.width:
        block = empty_moments()
        for q in range(j, j + g.inner):
            merge_moments(&block, moments_from_shifted_sums(<double>nrows, 0.0, s1[q], s2[q]))
        table[(j // g.inner) * g.nchunks + chunk] = block
        j = j + g.inner
    free(origin)


cdef inline void interleaved_chunk_moments(const floating *x, const Interleaved *g,
                                           Py_ssize_t item, bint whole_rows,
                                           Moments *table) noexcept nogil:
    """Item of interleaved_moments: a row chunk (whole_rows) or a tile of one."""
    if whole_rows:
        wide_chunk_moments(x, g, item, table)
    else:
        interleaved_item_moments(x, g, item, table)


cdef inline bint sums_whole_rows(const Interleaved *g, int nthreads) noexcept nogil:
    """Whether the column sums of the statistics or the backward take whole
    rows of a row chunk (wide_chunk_moments, wide_chunk_grad_sums) rather
    than tiles: rows wider than a tile, enough chunks to share among the
    threads, and sums (WHOLE_ROWS_MAX_WIDTH columns: 96 KiB) that stay in
    L2 beside a slab of rows."""
    return (g.ntiles > 1 and g.width <= WHOLE_ROWS_MAX_WIDTH
            and g.nchunks >= WHOLE_ROWS_CHUNKS_PER_THREAD * nthreads)


cdef void interleaved_moments(const floating *x, const Interleaved *g, Moments *table,
                              const StatsOut *out, int nthreads) noexcept nogil:
    cdef Py_ssize_t item, c
    # float64 keeps its tiles: its blocks of rows, with their shifts and
    # second passes, are per tile.
    cdef bint whole_rows = floating is float and sums_whole_rows(g, nthreads)
    cdef Py_ssize_t nitems = g.nchunks if whole_rows else g.nchunks * g.ntiles
    if nthreads == 1:
        for item in range(nitems):
            interleaved_chunk_moments(x, g, item, whole_rows, table)
        for c in range(g.channels):
            finish_from_table(x, table, g.nchunks, g.inner, c, out)
        return
    for item in prange(nitems, num_threads=nthreads, schedule="static"):
        interleaved_chunk_moments(x, g, item, whole_rows, table)
    for c in prange(g.channels, num_threads=nthreads, schedule="static"):
        finish_from_table(x, table, g.nchunks, g.inner, c, out)


cdef inline void expand_to_columns(const floating *per_channel, Py_ssize_t channels,
                                   Py_ssize_t nconst, const Interleaved *g, Py_ssize_t j0,
                                   Py_ssize_t ncols, floating *column) noexcept nogil:
    """Copy nconst per-channel constants (C apart) to a tile's columns
    (COLUMN_TILE apart), the layout the row loops read."""
    cdef Py_ssize_t j, t, c
    for j in range(ncols):
        c = ((j0 + j) % g.width) // g.inner   # the modulo: see packed_rows
        for t in range(nconst):
            column[t * COLUMN_TILE + j] = per_channel[t * channels + c]


cdef inline Py_ssize_t packed_rows(const Interleaved *g, Py_ssize_t ncols) noexcept nogil:
    """How many rows an elementwise pass may treat as one: narrow rows (a
    whole, single tile under 64 values) are contiguous, and a longer row of
    periodic constants turns 8-value loops with a call each into vector ones
    ((N, 8) eval ran at 0.45 of a streaming copy)."""
    if ncols == g.width and g.width < 64:
        return COLUMN_TILE // g.width
    return 1


cdef void interleaved_normalize_item(const floating *x, floating *y, const Interleaved *g,
                                     Py_ssize_t item, const floating *params,
                                     const AffineIn *a) noexcept nogil:
    """y = ((x - hi) - lo) * scale + shift for one item; params holds the
    per-channel constants (hi, lo, scale, shift, C apart)."""
    cdef floating column[4 * COLUMN_TILE]
    cdef Py_ssize_t r0 = 0, nrows = 0, j0 = 0, ncols = 0, start, pack, done
    item_span(g, item, &r0, &nrows, &j0, &ncols)
    pack = packed_rows(g, ncols)
    expand_to_columns(params, g.channels, 4, g, j0, ncols * pack, column)
    start = r0 * g.width + j0
    done = (nrows // pack) * pack
    if done:
        rows_affine(x, y, start, nrows // pack, g.width * pack, ncols * pack, column, a)
    if done < nrows:
        start = start + done * g.width
        rows_affine(x, y, start, nrows - done, g.width, ncols, column, a)
    if a.stream:
        bn_stream_fence()


cdef inline void rows_affine(const floating *x, floating *y, Py_ssize_t start,
                             Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t ncols,
                             const floating *column, const AffineIn *a) noexcept nogil:
    """bn_rows_affine (or the relu gate) from x[start] into y[start], with the
    constants laid out COLUMN_TILE apart."""
    cdef const floating *gate = <const floating *>a.gate
    cdef const floating *hi = column
    cdef const floating *lo = column + COLUMN_TILE
    cdef const floating *scale = column + 2 * COLUMN_TILE
    cdef const floating *shift = column + 3 * COLUMN_TILE
    if gate != NULL:
        if floating is float:
            bn_rows_relu_gate_f32(x + start, gate + start, y + start, nrows, stride, ncols,
                                  hi, lo, scale, shift, <float>a.gate_above, a.stream)
        else:
            bn_rows_relu_gate_f64(x + start, gate + start, y + start, nrows, stride, ncols,
                                  hi, lo, scale, shift, a.gate_above, a.stream)
    elif floating is float:
        bn_rows_affine_f32(x + start, y + start, nrows, stride, ncols, hi, lo, scale, shift,
                           a.relu, a.stream)
    else:
        bn_rows_affine_f64(x + start, y + start, nrows, stride, ncols, hi, lo, scale, shift,
                           a.relu, a.stream)


cdef void channel_params(const AffineIn *a, Py_ssize_t channels, Py_ssize_t c,
                         floating *params) noexcept nogil:
    """Channel c's constants: hi, lo, scale, shift at c, C + c, 2C + c, 3C + c."""
    affine_params(a, c, params + c, params + channels + c, params + 2 * channels + c,
                  params + 3 * channels + c)


cdef bint periodic_enabled = True      # set_periodic_loops
cdef bint row_groups_enabled = True    # set_row_groups


cdef inline Py_ssize_t periodic_period(const Interleaved *g, Py_ssize_t lanes) noexcept nogil:
    """The period of the flat loop, or 0 where the rows are walked instead:
    no AVX-512, or rows so wide that their pattern would not stay in L1
    (and their line boundaries are few). The least common multiple of the
    row width and a vector where it fits, so that every vector of the loop
    loads its constants from whole aligned lines, else the least multiple
    of the width that holds a vector."""
    cdef Py_ssize_t period
    if lanes == 0 or not periodic_enabled:
        return 0
    period = least_common_multiple(g.width, lanes)
    if period <= PERIODIC_MAX_VECTORS * lanes:
        return period
    period = ((lanes + g.width - 1) // g.width) * g.width
    return period if period <= PERIODIC_MAX_VECTORS * lanes else 0


cdef inline Py_ssize_t periodic_bytes(Py_ssize_t period, Py_ssize_t lanes, Py_ssize_t nconst,
                                      Py_ssize_t itemsize) noexcept nogil:
    """Room for a pattern of nconst constants and its alignment, 0 without one."""
    return (nconst * (period + lanes) * itemsize + 64) if period else 0


cdef void periodic_pattern(const floating *params, const Interleaved *g, Py_ssize_t period,
                           Py_ssize_t lanes, Py_ssize_t head, const int *order, int nconst,
                           floating *pattern) noexcept nogil:
    """Pattern columns [0, period + lanes) of nconst constants, each
    period + lanes apart (the periodic loops' layout): constant t is the
    per-channel constant order[t] of params (C apart). Column m is that of
    flat value head + m, so the vectors after the head start on a column
    that is a multiple of the vector."""
    cdef Py_ssize_t m, c
    cdef Py_ssize_t stretch = period + lanes
    cdef int t
    for m in range(stretch):
        c = ((head + m) % g.width) // g.inner
        for t in range(nconst):
            pattern[t * stretch + m] = params[order[t] * g.channels + c]


cdef inline Py_ssize_t periodic_bound(Py_ssize_t head, Py_ssize_t n, Py_ssize_t k, int nparts,
                                      Py_ssize_t lanes) noexcept nogil:
    """Where part k of the flat span starts: on a 64-byte line of the output
    past its head, so no line is written by two threads."""
    if k == 0:
        return 0
    if k == nparts:
        return n
    return head + ((n - head) * k // nparts) // lanes * lanes


cdef void periodic_affine_part(const floating *x, floating *y, Py_ssize_t n, Py_ssize_t head,
                               int k, int nparts, const floating *pattern, Py_ssize_t period,
                               Py_ssize_t lanes, int relu, int stream) noexcept nogil:
    """Part k of nparts of the flat affine loop; head: the values of y
    before its first line boundary (the pattern's column 0 is the value
    after them)."""
    cdef Py_ssize_t start = periodic_bound(head, n, k, nparts, lanes)
    cdef Py_ssize_t stop = periodic_bound(head, n, k + 1, nparts, lanes)
    cdef Py_ssize_t phase = (start - head + period) % period
    if floating is float:
        bn_periodic_affine_f32(x + start, y + start, stop - start, pattern, period, phase,
                               relu, stream)
    else:
        bn_periodic_affine_f64(x + start, y + start, stop - start, pattern, period, phase,
                               relu, stream)
    if stream:
        bn_stream_fence()


cdef void periodic_grad_part(const floating *x, const floating *dy, floating *dx,
                             Py_ssize_t n, Py_ssize_t head, int k, int nparts,
                             const floating *pattern, Py_ssize_t period, Py_ssize_t lanes,
                             int stream) noexcept nogil:
    """Part k of nparts of the flat training input gradient (as
    periodic_affine_part)."""
    cdef Py_ssize_t start = periodic_bound(head, n, k, nparts, lanes)
    cdef Py_ssize_t stop = periodic_bound(head, n, k + 1, nparts, lanes)
    cdef Py_ssize_t phase = (start - head + period) % period
    if floating is float:
        bn_periodic_grad_f32(x + start, dy + start, dx + start, stop - start, pattern, period,
                             phase, stream)
    else:
        bn_periodic_grad_f64(x + start, dy + start, dx + start, stop - start, pattern, period,
                             phase, stream)
    if stream:
        bn_stream_fence()


cdef inline Py_ssize_t row_groups_period(const Interleaved *g, Py_ssize_t lanes,
                                         Py_ssize_t period, int nthreads) noexcept nogil:
    """The width, where rows too wide for a periodic loop (period 0) are
    walked in row groups with the constants of every column (AVX-512 only),
    a row chunk an item, else 0."""
    if (lanes == 0 or period != 0 or not row_groups_enabled
            or g.width > ROW_GROUPS_MAX_WIDTH or g.rows < ROW_BLOCK
            or g.nchunks < nthreads):
        return 0
    return g.width


cdef void row_groups_affine_chunk(const floating *x, floating *y, const Interleaved *g,
                                  Py_ssize_t chunk, const floating *columns,
                                  Py_ssize_t lanes, int relu, int stream) noexcept nogil:
    """Row chunk `chunk` of the affine loop in row groups; columns: the
    constants of every column, width + lanes apart (periodic_pattern)."""
    cdef Py_ssize_t r0 = 0, nrows = 0, start
    chunk_row_span(g, chunk, &r0, &nrows)
    start = r0 * g.width
    if floating is float:
        bn_row_groups_affine_f32(x + start, y + start, nrows, g.width, g.width, columns,
                                 g.width + lanes, relu, stream)
    else:
        bn_row_groups_affine_f64(x + start, y + start, nrows, g.width, g.width, columns,
                                 g.width + lanes, relu, stream)
    if stream:
        bn_stream_fence()


cdef void row_groups_grad_chunk(const floating *x, const floating *dy, floating *dx,
                                const Interleaved *g, Py_ssize_t chunk,
                                const floating *columns, Py_ssize_t lanes,
                                int stream) noexcept nogil:
    """Row chunk `chunk` of the training input gradient in row groups (as
    row_groups_affine_chunk)."""
    cdef Py_ssize_t r0 = 0, nrows = 0, start
    chunk_row_span(g, chunk, &r0, &nrows)
    start = r0 * g.width
    if floating is float:
        bn_row_groups_grad_f32(x + start, dy + start, dx + start, nrows, g.width, g.width,
                               columns, g.width + lanes, stream)
    else:
        bn_row_groups_grad_f64(x + start, dy + start, dx + start, nrows, g.width, g.width,
                               columns, g.width + lanes, stream)
    if stream:
        bn_stream_fence()


# The periodic patterns' constants, as indices into the per-channel tables:
# the affine's (hi, lo, scale, shift); the training input gradient's (hi, lo,
# k, c1, c0); the eval input gradient's, dx = ((dy - 0) - 0) * k + 0 with c1
# and c0 both 0 there (as interleaved_grad_input_item's row loop).
cdef int AFFINE_ORDER[4]
cdef int GRAD_ORDER[5]
cdef int EVAL_GRAD_ORDER[4]
AFFINE_ORDER[:] = [0, 1, 2, 3]
GRAD_ORDER[:] = [0, 1, 2, 3, 4]
EVAL_GRAD_ORDER[:] = [3, 3, 2, 4]


cdef int interleaved_normalize(const floating *x, floating *y, const Interleaved *g,
                               const AffineIn *a, int nthreads) noexcept nogil:
    """Per-channel constants (4 C values), then the flat periodic loop, one
    contiguous part per thread, or row groups by row chunk, or every (row
    chunk, column tile) item. Returns -1 when the constants cannot be
    allocated."""
    cdef Py_ssize_t lanes = bn_periodic_lanes(sizeof(floating))
    # Neither for the relu gate, whose row loop reads dy too.
    cdef Py_ssize_t period = periodic_period(g, lanes) if a.gate == NULL else 0
    cdef Py_ssize_t groups = (row_groups_period(g, lanes, period, nthreads)
                              if a.gate == NULL else 0)
    cdef Py_ssize_t pattern_period = period or groups
    cdef Py_ssize_t n = g.rows * g.width
    cdef Py_ssize_t head = bn_line_head(y, sizeof(floating), n)
    # The pattern's column 0: for the periodic loop y's first value on a
    # line, for the row groups each row's first.
    cdef Py_ssize_t pattern_head = head if period else 0
    # The pattern after the per-channel constants, on a 64-byte boundary.
    cdef floating *params = <floating *>malloc(
        4 * g.channels * sizeof(floating)
        + periodic_bytes(pattern_period, lanes, 4, sizeof(floating)))
    cdef floating *pattern = params + 4 * g.channels
    cdef Py_ssize_t c, item
    cdef int k
    if params == NULL:
        return -1
    if pattern_period:
        pattern = pattern + bn_line_head(pattern, sizeof(floating), 64)
    if nthreads == 1:
        for c in range(g.channels):
            channel_params(a, g.channels, c, params)
    else:
        for c in prange(g.channels, num_threads=nthreads, schedule="static"):
            channel_params(a, g.channels, c, params)
    if pattern_period:
        periodic_pattern(params, g, pattern_period, lanes, pattern_head, AFFINE_ORDER, 4,
                         pattern)
    if period:
        if nthreads == 1:
            periodic_affine_part(x, y, n, head, 0, 1, pattern, period, lanes, a.relu,
                                 a.stream)
        else:
            for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
                periodic_affine_part(x, y, n, head, k, nthreads, pattern, period, lanes,
                                     a.relu, a.stream)
    elif groups:
        for item in prange(g.nchunks, num_threads=nthreads, schedule="static"):
            row_groups_affine_chunk(x, y, g, item, pattern, lanes, a.relu, a.stream)
    elif nthreads == 1:
        for item in range(g.nchunks * g.ntiles):
            interleaved_normalize_item(x, y, g, item, params, a)
    else:
        for item in prange(g.nchunks * g.ntiles, num_threads=nthreads, schedule="static"):
            interleaved_normalize_item(x, y, g, item, params, a)
    free(params)
    return 0


# --------------------------------------------------------------------------
# Backward. Per channel two float64 sums, S_dy = sum(dy) and
# S_dev = sum(dy * (x - mean)), over the same blocks and chunks as the
# statistics and added in a fixed order; then per value
#   dx = k * dy + ((x - mean) * c1 + c0),   k = weight * invstd,
#   c1 = -k * invstd^2 * S_dev / n,  c0 = -k * S_dy / n   (training),
# which is k * (dy - mean(dy) - xhat * mean(dy * xhat)) with the constants
# folded; in eval (frozen statistics) c1 = c0 = 0 and dx = k * dy.

cdef struct GradSums:
    double dy
    double dy_dev


cdef inline GradSums add_grad_sums(GradSums a, GradSums b) noexcept nogil:
    a.dy = a.dy + b.dy
    a.dy_dev = a.dy_dev + b.dy_dev
    return a


cdef inline void grad_constants(GradSums sums, double count, double mean, double invstd,
                                Params weight, Py_ssize_t c, bint training,
                                floating *hi, floating *lo, floating *k, floating *c1,
                                floating *c0) noexcept nogil:
    cdef double scale = param_at(weight, c, 1.0) * invstd
    hi[0] = <floating>mean
    lo[0] = <floating>(mean - <double>hi[0])
    k[0] = <floating>scale
    if training:
        c1[0] = <floating>(-scale * invstd * invstd * (sums.dy_dev / count))
        c0[0] = <floating>(-scale * (sums.dy / count))
    else:
        c1[0] = 0
        c0[0] = 0


cdef inline void grad_input_run(const floating *x, const floating *dy, floating *dx,
                                Py_ssize_t n, floating hi, floating lo, floating k,
                                floating c1, floating c0, bint training,
                                int stream) noexcept nogil:
    if training:
        if floating is float:
            bn_grad_input_f32(x, dy, dx, n, hi, lo, k, c1, c0, stream)
        else:
            bn_grad_input_f64(x, dy, dx, n, hi, lo, k, c1, c0, stream)
    else:
        # dx = dy * k: the input does not enter, so a NaN in it cannot either.
        if floating is float:
            bn_affine_f32(dy, dx, n, 0, 0, k, 0, 0, stream)
        else:
            bn_affine_f64(dy, dx, n, 0, 0, k, 0, 0, stream)


cdef struct BackwardArgs:
    # Inputs shared by every work item of one backward call.
    const double *mean
    const double *invstd    # NULL only with sums_only
    Params weight
    double *grad_weight     # out: S_dev * invstd (S_dev when invstd is NULL)
    double *grad_bias       # out: S_dy
    bint training
    int stream              # write grad_input with streaming stores
    # Split backward (a synchronized batch norm reduces the sums across
    # processes between the two halves):
    bint sums_only          # stop after the sums
    const double *given_dy  # or NULL; else the sums S_dy, S_dev to use, and
    const double *given_dev # the sum pass is skipped (nothing is stored)
    double count            # the number of values the sums run over
    const void *constants   # or NULL; else grad_constants' results per channel,
                            # (hi, lo, k, c1, c0) of the input type


cdef inline GradSums runs_grad_sums(const floating *x, const floating *dy, Py_ssize_t nruns,
                                    Py_ssize_t stride, Py_ssize_t n,
                                    double mean) noexcept nogil:
    """The two sums over nruns runs of n contiguous values, stride apart (a
    block): lanes carried from run to run, then totals in order."""
    cdef GradSums sums
    if floating is float:
        bn_block_grad_sums_f32(x, dy, nruns, stride, n, mean, &sums.dy, &sums.dy_dev)
    else:
        bn_block_grad_sums_f64(x, dy, nruns, stride, n, mean, &sums.dy, &sums.dy_dev)
    return sums


cdef inline GradSums zero_grad_sums() noexcept nogil:
    cdef GradSums sums
    sums.dy = 0.0
    sums.dy_dev = 0.0
    return sums


cdef inline void run_grad_input(const floating *x, const floating *dy, floating *dx,
                                Py_ssize_t n, Py_ssize_t c, const GradSums *totals,
                                const BackwardArgs *a) noexcept nogil:
    """dx of n values of channel c, with its constants from a.constants
    (grad_constants_table) or, where there is none, computed here."""
    cdef floating hi = 0, lo = 0, k = 0, c1 = 0, c0 = 0
    cdef const floating *known
    if a.constants != NULL:
        known = <const floating *>a.constants + 5 * c
        hi, lo, k, c1, c0 = known[0], known[1], known[2], known[3], known[4]
    else:
        grad_constants(totals[c], a.count, a.mean[c], a.invstd[c], a.weight,
                       c, a.training, &hi, &lo, &k, &c1, &c0)
    grad_input_run(x, dy, dx, n, hi, lo, k, c1, c0, a.training, a.stream)


cdef inline void channel_grad_constants(const GradSums *totals, Py_ssize_t c,
                                        const BackwardArgs *a,
                                        floating *table) noexcept nogil:
    """Channel c's grad_constants (hi, lo, k, c1, c0) into table[5c:5c + 5]."""
    cdef floating *t = table + 5 * c
    grad_constants(totals[c], a.count, a.mean[c], a.invstd[c], a.weight, c, a.training,
                   t, t + 1, t + 2, t + 3, t + 4)


cdef floating *grad_constants_table(const floating *x, const GradSums *totals, const Planar *g,
                                    const BackwardArgs *a, int nthreads) noexcept nogil:
    """Every channel's grad_constants (hi, lo, k, c1, c0), computed once for
    the input gradient of row chunks, which would compute them run by run
    (two divisions each); or NULL where memory is short, and they are, with
    the same bits. (x only names the type.)"""
    cdef floating *table = <floating *>malloc(5 * g.channels * sizeof(floating))
    cdef Py_ssize_t c
    if table == NULL:
        return NULL
    if nthreads == 1 or g.channels < TABLE_PARALLEL_CHANNELS:
        for c in range(g.channels):
            channel_grad_constants(totals, c, a, table)
    else:
        for c in prange(g.channels, num_threads=nthreads, schedule="static"):
            channel_grad_constants(totals, c, a, table)
    return table


cdef GradSums planar_chunk_grad_sums(const floating *x, const floating *dy, const Planar *g,
                                     Py_ssize_t c, Py_ssize_t chunk,
                                     double mean) noexcept nogil:
    """Chunk sums: the sums of its blocks added in row order. A block is
    the statistics' block of whole runs (runs of at most BLOCK_LEN values)
    or, for longer runs, the chunk's part of one run."""
    cdef Span s = chunk_span(g, chunk)
    cdef Py_ssize_t n = s.n0, nrows, start, first = s.p0 * BLOCK_LEN
    cdef GradSums sums = zero_grad_sums()
    if g.pieces_per_run > 1:
        for n in range(s.n0, s.n1):
            start = run_start(g, n, c) + first
            sums = add_grad_sums(sums, runs_grad_sums(x + start, dy + start, 1, 0,
                                                      pieces_end(g, s.p1) - first, mean))
        return sums
    while n < s.n1:
        nrows = block_rows(g, n, s.n1)
        start = run_start(g, n, c)
        sums = add_grad_sums(sums, runs_grad_sums(x + start, dy + start, nrows,
                                                  g.channels * g.inner, g.inner, mean))
        n = n + nrows
    return sums


cdef bint lane_groups_enabled = True     # set_lane_groups


cdef void lane_group_grad_sums(const floating *x, const floating *dy, const Planar *g,
                               Span s, Py_ssize_t k, Py_ssize_t c0, Py_ssize_t c1,
                               const double *mean, GradSums *table,
                               bint tiled) noexcept nogil:
    """Chunk k's sums of channels [c0, c1), at most LANE_GROUP of them: the
    blocks of whole runs of all of them at once, row by row in memory order,
    each channel's lane sums carried from run to run (one call of
    bn_group_grad_sums per block). Each channel sees the sums of
    planar_chunk_grad_sums in its order, so its bits.

    Each block's walk asks for the runs it reads next: after its last row,
    the next group's in the same rows (the two passes walk chunk by chunk),
    or, `tiled` (group_tile walks the group's rows down the tensor),
    the next block's rows of the group, and after the tensor's last row the
    first row of the next group.

    A channel at a time reads two runs per row of the chunk, a row's width
    apart: 32 streams in chunks of 16 rows, more than the prefetchers
    follow. The sums of (996, 256, 7, 7) float32 took 4.5-5.5 streaming-copy
    times that way, 2.9-3.1 this way on one thread (3.2-3.5 against
    1.9-2.1 on two); (512, 512, 7, 7), 16 streams, 2.6-3.0 against
    2.4-2.9. (The statistics read one tensor, so 8-16 streams in such
    chunks; this way measured 20-45 % slower for them on (512, 512, 7, 7)
    and (256, 256, 14, 14), so they stay a channel at a time.) With a
    channel's lanes kept in registers through its block (bn_block_grad_sums),
    a channel at a time still took 3.8-4.0 against 2.7-2.8 this way on (996,
    256, 7, 7), one thread."""
    cdef bn_lane_pair lanes[LANE_GROUP]
    cdef Py_ssize_t n = s.n0, c, start, nrows, nchunks = g.chunks_per_channel
    cdef Py_ssize_t stride = g.channels * g.inner, after
    cdef Py_ssize_t ask_max_bytes = GROUP_SUMS_ASK_MAX_BYTES
    cdef GradSums block
    if tiled:
        ask_max_bytes = g.inner * <Py_ssize_t>sizeof(floating)
    for c in range(c0, c1):
        table[c * nchunks + k] = zero_grad_sums()
    while n < s.n1:
        nrows = block_rows(g, n, s.n1)
        for c in range(c1 - c0):
            clear_lanes(lanes[c].a, lanes[c].b)
        start = run_start(g, n, c0)
        # From the block's first run of channel c0 (tiled walks take rows
        # to the tensor's end, then the next group from row 0).
        after = (c1 - c0) * g.inner
        if tiled and n + nrows < g.outer:
            after = nrows * stride
        elif tiled:
            after = after - n * stride
        if floating is float:
            bn_group_grad_sums_f32(x + start, dy + start, nrows, stride, c1 - c0, g.inner,
                                   mean + c0, lanes, after, ask_max_bytes)
        else:
            bn_group_grad_sums_f64(x + start, dy + start, nrows, stride, c1 - c0, g.inner,
                                   mean + c0, lanes, after, ask_max_bytes)
        for c in range(c0, c1):
            block.dy = bn_lanes_total(lanes[c - c0].a)
            block.dy_dev = bn_lanes_total(lanes[c - c0].b)
            table[c * nchunks + k] = add_grad_sums(table[c * nchunks + k], block)
        n = n + nrows


cdef void planar_rows_grad_sums(const floating *x, const floating *dy, const Planar *g,
                                Py_ssize_t item, int ngroups, const BackwardArgs *a,
                                GradSums *table) noexcept nogil:
    """Item `item` of the row chunks: chunk k of a group of channels, into
    the chunk table (as planar_rows_moments)."""
    cdef Py_ssize_t k = item // ngroups
    cdef Py_ssize_t nchunks = g.chunks_per_channel
    cdef Span s = chunk_span(g, k)
    cdef Py_ssize_t n, c, start, c0 = 0, c1 = 0
    group_channels(g, item % ngroups, ngroups, &c0, &c1)
    if one_run_blocks(g):
        for c in range(c0, c1):
            table[c * nchunks + k] = zero_grad_sums()
        for n in range(s.n0, s.n1):
            for c in range(c0, c1):
                start = run_start(g, n, c)
                table[c * nchunks + k] = add_grad_sums(
                    table[c * nchunks + k],
                    runs_grad_sums(x + start, dy + start, 1, 0, g.inner, a.mean[c]))
        return
    if lane_groups_enabled:
        c = c0
        while c < c1:
            lane_group_grad_sums(x, dy, g, s, k, c, min(c + LANE_GROUP, c1), a.mean, table,
                                 False)
            c = c + LANE_GROUP
        return
    for c in range(c0, c1):
        table[c * nchunks + k] = planar_chunk_grad_sums(x, dy, g, c, k, a.mean[c])


cdef void planar_chunk_grad_input(const floating *x, const floating *dy, floating *dx,
                                  const Planar *g, Py_ssize_t c, Py_ssize_t chunk,
                                  const GradSums *totals, const BackwardArgs *a) noexcept nogil:
    cdef Span s = chunk_span(g, chunk)
    cdef Py_ssize_t n, start, first = s.p0 * BLOCK_LEN
    cdef Py_ssize_t length = pieces_end(g, s.p1) - first
    for n in range(s.n0, s.n1):
        start = run_start(g, n, c) + first
        run_grad_input(x + start, dy + start, dx + start, length, c, totals, a)
    if a.stream:
        bn_stream_fence()


cdef inline void grad_runs(const floating *x, const floating *dy, floating *dx,
                           Py_ssize_t start, Py_ssize_t nvalues, Py_ssize_t n,
                           const floating *constants, int stream) noexcept nogil:
    """The input gradient of the nvalues from `start`, runs of n values
    side by side written as one stream (bn_grad_runs), constants holding
    (hi, lo, k, c1, c0) of the first run's channel and those after it."""
    if floating is float:
        bn_grad_runs_f32(x + start, dy + start, dx + start, nvalues, n, constants, stream)
    else:
        bn_grad_runs_f64(x + start, dy + start, dx + start, nvalues, n, constants, stream)


cdef inline void grad_each_run(const floating *x, const floating *dy, floating *dx,
                               Py_ssize_t start, Py_ssize_t nruns, Py_ssize_t n,
                               const floating *constants) noexcept nogil:
    """The input gradient of nruns runs of n values side by side from
    `start`, one run after the other in one call (bn_grad_each_run; normal
    stores), constants as grad_runs'."""
    if floating is float:
        bn_grad_each_run_f32(x + start, dy + start, dx + start, nruns, n, constants)
    else:
        bn_grad_each_run_f64(x + start, dy + start, dx + start, nruns, n, constants)


cdef void planar_rows_grad_input(const floating *x, const floating *dy, floating *dx,
                                 const Planar *g, Py_ssize_t item, int ngroups,
                                 const GradSums *totals, const BackwardArgs *a,
                                 Py_ssize_t row_runs) noexcept nogil:
    """The input gradient of a row chunk's group of channels: with row_runs
    > 0, each row's runs as one stream, row_runs rows a call (bn_grad_runs;
    a.constants is the table, as planar_rows_affine's), else in cache each
    row's runs in one call (each_run_in_one_call), else run by run."""
    cdef Span s = chunk_span(g, item // ngroups)
    cdef Py_ssize_t n = s.n0, c, start, nvalues, c0 = 0, c1 = 0
    cdef const floating *table = <const floating *>a.constants
    group_channels(g, item % ngroups, ngroups, &c0, &c1)
    if row_runs > 0:
        while n < s.n1:
            start = run_start(g, n, c0)
            nvalues = min(row_runs, s.n1 - n) * (c1 - c0) * g.inner
            grad_runs(x, dy, dx, start, nvalues, g.inner, table + 5 * c0, a.stream)
            n = n + row_runs
        if a.stream:
            bn_stream_fence()
        return
    if (a.training and a.constants != NULL
            and each_run_in_one_call(a.stream, sizeof(floating))):
        for n in range(s.n0, s.n1):
            start = run_start(g, n, c0)
            grad_each_run(x, dy, dx, start, c1 - c0, g.inner, table + 5 * c0)
        return
    for n in range(s.n0, s.n1):
        for c in range(c0, c1):
            start = run_start(g, n, c)
            run_grad_input(x + start, dy + start, dx + start, g.inner, c, totals, a)
    if a.stream:
        bn_stream_fence()


cdef inline void store_param_grads(GradSums sums, Py_ssize_t c,
                                   const BackwardArgs *a) noexcept nogil:
    a.grad_bias[c] = sums.dy
    a.grad_weight[c] = sums.dy_dev if a.invstd == NULL else sums.dy_dev * a.invstd[c]


cdef inline GradSums given_sums(const BackwardArgs *a, Py_ssize_t c) noexcept nogil:
    cdef GradSums sums
    sums.dy = a.given_dy[c]
    sums.dy_dev = a.given_dev[c]
    return sums


cdef inline GradSums chunks_total(const GradSums *chunks, Py_ssize_t nchunks) noexcept nogil:
    """A channel's chunk sums chunks[0:nchunks] added in order."""
    cdef GradSums total = zero_grad_sums()
    cdef Py_ssize_t k
    for k in range(nchunks):
        total = add_grad_sums(total, chunks[k])
    return total


cdef inline void finish_grad_channel(const GradSums *table, const Planar *g, Py_ssize_t c,
                                     GradSums *totals, const BackwardArgs *a) noexcept nogil:
    """Add channel c's chunk sums in order; store its parameter gradients."""
    totals[c] = chunks_total(table + c * g.chunks_per_channel, g.chunks_per_channel)
    store_param_grads(totals[c], c, a)


cdef inline bint grad_rows_as_runs(const Planar *g, const BackwardArgs *a,
                                   Py_ssize_t itemsize) noexcept nogil:
    """rows_as_runs for the backward: a training one (eval's dx = dy * k
    stays run by run)."""
    return a.training and rows_as_runs(g, a.stream, itemsize, GRAD_ROW_RUNS_MAX_BYTES)


cdef inline void planar_grad_sums_item(const floating *x, const floating *dy, const Planar *g,
                                       Py_ssize_t item, int ngroups, const BackwardArgs *a,
                                       GradSums *table) noexcept nogil:
    """Work item `item` of the sum pass: a row chunk's group of channels
    (row chunks), else a channel's chunk."""
    cdef Py_ssize_t nchunks = g.chunks_per_channel
    if g.rows_per_chunk > 0:
        planar_rows_grad_sums(x, dy, g, item, ngroups, a, table)
    else:
        table[item] = planar_chunk_grad_sums(x, dy, g, item // nchunks, item % nchunks,
                                             a.mean[item // nchunks])


cdef inline void planar_grad_input_item(const floating *x, const floating *dy, floating *dx,
                                        const Planar *g, Py_ssize_t item, int ngroups,
                                        const GradSums *totals, const BackwardArgs *a,
                                        Py_ssize_t row_runs) noexcept nogil:
    """Work item `item` of the input gradient, as planar_grad_sums_item's."""
    cdef Py_ssize_t nchunks = g.chunks_per_channel
    if g.rows_per_chunk > 0:
        planar_rows_grad_input(x, dy, dx, g, item, ngroups, totals, a, row_runs)
    else:
        planar_chunk_grad_input(x, dy, dx, g, item // nchunks, item % nchunks, totals, a)


cdef int planar_backward(const floating *x, const floating *dy, floating *dx,
                         const Planar *g, const BackwardArgs *a, int requested) noexcept nogil:
    cdef Py_ssize_t nchunks = g.chunks_per_channel
    cdef Py_ssize_t nvalues = g.outer * g.channels * g.inner
    cdef int nthreads = backward_team_size(requested, g.channels * nchunks, nvalues)
    cdef int ngroups = row_groups(g, nthreads)
    cdef Py_ssize_t nitems = nchunks * ngroups if g.rows_per_chunk > 0 else g.channels * nchunks
    # In cache, row chunks go in the static shares of planar_normalize: each
    # thread reads its share for the sums, then again, from its own L2, for
    # the input gradient. Two threads, float32, against dynamic shares: (64,
    # 128, 4, 4) 0.63 of the time, (16, 64, 56, 56) 0.68, (1, 64, 56, 56)
    # 0.76, (32, 256, 7, 7) 0.77, (8, 64, 28, 28) 0.79, (32, 64, 14, 14)
    # 0.86; one thread even. (The training forward's statistics in static
    # shares measured 0.91-1.06: left dynamic.)
    cdef bint static_shares = g.rows_per_chunk > 0 and not a.stream
    cdef Py_ssize_t item, c
    # One chunk a channel (few or short rows): the chunk sums become the
    # totals in place (finish_grad_channel reads a channel's chunk before it
    # writes its total), a table of C entries instead of 2C.
    cdef Py_ssize_t ntotals = 0 if nchunks == 1 else g.channels
    cdef GradSums *table = <GradSums *>malloc((g.channels * nchunks + ntotals)
                                              * sizeof(GradSums))
    cdef GradSums *totals
    cdef BackwardArgs rows = a[0]
    cdef Py_ssize_t row_runs = 0
    cdef void *constants
    if table == NULL:
        return -1
    totals = table + g.channels * nchunks if ntotals > 0 else table
    # A team of one runs the serial twins of the loops, as the forward's.
    if a.given_dy != NULL:
        for c in range(g.channels):
            totals[c] = given_sums(a, c)
    elif nthreads == 1:
        for item in range(nitems):
            planar_grad_sums_item(x, dy, g, item, ngroups, a, table)
        for c in range(g.channels):
            finish_grad_channel(table, g, c, totals, a)
    else:
        if static_shares:
            for item in prange(nitems, num_threads=nthreads, schedule="static"):
                planar_grad_sums_item(x, dy, g, item, ngroups, a, table)
        else:
            for item in prange(nitems, num_threads=nthreads, schedule="dynamic"):
                planar_grad_sums_item(x, dy, g, item, ngroups, a, table)
        for c in prange(g.channels, num_threads=nthreads, schedule="static"):
            finish_grad_channel(table, g, c, totals, a)
    if a.sums_only:
        free(table)
        return 0
    if g.rows_per_chunk > 0:
        constants = grad_constants_table(x, totals, g, a, nthreads)
        if constants != NULL and grad_rows_as_runs(g, a, sizeof(floating)):
            row_runs = repeat_table(&constants, 5 * g.channels * sizeof(floating),
                                    rows_per_call(g, ngroups, sizeof(floating)))
        rows.constants = constants
        rows.stream = row_chunk_stream(g, a.stream, row_runs > 0, sizeof(floating))
    if nthreads == 1:
        for item in range(nitems):
            planar_grad_input_item(x, dy, dx, g, item, ngroups, totals, &rows, row_runs)
    elif static_shares:
        for item in prange(nitems, num_threads=nthreads, schedule="static"):
            planar_grad_input_item(x, dy, dx, g, item, ngroups, totals, &rows, row_runs)
    else:
        for item in prange(nitems, num_threads=nthreads, schedule="dynamic"):
            planar_grad_input_item(x, dy, dx, g, item, ngroups, totals, &rows, row_runs)
    if g.rows_per_chunk > 0:
        free(<void *>rows.constants)
    free(table)
    return 0


# --------------------------------------------------------------------------
# The channel-tiled training backward (planar, row chunks): a work item is
# a range of consecutive channels, taken one at a time. A channel's gradient
# sums are read from memory, each run asking for the one some runs on (into
# L2); then its dx is written from cache, last row first (the rows read
# last are the likeliest still in L2); so the memory sees x and dy read once
# and dx written, instead of x and dy read twice. The block sums (lanes
# carried from run to run), chunk sums and total are added exactly as
# planar_rows_grad_sums and finish_grad_channel add them: the bits of the
# two-pass path.
#
# It replaced a pipelined walk that wrote channel c's dx in the same loop as
# it read channel c + 1's sums (the forward's design): the two streams in
# one loop ran no faster than one after the other, and the loop's reads of
# the two channels could alias modulo 4 KiB. Tiled against pipelined, of
# the same runs, float32, one / two threads, (64, 256, 28, 28) 0.97-0.98 /
# 0.97 of the time, (128, 128, 56, 56) 0.92-0.93 / 0.92, (32, 128, 56, 56)
# 0.93 / 0.98, (64, 64, 56, 56) 0.95 / 1.00, (64, 128, 32, 32) 0.81;
# float64 (64, 256, 28, 28) 0.97 / 0.98, (32, 64, 56, 56) 0.81 / 1.00, (128,
# 256, 14, 14) 0.75 / 0.74; in cache, float64 on two threads 0.89-0.92,
# float32 (8, 32, 14, 14) on two 1.04: both walks in one experiment build,
# interleaved in one process. Two builds timed in blocks of calls, float32
# read about even (0.91-1.06 on one thread, 0.87-1.12 on two), float64
# from memory on one thread 0.77-0.80 of the time.

cdef inline const floating *beside(const floating *run, const floating *x,
                                   const floating *other) noexcept nogil:
    """The run of `other` at the position of x's `run` (NULL for NULL)."""
    if run == NULL:
        return NULL
    return other + (run - x)


cdef inline void grad_head_seam(const floating *xn, const floating *dyn, floating *dxn,
                                Py_ssize_t n, const floating *before,
                                const floating *now) noexcept nogil:
    """As affine_head_seam, for the input gradient: `before` and `now` hold
    (hi, lo, k, c1, c0)."""
    cdef Py_ssize_t line = BN_LINE_BYTES // sizeof(floating)
    cdef Py_ssize_t head = bn_line_head(dxn, sizeof(floating), n)
    if head == 0:
        return
    if floating is float:
        bn_grad_seam_f32(xn + head - line, dyn + head - line, dxn + head - line,
                         <int>(line - head), before, now)
    else:
        bn_grad_seam_f64(xn + head - line, dyn + head - line, dxn + head - line,
                         <int>(line - head), before, now)


cdef void tiled_grad_sums(const floating *x, const floating *dy, const Planar *g,
                          Py_ssize_t c, Py_ssize_t c_end, double mean, Py_ssize_t ahead,
                          GradSums *chunks) noexcept nogil:
    """Channel c's chunk sums into chunks, read run by run from memory, each
    run asking for the one `ahead` runs on (into channels up to c_end)."""
    cdef bn_lanes lanes_dy
    cdef bn_lanes lanes_dev
    cdef GradSums block
    cdef Py_ssize_t chunk, n
    cdef const floating *xs
    cdef const floating *next_x
    cdef Span s
    clear_lanes(lanes_dy, lanes_dev)
    for chunk in range(g.chunks_per_channel):
        s = chunk_span(g, chunk)
        chunks[chunk] = zero_grad_sums()
        for n in range(s.n0, s.n1):
            xs = x + run_start(g, n, c)
            next_x = run_after(x, g, n, c, c_end, ahead)
            if floating is float:
                bn_grad_sums_and_input_f32(xs, beside(xs, x, dy), g.inner, mean, lanes_dy,
                                           lanes_dev, next_x, beside(next_x, x, dy),
                                           NULL, NULL, NULL, 0, 0, 0, 0, 0, 0, 0)
            else:
                bn_grad_sums_and_input_f64(xs, beside(xs, x, dy), g.inner, mean, lanes_dy,
                                           lanes_dev, next_x, beside(next_x, x, dy),
                                           NULL, NULL, NULL, 0, 0, 0, 0, 0, 0, 0)
            if block_end_at(g, n, s) > 0:
                # As runs_grad_sums: a block's lanes totalled, added to the
                # chunk's in row order.
                block.dy = bn_lanes_total(lanes_dy)
                block.dy_dev = bn_lanes_total(lanes_dev)
                chunks[chunk] = add_grad_sums(chunks[chunk], block)
                clear_lanes(lanes_dy, lanes_dev)


cdef void tiled_grad_input(const floating *x, const floating *dy, floating *dx,
                           const Planar *g, Py_ssize_t c, int ends, const floating *k,
                           const floating *k_before,
                           int stream) noexcept nogil:
    """Channel c's dx from the constants k (hi, lo, k, c1, c0), last row
    first, leaving each run's end lines `ends` (seam_ends; k_before holds
    channel c - 1's constants for the first one's seam)."""
    cdef Py_ssize_t run_bytes = g.inner * <Py_ssize_t>sizeof(floating)
    cdef Py_ssize_t n
    cdef const floating *xn
    cdef const floating *next_dx
    for n in range(g.outer - 1, -1, -1):
        xn = x + run_start(g, n, c)
        if ends & BN_LEAVE_HEAD:
            grad_head_seam(xn, beside(xn, x, dy), <floating *>beside(xn, x, dx), g.inner,
                           k_before, k)
        if n > 0 and 2 * g.outer * run_bytes > PIPE_L2_SLICE:
            next_dx = x + run_start(g, n - 1, c)
            # Into L2 when a channel's x and dy do not fit in it (from L3).
            # Where they do, asking for the next run into L1 gained nothing:
            # float32 (64,256,28,28), (32,128,32,32) and (16,64,56,56) took
            # 0.93-1.08 of the time on one thread and 0.96-1.08 on two
            # (Zen 5, measured with the pipelined walk).
            bn_prefetch_to_l2(next_dx, run_bytes)
            bn_prefetch_to_l2(beside(next_dx, x, dy), run_bytes)
        if floating is float:
            bn_grad_sums_and_input_f32(NULL, NULL, g.inner, 0.0, NULL, NULL, NULL, NULL,
                                       xn, beside(xn, x, dy), <float *>beside(xn, x, dx),
                                       k[0], k[1], k[2], k[3], k[4], stream, ends)
        else:
            bn_grad_sums_and_input_f64(NULL, NULL, g.inner, 0.0, NULL, NULL, NULL, NULL,
                                       xn, beside(xn, x, dy), <double *>beside(xn, x, dx),
                                       k[0], k[1], k[2], k[3], k[4], stream, ends)


cdef void tiled_backward_item(const floating *x, const floating *dy, floating *dx,
                              const Planar *g, Py_ssize_t c0, Py_ssize_t c1,
                              const BackwardArgs *a) noexcept nogil:
    """Channels [c0, c1), each one's sums and then its dx. One channel's
    chunk sums at a time, on the stack (row chunks: at most
    MAX_ROW_CHUNKS), so the call allocates nothing."""
    cdef GradSums chunks[MAX_ROW_CHUNKS]
    cdef GradSums total
    cdef floating k[5]          # (hi, lo, k, c1, c0) of the channel whose dx is written
    cdef floating k_before[5]   # ... of the channel before it
    cdef Py_ssize_t c
    cdef Py_ssize_t ahead = runs_ahead(g, sizeof(floating))
    cdef int stream = a.stream and not short_split_runs(g, sizeof(floating))
    cdef bint seams = can_seam(stream, g.inner, sizeof(floating))
    memset(k, 0, sizeof(k))
    for c in range(c0, c1):
        tiled_grad_sums(x, dy, g, c, c1, a.mean[c], ahead, chunks)
        total = chunks_total(chunks, g.chunks_per_channel)
        store_param_grads(total, c, a)
        # Training only (use_tiled_backward): eval's dx is dy * k alone.
        memcpy(k_before, k, sizeof(k))
        grad_constants(total, a.count, a.mean[c], a.invstd[c], a.weight, c, True,
                       &k[0], &k[1], &k[2], &k[3], &k[4])
        tiled_grad_input(x, dy, dx, g, c, seam_ends(c, c0, c1) if seams else 0, k, k_before,
                         stream)
    if a.stream:
        bn_stream_fence()


cdef Py_ssize_t tiled_backward_items = 0    # 0: one per thread (set_tiled_backward)


cdef void planar_backward_tiled(const floating *x, const floating *dy, floating *dx,
                                const Planar *g, const BackwardArgs *a,
                                int nthreads) noexcept nogil:
    cdef Py_ssize_t item
    cdef Py_ssize_t nitems = tiled_backward_items if tiled_backward_items > 0 else nthreads
    nitems = min(nitems, g.channels)
    for item in prange(nitems, num_threads=nthreads, schedule="static", chunksize=1):
        tiled_backward_item(x, dy, dx, g, item * g.channels // nitems,
                            (item + 1) * g.channels // nitems, a)


cdef int tiled_backward_mode = -1   # -1: by size; 0: never; 1: whenever possible
cdef Py_ssize_t tiled_calls = 0    # tiled_backward_calls


cdef inline Py_ssize_t pipe_min_run_bytes(Py_ssize_t itemsize, Py_ssize_t float64_bytes,
                                          bint row_runs) noexcept nogil:
    """The shortest runs a pipelined pass takes by size: float64's own
    minimum, float32's for runs that the two passes write a row at a time
    (row_runs) or one at a time."""
    if itemsize != sizeof(float):
        return float64_bytes
    return PIPE_MIN_ROW_RUN_BYTES if row_runs else PIPE_MIN_RUN_BYTES


cdef inline Py_ssize_t pipe_max_slice(Py_ssize_t run_bytes) noexcept nogil:
    """The largest channel the pipelined forward takes by size: larger where
    its runs are long (PIPE_MAX_SLICE_LONG_RUNS; the constants say why)."""
    if run_bytes >= PIPE_LONG_RUN_BYTES:
        return PIPE_MAX_SLICE_LONG_RUNS
    return PIPE_MAX_SLICE


cdef inline bint sums_then_dx_in_row_chunks(const Planar *g,
                                            const BackwardArgs *a) noexcept nogil:
    """Whether a backward call computes its gradient sums and then its dx, over
    runs in row chunks: what both tiled walks need. Not eval (dx = dy * k
    needs no sums), nor either half of a split backward, nor the long-run
    chunking."""
    return a.training and not a.sums_only and a.given_dy == NULL and g.rows_per_chunk > 0


cdef bint use_tiled_backward(const Planar *g, const BackwardArgs *a, Py_ssize_t itemsize,
                             int nthreads) noexcept nogil:
    """Whether the channel-tiled backward pays.

    It needs a training backward that computes its sums and writes dx (not
    eval, where dx = dy * k needs no sums, nor either half of a split
    backward), over runs in row chunks (the long-run chunking is not
    tiled). The rule was measured for the pipelined walk that the tiled one
    replaced, which the tiled walk matched (float32) or beat (float64) on
    the same calls (the section's comment). For the pipelined walk: the
    size rule is the forward's, measured again for the backward
    (benchmarks/results/pipelined_backward.md), float32, 1 and 2 threads:
    channels of 0.1-1.6 MB (of x) gain 3-46 % with streaming stores, 3.2
    and 6.4 MB break even (-3 to +10 %). On Zen 5, tiled against two passes,
    of the bound, one / two threads, channels of 3.2 MB gain: float32 (16,
    32, 224, 224) 0.67 / 0.78 against 0.63 / 0.59, (256, 64, 56, 56) 0.61 /
    0.79 against 0.56 / 0.68, float64 (128, 128, 56, 56) 0.71 / 0.71 against
    0.61 / 0.60, (8, 32, 224, 224) 0.63 / 0.86 against 0.51 / 0.69; 4.0 MB
    is mixed, float64 (160, 64, 56, 56) 0.64 / 0.72 against 0.58 / 0.61 but
    float32 (320, 64, 56, 56) 0.59 / 0.70 against 0.64 / 0.62; from 4.8 MB
    it loses with short runs, float32 (384, 64, 56, 56) 0.57 / 0.56 against
    0.64 / 0.66, and with long ones on two threads, (32, 32, 224, 224) 0.63
    / 0.53 against 0.59 / 0.65: hence PIPE_MAX_GRAD_SLICE, between 3.2 and
    4.0 MB. Unlike the forward's, it pays with
    normal stores too, which the default gives outputs under
    STREAM_MIN_BYTES, there from cache: 0-35 % on 6 MB tensors. float64
    needs longer runs (PIPE_MIN_GRAD_RUN_BYTES_F64), longer still on one
    thread.

    On Zen 5, since the two-pass backward's loops were rewritten, float32
    in cache (normal stores) no longer gains: two passes against the
    pipeline, one / two threads, (32, 128, 14, 14) 0.73 / 0.79 of the time,
    (64, 64, 28, 28) 0.72 / 0.81, (32, 64, 14, 14) 0.74 / 0.86, (16, 128,
    28, 28) 0.83 / 0.89, (8, 128, 56, 56) 0.91 / 0.98, (16, 64, 56, 56)
    0.90 / 1.02; against the tiled walk, one thread, (32, 64, 14, 14) 0.72
    / 0.54 of the bound, (16, 128, 28, 28) 0.73 / 0.53. Float64 in cache
    still gains on two threads, and from memory both do: the tiled walk
    against two passes, two threads, float32 1.19-1.33x as fast, float64
    1.17-1.29x; one thread, float32 0.97-1.06x, float64 1.12-1.17x. Small
    float32 calls on two threads still gain
    (PIPE_MAX_BACKWARD_BYTES_IN_CACHE_F32). Float64 in cache on one thread
    does not: two passes against the tiled walk, (16, 64, 28, 28) 0.88 of
    the time, (8, 64, 28, 28) 0.94, (8, 128, 28, 28) 0.82, (4, 64, 56, 56)
    0.95, (16, 128, 28, 28) 0.88 (benchmarks/results/pipelined_backward.py
    --dtype float64 --threads 1 with those shapes shows the ratio).
    """
    if tiled_backward_mode == 0 or not sums_then_dx_in_row_chunks(g, a):
        return False
    if tiled_backward_mode == 1:
        return True
    if not a.stream and (nthreads == 1 or (
            itemsize == sizeof(float) and g.outer * g.channels * g.inner * itemsize
            >= PIPE_MAX_BACKWARD_BYTES_IN_CACHE_F32)):
        return False
    return (bn_pipelined_fused() and g.channels >= PIPE_MIN_CHANNELS * nthreads
            and g.inner * itemsize >= pipe_min_run_bytes(
                itemsize, PIPE_MIN_GRAD_RUN_BYTES_F64 if nthreads >= 2
                else PIPE_MIN_GRAD_RUN_BYTES_F64_ONE_THREAD, grad_rows_as_runs(g, a, itemsize))
            and g.outer * g.inner * itemsize <= PIPE_MAX_GRAD_SLICE)


# --------------------------------------------------------------------------
# The group-tiled training backward: the channel-tiled walk's plan for row
# chunks of short runs, whose channel-at-a-time reads (two runs a row,
# strides apart) the prefetchers do not follow. A tile is a group of
# channels (at most LANE_GROUP) whose x and dy fit in L2: their gradient
# sums are read from memory down the tensor, chunk by chunk, by the lane
# group walk of the two passes (lane_group_grad_sums, each block asking for
# the next one's runs); then their dx is written from L2, last row first,
# each row's runs of the tile as one stream (bn_grad_runs, as the two
# passes' row_runs). The chunk sums, totals and constants are those of the
# two passes, added in the same order: their bits.


cdef int group_tiled_mode = -1          # set_group_tiled_backward
cdef Py_ssize_t group_tile_bytes = GROUP_TILE_BYTES
cdef Py_ssize_t group_tiled_calls = 0   # group_tiled_backward_calls


cdef inline Py_ssize_t group_tile_channels(const Planar *g, Py_ssize_t itemsize,
                                           int nthreads, bint stream) noexcept nogil:
    """The channels of a tile: as many as hold group_tile_bytes of x and dy,
    at least one, at most LANE_GROUP. Chosen by size in cache on a team,
    at most GROUP_TILE_BYTES_IN_CACHE, and fewer where that shares the
    tiles evenly among the threads: such a call is a few tiles, and a
    thread with one tile more keeps the others waiting ((32, 256, 7, 7)
    float32 on two threads, seven tiles of 41 channels took 1.08 of the
    two passes' time)."""
    cdef Py_ssize_t per_channel = 2 * g.outer * g.inner * itemsize
    cdef bint in_cache_team = not stream and nthreads >= 2 and group_tiled_mode == -1
    cdef Py_ssize_t tile_bytes = group_tile_bytes
    cdef Py_ssize_t tile, rounds
    if in_cache_team:
        tile_bytes = min(tile_bytes, <Py_ssize_t>GROUP_TILE_BYTES_IN_CACHE)
    tile = max(<Py_ssize_t>1, min(<Py_ssize_t>LANE_GROUP, tile_bytes // per_channel))
    if not in_cache_team:
        return tile
    # The fewest rounds of one tile a thread whose tiles hold at most `tile`.
    rounds = (g.channels + tile * nthreads - 1) // (tile * nthreads)
    return (g.channels + rounds * nthreads - 1) // (rounds * nthreads)


cdef bint use_group_tiled_backward(const Planar *g, const BackwardArgs *a,
                                   Py_ssize_t itemsize, int nthreads) noexcept nogil:
    """Whether the group-tiled backward pays.

    It needs a training backward that computes its sums and writes dx, over
    row chunks of blocks of several runs (the lane groups' walk), with
    AVX-512: group_tile writes a row's runs as one stream where the two
    passes do (grad_rows_as_runs), else in cache one run after the other
    (each_run_in_one_call). By size, it pays from
    memory on two threads, where one thread's reads of a tile's sums
    overlap the other's writes of its dx: the tensor read twice from
    memory becomes read once. On one thread it measured even (0.94-1.03 of
    the time). The tile's rows must be long (GROUP_TILE_MIN_ROW_BYTES):
    tiles of 128 rows with rows of 1.5-1.9 KiB took 0.94-1.21 of the time,
    (256, 256, 14, 14) in tiles of one channel 1.11, (1024, 512, 4, 4)
    2.0-2.9; (64, 2048, 7, 7), rows of 3.9 KiB, 0.79-0.80. Float64 runs
    longer than BN_F64_GRAD_LANES_MAX values take a group walk that does
    not ask ahead: (64, 512, 14, 14) and (32, 768, 17, 17) took 1.02-1.14
    of the time.

    In cache it pays on a team too, in tiles of at most
    GROUP_TILE_BYTES_IN_CACHE shared evenly among the threads: one parallel
    region, where the two passes enter three, and each thread's dx comes
    from its own L2. Float32, two threads, against the two passes in one
    process: (8, 64, 7, 7) 0.70-0.78 of the time, (16, 64, 7, 7), (32, 64,
    5, 5), (32, 128, 4, 4), (8, 256, 7, 7) and (16, 256, 5, 5) 0.79-0.93,
    (32, 256, 7, 7) 0.90-1.03; float64 0.83-0.96, but (32, 64, 5, 5) 1.06.
    In tiles of 512 KiB, (64, 128, 4, 4) took 0.82-0.85 of the time in one
    stretch of the session and 1.07-1.15 in another, when every two-thread
    call ran slower; tiles of up to 256 KiB gained in both. Runs too long
    to be written as rows in cache (9 x 9 maps and up), their dx written
    one run after the other, gained as much: float32, two threads, 14 x 14
    maps (2, 64) and (8, 32) 0.86-0.88, (16, 64), (32, 64) and (32, 128)
    0.75-0.83, (32, 256) 0.85-0.88 (once 1.14), (8, 512) 0.96, (32, 512)
    and (16, 1024), past the L3, 0.65-0.84; (32, 64, 10, 10) 0.74-0.75,
    17 x 17 and 20 x 20 maps 0.62-0.92; float64 0.74-0.88, (32, 128, 14,
    14) 0.87-1.00. (One thread stays with the two passes: forced there,
    14 x 14 maps took 0.86-1.10 of the time.)"""
    cdef Py_ssize_t tile
    if (group_tiled_mode == 0 or not sums_then_dx_in_row_chunks(g, a) or one_run_blocks(g)
            or not lane_groups_enabled
            or not (grad_rows_as_runs(g, a, itemsize)
                    or each_run_in_one_call(a.stream, itemsize))):
        return False
    if group_tiled_mode == 1:
        return True
    tile = group_tile_channels(g, itemsize, nthreads, a.stream)
    if nthreads < 2 or tile * g.inner * itemsize < GROUP_TILE_MIN_ROW_BYTES:
        return False
    if not a.stream:
        return True
    return (g.channels >= GROUP_TILE_MIN_TILES * nthreads * tile
            and (itemsize == sizeof(float) or g.inner <= BN_F64_GRAD_LANES_MAX))


cdef void group_tile(const floating *x, const floating *dy, floating *dx, const Planar *g,
                     Py_ssize_t c0, Py_ssize_t c1, const BackwardArgs *a, GradSums *table,
                     GradSums *totals, floating *constants) noexcept nogil:
    """Channels [c0, c1): their chunk sums into table, totals, parameter
    gradients and constants (hi, lo, k, c1, c0) into constants, then dx,
    each row's runs as one stream where the two passes write them so
    (grad_rows_as_runs), else (in cache) one run after the other."""
    cdef Py_ssize_t k, c, n
    cdef bint row_runs = grad_rows_as_runs(g, a, sizeof(floating))
    for k in range(g.chunks_per_channel):
        lane_group_grad_sums(x, dy, g, chunk_span(g, k), k, c0, c1, a.mean, table, True)
    for c in range(c0, c1):
        finish_grad_channel(table, g, c, totals, a)
        channel_grad_constants(totals, c, a, constants)
    # Last row first: the rows read last are the likeliest still in L2.
    for n in range(g.outer - 1, -1, -1):
        if row_runs:
            grad_runs(x, dy, dx, run_start(g, n, c0), (c1 - c0) * g.inner, g.inner,
                      constants + 5 * c0, a.stream)
        else:
            grad_each_run(x, dy, dx, run_start(g, n, c0), c1 - c0, g.inner, constants + 5 * c0)
    if a.stream:
        bn_stream_fence()


cdef int planar_backward_group_tiled(const floating *x, const floating *dy, floating *dx,
                                     const Planar *g, const BackwardArgs *a,
                                     int nthreads) noexcept nogil:
    """The tiles, consecutive ones to a thread; -1 where memory is short."""
    global group_tiled_calls
    cdef Py_ssize_t nchunks = g.chunks_per_channel
    cdef Py_ssize_t tile = group_tile_channels(g, sizeof(floating), nthreads, a.stream)
    cdef Py_ssize_t item, ntiles = (g.channels + tile - 1) // tile
    # The totals in place of one chunk a channel, as planar_backward's.
    cdef Py_ssize_t ntotals = 0 if nchunks == 1 else g.channels
    cdef GradSums *table = <GradSums *>malloc((g.channels * nchunks + ntotals)
                                              * sizeof(GradSums))
    cdef floating *constants = <floating *>malloc(5 * g.channels * sizeof(floating))
    if table == NULL or constants == NULL:
        free(table)
        free(constants)
        return -1
    group_tiled_calls += 1
    for item in prange(ntiles, num_threads=nthreads, schedule="static"):
        group_tile(x, dy, dx, g, item * tile, min(item * tile + tile, g.channels), a, table,
                   table + g.channels * nchunks if ntotals > 0 else table, constants)
    free(table)
    free(constants)
    return 0


cdef inline void rows_grad_sums(const floating *x, const floating *dy, Py_ssize_t nrows,
                                Py_ssize_t stride, Py_ssize_t ncols, const double *mean,
                                double *s_dy, double *s_dev) noexcept nogil:
    """Column j's gradient sums of nrows rows (stride apart), in slabs of
    rows as the moments'."""
    cdef Py_ssize_t slab = max(<Py_ssize_t>1,
                               SLAB_BYTES // (2 * ncols * <Py_ssize_t>sizeof(floating)))
    cdef Py_ssize_t r = 0, n
    while r < nrows:
        n = min(slab, nrows - r)
        if floating is float:
            bn_rows_grad_sums_f32(x + r * stride, dy + r * stride, n, stride, ncols, mean,
                                  s_dy, s_dev)
        else:
            bn_rows_grad_sums_f64(x + r * stride, dy + r * stride, n, stride, ncols, mean,
                                  s_dy, s_dev)
        r = r + n


cdef void column_grad_sums_to_table(const Interleaved *g, Py_ssize_t chunk, Py_ssize_t j0,
                                   Py_ssize_t ncols, Py_ssize_t pack, const double *s_dy,
                                   const double *s_dev, GradSums *table) noexcept nogil:
    """Columns [j0, j0 + ncols) of a row chunk (pack of them side by side,
    stats_pack) added up per channel, in column order, into the chunk table."""
    cdef Py_ssize_t j = 0, p, q
    cdef GradSums sums, part
    while j < ncols:
        sums = zero_grad_sums()
        for p in range(pack):
            for q in range(g.inner):
                part.dy = s_dy[p * ncols + j + q]
                part.dy_dev = s_dev[p * ncols + j + q]
                sums = add_grad_sums(sums, part)
        table[((j0 + j) // g.inner) * g.nchunks + chunk] = sums
        j = j + g.inner


cdef void interleaved_grad_sums_item(const floating *x, const floating *dy,
                                     const Interleaved *g, Py_ssize_t item,
                                     const double *mean, GradSums *table) noexcept nogil:
    """Per-channel sums of one (row chunk, column tile) item into the chunk
    table (channel c's chunk k at c * nchunks + k): per column down the rows
    (narrow rows packed as the moments', stats_pack, the rows left over
    after the last whole pack into the first row's columns), then each
    channel's columns in order."""
    cdef double column_mean[COLUMN_TILE]
    cdef double s_dy[COLUMN_TILE]
    cdef double s_dev[COLUMN_TILE]
    cdef Py_ssize_t r0 = 0, nrows = 0, j0 = 0, ncols = 0
    cdef Py_ssize_t chunk = item // g.ntiles
    cdef Py_ssize_t j, pack, packed, start
    item_span(g, item, &r0, &nrows, &j0, &ncols)
    pack = stats_pack(g, ncols)
    for j in range(ncols * pack):
        column_mean[j] = mean[((j0 + j) % g.width) // g.inner]
        s_dy[j] = 0.0
        s_dev[j] = 0.0
    packed = (nrows // pack) * pack
    start = r0 * g.width + j0
    rows_grad_sums(x + start, dy + start, packed // pack, g.width * pack, ncols * pack,
                   column_mean, s_dy, s_dev)
    start = start + packed * g.width
    rows_grad_sums(x + start, dy + start, nrows - packed, g.width, ncols, column_mean,
                   s_dy, s_dev)
    column_grad_sums_to_table(g, chunk, j0, ncols, pack, s_dy, s_dev, table)


cdef void wide_chunk_grad_sums(const floating *x, const floating *dy, const Interleaved *g,
                               Py_ssize_t chunk, const double *mean,
                               GradSums *table) noexcept nogil:
    """The chunk table's entries of one row chunk of rows wider than a tile:
    whole rows, their sums in a heap buffer, as wide_chunk_moments (the same
    bits as the tiles). Out of memory, the chunk is taken by tiles."""
    cdef Py_ssize_t r0 = 0, nrows = 0
    cdef double *column_mean = <double *>malloc(3 * g.width * sizeof(double))
    cdef double *s_dy
    cdef double *s_dev
    cdef Py_ssize_t j, tile
    if column_mean == NULL:
        for tile in range(g.ntiles):
            interleaved_grad_sums_item(x, dy, g, chunk * g.ntiles + tile, mean, table)
        return
    s_dy = column_mean + g.width
    s_dev = s_dy + g.width
    for j in range(g.width):
        column_mean[j] = mean[j // g.inner]
        s_dy[j] = 0.0
        s_dev[j] = 0.0
    chunk_row_span(g, chunk, &r0, &nrows)
    rows_grad_sums(x + r0 * g.width, dy + r0 * g.width, nrows, g.width, g.width, column_mean,
                   s_dy, s_dev)
    column_grad_sums_to_table(g, chunk, 0, g.width, 1, s_dy, s_dev, table)
    free(column_mean)


cdef inline void interleaved_chunk_grad_sums(const floating *x, const floating *dy,
                                             const Interleaved *g, Py_ssize_t item,
                                             bint whole_rows, const double *mean,
                                             GradSums *table) noexcept nogil:
    """Item of interleaved_backward's sums: a row chunk (whole_rows) or a
    tile of one."""
    if whole_rows:
        wide_chunk_grad_sums(x, dy, g, item, mean, table)
    else:
        interleaved_grad_sums_item(x, dy, g, item, mean, table)


cdef void interleaved_grad_input_item(const floating *x, const floating *dy, floating *dx,
                                      const Interleaved *g, Py_ssize_t item,
                                      const floating *constants, bint training,
                                      int stream) noexcept nogil:
    """dx for one item; constants holds hi, lo, k, c1, c0 per channel, C apart."""
    cdef floating column[5 * COLUMN_TILE]
    cdef Py_ssize_t r0 = 0, nrows = 0, j0 = 0, ncols = 0, start
    cdef const floating *hi = column
    cdef const floating *lo = column + COLUMN_TILE
    cdef const floating *k = column + 2 * COLUMN_TILE
    cdef const floating *c1 = column + 3 * COLUMN_TILE
    cdef const floating *c0 = column + 4 * COLUMN_TILE
    item_span(g, item, &r0, &nrows, &j0, &ncols)
    expand_to_columns(constants, g.channels, 5, g, j0, ncols, column)
    start = r0 * g.width + j0
    if training:
        if floating is float:
            bn_rows_grad_input_f32(x + start, dy + start, dx + start, nrows, g.width, ncols,
                                   hi, lo, k, c1, c0, stream)
        else:
            bn_rows_grad_input_f64(x + start, dy + start, dx + start, nrows, g.width, ncols,
                                   hi, lo, k, c1, c0, stream)
    else:
        # c1 and c0 are 0 in eval: dx = ((dy - 0) - 0) * k + 0.
        if floating is float:
            bn_rows_affine_f32(dy + start, dx + start, nrows, g.width, ncols, c1, c1, k, c0,
                               0, stream)
        else:
            bn_rows_affine_f64(dy + start, dx + start, nrows, g.width, ncols, c1, c1, k, c0,
                               0, stream)
    if stream:
        bn_stream_fence()


cdef void interleaved_grad_channel(const Interleaved *g, Py_ssize_t c, const GradSums *table,
                                   floating *constants, const BackwardArgs *a) noexcept nogil:
    """Channel c's sums over its chunks, in order; its parameter gradients;
    its dx constants (hi, lo, k, c1, c0, C apart)."""
    cdef Py_ssize_t k, n = g.channels
    cdef GradSums sums = zero_grad_sums()
    if a.given_dy != NULL:
        sums = given_sums(a, c)
    else:
        for k in range(g.nchunks):
            sums = add_grad_sums(sums, table[c * g.nchunks + k])
        store_param_grads(sums, c, a)
    if a.sums_only:
        return
    grad_constants(sums, a.count, a.mean[c], a.invstd[c], a.weight, c,
                   a.training, constants + c, constants + n + c, constants + 2 * n + c,
                   constants + 3 * n + c, constants + 4 * n + c)


cdef void interleaved_grad_input_part(const floating *x, const floating *dy, floating *dx,
                                      const Interleaved *g, const BackwardArgs *a,
                                      Py_ssize_t part, int nparts, const floating *constants,
                                      const floating *pattern, Py_ssize_t period,
                                      Py_ssize_t groups, Py_ssize_t lanes,
                                      Py_ssize_t head) noexcept nogil:
    """Part `part` of the input gradient (dx = dy * k in eval): with a
    periodic pattern of `period` columns the part-th of nparts contiguous
    parts; else with row groups row chunk `part`; else item `part`."""
    if period and a.training:
        periodic_grad_part(x, dy, dx, g.rows * g.width, head, part, nparts, pattern, period,
                           lanes, a.stream)
    elif period:
        periodic_affine_part(dy, dx, g.rows * g.width, head, part, nparts, pattern, period,
                             lanes, 0, a.stream)
    elif groups and a.training:
        row_groups_grad_chunk(x, dy, dx, g, part, pattern, lanes, a.stream)
    elif groups:
        row_groups_affine_chunk(dy, dx, g, part, pattern, lanes, 0, a.stream)
    else:
        interleaved_grad_input_item(x, dy, dx, g, part, constants, a.training, a.stream)


cdef int interleaved_backward(const floating *x, const floating *dy, floating *dx,
                              const Interleaved *g, const BackwardArgs *a,
                              int requested) noexcept nogil:
    """The sums per (row chunk, column tile) item (or per row chunk,
    sums_whole_rows), then per channel; then dx by the flat periodic loop,
    one contiguous part per thread (as interleaved_normalize), or in row
    groups by row chunk, or item by item. Returns -1 when the tables cannot
    be allocated."""
    cdef Py_ssize_t nitems = g.nchunks * g.ntiles
    cdef int nthreads = team_size(requested, nitems, g.rows * g.width)
    cdef Py_ssize_t lanes = bn_periodic_lanes(sizeof(floating))
    cdef Py_ssize_t period = 0 if a.sums_only else periodic_period(g, lanes)
    cdef Py_ssize_t groups = 0 if a.sums_only else row_groups_period(g, lanes, period,
                                                                       nthreads)
    cdef Py_ssize_t pattern_period = period or groups
    cdef Py_ssize_t n = g.rows * g.width
    cdef Py_ssize_t head = bn_line_head(dx, sizeof(floating), n)
    cdef Py_ssize_t pattern_head = head if period else 0    # as in interleaved_normalize
    cdef Py_ssize_t item, c
    cdef GradSums *table = <GradSums *>malloc(g.nchunks * g.channels * sizeof(GradSums))
    # The pattern after the per-channel constants, on a 64-byte boundary.
    cdef floating *constants = <floating *>malloc(
        5 * g.channels * sizeof(floating)
        + periodic_bytes(pattern_period, lanes, 5, sizeof(floating)))
    cdef floating *pattern = constants + 5 * g.channels
    cdef bint whole_rows = sums_whole_rows(g, nthreads)
    cdef Py_ssize_t nsums = g.nchunks if whole_rows else nitems
    # The input gradient's work: a contiguous part per thread (the periodic
    # loop), else a row chunk (row groups), else an item.
    cdef Py_ssize_t ndx = nthreads if period else (g.nchunks if groups else nitems)
    if table == NULL or constants == NULL:
        free(table)
        free(constants)
        return -1
    if pattern_period:
        pattern = pattern + bn_line_head(pattern, sizeof(floating), 64)
    # A team of one runs the serial twins of the loops, as the forward's.
    if a.given_dy != NULL:
        pass
    elif nthreads == 1:
        for item in range(nsums):
            interleaved_chunk_grad_sums(x, dy, g, item, whole_rows, a.mean, table)
    else:
        for item in prange(nsums, num_threads=nthreads, schedule="static"):
            interleaved_chunk_grad_sums(x, dy, g, item, whole_rows, a.mean, table)
    if nthreads == 1:
        for c in range(g.channels):
            interleaved_grad_channel(g, c, table, constants, a)
    else:
        for c in prange(g.channels, num_threads=nthreads, schedule="static"):
            interleaved_grad_channel(g, c, table, constants, a)
    if pattern_period and a.training:
        periodic_pattern(constants, g, pattern_period, lanes, pattern_head, GRAD_ORDER, 5,
                         pattern)
    elif pattern_period:
        periodic_pattern(constants, g, pattern_period, lanes, pattern_head, EVAL_GRAD_ORDER, 4,
                         pattern)
    if a.sums_only:
        pass
    elif nthreads == 1:
        for item in range(ndx):
            interleaved_grad_input_part(x, dy, dx, g, a, item, 1, constants, pattern, period,
                                        groups, lanes, head)
    else:
        # Static shares (with the periodic loop, one part a thread).
        for item in prange(ndx, num_threads=nthreads, schedule="static"):
            interleaved_grad_input_part(x, dy, dx, g, a, item, nthreads, constants, pattern,
                                        period, groups, lanes, head)
    free(table)
    free(constants)
    return 0


cdef int backward_driver(const floating *x, const floating *dy, floating *dx,
                         Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner,
                         const BackwardArgs *a, int requested) noexcept nogil:
    global tiled_calls
    cdef Planar p
    cdef Interleaved q
    cdef int nthreads
    cdef Py_ssize_t nvalues = outer * channels * inner
    if planar_order(outer, nvalues, inner, sizeof(floating), SHORT_RUN_ROWS_MAX_BYTES):
        p = planar_geometry(outer, channels, inner, sizeof(floating))
        nthreads = backward_team_size(requested, channels, nvalues)
        if use_group_tiled_backward(&p, a, sizeof(floating), nthreads):
            return planar_backward_group_tiled(x, dy, dx, &p, a, nthreads)
        if use_tiled_backward(&p, a, sizeof(floating), nthreads):
            tiled_calls += 1
            planar_backward_tiled(x, dy, dx, &p, a, nthreads)
            return 0
        return planar_backward(x, dy, dx, &p, a, requested)
    q = interleaved_geometry(outer, channels, inner)
    return interleaved_backward(x, dy, dx, &q, a, requested)


# --------------------------------------------------------------------------
# Drivers: choose the loop order and the team, allocate the small tables.

cdef int moments_driver(const floating *x, Py_ssize_t outer, Py_ssize_t channels,
                        Py_ssize_t inner, const StatsOut *out, int requested) noexcept nogil:
    """Statistics of every channel; returns -1 when out of memory."""
    cdef Planar p
    cdef Interleaved q
    cdef Moments *chunks
    cdef Py_ssize_t nvalues = outer * channels * inner
    if planar_order(outer, nvalues, inner, sizeof(floating), SHORT_RUN_ROWS_MAX_BYTES):
        p = planar_geometry(outer, channels, inner, sizeof(floating))
        chunks = <Moments *>malloc(channels * p.chunks_per_channel * sizeof(Moments))
        if chunks == NULL:
            return -1
        planar_moments(x, &p, chunks, out,
                       team_size(requested, channels * p.chunks_per_channel, nvalues))
        free(chunks)
        return 0
    q = interleaved_geometry(outer, channels, inner)
    chunks = <Moments *>malloc(q.nchunks * channels * sizeof(Moments))
    if chunks == NULL:
        return -1
    interleaved_moments(x, &q, chunks, out, team_size(requested, q.nchunks * q.ntiles, nvalues))
    free(chunks)
    return 0


cdef int normalize_driver(const floating *x, floating *y, Py_ssize_t outer,
                          Py_ssize_t channels, Py_ssize_t inner, const AffineIn *a,
                          int requested) noexcept nogil:
    cdef Planar p
    cdef Interleaved q
    cdef Py_ssize_t nvalues = outer * channels * inner
    if planar_order(outer, nvalues, inner, sizeof(floating),
                    NORMALIZE_SHORT_RUN_ROWS_MAX_BYTES):
        p = planar_geometry(outer, channels, inner, sizeof(floating))
        planar_normalize(x, y, &p, a,
                         team_size(requested, channels * p.chunks_per_channel, nvalues))
        return 0
    q = interleaved_geometry(outer, channels, inner)
    return interleaved_normalize(x, y, &q, a,
                                 team_size(requested, q.nchunks * q.ntiles, nvalues))


cdef int pipelined_mode = -1    # -1: by size; 0: never; 1: whenever possible


cdef Py_ssize_t pipelined_calls = 0     # pipelined_forward_calls


cdef inline Py_ssize_t pipe_min_run_bytes_f64(const Planar *g, int nthreads) noexcept nogil:
    """The shortest float64 runs the pipelined forward takes by size: whole
    lines from PIPE_MIN_WHOLE_LINE_RUN_BYTES_F64, other runs longer on one
    thread than on two."""
    if not runs_share_lines(g, sizeof(double)):
        return PIPE_MIN_WHOLE_LINE_RUN_BYTES_F64
    if nthreads >= 2:
        return PIPE_MIN_RUN_BYTES_F64
    return PIPE_MIN_RUN_BYTES_F64_ONE_THREAD


cdef bint use_pipelined(const Planar *g, Py_ssize_t itemsize, int stream,
                        int nthreads) noexcept nogil:
    """Whether the pipelined training forward pays.

    It needs runs walked as runs, in row chunks (the long-run chunking is
    not pipelined). It pays where the two-pass path reads its input twice
    from memory: outputs written with streaming stores. Each thread keeps
    two channels in cache (pipe_max_slice), and reads its first channel's
    statistics and normalises its last channel alone: with fewer than
    PIPE_MIN_CHANNELS per thread those unpipelined ends weigh too much.
    float64 needs longer runs (pipe_min_run_bytes_f64).
    """
    if (pipelined_mode == 0 or g.inner < PLANAR_MIN_INNER
            or g.inner >= CHUNK_VALUES):
        return False
    if pipelined_mode == 1:
        return True
    # Measured on AVX-512 machines only; elsewhere the two passes.
    return (bn_pipelined_fused() and stream != 0
            and g.inner * itemsize >= pipe_min_run_bytes(
                itemsize, pipe_min_run_bytes_f64(g, nthreads),
                rows_as_runs(g, stream, itemsize, ROW_RUNS_MAX_BYTES))
            and g.channels >= PIPE_MIN_CHANNELS * nthreads
            and g.outer * g.inner * itemsize <= pipe_max_slice(g.inner * itemsize))


cdef int train_driver(const floating *x, floating *y, Py_ssize_t outer, Py_ssize_t channels,
                      Py_ssize_t inner, StatsOut *out, AffineIn *a,
                      int requested) noexcept nogil:
    """Statistics into out, then y normalised with them (a.mean, a.invstd and
    a.residual are pointed at out's arrays here)."""
    global pipelined_calls
    cdef int status
    cdef Planar g = planar_geometry(outer, channels, inner, sizeof(floating))
    cdef int nthreads = team_size(requested, channels, outer * channels * inner)
    out.residual = <double *>malloc(channels * sizeof(double))
    if out.residual == NULL:
        return -1
    a.mean = out.mean
    a.residual = out.residual
    a.invstd = out.invstd
    # Pipelined where it pays (use_pipelined), else two passes, statistics
    # then normalisation, each in memory order. (An earlier per-channel fused
    # path, with its prefetches in one burst per run and stores that went
    # through a line buffer in 16-byte pieces, measured slower than the two
    # passes: it left the memory idle while it computed each channel's
    # statistics from cache.)
    if use_pipelined(&g, sizeof(floating), a.stream, nthreads):
        pipelined_calls += 1
        planar_train_pipelined(x, y, &g, out, a, nthreads)
        status = 0
    else:
        status = moments_driver(x, outer, channels, inner, out, requested)
        if status == 0:
            status = normalize_driver(x, y, outer, channels, inner, a, requested)
    free(out.residual)
    out.residual = NULL
    return status


# --------------------------------------------------------------------------
# Python entry points. Arguments are NumPy arrays prepared by functional.py;
# the checks below only keep a wrong call from touching foreign memory.

cdef void *data_of(object array, int typenum, Py_ssize_t size, bint writeable,
                   str name) except NULL:
    if not cnp.PyArray_Check(array):
        raise TypeError(f"{name}: expected a NumPy array")
    cdef cnp.ndarray a = <cnp.ndarray>array
    if (cnp.PyArray_TYPE(a) != typenum or not cnp.PyArray_IS_C_CONTIGUOUS(a)
            or not cnp.PyArray_ISALIGNED(a)):
        raise TypeError(
            f"{name}: expected an aligned C-contiguous array of type number {typenum}")
    if cnp.PyArray_SIZE(a) != size:
        raise ValueError(f"{name}: expected {size} values, got {cnp.PyArray_SIZE(a)}")
    if writeable and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name}: expected a writeable array")
    if size == 0:
        raise ValueError(f"{name}: empty arrays never reach the kernels")
    return cnp.PyArray_DATA(a)


cdef Params params_of(object array, Py_ssize_t channels, str name) except *:
    """A float32 or float64 (C,) array as Params; None as absent."""
    cdef Params p
    p.data = NULL
    p.single = False
    if array is None:
        return p
    if not cnp.PyArray_Check(array):
        raise TypeError(f"{name}: expected a NumPy array")
    p.single = cnp.PyArray_TYPE(<cnp.ndarray>array) == cnp.NPY_FLOAT32
    p.data = data_of(array, cnp.NPY_FLOAT32 if p.single else cnp.NPY_FLOAT64, channels,
                     False, name)
    return p


cdef Py_ssize_t stream_min_bytes = STREAM_MIN_BYTES
cdef Py_ssize_t twin_min_bytes = TWIN_MIN_BYTES
def set_pipelined(int mode, Py_ssize_t items=0):
    """The pipelined training forward: mode -1 chooses by size, 0 never, 1
    whenever the layout allows it; items > 0 sets the number of channel
    ranges (else one per thread). For tests and tuning; returns the previous
    (mode, items)."""
    global pipelined_mode, pipelined_items
    previous = (pipelined_mode, pipelined_items)
    pipelined_mode = mode
    pipelined_items = items
    return previous


def set_serial_max_values(Py_ssize_t nvalues):
    """Calls of at most nvalues values run on the calling thread (for
    benchmarks and tuning); returns the previous value."""
    global serial_max_values
    previous = serial_max_values
    serial_max_values = nvalues
    return previous


def set_tiled_backward(int mode, Py_ssize_t items=0):
    """The channel-tiled training backward (tiled_backward_item), as
    set_pipelined for the forward's pipelined walk: mode -1 chooses by
    size, 0 never, 1 whenever the call allows it; items > 0 sets the number
    of channel ranges. Returns the previous (mode, items)."""
    global tiled_backward_mode, tiled_backward_items
    previous = (tiled_backward_mode, tiled_backward_items)
    tiled_backward_mode = mode
    tiled_backward_items = items
    return previous


def set_group_tiled_backward(int mode, Py_ssize_t tile_bytes=0):
    """The group-tiled training backward (group_tile), as
    set_tiled_backward: mode -1 chooses by size, 0 never, 1 whenever the
    call allows it; tile_bytes > 0 sets the bytes of x and dy of a tile
    (GROUP_TILE_BYTES otherwise). Returns the previous (mode, tile_bytes)."""
    global group_tiled_mode, group_tile_bytes
    previous = (group_tiled_mode, group_tile_bytes)
    group_tiled_mode = mode
    group_tile_bytes = tile_bytes if tile_bytes > 0 else GROUP_TILE_BYTES
    return previous


def pipelined_forward_calls():
    """How many training forwards have taken the pipelined walk (for tests:
    that the size rule sends a shape through it)."""
    return pipelined_calls


def tiled_backward_calls():
    """How many backward calls have taken the channel-tiled walk (for tests:
    that the size rule sends a shape through it)."""
    return tiled_calls


def group_tiled_backward_calls():
    """How many backward calls have taken the group-tiled walk (for tests:
    that the shapes they force through it do take it)."""
    return group_tiled_calls


def set_periodic_loops(bint enabled):
    """Whether the interleaved normalisation and input gradient may take the
    flat periodic loops (for tests and A/B timing; the row loops give the
    same bits). Returns the previous setting."""
    global periodic_enabled
    previous = periodic_enabled
    periodic_enabled = enabled
    return previous


def set_row_groups(bint enabled):
    """Whether rows too wide for the flat periodic loops may be walked in
    row groups (bn_row_groups_*; for tests and A/B timing: the tiles' row
    loops give the same bits). Returns the previous setting."""
    global row_groups_enabled
    previous = row_groups_enabled
    row_groups_enabled = enabled
    return previous


def set_twin_min_bytes(Py_ssize_t nbytes):
    """Chunks of long runs of at least nbytes are normalised as two halves
    in step, and runs of at least nbytes / 4 two channels at a time (for
    tests and A/B timing: the bits are the same); returns the previous
    value."""
    global twin_min_bytes
    previous = twin_min_bytes
    twin_min_bytes = nbytes
    return previous


def set_lane_groups(bint enabled):
    """Turn the backward sums of row chunks' blocks of several runs,
    LANE_GROUP channels at a time (lane_group_grad_sums), on or off, for
    tests and benchmarks; returns the previous setting. Off, they are taken
    a channel at a time: the same bits."""
    global lane_groups_enabled
    previous = lane_groups_enabled
    lane_groups_enabled = enabled
    return previous


def set_row_runs(bint enabled):
    """Turn the row-at-a-time writing of streamed runs that share lines or
    are short (rows_as_runs: the normalisation's bn_affine_runs, the
    training backward's bn_grad_runs), and of runs in cache
    (each_run_in_one_call: bn_affine_each_run, bn_grad_each_run), on or
    off, for tests and benchmarks; returns the previous setting. Off, those
    runs are written one at a time (with normal stores where they share
    lines): the same bits. (The choice of the pipelined paths follows the
    setting: PIPE_MIN_ROW_RUN_BYTES.)"""
    global row_runs_enabled
    previous = row_runs_enabled
    row_runs_enabled = enabled
    return previous


def set_chunk_pairs(bint enabled):
    """Whether the streamed normalisation of row chunks may write two chunks
    in step (paired_chunks), for tests and A/B timing: the bits are the
    same. Returns the previous setting."""
    global chunk_pairs_enabled
    previous = chunk_pairs_enabled
    chunk_pairs_enabled = enabled
    return previous


def chunk_pair_calls():
    """How many normalisations have written chunks in pairs (for tests: that
    the shapes they pair do take that walk)."""
    return chunk_pair_count


def set_rows_call_min_bytes(Py_ssize_t nbytes):
    """Rows shorter than nbytes are written several a call by the row loops
    (rows_per_call; 1 or less: one row a call), for tests and A/B timing:
    the bits are the same. Returns the previous value."""
    global rows_call_min_bytes
    previous = rows_call_min_bytes
    rows_call_min_bytes = nbytes
    return previous


def set_stats_runs_ahead(Py_ssize_t runs):
    """How many blocks ahead the statistics of blocks of several runs ask
    for memory (stats_blocks_ahead; 0: not at all), for tests and A/B
    timing: the bits are the same. Returns the previous value."""
    global stats_runs_ahead
    previous = stats_runs_ahead
    stats_runs_ahead = runs
    return previous


ISA_CAPS = ("baseline", "AVX2", "AVX-512")


def set_vector_isa_cap(str isa):
    """Let the kernels choose no wider loops than `isa` ("AVX-512", "AVX2"
    or "baseline"), for tests that compare the bits of each set of loops
    in one process; not while kernels run. Returns the previous cap."""
    if isa not in ISA_CAPS:
        raise ValueError(f"isa must be one of {ISA_CAPS}, got {isa!r}")
    previous = ISA_CAPS[bn_get_isa_cap()]
    bn_set_isa_cap(ISA_CAPS.index(isa))
    return previous


def set_stream_min_bytes(Py_ssize_t nbytes):
    """Outputs of at least nbytes get streaming stores, and tensors of at
    least nbytes walk runs of 9-31 values as runs (planar_order), for
    tests, benchmarks and tuning; returns the previous value."""
    global stream_min_bytes
    previous = stream_min_bytes
    stream_min_bytes = nbytes
    return previous


cdef inline bint streamed_size(Py_ssize_t nbytes) noexcept nogil:
    """Whether outputs of nbytes take streaming stores (too large for the
    cache: planar_order asks it too)."""
    return nbytes >= stream_min_bytes


cdef inline int streams(Py_ssize_t nvalues, int typenum) noexcept:
    cdef Py_ssize_t itemsize = 4 if typenum == cnp.NPY_FLOAT32 else 8
    return streamed_size(nvalues * itemsize)


cdef int check_shape(Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner,
                     int num_threads) except -1:
    """Sizes and team the geometry can divide by (empty calls never get here)."""
    if outer < 1 or channels < 1 or inner < 1:
        raise ValueError(f"(outer, channels, inner) must be positive, got "
                         f"{(outer, channels, inner)}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be at least 1, got {num_threads}")
    return 0


cdef int input_typenum(object x) except -1:
    if not cnp.PyArray_Check(x):
        raise TypeError("x: expected a NumPy array")
    cdef int typenum = cnp.PyArray_TYPE(<cnp.ndarray>x)
    if typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64:
        raise TypeError("x: expected float32 or float64")
    return typenum


def moments(x, Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner,
            mean, m2, int num_threads):
    """Fill mean[C] and m2[C] (float64) with each channel's mean and sum of
    squared deviations. x is a C-contiguous (outer, C, inner) buffer."""
    check_shape(outer, channels, inner, num_threads)
    cdef int typenum = input_typenum(x)
    cdef Py_ssize_t n = outer * channels * inner
    cdef void *px = data_of(x, typenum, n, False, "x")
    cdef StatsOut out
    cdef int status
    out.eps = 0.0
    out.mean = <double *>data_of(mean, cnp.NPY_FLOAT64, channels, True, "mean")
    out.residual = NULL
    out.m2 = <double *>data_of(m2, cnp.NPY_FLOAT64, channels, True, "m2")
    out.invstd = NULL
    with nogil:
        if typenum == cnp.NPY_FLOAT32:
            status = moments_driver(<const float *>px, outer, channels, inner, &out,
                                    num_threads)
        else:
            status = moments_driver(<const double *>px, outer, channels, inner, &out,
                                    num_threads)
    if status < 0:
        raise MemoryError("bncore: out of memory for the per-chunk statistics")


cdef int run_normalize(void *px, void *py, int typenum, Py_ssize_t outer,
                      Py_ssize_t channels, Py_ssize_t inner, const AffineIn *a,
                      int num_threads) except -1:
    cdef int status
    with nogil:
        if typenum == cnp.NPY_FLOAT32:
            status = normalize_driver(<const float *>px, <float *>py, outer, channels, inner,
                                      a, num_threads)
        else:
            status = normalize_driver(<const double *>px, <double *>py, outer, channels,
                                      inner, a, num_threads)
    if status < 0:
        raise MemoryError("bncore: out of memory for the per-column constants")
    return 0


cdef AffineIn affine_in(Py_ssize_t channels, weight, bias, double eps, bint relu,
                       Py_ssize_t nvalues, int typenum) except *:
    """The AffineIn of a normalisation of nvalues values with this weight,
    bias, eps and relu: no statistics, running statistics or gate yet (each
    entry point sets those it uses)."""
    cdef AffineIn a
    a.mean = NULL
    a.residual = NULL
    a.invstd = NULL
    a.running_mean = params_of(None, channels, "running_mean")
    a.running_var = params_of(None, channels, "running_var")
    a.eps = eps
    a.weight = params_of(weight, channels, "weight")
    a.bias = params_of(bias, channels, "bias")
    a.relu = relu
    a.gate = NULL
    a.gate_above = 0.0
    a.stream = streams(nvalues, typenum)
    a.constants = NULL
    return a


cpdef normalize(x, y, Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner,
                running_mean, running_var, double eps, weight, bias, int num_threads,
                bint relu=False):
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias per
    channel, then max(y, 0) with relu; y may be x. The (C,) arrays are
    float32 or float64 (weight and bias may be None), read as they are."""
    check_shape(outer, channels, inner, num_threads)
    cdef int typenum = input_typenum(x)
    cdef Py_ssize_t n = outer * channels * inner
    cdef void *px = data_of(x, typenum, n, False, "x")
    cdef void *py = data_of(y, typenum, n, True, "y")
    cdef AffineIn a = affine_in(channels, weight, bias, eps, relu, n, typenum)
    a.running_mean = params_of(running_mean, channels, "running_mean")
    a.running_var = params_of(running_var, channels, "running_var")
    run_normalize(px, py, typenum, outer, channels, inner, &a, num_threads)


def relu_mask(x, dy, out, Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner,
              mean, invstd, weight, bias, int num_threads, double above=0.0):
    """out = dy where (x - mean) * invstd * weight + bias > above, else 0:
    the gradient through the relu of a fused forward, its affine output
    recomputed with the forward's arithmetic (the training forward also adds
    the mean's float64 residual, which moves the output by far less than an
    ulp of the input type, and only in the rare channel where it changes the
    rounding of the mean's low part). out may be dy. For an output rounded
    to half precision afterwards, `above` is the largest value that rounds
    to 0, so that the gate is open exactly where that output is > 0."""
    check_shape(outer, channels, inner, num_threads)
    cdef int typenum = input_typenum(x)
    cdef Py_ssize_t n = outer * channels * inner
    cdef void *px = data_of(x, typenum, n, False, "x")
    cdef void *pout = data_of(out, typenum, n, True, "out")
    cdef AffineIn a = affine_in(channels, weight, bias, 0.0, False, n, typenum)
    a.mean = <const double *>data_of(mean, cnp.NPY_FLOAT64, channels, False, "mean")
    a.invstd = <const double *>data_of(invstd, cnp.NPY_FLOAT64, channels, False, "invstd")
    a.gate = data_of(dy, typenum, n, False, "dy")
    a.gate_above = above
    run_normalize(px, pout, typenum, outer, channels, inner, &a, num_threads)


cpdef train_forward(x, y, Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner,
                    weight, bias, double eps, mean, m2, invstd, int num_threads,
                    bint relu=False):
    """Batch statistics into mean, m2, invstd (float64[C]) and the normalised
    batch (then max(y, 0) with relu) into y (which may be x)."""
    check_shape(outer, channels, inner, num_threads)
    cdef int typenum = input_typenum(x)
    cdef Py_ssize_t n = outer * channels * inner
    cdef void *px = data_of(x, typenum, n, False, "x")
    cdef void *py = data_of(y, typenum, n, True, "y")
    cdef StatsOut out
    cdef AffineIn a = affine_in(channels, weight, bias, eps, relu, n, typenum)
    cdef int status
    out.eps = eps
    out.mean = <double *>data_of(mean, cnp.NPY_FLOAT64, channels, True, "mean")
    out.residual = NULL
    out.m2 = <double *>data_of(m2, cnp.NPY_FLOAT64, channels, True, "m2")
    out.invstd = <double *>data_of(invstd, cnp.NPY_FLOAT64, channels, True, "invstd")
    with nogil:
        if typenum == cnp.NPY_FLOAT32:
            status = train_driver(<const float *>px, <float *>py, outer, channels, inner,
                                  &out, &a, num_threads)
        else:
            status = train_driver(<const double *>px, <double *>py, outer, channels, inner,
                                  &out, &a, num_threads)
    if status < 0:
        raise MemoryError("bncore: out of memory for the per-chunk statistics")


cdef void copy_item(const floating *x, floating *y, Py_ssize_t n, Py_ssize_t item,
                    int stream) noexcept nogil:
    cdef Py_ssize_t start = item * CHUNK_BLOCKS * BLOCK_LEN
    cdef Py_ssize_t length = min(<Py_ssize_t>(CHUNK_BLOCKS * BLOCK_LEN), n - start)
    if floating is float:
        bn_copy_f32(x + start, y + start, length, stream)
    else:
        bn_copy_f64(x + start, y + start, length, stream)
    if stream:
        bn_stream_fence()


def copy(x, y, bint stream, int num_threads):
    """y[:] = x in chunks of CHUNK_VALUES on num_threads threads, with
    streaming or normal stores: the benchmarks' yardstick for one read and
    one write of a tensor (it has no serial cutoff: it is for large ones)."""
    cdef int typenum = input_typenum(x)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>x)
    check_shape(n, 1, 1, num_threads)
    cdef void *px = data_of(x, typenum, n, False, "x")
    cdef void *py = data_of(y, typenum, n, True, "y")
    cdef Py_ssize_t item, chunk = CHUNK_BLOCKS * BLOCK_LEN
    cdef Py_ssize_t nitems = (n + chunk - 1) // chunk
    cdef int nthreads = num_threads if nitems > 1 else 1
    with nogil:
        if typenum == cnp.NPY_FLOAT32:
            for item in prange(nitems, num_threads=nthreads, schedule="static"):
                copy_item(<const float *>px, <float *>py, n, item, stream)
        else:
            for item in prange(nitems, num_threads=nthreads, schedule="static"):
                copy_item(<const double *>px, <double *>py, n, item, stream)


def max_threads():
    """OpenMP's current default team size (OMP_NUM_THREADS, threadpoolctl)."""
    return bn_omp_max_threads()


cdef int run_backward(x, dy, dx, Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner,
                      BackwardArgs *args, int num_threads) except -1:
    """The checks and dispatch shared by the backward entry points; args has
    everything but stream and count."""
    check_shape(outer, channels, inner, num_threads)
    cdef int typenum = input_typenum(x)
    cdef Py_ssize_t n = outer * channels * inner
    cdef void *px = data_of(x, typenum, n, False, "x")
    cdef void *pdy = data_of(dy, typenum, n, False, "dy")
    cdef void *pdx = NULL if args.sums_only else data_of(dx, typenum, n, True, "dx")
    cdef int status
    args.stream = streams(n, typenum)
    if args.count == 0:
        args.count = <double>(outer * inner)
    with nogil:
        if typenum == cnp.NPY_FLOAT32:
            status = backward_driver(<const float *>px, <const float *>pdy, <float *>pdx,
                                     outer, channels, inner, args, num_threads)
        else:
            status = backward_driver(<const double *>px, <const double *>pdy, <double *>pdx,
                                     outer, channels, inner, args, num_threads)
    if status < 0:
        raise MemoryError("bncore: out of memory for the per-chunk gradient sums")
    return 0


cdef BackwardArgs backward_args(Py_ssize_t channels, mean, invstd, weight,
                                bint training) except *:
    cdef BackwardArgs args
    args.mean = <const double *>data_of(mean, cnp.NPY_FLOAT64, channels, False, "mean")
    args.invstd = NULL
    if invstd is not None:
        args.invstd = <const double *>data_of(invstd, cnp.NPY_FLOAT64, channels, False,
                                              "invstd")
    args.weight = params_of(weight, channels, "weight")
    args.grad_weight = NULL
    args.grad_bias = NULL
    args.training = training
    args.sums_only = False
    args.given_dy = NULL
    args.given_dev = NULL
    args.count = 0.0
    args.constants = NULL
    return args


def backward(x, dy, dx, Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner,
             mean, invstd, weight, bint training, grad_weight, grad_bias,
             int num_threads):
    """Input gradient into dx (which may be x or dy) and the float64 sums
    grad_weight = sum(dy * xhat), grad_bias = sum(dy) per channel."""
    cdef BackwardArgs args = backward_args(channels, mean, invstd, weight, training)
    args.grad_weight = <double *>data_of(grad_weight, cnp.NPY_FLOAT64, channels, True,
                                         "grad_weight")
    args.grad_bias = <double *>data_of(grad_bias, cnp.NPY_FLOAT64, channels, True, "grad_bias")
    run_backward(x, dy, dx, outer, channels, inner, &args, num_threads)


def grad_sums(x, dy, Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner, mean,
              sum_dy, sum_dy_dev, int num_threads):
    """The first half of a training backward: sum_dy[c] = sum(dy) and
    sum_dy_dev[c] = sum(dy * (x - mean[c])) (float64), over the same blocks
    and in the same order as backward."""
    cdef BackwardArgs args = backward_args(channels, mean, None, None, True)
    args.grad_bias = <double *>data_of(sum_dy, cnp.NPY_FLOAT64, channels, True, "sum_dy")
    args.grad_weight = <double *>data_of(sum_dy_dev, cnp.NPY_FLOAT64, channels, True,
                                         "sum_dy_dev")
    args.sums_only = True
    run_backward(x, dy, None, outer, channels, inner, &args, num_threads)


def grad_input(x, dy, dx, Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner,
               mean, invstd, weight, sum_dy, sum_dy_dev, double count, int num_threads):
    """The second half: the training-mode input gradient into dx (which may
    be x or dy) from sums over `count` values per channel (all processes'
    sums, for a synchronized batch norm)."""
    if not count > 0:
        raise ValueError(f"count must be positive, got {count}")
    cdef BackwardArgs args = backward_args(channels, mean, invstd, weight, True)
    args.given_dy = <const double *>data_of(sum_dy, cnp.NPY_FLOAT64, channels, False,
                                            "sum_dy")
    args.given_dev = <const double *>data_of(sum_dy_dev, cnp.NPY_FLOAT64, channels, False,
                                             "sum_dy_dev")
    args.count = count
    run_backward(x, dy, dx, outer, channels, inner, &args, num_threads)


def half_to_float(src, dst):
    """dst[:] = src, float16 (src) to float32 (dst), both C-contiguous with
    the same number of values, with the CPU's F16C instructions. Returns
    False, having done nothing, where the CPU has none (the caller then
    converts with NumPy)."""
    if not cnp.PyArray_Check(dst):
        raise TypeError("dst: expected a NumPy array")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>dst)
    cdef void *psrc = data_of(src, cnp.NPY_FLOAT16, n, False, "src")
    cdef void *pdst = data_of(dst, cnp.NPY_FLOAT32, n, True, "dst")
    cdef int done
    with nogil:
        done = bn_f16_to_f32(<const unsigned short *>psrc, <float *>pdst, n)
    return bool(done)


def float_to_half(src, dst):
    """dst[:] = src, float32 to float16 rounded to nearest even (overflow to
    inf), as half_to_float."""
    if not cnp.PyArray_Check(dst):
        raise TypeError("dst: expected a NumPy array")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>dst)
    cdef void *psrc = data_of(src, cnp.NPY_FLOAT32, n, False, "src")
    cdef void *pdst = data_of(dst, cnp.NPY_FLOAT16, n, True, "dst")
    cdef int done
    with nogil:
        done = bn_f32_to_f16(<const float *>psrc, <unsigned short *>pdst, n)
    return bool(done)


# --------------------------------------------------------------------------
# Recycled buffers for large outputs (_output_pool.h).

cdef extern from "_output_pool.h":
    ctypedef struct PyDataMem_Handler:
        pass
    PyDataMem_Handler bn_pool_handler
    size_t BN_POOL_MIN_BYTES
    size_t bn_pool_release()
    size_t bn_pool_kept_bytes()

cdef extern from "numpy/arrayobject.h":
    object PyDataMem_SetHandler(object handler)

from cpython.pycapsule cimport PyCapsule_New

# NumPy takes a handler as a capsule of this name.
_pool = PyCapsule_New(<void *>&bn_pool_handler, "mem_handler", NULL)
POOL_MIN_BYTES = BN_POOL_MIN_BYTES


def pooled_empty(shape, dtype):
    """np.empty(shape, dtype) whose buffer may be a recycled output buffer
    of the same size (and returns to the pool when the array dies): see
    _output_pool.h. For outputs of POOL_MIN_BYTES and more."""
    previous = PyDataMem_SetHandler(_pool)
    try:
        return np.empty(shape, dtype)
    finally:
        PyDataMem_SetHandler(previous)


def release_pool():
    """Free the recycled buffers kept for later outputs; returns their bytes."""
    return bn_pool_release()


def pool_bytes():
    """The bytes of the recycled buffers kept now."""
    return bn_pool_kept_bytes()


# --------------------------------------------------------------------------
# Eval calls without the Python checks. A (1, 64) eval forward is all
# overhead: ~5 us of Python argument checks beside 0.7 us of kernel, and
# (1, 64, 56, 56) still spent 6 us of its 25 there. This entry point takes
# batch_norm's arguments as they came and recognises, in C, the common case
# that is certainly valid (exact ndarrays of float32/float64, C-contiguous
# and aligned, (C,) per-channel arrays, plain float and int options, an out=
# that is the input or overlaps nothing); it returns None for anything else,
# and functional.py then takes its full path, which accepts or refuses the
# call with its own messages.

cdef inline bint plain_array(object a) noexcept:
    """An exact ndarray, C-contiguous and aligned, of float32 or float64."""
    if not cnp.PyArray_CheckExact(a):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int typenum = cnp.PyArray_TYPE(arr)
    return ((typenum == cnp.NPY_FLOAT32 or typenum == cnp.NPY_FLOAT64)
            and cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr))


cdef inline bint plain_channel_vector(object a, Py_ssize_t channels) noexcept:
    """A plain (C,) array (None passes: an absent weight or bias)."""
    if a is None:
        return True
    return (plain_array(a) and cnp.PyArray_NDIM(<cnp.ndarray>a) == 1
            and cnp.PyArray_DIM(<cnp.ndarray>a, 0) == channels)


cdef inline bint overlaps(object a, char *start, char *end) noexcept:
    """Whether the bytes of a (a contiguous array, or None) meet [start, end)."""
    if a is None:
        return False
    cdef char *lo = <char *>cnp.PyArray_DATA(<cnp.ndarray>a)
    cdef char *hi = lo + cnp.PyArray_NBYTES(<cnp.ndarray>a)
    return lo < end and start < hi


cdef struct PlainCall:
    # A forward call of the common kind, as eval_fast and train_fast run it.
    int typenum
    Py_ssize_t outer
    Py_ssize_t channels
    Py_ssize_t inner
    Py_ssize_t n
    int nthreads


cdef bint plain_call(x, weight, bias, momentum, eps, axis, num_threads, nonfinite, activation,
                     unbiased_running_var, PlainCall *call) except -1:
    """Whether a forward call's input and options are of the common kind
    (the running statistics are for each mode to check); fills call."""
    # Exact types only (bool is not an exact int), valid values.
    if not (type(momentum) is float and 0.0 <= <double>momentum <= 1.0):
        return False
    if not (type(eps) is float and 0.0 <= <double>eps < INFINITY):
        return False
    if not (type(nonfinite) is str
            and nonfinite in ("propagate", "skip_update", "raise")):
        return False
    if not (unbiased_running_var is True or unbiased_running_var is False):
        return False
    return plain_input(x, weight, bias, axis, num_threads, activation, call, False)


cdef bint plain_input(x, weight, bias, axis, num_threads, activation,
                      PlainCall *call, bint backward) except -1:
    """Whether an input, its weight and bias and the options that the
    forward and backward share are of the common kind; fills call. Its
    thread count is looked up only for a call that may take a team, its
    values counted as the kernels count them (the planar backward's
    BACKWARD_WORK_PER_VALUE times, backward_team_size)."""
    if not plain_array(x):
        return False
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int ndim = cnp.PyArray_NDIM(xa)
    cdef Py_ssize_t ax, k, counted
    if ndim < 2 or cnp.PyArray_SIZE(xa) == 0:
        return False
    if not (type(axis) is int and -ndim <= axis < ndim):    # (a Python compare: any int)
        return False
    if not (num_threads is None or (type(num_threads) is int and num_threads >= 1)):
        return False
    if not (activation is None or (type(activation) is str and activation == "relu")):
        return False
    ax = axis % ndim
    call.typenum = cnp.PyArray_TYPE(xa)
    call.n = cnp.PyArray_SIZE(xa)
    call.channels = cnp.PyArray_DIM(xa, ax)
    call.outer = 1
    call.inner = 1
    for k in range(ax):
        call.outer *= cnp.PyArray_DIM(xa, k)
    for k in range(ax + 1, ndim):
        call.inner *= cnp.PyArray_DIM(xa, k)
    if not (plain_channel_vector(weight, call.channels)
            and plain_channel_vector(bias, call.channels)):
        return False
    call.nthreads = 1
    counted = call.n
    if backward and planar_order(call.outer, call.n, call.inner, cnp.PyArray_ITEMSIZE(xa),
                                 SHORT_RUN_ROWS_MAX_BYTES):
        counted = BACKWARD_WORK_PER_VALUE * call.n
    if may_take_team(counted):
        # Imported here: bncore._threads imports this module.
        from bncore._threads import resolve
        call.nthreads = resolve(num_threads)
    return True


cdef bint plain_like(object a, cnp.ndarray xa) noexcept:
    """A plain array (plain_array) of xa's dtype and shape."""
    cdef int k, ndim = cnp.PyArray_NDIM(xa)
    if not (plain_array(a) and cnp.PyArray_TYPE(<cnp.ndarray>a) == cnp.PyArray_TYPE(xa)
            and cnp.PyArray_NDIM(<cnp.ndarray>a) == ndim):
        return False
    for k in range(ndim):
        if cnp.PyArray_DIM(<cnp.ndarray>a, k) != cnp.PyArray_DIM(xa, k):
            return False
    return True


cdef object output_for(x, out, tuple channel_arrays, other=None):
    """A new output like x, or out when it is a plain writeable array like x
    (plain_like) that is x itself (or `other`, an array like x) or overlaps
    none of x, other and channel_arrays; else None."""
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef char *start
    cdef char *end
    if out is None:
        if cnp.PyArray_NBYTES(xa) >= BN_POOL_MIN_BYTES:
            return pooled_empty(x.shape, x.dtype)
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(xa), cnp.PyArray_DIMS(xa),
                                 cnp.PyArray_TYPE(xa), 0)
    if not (plain_like(out, xa) and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out)):
        return None
    # out may be x (or other) itself; any other overlap is the full path's
    # to refuse.
    start = <char *>cnp.PyArray_DATA(<cnp.ndarray>out)
    end = start + cnp.PyArray_NBYTES(<cnp.ndarray>out)
    if start != <char *>cnp.PyArray_DATA(xa) and overlaps(x, start, end):
        return None
    if (other is not None and start != <char *>cnp.PyArray_DATA(<cnp.ndarray>other)
            and overlaps(other, start, end)):
        return None
    for array in channel_arrays:
        if overlaps(array, start, end):
            return None
    return out


def eval_fast(x, running_mean, running_var, weight, bias, momentum, eps, axis, out,
              num_threads, nonfinite, activation, unbiased_running_var):
    """batch_norm(x, ..., training=False) for a call of the common kind, or
    None when the call is not one (see above)."""
    cdef PlainCall call
    if not plain_call(x, weight, bias, momentum, eps, axis, num_threads, nonfinite,
                      activation, unbiased_running_var, &call):
        return None
    if not (running_mean is not None and running_var is not None
            and plain_channel_vector(running_mean, call.channels)
            and plain_channel_vector(running_var, call.channels)):
        return None
    y = output_for(x, out, (running_mean, running_var, weight, bias))
    if y is None:
        return None
    normalize(x, y, call.outer, call.channels, call.inner, running_mean, running_var,
              <double>eps, weight, bias, call.nthreads, activation is not None)
    return y


def train_fast(x, running_mean, running_var, weight, bias, momentum, eps, axis, out,
               num_threads, nonfinite, activation, unbiased_running_var):
    """The kernel half of batch_norm(x, ..., training=True) for a call of the
    common kind: (y, mean, m2, invstd, count), the running statistics not
    yet updated (functional._fold_batch does that); or None when the call is
    not one. Running buffers: both None, or plain writeable (C,) arrays
    apart from each other and from out."""
    cdef PlainCall call
    if not plain_call(x, weight, bias, momentum, eps, axis, num_threads, nonfinite,
                      activation, unbiased_running_var, &call):
        return None
    if call.n // call.channels < 2:
        return None     # one value per channel: the full path's error
    cdef char *start
    if running_mean is not None or running_var is not None:
        if not (running_mean is not None and running_var is not None
                and plain_channel_vector(running_mean, call.channels)
                and plain_channel_vector(running_var, call.channels)
                and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_mean)
                and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_var)):
            return None
        start = <char *>cnp.PyArray_DATA(<cnp.ndarray>running_mean)
        if overlaps(running_var, start, start + cnp.PyArray_NBYTES(<cnp.ndarray>running_mean)):
            return None
    y = output_for(x, out, (running_mean, running_var, weight, bias))
    if y is None:
        return None
    cdef cnp.npy_intp channels = call.channels
    mean = cnp.PyArray_EMPTY(1, &channels, cnp.NPY_FLOAT64, 0)
    m2 = cnp.PyArray_EMPTY(1, &channels, cnp.NPY_FLOAT64, 0)
    invstd = cnp.PyArray_EMPTY(1, &channels, cnp.NPY_FLOAT64, 0)
    train_forward(x, y, call.outer, call.channels, call.inner, weight, bias, <double>eps,
                  mean, m2, invstd, call.nthreads, activation is not None)
    return y, mean, m2, invstd, call.n // call.channels


def backward_fast(dy, x, mean, invstd, weight, bias, training, axis, out, num_threads,
                  activation):
    """batch_norm_backward(dy, x, mean, invstd, weight, bias, ...) for a call
    of the common kind: dy a plain array like x, mean and invstd plain (C,)
    float64 arrays (as batch_norm's return_stats gives them), training a
    bool, out None or a plain array that is dy or x (not x with relu) or
    overlaps nothing it reads; or None when the call is not one."""
    cdef PlainCall call
    if not (training is True or training is False):
        return None
    if not plain_input(x, weight, bias, axis, num_threads, activation, &call, True):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    if not plain_like(dy, xa):
        return None
    for stats in (mean, invstd):
        if not (stats is not None and plain_channel_vector(stats, call.channels)
                and cnp.PyArray_TYPE(<cnp.ndarray>stats) == cnp.NPY_FLOAT64):
            return None
    dx = output_for(x, out, (mean, invstd, weight, bias), dy)
    if dx is None:
        return None
    if activation is not None and cnp.PyArray_DATA(<cnp.ndarray>dx) == cnp.PyArray_DATA(xa):
        return None     # out is x (any view of it): the relu's gate is read from x
    cdef cnp.npy_intp channels = call.channels
    grad_weight = cnp.PyArray_ZEROS(1, &channels, cnp.NPY_FLOAT64, 0)
    grad_bias = cnp.PyArray_ZEROS(1, &channels, cnp.NPY_FLOAT64, 0)
    if activation is not None:
        # dL/d(pre-activation) into dx, then the backward in place on it.
        relu_mask(x, dy, dx, call.outer, call.channels, call.inner, mean, invstd, weight,
                  bias, call.nthreads)
        dy = dx
    backward(x, dy, dx, call.outer, call.channels, call.inner, mean, invstd, weight,
             training, grad_weight, grad_bias, call.nthreads)
    if call.typenum == cnp.NPY_FLOAT32:
        return dx, grad_weight.astype(np.float32), grad_bias.astype(np.float32)
    return dx, grad_weight, grad_bias


# --------------------------------------------------------------------------
# The running-statistics update of a training call, in one loop instead of
# ten NumPy operations (~6 us of a small training call).

cdef inline double load_param(Params p, Py_ssize_t c) noexcept nogil:
    return (<const float *>p.data)[c] if p.single else (<const double *>p.data)[c]


cdef inline void store_param(Params p, Py_ssize_t c, double value) noexcept nogil:
    if p.single:
        (<float *>p.data)[c] = <float>value
    else:
        (<double *>p.data)[c] = value


cdef inline bint overflows(double value, bint single) noexcept nogil:
    """Whether a finite float64 becomes infinite when stored as float32."""
    return single and fabs(value) <= DBL_MAX and fabs(<double><float>value) > FLT_MAX


def update_running(running_mean, running_var, mean, m2, double var_divisor, double keep,
                   double take):
    """running = keep * running + take * batch per channel, in float64 and
    then rounded to each buffer's dtype (float32 or float64), batch being
    mean and m2 / var_divisor. Returns False, writing nothing, for buffers
    it does not take (not plain writeable (C,) arrays: see plain_array) or
    if a finite value would overflow a float32 buffer: NumPy's casts then
    decide (under np.errstate they may raise), in functional._update_running."""
    cdef Py_ssize_t channels = cnp.PyArray_SIZE(<cnp.ndarray>mean)
    if not (plain_channel_vector(running_mean, channels) and running_mean is not None
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_mean)
            and plain_channel_vector(running_var, channels) and running_var is not None
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_var)):
        return False
    cdef Params rm = params_of(running_mean, channels, "running_mean")
    cdef Params rv = params_of(running_var, channels, "running_var")
    cdef double *pmean = <double *>data_of(mean, cnp.NPY_FLOAT64, channels, False, "mean")
    cdef double *pm2 = <double *>data_of(m2, cnp.NPY_FLOAT64, channels, False, "m2")
    cdef double *updated = <double *>malloc(2 * channels * sizeof(double))
    cdef Py_ssize_t c
    if updated == NULL:
        raise MemoryError("bncore: out of memory for the running statistics update")
    for c in range(channels):
        updated[c] = keep * load_param(rm, c) + take * pmean[c]
        updated[channels + c] = keep * load_param(rv, c) + take * (pm2[c] / var_divisor)
        if overflows(updated[c], rm.single) or overflows(updated[channels + c], rv.single):
            free(updated)
            return False
    for c in range(channels):
        store_param(rm, c, updated[c])
        store_param(rv, c, updated[channels + c])
    free(updated)
    return True
