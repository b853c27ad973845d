//! `pipeline status experiment=FILE`: the grid as a table, model x stage,
//! each cell done / running / failed / queued / missing, for local and SLURM
//! runs alike (the paper's `analyze -prog` view).
//!
//! A cell is done when the stage, planned with the experiment's parameters,
//! is up to date ([`crate::stages::plan`]); running while a worker holds its
//! lease ([`crate::lease`]); failed when its last run left a failure record;
//! queued when a SLURM job of the latest submission still waits for it.

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
fn output(ctx: &Ctx, s: &Step) -> Option<crate::artifact::Manifest> {
    let model = s.params.get("model");
    let find = |table: &str, under: String| -> Option<crate::artifact::Manifest> {
        ctx.lake
            .manifests(table, &under)
            .ok()?
            .into_iter()
            .max_by(|a, b| a.created.cmp(&b.created))
    };
    let resolved = || {
        model.and_then(|m| {
            crate::model::checkpoint::ModelRef::resolve_one(&ctx.lake, m)
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

/// The state of one step.
pub fn cell(ctx: &Ctx, s: &Step, queued: bool) -> Result<Cell> {
    let stage = stages::find(s.stage)?;
    let params = Params::resolve(s.stage, stage.params(), &ctx.config, &s.params)?;
    let key = stages::lease_name(s.stage, &params);
    if let Some(c) = crate::lease::holder(&ctx.lake, &key)? {
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
    Ok(Cell {
        state: if queued { "queued" } else { "missing" },
        detail: String::new(),
    })
}

/// Job names still waiting in SLURM from the latest submission of this
/// experiment (empty without SLURM).
fn queued_jobs(ctx: &Ctx, experiment: &str) -> Vec<String> {
    let Ok(runs) = ctx.lake.list(&format!("_runs/{experiment}")) else {
        return Vec::new();
    };
    let Some((latest, _)) = runs.last() else {
        return Vec::new();
    };
    let Ok(Some(bytes)) = ctx.lake.get_opt(latest) else {
        return Vec::new();
    };
    let jobs: Vec<serde_json::Value> = serde_json::from_slice(&bytes).unwrap_or_default();
    let ids: Vec<(String, String)> = jobs
        .iter()
        .filter_map(|j| {
            Some((
                j.get("id")?.as_str()?.to_string(),
                j.get("name")?.as_str()?.to_string(),
            ))
        })
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let list: Vec<&str> = ids.iter().map(|(i, _)| i.as_str()).collect();
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
        .filter_map(|id| ids.iter().find(|(i, _)| i == id).map(|(_, n)| n.clone()))
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
    let queued = queued_jobs(ctx, &name);
    let is_queued = |job: &str| {
        queued
            .iter()
            .any(|q| q == job || q.starts_with(&format!("{job}.")))
    };
    let mut rows: Vec<(String, Vec<Cell>)> = Vec::new();
    let mut data = Vec::new();
    for s in &steps.data {
        data.push(cell(ctx, s, is_queued("data"))?);
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
            cells.push(cell(ctx, s, q)?);
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
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(5).max(5);
    let _ = write!(out, "{:<width$}", "model");
    for s in stages_cols {
        let _ = write!(out, "  {s:<9}");
    }
    out.push('\n');
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut details = Vec::new();
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
