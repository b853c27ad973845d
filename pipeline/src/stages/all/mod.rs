//! `all`: the whole study from text to correlations, driven by an
//! experiment file (see [`crate::experiment`]).
//!
//! ingest -> tokenize -> pack -> vocab -> per model of the grid: train ->
//! eval -> collect -> decide (`train_workers` models at a time) -> per
//! model: analyze -> correlate -> report.
//!
//! Every step goes through the stage registry exactly as on the command
//! line, and every stage skips work that is up to date, so re-running after
//! an interruption (or after adding models to the grid) only does what is
//! missing. Prints the correlation table, where the report is, and where
//! the lake is. With `executor=slurm` the same steps become SLURM jobs
//! ([`slurm`]).

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::experiment::{Experiment, ModelSteps, Step};
use crate::params::{ParamSpec, Params, param};
use crate::stages::{self, Ctx, Stage};

pub mod slurm;

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
        "train_workers",
        "auto",
        "local: grid models trained and evaluated at once, each on an equal share of the cores (the same results as one at a time); auto: one per core when every model is at most 256 wide, else 1",
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
    fn leased(&self) -> bool {
        false
    }

    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String> {
        let path = p.nonempty("experiment")?;
        let exp = Experiment::load(path)?;
        let device = p.nonempty("device")?.to_string();
        let steps = exp.steps(&device)?;
        match p.choice("executor", &["local", "slurm"])? {
            "slurm" => {
                let opts = slurm::SlurmOptions::from_params(p, &exp, path)?;
                return slurm::slurm(ctx, &steps, &opts);
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
        // Claims that killed workers of earlier runs left behind go first.
        if !ctx.plan_only {
            lc_lake::lease::sweep(&ctx.lake)?;
        }
        let step = |s: &Step| -> Result<String> {
            let out = stages::run(ctx, s.stage, &s.params)?;
            eprintln!("[{}] {out}", s.stage);
            Ok(out)
        };
        for s in &steps.data {
            step(s)?;
        }
        let workers =
            match p.str("train_workers") {
                "auto" => auto_train_workers(&steps.models),
                n => n.parse::<usize>().ok().filter(|&n| n >= 1).ok_or_else(|| {
                    p.invalid("train_workers", format!("'{n}' is not auto or a number >= 1"))
                })?,
            };
        model_grid(&steps.models, workers, &step)?;
        // On all the cores: its per-class row means are summed per thread.
        for m in &steps.models {
            step(&m.analyze)?;
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

/// Cores of this machine (rayon's count, which honours RAYON_NUM_THREADS).
fn cores() -> usize {
    rayon::current_num_threads().max(1)
}

/// Small models cannot keep many cores busy each (a step at width 32 is a
/// chain of small GEMMs; two cores ran it 1.4x faster than one), so the
/// grid trains one per core; wider models use the cores themselves and
/// would multiply memory, so they train one at a time.
fn auto_train_workers(models: &[ModelSteps]) -> usize {
    let small = models.iter().all(|m| {
        m.train
            .params
            .get("width")
            .and_then(|w| w.parse::<usize>().ok())
            .is_some_and(|w| w <= 256)
    });
    if small { models.len().clamp(1, cores()) } else { 1 }
}

/// Take every model through train, eval, collect and decide, `workers`
/// models at a time, each worker in its own rayon pool of an equal share of
/// the cores: each model's evaluation follows its training on the same
/// worker, so a worker that runs out of models to train does not idle while
/// the last ones train. The results do not depend on it: the loss's
/// vocabulary runs are fixed in number, candle partitions its products by
/// the configured thread count, not the pool's, and eval, collect and decide
/// reduce in orders fixed by their data (checked: train_log, models,
/// class_stats and decisions of the quickstart identical at one and two
/// workers; analyze, whose row means are summed per thread, runs after the
/// grid on every core). The first error is returned once every worker has
/// stopped.
fn model_grid(
    models: &[ModelSteps],
    workers: usize,
    step: &(dyn Fn(&Step) -> Result<String> + Sync),
) -> Result<()> {
    let workers = workers.clamp(1, models.len().max(1));
    let one_model = |m: &ModelSteps| -> Result<()> {
        for s in [&m.train, &m.eval, &m.collect, &m.decide] {
            step(s)?;
        }
        Ok(())
    };
    if workers == 1 {
        return models.iter().try_for_each(one_model);
    }
    let threads = (cores() / workers).max(1);
    let next = AtomicUsize::new(0);
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .map_err(|e| Error::invalid(format!("starting a grid worker: {e}")))?;
                    while let Some(m) = models.get(next.fetch_add(1, Ordering::SeqCst)) {
                        pool.install(|| one_model(m))?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::invalid("a grid worker panicked")))
            })
            .collect()
    });
    results.into_iter().collect()
}
