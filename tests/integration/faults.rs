//! Fault injection: damaged bytes, writes aimed at the lake, runaway SQL,
//! copied lakes, an S3 server that goes away, uploads cut short, and the
//! small things a user trips over. Every check runs the real binary or the
//! real stages on a real lake (and a real s3s-fs server where S3 is meant).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::common::{TestLake, bin, data, first_stories};
use crate::s3::{KEY, SECRET, objects, ok, pipeline, spawn, start};

/// A study with every table kind in it: one tiny model through every stage,
/// and an imported table.
pub struct Study {
    pub tl: TestLake,
    pub experiment: String,
}

impl Study {
    fn lake_dir(&self) -> PathBuf {
        self.tl.dir.path().join("lake")
    }
}

const MODEL: &str = "01x0008_01n00";

fn experiment_text(train: &str, val: &str) -> String {
    format!(
        r#"[data]
dataset = "f"
train = "{train}"
validation = "{val}"
T = 32
[train]
lr = 0.01
batch = 8
context = 64
heads = 2
[grid]
depths = [1]
widths = [8]
epochs = [1]
[collect]
batch = 8
[decide]
batch = 8
[analyze]
dump_pairs = "topk:3"
[correlate]
permutations = 100
"#
    )
}

fn build_study() -> Study {
    let tl = TestLake::new();
    let train = tl.file(
        "train.txt",
        first_stories(&data("tinystories_train_sample.txt"), 40).as_bytes(),
    );
    let val = tl.file(
        "val.txt",
        first_stories(&data("tinystories_val_sample.txt"), 10).as_bytes(),
    );
    let experiment = tl.file("study.toml", experiment_text(&train, &val).as_bytes());
    tl.run("all", &[("experiment", &experiment)]);
    let csv = tl.file(
        "published.csv",
        b"model,val_loss,cdnv\n01x0064_01d@0,2.5,0.9\n01x0128_01d@0,2.1,0.7\n02x0128_01d@0,1.9,0.5\n",
    );
    tl.run("import", &[("input", &csv), ("name", "paper")]);
    Study { tl, experiment }
}

