//! The workspace's layers, as the compiler sees them: a crate may not reach
//! up into the layers above it, directly or through a dependency.

use std::process::Command;

/// Every crate `package` depends on (normal dependencies, transitively).
fn dependencies(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            package,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn the_metrics_know_no_storage_sql_models_or_async() {
    let deps = dependencies("lc-metrics");
    assert!(deps.iter().any(|d| d == "gemm"), "{deps:?}");
    let above = [
        "object_store",
        "datafusion",
        "parquet",
        "arrow",
        "polars",
        "candle",
        "tokio",
        "pipeline",
    ];
    let reached: Vec<&String> = deps
        .iter()
        .filter(|d| above.iter().any(|a| d.starts_with(a)))
        .collect();
    assert!(reached.is_empty(), "lc-metrics reaches {reached:?}");
}
