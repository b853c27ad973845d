// The flash attention kernel built for the CPU emulator: what the tests of
// src/model/flash_attention.rs run (build.rs compiles this file).
#include "emulator.hpp"
#include "prelude.cuh"
#include "flash_attention.cu"

#include <cstdio>

// Runs the kernel over `batch` x a->h x ceil(a->t / 64) blocks. Returns 0, or
// 1 with the reason in `err` (NUL-terminated, at most err_len bytes).
extern "C" int pipeline_flash_attention_emulated(const unsigned short* q, const unsigned short* k,
                                                 const unsigned short* v, unsigned short* out, const FlashArgs* a,
                                                 unsigned int batch, unsigned long long seed, char* err,
                                                 size_t err_len) {
    std::string e;
    try {
        const FlashArgs args = *a;
        std::function<void()> body;
        switch (args.d) {
#define FA_CASE(D) \
    case D: body = [&] { flash_attention_bf16_d##D(q, k, v, out, args); }; break;
            FA_CASE(16)
            FA_CASE(32)
            FA_CASE(48)
            FA_CASE(64)
            FA_CASE(80)
            FA_CASE(96)
            FA_CASE(112)
            FA_CASE(128)
#undef FA_CASE
            default:
                e = "no kernel for head dimension " + std::to_string(args.d);
        }
        if (e.empty()) {
            const dim3 grid{(args.t + FA_BQ - 1) / FA_BQ, args.h, batch};
            e = emu::launch(grid, dim3{32 * FA_WARPS, 1, 1}, seed, body);
        }
    } catch (const std::exception& x) {
        e = x.what();
    }
    if (e.empty()) return 0;
    std::snprintf(err, err_len, "%s", e.c_str());
    return 1;
}
