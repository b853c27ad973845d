//! The lake in a real S3-compatible server (s3s-fs on 127.0.0.1, which checks
//! SigV4 signatures and does multipart uploads), driven through the
//! `pipeline` binary with the standard AWS environment.
//!
//! Needs `s3s-fs` on PATH or in ~/.cargo/bin (`.ci/run` installs it:
//! `cargo install s3s-fs@0.14.1 --features binary`).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use crate::common::{bin, data, first_stories};

pub const KEY: &str = "pipelinetest";
pub const SECRET: &str = "pipelinetestsecret";

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub root: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn s3s_fs() -> PathBuf {
    if let Ok(out) = Command::new("which").arg("s3s-fs").output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = PathBuf::from(home).join(".cargo/bin/s3s-fs");
    assert!(
        p.exists(),
        "the S3 tests need the s3s-fs server: cargo install s3s-fs@0.14.1 --features binary (bash .ci/run does this)"
    );
    p
}

pub fn start(bucket: &str) -> Server {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join(bucket)).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = spawn(root.path(), port);
    Server { child, port, root }
}

/// Start s3s-fs on `port` serving `root`, and wait until it accepts.
pub fn spawn(root: &std::path::Path, port: u16) -> Child {
    let child = Command::new(s3s_fs())
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--access-key",
            KEY,
            "--secret-key",
            SECRET,
        ])
        .arg(root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s3s-fs did not start on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

pub fn pipeline(
    server_port: u16,
    secret: &str,
    lake: &str,
    args: &[&str],
    extra_env: &[(&str, &str)],
) -> Output {
    let mut cmd = Command::new(bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{server_port}"))
        .env("AWS_REGION", "us-east-1")
        .env("PIPELINE_S3_RETRIES", "2")
        .env("PIPELINE_S3_RETRY_SECS", "5")
        .env("PIPELINE_S3_CONNECT_SECS", "2")
        .args(["--lake", lake, "-q"])
        .args(args);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Objects stored by the server under a bucket, relative to it.
pub fn objects(server: &Server, bucket: &str) -> Vec<String> {
    let base = server.root.path().join(bucket);
    let mut out = Vec::new();
    let mut stack = vec![base.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(&base).unwrap().to_string_lossy().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn stages_and_sql_run_on_an_s3_lake() {
    let server = start("lakebucket");
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, n: usize, src: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, first_stories(&data(src), n)).unwrap();
        p.to_string_lossy().to_string()
    };
    let train = write("train.txt", 40, "tinystories_train_sample.txt");
    let val = write("val.txt", 10, "tinystories_val_sample.txt");
    let lake = "s3://lakebucket/study";
    let run = |args: &[&str]| ok(&pipeline(server.port, SECRET, lake, args, &[]));
    run(&[
        "run",
        "stage=ingest",
        "dataset=s",
        &format!("train={train}"),
        &format!("validation={val}"),
    ]);
    run(&[
        "run",
        "stage=tokenize",
        "dataset=s",
        &format!("tokenizer={}", data("tokenizer.json")),
    ]);
    run(&["run", "stage=pack", "dataset=s", "T=64"]);
    let out = run(&[
        "sql",
        "SELECT split, COUNT(*) AS docs FROM documents GROUP BY split ORDER BY split",
        "--format",
        "csv",
    ]);
    assert_eq!(out.trim(), "split,docs\ntrain,40\nvalidation,10", "{out}");
    let out = run(&[
        "sql",
        "SELECT SUM(n_tokens) FROM tokens WHERE split = 'train'",
        "--format",
        "csv",
    ]);
    assert!(
        out.lines().nth(1).unwrap().parse::<u64>().unwrap() > 5000,
        "{out}"
    );
    let status = run(&["status"]);
    assert!(
        status.contains("s3://lakebucket/study")
            && status.contains("chunks")
            && status.contains("dataset=s/split=train"),
        "{status}"
    );
    // Overwrite a partition: the new data replaces the old one atomically, one
    // file per partition, nothing staged or half-written left behind.
    let bigger = write("train2.txt", 55, "tinystories_train_sample.txt");
    run(&[
        "run",
        "stage=ingest",
        "dataset=s",
        &format!("train={bigger}"),
        &format!("validation={val}"),
    ]);
    let out = run(&[
        "sql",
        "SELECT COUNT(*) AS docs FROM documents WHERE split = 'train'",
        "--format",
        "csv",
    ]);
    assert_eq!(out.trim(), "docs\n55");
    let objs = objects(&server, "lakebucket");
    let docs: Vec<&String> = objs
        .iter()
        .filter(|o| o.starts_with("study/documents/"))
        .collect();
    assert_eq!(docs.len(), 4, "{docs:?}"); // part-0 and manifest, two splits
    assert!(
        objs.iter()
            .all(|o| o.ends_with(".parquet") || o.ends_with(".json")),
        "{objs:?}"
    );
    // Writes are refused in SQL here too.
    let o = pipeline(
        server.port,
        SECRET,
        lake,
        &["sql", "CREATE TABLE x AS SELECT 1"],
        &[],
    );
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("read-only"));
}

/// Objects larger than one part go up as multipart uploads (5 MiB parts
/// here), which S3 makes visible only when complete.
#[test]
fn large_artifacts_use_multipart_uploads() {
    let server = start("big");
    let dir = tempfile::tempdir().unwrap();
    // ~12 MB of pseudo-random words that compress poorly.
    let mut s = 1u64;
    let mut text = String::new();
    while text.len() < 12 << 20 {
        for _ in 0..120 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            text.push_str(&format!("w{:x} ", s >> 20));
        }
        text.push_str("\n<|endoftext|>\n");
    }
    let p = dir.path().join("big.txt");
    std::fs::write(&p, &text).unwrap();
    let lake = "s3://big/l";
    let o = pipeline(
        server.port,
        SECRET,
        lake,
        &[
            "run",
            "stage=ingest",
            "dataset=b",
            &format!("train={}", p.display()),
        ],
        &[("PIPELINE_UPLOAD_PART_BYTES", "5242880")],
    );
    ok(&o);
    let f = server
        .root
        .path()
        .join("big/l/documents/dataset=b/split=train/part-0.parquet");
    assert!(std::fs::metadata(&f).unwrap().len() > 5 << 20);
    let out = ok(&pipeline(
        server.port,
        SECRET,
        lake,
        &[
            "sql",
            "SELECT COUNT(*) AS n, SUM(length(text)) AS chars FROM documents",
            "--format",
            "csv",
        ],
        &[],
    ));
    let line = out.lines().nth(1).unwrap().to_string();
    let docs = text.matches("<|endoftext|>").count();
    assert!(
        line.starts_with(&format!("{docs},")),
        "{line} vs {docs} documents"
    );
}

#[test]
fn wrong_credentials_and_a_stopped_server_fail_clearly_and_quickly() {
    let server = start("lakebucket");
    let started = Instant::now();
    let o = pipeline(
        server.port,
        "wrong-secret",
        "s3://lakebucket/x",
        &[
            "run",
            "stage=ingest",
            &format!("train={}", data("tinystories_val_sample.txt")),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "wrong credentials were accepted");
    assert!(
        err.contains("s3://lakebucket/x")
            && (err.contains("403") || err.contains("Signature") || err.contains("Access")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        objects(&server, "lakebucket").is_empty(),
        "something was written with wrong credentials"
    );

    let port = server.port;
    drop(server);
    let started = Instant::now();
    let o = pipeline(
        port,
        SECRET,
        "s3://lakebucket/x",
        &["sql", "SELECT COUNT(*) FROM documents"],
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success());
    assert!(
        err.to_lowercase().contains("connect") || err.contains("error sending request"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
