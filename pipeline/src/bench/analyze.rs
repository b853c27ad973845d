//! `pipeline bench analyze`: the analyze stage on synthetic class statistics
//! of full scale, against the GEMM peak.

use std::time::Instant;

use lc_lake::artifact::{Artifact, Provenance};
use lc_lake::lake::Lake;
use lc_metrics::ClassStats;

use super::temp_ctx;
use crate::error::{Context, Error, Result};

/// Synthetic class statistics of `c` classes in `d` dimensions with
/// Zipf-like counts, as a `class_stats` artifact.
pub fn synthetic_stats(lake: &Lake, model: &str, c: usize, d: usize) -> Result<()> {
    let mut s = 99u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    let mut st = ClassStats::new(d);
    let mut mean = vec![0f64; d];
    for i in 0..c {
        for x in mean.iter_mut() {
            *x = next();
        }
        let count = 1 + (1_000_000 / (i + 1)) as u64;
        st.merge_one(i as u32, count, &mean, count as f64 * (0.5 + next().abs()));
    }
    let a = Artifact::new(
        "class_stats",
        &[("model", model), ("split", "train"), ("layer", "1")],
    )?;
    lake.write_artifact(&a, &[crate::stats::to_batch(&st)?], Provenance::new("bench"))?;
    Ok(())
}

/// The analyze stage on synthetic statistics of `c` classes in `d` dims,
/// run as a separate `pipeline` process so its peak memory is its own.
pub fn analyze(c: usize, d: usize, tile: usize, precision: &str) -> Result<String> {
    let (dir, ctx) = temp_ctx()?;
    synthetic_stats(&ctx.lake, "synthetic", c, d)?;
    let exe = std::env::current_exe().ctx("locating the pipeline binary")?;
    let t = Instant::now();
    let out = std::process::Command::new(exe)
        .arg("--lake")
        .arg(dir.path().join("lake"))
        .args(["-q", "run", "stage=analyze", "model=synthetic", "layer=1"])
        .arg(format!("tile={tile}"))
        .arg(format!("precision={precision}"))
        .output()
        .ctx("running analyze")?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(Error::invalid(format!(
            "analyze failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let pairs = (c * (c - 1) / 2) as f64;
    // The anchor, in this process on the same pool: the Gram products alone.
    let floor = lc_metrics::tiles::gram_floor(c, d, tile, precision == "f32");
    let gflops = (c as f64) * (c as f64 + tile as f64) * d as f64 / floor / 1e9;
    Ok(format!(
        "analyze C = {c}, d = {d}, tile {tile}, {precision}: {:.2}x the GEMM floor\n  \
         stage {secs:.2} s (process start, reading, writing), {:.1} M pairs/s; \
         floor {floor:.2} s: the same upper-triangle Gram tiles alone, {gflops:.0} GFLOP/s, on this machine\n  {}",
        secs / floor,
        pairs / secs / 1e6,
        String::from_utf8_lossy(&out.stdout).trim()
    ))
}
