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
    pub fn load(path: &str) -> Result<Self> {
        let text = std::fs::read_to_string(path).ctx(path)?;
        let e: Experiment = toml::from_str(&text).map_err(|e| Error::input(path, e.to_string()))?;
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
