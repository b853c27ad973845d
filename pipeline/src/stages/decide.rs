//! `decide`: NC4 classifier agreement on a split (validation by default).
//!
//! Reads: `class_stats/model=ID/split=train/layer=L` (the class means), the
//! model (its classifier rows W and the embeddings), `chunks` of the split.
//! Writes: `decisions/model=ID/split=S/layer=L`, per true class: samples, NC4
//! hits (both decisions agree), and how often each decision is right.
//!
//! For every sample h, over the analysed classes V' (N_c within
//! [min_per_class, max_per_class] in the class statistics, ascending id):
//! the linear decision argmax_c <w_c, h> and the nearest-class-centre decision
//! argmin_c ||h - mu_c||, computed as argmax_c (2<h, mu_c> - ||mu_c||^2)
//! (||h||^2 is the same for every c). Both walk V' in cache-sized chunks of
//! class rows, one GEMM each, with a running maximum per sample
//! (`lc_models::output_layer`): the samples x |V'| scores are never formed.
//! Ties resolve to the lowest class id (the first maximum). Every sample is counted; each row
//! says whether its true label is in V', so NC4 can be reported over all
//! samples and over those with analysed labels (the authors' denominator).
//! `precision=f64` (default) computes
//! both products in f64, so decisions match an exact evaluation except at
//! ties below f64 resolution; `f32` is faster (GPU).

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, UInt32Array, UInt64Array};
use arrow::record_batch::RecordBatch;
use candle_core::{DType, Tensor};
use lc_lake::artifact::{Artifact, Provenance, file_schema};
use lc_metrics::nc4::{Centres, Nc4Tally, Tally};

use crate::checkpoint::ModelRef;
use crate::chunks::Chunks;
use crate::error::{Context, Error, Result};
use crate::params::{LayerSpec, ParamSpec, Params, param, required};
use crate::stages::{Ctx, Stage};
use lc_models::{AttentionKernel, output_layer};

pub struct Decide;

const PARAMS: &[ParamSpec] = &[
    required("model", "model: NAME[@K] or a Hugging Face directory[@K]"),
    param(
        "dataset",
        "",
        "dataset (default: the one the model was trained on)",
    ),
    param("split", "validation", "split whose samples are classified"),
    param("stats_split", "train", "split of the class means"),
    param(
        "layer",
        "last",
        "hidden-state index of the means and embeddings (last = ln_f output)",
    ),
    param(
        "min_per_class",
        "1",
        "V': classes with at least this many samples",
    ),
    param(
        "max_per_class",
        "0",
        "V': classes with at most this many samples (0 = no limit)",
    ),
    param("batch", "2", "sequences per forward pass"),
    param("precision", "f64", "f64 | f32 for the two products"),
    param("device", "cpu", "cpu or cuda[:N]"),
    param("force", "false", "recompute even when up to date"),
];

/// decide's parameters, checked before any work.
struct DecideArgs<'a> {
    model: &'a str,
    dataset: Option<&'a str>,
    split: &'a str,
    stats_split: &'a str,
    layer: LayerSpec,
    min_per_class: u64,
    max_per_class: u64,
    batch: usize,
    /// Of both products; `f64` matches an exact evaluation but at ties.
    precision: DType,
    device: &'a str,
    force: bool,
}

impl<'a> DecideArgs<'a> {
    fn parse(p: &'a Params) -> Result<Self> {
        Ok(DecideArgs {
            model: p.nonempty("model")?,
            dataset: p.opt("dataset"),
            split: p.nonempty("split")?,
            stats_split: p.nonempty("stats_split")?,
            layer: p.layer("layer")?,
            min_per_class: p.u64("min_per_class")?,
            max_per_class: p.u64("max_per_class")?,
            batch: p.usize_in("batch", 1, 1 << 16)?,
            precision: match p.choice("precision", &["f64", "f32"])? {
                "f64" => DType::F64,
                _ => DType::F32,
            },
            device: p.str("device"),
            force: p.bool("force")?,
        })
    }
}

