//! The study on a real single-node SLURM cluster (Debian's slurm-wlm and
//! munge, started here on 127.0.0.1 with private ports) over a real S3 lake
//! (s3s-fs). `.ci/run` installs the packages; without them these tests say
//! so and skip, except under CI, where a missing cluster is a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::common::{TestLake, bin, data, first_stories};
use crate::s3::{KEY, SECRET, Server, start};

pub struct Cluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
    _daemons: Vec<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn have(tool: &str) -> bool {
    Command::new("which")
        .arg(tool)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Start a daemon that dies with the test process. The parent-death
/// signal fires when the spawning *thread* ends, so daemons are spawned
/// from a thread that lives as long as the process.
fn spawn_daemon(mut cmd: Command) -> Child {
    use std::os::unix::process::CommandExt;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        tx.send(child).unwrap();
        loop {
            std::thread::park();
        }
    });
    rx.recv().unwrap()
}

impl Cluster {
    fn start() -> Option<Cluster> {
        if !(have("slurmctld") && have("slurmd") && have("sbatch") && have("munged")) {
            assert!(
                std::env::var("CI").is_err(),
                "SLURM (slurm-wlm, munge) is not installed, and CI never skips: .ci/run installs it"
            );
            eprintln!("SKIPPED: SLURM is not installed (apt-get install slurm-wlm munge; .ci/run does this)");
            return None;
        }
        // munged, as the munge user, with the key the package made.
        let running = Command::new("pgrep")
            .args(["-x", "munged"])
            .output()
            .unwrap()
            .status
            .success();
        if !running {
            std::fs::create_dir_all("/run/munge").unwrap();
            Command::new("chown")
                .args(["munge:munge", "/run/munge"])
                .status()
                .unwrap();
            let st = Command::new("runuser")
                .args(["-u", "munge", "--", "/usr/sbin/munged"])
                .status()
                .unwrap();
            assert!(st.success(), "munged did not start");
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["state", "spool", "log"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap()
            .trim()
            .to_string();
        let conf = d.join("slurm.conf");
        let text = format!(
            "ClusterName=pipetest\nSlurmctldHost={host}(127.0.0.1)\nSlurmUser=root\nSlurmdUser=root\n\
             SlurmctldPort={}\nSlurmdPort={}\nAuthType=auth/munge\nStateSaveLocation={d}/state\n\
             SlurmdSpoolDir={d}/spool\nSlurmctldPidFile={d}/ctld.pid\nSlurmdPidFile={d}/d.pid\n\
             SlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd.log\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nSelectType=select/cons_tres\n\
             SelectTypeParameters=CR_Core\nSchedulerType=sched/builtin\nMpiDefault=none\nReturnToService=2\n\
             JobCompType=jobcomp/none\nAccountingStorageType=accounting_storage/none\nMinJobAge=600\n\
             NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN\n\
             PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8\n",
            free_port(),
            free_port(),
            d = d.display()
        );
        std::fs::write(&conf, text).unwrap();
        let mut ctld = Command::new("slurmctld");
        ctld.args(["-c", "-D", "-f"]).arg(&conf);
        let mut slurmd = Command::new("slurmd");
        slurmd.args(["-D", "-N", &host, "-f"]).arg(&conf);
        let (ctld, slurmd) = (spawn_daemon(ctld), spawn_daemon(slurmd));
        let c = Cluster {
            dir,
            conf,
            _daemons: vec![ctld, slurmd],
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = c.tool("sinfo", &["-h", "-o", "%T"]);
            if String::from_utf8_lossy(&out.stdout).contains("idle") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the SLURM node never became idle: {out:?}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        Some(c)
    }

    pub fn env(&self, cmd: &mut Command) {
        cmd.env("SLURM_CONF", &self.conf);
    }

    pub fn tool(&self, tool: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(tool);
        self.env(&mut cmd);
        cmd.args(args).output().unwrap()
    }

    pub fn log_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("jobs").join(name)
    }
}

/// The cluster, started once for every test that needs it; they take turns.
pub fn cluster() -> Option<MutexGuard<'static, Option<Cluster>>> {
    static C: OnceLock<Mutex<Option<Cluster>>> = OnceLock::new();
    let g = C
        .get_or_init(|| Mutex::new(Cluster::start()))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    g.is_some().then_some(g)
}

/// A tiny experiment of two models.
fn experiment(dir: &Path) -> String {
    let train = dir.join("train.txt");
    let val = dir.join("val.txt");
    std::fs::write(&train, first_stories(&data("tinystories_train_sample.txt"), 40)).unwrap();
    std::fs::write(&val, first_stories(&data("tinystories_val_sample.txt"), 10)).unwrap();
    let exp = dir.join("tiny.toml");
    std::fs::write(
        &exp,
        format!(
            "[data]\ndataset = \"c\"\ntrain = \"{}\"\nvalidation = \"{}\"\nT = 32\n\
             [train]\nlr = 0.01\nbatch = 8\ncontext = 64\nheads = 2\n\
             [grid]\ndepths = [1]\nwidths = [8, 16]\nepochs = [1]\n\
             [collect]\nbatch = 4\n[decide]\nbatch = 8\n[correlate]\npermutations = 100\n\
             [slurm]\nargs = \"--time=00:30:00\"\ncollect = \"--cpus-per-task=1\"\n",
            train.display(),
            val.display()
        ),
    )
    .unwrap();
    exp.to_string_lossy().to_string()
}

pub fn s3_env(cmd: &mut Command, server: &Server) {
    cmd.env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", server.port))
        .env("AWS_REGION", "us-east-1");
}

fn pipeline_slurm(c: &Cluster, server: &Server, lake: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin());
    c.env(&mut cmd);
    s3_env(&mut cmd, server);
    cmd.args(["--lake", lake, "-q"]).args(args).output().unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// model_metrics numbers of a lake, by (model, column).
pub fn metrics(o: &Output) -> Vec<(String, Vec<f64>)> {
    let s = String::from_utf8_lossy(&o.stdout);
    s.lines()
        .skip(1)
        .map(|l| {
            let mut f = l.split(',');
            let m = f.next().unwrap().to_string();
            (m, f.map(|x| x.parse::<f64>().unwrap_or(f64::NAN)).collect())
        })
        .collect()
}

pub const METRICS_SQL: &str = "SELECT model, nc1_cdnv, nc2_equinorm_cov, nc2_equiangular_cov, gnc2_uniformity_cov, \
     nc3_duality_mean, nc4_agreement, val_loss FROM model_metrics WHERE final_layer ORDER BY model";

/// The experiment through SLURM into an S3 lake, with collection in two
/// shards per model, equals the same experiment run in-process (relative
/// 1e-6: shards only change which chunks share a forward batch); a second
/// submission finds nothing to do; status shows the grid done.
#[test]
fn a_study_runs_through_slurm_into_s3() {
    let Some(guard) = cluster() else { return };
    let c = guard.as_ref().unwrap();
    let server = start("study");
    let work = tempfile::tempdir().unwrap();
    let exp = experiment(work.path());
    let lake = "s3://study/l";
    let exp_arg = format!("experiment={exp}");
    let logs_arg = format!("log_dir={}", c.log_dir("study").display());
    let run = |extra: &[&str]| {
        let base = [
            "run",
            "stage=all",
            exp_arg.as_str(),
            "executor=slurm",
            "collect_shards=2",
            logs_arg.as_str(),
        ];
        pipeline_slurm(c, &server, lake, &[&base[..], extra].concat())
    };
    // A dry run shows the jobs and their dependencies, submitting nothing.
    let dry = run(&["dry_run=true"]);
    let t = text(&dry);
    assert!(dry.status.success(), "{t}");
    for want in [
        "=== job 0: data",
        "train (2 task(s))",
        "aftercorr:train",
        "collect.01x0008_01n00 (2 task(s))",
        "#SBATCH --time=00:30:00",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --array=0,1",
        "dry run:",
    ] {
        assert!(t.contains(want), "{want} missing from\n{t}");
    }
    assert!(
        String::from_utf8_lossy(&c.tool("squeue", &["-h"]).stdout)
            .trim()
            .is_empty()
    );

    let out = run(&["wait=true"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("every job finished"), "{}", text(&out));
    let again = run(&[]);
    assert!(text(&again).contains("nothing to submit"), "{}", text(&again));
    let status = pipeline_slurm(c, &server, lake, &["status", &format!("experiment={exp}")]);
    let st = text(&status);
    assert!(st.contains("2 models x 5 stages: 10 done"), "{st}");

    // The same experiment in this process, on a local lake.
    let local = TestLake::new();
    local.run("all", &[("experiment", &exp)]);
    let mut q = Command::new(bin());
    let want = metrics(
        &q.args([
            "--lake",
            &local.url(),
            "-q",
            "sql",
            METRICS_SQL,
            "--format",
            "csv",
        ])
        .output()
        .unwrap(),
    );
    let got = metrics(&pipeline_slurm(
        c,
        &server,
        lake,
        &["sql", METRICS_SQL, "--format", "csv"],
    ));
    assert_eq!(got.len(), 2);
    assert_eq!(got.len(), want.len());
    for ((m, g), (wm, w)) in got.iter().zip(&want) {
        assert_eq!(m, wm);
        for (a, b) in g.iter().zip(w) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-12), "{m}: {a} vs {b}");
        }
    }
}

