/* Template body of _leaf_loops.h: BN_T is the element type, BN_SFX names the
 * functions for it. */

/* With d = (x[i] - origin) - offset: s1[lane] += d and s2[lane] += d * d
 * over a run. These shifted sums do not cancel when origin + offset is close
 * to the data; keeping the two apart keeps a float64 origin's low bits
 * (x - origin is exact when x is near origin). */
BN_LEAF void BN_SFX(bn_lane_shifted_sums_generic)(
    const BN_T *BN_RESTRICT x, ptrdiff_t n, double origin, double offset,
    double *BN_RESTRICT s1, double *BN_RESTRICT s2)
{
    /* Lanes 0-7 in the `a` vectors, 8-15 in the `b` vectors. */
    bn_v8df a1 = bn_load8_f64(s1), b1 = bn_load8_f64(s1 + 8);
    bn_v8df a2 = bn_load8_f64(s2), b2 = bn_load8_f64(s2 + 8);
    ptrdiff_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES) {
        bn_v8df d = (BN_SFX(bn_load8)(x + i) - origin) - offset;
        bn_v8df e = (BN_SFX(bn_load8)(x + i + 8) - origin) - offset;
        a1 += d;
        a2 += d * d;
        b1 += e;
        b2 += e * e;
    }
    memcpy(s1, &a1, sizeof a1);
    memcpy(s1 + 8, &b1, sizeof b1);
    memcpy(s2, &a2, sizeof a2);
    memcpy(s2 + 8, &b2, sizeof b2);
    for (int k = 0; i + k < n; k++) {
        double d = ((double)x[i + k] - origin) - offset;
        s1[k] += d;
        s2[k] += d * d;
    }
}

/* The interleaved layout's version: nrows rows of ncols values, `stride`
 * apart; value j of a row belongs to column j, whose sums s1[j], s2[j]
 * gather d = (x - origin[j]) - offset[j] row after row. offset may be NULL
 * for zeros. */
BN_LEAF void BN_SFX(bn_rows_shifted_sums_generic)(
    const BN_T *BN_RESTRICT x, ptrdiff_t nrows, ptrdiff_t stride, ptrdiff_t ncols,
    const double *BN_RESTRICT origin, const double *BN_RESTRICT offset,
    double *BN_RESTRICT s1, double *BN_RESTRICT s2)
{
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const BN_T *row = x + r * stride;
        if (offset == NULL) {
            for (ptrdiff_t j = 0; j < ncols; j++) {
                double d = (double)row[j] - origin[j];
                s1[j] += d;
                s2[j] += d * d;
            }
        } else {
            for (ptrdiff_t j = 0; j < ncols; j++) {
                double d = ((double)row[j] - origin[j]) - offset[j];
                s1[j] += d;
                s2[j] += d * d;
            }
        }
    }
}

/* An elementwise loop y[i] = EXPR(i) over a run, with normal stores or, when
 * `stream` is set, streaming stores: a scalar head up to 16-byte alignment,
 * then whole 64-byte lines computed into an aligned buffer (vectorised),
 * BN_GROUP_LINES of them before any is streamed out 16 bytes at a time,
 * then a scalar tail.
 *
 * BN_ELEMENTWISE_LINES is the general form: a line is computed as
 * LINE_EXPR(i) and then finished by the statement FINISH (which sees `line`
 * and the line's first index `base`) before it is streamed; EXPR(i) must be
 * what LINE_EXPR then FINISH give. GCC vectorises a line's fixed 16-value
 * loop only when it has no conditional in it, so a conditional (the relu)
 * goes into FINISH, written with vector operations. */
