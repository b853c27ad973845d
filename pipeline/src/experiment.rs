//! Experiment files: a grid of models and the settings of every stage that
//! builds, trains and analyses them, in one TOML file.
//!
//! ```toml
//! [data]                 # ingest / tokenize / pack / vocab
//! dataset = "sample"
//! train = "data/tinystories_train_sample.txt"
//! validation = "data/tinystories_val_sample.txt"
//! T = 256
//! [train]                # any train parameter, shared by all models
//! lr = 0.003
//! [grid]                 # the cross product is trained, in this order
//! depths = [1]
//! widths = [32, 64]
//! epochs = [1]
//! weight_decays = [0.0005]
//! seeds = [0, 1, 2]
//! [collect]              # collect / decide / analyze / correlate settings
//! [decide]
//! [analyze]
//! [correlate]
//! [report]
//! ```
//!
//! `train grid=FILE` uses `[train]` and `[grid]`; `stage=all experiment=FILE`
//! uses everything.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{Context, Error, Result};

pub type Section = BTreeMap<String, toml::Value>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    #[serde(default)]
    pub data: Section,
    #[serde(default)]
    pub train: Section,
    pub grid: Grid,
    #[serde(default)]
    pub eval: Section,
    #[serde(default)]
    pub collect: Section,
    #[serde(default)]
    pub decide: Section,
    #[serde(default)]
    pub analyze: Section,
    #[serde(default)]
    pub correlate: Section,
    #[serde(default)]
    pub report: Section,
    /// Scheduler options: `args` for every job, and per step (`data`,
    /// `train`, `eval`, `collect`, `merge`, `decide`, `analyze`,
    /// `correlate`, `report`) options added to them.
    #[serde(default)]
    pub slurm: Section,
}

/// Models one experiment may hold: the paper's grid has a few hundred;
/// 100,000 is more than anyone trains, and few enough to plan at once (a
/// list of steps per model).
pub const MAX_GRID_MODELS: usize = 100_000;

/// One stage run: the stage and its explicit parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub stage: &'static str,
    pub params: BTreeMap<String, String>,
}

impl Step {
    fn new(stage: &'static str, params: BTreeMap<String, String>) -> Self {
        Step { stage, params }
    }

    /// The stage and the model it works on (`train` names it `name`), as a
    /// submission records it for `pipeline status`.
    pub fn label(&self) -> String {
        match self.params.get("model").or_else(|| self.params.get("name")) {
            Some(m) => format!("{} {m}", self.stage),
            None => self.stage.to_string(),
        }
    }
}

/// The steps of one model of the grid.
#[derive(Debug, Clone)]
pub struct ModelSteps {
    pub name: String,
    pub train: Step,
    pub eval: Step,
    pub collect: Step,
    pub decide: Step,
    pub analyze: Step,
}

/// Every stage run of an experiment, in dependency order.
#[derive(Debug, Clone)]
pub struct Steps {
    pub dataset: String,
    pub data: Vec<Step>,
    pub models: Vec<ModelSteps>,
    pub correlate: Step,
    pub report: Step,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    pub depths: Vec<u64>,
    pub widths: Vec<u64>,
    #[serde(default = "one")]
    pub epochs: Vec<u64>,
    #[serde(default = "zero_f")]
    pub weight_decays: Vec<f64>,
    #[serde(default = "zero")]
    pub seeds: Vec<u64>,
}

fn one() -> Vec<u64> {
    vec![1]
}
fn zero() -> Vec<u64> {
    vec![0]
}
fn zero_f() -> Vec<f64> {
    vec![0.0]
}

