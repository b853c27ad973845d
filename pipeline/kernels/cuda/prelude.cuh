// Device helpers every kernel source of the project may use. NVRTC compiles
// each source with this file in front (src/nvrtc.rs); the CPU emulator the
// tests run includes it the same way (emulator.hpp first).

// f32 -> bf16, rounding to nearest even; NaN stays NaN.
__device__ __forceinline__ unsigned short to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
__device__ __forceinline__ float from_bf16(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}
