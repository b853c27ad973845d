//! `collect`: one pass of a model over a split's chunks, accumulating
//! per-class embedding statistics (count, mean, M2) in f64.
//!
//! Reads: model weights, `chunks/dataset=D/split=S`, the dataset tokenizer.
//! Writes: `class_stats/model=ID/split=S/layer=L` (one artifact per layer),
//! or with `shard=i/n` (n > 1) a shard partial for `stage=merge`.
//!
//! Samples: for each chunk x_1..x_T, positions t = 1..T-1 give the embedding
//! h_t (after ln_f, or any hidden state with `layers=`) labelled by the next
//! token x_{t+1}. Each batch is reduced on the model's device to per-class
//! (count, mean, M2) and merged into the running statistics with Chan's
//! formula, so one forward pass yields means and variances together. The
//! running statistics live on the host, or (`accumulate=`, on a GPU by
//! default) in per-layer tables on the device (`device_stats`), read back
//! only for checkpoints and the result.
//! `vars=two-pass` instead computes the means in a first pass and the exact
//! squared distances to them in a second (a check on the one-pass numbers).
//!
//! Scale-out: `shard=i/n` takes the contiguous chunk range
//! [i*S/n, (i+1)*S/n); any number of independent processes can each take one
//! shard; `stage=merge` combines them. Resume: every `checkpoint_every` chunks
//! the statistics and the next chunk index are written as one object; a
//! restarted run with the same inputs continues from it and ends with the
//! same statistics as an uninterrupted run (the batches and their merge order
//! are the same).
//!
//! Refuses chunks tokenized with another vocabulary than the model's, a model
//! whose context is shorter than T, and an empty split.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Tensor};
use lc_lake::artifact::Provenance;
use lc_metrics::{ClassStats, Partial};

use crate::checkpoint::ModelRef;
use crate::chunks::Chunks;
use crate::error::{Context, Error, Result};
use crate::params::{ParamSpec, Params, param, required};
use crate::partials::{
    StateObject, collect_inputs, commit_class_stats, parse_layers, parse_shard, shard_key,
};
use crate::stages::{Ctx, Stage};
use lc_kernels::class_moments::{batch_m2_to, batch_partial};
use lc_kernels::device_stats::DeviceStats;
use lc_models::AttentionKernel;
use lc_models::CausalLm;

pub struct Collect;

const PARAMS: &[ParamSpec] = &[
    required(
        "model",
        "model: NAME[@K] trained here, or a Hugging Face directory[@K]",
    ),
    param(
        "dataset",
        "",
        "dataset (default: the one the model was trained on)",
    ),
    param("split", "train", "split whose samples are collected"),
    param(
        "layers",
        "last",
        "last | all | comma-separated hidden-state indices (0 = embeddings, L = ln_f output)",
    ),
    param("batch", "2", "sequences per forward pass"),
    param(
        "shard",
        "0/1",
        "i/n: process the i-th of n contiguous chunk ranges",
    ),
    param("checkpoint_every", "256", "chunks between resumable checkpoints"),
    param(
        "vars",
        "one-pass",
        "one-pass (Chan merges) | two-pass (exact check)",
    ),
    param("device", "cpu", "cpu or cuda[:N]"),
    param("dtype", "f32", "f32 | bf16 (GPU)"),
    param(
        "attention",
        "auto",
        "auto | blocks | fused: fused (flash attention in one kernel) needs device=cuda dtype=bf16; auto takes it there, blocks elsewhere",
    ),
    param(
        "accumulate",
        "auto",
        "auto | host | device: where the running class statistics live between checkpoints (auto: on a GPU, the device when they fit in a quarter of its free memory)",
    ),
    param(
        "stop_after",
        "0",
        "stop after this many chunks of this invocation, leaving a checkpoint (time-boxed jobs; 0 = run to the end)",
    ),
    param(
        "force",
        "false",
        "recompute, discarding checkpoints and stale results",
    ),
];

