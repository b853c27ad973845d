//! Stage parameters: `key=value` pairs from the command line on top of an
//! optional `pipeline.toml` on top of each stage's defaults.
//!
//! ```toml
//! lake = "./lake"          # default lake URL (the --lake flag and PIPELINE_LAKE win)
//! [defaults]               # applied to every stage that has the key
//! dataset = "sample"
//! [stages.pack]            # one stage; unknown keys are errors
//! T = 256
//! ```
//!
//! Every stage declares its keys; an unknown key is an error that lists the
//! valid ones, and a malformed value names the key and the expected form.

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::Deserialize;

use crate::error::{Context, Error, Result};

/// One parameter a stage accepts. `default: None` means required.
#[derive(Debug, Clone, Copy)]
pub struct ParamSpec {
    pub name: &'static str,
    pub default: Option<&'static str>,
    pub doc: &'static str,
}

pub const fn param(name: &'static str, default: &'static str, doc: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        default: Some(default),
        doc,
    }
}

pub const fn required(name: &'static str, doc: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        default: None,
        doc,
    }
}

/// The optional `pipeline.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub lake: Option<String>,
    #[serde(default)]
    pub defaults: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub stages: BTreeMap<String, BTreeMap<String, toml::Value>>,
}

fn toml_to_string(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).ctx(path.display())?;
        Self::parse(&text, &path.display().to_string())
    }

    /// A `pipeline.toml`'s text; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::input(path, e.to_string()))
    }

    fn defaults_map(&self) -> BTreeMap<String, String> {
        self.defaults
            .iter()
            .map(|(k, v)| (k.clone(), toml_to_string(v)))
            .collect()
    }

    fn stage_map(&self, stage: &str) -> BTreeMap<String, String> {
        self.stages
            .get(stage)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), toml_to_string(v))).collect())
            .unwrap_or_default()
    }
}

/// Split `key=value` command-line words.
pub fn parse_pairs(words: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for w in words {
        let (k, v) = w
            .split_once('=')
            .ok_or_else(|| Error::invalid(format!("'{w}' is not of the form key=value")))?;
        if k.is_empty() {
            return Err(Error::invalid(format!("'{w}' has an empty key")));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(Error::invalid(format!("parameter '{k}' given twice")));
        }
    }
    Ok(out)
}

/// Resolved parameters of one stage run.
#[derive(Debug, Clone)]
pub struct Params {
    stage: String,
    values: BTreeMap<String, String>,
}

