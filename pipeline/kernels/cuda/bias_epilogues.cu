// What follows a linear layer's product y [rows, n] in a GPT-2/GPT-Neo block,
// fused with its bias b [n] into one pass (src/model/bias_add.rs):
//   bias_gelu:     out = gelu_tanh(y + b)      (the MLP's first layer)
//   bias_residual: out = x + (y + b)           (attention and MLP outputs)
// Unfused, each is two passes over the rows (bias add, then GELU or the
// residual add), and each pass moved two bytes per thread: on an H100 the
// GELU, bias and residual passes were 5-7 % of a 12x1024 collection each.
// Here every thread moves 16 bytes per access (8 bf16, 4 f32 or 2 f64), so
// n must be a multiple of 16 / sizeof(T) and the pointers 16-byte aligned
// (the host checks both). The arithmetic is f32 for bf16 and f32, f64 for
// f64; bf16 results are rounded once.

#ifndef BE_THREADS
#define BE_THREADS 256
#endif

__device__ __forceinline__ float be_load(unsigned short h) { return from_bf16(h); }
__device__ __forceinline__ float be_load(float f) { return f; }
__device__ __forceinline__ double be_load(double f) { return f; }
__device__ __forceinline__ void be_store(unsigned short* p, float v) { *p = to_bf16(v); }
__device__ __forceinline__ void be_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void be_store(double* p, double v) { *p = v; }

// GPT-2's `gelu_new`: 0.5 v (1 + tanh(sqrt(2 / pi) (v + 0.044715 v^3))).
__device__ __forceinline__ float be_gelu(float v) {
    return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}
__device__ __forceinline__ double be_gelu(double v) {
    return 0.5 * v * (1.0 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
}

template <typename T>
struct __align__(16) BePack {
    T v[16 / sizeof(T)];
};

// RESIDUAL: out = x + (y + b); else out = gelu(y + b). `packs` packs of
// 16 / sizeof(T) elements in all, rows of `row_packs` (32-bit indices: the
// host checks that they fit).
template <bool RESIDUAL, typename T>
__device__ void bias_epilogue(const T* y, const T* b, const T* x, T* out, unsigned int packs, unsigned int row_packs) {
    constexpr unsigned int V = 16 / sizeof(T);
    typedef decltype(be_load(T())) F;
    const BePack<T>* yp = reinterpret_cast<const BePack<T>*>(y);
    const BePack<T>* bp = reinterpret_cast<const BePack<T>*>(b);
    const BePack<T>* xp = reinterpret_cast<const BePack<T>*>(x);
    BePack<T>* op = reinterpret_cast<BePack<T>*>(out);
    const unsigned int stride = gridDim.x * blockDim.x;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < packs; i += stride) {
        const BePack<T> yv = yp[i];
        const BePack<T> bv = bp[i % row_packs];
        BePack<T> o;
        if (RESIDUAL) {
            const BePack<T> xv = xp[i];
            for (unsigned int k = 0; k < V; k++) {
                const F v = be_load(yv.v[k]) + be_load(bv.v[k]);
                be_store(&o.v[k], be_load(xv.v[k]) + v);
            }
        } else {
            for (unsigned int k = 0; k < V; k++) be_store(&o.v[k], be_gelu(be_load(yv.v[k]) + be_load(bv.v[k])));
        }
        op[i] = o;
    }
}

#define BE_KERNELS(SUFFIX, T)                                                                                    \
    extern "C" __global__ void __launch_bounds__(BE_THREADS)                                                     \
        bias_gelu_##SUFFIX(const T* y, const T* b, T* out, unsigned int packs, unsigned int row_packs) {        \
        bias_epilogue<false, T>(y, b, nullptr, out, packs, row_packs);                                           \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(BE_THREADS) bias_residual_##SUFFIX(                             \
        const T* y, const T* b, const T* x, T* out, unsigned int packs, unsigned int row_packs) {                \
        bias_epilogue<true, T>(y, b, x, out, packs, row_packs);                                                  \
    }

BE_KERNELS(bf16, unsigned short)
BE_KERNELS(f32, float)
BE_KERNELS(f64, double)
