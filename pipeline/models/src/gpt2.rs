//! GPT-2 (`GPT2LMHeadModel`) as a plain candle model.
//!
//! Learned absolute positions, pre-LN blocks, one fused q/k/v projection
//! and MLP projections stored as `Conv1D` weights ([in, out], so x W + b),
//! attention scaled by 1/sqrt(d_head) (`scale_attn_weights`, and by
//! 1/(layer + 1) with `scale_attn_by_inverse_layer_idx`), an MLP of width
//! `n_inner` (default 4d), a final `ln_f`, and a head tied to the token
//! embedding. Checkpoints name tensors `transformer.*` (what
//! `save_pretrained` writes) or without the prefix (the original `gpt2`
//! upload); both load.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::causal_lm::{CausalLm, Shape, layer_count, take};
use crate::error::{Context, Error, Result};
use crate::layers::{Activation, AttentionKernel, Keep, LayerNorm, attend, heads, linear};
use lc_kernels::bias_add::bias_residual;

#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_inner: usize,
    pub activation: Activation,
    pub layer_norm_epsilon: f64,
    pub scale_attn_weights: bool,
    pub scale_attn_by_inverse_layer_idx: bool,
}

impl Gpt2Config {
    pub fn from_json(v: &Value, model: &str) -> Result<Self> {
        let bad = |p: String| Error::model(model, format!("config.json: {p}"));
        let uint = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("missing or non-integer '{k}'")))
        };
        let act = v
            .get("activation_function")
            .and_then(Value::as_str)
            .unwrap_or("gelu_new");
        let activation = Activation::parse(act)
            .ok_or_else(|| bad(format!("activation_function '{act}' is not supported")))?;
        if v.get("reorder_and_upcast_attn").and_then(Value::as_bool) == Some(true) {
            // Only the order of f32 upcasts differs; the arithmetic is ours anyway.
            tracing::debug!(
                model,
                "reorder_and_upcast_attn: scores are computed in f32 already"
            );
        }
        let n_embd = uint("n_embd")?;
        let c = Gpt2Config {
            vocab_size: uint("vocab_size")?,
            n_positions: uint("n_positions")?,
            n_embd,
            n_layer: layer_count(uint("n_layer")?, "n_layer", model)?,
            n_head: uint("n_head")?,
            n_inner: v
                .get("n_inner")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(4 * n_embd),
            activation,
            layer_norm_epsilon: v
                .get("layer_norm_epsilon")
                .and_then(Value::as_f64)
                .unwrap_or(1e-5),
            scale_attn_weights: v
                .get("scale_attn_weights")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            scale_attn_by_inverse_layer_idx: v
                .get("scale_attn_by_inverse_layer_idx")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        if c.n_head == 0 || !c.n_embd.is_multiple_of(c.n_head) {
            return Err(bad(format!(
                "n_embd {} is not divisible by n_head {}",
                c.n_embd, c.n_head
            )));
        }
        Ok(c)
    }

    pub fn shape(&self) -> Shape {
        Shape {
            model_type: "gpt2".into(),
            vocab_size: self.vocab_size,
            hidden_size: self.n_embd,
            num_layers: self.n_layer,
            num_heads: self.n_head,
            max_positions: self.n_positions,
            tie_word_embeddings: true,
        }
    }
}

struct Block {
    ln_1: LayerNorm,
    /// Weights transposed once at load to the [out, in] layout of `linear`.
    attn_w: Tensor,
    attn_b: Tensor,
    proj_w: Tensor,
    proj_b: Tensor,
    ln_2: LayerNorm,
    fc_w: Tensor,
    fc_b: Tensor,
    out_w: Tensor,
    out_b: Tensor,
}

pub struct Gpt2 {
    config: Gpt2Config,
    shape: Shape,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    device: Device,
}

