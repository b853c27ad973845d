//! `pipeline bench attention|epilogues`: the CUDA kernels against the
//! unfused paths and a device copy (a CUDA build on a GPU machine), and
//! the CPU's attention kernels against each other and the GEMM peak.

use candle_core::Tensor;

use super::device_time;
use crate::error::{Context, Error, Result};

/// Inference attention on a CUDA device: block attention from device
/// primitives against the fused kernel of `attention=fused`, on the same
/// random bf16 heads ([B, T, H * D] projections viewed as [B, H, T, D], as
/// the models make them): time per call, useful TFLOP/s (4 D FLOPs per
/// visible query-key pair) and the largest difference of their outputs,
/// beside the bound both paths' bf16 roundings allow: each rounds the
/// probabilities and the output once (relative 2^-9 each, the
/// probabilities summing to 1), so each is within 2^-8 max|v| of the exact
/// attention and they are within 2^-7 max|v| of each other.
pub fn attention(
    batch: usize,
    heads: usize,
    t: usize,
    dim: usize,
    window: usize,
    device: &str,
    reps: usize,
) -> Result<String> {
    use lc_kernels::flash_attention;
    use lc_models::layers::{self, AttentionKernel};
    let dev = lc_models::device(device)?;
    let window = (window > 0).then_some(window);
    if dev.is_cpu() {
        return cpu_attention(batch, heads, t, dim, window, reps);
    }
    let scale = 1.0 / (dim as f64).sqrt();
    let measure = || -> candle_core::Result<(f64, f64, f32, f32)> {
        let heads_of = |seed: u64| -> candle_core::Result<Tensor> {
            dev.set_seed(seed)?;
            let x = Tensor::randn(0f32, 1.0, (batch, t, heads * dim), &dev)?
                .to_dtype(candle_core::DType::BF16)?;
            layers::heads(&x, heads, dim)
        };
        let (q, k, v) = (heads_of(1)?, heads_of(2)?, heads_of(3)?);
        let time = |run: &dyn Fn() -> candle_core::Result<Tensor>| device_time(&dev, reps, run);
        // Block attention as the models call it (casts, head copies and the
        // output's transpose included), and the kernel alone, which must
        // take these heads rather than fall back.
        let (blocks, t_blocks) =
            time(&|| layers::attend(&q, &k, &v, Some(scale), window, AttentionKernel::Blocks))?;
        let (fused, t_fused) = time(&|| {
            flash_attention::attend(&q, &k, &v, scale, window)?.ok_or_else(|| {
                candle_core::Error::Msg("the fused kernel cannot take these heads (see the log)".into())
            })
        })?;
        let f32s = |x: &Tensor| x.to_dtype(candle_core::DType::F32);
        let diff = (f32s(&fused)? - f32s(&blocks)?)?.abs()?.max_all()?.to_scalar()?;
        let max_v = f32s(&v)?.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok((t_blocks, t_fused, diff, max_v / 128.0))
    };
    let (t_blocks, t_fused, diff, bound) = measure().ctx("bench attention")?;
    let flops = attention_flops(batch, heads, t, dim, window);
    let tflops = |secs: f64| flops / secs / 1e12;
    Ok(format!(
        "attention bf16, batch {batch}, {heads} heads of {dim}, T = {t}, window {window:?}: fused {:.3} ms ({:.1} TFLOP/s), \
         blocks {:.3} ms ({:.1} TFLOP/s): fused takes {:.2}x the time of blocks; max |fused - blocks| {diff:.2e} (bf16 bound {bound:.2e})",
        t_fused * 1e3,
        tflops(t_fused),
        t_blocks * 1e3,
        tflops(t_blocks),
        t_fused / t_blocks
    ))
}

/// Useful FLOPs of causal attention: 4 dh per visible query-key pair (the
/// two products).
fn attention_flops(batch: usize, heads: usize, t: usize, dim: usize, window: Option<usize>) -> f64 {
    let pairs: usize = (0..t).map(|i| window.map_or(i + 1, |w| (i + 1).min(w))).sum();
    4.0 * dim as f64 * (pairs * batch * heads) as f64
}