#define BN_PER_LINE ((ptrdiff_t)(BN_LINE_BYTES / sizeof(BN_T)))
#if BN_HAVE_STREAM
#define BN_ELEMENTWISE_LINES(n, y, stream, EXPR, LINE_EXPR, FINISH)                     \
    do {                                                                                \
        ptrdiff_t i = 0;                                                                \
        if (stream) {                                                                   \
            for (; i < (n) && ((uintptr_t)((y) + i) & 15); i++)                         \
                (y)[i] = EXPR;                                                          \
            while (i + BN_PER_LINE <= (n)) {                                            \
                BN_T lines[BN_GROUP_LINES][BN_PER_LINE] __attribute__((aligned(64)));   \
                ptrdiff_t first = i, count = ((n) - i) / BN_PER_LINE;                   \
                if (count > BN_GROUP_LINES)                                             \
                    count = BN_GROUP_LINES;                                             \
                for (ptrdiff_t g = 0; g < count; g++) {                                 \
                    BN_T *line = lines[g];                                              \
                    ptrdiff_t base = first + g * BN_PER_LINE;                           \
                    for (int l = 0; l < BN_PER_LINE; l++) {                             \
                        i = base + l;                                                   \
                        line[l] = LINE_EXPR;                                            \
                    }                                                                   \
                    i = base;                                                           \
                    FINISH;                                                             \
                }                                                                       \
                for (ptrdiff_t g = 0; g < count; g++)                                   \
                    for (int l = 0; l < BN_PER_LINE; l += (int)(16 / sizeof(BN_T)))     \
                        BN_STREAM_XMM((y) + first + g * BN_PER_LINE + l, lines[g] + l); \
                i = first + count * BN_PER_LINE;                                        \
            }                                                                           \
        }                                                                               \
        for (; i < (n); i++)                                                            \
            (y)[i] = EXPR;                                                              \
    } while (0)
#else
#define BN_ELEMENTWISE_LINES(n, y, stream, EXPR, LINE_EXPR, FINISH)                     \
    do {                                                                                \
        (void)(stream);                                                                 \
        for (ptrdiff_t i = 0; i < (n); i++)                                             \
            (y)[i] = EXPR;                                                              \
    } while (0)
#endif
#define BN_ELEMENTWISE(n, y, stream, EXPR) \
    BN_ELEMENTWISE_LINES(n, y, stream, EXPR, EXPR, (void)0)

/* max(v, 0) with NaN kept (PyTorch's relu propagates NaN). */
BN_INLINE BN_T BN_SFX(bn_relu)(BN_T v)
{
    return v < 0 ? (BN_T)0 : v;
}

/* A line of values as one vector, and its bits as integers. */
typedef BN_T BN_SFX(bn_line) __attribute__((vector_size(BN_LINE_BYTES)));
typedef BN_BITS BN_SFX(bn_line_bits) __attribute__((vector_size(BN_LINE_BYTES)));

/* bn_relu on a whole (aligned) line: clear the bits of the values < 0. */
BN_INLINE void BN_SFX(bn_relu_line)(BN_T *line)
{
    BN_SFX(bn_line) v;
    BN_SFX(bn_line_bits) bits;
    memcpy(&v, line, sizeof v);
    memcpy(&bits, line, sizeof bits);
    bits &= ~(v < 0);
    memcpy(line, &bits, sizeof bits);
}

/* line = gate where line > above, else 0 (gate unaligned). */
BN_INLINE void BN_SFX(bn_gate_line)(BN_T *line, const BN_T *gate, BN_T above)
{
    BN_SFX(bn_line) v;
    BN_SFX(bn_line_bits) bits;
    memcpy(&v, line, sizeof v);
    memcpy(&bits, gate, sizeof bits);
    bits &= (v > above);
    memcpy(line, &bits, sizeof bits);
}

/* The affine transform of every elementwise loop below. */
#define BN_AFFINE(xv, hi, lo, scale, shift) ((((xv) - (hi)) - (lo)) * (scale) + (shift))

/* y = ((x - mean_hi) - mean_lo) * scale + shift over a run, then max(y, 0)
 * when relu is set. The mean comes as two floats of the element type whose
 * sum is the float64 mean: x - hi is exact when x is near the mean
 * (Sterbenz), so the low bits of a large mean are not lost, which the folded
 * x * a + b form would lose. y may be x. */
