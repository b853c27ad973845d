// The class statistics merge kernel built for the CPU emulator: what the
// tests of src/device_stats.rs run (build.rs compiles this file).
#include "emulator.hpp"
#include "prelude.cuh"
#include "class_stats_merge.cu"

#include <cstdio>

// Runs the kernel over u blocks of CSM_THREADS threads. Returns 0, or 1 with
// the reason in `err` (NUL-terminated, at most err_len bytes).
extern "C" int pipeline_class_stats_merge_emulated(double* table, const double* batch, const double* plan,
                                                   unsigned int u, unsigned int d, unsigned long long seed,
                                                   char* err, size_t err_len) {
    std::string e;
    try {
        if (u > 0) {
            std::function<void()> body = [&] { class_stats_merge(table, batch, plan, d); };
            e = emu::launch(dim3{u, 1, 1}, dim3{CSM_THREADS, 1, 1}, seed, body);
        }
    } catch (const std::exception& x) {
        e = x.what();
    }
    if (e.empty()) return 0;
    std::snprintf(err, err_len, "%s", e.c_str());
    return 1;
}
