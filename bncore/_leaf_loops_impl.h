/* Template body of _leaf_loops.h: BN_T is the element type, BN_SFX names the
 * functions for it. */

/* s[lane] += x[i] over a run. */
static inline void BN_SFX(bn_lane_sums)(
    const BN_T *BN_RESTRICT x, ptrdiff_t n, double *BN_RESTRICT s)
{
    ptrdiff_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES)
        for (int k = 0; k < BN_LANES; k++)
            s[k] += (double)x[i + k];
    for (int k = 0; i + k < n; k++)
        s[k] += (double)x[i + k];
}

/* s1[lane] += x[i] - shift and s2[lane] += (x[i] - shift)^2 over a run: the
 * shifted sums, which do not cancel when shift is close to the mean. */
static inline void BN_SFX(bn_lane_shifted_sums)(
    const BN_T *BN_RESTRICT x, ptrdiff_t n, double shift,
    double *BN_RESTRICT s1, double *BN_RESTRICT s2)
{
    ptrdiff_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES)
        for (int k = 0; k < BN_LANES; k++) {
            double d = (double)x[i + k] - shift;
            s1[k] += d;
            s2[k] += d * d;
        }
    for (int k = 0; i + k < n; k++) {
        double d = (double)x[i + k] - shift;
        s1[k] += d;
        s2[k] += d * d;
    }
}

/* Column-wise versions for the interleaved layout: one row of n values,
 * value j belongs to column j. */
static inline void BN_SFX(bn_column_sums)(
    const BN_T *BN_RESTRICT x, ptrdiff_t n, double *BN_RESTRICT s)
{
    for (ptrdiff_t j = 0; j < n; j++)
        s[j] += (double)x[j];
}

static inline void BN_SFX(bn_column_shifted_sums)(
    const BN_T *BN_RESTRICT x, ptrdiff_t n, const double *BN_RESTRICT shift,
    double *BN_RESTRICT s1, double *BN_RESTRICT s2)
{
    for (ptrdiff_t j = 0; j < n; j++) {
        double d = (double)x[j] - shift[j];
        s1[j] += d;
        s2[j] += d * d;
    }
}

/* y = ((x - mean_hi) - mean_lo) * scale + shift over a run. The mean comes
 * as two floats of the element type whose sum is the float64 mean: x - hi is
 * exact when x is near the mean (Sterbenz), so the low bits of a large mean
 * are not lost, which the folded x * a + b form would lose. */
static inline void BN_SFX(bn_affine)(
    const BN_T *x, BN_T *y, ptrdiff_t n,
    BN_T mean_hi, BN_T mean_lo, BN_T scale, BN_T shift)
{
    for (ptrdiff_t i = 0; i < n; i++)
        y[i] = ((x[i] - mean_hi) - mean_lo) * scale + shift;
}

static inline void BN_SFX(bn_column_affine)(
    const BN_T *x, BN_T *y, ptrdiff_t n,
    const BN_T *BN_RESTRICT mean_hi, const BN_T *BN_RESTRICT mean_lo,
    const BN_T *BN_RESTRICT scale, const BN_T *BN_RESTRICT shift)
{
    for (ptrdiff_t j = 0; j < n; j++)
        y[j] = ((x[j] - mean_hi[j]) - mean_lo[j]) * scale[j] + shift[j];
}
