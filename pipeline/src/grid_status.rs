//! `pipeline status experiment=FILE`: the grid as a table, model x stage,
//! each cell done / running / failed / queued / missing, for local and SLURM
//! runs alike (the paper's `analyze -prog` view).
//!
//! A cell is done when the stage, planned with the experiment's parameters,
//! is up to date ([`crate::stages::plan`]); running while a worker holds its
//! lease ([`lc_lake::lease`]); failed when its last run left a failure record;
//! queued when a SLURM job of the latest submission still waits for it;
//! failed, naming the job, its state and its log, when the job of the latest
//! submission that ran it ended without finishing (killed, cancelled, out of
//! time or memory, its node lost: nothing of it reached the lake), and
//! cancelled when that job never ran because one it depended on failed.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::error::Result;
use crate::experiment::{Experiment, Step};
use crate::params::Params;
use crate::stages::{self, Ctx, PlanStatus};

/// One cell's state and detail.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub state: &'static str,
    pub detail: String,
}

/// The output partition of a done step, for rows and time.
fn output(ctx: &Ctx, s: &Step) -> Option<lc_lake::manifest::Manifest> {
    let model = s.params.get("model");
    let find = |table: &str, under: String| -> Option<lc_lake::manifest::Manifest> {
        ctx.lake
            .manifests(table, &under)
            .ok()?
            .into_iter()
            .max_by(|a, b| a.created.cmp(&b.created))
    };
    let resolved = || {
        model.and_then(|m| {
            crate::checkpoint::ModelRef::resolve_one(&ctx.lake, m)
                .ok()
                .map(|r| r.id)
        })
    };
    match s.stage {
        "train" => find("train_log", format!("model={}", model?)),
        "eval" => find("models", format!("model={}", resolved()?)),
        "collect" => find("class_stats", format!("model={}", resolved()?)),
        "decide" => find("decisions", format!("model={}", resolved()?)),
        "analyze" => find("class_metrics", format!("model={}", resolved()?)),
        "ingest" => find("documents", format!("dataset={}", s.params.get("dataset")?)),
        "vocab" => find("vocab", format!("dataset={}", s.params.get("dataset")?)),
        _ => None,
    }
}

/// The state of one step; `ended` asks SLURM, only where the lake does not
/// tell.
pub fn cell(ctx: &Ctx, s: &Step, queued: bool, ended: impl FnOnce() -> Option<Cell>) -> Result<Cell> {
    let stage = stages::find(s.stage)?;
    let params = Params::resolve(s.stage, stage.params(), &ctx.config, &s.params)?;
    let key = stages::lease_name(s.stage, &params);
    if let Some(c) = lc_lake::lease::holder(&ctx.lake, &key)? {
        return Ok(Cell {
            state: "running",
            detail: c.owner,
        });
    }
    if let PlanStatus::Done = stages::plan(ctx, s.stage, &s.params)? {
        let detail = output(ctx, s)
            .map(|m| format!("{} rows, {}", m.rows, m.created.get(..16).unwrap_or(&m.created)))
            .unwrap_or_default();
        return Ok(Cell {
            state: "done",
            detail,
        });
    }
    if let Some(b) = ctx.lake.get_opt(&format!("{}/{key}.json", stages::FAILURES))? {
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
        let err = v.get("error").and_then(|e| e.as_str()).unwrap_or("").to_string();
        let job = v
            .get("job")
            .and_then(|j| j.as_str())
            .map(|j| format!("job {j}: "))
            .unwrap_or_default();
        return Ok(Cell {
            state: "failed",
            detail: format!("{job}{}", err.chars().take(80).collect::<String>()),
        });
    }
    if queued {
        return Ok(Cell {
            state: "queued",
            detail: String::new(),
        });
    }
    Ok(ended().unwrap_or(Cell {
        state: "missing",
        detail: String::new(),
    }))
}

/// What SLURM says of an experiment's submissions: the job names of the
/// latest one still waiting, and for each step (by [`Step::label`]) the job
/// tasks of the last submission that ran it (a collection's shards share
/// one label), from every submission's record in the lake.
#[derive(Default)]
struct Submitted {
    queued: Vec<String>,
    latest: BTreeMap<String, Vec<String>>,
}

impl Submitted {
    fn read(ctx: &Ctx, experiment: &str) -> Submitted {
        let mut out = Submitted::default();
        let Ok(runs) = ctx.lake.list(&format!("_runs/{experiment}")) else {
            return out;
        };
        // Oldest first (the keys are times), so later submissions win.
        let mut last_jobs = Vec::new();
        for (key, _) in &runs {
            let Ok(Some(bytes)) = ctx.lake.get_opt(key) else {
                continue;
            };
            let jobs: Vec<serde_json::Value> = serde_json::from_slice(&bytes).unwrap_or_default();
            last_jobs.clear();
            let mut this_run: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for j in &jobs {
                let (Some(id), Some(name)) = (j["id"].as_str(), j["name"].as_str()) else {
                    continue;
                };
                last_jobs.push((id.to_string(), name.to_string()));
                // Records made before steps were recorded name none; their
                // jobs still count as queued.
                let Some(tasks) = j["steps"].as_object() else {
                    continue;
                };
                let array = j["array"].as_bool().unwrap_or(false);
                for (task, labels) in tasks {
                    let job = if array {
                        format!("{id}_{task}")
                    } else {
                        id.to_string()
                    };
                    for l in labels.as_array().into_iter().flatten().filter_map(|l| l.as_str()) {
                        this_run.entry(l.to_string()).or_default().push(job.clone());
                    }
                }
            }
            out.latest.extend(this_run);
        }
        out.queued = pending(&last_jobs);
        out
    }