BN_LEAF void BN_SFX(bn_affine)(
    const BN_T *x, BN_T *y, ptrdiff_t n,
    BN_T mean_hi, BN_T mean_lo, BN_T scale, BN_T shift, int relu, int stream)
{
    if (relu)
        BN_ELEMENTWISE_LINES(
            n, y, stream, BN_SFX(bn_relu)(BN_AFFINE(x[i], mean_hi, mean_lo, scale, shift)),
            BN_AFFINE(x[i], mean_hi, mean_lo, scale, shift), BN_SFX(bn_relu_line)(line));
    else
        BN_ELEMENTWISE(n, y, stream, BN_AFFINE(x[i], mean_hi, mean_lo, scale, shift));
}

/* The interleaved layout's version: nrows rows of ncols values, `stride`
 * apart, with per-column constants. */
BN_LEAF void BN_SFX(bn_rows_affine)(
    const BN_T *x, BN_T *y, ptrdiff_t nrows, ptrdiff_t stride, ptrdiff_t ncols,
    const BN_T *BN_RESTRICT mean_hi, const BN_T *BN_RESTRICT mean_lo,
    const BN_T *BN_RESTRICT scale, const BN_T *BN_RESTRICT shift, int relu, int stream)
{
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const BN_T *xr = x + r * stride;
        BN_T *yr = y + r * stride;
        if (relu)
            BN_ELEMENTWISE_LINES(
                ncols, yr, stream,
                BN_SFX(bn_relu)(BN_AFFINE(xr[i], mean_hi[i], mean_lo[i], scale[i], shift[i])),
                BN_AFFINE(xr[i], mean_hi[i], mean_lo[i], scale[i], shift[i]),
                BN_SFX(bn_relu_line)(line));
        else
            BN_ELEMENTWISE(ncols, yr, stream,
                           BN_AFFINE(xr[i], mean_hi[i], mean_lo[i], scale[i], shift[i]));
    }
}

/* The backward of a fused relu: out = dy where the forward's affine output
 * was > above (0; for a half-precision output, the largest value that
 * rounds to 0), else 0 (the gradient at 0 is 0, as PyTorch's). The affine
 * output is recomputed from x with the forward's constants and operations.
 * out may be dy. */
BN_LEAF void BN_SFX(bn_relu_gate)(
    const BN_T *x, const BN_T *dy, BN_T *out, ptrdiff_t n,
    BN_T mean_hi, BN_T mean_lo, BN_T scale, BN_T shift, BN_T above, int stream)
{
    BN_ELEMENTWISE_LINES(
        n, out, stream,
        BN_AFFINE(x[i], mean_hi, mean_lo, scale, shift) > above ? dy[i] : (BN_T)0,
        BN_AFFINE(x[i], mean_hi, mean_lo, scale, shift),
        BN_SFX(bn_gate_line)(line, dy + base, above));
}

BN_LEAF void BN_SFX(bn_rows_relu_gate)(
    const BN_T *x, const BN_T *dy, BN_T *out, ptrdiff_t nrows, ptrdiff_t stride,
    ptrdiff_t ncols, const BN_T *BN_RESTRICT mean_hi, const BN_T *BN_RESTRICT mean_lo,
    const BN_T *BN_RESTRICT scale, const BN_T *BN_RESTRICT shift, BN_T above, int stream)
{
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const BN_T *xr = x + r * stride;
        const BN_T *gr = dy + r * stride;
        BN_T *orow = out + r * stride;
        BN_ELEMENTWISE_LINES(
            ncols, orow, stream,
            BN_AFFINE(xr[i], mean_hi[i], mean_lo[i], scale[i], shift[i]) > above
                ? gr[i] : (BN_T)0,
            BN_AFFINE(xr[i], mean_hi[i], mean_lo[i], scale[i], shift[i]),
            BN_SFX(bn_gate_line)(line, gr + base, above));
    }
}

/* The backward pass's two sums over a run: s_dy[lane] += dy and
 * s_dy_dev[lane] += dy * (x - mean), in float64. */
