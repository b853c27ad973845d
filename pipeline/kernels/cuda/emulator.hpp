// A CPU emulator for the project's CUDA kernels, so the tests can run the
// very source NVRTC compiles on a machine without a GPU.
//
// Every CUDA thread of a block is a fiber (ucontext) on the calling OS
// thread; a block's fibers run until they reach a barrier or a warp
// collective, and are resumed in a seeded random order, so a read of shared
// memory that another thread writes without a barrier in between sees the
// wrong value in some order. Blocks run one after another. Checked:
//   - __syncthreads() reached by every thread of the block (a thread that
//     returns while others wait is a deadlock, reported);
//   - a warp collective (__shfl_xor_sync, __syncwarp, mma) entered by all 32
//     lanes of the warp, and the same collective by all (else reported);
//   - mma.m16n8k16 (bf16, f32 accumulators) computed from the fragment
//     layouts as the PTX ISA states them, elementwise in f64.
// Not modelled: timing, memory spaces (shared memory is a thread_local
// static per kernel instantiation, so a block starts with the previous
// block's values rather than undefined ones), out-of-bounds accesses.
//
// The kernel source is included after this header with
// PIPELINE_CUDA_EMULATOR defined; a kernel is launched with emu::launch.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#define PIPELINE_CUDA_EMULATOR 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __align__(n) __attribute__((aligned(n)))
// One copy per kernel instantiation and OS thread: the block's fibers share
// it, concurrent launches on other threads do not.
#define __shared__ static thread_local

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

namespace emu {

enum Collective { kNone, kSyncwarp, kShfl, kMma };

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    dim3 tid;
    bool finished = false;
};

struct Warp {
    unsigned int arrived = 0, gen = 0;
    Collective op = kNone;
    // Each lane's inputs, and its outputs once the last lane has arrived.
    uint32_t word[32];
    int src[32];
    uint32_t a[32][4], b[32][2];
    float c[32][4];
};

struct Runtime {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    ucontext_t scheduler;
    int current = -1;
    dim3 block_idx, block_dim, grid_dim;
    unsigned int block_arrived = 0, block_gen = 0;
    unsigned long long progress = 0;
    const std::function<void()>* body = nullptr;
    std::string error;
};

inline Runtime& rt() {
    static thread_local Runtime r;
    return r;
}

inline Fiber& me() { return rt().fibers[rt().current]; }

inline unsigned int linear_tid() {
    const Runtime& r = rt();
    const dim3& t = r.fibers[r.current].tid;
    return t.x + r.block_dim.x * (t.y + r.block_dim.y * t.z);
}

inline void yield() { swapcontext(&me().ctx, &rt().scheduler); }

inline void fail(const std::string& what) {
    Runtime& r = rt();
    if (r.error.empty()) r.error = what;
    // The launch is abandoned: this fiber never runs again.
    me().finished = true;
    setcontext(&r.scheduler);
}

inline void syncthreads() {
    Runtime& r = rt();
    const unsigned int gen = r.block_gen;
    const unsigned int n = r.block_dim.x * r.block_dim.y * r.block_dim.z;
    ++r.progress;
    if (++r.block_arrived == n) {
        r.block_arrived = 0;
        ++r.block_gen;
        return;
    }
    while (r.block_gen == gen) yield();
}

// All 32 lanes deposit their inputs; the last to arrive runs `finish` over
// the whole warp, writing every lane's outputs; then all continue. A lane
// reads its outputs before it can enter the next collective, and `finish`
// of the next one runs only when all lanes are in it, so one barrier per
// collective suffices.
template <class Finish>
inline void warp_collective(Collective op, Finish finish) {
    Runtime& r = rt();
    const unsigned int t = linear_tid();
    Warp& w = r.warps[t / 32];
    if (w.arrived == 0) {
        w.op = op;
    } else if (w.op != op) {
        fail("lanes of warp " + std::to_string(t / 32) + " entered different warp collectives");
    }
    const unsigned int gen = w.gen;
    ++r.progress;
    if (++w.arrived == 32) {
        finish(w);
        w.arrived = 0;
        ++w.gen;
        return;
    }
    while (w.gen == gen) yield();
}

inline unsigned int lane_id() { return linear_tid() % 32; }

inline uint32_t shfl_xor(uint32_t v, int mask) {
    const unsigned int lane = lane_id();
    Warp& w = rt().warps[linear_tid() / 32];
    w.word[lane] = v;
    w.src[lane] = (int)(lane ^ (unsigned int)mask) & 31;
    warp_collective(kShfl, [](Warp& w) {
        uint32_t in[32];
        std::copy(w.word, w.word + 32, in);
        for (int l = 0; l < 32; ++l) w.word[l] = in[w.src[l]];
    });
    return w.word[lane];
}

inline float bf16_value(uint32_t reg, int i) {
    return __uint_as_float(((reg >> (16 * (i & 1))) & 0xffffu) << 16);
}