    /// The job of the latest submission that ran one of `labels` and ended
    /// without finishing, as a cell: failed (it ran and failed, was
    /// cancelled, ran out of time or memory, lost its node) or cancelled
    /// (it never ran: a job it depended on failed). SLURM keeps ended jobs
    /// for its MinJobAge (300 s by default); after that the cell reads
    /// missing again.
    fn ended(&self, labels: &[String]) -> Option<Cell> {
        labels
            .iter()
            .filter_map(|l| self.latest.get(l))
            .flatten()
            .find_map(|job| job_ended(job))
    }
}

/// [`Submitted::ended`] for one job task.
fn job_ended(job: &str) -> Option<Cell> {
    let show = |id: &str| -> Option<String> {
        let out = std::process::Command::new("scontrol")
            .args(["show", "job", "-o", id])
            .output()
            .ok()?;
        let line = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.success() && !line.trim().is_empty()).then_some(line)
    };
    let Some(line) = show(job) else {
        // An array task cancelled while it waited leaves no record of its
        // own; its array's record shows SLURM still remembers the
        // submission.
        let (array, _) = job.split_once('_')?;
        show(array)?;
        return Some(Cell {
            state: "failed",
            detail: format!("job {job} cancelled before it ran"),
        });
    };
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
            .to_string()
    };
    let (state, reason) = (field("JobState"), field("Reason"));
    if reason == "DependencyNeverSatisfied" {
        return Some(Cell {
            state: "cancelled",
            detail: format!("job {job}: a job it depends on failed"),
        });
    }
    let ended_badly = [
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
    ];
    ended_badly.contains(&state.as_str()).then(|| Cell {
        state: "failed",
        detail: format!("job {job} {state} ({reason}); log {}", field("StdOut")),
    })
}

/// The names of the jobs among `jobs` (id, name) that still wait in SLURM.
fn pending(jobs: &[(String, String)]) -> Vec<String> {
    if jobs.is_empty() {
        return Vec::new();
    }
    let list: Vec<&str> = jobs.iter().map(|(i, _)| i.as_str()).collect();
    let Ok(out) = std::process::Command::new("squeue")
        .args(["-h", "-o", "%F %T", "-j", &list.join(",")])
        .output()
    else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| l.contains("PENDING"))
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|id| jobs.iter().find(|(i, _)| i == id).map(|(_, n)| n.clone()))
        .collect()
}

/// The table for an experiment file.
pub fn render(ctx: &Ctx, path: &str, device: &str) -> Result<String> {
    let exp = Experiment::load(path)?;
    let steps = exp.steps(device)?;
    let name = std::path::Path::new(path)
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let submitted = Submitted::read(ctx, &name);
    let is_queued = |job: &str| {
        submitted
            .queued
            .iter()
            .any(|q| q == job || q.starts_with(&format!("{job}.")))
    };
    let mut rows: Vec<(String, Vec<Cell>)> = Vec::new();
    let mut data = Vec::new();
    for s in &steps.data {
        data.push(cell(ctx, s, is_queued("data"), || submitted.ended(&[s.label()]))?);
    }
    let stages_cols = ["train", "eval", "collect", "decide", "analyze"];
    for m in &steps.models {
        let mut cells = Vec::new();
        for (stage, s) in stages_cols
            .iter()
            .zip([&m.train, &m.eval, &m.collect, &m.decide, &m.analyze])
        {
            let q = is_queued(stage)
                || is_queued(&format!("{stage}.{}", m.name))
                || is_queued(&format!("merge.{}", m.name)) && *stage == "collect";
            // A collection in shards ends in its merge job.
            let labels = [s.label(), format!("merge {}", m.name)];
            let labels = if *stage == "collect" {
                &labels[..]
            } else {
                &labels[..1]
            };
            cells.push(cell(ctx, s, q, || submitted.ended(labels))?);
        }
        rows.push((m.name.clone(), cells));
    }
    let mut out = String::new();
    let _ = writeln!(out, "experiment {path} on {}", ctx.lake.url());
    let data_line: Vec<String> = steps
        .data
        .iter()
        .zip(&data)
        .map(|(s, c)| format!("{} {}", s.stage, c.state))
        .collect();
    let _ = writeln!(out, "data ({}): {}", steps.dataset, data_line.join(", "));
    let mut details: Vec<String> = steps
        .data
        .iter()
        .zip(&data)
        .filter(|(_, c)| !c.detail.is_empty() && c.state != "done")
        .map(|(s, c)| format!("data {}: {} {}", s.stage, c.state, c.detail))
        .collect();
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(5).max(5);
    let _ = write!(out, "{:<width$}", "model");
    for s in stages_cols {
        let _ = write!(out, "  {s:<9}");
    }
    out.push('\n');
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, cells) in &rows {
        let _ = write!(out, "{name:<width$}");
        for (s, c) in stages_cols.iter().zip(cells) {
            let _ = write!(out, "  {:<9}", c.state);
            *counts.entry(c.state).or_default() += 1;
            if c.state != "missing" && c.state != "queued" && !c.detail.is_empty() && c.state != "done" {
                details.push(format!("{name} {s}: {} {}", c.state, c.detail));
            }
        }
        out.push('\n');
    }
    let summary: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let _ = writeln!(
        out,
        "{} models x {} stages: {}",
        rows.len(),
        stages_cols.len(),
        summary.join(", ")
    );
    for d in details {
        let _ = writeln!(out, "  {d}");
    }
    Ok(out)
}
