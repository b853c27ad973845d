//! `pipeline bench correlate`: permutation tests over many models' metrics,
//! and the peak memory of the process that runs them.

use std::time::Instant;

use super::temp_ctx;
use crate::error::{Context, Error, Result};
use crate::stages;

/// Peak resident memory of the finished child processes, in MiB.
fn children_peak_rss_mib() -> f64 {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_CHILDREN is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    ru.ru_maxrss as f64 / 1024.0
}

/// `correlate` over an imported table of `models` x `metrics` random values
/// with `perms` permutations (and 1,000 bootstrap resamples), in a separate
/// process so its time and peak memory are its own.
pub fn correlate(models: usize, metrics: usize, perms: u64) -> Result<String> {
    let (dir, ctx) = temp_ctx()?;
    let mut csv = String::from("model,val_loss");
    for m in 0..metrics {
        csv.push_str(&format!(",m{m}"));
    }
    csv.push('\n');
    let mut s = 5u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    for i in 0..models {
        let loss = 1.5 + next();
        csv.push_str(&format!(
            "{:02}x{:04}_01d{}@0,{loss}",
            1 + i % 12,
            64 * (1 + i % 16),
            i
        ));
        for m in 0..metrics {
            // Metric m correlates with the loss more as m grows.
            csv.push_str(&format!(",{}", m as f64 * loss / metrics as f64 + next()));
        }
        csv.push('\n');
    }
    let path = dir.path().join("metrics.csv");
    std::fs::write(&path, csv).ctx("writing the benchmark table")?;
    stages::run_pairs(
        &ctx,
        "import",
        &[("input", &path.to_string_lossy()), ("name", "bench")],
    )?;
    let exe = std::env::current_exe().ctx("locating the pipeline binary")?;
    let t = Instant::now();
    let out = std::process::Command::new(exe)
        .arg("--lake")
        .arg(dir.path().join("lake"))
        .args(["-q", "run", "stage=correlate", "source=imported:bench"])
        .arg(format!("permutations={perms}"))
        .output()
        .ctx("running correlate")?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(Error::invalid(format!(
            "correlate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(format!(
        "correlate {models} models x {metrics} metrics, {perms} permutations + 1000 bootstrap resamples: {secs:.2} s for the whole stage (process start, SQL, writing), peak RSS {:.0} MiB",
        children_peak_rss_mib()
    ))
}
