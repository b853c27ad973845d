//! The project's own CUDA kernels (model ops, class moments) are compiled by NVRTC the first time they
//! are used, so the build needs no nvcc step beyond candle's. Each op keeps
//! its kernel source next to its CPU version; this module compiles a
//! source once per process (with [`PRELUDE`] in front). Callers load a
//! function with `CudaDevice::get_or_load_custom_func(name, module, &ptx)`.

use std::sync::{Arc, Mutex};

/// Device helpers every kernel source may use.
const PRELUDE: &str = r#"
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
"#;

/// The PTX of kernel source `source`, named `module`.
pub fn ptx(module: &'static str, source: &'static str) -> candle_core::Result<Arc<str>> {
    static PTX: Mutex<Vec<(&'static str, Result<Arc<str>, String>)>> = Mutex::new(Vec::new());
    let mut cache = PTX.lock().unwrap_or_else(|p| p.into_inner());
    let i = match cache.iter().position(|(m, _)| *m == module) {
        Some(i) => i,
        None => {
            let compiled =
                candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(format!("{PRELUDE}{source}"))
                    .map(|p| Arc::from(p.to_src()))
                    .map_err(|e| format!("compiling the {module} kernels with NVRTC: {e:?}"));
            cache.push((module, compiled));
            cache.len() - 1
        }
    };
    cache[i].1.clone().map_err(candle_core::Error::Msg)
}
