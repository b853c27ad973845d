//! `pipeline bench eval`: the eval stage on the shipped sample, and its
//! output-layer scan alone against the GEMM peak.

use super::{bench_hidden, peak_gemm_gflops, sample_count, sample_lake, timed};
use crate::error::Result;
use crate::stages;

/// `eval` on the shipped validation sample (T = 128): the stage's
/// tokens/s, and its output layer alone (one batch of rows, `reps` times)
/// as a share of the in-process f32 GEMM peak.
pub fn eval(width: usize, batch: usize, reps: usize) -> Result<String> {
    let (_dir, ctx, classifier) = sample_lake(width)?;
    let b = batch.to_string();
    let (out, secs) = timed(|| {
        stages::run_pairs(
            &ctx,
            "eval",
            &[("model", "bench"), ("dataset", "b"), ("batch", &b)],
        )
    })?;
    let samples = sample_count(&out)?;
    let rows = batch * 127;
    let h = bench_hidden(rows, width)?;
    let w = classifier;
    let labels: Vec<u32> = (0..rows).map(|r| (r * 7919 % 50257) as u32).collect();
    lc_models::output_layer::loss_and_argmax(&h, &w, &labels)?;
    let (_, t) = timed(|| {
        for _ in 0..reps {
            lc_models::output_layer::loss_and_argmax(&h, &w, &labels)?;
        }
        Ok(())
    })?;
    let peak = peak_gemm_gflops();
    let flops = 2.0 * (rows * width * 50257) as f64 * reps as f64;
    let gf = flops / t / 1e9;
    let layer_share = (2.0 * (width * 50257) as f64 * samples as f64 / 1e9 / gf) / secs;
    Ok(format!(
        "eval 1x{width} on the validation sample (T = 128, batch {batch}, V = 50257): \
         {:.0} tokens/s, {secs:.2} s for {samples} samples ({:.0}% of it the output layer);\n  \
         output layer (loss + argmax, {rows} rows): {:.1}% of the in-process f32 GEMM peak \
         ({gf:.1} of {peak:.0} GFLOP/s)",
        samples as f64 / secs,
        100.0 * layer_share,
        100.0 * gf / peak
    ))
}