impl Params {
    /// Resolve parameters: stage defaults, then `[defaults]` of the config (only
    /// keys the stage has), then `[stages.<name>]`, then explicit pairs.
    pub fn resolve(
        stage: &str,
        specs: &[ParamSpec],
        config: &Config,
        explicit: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let known = |k: &str| specs.iter().any(|s| s.name == k);
        let unknown = |k: &str, whence: &str| {
            let mut names: Vec<&str> = specs.iter().map(|s| s.name).collect();
            names.sort_unstable();
            Error::Param {
                stage: stage.to_string(),
                key: k.to_string(),
                problem: format!(
                    "unknown{whence}; valid keys: {}",
                    if names.is_empty() {
                        "(none)".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            }
        };
        let mut values = BTreeMap::new();
        for s in specs {
            if let Some(d) = s.default {
                values.insert(s.name.to_string(), d.to_string());
            }
        }
        for (k, v) in config.defaults_map() {
            if known(&k) {
                values.insert(k, v);
            }
        }
        for (k, v) in config.stage_map(stage) {
            if !known(&k) {
                return Err(unknown(&k, " (in pipeline.toml)"));
            }
            values.insert(k, v);
        }
        for (k, v) in explicit {
            if !known(k) {
                return Err(unknown(k, ""));
            }
            values.insert(k.clone(), v.clone());
        }
        for s in specs {
            if s.default.is_none() && !values.contains_key(s.name) {
                return Err(Error::Param {
                    stage: stage.to_string(),
                    key: s.name.to_string(),
                    problem: format!("required: {}", s.doc),
                });
            }
        }
        Ok(Params {
            stage: stage.to_string(),
            values,
        })
    }

    /// Parameters given directly (tests, and stages composing others).
    pub fn from_pairs(stage: &str, specs: &[ParamSpec], pairs: &[(&str, &str)]) -> Result<Self> {
        let explicit = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::resolve(stage, specs, &Config::default(), &explicit)
    }

    pub fn stage(&self) -> &str {
        &self.stage
    }

    pub fn values(&self) -> &BTreeMap<String, String> {
        &self.values
    }

    fn err(&self, key: &str, problem: impl Into<String>) -> Error {
        Error::Param {
            stage: self.stage.clone(),
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    /// A parameter's value (declared ones always have one, maybe empty).
    pub fn str(&self, key: &str) -> &str {
        self.values.get(key).map(String::as_str).unwrap_or("")
    }

    /// A value, or `None` where it is empty.
    pub fn opt(&self, key: &str) -> Option<&str> {
        Some(self.str(key)).filter(|s| !s.is_empty())
    }

    /// A comma-separated list, its items trimmed and empty ones dropped.
    pub fn list(&self, key: &str) -> Vec<&str> {
        self.str(key)
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// A value that must not be empty.
    pub fn nonempty(&self, key: &str) -> Result<&str> {
        self.opt(key).ok_or_else(|| self.err(key, "must not be empty"))
    }

    pub fn parse<T: FromStr>(&self, key: &str, expected: &str) -> Result<T> {
        let v = self.str(key);
        v.trim()
            .parse()
            .map_err(|_| self.err(key, format!("'{v}' is not {expected}")))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.parse(key, "a non-negative integer")
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        self.parse(key, "a non-negative integer")
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        let x: f64 = self.parse(key, "a number")?;
        if !x.is_finite() {
            return Err(self.err(key, "must be finite"));
        }
        Ok(x)
    }

    pub fn bool(&self, key: &str) -> Result<bool> {
        match self.str(key).trim() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" | "" => Ok(false),
            v => Err(self.err(key, format!("'{v}' is not true or false"))),
        }
    }

    /// A value from a fixed set of choices.
    pub fn choice<'a>(&'a self, key: &str, choices: &[&str]) -> Result<&'a str> {
        let v = self.str(key);
        if choices.contains(&v) {
            Ok(v)
        } else {
            Err(self.err(key, format!("'{v}' is not one of {}", choices.join(", "))))
        }
    }

    /// A usize within `[lo, hi]`.
    pub fn usize_in(&self, key: &str, lo: usize, hi: usize) -> Result<usize> {
        let x = self.usize(key)?;
        if x < lo || x > hi {
            return Err(self.err(key, format!("{x} is outside {lo}..={hi}")));
        }
        Ok(x)
    }

    /// An error about this stage's parameter, for checks done by the stage.
    pub fn invalid(&self, key: &str, problem: impl Into<String>) -> Error {
        self.err(key, problem)
    }

    /// A hidden-state index: `last` or a number (checked against the
    /// model's depth by [`LayerSpec::index`], where the model is known).
    pub fn layer(&self, key: &str) -> Result<LayerSpec> {
        match self.str(key).trim() {
            "last" => Ok(LayerSpec::Last),
            s => s
                .parse()
                .map(LayerSpec::Index)
                .map_err(|_| self.err(key, format!("'{s}' is not last or a hidden-state index"))),
        }
    }
}

/// One hidden-state index as a stage parameter gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerSpec {
    /// The final norm's output (the model's depth).
    Last,
    Index(usize),
}

impl LayerSpec {
    /// The index in a model of `depth` blocks (0 = embeddings, depth = the
    /// final norm's output).
    pub fn index(self, p: &Params, key: &str, depth: usize) -> Result<usize> {
        match self {
            LayerSpec::Last => Ok(depth),
            LayerSpec::Index(l) if l <= depth => Ok(l),
            LayerSpec::Index(l) => Err(p.err(key, format!("'{l}' is not last or an index in 0..={depth}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[ParamSpec] = &[
        param("T", "2048", "chunk length"),
        param("mode", "hf", "packing mode"),
        required("dataset", "dataset name"),
    ];

    #[test]
    fn layers_apply_in_order_and_unknown_keys_list_valid_ones() {
        let cfg: Config =
            toml::from_str("[defaults]\ndataset = \"a\"\nother = 1\n[stages.pack]\nT = 256\n").unwrap();
        let cli = parse_pairs(&["mode=concat".to_string()]).unwrap();
        let p = Params::resolve("pack", SPECS, &cfg, &cli).unwrap();
        assert_eq!(p.usize("T").unwrap(), 256);
        assert_eq!(p.str("mode"), "concat");
        assert_eq!(p.str("dataset"), "a");

        let bad = parse_pairs(&["tt=1".to_string()]).unwrap();
        let err = Params::resolve("pack", SPECS, &cfg, &bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tt") && err.contains("valid keys: T, dataset, mode"),
            "{err}"
        );
    }

    #[test]
    fn missing_required_and_malformed_values_are_named() {
        let err = Params::from_pairs("pack", SPECS, &[]).unwrap_err().to_string();
        assert!(err.contains("dataset") && err.contains("required"), "{err}");
        let p = Params::from_pairs("pack", SPECS, &[("dataset", "x"), ("T", "big")]).unwrap();
        let err = p.usize("T").unwrap_err().to_string();
        assert!(err.contains("'big' is not a non-negative integer"), "{err}");
        assert!(parse_pairs(&["novalue".to_string()]).is_err());
    }

    #[test]
    fn layers_are_last_or_an_index_within_the_depth() {
        const LAYER: &[ParamSpec] = &[param("layer", "last", "hidden-state index")];
        let at = |v: &str| Params::from_pairs("decide", LAYER, &[("layer", v)]).unwrap();
        let p = at("last");
        assert_eq!(p.layer("layer").unwrap(), LayerSpec::Last);
        assert_eq!(p.layer("layer").unwrap().index(&p, "layer", 4).unwrap(), 4);
        let p = at(" 2 ");
        assert_eq!(p.layer("layer").unwrap().index(&p, "layer", 4).unwrap(), 2);
        let p = at("5");
        let err = p
            .layer("layer")
            .unwrap()
            .index(&p, "layer", 4)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "stage decide: parameter layer: '5' is not last or an index in 0..=4"
        );
        let err = at("final").layer("layer").unwrap_err().to_string();
        assert_eq!(
            err,
            "stage decide: parameter layer: 'final' is not last or a hidden-state index"
        );
    }
}
