//! `pipeline bench collect`: collection throughput through the real stage,
//! against the GEMM peak measured in the same run.

use candle_core::Device;
use lc_lake::artifact::Artifact;

use super::{forward_flops_per_token, peak_gemm_gflops, temp_ctx};
use crate::error::{Error, Result};
use crate::stages;
use lc_models::{GptNeoConfig, init_weights};

/// Collection throughput on the shipped sample packed at T = 2048.
pub fn collect(
    depth: usize,
    width: usize,
    train_text: &str,
    tokenizer: &str,
    batch: usize,
) -> Result<String> {
    let (_dir, ctx) = temp_ctx()?;
    stages::run_pairs(&ctx, "ingest", &[("dataset", "b"), ("train", train_text)])?;
    stages::run_pairs(&ctx, "tokenize", &[("dataset", "b"), ("tokenizer", tokenizer)])?;
    stages::run_pairs(
        &ctx,
        "pack",
        &[("dataset", "b"), ("T", "2048"), ("mode", "concat")],
    )?;
    let config = GptNeoConfig::grid(depth, width, 16, 50257, 2048);
    let w = init_weights(&config, 0, &Device::Cpu)?;
    let state = serde_json::json!({"global_step": 0});
    crate::checkpoint::save_dir(&ctx.lake, "weights/bench", &config, &w, &[], &state)?;
    let b = batch.to_string();
    let out = stages::run_pairs(
        &ctx,
        "collect",
        &[("model", "bench"), ("dataset", "b"), ("batch", &b)],
    )?;
    let m = ctx
        .lake
        .manifest(&Artifact::new(
            "class_stats",
            &[
                ("model", "bench"),
                ("split", "train"),
                ("layer", &depth.to_string()),
            ],
        )?)?
        .ok_or_else(|| Error::invalid("no class_stats written"))?;
    let rate = m
        .extra
        .get("tokens_per_s")
        .and_then(|v| v.as_f64())
        .unwrap_or(f64::NAN);
    let share = m
        .extra
        .get("accumulate_share")
        .and_then(|v| v.as_f64())
        .unwrap_or(f64::NAN);
    let peak = peak_gemm_gflops();
    let gf = forward_flops_per_token(&config, 2048, false) * rate / 1e9;
    Ok(format!(
        "collect {depth}x{width} (T = 2048, batch {batch}): {:.1}% of the in-process peak GEMM ({peak:.0} GFLOP/s): \
         {gf:.1} GFLOP/s, {rate:.0} tokens/s on this machine, {:.1}% of the time accumulating\n  ({out})",
        100.0 * gf / peak,
        100.0 * share
    ))
}