// d (16 x 8) += a (16 x 16) * b (16 x 8), from each lane's fragments as the
// PTX ISA lays them out (groupID = lane >> 2, threadID_in_group = lane % 4):
//   a_i: row groupID (+ 8 for i in {2, 3, 6, 7}), col 2 * tig + (i & 1) (+ 8 for i >= 4)
//   b_i: row 2 * tig + (i & 1) (+ 8 for i >= 2), col groupID
//   c_i: row groupID (+ 8 for i >= 2), col 2 * tig + (i & 1)
// where element i sits in register i / 2, its lower half for even i.
inline void mma_m16n8k16_bf16(float* d, const uint32_t* a, const uint32_t* b) {
    const unsigned int lane = lane_id();
    Warp& w = rt().warps[linear_tid() / 32];
    std::copy(a, a + 4, w.a[lane]);
    std::copy(b, b + 2, w.b[lane]);
    std::copy(d, d + 4, w.c[lane]);
    warp_collective(kMma, [](Warp& w) {
        double A[16][16], B[16][8], C[16][8];
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            for (int i = 0; i < 8; ++i)
                A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >> 2)] = bf16_value(w.a[l][i / 2], i);
            for (int i = 0; i < 4; ++i) B[2 * t + (i & 1) + 8 * (i >> 1)][g] = bf16_value(w.b[l][i / 2], i);
            for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = w.c[l][i];
        }
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            for (int i = 0; i < 4; ++i) {
                const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
                double acc = C[row][col];
                for (int kk = 0; kk < 16; ++kk) acc += A[row][kk] * B[kk][col];
                w.c[l][i] = (float)acc;
            }
        }
    });
    std::copy(w.c[lane], w.c[lane] + 4, d);
}

inline void fiber_main() {
    Runtime& r = rt();
    (*r.body)();
    me().finished = true;
    ++r.progress;
    // uc_link returns to the scheduler.
}

// Out of line: getcontext returns twice, which would make every local of
// the caller suspect of being clobbered.
__attribute__((noinline)) inline void start_fiber(Fiber& f, dim3 tid) {
    f.tid = tid;
    f.stack.resize(256 * 1024);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &rt().scheduler;
    makecontext(&f.ctx, fiber_main, 0);
}

// Runs `kernel` (a call of the kernel function with its arguments) over the
// grid; returns "" or what went wrong. `seed` fixes the fibers' order.
inline std::string launch(dim3 grid, dim3 block, unsigned long long seed, const std::function<void()>& kernel) {
    Runtime& r = rt();
    r.error.clear();
    r.body = &kernel;
    r.grid_dim = grid;
    r.block_dim = block;
    const unsigned int n = block.x * block.y * block.z;
    // Warps are whole, as the kernels' collectives assume.
    if (n % 32 != 0) return "a block of " + std::to_string(n) + " threads is not whole warps";
    std::mt19937_64 rng(seed);
    std::vector<unsigned int> order(n);
    std::iota(order.begin(), order.end(), 0u);
    for (unsigned int bz = 0; bz < grid.z; ++bz)
        for (unsigned int by = 0; by < grid.y; ++by)
            for (unsigned int bx = 0; bx < grid.x; ++bx) {
                r.block_idx = dim3{bx, by, bz};
                r.fibers.assign(n, Fiber{});
                r.warps.assign(n / 32, Warp{});
                r.block_arrived = 0;
                for (unsigned int i = 0; i < n; ++i)
                    start_fiber(r.fibers[i], dim3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)});
                unsigned int running = n;
                while (running > 0) {
                    std::shuffle(order.begin(), order.end(), rng);
                    const unsigned long long before = r.progress;
                    for (unsigned int i : order) {
                        if (r.fibers[i].finished) continue;
                        r.current = (int)i;
                        swapcontext(&r.scheduler, &r.fibers[i].ctx);
                        if (!r.error.empty()) return r.error;
                        if (r.fibers[i].finished) --running;
                    }
                    if (running > 0 && r.progress == before) {
                        return "deadlock in block (" + std::to_string(bx) + ", " + std::to_string(by) + ", " +
                               std::to_string(bz) + "): " + std::to_string(running) +
                               " threads wait at a barrier that the others never reach";
                    }
                }
            }
    r.current = -1;
    return "";
}

}  // namespace emu

#define threadIdx (::emu::me().tid)
#define blockIdx (::emu::rt().block_idx)
#define blockDim (::emu::rt().block_dim)
#define gridDim (::emu::rt().grid_dim)

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned int = 0xffffffffu) {
    emu::warp_collective(emu::kSyncwarp, [](emu::Warp&) {});
}
inline float __shfl_xor_sync(unsigned int, float v, int mask) {
    return __uint_as_float(emu::shfl_xor(__float_as_uint(v), mask));
}
inline unsigned int __shfl_xor_sync(unsigned int, unsigned int v, int mask) { return emu::shfl_xor(v, mask); }
inline int __shfl_xor_sync(unsigned int, int v, int mask) { return (int)emu::shfl_xor((uint32_t)v, mask); }
// A double travels as two 32-bit shuffles, as on the hardware.
inline double __shfl_xor_sync(unsigned int, double v, int mask) {
    uint64_t u;
    std::memcpy(&u, &v, 8);
    const uint64_t lo = emu::shfl_xor((uint32_t)u, mask), hi = emu::shfl_xor((uint32_t)(u >> 32), mask);
    u = lo | (hi << 32);
    std::memcpy(&v, &u, 8);
    return v;
}
// Round-to-nearest f64 arithmetic that the CUDA compiler never contracts
// into fused multiply-adds. The emulator is built as ISO C++ (-std=c++17),
// where GCC does not contract either.
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