/// A TOML value as a stage parameter string.
pub fn value_string(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A section as `key=value` pairs.
pub fn pairs(section: &Section) -> BTreeMap<String, String> {
    section
        .iter()
        .map(|(k, v)| (k.clone(), value_string(v)))
        .collect()
}

impl Experiment {
    /// Every stage run of the study, with `device` for the stages that run
    /// models.
    pub fn steps(&self, device: &str) -> Result<Steps> {
        let data = pairs(&self.data);
        let dataset = data
            .get("dataset")
            .cloned()
            .unwrap_or_else(|| "sample".to_string());
        let pick = |keys: &[&str]| -> BTreeMap<String, String> {
            let mut m: BTreeMap<String, String> = keys
                .iter()
                .filter_map(|k| data.get(*k).map(|v| (k.to_string(), v.clone())))
                .collect();
            m.insert("dataset".into(), dataset.clone());
            m
        };
        let data_steps = vec![
            Step::new(
                "ingest",
                pick(&[
                    "train",
                    "validation",
                    "input",
                    "holdout",
                    "seed",
                    "format",
                    "text_column",
                    "separator",
                    "trim",
                ]),
            ),
            Step::new("tokenize", pick(&["tokenizer"])),
            Step::new("pack", pick(&["T", "mode", "shards", "batch"])),
            Step::new("vocab", pick(&[])),
        ];
        let mut base = BTreeMap::new();
        base.insert("dataset".to_string(), dataset.clone());
        base.insert("device".to_string(), device.to_string());
        let mut models = Vec::new();
        for run in self.train_runs(&base) {
            let name = match run.get("name") {
                Some(n) => n.clone(),
                None => {
                    let num = |k: &str| run.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                    lc_models::naming::format(
                        num("depth") as usize,
                        num("width") as usize,
                        num("epochs") as usize,
                        num("weight_decay"),
                        num("seed") as u64,
                    )?
                }
            };
            let with = |section: &Section, dev: bool| {
                let mut m = pairs(section);
                m.insert("model".into(), name.clone());
                if dev {
                    m.insert("device".into(), device.to_string());
                }
                m
            };
            models.push(ModelSteps {
                train: Step::new("train", run.clone()),
                eval: Step::new("eval", with(&self.eval, true)),
                collect: Step::new("collect", with(&self.collect, true)),
                decide: Step::new("decide", with(&self.decide, true)),
                analyze: Step::new("analyze", with(&self.analyze, false)),
                name,
            });
        }
        // The report shows the same correlate run: same selection and settings.
        let mut report = pairs(&self.report);
        for k in ["where", "permutations", "bootstrap", "seed"] {
            if let Some(v) = self.correlate.get(k) {
                report.entry(k.to_string()).or_insert_with(|| value_string(v));
            }
        }
        Ok(Steps {
            dataset,
            data: data_steps,
            models,
            correlate: Step::new("correlate", pairs(&self.correlate)),
            report: Step::new("report", report),
        })
    }

    pub fn load(path: &str) -> Result<Self> {
        let text = std::fs::read_to_string(path).ctx(path)?;
        Self::parse(&text, path)
    }

    /// An experiment file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self> {
        let e: Experiment = toml::from_str(text).map_err(|e| Error::input(path, e.to_string()))?;
        let g = &e.grid;
        if g.depths.is_empty()
            || g.widths.is_empty()
            || g.epochs.is_empty()
            || g.weight_decays.is_empty()
            || g.seeds.is_empty()
        {
            return Err(Error::input(
                path,
                "every [grid] list must have at least one value",
            ));
        }
        // Checked before anything expands the grid: five lists of a few
        // hundred values are a few KB of TOML and 10^12 models.
        let models = [
            g.depths.len(),
            g.widths.len(),
            g.epochs.len(),
            g.weight_decays.len(),
            g.seeds.len(),
        ]
        .iter()
        .try_fold(1usize, |n, &k| n.checked_mul(k).filter(|&n| n <= MAX_GRID_MODELS));
        if models.is_none() {
            return Err(Error::input(
                path,
                format!("the [grid] lists make more than {MAX_GRID_MODELS} models (their cross product)"),
            ));
        }
        Ok(e)
    }

    /// The train parameters of every model of the grid, in a fixed order
    /// (depth, width, epochs, decay, seed), each on top of `base` and `[train]`.
    pub fn train_runs(&self, base: &BTreeMap<String, String>) -> Vec<BTreeMap<String, String>> {
        let g = &self.grid;
        let mut runs = Vec::new();
        for &d in &g.depths {
            for &w in &g.widths {
                for &e in &g.epochs {
                    for &wd in &g.weight_decays {
                        for &s in &g.seeds {
                            let mut m = base.clone();
                            m.extend(pairs(&self.train));
                            m.insert("depth".into(), d.to_string());
                            m.insert("width".into(), w.to_string());
                            m.insert("epochs".into(), e.to_string());
                            m.insert("weight_decay".into(), wd.to_string());
                            m.insert("seed".into(), s.to_string());
                            m.remove("grid");
                            runs.push(m);
                        }
                    }
                }
            }
        }
        runs
    }
}
