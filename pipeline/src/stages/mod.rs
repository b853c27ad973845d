//! The stage registry.
//!
//! A stage is a unit of work with declared parameters that reads artifacts
//! from the lake and writes artifacts to it. Stages never call each other's
//! code; composite stages (`all`) go through this registry by name, exactly as
//! the command line does.

use std::collections::BTreeMap;

use lc_lake::lake::Lake;

use crate::cancel::Cancel;
use crate::checkpoint::ModelRef;
use crate::error::{Error, Result};
use crate::params::{Config, ParamSpec, Params};

pub mod all;
pub mod analyze;
pub mod collect;
pub mod correlate;
pub mod decide;
pub mod eval;
pub mod import;
pub mod ingest;
pub mod merge;
pub mod pack;
pub mod report;
pub mod tokenize;
pub mod train;
pub mod vocab;

/// What every stage gets to run with.
#[derive(Clone)]
pub struct Ctx {
    pub lake: Lake,
    pub config: Config,
    /// Plan mode: stages stop, without writing anything, where they would
    /// start work ([`Ctx::would_run`]); see [`plan`].
    pub plan_only: bool,
    /// Set from outside to stop the stage at its next checkpoint
    /// ([`crate::cancel`]).
    pub cancel: Cancel,
}

impl Ctx {
    pub fn new(lake: Lake) -> Self {
        Ctx {
            lake,
            config: Config::default(),
            plan_only: false,
            cancel: Cancel::new(),
        }
    }

    /// Called by a stage where it has found it is not up to date and is
    /// about to do work: in plan mode, stop here.
    pub fn would_run(&self, what: impl Into<String>) -> Result<()> {
        if self.plan_only {
            Err(Error::WouldRun(what.into()))
        } else {
            Ok(())
        }
    }
}

/// Whether a stage run with these parameters is up to date, found by running
/// it in plan mode (no writes, no work). A stage that cannot start (its
/// inputs are missing) is not up to date either; a malformed parameter is
/// still an error.
pub fn plan(ctx: &Ctx, name: &str, explicit: &BTreeMap<String, String>) -> Result<PlanStatus> {
    let planning = Ctx {
        plan_only: true,
        ..ctx.clone()
    };
    match run(&planning, name, explicit) {
        Ok(_) => Ok(PlanStatus::Done),
        Err(Error::WouldRun(w)) => Ok(PlanStatus::ToDo(w)),
        Err(e @ Error::Param { .. }) => Err(e),
        Err(e) => Ok(PlanStatus::ToDo(e.to_string())),
    }
}

/// What [`plan`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanStatus {
    Done,
    /// Not up to date, and why.
    ToDo(String),
}

pub trait Stage: Sync {
    fn name(&self) -> &'static str;
    /// One sentence on what the stage does.
    fn about(&self) -> &'static str;
    /// The tables it reads.
    fn reads(&self) -> &'static str;
    /// The tables it writes.
    fn writes(&self) -> &'static str;
    fn params(&self) -> &'static [ParamSpec];
    /// Parse resolved parameters into the stage's typed arguments, as `run`
    /// does first: malformed values are refused here, before any work.
    /// What needs the lake or the model (a layer beyond the model's depth)
    /// is refused by `run`.
    fn check(&self, p: &Params) -> Result<()>;
    /// Run with resolved parameters; returns a short human summary.
    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String>;
    /// Whether a run holds a lease on its stage and parameters (one worker
    /// at a time). A stage made of other stages' runs leaves the leasing to
    /// them, so workers given the same study share its partitions instead
    /// of queueing behind the first one's whole run.
    fn leased(&self) -> bool {
        true
    }
}

/// Every stage, in pipeline order.
pub fn all() -> &'static [&'static dyn Stage] {
    &[
        &ingest::Ingest,
        &tokenize::Tokenize,
        &pack::Pack,
        &vocab::Vocab,
        &train::Train,
        &eval::Eval,
        &collect::Collect,
        &merge::Merge,
        &decide::Decide,
        &analyze::Analyze,
        &correlate::Correlate,
        &report::Report,
        &import::Import,
        &all::All,
    ]
}