/// Timings of a collection run.
#[derive(Default)]
struct Clock {
    forward: f64,
    accumulate: f64,
    tokens: u64,
}

/// The running statistics of a collection, with each batch's Chan merge
/// on a helper thread while the device runs the next batch (on an H100 the
/// host-side merge of a batch was a sixth of a 12x1024 model's collection).
/// One merge is in flight at a time, so batches merge in order and results
/// equal the inline merge's. On the CPU merges run inline: the forward
/// already has every core.
struct MergeChan {
    stats: Vec<ClassStats>,
    pending: Option<std::thread::JoinHandle<Vec<ClassStats>>>,
    background: bool,
}

impl MergeChan {
    fn new(stats: Vec<ClassStats>, background: bool) -> Self {
        MergeChan {
            stats,
            pending: None,
            background,
        }
    }

    /// Merge one batch's partials (one per layer).
    fn merge(&mut self, partials: Vec<Partial>) -> Result<()> {
        let mut stats = std::mem::take(self.settled()?);
        let work = move || {
            for (s, p) in stats.iter_mut().zip(&partials) {
                s.merge_partial(p);
            }
            stats
        };
        if self.background {
            self.pending = Some(std::thread::spawn(work));
        } else {
            self.stats = work();
        }
        Ok(())
    }

    /// The statistics with every merge so far applied.
    fn settled(&mut self) -> Result<&mut Vec<ClassStats>> {
        if let Some(h) = self.pending.take() {
            self.stats = h
                .join()
                .map_err(|_| Error::invalid("the statistics merge thread panicked"))?;
        }
        Ok(&mut self.stats)
    }

    fn into_stats(mut self) -> Result<Vec<ClassStats>> {
        self.settled()?;
        Ok(self.stats)
    }
}

/// Where the running statistics live: merged on the host (`MergeChan`), or
/// in tables on the model's device (`DeviceStats`), which a GPU collection
/// never waits for between checkpoints.
enum Running {
    Host(MergeChan),
    Device(DeviceStats),
}

impl Running {
    fn add_batch(&mut self, hs: &[Tensor], labels: &[u32]) -> Result<()> {
        match self {
            Running::Host(m) => {
                let partials = hs
                    .iter()
                    .map(|h| batch_partial(h, labels))
                    .collect::<lc_kernels::Result<Vec<_>>>()?;
                m.merge(partials)
            }
            Running::Device(t) => Ok(t.add_batch(hs, labels)?),
        }
    }

    /// The statistics so far (for a checkpoint).
    fn snapshot(&mut self) -> Result<Cow<'_, [ClassStats]>> {
        match self {
            Running::Host(m) => Ok(Cow::Borrowed(m.settled()?)),
            Running::Device(t) => Ok(Cow::Owned(t.to_class_stats()?)),
        }
    }

    /// The host's statistics, which the second pass of `vars=two-pass`
    /// (always on the host) updates in place.
    fn host(&mut self) -> Result<&mut Vec<ClassStats>> {
        match self {
            Running::Host(m) => m.settled(),
            Running::Device(_) => Err(Error::invalid("vars=two-pass accumulates on the host")),
        }
    }

    fn into_stats(self) -> Result<Vec<ClassStats>> {
        match self {
            Running::Host(m) => m.into_stats(),
            Running::Device(t) => Ok(t.to_class_stats()?),
        }
    }
}

/// Run the model over `ids` and return, per requested layer, the sample
/// embeddings [B*(T-1), d] (positions 1..T-1) with their labels.
fn samples(
    model: &dyn CausalLm,
    ids: &[u32],
    b: usize,
    t: usize,
    layers: &[usize],
    attention: AttentionKernel,
) -> Result<(Vec<Tensor>, Vec<u32>)> {
    let x = Tensor::from_slice(ids, (b, t), model.device()).ctx("batch")?;
    let hs = model.hidden_states(&x, layers, attention)?;
    let d = model.shape().hidden_size;
    let hs = hs
        .into_iter()
        .map(|h| {
            h.narrow(1, 0, t - 1)
                .and_then(|h| h.reshape((b * (t - 1), d)))
                .ctx("positions")
        })
        .collect::<Result<_>>()?;
    let labels = ids.chunks_exact(t).flat_map(|r| r[1..].iter().copied()).collect();
    Ok((hs, labels))
}

