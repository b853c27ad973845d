//! `eval`: validation cross-entropy, next-token accuracy and perplexity.
//!
//! Reads: model weights (trained ones in the lake or any Hugging Face
//! directory), `chunks/dataset=D/split=validation`.
//! Writes: `models/model=ID`, one row per model checkpoint.
//!
//! The loss is the mean over all validation samples (every chunk position
//! with a next token, B x (T-1) per batch) of the full-vocabulary cross
//! entropy, accumulated in f64; accuracy counts argmax == next token (ties to
//! the lowest id); perplexity = exp(loss). Both come from one walk through
//! the output layer (`lc_models::output_layer`), which never forms the
//! [samples, V] logits; every family's output layer is h Wᵀ (no bias, no
//! scaling), which is what it computes. For a model trained here,
//! `model=NAME` evaluates each of its epoch checkpoints (`NAME@0`, ...);
//! `model=all` every model in the lake.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int32Array, StringArray, UInt32Array, UInt64Array};
use arrow::record_batch::RecordBatch;
use candle_core::{DType, Tensor};
use lc_lake::artifact::{Artifact, Provenance, file_schema};
use lc_lake::lake::Lake;

use crate::checkpoint::{ModelRef, list_checkpoints};
use crate::chunks::Chunks;
use crate::error::{Context, Error, Result};
use crate::params::{ParamSpec, Params, param, required};
use crate::stages::{Ctx, Stage};
use lc_models::{AttentionKernel, CausalLm, naming, output_layer};

pub struct Eval;

const PARAMS: &[ParamSpec] = &[
    required(
        "model",
        "model id(s), comma-separated: NAME, NAME@K, a Hugging Face directory, or all",
    ),
    param(
        "dataset",
        "",
        "dataset to evaluate on (default: the one the model was trained on)",
    ),
    param("split", "validation", "split of the dataset"),
    param("batch", "4", "sequences per forward pass"),
    param("device", "cpu", "cpu or cuda[:N]"),
    param("force", "false", "re-evaluate even when up to date"),
];

/// eval's parameters, checked before any work.
struct EvalArgs<'a> {
    model: &'a str,
    dataset: Option<&'a str>,
    split: &'a str,
    batch: usize,
    device: &'a str,
    force: bool,
}

impl<'a> EvalArgs<'a> {
    fn parse(p: &'a Params) -> Result<Self> {
        Ok(EvalArgs {
            model: p.nonempty("model")?,
            dataset: p.opt("dataset"),
            split: p.nonempty("split")?,
            batch: p.usize_in("batch", 1, 4096)?,
            device: p.str("device"),
            force: p.bool("force")?,
        })
    }
}

/// Expand `model=` into concrete checkpoint references.
pub fn expand_models(lake: &Lake, spec: &str) -> Result<Vec<ModelRef>> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if item == "all" {
            let mut names: Vec<String> = lake
                .list("weights")?
                .into_iter()
                .filter_map(|(k, _)| {
                    k.strip_prefix("weights/")
                        .and_then(|r| r.split('/').next())
                        .map(str::to_string)
                })
                .collect();
            names.sort();
            names.dedup();
            for n in names {
                out.extend(expand_models(lake, &n)?);
            }
            continue;
        }
        if item.contains('@') {
            out.push(ModelRef::resolve(lake, item)?);
            continue;
        }
        // A trained model without @K means each of its epoch checkpoints; so
        // does a directory that only has checkpoint-N subdirectories.
        let (r, top_level) = match ModelRef::resolve(lake, item) {
            Ok(r) => (r, true),
            Err(e) => match ModelRef::resolve(lake, &format!("{item}@0")) {
                Ok(r) => (r, false),
                Err(_) => return Err(e),
            },
        };
        if r.in_lake || !top_level {
            let n = list_checkpoints(&r.store, &r.root)?.len();
            if n > 0 {
                for k in 0..n {
                    out.push(ModelRef::resolve(lake, &format!("{item}@{k}"))?);
                }
                continue;
            }
        }
        out.push(r);
    }
    if out.is_empty() {
        return Err(Error::invalid(format!("model='{spec}' names no model")));
    }
    Ok(out)
}

/// Sum of losses, correct predictions and samples over a split.
struct Totals {
    loss: f64,
    correct: u64,
    samples: u64,
}

