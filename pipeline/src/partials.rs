//! Collection state that is not (yet) a table: resumable checkpoints and
//! shard partials of per-class statistics, and committing finished
//! statistics as `class_stats` artifacts.
//!
//! A state object is one safetensors file holding, per collected layer, the
//! classes, counts, means and M2 of a [`ClassStats`], with metadata saying
//! what it was computed from. One object means one atomic write: a reader
//! sees a whole checkpoint or the previous one. Keys:
//!
//! ```text
//! partials/collect/model=ID/split=S/of=N/shard=I.safetensors         finished shard
//! partials/collect/model=ID/split=S/of=N/shard=I.resume.safetensors  checkpoint
//! ```

use std::collections::HashMap;

use bytes::Bytes;
use lc_lake::artifact::{Artifact, Provenance};
use lc_lake::lake::Lake;
use lc_lake::manifest::{InputRef, Manifest};
use lc_metrics::ClassStats;

use crate::error::{Error, Result};
use crate::stats::pack_safetensors;

pub fn shard_key(model: &str, split: &str, of: u64, shard: u64, resume: bool) -> String {
    format!(
        "partials/collect/model={model}/split={split}/of={of}/shard={shard}{}.safetensors",
        if resume { ".resume" } else { "" }
    )
}

/// Parse `layers=` for a model of depth `depth`.
pub fn parse_layers(spec: &str, depth: usize) -> Result<Vec<usize>> {
    let mut out: Vec<usize> = match spec.trim() {
        "last" => vec![depth],
        "all" => (0..=depth).collect(),
        list => list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&l| l <= depth)
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "layers: '{s}' is not a hidden-state index in 0..={depth}"
                        ))
                    })
            })
            .collect::<Result<_>>()?,
    };
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err(Error::invalid("layers: no layer selected"));
    }
    Ok(out)
}

/// Parse `shard=i/n`.
pub fn parse_shard(spec: &str) -> Result<(u64, u64)> {
    let bad = || Error::invalid(format!("shard '{spec}' is not i/n with 0 <= i < n"));
    let (i, n) = spec.split_once('/').ok_or_else(bad)?;
    let (i, n): (u64, u64) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// Statistics of several layers with the metadata of their computation.
pub struct StateObject {
    pub layers: Vec<usize>,
    pub stats: Vec<ClassStats>,
    pub meta: HashMap<String, String>,
}

impl StateObject {
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors = Vec::new();
        for (l, s) in self.layers.iter().zip(&self.stats) {
            tensors.extend(crate::stats::to_tensors(s, &format!("layer{l}")));
        }
        let mut meta = self.meta.clone();
        meta.insert(
            "layers".into(),
            self.layers
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
        meta.insert(
            "d".into(),
            self.stats.first().map(|s| s.d).unwrap_or(0).to_string(),
        );
        pack_safetensors(&tensors, meta)
    }

    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Self> {
        let corrupt = |p: String| {
            Error::artifact(
                what,
                format!("corrupt collection state ({p}); delete it or re-run with force=true"),
            )
        };
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| corrupt(e.to_string()))?;
        let meta: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
        let d: usize = meta
            .get("d")
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| corrupt("no width".into()))?;
        let layers: Vec<usize> = meta
            .get("layers")
            .ok_or_else(|| corrupt("no layers".into()))?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|l| l.parse().map_err(|_| corrupt(format!("layer '{l}'"))))
            .collect::<Result<_>>()?;
        let names: Vec<String> = layers
            .iter()
            .flat_map(|l| ["classes", "count", "mean", "m2"].map(|t| format!("layer{l}.{t}")))
            .collect();
        crate::stats::check_safetensors_hash(&st, &names, &meta).map_err(|e| corrupt(e.to_string()))?;
        let stats = layers
            .iter()
            .map(|l| {
                crate::stats::from_tensors(&st, &format!("layer{l}"), d).map_err(|e| corrupt(e.to_string()))
            })
            .collect::<Result<_>>()?;
        Ok(StateObject { layers, stats, meta })
    }

    pub fn save(&self, lake: &Lake, key: &str) -> Result<()> {
        Ok(lake.put(key, Bytes::from(self.to_bytes()?))?)
    }

    pub fn load(lake: &Lake, key: &str) -> Result<Option<Self>> {
        match lake.get_opt(key)? {
            None => Ok(None),
            Some(b) => Self::from_bytes(&b, &lake.display(key)).map(Some),
        }
    }
}

/// What collected statistics depend on, as manifest inputs: the chunks and
/// the model weights (by content).
pub fn collect_inputs(chunks: &Manifest, weights: InputRef) -> Vec<InputRef> {
    vec![chunks.input_ref(), weights]
}

/// Commit finished statistics as `class_stats/model=ID/split=S/layer=L`,
/// refusing (or with `force`, replacing) other layers of the same model and
/// split computed from other inputs.
pub fn commit_class_stats(
    lake: &Lake,
    model: &str,
    split: &str,
    layers: &[usize],
    stats: &[ClassStats],
    prov: &Provenance,
    force: bool,
) -> Result<Vec<Manifest>> {
    let siblings = lake.manifests("class_stats", &format!("model={model}/split={split}"))?;
    lake.check_siblings(&siblings, &prov.inputs, force)?;
    let mut out = Vec::new();
    for (l, s) in layers.iter().zip(stats) {
        if s.is_empty() {
            return Err(Error::invalid(format!("no samples were collected for layer {l}")));
        }
        let a = Artifact::new(
            "class_stats",
            &[("model", model), ("split", split), ("layer", &l.to_string())],
        )?;
        let p = prov
            .clone()
            .param("layer", l)
            .extra("classes", s.len() as u64)
            .extra("samples", s.samples())
            .extra("d", s.d as u64);
        out.push(lake.write_artifact(&a, &[crate::stats::to_batch(s)?], p)?);
    }
    Ok(out)
}
