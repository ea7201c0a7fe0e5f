/* Template body of _leaf_loops.h: BN_T is the element type, BN_SFX names the
 * functions for it. */

/* With d = (x[i] - origin) - offset: s1[lane] += d and s2[lane] += d * d
 * over a run. These shifted sums do not cancel when origin + offset is close
 * to the data; keeping the two apart keeps a float64 origin's low bits
 * (x - origin is exact when x is near origin). */
BN_LEAF void BN_SFX(bn_lane_shifted_sums)(
    const BN_T *BN_RESTRICT x, ptrdiff_t n, double origin, double offset,
    double *BN_RESTRICT s1, double *BN_RESTRICT s2)
{
    ptrdiff_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES)
        for (int k = 0; k < BN_LANES; k++) {
            double d = ((double)x[i + k] - origin) - offset;
            s1[k] += d;
            s2[k] += d * d;
        }
    for (int k = 0; i + k < n; k++) {
        double d = ((double)x[i + k] - origin) - offset;
        s1[k] += d;
        s2[k] += d * d;
    }
}

/* Column-wise shifted sums for the interleaved layout: one row of n values,
 * value j belongs to column j. */
BN_LEAF void BN_SFX(bn_column_shifted_sums)(
    const BN_T *BN_RESTRICT x, ptrdiff_t n, const double *BN_RESTRICT origin,
    const double *BN_RESTRICT offset, double *BN_RESTRICT s1, double *BN_RESTRICT s2)
{
    for (ptrdiff_t j = 0; j < n; j++) {
        double d = ((double)x[j] - origin[j]) - offset[j];
        s1[j] += d;
        s2[j] += d * d;
    }
}

/* y = ((x - mean_hi) - mean_lo) * scale + shift over a run. The mean comes
 * as two floats of the element type whose sum is the float64 mean: x - hi is
 * exact when x is near the mean (Sterbenz), so the low bits of a large mean
 * are not lost, which the folded x * a + b form would lose. */
BN_LEAF void BN_SFX(bn_affine)(
    const BN_T *x, BN_T *y, ptrdiff_t n,
    BN_T mean_hi, BN_T mean_lo, BN_T scale, BN_T shift)
{
    for (ptrdiff_t i = 0; i < n; i++)
        y[i] = ((x[i] - mean_hi) - mean_lo) * scale + shift;
}

BN_LEAF void BN_SFX(bn_column_affine)(
    const BN_T *x, BN_T *y, ptrdiff_t n,
    const BN_T *BN_RESTRICT mean_hi, const BN_T *BN_RESTRICT mean_lo,
    const BN_T *BN_RESTRICT scale, const BN_T *BN_RESTRICT shift)
{
    for (ptrdiff_t j = 0; j < n; j++)
        y[j] = ((x[j] - mean_hi[j]) - mean_lo[j]) * scale[j] + shift[j];
}

/* The backward pass's two sums over a run: s_dy[lane] += dy and
 * s_dy_dev[lane] += dy * (x - mean), in float64. */
BN_LEAF void BN_SFX(bn_lane_grad_sums)(
    const BN_T *BN_RESTRICT x, const BN_T *BN_RESTRICT dy, ptrdiff_t n, double mean,
    double *BN_RESTRICT s_dy, double *BN_RESTRICT s_dy_dev)
{
    ptrdiff_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES)
        for (int k = 0; k < BN_LANES; k++) {
            double g = (double)dy[i + k];
            s_dy[k] += g;
            s_dy_dev[k] += g * ((double)x[i + k] - mean);
        }
    for (int k = 0; i + k < n; k++) {
        double g = (double)dy[i + k];
        s_dy[k] += g;
        s_dy_dev[k] += g * ((double)x[i + k] - mean);
    }
}

BN_LEAF void BN_SFX(bn_column_grad_sums)(
    const BN_T *BN_RESTRICT x, const BN_T *BN_RESTRICT dy, ptrdiff_t n,
    const double *BN_RESTRICT mean, double *BN_RESTRICT s_dy,
    double *BN_RESTRICT s_dy_dev)
{
    for (ptrdiff_t j = 0; j < n; j++) {
        double g = (double)dy[j];
        s_dy[j] += g;
        s_dy_dev[j] += g * ((double)x[j] - mean[j]);
    }
}

/* dx = dy * k + (((x - mean_hi) - mean_lo) * c1 + c0) over a run: the
 * training-mode input gradient with its per-channel constants folded
 * (functional.py's batch_norm_backward documents them). dx may be x or dy. */
BN_LEAF void BN_SFX(bn_grad_input)(
    const BN_T *x, const BN_T *dy, BN_T *dx, ptrdiff_t n,
    BN_T mean_hi, BN_T mean_lo, BN_T k, BN_T c1, BN_T c0)
{
    for (ptrdiff_t i = 0; i < n; i++)
        dx[i] = dy[i] * k + (((x[i] - mean_hi) - mean_lo) * c1 + c0);
}

BN_LEAF void BN_SFX(bn_column_grad_input)(
    const BN_T *x, const BN_T *dy, BN_T *dx, ptrdiff_t n,
    const BN_T *BN_RESTRICT mean_hi, const BN_T *BN_RESTRICT mean_lo,
    const BN_T *BN_RESTRICT k, const BN_T *BN_RESTRICT c1, const BN_T *BN_RESTRICT c0)
{
    for (ptrdiff_t j = 0; j < n; j++)
        dx[j] = dy[j] * k[j] + (((x[j] - mean_hi[j]) - mean_lo[j]) * c1[j] + c0[j]);
}
