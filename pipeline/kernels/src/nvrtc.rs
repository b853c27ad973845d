//! The project's own CUDA kernels (model ops, class moments) are compiled by NVRTC the first time they
//! are used, so the build needs no nvcc step beyond candle's. Each op keeps
//! its kernel source next to its CPU version (or in `cuda/`); this module
//! compiles a source once per process (with [`PRELUDE`] in front). Callers load a
//! function with `CudaDevice::get_or_load_custom_func(name, module, &ptx)`.

use std::sync::{Arc, Mutex};

/// Device helpers every kernel source may use (`cuda/prelude.cuh`, which
/// the CPU emulator of the tests includes too).
const PRELUDE: &str = include_str!("../cuda/prelude.cuh");

/// The PTX of kernel source `source`, named `module`, for NVRTC's default
/// virtual architecture.
pub fn ptx(module: &'static str, source: &'static str) -> candle_core::Result<Arc<str>> {
    ptx_for(module, source, None)
}

/// The PTX of `source` for virtual architecture `arch` (`compute_80`: the
/// oldest GPUs that have the instructions the source uses; the driver
/// compiles PTX for newer ones), or NVRTC's default.
pub fn ptx_for(
    module: &'static str,
    source: &'static str,
    arch: Option<&'static str>,
) -> candle_core::Result<Arc<str>> {
    use candle_core::cuda_backend::cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
    static PTX: Mutex<Vec<(&'static str, Result<Arc<str>, String>)>> = Mutex::new(Vec::new());
    let mut cache = PTX.lock().unwrap_or_else(|p| p.into_inner());
    let i = match cache.iter().position(|(m, _)| *m == module) {
        Some(i) => i,
        None => {
            let opts = CompileOptions {
                arch,
                ..Default::default()
            };
            let compiled = compile_ptx_with_opts(format!("{PRELUDE}{source}"), opts)
                .map(|p| Arc::from(p.to_src()))
                .map_err(|e| format!("compiling the {module} kernels with NVRTC: {e:?}"));
            cache.push((module, compiled));
            cache.len() - 1
        }
    };
    cache[i].1.clone().map_err(candle_core::Error::Msg)
}
