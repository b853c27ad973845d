//! Running a study on a scheduler: the experiment's steps become a DAG of
//! jobs, each task a plain `pipeline run stage=...` against the shared lake,
//! submitted with dependencies the scheduler enforces (no driver polls for
//! them). [`Executor`] is the seam for schedulers; [`Slurm`] drives SLURM.
//!
//! The DAG (only what is not up to date in the lake, found with
//! [`crate::stages::plan`]):
//! - `data`: ingest, tokenize, pack, vocab in one job;
//! - `train`: an array over the grid's models (afterok data);
//! - `eval`: an array over the models, task i after train task i (aftercorr);
//! - per model: `collect` as an array of `collect_shards` tasks (afterok that
//!   model's train task), `merge` (afterok collect), `decide` (afterok merge),
//!   `analyze` (afterok decide);
//! - `correlate` after every analyze and eval, `report` after correlate.
//!
//! Re-submitting is idempotent: finished work is left out, so after a
//! cancelled task only the missing work runs again; a task the scheduler
//! requeues resumes from its checkpoint (collect, train) and takes over its
//! own lease. Dependent jobs of a failed one are cancelled
//! (`--kill-on-invalid-dep`), and `wait=true` names what failed, with its
//! job id and log.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;

use super::AllArgs;
use crate::error::{Context, Error, Result};
use crate::experiment::{Experiment, Step, Steps};
use crate::stages::{self, Ctx, PlanStatus};

/// How a job waits for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepKind {
    /// The whole other job succeeded (`afterok`).
    AfterOk,
    /// Task i of an array waits for task i of the other array (`aftercorr`).
    AfterCorr,
}

/// A dependency on job `job` (an index into the DAG), or on one task of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Dep {
    pub job: usize,
    pub task: Option<usize>,
    pub kind: DepKind,
}

/// One scheduler job: a single task or an array of tasks, each running its
/// steps in order.
#[derive(Debug, Clone)]
pub struct Job {
    /// Unique in the DAG, e.g. `train`, `collect.01x0064_01d00`.
    pub name: String,
    /// Which step's scheduler options apply (`data`, `train`, `collect`...).
    pub kind: &'static str,
    /// Array task index -> steps; a single job has one task, index 0.
    pub tasks: BTreeMap<usize, Vec<Step>>,
    pub array: bool,
    pub deps: Vec<Dep>,
}

/// The jobs of a study, in submission order (dependencies come first).
#[derive(Debug, Default)]
pub struct Dag {
    pub jobs: Vec<Job>,
    /// What was up to date and left out, as (what, why) for the summary.
    pub skipped: Vec<String>,
}

impl Dag {
    fn add(&mut self, job: Job) -> usize {
        self.jobs.push(job);
        self.jobs.len() - 1
    }
}

fn todo(ctx: &Ctx, s: &Step) -> Result<bool> {
    Ok(matches!(
        stages::plan(ctx, s.stage, &s.params)?,
        PlanStatus::ToDo(_)
    ))
}

