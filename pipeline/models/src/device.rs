//! The device and compute dtype a stage names (`device=cuda:1`,
//! `dtype=bf16`), and what is free on it.

use candle_core::{DType, Device};

use crate::error::{Context, Error, Result};

/// The device `cpu`, `cuda` or `cuda:N` names.
pub fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n: usize = s
                .strip_prefix("cuda:")
                .map(|n| n.parse().unwrap_or(usize::MAX))
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::invalid(format!(
                    "device {s}: this binary was built without CUDA (cargo build --features cuda)"
                )));
            }
            candle_core::Device::new_cuda(n).ctx(format!("opening {s}"))
        }
        s => Err(Error::invalid(format!("device '{s}' is not cpu, cuda or cuda:N"))),
    }
}

/// Free memory of a GPU in bytes; None for the CPU (or where it cannot be
/// read).
pub fn free_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free as u64);
    }
    let _ = device;
    None
}

/// Parse a compute dtype name.
pub fn dtype(spec: &str) -> Result<DType> {
    match spec {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => Err(Error::invalid(format!("dtype '{other}' is not f32 or bf16"))),
    }
}
