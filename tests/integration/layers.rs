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

/// The crates of `package`'s dependencies whose names start with one of
/// `above`.
fn reached(package: &str, above: &[&str]) -> Vec<String> {
    dependencies(package)
        .into_iter()
        .filter(|d| above.iter().any(|a| d.starts_with(a)))
        .collect()
}

/// What no layer below the binary may reach: storage, SQL, async.
const STORAGE_SQL_ASYNC: [&str; 6] = [
    "object_store",
    "datafusion",
    "parquet",
    "arrow",
    "polars",
    "tokio",
];

#[test]
fn the_metrics_know_no_storage_sql_models_or_async() {
    assert!(dependencies("lc-metrics").iter().any(|d| d == "gemm"));
    let above = [
        &STORAGE_SQL_ASYNC[..],
        &["candle", "lc-kernels", "lc-models", "pipeline"],
    ]
    .concat();
    let reached = reached("lc-metrics", &above);
    assert!(reached.is_empty(), "lc-metrics reaches {reached:?}");
}

#[test]
fn the_kernels_know_no_model_storage_sql_or_async() {
    assert!(dependencies("lc-kernels").iter().any(|d| d == "candle-core"));
    let above = [&STORAGE_SQL_ASYNC[..], &["lc-models", "pipeline"]].concat();
    let reached = reached("lc-kernels", &above);
    assert!(reached.is_empty(), "lc-kernels reaches {reached:?}");
}

#[test]
fn the_models_know_no_stage_storage_sql_or_async() {
    assert!(dependencies("lc-models").iter().any(|d| d == "lc-kernels"));
    let above = [&STORAGE_SQL_ASYNC[..], &["pipeline"]].concat();
    let reached = reached("lc-models", &above);
    assert!(reached.is_empty(), "lc-models reaches {reached:?}");
}
