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
use crate::experiment::{Experiment, ModelSteps, Step, Steps};
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

/// stage=all's parameters, checked before any work. The SLURM settings
/// are refused with `executor=local`.
pub struct AllArgs<'a> {
    pub experiment: &'a str,
    pub device: &'a str,
    pub slurm: bool,
    /// Grid models trained at once; `None`: auto.
    pub train_workers: Option<usize>,
    pub collect_shards: u64,
    pub slurm_args: Option<&'a str>,
    pub dry_run: bool,
    pub wait: bool,
    pub binary: Option<&'a str>,
    pub log_dir: Option<&'a str>,
}

impl<'a> AllArgs<'a> {
    pub fn parse(p: &'a Params) -> Result<Self> {
        let collect_shards = p.u64("collect_shards")?;
        if collect_shards == 0 {
            return Err(p.invalid("collect_shards", "must be at least 1"));
        }
        let args = AllArgs {
            experiment: p.nonempty("experiment")?,
            device: p.nonempty("device")?,
            slurm: p.choice("executor", &["local", "slurm"])? == "slurm",
            train_workers: match p.str("train_workers") {
                "auto" => None,
                n => Some(n.parse::<usize>().ok().filter(|&n| n >= 1).ok_or_else(|| {
                    p.invalid("train_workers", format!("'{n}' is not auto or a number >= 1"))
                })?),
            },
            collect_shards,
            slurm_args: p.opt("slurm_args"),
            dry_run: p.bool("dry_run")?,
            wait: p.bool("wait")?,
            binary: p.opt("binary"),
            log_dir: p.opt("log_dir"),
        };
        let slurm_only = args.dry_run
            || args.wait
            || args.collect_shards != 1
            || args.slurm_args.is_some()
            || args.binary.is_some()
            || args.log_dir.is_some();
        if !args.slurm && slurm_only {
            return Err(p.invalid(
                "executor",
                "dry_run, wait, collect_shards, slurm_args, binary and log_dir apply to executor=slurm",
            ));
        }
        Ok(args)
    }
}

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
    fn check(&self, p: &Params) -> Result<()> {
        AllArgs::parse(p).map(drop)
    }
    fn leased(&self) -> bool {
        false
    }

    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String> {
        let args = AllArgs::parse(p)?;
        let exp = Experiment::load(args.experiment)?;
        let steps = exp.steps(args.device)?;
        check_steps(ctx, &steps)?;
        if args.slurm {
            let opts = slurm::SlurmOptions::new(&args, &exp)?;
            return slurm::slurm(ctx, &steps, &opts);
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
        let workers = args
            .train_workers
            .unwrap_or_else(|| auto_train_workers(&steps.models));
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

/// Every step's parameters, checked before the first step runs (or is
/// submitted): a bad value in the last model's analysis is refused now,
/// not after the data and the grid are done.
fn check_steps(ctx: &Ctx, steps: &Steps) -> Result<()> {
    let per_model = steps
        .models
        .iter()
        .flat_map(|m| [&m.train, &m.eval, &m.collect, &m.decide, &m.analyze]);
    for s in steps
        .data
        .iter()
        .chain(per_model)
        .chain([&steps.correlate, &steps.report])
    {
        stages::check(ctx, s.stage, &s.params)?;
    }
    Ok(())
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