/// A cancelled collect task: its dependents are cancelled with it; the next
/// submission sends only the missing work, and the results come out whole.
#[test]
fn a_cancelled_task_is_resubmitted_alone() {
    let Some(guard) = cluster() else { return };
    let c = guard.as_ref().unwrap();
    let server = start("cancel");
    let work = tempfile::tempdir().unwrap();
    let exp = experiment(work.path());
    let lake = "s3://cancel/l";
    let logs = format!("log_dir={}", c.log_dir("cancel").display());
    let exp_arg = format!("experiment={exp}");
    let args = [
        "run",
        "stage=all",
        exp_arg.as_str(),
        "executor=slurm",
        "collect_shards=2",
        logs.as_str(),
    ];
    let out = pipeline_slurm(c, &server, lake, &args);
    assert!(out.status.success(), "{}", text(&out));
    // Cancel shard 1 of the second model's collection while it waits.
    let t = text(&out);
    let line = t
        .lines()
        .find(|l| l.starts_with("submitted collect.01x0016_01n00:"))
        .unwrap();
    let id = line.rsplit(' ').next().unwrap().trim();
    let cancel = c.tool("scancel", &[&format!("{id}_1")]);
    assert!(cancel.status.success(), "{cancel:?}");
    let deadline = Instant::now() + Duration::from_secs(600);
    while !String::from_utf8_lossy(&c.tool("squeue", &["-h"]).stdout)
        .trim()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "jobs never finished");
        std::thread::sleep(Duration::from_secs(1));
    }
    let status = text(&pipeline_slurm(
        c,
        &server,
        lake,
        &["status", &format!("experiment={exp}")],
    ));
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("01x0008_01n00") && !l.contains("missing")),
        "{status}"
    );
    // The cancelled task is named with its job and log, and what depended
    // on it as never run.
    for want in [
        format!("01x0016_01n00 collect: failed job {id}_1 cancelled before it ran"),
        "01x0016_01n00 decide: cancelled job ".to_string(),
        "01x0016_01n00 analyze: cancelled job ".to_string(),
    ] {
        assert!(status.contains(&want), "{want} missing from\n{status}");
    }
    // Resubmitted: only shard 1, the merge and what follows, for that model.
    let dry = text(&pipeline_slurm(
        c,
        &server,
        lake,
        &[&args[..], &["dry_run=true"]].concat(),
    ));
    assert!(
        dry.contains("collect.01x0016_01n00 (1 task(s))") && dry.contains("#SBATCH --array=1"),
        "{dry}"
    );
    for absent in [
        "=== job 0: data",
        ": train (",
        ": eval (",
        "collect.01x0008_01n00",
    ] {
        assert!(!dry.contains(absent), "{absent} resubmitted:\n{dry}");
    }
    let out = pipeline_slurm(c, &server, lake, &[&args[..], &["wait=true"]].concat());
    assert!(out.status.success(), "{}", text(&out));
    let status = text(&pipeline_slurm(
        c,
        &server,
        lake,
        &["status", &format!("experiment={exp}")],
    ));
    assert!(status.contains("10 done"), "{status}");
}