/// The DAG of what is not up to date.
pub fn plan_dag(ctx: &Ctx, steps: &Steps, shards: u64) -> Result<Dag> {
    let mut dag = Dag::default();
    let mut data_todo = Vec::new();
    for s in &steps.data {
        if todo(ctx, s)? {
            data_todo.push(s.clone());
        }
    }
    let data = (!data_todo.is_empty()).then(|| {
        dag.add(Job {
            name: "data".into(),
            kind: "data",
            tasks: BTreeMap::from([(0, data_todo)]),
            array: false,
            deps: Vec::new(),
        })
    });
    if data.is_none() {
        dag.skipped.push(format!("data ({}): up to date", steps.dataset));
    }
    let after_data: Vec<Dep> = data
        .map(|j| Dep {
            job: j,
            task: None,
            kind: DepKind::AfterOk,
        })
        .into_iter()
        .collect();

    // Train and eval: arrays over the models, task i = model i.
    let mut train_tasks = BTreeMap::new();
    let mut eval_tasks = BTreeMap::new();
    for (i, m) in steps.models.iter().enumerate() {
        if todo(ctx, &m.train)? {
            train_tasks.insert(i, vec![m.train.clone()]);
        }
        if todo(ctx, &m.eval)? {
            eval_tasks.insert(i, vec![m.eval.clone()]);
        }
    }
    let trained_now: Vec<usize> = train_tasks.keys().copied().collect();
    let train = (!train_tasks.is_empty()).then(|| {
        dag.add(Job {
            name: "train".into(),
            kind: "train",
            tasks: train_tasks,
            array: true,
            deps: after_data.clone(),
        })
    });
    // The train task a model's later steps wait for, if it runs now.
    let after_train = |i: usize| -> Vec<Dep> {
        match train {
            Some(t) if trained_now.contains(&i) => vec![Dep {
                job: t,
                task: Some(i),
                kind: DepKind::AfterOk,
            }],
            _ => after_data.clone(),
        }
    };
    let mut finals = Vec::new();
    if !eval_tasks.is_empty() {
        // Task i waits for train task i (SLURM starts a task whose
        // counterpart does not exist: its model is trained already).
        let deps = match train {
            Some(t) => vec![Dep {
                job: t,
                task: None,
                kind: DepKind::AfterCorr,
            }],
            None => after_data.clone(),
        };
        finals.push(dag.add(Job {
            name: "eval".into(),
            kind: "eval",
            tasks: eval_tasks,
            array: true,
            deps,
        }));
    }

    for (i, m) in steps.models.iter().enumerate() {
        let mut deps = after_train(i);
        // Once an earlier step of this model runs again, every later one must.
        let mut upstream = trained_now.contains(&i);
        let mut merged = m.collect.params.clone();
        merged.retain(|k, _| ["model", "dataset", "split", "layers", "force"].contains(&k.as_str()));
        merged.insert("shards".into(), shards.to_string());
        let merge = Step {
            stage: "merge",
            params: merged,
        };
        let whole = if shards <= 1 { &m.collect } else { &merge };
        if upstream || todo(ctx, whole)? {
            upstream = true;
            if shards <= 1 {
                let j = dag.add(Job {
                    name: format!("collect.{}", m.name),
                    kind: "collect",
                    tasks: BTreeMap::from([(0, vec![m.collect.clone()])]),
                    array: false,
                    deps: deps.clone(),
                });
                deps = vec![after(j)];
            } else {
                let mut tasks = BTreeMap::new();
                for k in 0..shards {
                    let mut s = m.collect.clone();
                    s.params.insert("shard".into(), format!("{k}/{shards}"));
                    if trained_now.contains(&i) || todo(ctx, &s)? {
                        tasks.insert(k as usize, vec![s]);
                    }
                }
                if !tasks.is_empty() {
                    let j = dag.add(Job {
                        name: format!("collect.{}", m.name),
                        kind: "collect",
                        tasks,
                        array: true,
                        deps: deps.clone(),
                    });
                    deps = vec![after(j)];
                }
                let j = dag.add(Job {
                    name: format!("merge.{}", m.name),
                    kind: "merge",
                    tasks: BTreeMap::from([(0, vec![merge])]),
                    array: false,
                    deps: deps.clone(),
                });
                deps = vec![after(j)];
            }
        } else {
            dag.skipped.push(format!("collect {}: up to date", m.name));
        }
        for (kind, s) in [("decide", &m.decide), ("analyze", &m.analyze)] {
            if upstream || todo(ctx, s)? {
                upstream = true;
                let j = dag.add(Job {
                    name: format!("{kind}.{}", m.name),
                    kind,
                    tasks: BTreeMap::from([(0, vec![s.clone()])]),
                    array: false,
                    deps: deps.clone(),
                });
                deps = vec![after(j)];
            } else {
                dag.skipped.push(format!("{kind} {}: up to date", m.name));
            }
        }
        finals.extend(deps.iter().map(|d| d.job));
    }
    if !dag.jobs.is_empty() || todo(ctx, &steps.correlate)? || todo(ctx, &steps.report)? {
        let deps: Vec<Dep> = {
            let mut f = finals.clone();
            f.sort_unstable();
            f.dedup();
            f.into_iter().map(after).collect()
        };
        let c = dag.add(Job {
            name: "correlate".into(),
            kind: "correlate",
            tasks: BTreeMap::from([(0, vec![steps.correlate.clone()])]),
            array: false,
            deps,
        });
        dag.add(Job {
            name: "report".into(),
            kind: "report",
            tasks: BTreeMap::from([(0, vec![steps.report.clone()])]),
            array: false,
            deps: vec![after(c)],
        });
    }
    Ok(dag)
}

