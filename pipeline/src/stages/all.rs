//! `all`: the whole study from text to correlations, driven by an
//! experiment file (see [`crate::experiment`]).
//!
//! ingest -> tokenize -> pack -> vocab -> train (every model of the grid)
//! -> per model: eval -> collect -> decide -> analyze -> correlate -> report.
//!
//! Every step goes through the stage registry exactly as on the command
//! line, and every stage skips work that is up to date, so re-running after
//! an interruption (or after adding models to the grid) only does what is
//! missing. Prints the correlation table, where the report is, and where
//! the lake is.

use crate::error::Result;
use crate::experiment::{Experiment, Step};
use crate::params::{ParamSpec, Params, param};
use crate::stages::{self, Ctx, Stage};

pub struct All;

const PARAMS: &[ParamSpec] = &[
    param(
        "experiment",
        "experiments/quickstart.toml",
        "experiment file: data, grid and stage settings",
    ),
    param(
        "device",
        "cpu",
        "cpu or cuda[:N] for train, eval, collect and decide",
    ),
    param(
        "executor",
        "local",
        "local (in this process) or slurm (submit the study as SLURM jobs)",
    ),
    param(
        "collect_shards",
        "1",
        "slurm: collect array tasks per model (merged after)",
    ),
    param(
        "slurm_args",
        "",
        "slurm: options for every job (partition, --time, account, ...)",
    ),
    param(
        "dry_run",
        "false",
        "slurm: print the job scripts and dependencies, submit nothing",
    ),
    param(
        "wait",
        "false",
        "slurm: block until every job has finished; fail naming failed tasks",
    ),
    param(
        "binary",
        "",
        "slurm: the pipeline binary the jobs run (default: this one; must be on every node)",
    ),
    param(
        "log_dir",
        "",
        "slurm: job logs (default: ./slurm-logs/EXPERIMENT; must be on every node)",
    ),
];

impl Stage for All {
    fn name(&self) -> &'static str {
        "all"
    }
    fn about(&self) -> &'static str {
        "run every stage of an experiment file: data, grid training, evaluation, collection, metrics, correlations"
    }
    fn reads(&self) -> &'static str {
        "an experiment file and the corpora it names"
    }
    fn writes(&self) -> &'static str {
        "every table"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }

    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String> {
        let path = p.nonempty("experiment")?;
        let exp = Experiment::load(path)?;
        let device = p.nonempty("device")?.to_string();
        let steps = exp.steps(&device)?;
        match p.choice("executor", &["local", "slurm"])? {
            "slurm" => {
                let opts = crate::executor::SlurmOptions::from_params(p, &exp, path)?;
                return crate::executor::slurm(ctx, &steps, &opts);
            }
            _ => {
                let slurm_only = p.bool("dry_run")?
                    || p.bool("wait")?
                    || p.u64("collect_shards")? != 1
                    || ["slurm_args", "binary", "log_dir"]
                        .iter()
                        .any(|k| p.opt(k).is_some());
                if slurm_only {
                    return Err(p.invalid(
                        "executor",
                        "dry_run, wait, collect_shards, slurm_args, binary and log_dir apply to executor=slurm",
                    ));
                }
            }
        }
        let step = |s: &Step| -> Result<String> {
            let out = stages::run(ctx, s.stage, &s.params)?;
            eprintln!("[{}] {out}", s.stage);
            Ok(out)
        };
        for s in &steps.data {
            step(s)?;
        }
        for m in &steps.models {
            step(&m.train)?;
        }
        for m in &steps.models {
            for s in [&m.eval, &m.collect, &m.decide, &m.analyze] {
                step(s)?;
            }
        }
        // The correlation table is this stage's own result: printed once, by the caller.
        let table = stages::run(ctx, "correlate", &steps.correlate.params)?;
        let written = step(&steps.report)?;
        Ok(format!(
            "{table}\n{written}\nlake: {} (query it with `pipeline sql`)",
            ctx.lake.url()
        ))
    }
}