pub fn find(name: &str) -> Result<&'static dyn Stage> {
    all().iter().copied().find(|s| s.name() == name).ok_or_else(|| {
        let names: Vec<&str> = all().iter().map(|s| s.name()).collect();
        Error::invalid(format!("unknown stage '{name}'; stages: {}", names.join(", ")))
    })
}

/// The dataset a stage works on for model `m`: the `dataset` parameter, or
/// the dataset the model was trained on.
pub fn dataset_for(p: &Params, given: Option<&str>, m: &ModelRef) -> Result<String> {
    match given {
        Some(d) => Ok(d.to_string()),
        None => m.trained_dataset()?.ok_or_else(|| {
            p.invalid(
                "dataset",
                format!("model {} has no recorded dataset; give dataset=", m.id),
            )
        }),
    }
}

/// Resolve parameters (config file, then `explicit`) and check them as a run
/// of the stage would, without running it.
pub fn check(ctx: &Ctx, name: &str, explicit: &BTreeMap<String, String>) -> Result<()> {
    let stage = find(name)?;
    stage.check(&Params::resolve(name, stage.params(), &ctx.config, explicit)?)
}

/// Resolve parameters (config file, then `explicit`) and run a stage by name.
pub fn run(ctx: &Ctx, name: &str, explicit: &BTreeMap<String, String>) -> Result<String> {
    let stage = find(name)?;
    ctx.cancel.check()?;
    let params = Params::resolve(name, stage.params(), &ctx.config, explicit)?;
    if ctx.plan_only {
        return stage.run(ctx, &params);
    }
    // One worker at a time per stage and parameters (see lc_lake::lease); a
    // second one waits, then usually finds the work done.
    let key = lease_name(name, &params);
    let lease = if stage.leased() {
        Some(lc_lake::lease::acquire(&ctx.lake, &key)?)
    } else {
        None
    };
    // Its commits go through a handle that refuses them once the lease lapses.
    let leased_ctx;
    let ctx = match &lease {
        Some(l) => {
            leased_ctx = Ctx {
                lake: ctx.lake.under_lease(l.guard()),
                ..ctx.clone()
            };
            &leased_ctx
        }
        None => ctx,
    };
    // One line a person reads: the stage and what was asked of it; every
    // resolved parameter goes to the debug log.
    let asked: Vec<String> = explicit.iter().map(|(k, v)| format!("{k}={v}")).collect();
    tracing::info!("{name} {}", asked.join(" "));
    tracing::debug!(stage = name, params = ?params.values(), "resolved parameters");
    let started = std::time::Instant::now();
    let failure = format!("{FAILURES}/{key}.json");
    match stage.run(ctx, &params) {
        Ok(summary) => {
            tracing::info!("{name} done in {:.1} s", started.elapsed().as_secs_f64());
            if ctx.lake.exists(&failure)? {
                ctx.lake.delete(&failure)?;
            }
            Ok(summary)
        }
        // Stopped on request: nothing failed, and nothing half-done is left.
        Err(Error::Interrupted) => Err(Error::Interrupted),
        // Refused because its lease lapsed: the work is another worker's
        // now, and a record written after that worker succeeded would name
        // a done stage as failed.
        Err(e @ Error::LeaseLapsed(_)) => Err(e),
        Err(e) => {
            // Recorded for `pipeline status`; a later success removes it.
            let record = serde_json::json!({
                "stage": name,
                "params": params.values(),
                "error": e.to_string(),
                "job": lc_lake::lease::current_job(),
                "time": chrono::Utc::now().to_rfc3339(),
            });
            if let Err(w) = ctx.lake.put(&failure, bytes::Bytes::from(record.to_string())) {
                tracing::warn!(error = %w, "recording the failure");
            }
            Err(e)
        }
    }
}

/// Where failed stage runs are recorded.
pub const FAILURES: &str = "_status/failed";

/// The lease (and failure record) name of a stage run: the stage and a hash
/// of its resolved parameters, `force` aside.
pub fn lease_name(stage: &str, params: &Params) -> String {
    let mut values = params.values().clone();
    values.remove("force");
    let text = serde_json::to_string(&values).expect("json");
    format!("{stage}/{}", &blake3::hash(text.as_bytes()).to_hex()[..20])
}