/// Refused before anything is submitted: no sbatch, a cluster that refuses
/// the job, a lake the nodes cannot find. A failing task is named with its
/// job id and log.
#[test]
fn bad_submissions_fail_clearly() {
    let Some(guard) = cluster() else { return };
    let c = guard.as_ref().unwrap();
    let work = tempfile::tempdir().unwrap();
    let exp = experiment(work.path());
    let logs = format!("log_dir={}", c.log_dir("bad").display());
    let exp_arg = format!("experiment={exp}");
    let base = [
        "run",
        "stage=all",
        exp_arg.as_str(),
        "executor=slurm",
        logs.as_str(),
    ];
    let lake = work.path().join("lake");
    let lake_s = lake.to_string_lossy().to_string();
    let run = |env_path: Option<&str>, lake: &str, extra: &[&str]| {
        let mut cmd = Command::new(bin());
        c.env(&mut cmd);
        if let Some(p) = env_path {
            cmd.env("PATH", p);
        }
        cmd.args(["--lake", lake, "-q"])
            .args(base)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(Some("/nonexistent"), &lake_s, &[]);
    assert!(
        !o.status.success() && text(&o).contains("needs sbatch on PATH"),
        "{}",
        text(&o)
    );
    let o = run(None, &lake_s, &["slurm_args=--partition=nosuchpartition"]);
    assert!(
        !o.status.success() && text(&o).contains("refuses the job"),
        "{}",
        text(&o)
    );
    let o = Command::new(bin())
        .current_dir(work.path())
        .env("SLURM_CONF", &c.conf)
        .args(["--lake", "relative-lake", "-q"])
        .args(base)
        .output()
        .unwrap();
    assert!(
        !o.status.success() && text(&o).contains("relative path"),
        "{}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&c.tool("squeue", &["-h"]).stdout)
            .trim()
            .is_empty()
    );
    // A corpus that vanishes after submission: the data job fails, the rest
    // is cancelled, and wait names the failure with its job and log.
    std::fs::write(work.path().join("train.txt"), "").unwrap();
    let o = run(None, &lake_s, &["wait=true"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("failed:") && t.contains("ingest") && t.contains("job ") && t.contains(".out"),
        "{t}"
    );
}

/// Two workers collecting the same model at once: the work is done once,
/// the second waits for the first's lease and finds it up to date.
#[test]
fn concurrent_collects_do_the_work_once() {
    let tl = crate::common::small_dataset(40, 10, 32);
    tl.run(
        "train",
        &[
            ("dataset", "small"),
            ("name", "conc"),
            ("depth", "1"),
            ("width", "8"),
            ("heads", "2"),
            ("context", "64"),
            ("lr", "0.01"),
        ],
    );
    let spawn = || {
        Command::new(bin())
            .args([
                "--lake",
                &tl.url(),
                "run",
                "stage=collect",
                "model=conc",
                "batch=1",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        text(&a),
        text(&b)
    );
    let outs = [
        String::from_utf8_lossy(&a.stdout).to_string(),
        String::from_utf8_lossy(&b.stdout).to_string(),
    ];
    assert_eq!(
        outs.iter().filter(|o| o.contains("up to date")).count(),
        1,
        "{outs:?}"
    );
    assert_eq!(
        outs.iter().filter(|o| o.contains("samples (")).count(),
        1,
        "{outs:?}"
    );
    let waited = [text(&a), text(&b)];
    assert!(
        waited.iter().any(|t| t.contains("waiting for its lease")),
        "{waited:?}"
    );
}

/// Names from many hands reach the jobs as data: an experiment file, its
/// corpora, the lake and the log directory all named with spaces, quotes,
/// `$(...)`, backticks and semicolons go through a dry run and a real
/// sbatch, the study finishes, its logs land where asked, and nothing in
/// the names ran (no `canary` file anywhere).
#[test]
fn hostile_names_travel_through_sbatch_as_data() {
    let Some(guard) = cluster() else { return };
    let c = guard.as_ref().unwrap();
    let work = tempfile::tempdir().unwrap();
    let hostile = work.path().join("it's a $(touch canary) `touch canary`; x");
    std::fs::create_dir_all(&hostile).unwrap();
    let plain = experiment(&hostile);
    let exp = hostile.join("tiny 'q' $(touch canary).toml");
    std::fs::rename(&plain, &exp).unwrap();
    let lake = hostile.join("lake $(touch canary)");
    let logs = c.log_dir("logs \"q\" 'r' $(touch canary)");
    let run = |extra: &str| {
        let mut cmd = Command::new(bin());
        c.env(&mut cmd);
        cmd.current_dir(work.path())
            .arg("--lake")
            .arg(&lake)
            .args(["-q", "run", "stage=all", "executor=slurm", extra])
            .arg(format!("experiment={}", exp.display()))
            .arg(format!("log_dir={}", logs.display()))
            .output()
            .unwrap()
    };
    // SLURM reads a backslash in a log path as an escape and drops it, so
    // the job could not open its log: refused before anything is submitted.
    let mut bad = Command::new(bin());
    c.env(&mut bad);
    let o = bad
        .current_dir(work.path())
        .arg("--lake")
        .arg(&lake)
        .args(["-q", "run", "stage=all", "executor=slurm", "dry_run=true"])
        .arg(format!("experiment={}", exp.display()))
        .arg(format!("log_dir={}", c.log_dir("back\\slash").display()))
        .output()
        .unwrap();
    assert!(
        !o.status.success() && text(&o).contains("log_dir"),
        "{}",
        text(&o)
    );
    let dry = run("dry_run=true");
    let t = text(&dry);
    assert!(dry.status.success(), "{t}");
    assert!(
        t.contains("#SBATCH --job-name=\"nc-tiny 'q' $(touch canary)-data\""),
        "{t}"
    );
    let out = run("wait=true");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("every job finished"), "{}", text(&out));
    let logs_written = std::fs::read_dir(&logs)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".out"))
        .count();
    assert!(logs_written >= 5, "{logs_written} job logs in {}", logs.display());
    let mut q = Command::new(bin());
    let rows = q
        .arg("--lake")
        .arg(&lake)
        .args([
            "-q",
            "sql",
            "SELECT count(*) AS n FROM model_metrics WHERE final_layer",
            "--format",
            "csv",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&rows.stdout).trim(),
        "n\n2",
        "{}",
        text(&rows)
    );
    fn canaries(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                found.extend(canaries(&p));
            } else if e.file_name() == "canary" {
                found.push(p);
            }
        }
        found
    }
    let mut found = canaries(work.path());
    found.extend(canaries(c.dir.path()));
    assert!(found.is_empty(), "{found:?}");
}