BN_LEAF void BN_SFX(bn_lane_grad_sums_generic)(
    const BN_T *BN_RESTRICT x, const BN_T *BN_RESTRICT dy, ptrdiff_t n, double mean,
    double *BN_RESTRICT s_dy, double *BN_RESTRICT s_dy_dev)
{
    bn_v8df a1 = bn_load8_f64(s_dy), b1 = bn_load8_f64(s_dy + 8);
    bn_v8df a2 = bn_load8_f64(s_dy_dev), b2 = bn_load8_f64(s_dy_dev + 8);
    ptrdiff_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES) {
        bn_v8df g = BN_SFX(bn_load8)(dy + i);
        bn_v8df h = BN_SFX(bn_load8)(dy + i + 8);
        a1 += g;
        a2 += g * (BN_SFX(bn_load8)(x + i) - mean);
        b1 += h;
        b2 += h * (BN_SFX(bn_load8)(x + i + 8) - mean);
    }
    memcpy(s_dy, &a1, sizeof a1);
    memcpy(s_dy + 8, &b1, sizeof b1);
    memcpy(s_dy_dev, &a2, sizeof a2);
    memcpy(s_dy_dev + 8, &b2, sizeof b2);
    for (int k = 0; i + k < n; k++) {
        double g = (double)dy[i + k];
        s_dy[k] += g;
        s_dy_dev[k] += g * ((double)x[i + k] - mean);
    }
}

BN_LEAF void BN_SFX(bn_rows_grad_sums_generic)(
    const BN_T *BN_RESTRICT x, const BN_T *BN_RESTRICT dy, ptrdiff_t nrows, ptrdiff_t stride,
    ptrdiff_t ncols, const double *BN_RESTRICT mean, double *BN_RESTRICT s_dy,
    double *BN_RESTRICT s_dy_dev)
{
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const BN_T *xr = x + r * stride;
        const BN_T *gr = dy + r * stride;
        for (ptrdiff_t j = 0; j < ncols; j++) {
            double g = (double)gr[j];
            s_dy[j] += g;
            s_dy_dev[j] += g * ((double)xr[j] - mean[j]);
        }
    }
}

/* dx = dy * k + (((x - mean_hi) - mean_lo) * c1 + c0) over a run: the
 * training-mode input gradient with its per-channel constants folded
 * (functional.py's batch_norm_backward documents them). dx may be x or dy. */
BN_LEAF void BN_SFX(bn_grad_input)(
    const BN_T *x, const BN_T *dy, BN_T *dx, ptrdiff_t n,
    BN_T mean_hi, BN_T mean_lo, BN_T k, BN_T c1, BN_T c0, int stream)
{
    BN_ELEMENTWISE(n, dx, stream, dy[i] * k + (((x[i] - mean_hi) - mean_lo) * c1 + c0));
}

BN_LEAF void BN_SFX(bn_rows_grad_input)(
    const BN_T *x, const BN_T *dy, BN_T *dx, ptrdiff_t nrows, ptrdiff_t stride,
    ptrdiff_t ncols, const BN_T *BN_RESTRICT mean_hi, const BN_T *BN_RESTRICT mean_lo,
    const BN_T *BN_RESTRICT k, const BN_T *BN_RESTRICT c1, const BN_T *BN_RESTRICT c0,
    int stream)
{
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const BN_T *xr = x + r * stride;
        const BN_T *gr = dy + r * stride;
        BN_T *dr = dx + r * stride;
        BN_ELEMENTWISE(ncols, dr, stream,
                       gr[i] * k[i] + (((xr[i] - mean_hi[i]) - mean_lo[i]) * c1[i] + c0[i]));
    }
}

/* A copy with the same stores: the yardstick of the benchmarks (the least
 * time any y = f(x) kernel can take), not used by batch norm itself. */
BN_LEAF void BN_SFX(bn_copy)(const BN_T *x, BN_T *y, ptrdiff_t n, int stream)
{
    BN_ELEMENTWISE(n, y, stream, x[i]);
}

#undef BN_PER_LINE
#undef BN_AFFINE
#undef BN_ELEMENTWISE
