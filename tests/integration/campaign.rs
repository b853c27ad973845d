//! The fault campaign (issue 43): the micro grid (four models, collection in
//! two shards) goes through the SLURM test cluster into an s3s-fs lake while
//! a seeded schedule injects faults at random moments:
//!
//! - `scancel` of a random queued or running task, then a resubmission;
//! - `kill -9` of a running stage process;
//! - the S3 server stopped for 1–20 s, then restarted on its port;
//! - the staging directory (a small tmpfs, the jobs' `TMPDIR`) filled to
//!   the last byte for 2–10 s;
//! - a stage process frozen with SIGSTOP past its lease's expiry while a
//!   resubmission may hand its work to another worker, then resumed.
//!
//! After the schedule the queue drains, `status` must name each failed
//! stage with its job, and one resubmission must finish the grid. Then
//! every table must equal a clean run's: row counts and the bit-exact
//! queries ([`BIT_EXACT_RESULTS`]) line for line, the model metrics within
//! 1e-9 relative (analyze sums its row means per thread, so their last bits
//! vary run to run); `verify` must find the lake whole, and no lease,
//! staging file or multipart upload may be left behind.
//!
//! Seeds: `PIPELINE_CAMPAIGN_SEEDS` of them (default 5, what CI runs),
//! from `PIPELINE_CAMPAIGN_SEED` (default 1). Each seed prints one line;
//! the last line totals faults by kind, faults survived and rows lost.
//! The disk fault mounts a tmpfs, so it needs root (CI runs as root);
//! elsewhere that kind is left out, and the summary says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::{BIT_EXACT_RESULTS, TestLake, bin, micro_experiment};
use crate::faults::upload_leftovers;
use crate::s3::{Server, spawn, start};
use crate::slurm::{Cluster, METRICS_SQL, cluster, metrics, s3_env, text};

/// Lease time of the campaign's workers: short, so that a frozen worker
/// lapses within seconds.
const LEASE_SECS: u64 = 4;

/// The tables the study writes; their row counts must equal the clean run's.
const TABLES: [&str; 9] = [
    "documents",
    "tokens",
    "train_log",
    "models",
    "class_stats",
    "decisions",
    "classifiers",
    "class_metrics",
    "model_metrics",
];

/// SplitMix64: a seeded schedule needs nothing better, and no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        Duration::from_secs_f64(lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Cancel,
    Kill,
    S3Outage,
    DiskFull,
    Freeze,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Cancel => "scancel+resubmit",
            Kind::Kill => "kill -9",
            Kind::S3Outage => "S3 outage",
            Kind::DiskFull => "full staging disk",
            Kind::Freeze => "frozen lease holder",
        }
    }
}

#[derive(Debug)]
struct Fault {
    at: Duration,
    kind: Kind,
    length: Duration,
}

/// Three to five faults at moments within `window` of the submission.
fn schedule(seed: u64, window: Duration, disk: bool) -> Vec<Fault> {
    let mut rng = Rng(seed);
    let kinds: Vec<Kind> = [
        Kind::Cancel,
        Kind::Kill,
        Kind::S3Outage,
        Kind::DiskFull,
        Kind::Freeze,
    ]
    .into_iter()
    .filter(|k| disk || *k != Kind::DiskFull)
    .collect();
    let n = 3 + rng.below(3);
    let mut faults: Vec<Fault> = (0..n)
        .map(|_| {
            let kind = kinds[rng.below(kinds.len())];
            let length = match kind {
                Kind::S3Outage => rng.secs(1.0, 20.0),
                Kind::DiskFull => rng.secs(2.0, 10.0),
                Kind::Freeze => Duration::from_secs(LEASE_SECS + 2),
                Kind::Cancel | Kind::Kill => Duration::ZERO,
            };
            Fault {
                at: rng.secs(0.5, window.as_secs_f64()),
                kind,
                length,
            }
        })
        .collect();
    faults.sort_by_key(|f| f.at);
    faults
}

/// A small tmpfs for the jobs' staging files, unmounted when dropped; None
/// where mounting is not allowed (not root).
struct Staging {
    dir: tempfile::TempDir,
}