/// The shared study; tests that change it restore it before they let go.
fn study() -> MutexGuard<'static, Study> {
    static STUDY: OnceLock<Mutex<Study>> = OnceLock::new();
    STUDY
        .get_or_init(|| Mutex::new(build_study()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn run_bin(lake: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("--lake")
        .arg(lake)
        .arg("-q")
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Every `part-0.parquet` under a table, relative to the lake.
fn data_files(lake: &Path, table: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![lake.join(table)];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap() == "part-0.parquet" {
                out.push(p.strip_prefix(lake).unwrap().to_string_lossy().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Flip one bit in the middle of a file; returns the original bytes.
fn flip(path: &Path) -> Vec<u8> {
    let original = std::fs::read(path).unwrap();
    let mut bytes = original.clone();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(path, &bytes).unwrap();
    original
}

/// One flipped bit in the data file of any table kind is caught by the next
/// read (SQL and stages), named with its file and producing stage, and
/// listed by `pipeline verify`.
#[test]
fn byte_flips_in_every_table_kind_are_detected() {
    let s = study();
    let lake = s.lake_dir();
    let tables = [
        ("documents", "ingest"),
        ("tokens", "tokenize"),
        ("chunks", "pack"),
        ("vocab", "vocab"),
        ("models", "eval"),
        ("train_log", "train"),
        ("class_stats", "collect"),
        ("decisions", "decide"),
        ("pair_tiles", "analyze"),
        ("class_metrics", "analyze"),
        ("pair_extremes", "analyze"),
        ("correlations", "correlate"),
        ("imported_metrics", "import"),
    ];
    let clean = run_bin(&lake, &["verify"]);
    assert!(clean.status.success(), "{}{}", stdout(&clean), stderr(&clean));
    assert!(
        stdout(&clean).contains("everything is whole"),
        "{}",
        stdout(&clean)
    );
    for (table, stage) in tables {
        let files = data_files(&lake, table);
        assert!(!files.is_empty(), "the study has no {table}");
        let rel = &files[0];
        let path = lake.join(rel);
        let original = flip(&path);
        let o = run_bin(
            &lake,
            &["sql", &format!("SELECT * FROM {table}"), "--format", "csv"],
        );
        let err = stderr(&o);
        assert!(
            !o.status.success(),
            "{table}: a flipped byte was read without complaint"
        );
        assert!(
            err.contains(rel.as_str()) && err.contains("damaged") && err.contains(&format!("stage {stage}")),
            "{table}: {err}"
        );
        let v = run_bin(&lake, &["verify", table]);
        assert_eq!(v.status.code(), Some(1), "{table}: {}", stdout(&v));
        assert!(
            stdout(&v)
                .lines()
                .any(|l| l.starts_with("damaged") && l.contains(rel.as_str())),
            "{table}: {}",
            stdout(&v)
        );
        if table == "class_stats" {
            // A stage reading it fails the same way, before computing anything.
            let e = s.tl.run_err("analyze", &[("model", MODEL), ("force", "true")]);
            assert!(e.contains(rel.as_str()) && e.contains("stage collect"), "{e}");
        }
        std::fs::write(&path, original).unwrap();
    }
    let again = run_bin(&lake, &["verify"]);
    assert!(again.status.success(), "{}", stdout(&again));
}

/// A damaged or truncated weights file is named when loaded; `train`
/// notices it instead of saying "up to date" and repairs it.
#[test]
fn damaged_weights_are_named_and_train_repairs_them() {
    let s = study();
    let lake = s.lake_dir();
    let ckpt = std::fs::read_dir(lake.join("weights").join(MODEL))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("checkpoint-")
        })
        .unwrap();
    let weights = ckpt.join("model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &original[..original.len() / 2]).unwrap();
    let e = s.tl.run_err("collect", &[("model", MODEL), ("force", "true")]);
    assert!(
        e.contains(&weights.to_string_lossy().to_string()) && e.contains("damaged"),
        "{e}"
    );
    let top = lake.join("weights").join(MODEL).join("model.safetensors");
    let top_original = std::fs::read(&top).unwrap();
    flip(&top);
    let v = run_bin(&lake, &["verify", "weights"]);
    assert_eq!(v.status.code(), Some(1));
    assert_eq!(
        stdout(&v).lines().filter(|l| l.starts_with("damaged")).count(),
        2,
        "{}",
        stdout(&v)
    );

    let experiment = s.experiment.clone();
    let out = s.tl.run("all", &[("experiment", &experiment)]);
    assert!(out.contains("lake:"), "{out}");
    // Retrained from the same seeds: every file whole again, and the same
    // bytes (training on one thread pool is deterministic here), so nothing
    // downstream became stale.
    let v = run_bin(&lake, &["verify"]);
    assert!(v.status.success(), "{}", stdout(&v));
    assert_eq!(std::fs::read(&weights).unwrap(), original);
    assert_eq!(std::fs::read(&top).unwrap(), top_original);
}

/// `sql --out` never writes into the lake unless asked to, however the
/// target is spelled, and never replaces a file without --force.
#[test]
fn sql_out_into_the_lake_is_refused() {
    let s = study();
    let lake = s.lake_dir();
    let target = lake.join(&data_files(&lake, "chunks")[0]);
    let before = std::fs::read(&target).unwrap();
    let dotted = lake
        .join("..")
        .join(lake.file_name().unwrap())
        .join("chunks/x.parquet");
    for spelled in [
        target.to_string_lossy().to_string(),
        format!("file://{}", target.display()),
        dotted.to_string_lossy().to_string(),
    ] {
        let o = run_bin(&lake, &["sql", "SELECT * FROM chunks LIMIT 3", "--out", &spelled]);
        assert!(!o.status.success(), "--out {spelled} was written");
        assert!(stderr(&o).contains("inside the lake"), "{}", stderr(&o));
    }
    assert_eq!(std::fs::read(&target).unwrap(), before);
    let o = run_bin(
        &lake,
        &["sql", "SELECT COUNT(*) AS n FROM chunks", "--format", "csv"],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    let outside = s.tl.dir.path().join("exports/result.parquet");
    let out_s = outside.to_string_lossy().to_string();
    let q = "SELECT model, val_loss FROM models";
    assert!(run_bin(&lake, &["sql", q, "--out", &out_s]).status.success());
    let o = run_bin(&lake, &["sql", q, "--out", &out_s]);
    assert!(
        !o.status.success() && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    let o = run_bin(&lake, &["sql", q, "--out", &out_s, "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // What was written is a Parquet file with the query's rows.
    let bytes = std::fs::read(&outside).unwrap();
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
            .unwrap()
            .build()
            .unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 1);
}

/// A query that must hold more than the memory limit fails with an error
/// that names the limit; a streamed one runs in far less; a slow one stops
/// at its timeout.
#[test]
fn memory_limited_cross_join_fails_cleanly() {
    let tl = TestLake::new();
    // 3,000 classes x 64 dimensions: 1.5 MB of means.
    pipeline::bench::analyze::synthetic_stats(tl.lake(), "big", 3000, 64).unwrap();
    let lake = tl.dir.path().join("lake");
    // The join holds one side's means (1.5 MB) while it streams the other:
    // within 64 MiB it runs; within 256 KiB it cannot, and says so.
    let join = "SELECT COUNT(*) AS n FROM class_stats a CROSS JOIN class_stats b \
                WHERE a.mean[1] + b.mean[1] < 10";
    let o = run_bin(&lake, &["sql", join, "--memory-limit", "64M", "--format", "csv"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "n\n9000000");
    let o = run_bin(&lake, &["sql", join, "--memory-limit", "256K", "--format", "csv"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("memory limit of 256.0 KiB"), "{}", stderr(&o));
    // Gathering every pair's mean would take 4.6 GB: refused at the limit.
    let gather = "SELECT array_agg(a.mean) FROM class_stats a CROSS JOIN class_stats b";
    let o = run_bin(
        &lake,
        &["sql", gather, "--memory-limit", "64M", "--format", "csv"],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("memory limit of 64.0 MiB"), "{}", stderr(&o));
    let started = Instant::now();
    let o = run_bin(
        &lake,
        &[
            "sql",
            "SELECT SUM(value) FROM generate_series(1, 100000000000)",
            "--timeout",
            "1",
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--timeout"), "{}", stderr(&o));
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Every stage's own summary line, from a `stage=all` run's stderr.
fn step_lines(o: &Output) -> Vec<String> {
    stderr(o)
        .lines()
        .filter(|l| l.starts_with('['))
        .map(str::to_string)
        .collect()
}

fn assert_all_up_to_date(o: &Output) {
    assert!(o.status.success(), "{}", stderr(o));
    let lines = step_lines(o);
    assert!(lines.len() >= 8, "{lines:?}");
    for l in &lines {
        assert!(
            l.contains("up to date"),
            "recomputed after the copy: {l}\n{lines:?}"
        );
    }
}

/// Identities are content hashes: a lake copied to another directory, or
/// to an S3 bucket, keeps every stage up to date.
#[test]
fn a_copied_lake_keeps_every_stage_up_to_date() {
    let s = study();
    let copy = tempfile::tempdir().unwrap();
    let dest = copy.path().join("moved-lake");
    let st = Command::new("cp")
        .arg("-r")
        .arg(s.lake_dir())
        .arg(&dest)
        .status()
        .unwrap();
    assert!(st.success());
    let o = Command::new(bin())
        .arg("--lake")
        .arg(&dest)
        .args(["run", "stage=all", &format!("experiment={}", s.experiment)])
        .output()
        .unwrap();
    assert_all_up_to_date(&o);

    let server = start("copied");
    let url = "s3://copied/study";
    let s3 = |cmd: &mut Command| {
        cmd.env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", server.port))
            .env("AWS_REGION", "us-east-1");
    };
    let mut copy = Command::new(bin());
    s3(&mut copy);
    let o = copy
        .arg("--lake")
        .arg(&dest)
        .args(["-q", "copy", url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mut all = Command::new(bin());
    s3(&mut all);
    let o = all
        .args([
            "--lake",
            url,
            "run",
            "stage=all",
            &format!("experiment={}", s.experiment),
        ])
        .output()
        .unwrap();
    assert_all_up_to_date(&o);
    let v = pipeline(server.port, SECRET, url, &["verify"], &[]);
    assert!(v.status.success(), "{}", stdout(&v));
    assert!(stdout(&v).contains("everything is whole"), "{}", stdout(&v));
}

/// The S3 server goes away for 5 s in the middle of a stage and comes back:
/// requests retry with backoff within their time budget, and the stage
/// finishes.
#[test]
fn a_stage_survives_an_s3_outage() {
    let s = study();
    let mut server = start("flaky");
    let url = "s3://flaky/l";
    let env = |cmd: &mut Command, port: u16| {
        cmd.env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
            .env("AWS_REGION", "us-east-1")
            .env("PIPELINE_S3_RETRY_SECS", "20");
    };
    let mut copy = Command::new(bin());
    env(&mut copy, server.port);
    let o = copy
        .arg("--lake")
        .arg(s.lake_dir())
        .args(["-q", "copy", url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    drop(s);
    // Training that writes a resumable state after every step: a steady
    // stream of requests for many seconds.
    let mut cmd = Command::new(bin());
    env(&mut cmd, server.port);
    let child = cmd
        .env("RUST_LOG", "info")
        .args(["--lake", url, "run", "stage=train", "dataset=f", "name=outage"])
        .args([
            "depth=1",
            "width=8",
            "heads=2",
            "context=64",
            "epochs=10",
            "batch=8",
            "save_every=1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = child;
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the stage ended before the outage"
    );
    let _ = server.child.kill();
    let _ = server.child.wait();
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the stage gave up during the outage"
    );
    server.child = spawn(server.root.path(), server.port);
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("backing off"), "no retry happened: {err}");
    let objs = objects(&server, "flaky");
    assert!(
        objs.iter().any(|o| o == "l/weights/outage/trainer_state.json"),
        "{objs:?}"
    );
}

/// Server-side leftovers of a multipart upload (s3s-fs keeps them in its root).
pub fn upload_leftovers(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".upload"))
        .collect()
}

/// A multipart upload cut short leaves no parts on the server: Ctrl-C
/// aborts it on the way out, and after a kill -9 the next upload of the key
/// aborts it (and `verify --repair` would).
#[test]
fn interrupted_multipart_uploads_are_aborted() {
    let server = start("big");
    let dir = tempfile::tempdir().unwrap();
    // ~60 MB of poorly compressible words: several 5 MiB parts.
    let mut x = 1u64;
    let mut text = String::new();
    while text.len() < 60 << 20 {
        for _ in 0..120 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            text.push_str(&format!("w{:x} ", x >> 20));
        }
        text.push_str("\n<|endoftext|>\n");
    }
    let corpus = dir.path().join("big.txt");
    std::fs::write(&corpus, &text).unwrap();
    let train = format!("train={}", corpus.display());
    let journal = server.root.path().join("big/l/_uploads");
    let start_ingest = || {
        let mut cmd = Command::new(bin());
        cmd.env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", server.port))
            .env("AWS_REGION", "us-east-1")
            .env("PIPELINE_UPLOAD_PART_BYTES", "5242880")
            .args([
                "--lake",
                "s3://big/l",
                "-q",
                "run",
                "stage=ingest",
                "dataset=b",
                &train,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Wait until the upload is under way, then stop the writer in its tracks.
    let wait_for_upload = |child: &mut std::process::Child| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(
                child.try_wait().unwrap().is_none(),
                "ingest ended before its upload was seen"
            );
            let journalled = std::fs::read_dir(&journal)
                .map(|d| d.count() > 0)
                .unwrap_or(false);
            if journalled && !upload_leftovers(server.root.path()).is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "no multipart upload started");
            std::thread::sleep(Duration::from_millis(2));
        }
    };

    let mut child = start_ingest();
    wait_for_upload(&mut child);
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains("aborted 1 upload"), "{}", stderr(&out));
    assert!(
        upload_leftovers(server.root.path()).is_empty(),
        "{:?}",
        upload_leftovers(server.root.path())
    );

    let mut child = start_ingest();
    wait_for_upload(&mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !upload_leftovers(server.root.path()).is_empty(),
        "kill -9 left nothing to clean"
    );
    let o = pipeline(
        server.port,
        SECRET,
        "s3://big/l",
        &["run", "stage=ingest", "dataset=b", &train],
        &[("PIPELINE_UPLOAD_PART_BYTES", "5242880")],
    );
    ok(&o);
    assert!(
        upload_leftovers(server.root.path()).is_empty(),
        "{:?}",
        upload_leftovers(server.root.path())
    );
    let v = pipeline(server.port, SECRET, "s3://big/l", &["verify"], &[]);
    assert!(
        v.status.success() && !stdout(&v).contains("upload"),
        "{}",
        stdout(&v)
    );
}

/// Small things: clear refusals and readable logs.
#[test]
fn small_things_are_right() {
    let tl = TestLake::new();
    let seps = tl.file("seps.txt", b"<|endoftext|>\n\n<|endoftext|>\n");
    let e = tl.run_err("ingest", &[("train", &seps)]);
    assert!(e.contains("seps.txt") && e.contains("holds no text"), "{e}");
    assert!(tl.lake().list("documents").unwrap().is_empty());

    let e = tl.run_err("eval", &[("model", "/etc")]);
    assert!(
        e.contains("not a Hugging Face model directory") && !e.contains("@0..0"),
        "{e}"
    );

    // The built-in tokenizer works from any working directory.
    let elsewhere = tempfile::tempdir().unwrap();
    let lake = tl.dir.path().join("lake2");
    let corpus = data("tinystories_val_sample.txt");
    let run = |args: &[&str]| {
        Command::new(bin())
            .current_dir(elsewhere.path())
            .env("PIPELINE_PROGRESS_SECS", "0.05")
            .arg("--lake")
            .arg(&lake)
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&["run", "stage=ingest", &format!("train={corpus}")]);
    assert!(o.status.success(), "{}", stderr(&o));
    // One INFO line per stage says what was asked; no parameter dumps.
    let err = stderr(&o);
    assert!(err.contains("ingest train="), "{err}");
    assert!(!err.contains("params") && !err.contains("{\""), "{err}");
    let o = run(&["run", "stage=tokenize"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["run", "stage=pack", "T=16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // stderr is a pipe here: progress comes as periodic lines.
    let o = run(&[
        "run",
        "stage=train",
        "name=p",
        "depth=1",
        "width=8",
        "heads=2",
        "context=16",
        "epochs=2",
        "batch=8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.lines().any(|l| l.contains("p loss") && l.contains("tok/s")),
        "{err}"
    );
    // Rates are whole numbers, not four decimals. Only the rate itself is
    // examined: a timestamp such as `51.000002Z` holds ".0000" by chance.
    let rates: Vec<&str> = err
        .lines()
        .filter_map(|l| l.split(" tok/s").next().filter(|_| l.contains(" tok/s")))
        .filter_map(|head| head.rsplit(' ').next())
        .collect();
    assert!(!rates.is_empty(), "{err}");
    // A rate is whole (`7361`) or one decimal with a unit (`12.3k`).
    let readable = |r: &str| {
        let r = r.trim_start_matches('(');
        let whole = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        match r.strip_suffix(['k', 'M', 'G']) {
            Some(scaled) => scaled
                .split_once('.')
                .is_some_and(|(i, f)| whole(i) && f.len() == 1 && whole(f)),
            None => whole(r),
        }
    };
    assert!(rates.iter().all(|r| readable(r)), "rates {rates:?} in {err}");
}
