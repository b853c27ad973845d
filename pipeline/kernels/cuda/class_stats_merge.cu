// Chan merge of one batch's per-class moments into running per-class
// statistics that stay on the GPU (src/device_stats.rs), so a collection
// moves no class means to the host between checkpoints.
//
//   table [rows, d + 1] f64: per class row, the running mean, then M2
//   batch [u, d + 1]    f64: per batch class, its mean, then M2
//                            (what class_moments writes)
//   plan  [u, 3]        f64: per batch class, its table row, the count
//                            before the batch (n_a) and in it (n_b)
//
// One block per batch class, its threads over the columns. Rows of the plan
// are distinct (the host groups a batch by class), so blocks never write the
// same row. The arithmetic is the host's `ClassStats::merge_one`, written
// with round-to-nearest intrinsics so that NVRTC does not contract it into
// fused multiply-adds: the means come out bit for bit as on the host; M2
// differs only in the order |delta|^2 is summed.

#ifndef CSM_THREADS
#define CSM_THREADS 256
#endif

extern "C" __global__ void __launch_bounds__(CSM_THREADS)
    class_stats_merge(double* table, const double* batch, const double* plan, unsigned int d) {
    __shared__ double warp_sums[CSM_THREADS / 32];
    const unsigned int s = blockIdx.x;
    const double* p = plan + 3ull * s;
    double* a = table + (unsigned long long)p[0] * (d + 1);
    const double* b = batch + (unsigned long long)s * (d + 1);
    const double na = p[1], nb = p[2];
    if (nb == 0.0) return;  // uniform over the block
    if (na == 0.0) {
        // A class the table has not seen: its row becomes the batch's.
        for (unsigned int j = threadIdx.x; j <= d; j += blockDim.x) a[j] = b[j];
        return;
    }
    const double n = __dadd_rn(na, nb);
    const double w = __ddiv_rn(nb, n);
    double dd = 0.0;
    for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) {
        const double delta = __dsub_rn(b[j], a[j]);
        dd = __dadd_rn(dd, __dmul_rn(delta, delta));
        a[j] = __dadd_rn(a[j], __dmul_rn(delta, w));
    }
    for (int k = 16; k > 0; k >>= 1) dd += __shfl_xor_sync(0xffffffffu, dd, k);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = dd;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (unsigned int i = 0; i < (blockDim.x >> 5); i++) t += warp_sums[i];
        // m2 += m2b + dd * na * nb / n, in the host's order.
        const double cross = __ddiv_rn(__dmul_rn(__dmul_rn(t, na), nb), n);
        a[d] = __dadd_rn(a[d], __dadd_rn(b[d], cross));
    }
}