fn after(job: usize) -> Dep {
    Dep {
        job,
        task: None,
        kind: DepKind::AfterOk,
    }
}

/// A scheduler that runs a DAG of jobs.
pub trait Executor {
    /// Refuse, before anything is submitted, what cannot work.
    fn check(&self, dag: &Dag) -> Result<()>;
    /// Submit every job; returns each job's scheduler id, in DAG order.
    fn submit(&self, dag: &Dag) -> Result<Vec<String>>;
    /// Block until every job has finished; the failed tasks as text.
    fn wait(&self, dag: &Dag, ids: &[String]) -> Result<Vec<String>>;
}

/// Settings of a SLURM run.
#[derive(Debug, Clone)]
pub struct SlurmOptions {
    pub lake: String,
    pub binary: String,
    pub log_dir: std::path::PathBuf,
    pub experiment: String,
    pub shards: u64,
    /// Options for every job, and added per step kind.
    pub args: String,
    pub per_step: BTreeMap<String, String>,
    pub dry_run: bool,
    pub wait: bool,
}

impl SlurmOptions {
    pub fn new(a: &AllArgs, exp: &Experiment) -> Result<Self> {
        let binary = match a.binary {
            Some(b) => b.to_string(),
            None => std::env::current_exe()
                .ctx("locating the pipeline binary")?
                .to_string_lossy()
                .to_string(),
        };
        let name = std::path::Path::new(a.experiment)
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "study".into());
        let log_dir = match a.log_dir {
            Some(d) => std::path::PathBuf::from(d),
            None => std::env::current_dir()
                .ctx("working directory")?
                .join("slurm-logs")
                .join(&name),
        };
        let mut per_step: BTreeMap<String, String> = crate::experiment::pairs(&exp.slurm);
        let mut args = per_step.remove("args").unwrap_or_default();
        if let Some(extra) = a.slurm_args {
            args = format!("{args} {extra}");
        }
        Ok(SlurmOptions {
            lake: String::new(),
            binary,
            log_dir: std::path::absolute(log_dir).ctx("log_dir")?,
            experiment: name,
            shards: a.collect_shards,
            args,
            per_step,
            dry_run: a.dry_run,
            wait: a.wait,
        })
    }
}

/// SLURM, through `sbatch`, `squeue` and `scontrol`.
pub struct Slurm {
    pub opts: SlurmOptions,
}

/// A string as one shell word.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-=:,@+%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A string as one argument of an `#SBATCH` line, which sbatch reads, not
/// the shell: double quotes group characters and a backslash escapes the
/// next one, quotes and backslashes included.
fn sbatch_quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// Refuses what no job script line can carry: every value is quoted as data
/// ([`quote`], [`sbatch_quote`]), but a control character (a newline ends
/// an `#SBATCH` line or splits a quoted word across the script's case arms)
/// cannot be, nor a `%` or a backslash in the log directory: SLURM expands
/// `%` in log file names, and a backslash turns that off and is dropped (the
/// job then fails to launch, its log directory missing).
fn check_script_values(opts: &SlurmOptions, dag: &Dag) -> Result<()> {
    let check = |what: &str, v: &str| -> Result<()> {
        match v.chars().find(|c| c.is_control()) {
            Some(c) => Err(Error::invalid(format!(
                "executor=slurm: {what} = {v:?} holds the control character {c:?}, which a job script cannot carry; remove it"
            ))),
            None => Ok(()),
        }
    };
    check("the lake", &opts.lake)?;
    check("binary", &opts.binary)?;
    check("the experiment's file name", &opts.experiment)?;
    let log_dir = opts.log_dir.to_str().ok_or_else(|| {
        Error::invalid(format!(
            "executor=slurm: log_dir {} is not UTF-8, which a job script cannot name",
            opts.log_dir.display()
        ))
    })?;
    check("log_dir", log_dir)?;
    if let Some(c) = log_dir.chars().find(|c| matches!(c, '%' | '\\')) {
        return Err(Error::invalid(format!(
            "executor=slurm: log_dir = {log_dir:?} holds a {c:?}, which SLURM reads in log file names as a pattern or its escape; choose another directory"
        )));
    }
    for word in opts.args.split_whitespace() {
        check("slurm_args", word)?;
    }
    for (kind, args) in &opts.per_step {
        for word in args.split_whitespace() {
            check(&format!("[slurm] {kind}"), word)?;
        }
    }
    for job in &dag.jobs {
        for step in job.tasks.values().flatten() {
            for (k, v) in &step.params {
                check(&format!("{}'s parameter name", step.stage), k)?;
                check(&format!("{}'s {k}", step.stage), v)?;
            }
        }
    }
    Ok(())
}

