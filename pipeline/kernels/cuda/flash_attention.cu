// Causal (optionally windowed) attention of bf16 queries, keys and values in
// one kernel ("flash attention"), for inference.
//
// A CUDA block takes 64 queries of one (batch, head): four warps of 16 rows.
// It walks the keys those queries can see in tiles of 64 rows of K and V held
// in shared memory; each warp keeps its scores, its running softmax (maximum
// and sum per row) and its output rows in registers. So no score tensor of
// any size reaches global memory, q, k and v are read in place (heads as
// strided views, grouped queries sharing a key/value head) and the output is
// written once, as [B, T, H * D].
//
// Numbers: scores are bf16 products summed in f32 (exact products, as the
// reference models' f32 scores), the softmax is f32, the probabilities are
// rounded to bf16 for the product with V, which the tensor cores accumulate
// in f32 (mma.m16n8k16); the output is divided by the row sum in f32 and
// rounded to bf16 once. A masked key gets weight exactly zero.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
// floating point type"), lane = 4 * g + c:
//   A (16 x 16, row):  reg0 = (g, 2c..2c+1), reg1 = (g+8, 2c..), reg2 = (g, 2c+8..), reg3 = (g+8, 2c+8..)
//   B (16 x 8, col):   reg0 = (k 2c..2c+1, n g), reg1 = (k 2c+8..2c+9, n g)
//   C (16 x 8, f32):   c0, c1 = (g, 2c..2c+1), c2, c3 = (g+8, 2c..2c+1)
// The lower element of a register is the lower 16 bits.
//
// Compiled by NVRTC for compute_80 (src/model/flash_attention.rs); with
// PIPELINE_CUDA_EMULATOR defined it builds for the CPU emulator the tests run
// (emulator.hpp), where the one instruction above is computed from these
// layouts and every warp collective and barrier is checked.

#define FA_WARPS 4
#define FA_BQ (16 * FA_WARPS)
#define FA_BK 64

// Strides in elements; the innermost (head dimension) stride is 1.
struct FlashArgs {
    long long q_stride[3];  // batch, head, token
    long long k_stride[3];
    long long v_stride[3];
    unsigned int t;       // tokens
    unsigned int h;       // query heads
    unsigned int hkv;     // key/value heads (h is a multiple)
    unsigned int window;  // 0: causal; else query i sees keys i - window + 1 ..= i
    unsigned int d;       // head dimension, the kernel's D
    float scale_log2;     // score scale times log2(e)
};

struct __align__(16) fa_u32x4 {
    unsigned int x, y, z, w;
};

__device__ __forceinline__ unsigned int fa_pack(float lo, float hi) {
    return (unsigned int)to_bf16(lo) | ((unsigned int)to_bf16(hi) << 16);
}