impl Staging {
    fn mount() -> Option<Staging> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
            .arg(dir.path())
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then_some(Staging { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the filesystem to its last byte; the filler file.
    fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write;
        let p = self.path().join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        let block = vec![0u8; 1 << 20];
        while f.write_all(&block).is_ok() {}
        let mut byte = [0u8; 1];
        while f.write_all(&byte).is_ok() {
            byte[0] = 1;
        }
        p
    }

    fn staging_files(&self) -> Vec<String> {
        std::fs::read_dir(self.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("pipeline-staging-"))
            .collect()
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// What must equal the clean run's: row counts and bit-exact queries
/// (compared as text), and the model metrics (compared within 1e-9).
struct Results {
    exact: Vec<Vec<String>>,
    metrics: Vec<(String, Vec<f64>)>,
}

/// One grid run: its lake on its own S3 server, its experiment and logs.
struct Grid<'a> {
    cluster: &'a Cluster,
    /// The server, and how many outages are under way: it restarts when
    /// the last one ends, so outages may overlap.
    server: Mutex<(Server, usize)>,
    bucket: String,
    lake: String,
    exp: String,
    logs: PathBuf,
    staging: Option<&'a Staging>,
}

impl<'a> Grid<'a> {
    fn new(cluster: &'a Cluster, bucket: &str, exp: &str, staging: Option<&'a Staging>) -> Grid<'a> {
        Grid {
            cluster,
            server: Mutex::new((start(bucket), 0)),
            bucket: bucket.to_string(),
            lake: format!("s3://{bucket}/l"),
            exp: exp.to_string(),
            logs: cluster.log_dir(&format!("campaign-{bucket}")),
            staging,
        }
    }

    fn pipeline(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin());
        self.cluster.env(&mut cmd);
        s3_env(&mut cmd, &self.server.lock().unwrap().0);
        cmd.env("PIPELINE_LEASE_SECS", LEASE_SECS.to_string());
        if let Some(s) = self.staging {
            cmd.env("TMPDIR", s.path());
        }
        cmd.args(["--lake", &self.lake, "-q"])
            .args(args)
            .output()
            .unwrap()
    }

    /// `run stage=all` through SLURM with collection in two shards.
    fn submit(&self, extra: &[&str]) -> Output {
        let exp = format!("experiment={}", self.exp);
        let logs = format!("log_dir={}", self.logs.display());
        let base = [
            "run",
            "stage=all",
            exp.as_str(),
            "executor=slurm",
            "collect_shards=2",
            logs.as_str(),
        ];
        self.pipeline(&[&base[..], extra].concat())
    }

    fn status(&self) -> Output {
        self.pipeline(&["status", &format!("experiment={}", self.exp)])
    }

    /// Tasks in the queue, one per array task.
    fn queue(&self) -> Vec<String> {
        let out = self.cluster.tool("squeue", &["-h", "-r", "-o", "%i"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    fn drain(&self) {
        let deadline = Instant::now() + Duration::from_secs(600);
        while !self.queue().is_empty() {
            assert!(Instant::now() < deadline, "the queue never drained");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Stage processes that SLURM runs on this lake.
    fn stage_processes(&self) -> Vec<u32> {
        let exe = std::fs::canonicalize(bin()).unwrap();
        let lake = format!("PIPELINE_LAKE={}", self.lake);
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe)
                    && std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
                        vars.contains(&lake.as_bytes())
                            && vars.iter().any(|v| v.starts_with(b"SLURM_JOB_ID="))
                    })
            })
            .collect()
    }

    /// Injects one fault; what it hit, or None where it found no target (an
    /// empty queue, no stage process running).
    fn inject(&self, f: &Fault, rng: &mut Rng, index: usize) -> Option<String> {
        match f.kind {
            Kind::Cancel => {
                let q = self.queue();
                let task = q.get(rng.below(q.len().max(1)))?;
                let o = self.cluster.tool("scancel", &[task]);
                assert!(o.status.success(), "scancel {task}: {o:?}");
                let again = self.submit(&[]);
                Some(format!(
                    "scancel {task}, resubmitted{}",
                    if again.status.success() { "" } else { " (refused)" }
                ))
            }
            Kind::Kill => {
                let p = self.stage_processes();
                let pid = *p.get(rng.below(p.len().max(1)))?;
                let stage = stage_of(pid);
                signal(pid, libc::SIGKILL);
                Some(format!("kill -9 {stage}"))
            }
            Kind::S3Outage => {
                self.stop_server();
                std::thread::sleep(f.length);
                self.start_server();
                Some(format!("S3 down {:.1} s", f.length.as_secs_f64()))
            }
            Kind::DiskFull => {
                let filler = self.staging?.fill(&format!("filler-{index}"));
                std::thread::sleep(f.length);
                std::fs::remove_file(filler).unwrap();
                Some(format!("staging full {:.1} s", f.length.as_secs_f64()))
            }
            Kind::Freeze => {
                let p = self.stage_processes();
                let pid = *p.get(rng.below(p.len().max(1)))?;
                let stage = stage_of(pid);
                signal(pid, libc::SIGSTOP);
                std::thread::sleep(Duration::from_secs(LEASE_SECS) + Duration::from_millis(500));
                // A new worker may take its work while it is frozen.
                let _ = self.submit(&[]);
                std::thread::sleep(f.length.saturating_sub(Duration::from_secs(LEASE_SECS)));
                signal(pid, libc::SIGCONT);
                Some(format!("froze {stage} {:.0} s", f.length.as_secs_f64()))
            }
        }
    }