impl Stage for Decide {
    fn name(&self) -> &'static str {
        "decide"
    }
    fn about(&self) -> &'static str {
        "NC4: per sample, linear (argmax <w_c,h>) vs nearest-class-centre decision over V'; per-class hits"
    }
    fn reads(&self) -> &'static str {
        "class_stats, weights, chunks"
    }
    fn writes(&self) -> &'static str {
        "decisions"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn check(&self, p: &Params) -> Result<()> {
        DecideArgs::parse(p).map(drop)
    }

    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String> {
        let args = DecideArgs::parse(p)?;
        let (split, stats_split) = (args.split, args.stats_split);
        let (min, max, dt) = (args.min_per_class, args.max_per_class, args.precision);
        let m = ModelRef::resolve_one(&ctx.lake, args.model)?;
        let dataset = crate::stages::dataset_for(p, args.dataset, &m)?;
        let config = m.config()?;
        let layer = args.layer.index(p, "layer", config.shape().num_layers)?;
        let stats_a = Artifact::new(
            "class_stats",
            &[
                ("model", &m.id),
                ("split", stats_split),
                ("layer", &layer.to_string()),
            ],
        )?;
        let stats_m = ctx
            .lake
            .require(&stats_a, "run stage=collect for this model first")?;
        let chunks = Chunks::open(&ctx.lake, &dataset, split)?;
        let (tok, _) = crate::tokenizer::for_dataset(&ctx.lake, &dataset)?;
        chunks.check_tokenizer(&tok)?;
        let version = m.weights_version()?;
        if !stats_m.inputs.iter().any(|i| i.content_hash == version) {
            return Err(Error::Stale(format!(
                "{} was collected from other weights than {} has now; re-run collect",
                stats_m.artifact, m.id
            )));
        }
        let out = Artifact::new(
            "decisions",
            &[("model", &m.id), ("split", split), ("layer", &layer.to_string())],
        )?;
        let prov = Provenance::new("decide")
            .param("min_per_class", min)
            .param("max_per_class", max)
            .param("precision", dt.as_str())
            .input(&stats_m)
            .input(&chunks.manifest);
        if ctx.lake.up_to_date(&out, &prov, args.force)?.is_some() {
            return Ok(format!("{out}: up to date"));
        }
        ctx.would_run(format!("decide {out}"))?;

        let device = lc_models::device(args.device)?;
        m.check_vocab(&config, &tok)?;
        let model = m.load(&device, DType::F32)?;
        let stats = crate::stats::from_batches(&ctx.lake.read_artifact(&stats_a)?)?;
        let rows = stats.analysed(min, max);
        if rows.is_empty() {
            return Err(Error::invalid(format!(
                "no class of {} has between {min} and {} samples",
                stats_a,
                if max == 0 {
                    "any".to_string()
                } else {
                    max.to_string()
                }
            )));
        }
        let d = stats.d;
        let centres = Centres::new(&stats, &rows);
        let setup = || -> candle_core::Result<(Tensor, Tensor, Tensor)> {
            let mu = Tensor::from_slice(&centres.mu, (rows.len(), d), &device)?.to_dtype(dt)?;
            let mu_sq = Tensor::from_slice(&centres.mu_sq, rows.len(), &device)?.to_dtype(dt)?;
            let idx = Tensor::from_slice(&centres.ids, rows.len(), &device)?;
            let w = model.classifier().index_select(&idx, 0)?.to_dtype(dt)?;
            Ok((mu.contiguous()?, mu_sq, w.contiguous()?))
        };
        let (mu, mu_sq, w) = setup().ctx("classifier and means")?;
        let t = chunks.t;
        let mut tally = Nc4Tally::default();
        let bar = lc_lake::progress::bar(chunks.count * t as u64, "decide", "tok");
        chunks.for_each_batch(&ctx.lake, 0..chunks.count, args.batch, |_, tokens, b| {
            let x = Tensor::from_slice(tokens, (b, t), &device).ctx("batch")?;
            // Block attention as before: the fused kernel is measured for collect.
            let h = model
                .hidden_states(&x, &[layer], AttentionKernel::Blocks)?
                .remove(0);
            let h = h
                .narrow(1, 0, t - 1)
                .and_then(|h| h.reshape((b * (t - 1), d)))
                .and_then(|h| h.to_dtype(dt))
                .ctx("positions")?;
            // Both decisions walk V' in cache-sized chunks, never forming
            // the samples x |V'| scores (lc_models::output_layer).
            let decide = || -> Result<(Vec<u32>, Vec<u32>)> {
                let lin = output_layer::affine_argmax(&h, &w, 1.0, None)?;
                let ncc = output_layer::affine_argmax(&h, &mu, 2.0, Some(&mu_sq))?;
                Ok((lin, ncc))
            };
            let (lin, ncc) = decide()?;
            let labels = tokens.chunks_exact(t).flat_map(|r| r[1..].iter().copied());
            for ((y, l), n) in labels.zip(lin).zip(ncc) {
                tally.record(y, centres.ids[l as usize], centres.ids[n as usize]);
            }
            ctx.cancel.check()?;
            bar.inc((b * t) as u64);
            Ok(())
        })?;
        bar.finish_and_clear();
        let by_class = &tally.by_class;
        let col = |f: fn(&Tally) -> u64| -> ArrayRef {
            Arc::new(UInt64Array::from_iter_values(by_class.values().map(f)))
        };
        let cols: Vec<ArrayRef> = vec![
            Arc::new(UInt32Array::from_iter_values(by_class.keys().copied())),
            col(|t| t.samples),
            col(|t| t.agree),
            col(|t| t.linear_correct),
            col(|t| t.ncc_correct),
            // Whether the true label is itself in V'.
            Arc::new(BooleanArray::from_iter(
                by_class.keys().map(|&y| Some(centres.contains(y))),
            )),
        ];
        let batch = RecordBatch::try_new(file_schema("decisions")?, cols).ctx("building decisions")?;
        let (samples, _) = tally.total();
        ctx.lake
            .write_artifact(&out, &[batch], prov.extra("classes_analysed", rows.len() as u64))?;
        Ok(format!(
            "{out}: NC4 agreement {:.4} over {samples} samples, |V'| = {}",
            tally.agreement(),
            rows.len()
        ))
    }
}