impl Slurm {
    fn job_name(&self, job: &Job) -> String {
        format!("nc-{}-{}", self.opts.experiment, job.name)
    }

    fn log_pattern(&self, job: &Job) -> std::path::PathBuf {
        let file = if job.array {
            format!("{}-%A_%a.out", job.name)
        } else {
            format!("{}-%j.out", job.name)
        };
        self.opts.log_dir.join(file)
    }

    /// The batch script of a job.
    pub fn script(&self, job: &Job) -> String {
        let mut s = String::from("#!/bin/bash\n");
        let _ = writeln!(s, "#SBATCH --job-name={}", sbatch_quote(&self.job_name(job)));
        let _ = writeln!(
            s,
            "#SBATCH --output={}",
            sbatch_quote(&self.log_pattern(job).to_string_lossy())
        );
        s.push_str("#SBATCH --open-mode=append\n#SBATCH --requeue\n#SBATCH --kill-on-invalid-dep=yes\n");
        if job.array {
            let ids: Vec<String> = job.tasks.keys().map(|k| k.to_string()).collect();
            let _ = writeln!(s, "#SBATCH --array={}", ids.join(","));
        }
        for a in [
            &self.opts.args,
            self.opts.per_step.get(job.kind).unwrap_or(&String::new()),
        ] {
            for word in a.split_whitespace() {
                let _ = writeln!(s, "#SBATCH {word}");
            }
        }
        s.push_str("set -euo pipefail\n");
        let _ = writeln!(s, "export PIPELINE_LAKE={}", quote(&self.opts.lake));
        let _ = writeln!(s, "PIPELINE={}", quote(&self.opts.binary));
        let run = |steps: &[Step]| -> String {
            steps
                .iter()
                .map(|st| {
                    let mut w = vec![
                        "\"$PIPELINE\"".to_string(),
                        "run".into(),
                        format!("stage={}", st.stage),
                    ];
                    w.extend(st.params.iter().map(|(k, v)| quote(&format!("{k}={v}"))));
                    w.join(" ")
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        if job.array {
            s.push_str("case \"$SLURM_ARRAY_TASK_ID\" in\n");
            for (k, steps) in &job.tasks {
                let _ = writeln!(s, "  {k})\n{}\n    ;;", indent(&run(steps), "    "));
            }
            s.push_str("  *) echo \"no task $SLURM_ARRAY_TASK_ID in this job\" >&2; exit 2 ;;\nesac\n");
        } else {
            let steps = job.tasks.values().next().cloned().unwrap_or_default();
            let _ = writeln!(s, "{}", run(&steps));
        }
        s
    }

    fn dependency(&self, job: &Job, ids: &[String]) -> Option<String> {
        let mut ok = Vec::new();
        let mut corr = Vec::new();
        for d in &job.deps {
            let id = match d.task {
                Some(t) => format!("{}_{t}", ids[d.job]),
                None => ids[d.job].clone(),
            };
            match d.kind {
                DepKind::AfterOk => ok.push(id),
                DepKind::AfterCorr => corr.push(id),
            }
        }
        ok.dedup();
        let mut parts = Vec::new();
        if !ok.is_empty() {
            parts.push(format!("afterok:{}", ok.join(":")));
        }
        if !corr.is_empty() {
            parts.push(format!("aftercorr:{}", corr.join(":")));
        }
        (!parts.is_empty()).then(|| parts.join(","))
    }

    fn script_file(&self, job: &Job) -> Result<std::path::PathBuf> {
        std::fs::create_dir_all(&self.opts.log_dir).ctx(self.opts.log_dir.display())?;
        let path = self.opts.log_dir.join(format!("{}.sbatch", job.name));
        std::fs::write(&path, self.script(job)).ctx(path.display())?;
        Ok(path)
    }
}

fn indent(text: &str, pad: &str) -> String {
    text.lines()
        .map(|l| format!("{pad}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn run_tool(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| Error::invalid(format!("{what}: cannot run it ({e}); is SLURM installed here?")))?;
    if !out.status.success() {
        return Err(Error::invalid(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

impl Executor for Slurm {
    fn check(&self, dag: &Dag) -> Result<()> {
        if !on_path("sbatch") {
            return Err(Error::invalid(
                "executor=slurm needs sbatch on PATH: run this on a SLURM login node (or use executor=local)",
            ));
        }
        let bin = std::path::Path::new(&self.opts.binary);
        if !bin.is_absolute() || !bin.is_file() {
            return Err(Error::invalid(format!(
                "binary={}: not an absolute path to the pipeline binary",
                self.opts.binary
            )));
        }
        // The cluster must accept the jobs as written: sbatch --test-only
        // checks the options (partition, account, limits) without submitting.
        if let Some(job) = dag.jobs.first() {
            let path = self.script_file(job)?;
            run_tool(
                Command::new("sbatch").arg("--test-only").arg(&path),
                "sbatch --test-only (the cluster refuses the job)",
            )?;
        }
        Ok(())
    }

    fn submit(&self, dag: &Dag) -> Result<Vec<String>> {
        let mut ids: Vec<String> = Vec::new();
        for job in &dag.jobs {
            let path = self.script_file(job)?;
            let mut cmd = Command::new("sbatch");
            cmd.arg("--parsable");
            if let Some(dep) = self.dependency(job, &ids) {
                cmd.arg(format!("--dependency={dep}"));
            }
            let out = run_tool(cmd.arg(&path), &format!("sbatch {}", path.display()))?;
            let id = out.trim().split(';').next().unwrap_or("").to_string();
            if id.is_empty() {
                return Err(Error::invalid(format!(
                    "sbatch printed no job id for {}",
                    job.name
                )));
            }
            tracing::info!("submitted {} as job {id}", job.name);
            ids.push(id);
        }
        Ok(ids)
    }

    fn wait(&self, dag: &Dag, ids: &[String]) -> Result<Vec<String>> {
        let list = ids.join(",");
        loop {
            let out = run_tool(
                Command::new("squeue").args(["-h", "-r", "-o", "%i", "-j", &list]),
                "squeue",
            )?;
            if out.trim().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        let mut failed = Vec::new();
        for (job, id) in dag.jobs.iter().zip(ids) {
            let out = run_tool(
                Command::new("scontrol").args(["show", "job", "-o", id]),
                "scontrol show job",
            )?;
            for line in out.lines() {
                let field = |k: &str| {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(&format!("{k}=")))
                        .unwrap_or("")
                        .to_string()
                };
                let state = field("JobState");
                if state == "COMPLETED" {
                    continue;
                }
                let task = field("ArrayTaskId");
                let jid = if task.is_empty() {
                    id.clone()
                } else {
                    format!("{id}_{task}")
                };
                let what = match job.tasks.get(&task.parse::<usize>().unwrap_or(0)) {
                    Some(steps) => steps
                        .iter()
                        .map(|s| {
                            format!(
                                "{}{}",
                                s.stage,
                                s.params.get("model").map(|m| format!(" {m}")).unwrap_or_default()
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    None => job.name.clone(),
                };
                failed.push(format!(
                    "{what}: job {jid} {state} ({}); log {}",
                    field("Reason"),
                    field("StdOut")
                ));
            }
        }
        Ok(failed)
    }
}

/// Submit a study to SLURM (see the module documentation).
pub fn slurm(ctx: &Ctx, steps: &Steps, opts: &SlurmOptions) -> Result<String> {
    let lake_url = ctx.lake.given_url();
    if lake_url.starts_with("memory://") {
        return Err(Error::invalid(
            "executor=slurm needs a lake every node sees, not memory://",
        ));
    }
    if !lake_url.contains("://") && !std::path::Path::new(lake_url).is_absolute() {
        return Err(Error::invalid(format!(
            "executor=slurm: the lake '{lake_url}' is a relative path, which the nodes would resolve in other directories; give s3://... or an absolute path on a filesystem every node mounts"
        )));
    }
    let mut opts = opts.clone();
    opts.lake = ctx.lake.url().to_string();
    // Claims that killed jobs of earlier submissions left behind go first.
    if !opts.dry_run && !ctx.plan_only {
        lc_lake::lease::sweep(&ctx.lake)?;
    }
    let exec = Slurm { opts: opts.clone() };
    let dag = plan_dag(ctx, steps, opts.shards)?;
    check_script_values(&opts, &dag)?;
    let mut text = String::new();
    for s in &dag.skipped {
        let _ = writeln!(text, "{s}");
    }
    if dag.jobs.is_empty() {
        let _ = writeln!(text, "everything is up to date: nothing to submit");
        return Ok(text);
    }
    let names: Vec<String> = dag.jobs.iter().map(|j| j.name.clone()).collect();
    if opts.dry_run {
        for (i, job) in dag.jobs.iter().enumerate() {
            let deps: Vec<String> = job
                .deps
                .iter()
                .map(|d| {
                    let kind = match d.kind {
                        DepKind::AfterOk => "afterok",
                        DepKind::AfterCorr => "aftercorr",
                    };
                    match d.task {
                        Some(t) => format!("{kind}:{}[{t}]", names[d.job]),
                        None => format!("{kind}:{}", names[d.job]),
                    }
                })
                .collect();
            let _ = writeln!(
                text,
                "=== job {i}: {} ({} task(s)) depends on [{}]\n{}",
                job.name,
                job.tasks.len(),
                deps.join(", "),
                exec.script(job)
            );
        }
        let _ = writeln!(text, "dry run: {} job(s) not submitted", dag.jobs.len());
        return Ok(text);
    }
    exec.check(&dag)?;
    let ids = exec.submit(&dag)?;
    // Kept in the lake for `pipeline status`.
    let record: Vec<serde_json::Value> = dag
        .jobs
        .iter()
        .zip(&ids)
        .map(|(j, id)| {
            serde_json::json!({
                "name": j.name,
                "id": id,
                "array": j.array,
                "tasks": j.tasks.iter().map(|(k, s)| (k.to_string(), s.iter().map(|st| st.stage).collect::<Vec<_>>())).collect::<BTreeMap<_, _>>(),
                "steps": j.tasks.iter().map(|(k, s)| (k.to_string(), s.iter().map(Step::label).collect::<Vec<_>>())).collect::<BTreeMap<_, _>>(),
            })
        })
        .collect();
    let key = format!(
        "_runs/{}/{}.json",
        opts.experiment,
        chrono::Utc::now().format("%Y%m%dT%H%M%S")
    );
    ctx.lake.put(
        &key,
        Bytes::from(serde_json::to_vec_pretty(&record).expect("json")),
    )?;
    for (n, id) in names.iter().zip(&ids) {
        let _ = writeln!(text, "submitted {n}: job {id}");
    }
    let _ = writeln!(text, "logs: {}", opts.log_dir.display());
    if opts.wait {
        let failed = exec.wait(&dag, &ids)?;
        if !failed.is_empty() {
            return Err(Error::invalid(format!(
                "{} task(s) failed:\n  {}",
                failed.len(),
                failed.join("\n  ")
            )));
        }
        let _ = writeln!(text, "every job finished");
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Values a shared experiment file or a careless path may hold.
    const HOSTILE: &[&str] = &[
        "two words",
        "it's",
        "\"double\"",
        "$(touch canary)",
        "`touch canary`",
        "x; touch canary",
        "a|b&c>d<e",
        "#not a comment",
        "back\\slash",
        "*",
        "~",
        "!!",
        "${HOME}",
        "-n",
        "",
    ];

    fn options(dir: &Path, binary: &Path) -> SlurmOptions {
        SlurmOptions {
            lake: "/lake $(touch canary) 'q' `touch canary`".into(),
            binary: binary.to_string_lossy().into_owned(),
            log_dir: dir.join("logs \"x\" 'y' $(touch canary)"),
            experiment: "exp $(touch canary) 'q'".into(),
            shards: 1,
            args: String::new(),
            per_step: BTreeMap::new(),
            dry_run: false,
            wait: false,
        }
    }

    fn train_job(params: BTreeMap<String, String>) -> Job {
        let step = Step {
            stage: "train",
            params,
        };
        Job {
            name: "train".into(),
            kind: "train",
            tasks: BTreeMap::from([(0, vec![step.clone()]), (1, vec![step])]),
            array: true,
            deps: Vec::new(),
        }
    }

    fn files_named(dir: &Path, name: &str) -> Vec<std::path::PathBuf> {
        let mut found = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                found.extend(files_named(&p, name));
            } else if e.file_name() == name {
                found.push(p);
            }
        }
        found
    }

    /// Every hostile value reaches the pipeline binary as one argument, byte
    /// for byte, and nothing in it runs. bash executes the job script itself
    /// (each array task), with a stand-in for the binary that records its
    /// arguments: what the shell does with the script needs no SLURM; the
    /// `#SBATCH` lines go through a real sbatch in the SLURM tests.
    #[test]
    fn hostile_values_reach_the_binary_as_data() {
        let dir = tempfile::tempdir().unwrap();
        let bin_dir = dir.path().join("bin 'dir' $(touch canary)");
        std::fs::create_dir_all(&bin_dir).unwrap();
        let bin = bin_dir.join("fake pipeline");
        std::fs::write(
            &bin,
            "#!/bin/sh\nfor a in \"$@\" \"$PIPELINE_LAKE\"; do printf '%s\\0' \"$a\"; done >> \"$ARGS_OUT\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let params: BTreeMap<String, String> = HOSTILE
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("k{i:02}"), v.to_string()))
            .collect();
        let job = train_job(params.clone());
        let opts = options(dir.path(), &bin);
        let dag = Dag {
            jobs: vec![train_job(params.clone())],
            ..Default::default()
        };
        check_script_values(&opts, &dag).unwrap();
        let slurm = Slurm { opts: opts.clone() };
        let script = dir.path().join("job.sbatch");
        std::fs::write(&script, slurm.script(&job)).unwrap();
        let mut expected = vec!["run".to_string(), "stage=train".into()];
        expected.extend(params.iter().map(|(k, v)| format!("{k}={v}")));
        expected.push(opts.lake.clone());
        for task in ["0", "1"] {
            let args_out = dir.path().join(format!("args-{task}"));
            let out = Command::new("bash")
                .arg(&script)
                .current_dir(dir.path())
                .env("SLURM_ARRAY_TASK_ID", task)
                .env("ARGS_OUT", &args_out)
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let got = std::fs::read_to_string(&args_out).unwrap();
            let got: Vec<&str> = got.strip_suffix('\0').unwrap().split('\0').collect();
            assert_eq!(got, expected, "task {task}");
        }
        assert_eq!(
            files_named(dir.path(), "canary"),
            Vec::<std::path::PathBuf>::new()
        );
        // sbatch reads these lines: double quotes, backslash escapes.
        let text = slurm.script(&job);
        assert!(
            text.contains("#SBATCH --job-name=\"nc-exp $(touch canary) 'q'-train\"\n"),
            "{text}"
        );
        let log = opts
            .log_dir
            .join("train-%A_%a.out")
            .to_string_lossy()
            .replace('"', "\\\"");
        assert!(text.contains(&format!("#SBATCH --output=\"{log}\"\n")), "{text}");
    }

    /// What no script line can carry is refused, naming where it came from.
    #[test]
    fn values_no_script_can_carry_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("pipeline");
        let refused = |opts: &SlurmOptions, params: &[(&str, &str)]| -> String {
            let params = params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let dag = Dag {
                jobs: vec![train_job(params)],
                ..Default::default()
            };
            check_script_values(opts, &dag).unwrap_err().to_string()
        };
        let opts = options(dir.path(), &bin);
        let e = refused(&opts, &[("dataset", "a\nrm -rf ~")]);
        assert!(e.contains("train's dataset") && e.contains("'\\n'"), "{e}");
        let e = refused(&opts, &[("dataset\r", "a")]);
        assert!(e.contains("train's parameter name"), "{e}");
        let mut o = opts.clone();
        o.log_dir = dir.path().join("logs-%j");
        assert!(refused(&o, &[]).contains("log_dir"));
        o.log_dir = dir.path().join("logs\\x");
        assert!(refused(&o, &[]).contains("log_dir"));
        let mut o = opts.clone();
        o.args = "--time=1:00 --comment=a\u{1b}b".into();
        assert!(refused(&o, &[]).contains("slurm_args"));
        let mut o = opts.clone();
        o.per_step.insert("collect".into(), "--mem=1G\u{0}".into());
        assert!(refused(&o, &[]).contains("[slurm] collect"));
        let mut o = opts;
        o.experiment = "a\nb".into();
        assert!(refused(&o, &[]).contains("experiment"));
    }
}
