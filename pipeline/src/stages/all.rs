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

use std::collections::BTreeMap;

use crate::error::Result;
use crate::experiment::{Experiment, pairs};
use crate::model::naming;
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
        let data = pairs(&exp.data);
        let dataset = data
            .get("dataset")
            .cloned()
            .unwrap_or_else(|| "sample".to_string());
        let pick = |stage: &str, keys: &[&str]| -> BTreeMap<String, String> {
            let mut m: BTreeMap<String, String> = keys
                .iter()
                .filter_map(|k| data.get(*k).map(|v| (k.to_string(), v.clone())))
                .collect();
            m.insert("dataset".into(), dataset.clone());
            tracing::info!(stage, "experiment step");
            m
        };
        let step = |name: &str, params: BTreeMap<String, String>| -> Result<String> {
            let s = stages::run(ctx, name, &params)?;
            eprintln!("[{name}] {s}");
            Ok(s)
        };
        step(
            "ingest",
            pick(
                "ingest",
                &[
                    "train",
                    "validation",
                    "input",
                    "holdout",
                    "seed",
                    "format",
                    "text_column",
                    "separator",
                    "trim",
                ],
            ),
        )?;
        step("tokenize", pick("tokenize", &["tokenizer"]))?;
        step("pack", pick("pack", &["T", "mode", "shards", "batch"]))?;
        step("vocab", pick("vocab", &[]))?;

        let mut base = BTreeMap::new();
        base.insert("dataset".to_string(), dataset.clone());
        base.insert("device".to_string(), device.clone());
        let runs = exp.train_runs(&base);
        let mut names = Vec::new();
        for run in &runs {
            step("train", run.clone())?;
            let name = match run.get("name") {
                Some(n) => n.clone(),
                None => {
                    let num = |k: &str| run.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                    naming::format(
                        num("depth") as usize,
                        num("width") as usize,
                        num("epochs") as usize,
                        num("weight_decay"),
                        num("seed") as u64,
                    )?
                }
            };
            names.push(name);
        }
        for name in &names {
            let with = |section: &crate::experiment::Section, dev: bool| {
                let mut m = pairs(section);
                m.insert("model".into(), name.clone());
                if dev {
                    m.insert("device".into(), device.clone());
                }
                m
            };
            step("eval", with(&exp.eval, true))?;
            step("collect", with(&exp.collect, true))?;
            step("decide", with(&exp.decide, true))?;
            step("analyze", with(&exp.analyze, false))?;
        }
        // The correlation table is this stage's own result: printed once, by the caller.
        let table = stages::run(ctx, "correlate", &pairs(&exp.correlate))?;
        // The report shows the same correlate run: same selection and settings.
        let mut report = pairs(&exp.report);
        for k in ["where", "permutations", "bootstrap", "seed"] {
            if let Some(v) = exp.correlate.get(k) {
                report
                    .entry(k.to_string())
                    .or_insert_with(|| crate::experiment::value_string(v));
            }
        }
        let written = step("report", report)?;
        Ok(format!(
            "{table}\n{written}\nlake: {} (query it with `pipeline sql`)",
            ctx.lake.url()
        ))
    }
}