/// Run a stage from `(key, value)` pairs (used by tests and composite stages).
pub fn run_pairs(ctx: &Ctx, name: &str, pairs: &[(&str, &str)]) -> Result<String> {
    let explicit = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    run(ctx, name, &explicit)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `check` of `stage` with `pairs` on top of its defaults: the error's
    /// text, or "ok".
    fn checked(stage: &str, pairs: &[(&str, &str)]) -> String {
        let s = find(stage).unwrap();
        match Params::from_pairs(stage, s.params(), pairs).and_then(|p| s.check(&p)) {
            Ok(()) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    /// What each stage needs besides its defaults to pass `check`.
    fn needed(stage: &str) -> &'static [(&'static str, &'static str)] {
        match stage {
            "ingest" => &[("train", "corpus.txt")],
            "collect" | "decide" | "analyze" | "eval" => &[("model", "m")],
            "merge" => &[("model", "m"), ("shards", "2")],
            "import" => &[("input", "t.csv"), ("name", "t")],
            _ => &[],
        }
    }

    #[test]
    fn every_stage_checks_its_defaults() {
        for s in all() {
            assert_eq!(checked(s.name(), needed(s.name())), "ok", "{}", s.name());
        }
    }

    #[test]
    fn malformed_values_are_refused_before_any_work() {
        // Hand-picked: one bad value of each kind of parameter, with the
        // words the user reads.
        let cases: &[(&str, &str, &str, &str)] = &[
            ("ingest", "holdout", "1.5", "1.5 is not in [0, 1)"),
            ("pack", "T", "1", "1 is too short"),
            ("pack", "mode", "hf2", "'hf2' is not one of hf, concat"),
            ("tokenize", "batch_docs", "0", "0 is outside 1..=16777216"),
            ("vocab", "force", "maybe", "'maybe' is not true or false"),
            ("train", "heads", "3", "width 64 is not divisible by 3 heads"),
            ("train", "lr", "0", "must be positive"),
            ("eval", "batch", "x", "'x' is not a non-negative integer"),
            (
                "collect",
                "vars",
                "three-pass",
                "'three-pass' is not one of one-pass, two-pass",
            ),
            ("collect", "dtype", "f16", "dtype 'f16' is not f32 or bf16"),
            (
                "collect",
                "shard",
                "2/2",
                "shard '2/2' is not i/n with 0 <= i < n",
            ),
            ("merge", "shards", "0", "must be at least 1"),
            (
                "decide",
                "layer",
                "top",
                "'top' is not last or a hidden-state index",
            ),
            ("decide", "precision", "f16", "'f16' is not one of f64, f32"),
            ("analyze", "layers", "1,x", "'x' is not a layer index"),
            ("analyze", "cdnv_k", "inf", "must be finite"),
            (
                "correlate",
                "seed",
                "9223372036854775808",
                "must fit in a signed 64-bit integer",
            ),
            ("report", "log", "log2", "'log2' is not one of auto, linear"),
            (
                "import",
                "format",
                "xlsx",
                "'xlsx' is not one of auto, csv, parquet",
            ),
            ("all", "train_workers", "0", "'0' is not auto or a number >= 1"),
            ("all", "wait", "true", "apply to executor=slurm"),
        ];
        for &(stage, key, value, want) in cases {
            let mut pairs = needed(stage).to_vec();
            pairs.push((key, value));
            let got = checked(stage, &pairs);
            assert!(got.contains(want), "{stage} {key}={value}: {got}");
            // Named as the stage's parameter, except where another layer
            // (the models crate's dtype, the shard parser) words it.
            if !["dtype", "shard"].contains(&key) {
                assert!(got.starts_with(&format!("stage {stage}: parameter ")), "{got}");
            }
        }
    }

    #[test]
    fn a_grid_run_checks_every_model_before_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let grid = dir.path().join("grid.toml");
        std::fs::write(
            &grid,
            "[grid]\ndepths = [1]\nwidths = [64, 96]\n[train]\nheads = 64\n",
        )
        .unwrap();
        let got = checked("train", &[("grid", grid.to_str().unwrap())]);
        // Width 96 with 64 heads: the second model is refused.
        assert!(got.contains("width 96 is not divisible by 64 heads"), "{got}");
    }
}