/// Inference attention on the CPU in f32, as collect runs it: the kernel
/// `attend` chooses (lane_attention for heads of 4, 8 or 16) against the
/// GEMM blocks, anchored to the GEMM peak measured in the same run; with
/// their largest difference (both within 2e-5 of an f64 brute force in
/// the kernels' tests).
fn cpu_attention(
    batch: usize,
    heads: usize,
    t: usize,
    dim: usize,
    window: Option<usize>,
    reps: usize,
) -> Result<String> {
    use lc_kernels::{block_attention, lane_attention};
    let dev = candle_core::Device::Cpu;
    let scale = 1.0 / (dim as f64).sqrt();
    let measure = || -> candle_core::Result<(f64, f64, f32)> {
        // Standard normal heads from a seeded generator (candle's CPU
        // device cannot be seeded).
        let heads_of = |seed: u64| -> candle_core::Result<Tensor> {
            use rand::SeedableRng;
            use rand_distr::Distribution;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let normal = rand_distr::StandardNormal;
            let x: Vec<f32> = (0..batch * heads * t * dim)
                .map(|_| normal.sample(&mut rng))
                .collect();
            Tensor::from_vec(x, (batch, heads, t, dim), &dev)
        };
        let (q, k, v) = (heads_of(1)?, heads_of(2)?, heads_of(3)?);
        let time = |run: &dyn Fn() -> candle_core::Result<Tensor>| device_time(&dev, reps, run);
        let (chosen, t_chosen) = time(&|| block_attention::attend(&q, &k, &v, scale, window))?;
        let (gemm, t_gemm) = time(&|| block_attention::attend_gemm(&q, &k, &v, scale, window))?;
        let diff = (chosen - gemm)?.abs()?.max_all()?.to_scalar()?;
        Ok((t_chosen, t_gemm, diff))
    };
    let (t_chosen, t_gemm, diff) = measure().ctx("bench attention")?;
    let peak = super::peak_gemm_gflops();
    let flops = attention_flops(batch, heads, t, dim, window);
    let gflops = |secs: f64| flops / secs / 1e9;
    let kernel = if lane_attention::supports(dim) {
        "lane_attention"
    } else {
        "GEMM blocks"
    };
    Ok(format!(
        "attention f32 on the CPU, batch {batch}, {heads} heads of {dim}, T = {t}, window {window:?}: \
         {kernel} {:.2} ms ({:.1} GFLOP/s, {:.1}% of the in-process GEMM peak of {peak:.0} GFLOP/s), \
         GEMM blocks {:.2} ms ({:.1} GFLOP/s, {:.1}%): {:.2}x faster; max |difference| {diff:.2e}",
        t_chosen * 1e3,
        gflops(t_chosen),
        100.0 * gflops(t_chosen) / peak,
        t_gemm * 1e3,
        gflops(t_gemm),
        100.0 * gflops(t_gemm) / peak,
        t_gemm / t_chosen
    ))
}

/// The fused bias epilogues of GPT-2/GPT-Neo blocks on a CUDA device
/// (`bias_gelu` on the MLP's [rows, 4d], `bias_residual` on [rows, d])
/// against the unfused passes the CPU runs (bias add, then candle's GELU or
/// add): time per call, and the fused kernels' bandwidth as a share of a
/// plain device copy's measured in the same run (the floor of any pass
/// that reads and writes the same bytes). Prints the largest difference
/// beside one rounding of the dtype (the unfused paths round y + b once
/// more).
pub fn epilogues(rows: usize, width: usize, dtype: &str, device: &str, reps: usize) -> Result<String> {
    use lc_kernels::bias_add::{bias_add, bias_gelu, bias_residual};
    let dev = lc_models::device(device)?;
    if dev.is_cpu() {
        return Err(Error::invalid(
            "bench epilogues compares the CUDA bias epilogues: give device=cuda[:N] (a CUDA build on a GPU machine)",
        ));
    }
    let dt = lc_models::dtype(dtype)?;
    let measure = || -> candle_core::Result<String> {
        let rand = |shape: &[usize], seed: u64| -> candle_core::Result<Tensor> {
            dev.set_seed(seed)?;
            Tensor::randn(0f32, 1.0, shape, &dev)?.to_dtype(dt)
        };
        let time = |run: &dyn Fn() -> candle_core::Result<Tensor>| device_time(&dev, reps, run);
        let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            let f = |x: &Tensor| x.to_dtype(candle_core::DType::F32);
            (f(a)? - f(b)?)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        let bytes = dt.size_in_bytes() as f64;
        let mut lines = Vec::new();
        // The copy floor: read and write rows x 4d elements once.
        let y4 = rand(&[rows, 4 * width], 1)?;
        let (_, t_copy) = time(&|| y4.copy())?;
        let copy_gbs = 2.0 * bytes * y4.elem_count() as f64 / t_copy / 1e9;
        let b4 = rand(&[4 * width], 2)?;
        let (unfused, t_unfused) = time(&|| bias_add(&y4, &b4)?.gelu())?;
        let (fused, t_fused) = time(&|| bias_gelu(&y4, &b4))?;
        let gbs = 2.0 * bytes * y4.elem_count() as f64 / t_fused / 1e9;
        lines.push(format!(
            "bias + GELU [{rows}, {}]: fused {:.3} ms ({gbs:.0} GB/s, {:.0}% of the copy's), unfused {:.3} ms: {:.2}x; max diff {:.2e}",
            4 * width,
            t_fused * 1e3,
            100.0 * gbs / copy_gbs,
            t_unfused * 1e3,
            t_unfused / t_fused,
            max_diff(&fused, &unfused)?
        ));
        let (y, x, b) = (
            rand(&[rows, width], 3)?,
            rand(&[rows, width], 4)?,
            rand(&[width], 5)?,
        );
        let (unfused, t_unfused) = time(&|| &x + bias_add(&y, &b)?)?;
        let (fused, t_fused) = time(&|| bias_residual(&x, &y, &b))?;
        let gbs = 3.0 * bytes * y.elem_count() as f64 / t_fused / 1e9;
        lines.push(format!(
            "bias + residual [{rows}, {width}]: fused {:.3} ms ({gbs:.0} GB/s, {:.0}% of the copy's), unfused {:.3} ms: {:.2}x; max diff {:.2e}",
            t_fused * 1e3,
            100.0 * gbs / copy_gbs,
            t_unfused * 1e3,
            t_unfused / t_fused,
            max_diff(&fused, &unfused)?
        ));
        lines.push(format!(
            "copy floor: {copy_gbs:.0} GB/s on this device ({dtype}, one unit of rounding {:.1e})",
            match dt {
                candle_core::DType::BF16 => 2f64.powi(-8),
                _ => 2f64.powi(-23),
            }
        ));
        Ok(lines.join("\n"))
    };
    measure().ctx("bench epilogues")
}