fn evaluate(ctx: &Ctx, model: &dyn CausalLm, chunks: &Chunks, batch: usize) -> Result<Totals> {
    let t = chunks.t;
    let depth = model.shape().num_layers;
    let d = model.shape().hidden_size;
    let mut tot = Totals {
        loss: 0.0,
        correct: 0,
        samples: 0,
    };
    let bar = lc_lake::progress::bar(chunks.count * t as u64, "eval", "tok");
    chunks.for_each_batch(&ctx.lake, 0..chunks.count, batch, |_, ids, b| {
        let labels: Vec<u32> = ids.chunks_exact(t).flat_map(|r| r[1..].iter().copied()).collect();
        let x = Tensor::from_slice(ids, (b, t), model.device()).ctx("batch")?;
        // Block attention as before: the fused kernel is measured for collect.
        let h = model
            .hidden_states(&x, &[depth], AttentionKernel::Blocks)?
            .remove(0);
        let h = h
            .narrow(1, 0, t - 1)
            .and_then(|h| h.reshape((b * (t - 1), d)))
            .ctx("positions")?;
        // The output layer walked in cache-sized vocabulary chunks: no
        // [rows, V] logits (lc_models::output_layer).
        let rows = b * (t - 1);
        let (losses, argmax) = output_layer::loss_and_argmax(&h, model.classifier(), &labels)?;
        tot.loss += losses.iter().sum::<f64>();
        tot.correct += argmax.iter().zip(&labels).filter(|(a, y)| a == y).count() as u64;
        tot.samples += rows as u64;
        ctx.cancel.check()?;
        bar.inc((b * t) as u64);
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(tot)
}

impl Stage for Eval {
    fn name(&self) -> &'static str {
        "eval"
    }
    fn about(&self) -> &'static str {
        "validation cross-entropy, accuracy and perplexity per model checkpoint"
    }
    fn reads(&self) -> &'static str {
        "weights (lake or Hugging Face directory), chunks (validation)"
    }
    fn writes(&self) -> &'static str {
        "models"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn check(&self, p: &Params) -> Result<()> {
        EvalArgs::parse(p).map(drop)
    }

    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String> {
        let args = EvalArgs::parse(p)?;
        let (split, batch) = (args.split, args.batch);
        let device = lc_models::device(args.device)?;
        let mut lines = Vec::new();
        for m in expand_models(&ctx.lake, args.model)? {
            let dataset = crate::stages::dataset_for(p, args.dataset, &m)?;
            let chunks = Chunks::open(&ctx.lake, &dataset, split)?;
            let (tok, _) = crate::tokenizer::for_dataset(&ctx.lake, &dataset)?;
            chunks.check_tokenizer(&tok)?;
            let weights_version = m.weights_version()?;
            let out = Artifact::new("models", &[("model", &m.id)])?;
            let prov = Provenance::new("eval")
                .param("weights", &weights_version)
                .param("split", split)
                .input(&chunks.manifest);
            if ctx.lake.up_to_date(&out, &prov, args.force)?.is_some() {
                lines.push(format!("{}: up to date", m.id));
                continue;
            }
            ctx.would_run(format!("eval {}", m.id))?;
            let config = m.config()?;
            m.check_vocab(&config, &tok)?;
            let max = config.shape().max_positions;
            if max < chunks.t {
                return Err(Error::model(
                    &m.id,
                    format!("context {max} is shorter than the chunks' T = {}", chunks.t),
                ));
            }
            let model = m.load(&device, DType::F32)?;
            let tot = evaluate(ctx, &*model, &chunks, batch)?;
            let val_loss = tot.loss / tot.samples as f64;
            let acc = tot.correct as f64 / tot.samples as f64;
            let row = model_row(&m, &*model, &dataset, &tot, val_loss, acc)?;
            ctx.lake.write_artifact(&out, &[row], prov)?;
            lines.push(format!(
                "{}: val_loss {val_loss:.4}, acc {acc:.4}, perplexity {:.2} over {} samples",
                m.id,
                val_loss.exp(),
                tot.samples
            ));
        }
        Ok(lines.join("\n"))
    }
}

fn model_row(
    m: &ModelRef,
    model: &dyn CausalLm,
    dataset: &str,
    tot: &Totals,
    val_loss: f64,
    acc: f64,
) -> Result<RecordBatch> {
    let cfg = model.shape();
    let recipe = m.recipe()?.and_then(|r| r.get("recipe").cloned());
    let state = m.trainer_state()?;
    let grid = naming::parse(&m.name);
    let r_u = |k: &str| recipe.as_ref().and_then(|r| r.get(k)).and_then(|v| v.as_u64());
    let r_f = |k: &str| recipe.as_ref().and_then(|r| r.get(k)).and_then(|v| v.as_f64());
    let s_u = |k: &str| state.as_ref().and_then(|s| s.get(k)).and_then(|v| v.as_u64());
    let epochs = r_u("epochs")
        .map(|e| e as u32)
        .or(grid.as_ref().map(|g| g.epochs));
    let decay = r_f("weight_decay").or(grid.as_ref().map(|g| g.weight_decay));
    let init_seed = r_u("init_seed").or(grid.as_ref().and_then(|g| g.seed.map(u64::from)));
    let data_seed = r_u("data_seed").or(grid.as_ref().and_then(|g| g.seed.map(u64::from)));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![m.name.as_str()])),
        Arc::new(Int32Array::from(vec![m.checkpoint.map(|k| k as i32)])),
        Arc::new(UInt64Array::from(vec![m.step.or(s_u("global_step"))])),
        Arc::new(UInt32Array::from(vec![cfg.num_layers as u32])),
        Arc::new(UInt32Array::from(vec![cfg.hidden_size as u32])),
        Arc::new(UInt32Array::from(vec![cfg.num_heads as u32])),
        Arc::new(UInt32Array::from(vec![cfg.vocab_size as u32])),
        Arc::new(UInt64Array::from(vec![model.n_params()])),
        Arc::new(UInt32Array::from(vec![epochs])),
        Arc::new(UInt32Array::from(vec![s_u("epoch").map(|e| e as u32)])),
        Arc::new(Float64Array::from(vec![decay])),
        Arc::new(UInt64Array::from(vec![init_seed])),
        Arc::new(UInt64Array::from(vec![data_seed])),
        Arc::new(UInt64Array::from(vec![s_u("train_tokens")])),
        Arc::new(StringArray::from(vec![dataset])),
        Arc::new(UInt64Array::from(vec![tot.samples])),
        Arc::new(Float64Array::from(vec![val_loss])),
        Arc::new(Float64Array::from(vec![acc])),
        Arc::new(Float64Array::from(vec![val_loss.exp()])),
        Arc::new(StringArray::from(vec![m.source.as_str()])),
    ];
    RecordBatch::try_new(file_schema("models")?, cols).ctx("building the models row")
}