impl Gpt2 {
    pub fn from_tensors(config: &Gpt2Config, mut tensors: HashMap<String, Tensor>, id: &str) -> Result<Self> {
        // The original upload has no "transformer." prefix.
        if !tensors.contains_key("transformer.wte.weight") && tensors.contains_key("wte.weight") {
            tensors = tensors
                .into_iter()
                .map(|(k, v)| (format!("transformer.{k}"), v))
                .collect();
        }
        tensors.remove("lm_head.weight"); // tied
        let (d, inner, v) = (config.n_embd, config.n_inner, config.vocab_size);
        let mut get = |n: &str, shape: &[usize]| take(&mut tensors, &format!("transformer.{n}"), shape, id);
        let wte = get("wte.weight", &[v, d])?;
        let wpe = get("wpe.weight", &[config.n_positions, d])?;
        let eps = config.layer_norm_epsilon;
        let mut blocks = Vec::new();
        for i in 0..config.n_layer {
            let p = format!("h.{i}");
            let mut ln = |n: &str| -> Result<LayerNorm> {
                Ok(LayerNorm {
                    weight: get(&format!("{p}.{n}.weight"), &[d])?,
                    bias: get(&format!("{p}.{n}.bias"), &[d])?,
                    eps,
                })
            };
            let (ln_1, ln_2) = (ln("ln_1")?, ln("ln_2")?);
            let t = |x: Tensor| x.t().and_then(|x| x.contiguous()).ctx("Conv1D weight");
            blocks.push(Block {
                ln_1,
                attn_w: t(get(&format!("{p}.attn.c_attn.weight"), &[d, 3 * d])?)?,
                attn_b: get(&format!("{p}.attn.c_attn.bias"), &[3 * d])?,
                proj_w: t(get(&format!("{p}.attn.c_proj.weight"), &[d, d])?)?,
                proj_b: get(&format!("{p}.attn.c_proj.bias"), &[d])?,
                ln_2,
                fc_w: t(get(&format!("{p}.mlp.c_fc.weight"), &[d, inner])?)?,
                fc_b: get(&format!("{p}.mlp.c_fc.bias"), &[inner])?,
                out_w: t(get(&format!("{p}.mlp.c_proj.weight"), &[inner, d])?)?,
                out_b: get(&format!("{p}.mlp.c_proj.bias"), &[d])?,
            });
        }
        let ln_f = LayerNorm {
            weight: get("ln_f.weight", &[d])?,
            bias: get("ln_f.bias", &[d])?,
            eps,
        };
        let device = wte.device().clone();
        Ok(Gpt2 {
            shape: config.shape(),
            config: config.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            device,
        })
    }

    fn forward(
        &self,
        ids: &Tensor,
        layers: &[usize],
        attention: AttentionKernel,
    ) -> candle_core::Result<Vec<Tensor>> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        let (d, h) = (c.n_embd, c.n_head);
        let dh = d / h;
        let tok = self
            .wte
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let mut x = tok.broadcast_add(&self.wpe.narrow(0, 0, t)?)?;
        let mut keep = Keep::new(layers);
        keep.at(0, &x);
        for (i, blk) in self.blocks.iter().enumerate() {
            if i > 0 {
                keep.at(i, &x);
            }
            let a = blk.ln_1.forward(&x, false)?;
            let qkv = linear(&a, &blk.attn_w, Some(&blk.attn_b))?;
            let q = heads(&qkv.narrow(2, 0, d)?, h, dh)?;
            let k = heads(&qkv.narrow(2, d, d)?, h, dh)?;
            let v = heads(&qkv.narrow(2, 2 * d, d)?, h, dh)?;
            let mut scale = 1.0;
            if c.scale_attn_weights {
                scale /= (dh as f64).sqrt();
            }
            if c.scale_attn_by_inverse_layer_idx {
                scale /= (i + 1) as f64;
            }
            let att = attend(&q, &k, &v, Some(scale), None, attention)?;
            // Each bias joins the operation after it (one pass on a GPU).
            x = bias_residual(&x, &linear(&att, &blk.proj_w, None)?, &blk.proj_b)?;
            let m = blk.ln_2.forward(&x, false)?;
            let m = c
                .activation
                .apply_biased(&linear(&m, &blk.fc_w, None)?, &blk.fc_b)?;
            x = bias_residual(&x, &linear(&m, &blk.out_w, None)?, &blk.out_b)?;
        }
        let x = self.ln_f.forward(&x, false)?;
        keep.at(c.n_layer, &x);
        keep.finish(c.n_layer)
    }
}

impl CausalLm for Gpt2 {
    fn shape(&self) -> &Shape {
        &self.shape
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn hidden_states(
        &self,
        ids: &Tensor,
        layers: &[usize],
        attention: AttentionKernel,
    ) -> Result<Vec<Tensor>> {
        self.forward(ids, layers, attention).ctx("GPT-2 forward")
    }
    fn classifier(&self) -> &Tensor {
        &self.wte
    }
    fn n_params(&self) -> u64 {
        let c = &self.config;
        let (d, inner) = (c.n_embd as u64, c.n_inner as u64);
        let block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d);
        c.vocab_size as u64 * d + c.n_positions as u64 * d + c.n_layer as u64 * block + 2 * d
    }
}