/// Where the running class statistics live (`accumulate=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accumulate {
    /// On the device where its tables fit in a quarter of its free memory.
    Auto,
    Host,
    Device,
}

/// collect's parameters, checked before any work (`layers` needs the
/// model's depth and `attention=auto` its device, so those are resolved
/// once the model is).
struct CollectArgs<'a> {
    model: &'a str,
    dataset: Option<&'a str>,
    split: &'a str,
    layers: &'a str,
    batch: usize,
    shard: u64,
    of: u64,
    checkpoint_every: u64,
    stop_after: u64,
    two_pass: bool,
    accumulate: Accumulate,
    device: &'a str,
    dtype: DType,
    attention: &'a str,
    force: bool,
}

impl<'a> CollectArgs<'a> {
    fn parse(p: &'a Params) -> Result<Self> {
        let (shard, of) = parse_shard(p.str("shard")).map_err(|e| p.invalid("shard", e.to_string()))?;
        let two_pass = p.choice("vars", &["one-pass", "two-pass"])? == "two-pass";
        if two_pass && of > 1 {
            return Err(p.invalid("vars", "two-pass needs every chunk in one process; use shard=0/1"));
        }
        let accumulate = match p.choice("accumulate", &["auto", "host", "device"])? {
            "host" => Accumulate::Host,
            "device" => Accumulate::Device,
            _ => Accumulate::Auto,
        };
        if two_pass && accumulate == Accumulate::Device {
            return Err(p.invalid("accumulate", "vars=two-pass accumulates on the host"));
        }
        Ok(CollectArgs {
            model: p.nonempty("model")?,
            dataset: p.opt("dataset"),
            split: p.nonempty("split")?,
            layers: p.str("layers"),
            batch: p.usize_in("batch", 1, 1 << 16)?,
            shard,
            of,
            checkpoint_every: p.u64("checkpoint_every")?.max(1),
            stop_after: p.u64("stop_after")?,
            two_pass,
            accumulate,
            device: p.str("device"),
            dtype: lc_models::dtype(p.str("dtype"))?,
            attention: p.choice("attention", &["auto", "blocks", "fused"])?,
            force: p.bool("force")?,
        })
    }
}

