//! `pipeline bench decide`: the decide stage on the shipped sample, and its
//! two decisions alone against the GEMM peak.

use super::{bench_hidden, peak_gemm_gflops, peak_gemm_gflops_f64, sample_count, sample_lake, timed};
use crate::error::{Context, Error, Result};
use crate::stages;

/// `decide` on the shipped validation sample (T = 128) after collecting
/// the class means on its train split: the stage's tokens/s, and its two
/// decisions alone (one batch of rows, `reps` times) as a share of the
/// in-process GEMM peak of the precision (f64 by default).
pub fn decide(width: usize, batch: usize, precision: &str, reps: usize) -> Result<String> {
    let (_dir, ctx, classifier) = sample_lake(width)?;
    stages::run_pairs(
        &ctx,
        "collect",
        &[("model", "bench"), ("dataset", "b"), ("batch", "8")],
    )?;
    let b = batch.to_string();
    let (out, secs) = timed(|| {
        stages::run_pairs(
            &ctx,
            "decide",
            &[
                ("model", "bench"),
                ("dataset", "b"),
                ("batch", &b),
                ("precision", precision),
            ],
        )
    })?;
    let samples = sample_count(&out)?;
    let classes: usize = out
        .split("|V'| = ")
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::invalid(format!("decide said: {out}")))?;
    let dt = match precision {
        "f32" => candle_core::DType::F32,
        _ => candle_core::DType::F64,
    };
    let rows = batch * 127;
    let h = bench_hidden(rows, width)?.to_dtype(dt).ctx("hidden states")?;
    let w = classifier
        .narrow(0, 0, classes)
        .and_then(|w| w.to_dtype(dt))
        .ctx("class rows")?;
    let offset = w.sqr().and_then(|s| s.sum(1)).ctx("offsets")?;
    let both = || -> Result<()> {
        lc_models::output_layer::affine_argmax(&h, &w, 1.0, None)?;
        lc_models::output_layer::affine_argmax(&h, &w, 2.0, Some(&offset))?;
        Ok(())
    };
    both()?;
    let (_, t) = timed(|| {
        for _ in 0..reps {
            both()?;
        }
        Ok(())
    })?;
    let peak = if precision == "f32" {
        peak_gemm_gflops()
    } else {
        peak_gemm_gflops_f64()
    };
    let flops = 2.0 * 2.0 * (rows * width * classes) as f64 * reps as f64;
    let gf = flops / t / 1e9;
    let layer_share = (4.0 * (width * classes) as f64 * samples as f64 / 1e9 / gf) / secs;
    Ok(format!(
        "decide 1x{width} on the validation sample (T = 128, batch {batch}, |V'| = {classes}, {precision}): \
         {:.0} tokens/s, {secs:.2} s for {samples} samples ({:.0}% of it the two decisions);\n  \
         both decisions ({rows} rows): {:.1}% of the in-process {precision} GEMM peak ({gf:.1} of {peak:.0} GFLOP/s)",
        samples as f64 / secs,
        100.0 * layer_share,
        100.0 * gf / peak
    ))
}
