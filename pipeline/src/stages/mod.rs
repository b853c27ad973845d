//! The stage registry.
//!
//! A stage is a unit of work with declared parameters that reads artifacts
//! from the lake and writes artifacts to it. Stages never call each other's
//! code; composite stages (`all`) go through this registry by name, exactly as
//! the command line does.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::lake::Lake;
use crate::model::checkpoint::ModelRef;
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
pub struct Ctx {
    pub lake: Lake,
    pub config: Config,
}

impl Ctx {
    pub fn new(lake: Lake) -> Self {
        Ctx {
            lake,
            config: Config::default(),
        }
    }
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
    /// Run with resolved parameters; returns a short human summary.
    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String>;
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
pub fn dataset_for(p: &Params, m: &ModelRef) -> Result<String> {
    match p.opt("dataset") {
        Some(d) => Ok(d.to_string()),
        None => m.trained_dataset()?.ok_or_else(|| {
            p.invalid(
                "dataset",
                format!("model {} has no recorded dataset; give dataset=", m.id),
            )
        }),
    }
}

/// Resolve parameters (config file, then `explicit`) and run a stage by name.
pub fn run(ctx: &Ctx, name: &str, explicit: &BTreeMap<String, String>) -> Result<String> {
    let stage = find(name)?;
    let params = Params::resolve(name, stage.params(), &ctx.config, explicit)?;
    // One line a person reads: the stage and what was asked of it; every
    // resolved parameter goes to the debug log.
    let asked: Vec<String> = explicit.iter().map(|(k, v)| format!("{k}={v}")).collect();
    tracing::info!("{name} {}", asked.join(" "));
    tracing::debug!(stage = name, params = ?params.values(), "resolved parameters");
    let started = std::time::Instant::now();
    let summary = stage.run(ctx, &params)?;
    tracing::info!("{name} done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(summary)
}

/// Run a stage from `(key, value)` pairs (used by tests and composite stages).
pub fn run_pairs(ctx: &Ctx, name: &str, pairs: &[(&str, &str)]) -> Result<String> {
    let explicit = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    run(ctx, name, &explicit)
}
