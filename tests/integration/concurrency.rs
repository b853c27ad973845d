//! Many workers on one lake: eight `pipeline run stage=all` processes
//! started at once on the same grid (executor=local) compute every partition
//! exactly once, between them, and leave the results one worker leaves.
//! `all` holds no lease of its own, so they meet at every stage's lease.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use pipeline::sql::Sql;

use crate::common::{BIT_EXACT_RESULTS, TestLake, bin, micro_experiment, table_lines};

const WORKERS: usize = 8;

/// The (stage, target) of each stage result line (`[stage] target: ...`)
/// of a run that computed something rather than finding it up to date.
fn computed(stderr: &str) -> Vec<(String, String)> {
    stderr
        .lines()
        .filter_map(|l| {
            let (stage, rest) = l.strip_prefix('[')?.split_once("] ")?;
            let (target, said) = rest.split_once(": ")?;
            (!said.contains("up to date")).then(|| (stage.to_string(), target.to_string()))
        })
        .collect()
}

#[test]
fn eight_workers_compute_each_partition_once() {
    let tl = TestLake::new();
    let exp = micro_experiment(&tl);
    let experiment = format!("experiment={exp}");
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            Command::new(bin())
                .args([
                    "--lake",
                    &tl.url(),
                    "-q",
                    "run",
                    "stage=all",
                    &experiment,
                    "train_workers=1",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut times: BTreeMap<(String, String), usize> = BTreeMap::new();
    for w in workers {
        let out = w.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "a worker failed:\n{err}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("nc1_cdnv"), "{err}");
        for key in computed(&err) {
            *times.entry(key).or_default() += 1;
        }
    }
    // ingest, tokenize, pack, vocab, report, and train, eval, collect,
    // decide and analyze of each of the four models.
    assert_eq!(times.len(), 5 + 5 * 4, "{times:#?}");
    for (key, n) in &times {
        assert_eq!(*n, 1, "{key:?} computed {n} times");
    }
    // One worker, in a second lake: the same results, to the last bit where
    // the computation is deterministic (analyze's per-class row means are
    // summed per thread, so its model metrics agree to rounding).
    let one = TestLake::new();
    one.run("all", &[("experiment", &exp)]);
    for q in BIT_EXACT_RESULTS {
        let (many, single) = (table_lines(tl.lake(), q), table_lines(one.lake(), q));
        assert!(many.len() > 4, "{many:?}");
        assert_eq!(many, single, "{q}");
    }
    let metrics = |lake: &lc_lake::lake::Lake| -> Vec<f64> {
        let q = "SELECT nc1_cdnv, nc2_equinorm_cov, nc3_duality_mean, nc4_agreement, val_loss \
                 FROM model_metrics WHERE final_layer ORDER BY model";
        let batches = Sql::open(lake).unwrap().query(q, false).unwrap();
        let mut v = Vec::new();
        for b in &batches {
            for c in b.columns() {
                let c = arrow::compute::cast(c, &arrow::datatypes::DataType::Float64).unwrap();
                let c = c.as_any().downcast_ref::<arrow::array::Float64Array>().unwrap();
                v.extend(c.iter().map(|x| x.unwrap_or(f64::NAN)));
            }
        }
        v
    };
    let (many, single) = (metrics(tl.lake()), metrics(one.lake()));
    assert_eq!(many.len(), 4 * 5);
    for (a, b) in many.iter().zip(&single) {
        assert!((a - b).abs() <= 1e-12 * b.abs().max(1e-300), "{a} vs {b}");
    }
}

/// A lease holder frozen past its lease (SIGSTOP) and then resumed commits
/// nothing over the worker that took the partition over meanwhile: the
/// second worker's train_log stays byte for byte, the first fails naming
/// its lapsed lease (or finds the model trained), and `verify` finds the
/// lake whole.
#[test]
fn a_worker_frozen_past_its_lease_commits_nothing() {
    let tl = crate::common::small_dataset(60, 20, 32);
    let lake_dir = tl.dir.path().join("lake");
    let train = |cmd: &mut Command| {
        cmd.args(["--lake", &tl.url(), "-q", "run", "stage=train", "dataset=small"])
            .args([
                "width=32",
                "depth=1",
                "heads=2",
                "context=64",
                "epochs=4",
                "batch=8",
                "seed=5",
            ])
            .env("PIPELINE_LEASE_SECS", "1");
    };
    let mut first = Command::new(bin());
    train(&mut first);
    let first = first
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Frozen once it holds the lease, a moment into its training.
    let leases = lake_dir.join("_leases").join("train");
    let started = std::time::Instant::now();
    while !std::fs::read_dir(&leases).is_ok_and(|d| {
        d.flatten()
            .any(|e| std::fs::read_dir(e.path()).is_ok_and(|c| c.count() > 0))
    }) {
        assert!(
            started.elapsed().as_secs() < 60,
            "the first worker never took its lease"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &first.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    signal("-STOP");
    std::thread::sleep(std::time::Duration::from_millis(1600));
    let mut second = Command::new(bin());
    train(&mut second);
    let second = second.output().unwrap();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let log_dir = std::fs::read_dir(lake_dir.join("train_log"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let snapshot = || -> Vec<Vec<u8>> {
        ["_manifest.json", "part-0.parquet"]
            .iter()
            .map(|f| std::fs::read(log_dir.join(f)).unwrap())
            .collect()
    };
    let committed = snapshot();
    signal("-CONT");
    let first = first.wait_with_output().unwrap();
    let (err, out) = (
        String::from_utf8_lossy(&first.stderr),
        String::from_utf8_lossy(&first.stdout),
    );
    assert!(
        snapshot() == committed,
        "the frozen worker wrote over the train_log:\n{err}\n{out}"
    );
    // Usually it reaches its commit and is refused; resumed at another
    // moment it may instead find the model trained and stop.
    assert!(
        (!first.status.success() && err.contains("this worker's lease lapsed"))
            || (first.status.success() && out.contains("up to date")),
        "{:?}\n{err}\n{out}",
        first.status
    );
    let verify = Command::new(bin())
        .args(["--lake", &tl.url(), "-q", "verify"])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}
