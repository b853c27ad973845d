//! The workspace's layers, as the compiler sees them: a crate may not reach
//! up into the layers above it, directly or through a dependency.

use std::collections::{BTreeMap, BTreeSet};
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

#[test]
fn the_lake_knows_no_model_stage_sql_or_compute() {
    assert!(dependencies("lc-lake").iter().any(|d| d == "object_store"));
    let above = [
        "datafusion",
        "polars",
        "candle",
        "lc-kernels",
        "lc-models",
        "pipeline",
    ];
    let reached = reached("lc-lake", &above);
    assert!(reached.is_empty(), "lc-lake reaches {reached:?}");
}

/// The modules each top-level module of the crate in `src` names through
/// `crate::` or `super::`, outside its unit tests and comments: a module
/// file `x.rs` or folder `x/` is module `x`.
fn module_imports(src: &std::path::Path) -> BTreeMap<String, BTreeSet<String>> {
    fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).expect("reading sources").flatten() {
            let p = e.path();
            if p.is_dir() {
                files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut all = Vec::new();
    files(src, &mut all);
    let module_of = |p: &std::path::Path| -> String {
        let rel = p.strip_prefix(src).expect("under src");
        let first = rel
            .components()
            .next()
            .expect("a file")
            .as_os_str()
            .to_string_lossy();
        first.trim_end_matches(".rs").to_string()
    };
    let modules: BTreeSet<String> = all.iter().map(|p| module_of(p)).collect();
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in &all {
        let m = module_of(p);
        let text = std::fs::read_to_string(p).expect("reading a source");
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
        let names = imports.entry(m.clone()).or_default();
        for line in code.lines() {
            let line = line.split("//").next().unwrap_or_default();
            for prefix in ["crate::", "super::"] {
                for (i, _) in line.match_indices(prefix) {
                    let rest = &line[i + prefix.len()..];
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if name != m && modules.contains(&name) {
                        names.insert(name);
                    }
                }
            }
        }
    }
    imports
}

/// A cycle among `modules` in `imports`, if there is one.
fn cycle(imports: &BTreeMap<String, BTreeSet<String>>, modules: &[&str]) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        imports: &BTreeMap<String, BTreeSet<String>>,
        within: &BTreeSet<&str>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            return Some(path[i..].to_vec());
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in imports.get(m).into_iter().flatten() {
            if within.contains(next.as_str())
                && let Some(c) = visit(next, imports, within, path, done)
            {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let within: BTreeSet<&str> = modules.iter().copied().collect();
    let mut done = BTreeSet::new();
    modules
        .iter()
        .find_map(|m| visit(m, imports, &within, &mut Vec::new(), &mut done))
}

#[test]
fn the_modules_of_each_crate_import_one_way() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for src in [
        root.join("metrics/src"),
        root.join("kernels/src"),
        root.join("models/src"),
        root.join("lake/src"),
        root.join("src"),
    ] {
        let imports = module_imports(&src);
        let all: Vec<&str> = imports
            .keys()
            .map(String::as_str)
            .filter(|m| !["lib", "main"].contains(m))
            .collect();
        assert!(all.len() > 5, "{}: {all:?}", src.display());
        assert_eq!(
            cycle(&imports, &all),
            None,
            "modules of {} import each other",
            src.display()
        );
        if let Some(lake) = imports.get("lake") {
            assert!(lake.contains("integrity"), "{imports:?}");
            // The scan sees a circle where there is one.
            let mut circle = imports.clone();
            circle
                .entry("integrity".into())
                .or_default()
                .insert("lake".into());
            assert!(cycle(&circle, &all).is_some());
        }
    }
}
