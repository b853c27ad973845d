//! `merge`: combine the shard partials of `collect shard=i/n` into
//! `class_stats`.
//!
//! Reads: `partials/collect/model=ID/split=S/of=N/shard=I.safetensors` for
//! every I < N. Writes: `class_stats/model=ID/split=S/layer=L`.
//!
//! All shards must be finished and computed from the same model weights,
//! chunks and layers; they are merged in shard order with Chan's formula,
//! which is exact and order-independent up to float rounding.

use lc_lake::artifact::{Artifact, Provenance};
use lc_lake::manifest::InputRef;
use lc_metrics::ClassStats;

use crate::checkpoint::ModelRef;
use crate::chunks::Chunks;
use crate::error::{Error, Result};
use crate::params::{ParamSpec, Params, param, required};
use crate::partials::{StateObject, collect_inputs, commit_class_stats, parse_layers, shard_key};
use crate::stages::{Ctx, Stage};

pub struct Merge;

const PARAMS: &[ParamSpec] = &[
    required(
        "model",
        "the model the shards were collected for (as given to collect)",
    ),
    param(
        "dataset",
        "",
        "dataset (default: the one the model was trained on)",
    ),
    param("split", "train", "split"),
    param("layers", "last", "the layers collect was given"),
    required("shards", "n, the number of shards"),
    param(
        "force",
        "false",
        "merge even when class_stats is up to date, replacing what other inputs made",
    ),
];

/// merge's parameters, checked before any work (`layers` needs the model's
/// depth, so it is resolved once the model is).
struct MergeArgs<'a> {
    model: &'a str,
    dataset: Option<&'a str>,
    split: &'a str,
    layers: &'a str,
    shards: u64,
    force: bool,
}

impl<'a> MergeArgs<'a> {
    fn parse(p: &'a Params) -> Result<Self> {
        let shards = p.u64("shards")?;
        if shards == 0 {
            return Err(p.invalid("shards", "must be at least 1"));
        }
        Ok(MergeArgs {
            model: p.nonempty("model")?,
            dataset: p.opt("dataset"),
            split: p.nonempty("split")?,
            layers: p.str("layers"),
            shards,
            force: p.bool("force")?,
        })
    }
}

impl Stage for Merge {
    fn name(&self) -> &'static str {
        "merge"
    }
    fn about(&self) -> &'static str {
        "merge the shard partials of collect shard=i/n into class_stats (Chan's formula)"
    }
    fn reads(&self) -> &'static str {
        "partials/collect"
    }
    fn writes(&self) -> &'static str {
        "class_stats"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn check(&self, p: &Params) -> Result<()> {
        MergeArgs::parse(p).map(drop)
    }

    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String> {
        let args = MergeArgs::parse(p)?;
        let (split, n, force) = (args.split, args.shards, args.force);
        let m = ModelRef::resolve_one(&ctx.lake, args.model)?;
        let id = m.id.clone();
        let dataset = crate::stages::dataset_for(p, args.dataset, &m)?;
        let chunks = Chunks::open(&ctx.lake, &dataset, split)?;
        let depth = m.config()?.shape().num_layers;
        let layers = parse_layers(args.layers, depth).map_err(|e| p.invalid("layers", e.to_string()))?;
        let mut prov = Provenance::new("collect")
            .param("vars", "one-pass")
            .param("merged_shards", n)
            .extra("model_source", m.source.as_str())
            .extra("dataset", dataset.as_str());
        prov.inputs = collect_inputs(&chunks.manifest, m.weights_input()?);
        if !force {
            let mut done = true;
            for l in &layers {
                let a = Artifact::new(
                    "class_stats",
                    &[("model", &id), ("split", split), ("layer", &l.to_string())],
                )?;
                let want = prov.clone().param("layer", l);
                // However many shards made them (or none): the same statistics.
                done &= ctx
                    .lake
                    .manifest(&a)?
                    .is_some_and(|x| want.matches_ignoring(&x, &["merged_shards"]));
            }
            if done {
                return Ok(format!(
                    "class_stats/model={id}/split={split}: up to date (already computed from these weights and chunks; force=true merges again)"
                ));
            }
        }
        ctx.would_run(format!("merge {id} from {n} shards"))?;
        let mut missing = Vec::new();
        let mut parts = Vec::new();
        for i in 0..n {
            let key = shard_key(&id, split, n, i, false);
            match StateObject::load(&ctx.lake, &key)? {
                Some(s) => parts.push((key, s)),
                None => missing.push(i.to_string()),
            }
        }
        if !missing.is_empty() {
            return Err(Error::invalid(format!(
                "shards {} of {n} for {id} on {split} are not finished (no {})",
                missing.join(", "),
                ctx.lake
                    .display(&shard_key(&id, split, n, 0, false).replace("shard=0", "shard=I"))
            )));
        }
        let (first_key, first) = &parts[0];
        let inputs_json = first
            .meta
            .get("inputs")
            .ok_or_else(|| Error::artifact(first_key, "partial lacks its inputs"))?;
        for (key, s) in &parts {
            if s.meta.get("complete").map(String::as_str) != Some("true") {
                return Err(Error::artifact(key, "partial is not complete"));
            }
            if s.meta.get("inputs") != Some(inputs_json) || s.layers != first.layers {
                return Err(Error::Stale(format!(
                    "{key} was computed from other inputs or layers than {first_key}; re-collect the stale shards"
                )));
            }
        }
        let inputs: Vec<InputRef> = serde_json::from_str(inputs_json)
            .map_err(|e| Error::artifact(first_key, format!("bad inputs: {e}")))?;
        if inputs != prov.inputs || first.layers != layers {
            return Err(Error::Stale(format!(
                "{first_key} was collected from other weights, chunks or layers than {id} has now; re-collect the shards"
            )));
        }
        let d = first.stats[0].d;
        let mut merged: Vec<ClassStats> = layers.iter().map(|_| ClassStats::new(d)).collect();
        for (_, s) in &parts {
            for (acc, part) in merged.iter_mut().zip(&s.stats) {
                acc.merge(part)?;
            }
        }
        commit_class_stats(&ctx.lake, &id, split, &layers, &merged, &prov, force)?;
        Ok(format!(
            "class_stats/model={id}/split={split}: merged {n} shards, {} layer(s), {} classes, {} samples",
            layers.len(),
            merged[0].len(),
            merged[0].samples()
        ))
    }
}
