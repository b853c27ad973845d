// The bias epilogue kernels built for the CPU emulator: what the tests of
// src/model/bias_add.rs run (build.rs compiles this file).
#include "emulator.hpp"
#include "prelude.cuh"
#include "bias_epilogues.cu"

#include <cstdio>

// Runs bias_gelu (residual = 0) or bias_residual (residual = 1) for dtype 0
// (bf16), 1 (f32) or 2 (f64) over `blocks` blocks of BE_THREADS threads.
// Returns 0, or 1 with the reason in `err` (NUL-terminated, at most err_len
// bytes).
extern "C" int pipeline_bias_epilogue_emulated(int residual, int dtype, const void* y, const void* b, const void* x,
                                               void* out, unsigned int packs, unsigned int row_packs,
                                               unsigned int blocks, unsigned long long seed, char* err,
                                               size_t err_len) {
    std::string e;
    try {
        std::function<void()> body;
#define BE_CASE(CODE, SUFFIX, T)                                                                               \
    case CODE:                                                                                                 \
        if (residual)                                                                                          \
            body = [&] {                                                                                       \
                bias_residual_##SUFFIX((const T*)y, (const T*)b, (const T*)x, (T*)out, packs, row_packs);              \
            };                                                                                                 \
        else                                                                                                   \
            body = [&] { bias_gelu_##SUFFIX((const T*)y, (const T*)b, (T*)out, packs, row_packs); };                  \
        break;
        switch (dtype) {
            BE_CASE(0, bf16, unsigned short)
            BE_CASE(1, f32, float)
            BE_CASE(2, f64, double)
            default:
                e = "no kernel for dtype code " + std::to_string(dtype);
        }
#undef BE_CASE
        if (e.empty()) e = emu::launch(dim3{blocks, 1, 1}, dim3{BE_THREADS, 1, 1}, seed, body);
    } catch (const std::exception& x) {
        e = x.what();
    }
    if (e.empty()) return 0;
    std::snprintf(err, err_len, "%s", e.c_str());
    return 1;
}