    fn stop_server(&self) {
        let mut g = self.server.lock().unwrap();
        if g.1 == 0 {
            let _ = g.0.child.kill();
            let _ = g.0.child.wait();
        }
        g.1 += 1;
    }

    fn start_server(&self) {
        let mut g = self.server.lock().unwrap();
        g.1 -= 1;
        if g.1 == 0 {
            g.0.child = spawn(g.0.root.path(), g.0.port);
        }
    }

    fn server_up(&self) -> bool {
        self.server.lock().unwrap().1 == 0
    }

    /// Objects under the lake with this prefix.
    fn objects(&self, prefix: &str) -> Vec<String> {
        crate::s3::objects(&self.server.lock().unwrap().0, &self.bucket)
            .into_iter()
            .filter(|o| o.starts_with(prefix))
            .collect()
    }

    /// Multipart uploads the server still holds.
    fn uploads(&self) -> Vec<String> {
        upload_leftovers(self.server.lock().unwrap().0.root.path())
    }

    /// A query's output; it must succeed.
    fn sql_output(&self, q: &str, format: &str) -> Output {
        let o = self.pipeline(&["sql", q, "--format", format]);
        assert!(o.status.success(), "{q}: {}", text(&o));
        o
    }

    /// A query's printed result, as lines (floats in full: equal lines are
    /// equal values).
    fn sql(&self, q: &str, format: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.sql_output(q, format).stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn results(&self) -> Results {
        let mut exact: Vec<Vec<String>> = TABLES
            .iter()
            .map(|t| self.sql(&format!("SELECT '{t}' AS t, count(*) AS n FROM {t}"), "csv"))
            .collect();
        exact.extend(BIT_EXACT_RESULTS.iter().map(|q| self.sql(q, "table")));
        let metrics = metrics(&self.sql_output(METRICS_SQL, "csv"));
        Results { exact, metrics }
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid read from /proc; a process gone meanwhile
    // only makes it fail with ESRCH.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// The stage a process runs (its `stage=` argument).
fn stage_of(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    cmdline
        .split(|b| *b == 0)
        .find_map(|a| a.strip_prefix(b"stage="))
        .map(|s| String::from_utf8_lossy(s).to_string())
        .unwrap_or_else(|| "a stage".into())
}

/// The failed cells a status table names, as "model stage"; each must name
/// its job.
fn failures(status: &str, seed: u64) -> Vec<String> {
    status
        .lines()
        .filter_map(|l| {
            let (cell, detail) = l.split_once(": failed ")?;
            assert!(
                detail.starts_with("job "),
                "seed {seed}: a failure without its job: {l}\n{status}"
            );
            Some(cell.to_string())
        })
        .collect()
}

/// What one seed did.
#[derive(Default)]
struct SeedReport {
    injected: BTreeMap<Kind, usize>,
    /// Faults that found no target (an empty queue, no running process).
    idle: usize,
    failed_cells: usize,
}

/// Runs one seed's schedule on a fresh lake, then finishes the grid and
/// checks it against the clean run.
fn run_seed(
    c: &Cluster,
    seed: u64,
    exp: &str,
    staging: Option<&Staging>,
    window: Duration,
    clean: &Results,
) -> SeedReport {
    let grid = Grid::new(c, &format!("seed{seed}"), exp, staging);
    let mut report = SeedReport::default();
    let faults = schedule(seed, window, staging.is_some());
    let started = Instant::now();
    let first = grid.submit(&[]);
    assert!(first.status.success(), "seed {seed}: {}", text(&first));
    // Each fault in its own thread at its moment, so that they overlap as
    // on a real cluster; meanwhile status must answer whenever the server is
    // up.
    let mut named = std::collections::BTreeSet::new();
    let hits: Vec<Option<String>> = std::thread::scope(|scope| {
        let threads: Vec<_> = faults
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let grid = &grid;
                scope.spawn(move || {
                    if let Some(wait) = f.at.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    grid.inject(f, &mut Rng(seed ^ (i as u64 + 1) << 32), i)
                })
            })
            .collect();
        while threads.iter().any(|t| !t.is_finished()) {
            std::thread::sleep(Duration::from_secs(2));
            if grid.server_up() {
                let st = grid.status();
                // An outage may begin while it runs.
                assert!(
                    st.status.success() || !grid.server_up(),
                    "seed {seed}: status during the faults: {}",
                    text(&st)
                );
                named.extend(failures(&text(&st), seed));
            }
        }
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (f, hit) in faults.iter().zip(&hits) {
        *report.injected.entry(f.kind).or_default() += 1;
        report.idle += usize::from(hit.is_none());
    }
    eprintln!(
        "campaign seed {seed}: {}",
        faults
            .iter()
            .zip(&hits)
            .map(|(f, h)| format!(
                "{:.0} s {}",
                f.at.as_secs_f64(),
                h.clone()
                    .unwrap_or_else(|| format!("{}: no target", f.kind.name()))
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    grid.drain();

    // A stage whose job failed stays named, with its job, until it is redone.
    named.extend(failures(&text(&grid.status()), seed));
    report.failed_cells = named.len();

    // One resubmission finishes the grid.
    let final_started = Instant::now();
    let last = grid.submit(&["wait=true"]);
    let final_secs = final_started.elapsed().as_secs_f64();
    let t = text(&last);
    assert!(
        last.status.success(),
        "seed {seed}: the final resubmission failed: {t}"
    );
    let st = text(&grid.status());
    assert!(st.contains("4 models x 5 stages: 20 done"), "seed {seed}: {st}");

    let Results { exact, metrics } = grid.results();
    for (got, want) in exact.iter().zip(&clean.exact) {
        let differ: Vec<String> = got
            .iter()
            .zip(want)
            .filter(|(g, w)| g != w)
            .take(6)
            .map(|(g, w)| format!("  got  {g}\n  want {w}"))
            .collect();
        assert!(
            got == want,
            "seed {seed}: {} differs from the clean run ({} against {} lines):\n{}",
            want.get(1).map_or("", |s| s.as_str()),
            got.len(),
            want.len(),
            differ.join("\n")
        );
    }
    assert_eq!(metrics.len(), clean.metrics.len(), "seed {seed}");
    for ((m, g), (wm, w)) in metrics.iter().zip(&clean.metrics) {
        assert_eq!(m, wm, "seed {seed}");
        for (a, b) in g.iter().zip(w) {
            assert!(
                (a - b).abs() <= 1e-9 * b.abs().max(1e-12),
                "seed {seed}: {m}: {a} vs the clean run's {b}"
            );
        }
    }
    let verify = grid.pipeline(&["verify"]);
    assert!(verify.status.success(), "seed {seed}: {}", text(&verify));
    let leases = grid.objects("l/_leases/");
    assert!(leases.is_empty(), "seed {seed}: leases left: {leases:?}");
    let records = grid.objects("l/_status/failed/");
    assert!(
        records.is_empty(),
        "seed {seed}: failure records of done stages: {records:?}"
    );
    let uploads = grid.uploads();
    assert!(uploads.is_empty(), "seed {seed}: uploads left: {uploads:?}");
    if let Some(s) = staging {
        let left = s.staging_files();
        assert!(left.is_empty(), "seed {seed}: staging files left: {left:?}");
    }
    eprintln!(
        "campaign seed {seed}: done in {:.0} s (final resubmission {:.0} s); status named {} failed stage(s); \
         all tables equal the clean run",
        started.elapsed().as_secs_f64(),
        final_secs,
        report.failed_cells
    );
    report
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn a_grid_survives_a_seeded_fault_campaign() {
    let Some(guard) = cluster() else { return };
    let c = guard.as_ref().unwrap();
    let (seeds, first) = (
        env_u64("PIPELINE_CAMPAIGN_SEEDS", 5),
        env_u64("PIPELINE_CAMPAIGN_SEED", 1),
    );
    let staging = Staging::mount();
    if staging.is_none() {
        eprintln!("campaign: cannot mount a tmpfs (not root?): no full-disk faults");
    }
    let tl = TestLake::new();
    let exp = micro_experiment(&tl);

    // The clean run: the reference, and the window the faults fall in.
    let started = Instant::now();
    let clean = Grid::new(c, "clean", &exp, staging.as_ref());
    let o = clean.submit(&["wait=true"]);
    assert!(o.status.success(), "the clean run failed: {}", text(&o));
    let window = started.elapsed();
    let reference = clean.results();
    eprintln!("campaign: the clean run took {:.0} s", window.as_secs_f64());

    let mut total = SeedReport::default();
    for seed in first..first + seeds {
        let r = run_seed(c, seed, &exp, staging.as_ref(), window, &reference);
        for (k, n) in r.injected {
            *total.injected.entry(k).or_default() += n;
        }
        total.idle += r.idle;
        total.failed_cells += r.failed_cells;
    }
    let n: usize = total.injected.values().sum();
    eprintln!(
        "campaign: {seeds} seeds, {n} faults ({}), {} without a target; all survived, 0 rows lost, \
         status named {} failed stages",
        total
            .injected
            .iter()
            .map(|(k, n)| format!("{n} {}", k.name()))
            .collect::<Vec<_>>()
            .join(", "),
        total.idle,
        total.failed_cells
    );
}