// d += a (16 x 16) * b (16 x 8), bf16 in, f32 accumulators, one warp.
__device__ __forceinline__ void fa_mma(float* d, const unsigned int* a, const unsigned int* b) {
#ifdef PIPELINE_CUDA_EMULATOR
    emu::mma_m16n8k16_bf16(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// The maximum and the sum over the four lanes of a group (one row's lanes).
__device__ __forceinline__ float fa_group_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float fa_group_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

template <int D>
__device__ __forceinline__ void flash_attention(const unsigned short* __restrict__ q,
                                                const unsigned short* __restrict__ k,
                                                const unsigned short* __restrict__ v,
                                                unsigned short* __restrict__ out, const FlashArgs& a) {
    // Rows of D halves padded by 8: the fragment reads of a warp then hit 32
    // different banks, and every row starts on 16 bytes.
    constexpr int LD = D + 8;
    __shared__ fa_u32x4 k_tile[FA_BK * LD / 8];
    __shared__ fa_u32x4 v_tile[FA_BK * LD / 8];
    unsigned short* ks = (unsigned short*)k_tile;
    unsigned short* vs = (unsigned short*)v_tile;
    const float neg_inf = __int_as_float(0xff800000);

    const unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const unsigned int g = lane >> 2, c = lane & 3;
    // The last blocks of a causal layer see the most keys: start them first.
    const unsigned int i0 = (gridDim.x - 1 - blockIdx.x) * FA_BQ;
    const unsigned int hq = blockIdx.y, b = blockIdx.z;
    const unsigned int hk = hq / (a.h / a.hkv);
    const unsigned int r0 = i0 + 16 * warp;  // this warp's first query
    const unsigned short* qp = q + b * a.q_stride[0] + hq * a.q_stride[1];
    const unsigned short* kp = k + b * a.k_stride[0] + hk * a.k_stride[1];
    const unsigned short* vp = v + b * a.v_stride[0] + hk * a.v_stride[1];

    // This warp's 16 query rows as A fragments, for the whole kernel.
    unsigned int qa[D / 16][4];
    for (int kk = 0; kk < D / 16; ++kk) {
        for (int half = 0; half < 2; ++half) {
            const unsigned int i = r0 + g + 8 * half;
            const unsigned short* row = qp + (long long)i * a.q_stride[2] + 16 * kk + 2 * c;
            const bool in = i < a.t;
            qa[kk][half] = in ? *(const unsigned int*)row : 0u;
            qa[kk][half + 2] = in ? *(const unsigned int*)(row + 8) : 0u;
        }
    }
    float o[D / 8][4];
    for (int nb = 0; nb < D / 8; ++nb)
        for (int e = 0; e < 4; ++e) o[nb][e] = 0.0f;
    // Per row (g, g + 8): the running maximum of the scaled scores (log2
    // units) and this lane's part of the running sum of exponentials.
    float m_run[2] = {neg_inf, neg_inf};
    float l_run[2] = {0.0f, 0.0f};

    const unsigned int i_end = i0 + FA_BQ < a.t ? i0 + FA_BQ : a.t;
    const unsigned int lo = (a.window > 0 && i0 + 1 > a.window) ? i0 + 1 - a.window : 0;
    for (unsigned int j0 = lo; j0 < i_end; j0 += FA_BK) {
        // Every warp is done with the previous tile before it is replaced.
        __syncthreads();
        for (unsigned int x = threadIdx.x; x < FA_BK * (D / 8); x += 32 * FA_WARPS) {
            const unsigned int r = x / (D / 8), col = 8 * (x % (D / 8));
            const unsigned int j = j0 + r;
            fa_u32x4 kv = {0u, 0u, 0u, 0u}, vv = {0u, 0u, 0u, 0u};
            if (j < a.t) {
                kv = *(const fa_u32x4*)(kp + (long long)j * a.k_stride[2] + col);
                vv = *(const fa_u32x4*)(vp + (long long)j * a.v_stride[2] + col);
            }
            *(fa_u32x4*)(ks + r * LD + col) = kv;
            *(fa_u32x4*)(vs + r * LD + col) = vv;
        }
        __syncthreads();
        // A warp whose rows see none of these keys (all after its last row,
        // all before its first row's window, or no rows left) skips the tile.
        if (r0 >= a.t || j0 > r0 + 15) continue;
        if (a.window > 0 && r0 + 1 > a.window && j0 + FA_BK <= r0 + 1 - a.window) continue;

        // Scores S = Q K^T: 16 rows x 64 keys, 8 blocks of 8 keys.
        float s[FA_BK / 8][4];
        for (int nb = 0; nb < FA_BK / 8; ++nb)
            for (int e = 0; e < 4; ++e) s[nb][e] = 0.0f;
        for (int kk = 0; kk < D / 16; ++kk) {
            for (int nb = 0; nb < FA_BK / 8; ++nb) {
                const unsigned short* kr = ks + (8 * nb + g) * LD + 16 * kk + 2 * c;
                const unsigned int kf[2] = {*(const unsigned int*)kr, *(const unsigned int*)(kr + 8)};
                fa_mma(s[nb], qa[kk], kf);
            }
        }
        // Scale (to log2 units) and mask; the tile's row maxima. Tiles whose
        // every key each row of the warp sees (most of a long sequence) skip
        // the mask.
        const bool whole = j0 + FA_BK <= r0 + 1 && (a.window == 0 || r0 + 15 < j0 + a.window);
        float mx[2] = {neg_inf, neg_inf};
        for (int nb = 0; nb < FA_BK / 8; ++nb) {
            for (int e = 0; e < 4; ++e) {
                float x = s[nb][e] * a.scale_log2;
                if (!whole) {
                    const unsigned int i = r0 + g + 8 * (e >> 1);
                    const unsigned int j = j0 + 8 * nb + 2 * c + (e & 1);
                    if (j > i || (a.window > 0 && i - j >= a.window)) x = neg_inf;
                }
                s[nb][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        }
        float corr[2], base[2];
        for (int r = 0; r < 2; ++r) {
            const float m_new = fmaxf(m_run[r], fa_group_max(mx[r]));
            // A row with no visible key yet keeps weight zero everywhere
            // (exp2(-inf - 0)), instead of exp2(-inf + inf) = NaN.
            base[r] = m_new == neg_inf ? 0.0f : m_new;
            corr[r] = exp2f(m_run[r] - base[r]);
            m_run[r] = m_new;
            l_run[r] *= corr[r];
        }
        for (int nb = 0; nb < FA_BK / 8; ++nb) {
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(s[nb][e] - base[e >> 1]);
                s[nb][e] = p;
                l_run[e >> 1] += p;
            }
        }
        for (int nb = 0; nb < D / 8; ++nb)
            for (int e = 0; e < 4; ++e) o[nb][e] *= corr[e >> 1];

        // O += P V: the C fragments of two key blocks of S are the A
        // fragment of one 16-key block of P.
        for (int kb = 0; kb < FA_BK / 16; ++kb) {
            const unsigned int pa[4] = {
                fa_pack(s[2 * kb][0], s[2 * kb][1]),
                fa_pack(s[2 * kb][2], s[2 * kb][3]),
                fa_pack(s[2 * kb + 1][0], s[2 * kb + 1][1]),
                fa_pack(s[2 * kb + 1][2], s[2 * kb + 1][3]),
            };
            const unsigned short* vc = vs + (16 * kb + 2 * c) * LD + g;
            for (int nb = 0; nb < D / 8; ++nb) {
                const unsigned short* col = vc + 8 * nb;
                const unsigned int vb[2] = {
                    (unsigned int)col[0] | ((unsigned int)col[LD] << 16),
                    (unsigned int)col[8 * LD] | ((unsigned int)col[9 * LD] << 16),
                };
                fa_mma(o[nb], pa, vb);
            }
        }
    }

    // Divide by the row sums and write rows g and g + 8 as [B, T, H, D].
    for (int r = 0; r < 2; ++r) {
        const float inv = 1.0f / fa_group_sum(l_run[r]);
        const unsigned int i = r0 + g + 8 * r;
        if (i >= a.t) continue;
        unsigned short* dst = out + (((long long)b * a.t + i) * a.h + hq) * D + 2 * c;
        for (int nb = 0; nb < D / 8; ++nb)
            *(unsigned int*)(dst + 8 * nb) = fa_pack(o[nb][2 * r] * inv, o[nb][2 * r + 1] * inv);
    }
}

#define FA_KERNEL(D)                                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * FA_WARPS)                                        \
        flash_attention_bf16_d##D(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k, \
                                  const unsigned short* __restrict__ v, unsigned short* __restrict__ out,   \
                                  FlashArgs a) {                                                       \
        flash_attention<D>(q, k, v, out, a);                                                           \
    }
FA_KERNEL(16)
FA_KERNEL(32)
FA_KERNEL(48)
FA_KERNEL(64)
FA_KERNEL(80)
FA_KERNEL(96)
FA_KERNEL(112)
FA_KERNEL(128)