impl Stage for Collect {
    fn name(&self) -> &'static str {
        "collect"
    }
    fn about(&self) -> &'static str {
        "one pass over a split: per-class count, mean and M2 of embeddings in f64 (sharded, resumable, CPU or GPU)"
    }
    fn reads(&self) -> &'static str {
        "weights, chunks, tokenizer"
    }
    fn writes(&self) -> &'static str {
        "class_stats (or a shard partial for merge)"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn check(&self, p: &Params) -> Result<()> {
        CollectArgs::parse(p).map(drop)
    }

    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String> {
        let args = CollectArgs::parse(p)?;
        let CollectArgs {
            split,
            batch,
            shard,
            of,
            checkpoint_every: every,
            stop_after,
            two_pass,
            accumulate,
            dtype,
            force,
            ..
        } = args;
        let m = ModelRef::resolve_one(&ctx.lake, args.model)?;
        let dataset = crate::stages::dataset_for(p, args.dataset, &m)?;
        let device = lc_models::device(args.device)?;
        // Measured on an H200 (README, GPUs): the fused kernel agrees with the
        // CPU as block attention does and takes 0.11-0.24x its time.
        let fusable = !device.is_cpu() && dtype == DType::BF16;
        let attention = match args.attention {
            "fused" if !fusable => {
                return Err(p.invalid("attention", "fused needs device=cuda and dtype=bf16"));
            }
            "fused" => AttentionKernel::Fused,
            "auto" if fusable => AttentionKernel::Fused,
            _ => AttentionKernel::Blocks,
        };

        let chunks = Chunks::open(&ctx.lake, &dataset, split)?;
        let (tok, _) = crate::tokenizer::for_dataset(&ctx.lake, &dataset)?;
        chunks.check_tokenizer(&tok)?;
        let config = m.config()?;
        m.check_vocab(&config, &tok)?;
        let shape = config.shape();
        let layers =
            parse_layers(args.layers, shape.num_layers).map_err(|e| p.invalid("layers", e.to_string()))?;
        if shape.max_positions < chunks.t {
            return Err(Error::model(
                &m.id,
                format!(
                    "context {} is shorter than the chunks' T = {}",
                    shape.max_positions, chunks.t
                ),
            ));
        }
        let weights = m.weights_input()?;
        let version = weights.content_hash.clone();
        let inputs = collect_inputs(&chunks.manifest, weights);
        let mut prov = Provenance::new("collect")
            .param("vars", if two_pass { "two-pass" } else { "one-pass" })
            .extra("model_source", m.source.as_str())
            .extra("dataset", dataset.as_str());
        prov.inputs = inputs.clone();

        // Already done?
        if of == 1 && !force {
            let mut done = true;
            for l in &layers {
                let a = lc_lake::artifact::Artifact::new(
                    "class_stats",
                    &[("model", &m.id), ("split", split), ("layer", &l.to_string())],
                )?;
                let want = prov.clone().param("layer", l);
                // Statistics merged from shards are the same statistics.
                done &= ctx
                    .lake
                    .manifest(&a)?
                    .is_some_and(|x| want.matches_ignoring(&x, &["merged_shards"]));
            }
            if done {
                return Ok(format!("class_stats/model={}/split={split}: up to date", m.id));
            }
        }
        if of == 1 {
            // Fail before the long pass rather than after it.
            let siblings = ctx
                .lake
                .manifests("class_stats", &format!("model={}/split={split}", m.id))?;
            if !force {
                ctx.lake.check_siblings(&siblings, &inputs, false)?;
            }
        }

        let range = (shard * chunks.count / of)..((shard + 1) * chunks.count / of);
        let state_id = blake3::hash(
            format!(
                "{}|{}|{}|{:?}|{two_pass}|{batch}|{shard}/{of}",
                m.id, version, chunks.manifest.content_hash, layers
            )
            .as_bytes(),
        )
        .to_hex()[..16]
            .to_string();
        if of > 1 && !force {
            // A shard already finished from the same inputs.
            let key = shard_key(&m.id, split, of, shard, false);
            if let Some(st) = StateObject::load(&ctx.lake, &key)?
                && st.meta.get("state_id") == Some(&state_id)
                && st.meta.get("complete").map(String::as_str) == Some("true")
            {
                return Ok(format!("shard {shard}/{of} of {} on {split}: up to date", m.id));
            }
        }
        ctx.would_run(format!("collect {} shard {shard}/{of}", m.id))?;
        let model = m.load(&device, dtype)?;
        let model = &*model;
        let d = model.shape().hidden_size;
        let resume_key = shard_key(&m.id, split, of, shard, true);

        let mut stats: Vec<ClassStats> = layers.iter().map(|_| ClassStats::new(d)).collect();
        let mut next = range.start;
        let mut pass = 1u32;
        if force {
            ctx.lake.delete(&resume_key)?;
        } else if let Some(st) = StateObject::load(&ctx.lake, &resume_key)? {
            if st.meta.get("state_id") == Some(&state_id) && st.layers == layers {
                next = st
                    .meta
                    .get("next")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(range.start);
                pass = st.meta.get("pass").and_then(|n| n.parse().ok()).unwrap_or(1);
                stats = st.stats;
                tracing::info!(model = %m.id, next, pass, "resuming collection");
            } else {
                tracing::warn!(key = %resume_key, "checkpoint belongs to other inputs; starting over");
            }
        }

        // The device's tables hold a row per token id of the model.
        let rows = shape.vocab_size;
        let on_device = match accumulate {
            Accumulate::Device => true,
            Accumulate::Host => false,
            Accumulate::Auto => {
                let need = DeviceStats::bytes(rows, d, layers.len());
                let free = lc_models::free_memory(&device);
                let fits = !two_pass && free.is_some_and(|f| need <= f / 4);
                if free.is_some() && !fits {
                    tracing::info!(
                        need_mb = need >> 20,
                        free_mb = free.unwrap_or(0) >> 20,
                        "class statistics stay on the host"
                    );
                }
                fits
            }
        };
        let mut running = if on_device {
            Running::Device(
                DeviceStats::new(&stats, rows, &device)
                    .map_err(|e| p.invalid("accumulate", format!("device tables: {e}")))?,
            )
        } else {
            Running::Host(MergeChan::new(stats, !device.is_cpu()))
        };
        let started = Instant::now();
        let mut clock = Clock::default();
        let save = |stats: &[ClassStats], next: u64, pass: u32| -> Result<()> {
            let mut meta = HashMap::new();
            meta.insert("state_id".into(), state_id.clone());
            meta.insert("next".into(), next.to_string());
            meta.insert("pass".into(), pass.to_string());
            StateObject {
                layers: layers.clone(),
                stats: stats.to_vec(),
                meta,
            }
            .save(&ctx.lake, &resume_key)
        };
        let passes = if two_pass { 2 } else { 1 };
        let mut budget = (stop_after > 0).then_some(stop_after);
        let total = (range.end - range.start) * passes as u64 * chunks.t as u64;
        let bar = lc_lake::progress::bar(total, "collect", "tok");
        bar.set_position(
            ((pass as u64 - 1) * (range.end - range.start) + (next - range.start)) * chunks.t as u64,
        );
        while pass <= passes {
            // Second pass: the final means, on the device, per layer.
            let means: Vec<Option<Tensor>> = if pass == 2 {
                running
                    .host()?
                    .iter()
                    .map(|s| {
                        Tensor::from_slice(&s.mean, (s.len(), d), &device)
                            .map(Some)
                            .ctx("means")
                    })
                    .collect::<Result<_>>()?
            } else {
                vec![None; layers.len()]
            };
            // With stop_after, this invocation covers whole batches up to the
            // budget and then leaves a checkpoint.
            let until = match budget {
                Some(left) => (next + left.div_ceil(batch as u64) * batch as u64).min(range.end),
                None => range.end,
            };
            let mut since = 0u64;
            let from = next;
            chunks.for_each_batch(&ctx.lake, next..until, batch, |first, ids, b| {
                let t0 = Instant::now();
                let (hs, labels) = samples(model, ids, b, chunks.t, &layers, attention)?;
                // Make the forward's time measurable apart from accumulation;
                // not with device tables, where the host runs ahead and the
                // GPU is never left waiting for it.
                if let (Some(h), false) = (hs.first(), on_device) {
                    h.device().synchronize().ctx("device sync")?;
                }
                let t1 = Instant::now();
                if pass == 1 {
                    running.add_batch(&hs, &labels)?;
                } else {
                    for ((h, s), mu) in hs.iter().zip(running.host()?.iter_mut()).zip(&means) {
                        if let Some(mu) = mu {
                            s.add_m2(&batch_m2_to(h, &labels, s, mu)?);
                        }
                    }
                }
                clock.forward += (t1 - t0).as_secs_f64();
                clock.accumulate += t1.elapsed().as_secs_f64();
                clock.tokens += (b * chunks.t) as u64;
                ctx.cancel.check()?;
                bar.inc((b * chunks.t) as u64);
                next = first + b as u64;
                since += b as u64;
                if since >= every && next < until {
                    save(&running.snapshot()?, next, pass)?;
                    since = 0;
                }
                Ok(())
            })?;
            if let Some(left) = budget.as_mut() {
                *left = left.saturating_sub(next - from);
            }
            if next < range.end {
                save(&running.snapshot()?, next, pass)?;
                bar.finish_and_clear();
                return Ok(format!(
                    "collect {} on {split}: stopped at chunk {next} of {} (stop_after={stop_after}); run again to continue",
                    m.id, range.end
                ));
            }
            if pass == 1 && two_pass {
                let stats = running.host()?;
                for s in stats.iter_mut() {
                    s.m2.iter_mut().for_each(|x| *x = 0.0);
                }
                next = range.start;
                save(stats, next, 2)?;
            }
            pass += 1;
        }
        let stats = running.into_stats()?;
        bar.finish_and_clear();
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let rate = clock.tokens as f64 / secs;
        // With device tables the host does not wait for the forward, so
        // the split between forward and accumulation is not measured.
        let share = (!on_device).then(|| clock.accumulate / (clock.forward + clock.accumulate).max(1e-9));
        let accumulated = match share {
            Some(share) => format!("{:.1}% accumulating", 100.0 * share),
            None => "statistics on the device".to_string(),
        };
        tracing::debug!(
            "collected {} tokens at {rate:.0} tokens/s, {accumulated}",
            clock.tokens
        );

        let summary = if of == 1 {
            let mut prov = prov
                .extra("tokens_per_s", rate)
                .extra("accumulate", if on_device { "device" } else { "host" });
            if let Some(share) = share {
                prov = prov.extra("accumulate_share", share);
            }
            let ms = commit_class_stats(&ctx.lake, &m.id, split, &layers, &stats, &prov, force)?;
            format!(
                "class_stats/model={}/split={split}: {} layer(s), {} classes, {} samples ({rate:.0} tokens/s, {accumulated})",
                m.id,
                ms.len(),
                stats[0].len(),
                stats[0].samples(),
            )
        } else {
            let mut meta = HashMap::new();
            meta.insert("state_id".into(), state_id.clone());
            meta.insert("complete".into(), "true".into());
            meta.insert("inputs".into(), serde_json::to_string(&inputs).expect("json"));
            meta.insert("range".into(), format!("{}..{}", range.start, range.end));
            meta.insert("vars".into(), "one-pass".into());
            meta.insert("dataset".into(), dataset.clone());
            meta.insert("model_source".into(), m.source.clone());
            let key = shard_key(&m.id, split, of, shard, false);
            StateObject {
                layers: layers.clone(),
                stats: stats.clone(),
                meta,
            }
            .save(&ctx.lake, &key)?;
            format!(
                "shard {shard}/{of} of {} on {split}: chunks {}..{}, {} samples -> {} ({rate:.0} tokens/s); run stage=merge when all shards are done",
                m.id,
                range.start,
                range.end,
                stats[0].samples(),
                ctx.lake.display(&key)
            )
        };
        ctx.lake.delete(&resume_key)?;
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Merging on the helper thread gives the inline merge's statistics,
    /// bit for bit (same batches, same order), for two layers.
    #[test]
    fn background_merges_equal_inline_merges() {
        let d = 4;
        let mut seed = 3u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let batches: Vec<(Tensor, Vec<u32>)> = (0..6)
            .map(|_| {
                let vals: Vec<f64> = (0..50 * d).map(|_| next()).collect();
                let labels: Vec<u32> = (0..50).map(|_| (next() * 9.0) as u32).collect();
                (Tensor::from_vec(vals, (50, d), &Device::Cpu).unwrap(), labels)
            })
            .collect();
        let run = |background: bool| {
            let mut m = MergeChan::new(vec![ClassStats::new(d), ClassStats::new(d)], background);
            for (h, labels) in &batches {
                let p = batch_partial(h, labels).unwrap();
                let q = batch_partial(&(h * 2.0).unwrap(), labels).unwrap();
                m.merge(vec![p, q]).unwrap();
            }
            m.into_stats().unwrap()
        };
        let (inline, background) = (run(false), run(true));
        assert_eq!(inline, background);
        assert_eq!(inline[0].samples(), 300);
    }
}
