//! `lc-kernels`: the project's compute kernels as candle ops.
//!
//! Each op has a CPU version in Rust and, with the `cuda` feature, a CUDA
//! kernel (`cuda/*.cu`, compiled by NVRTC at first use, `nvrtc.rs`). A CPU
//! emulator of the CUDA sources (`cuda/emulator.hpp`, built by build.rs)
//! lets the unit tests check the CUDA code against brute-force references on
//! machines without a GPU.
//!
//! - attention: [`attention`] (causal softmax and blocked attention from
//!   device primitives, over the [`block_softmax`] op), [`block_attention`]
//!   (the CPU kernel) and [`lane_attention`] (its kernel for small heads),
//!   [`flash_attention`] (one CUDA kernel for bf16);
//! - [`bias_add`]: a linear layer's bias with its GELU or residual epilogue;
//! - per-class statistics: [`class_moments`] (a batch's mean and M2 per
//!   class) and [`device_stats`] (running tables merged on the device).
//!
//! Kernels know no model: the model crate chooses among them.

pub mod attention;
pub mod bias_add;
pub mod block_attention;
pub mod block_softmax;
pub mod class_moments;
pub mod device_stats;
#[cfg(test)]
mod emulator;
pub mod error;
pub mod fast_exp;
pub mod flash_attention;
pub mod lane_attention;
pub mod mask;
#[cfg(feature = "cuda")]
mod nvrtc;

pub use error::{Error, Result};
