//! GPT-NeoX (`GPTNeoXForCausalLM`, the Pythia suite) as a plain candle model.
//!
//! One fused q/k/v projection laid out per head ([H, 3, d_head]), rotary
//! embeddings on the first `rotary_pct` of each head (the rest passes
//! through), scores scaled by 1/sqrt(d_head), and with `use_parallel_residual`
//! (Pythia) x + attn(ln_1(x)) + mlp(ln_2(x)) in one step; otherwise the
//! sequential form. A final layer norm and an untied `embed_out` classifier.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::causal_lm::{CausalLm, Shape, layer_count, take, take_opt};
use crate::error::{Context, Error, Result};
use crate::layers::{
    Activation, AttentionKernel, Keep, LayerNorm, RotarySpec, attend, linear, rotary_from_config,
};

#[derive(Debug, Clone, PartialEq)]
pub struct GptNeoXConfig {
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
    pub use_parallel_residual: bool,
    pub tie_word_embeddings: bool,
    pub rotary: RotarySpec,
}

impl GptNeoXConfig {
    pub fn from_json(v: &Value, model: &str) -> Result<Self> {
        let bad = |p: String| Error::model(model, format!("config.json: {p}"));
        let uint = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("missing or non-integer '{k}'")))
        };
        let act = v.get("hidden_act").and_then(Value::as_str).unwrap_or("gelu");
        let activation =
            Activation::parse(act).ok_or_else(|| bad(format!("hidden_act '{act}' is not supported")))?;
        let (hidden_size, num_heads) = (uint("hidden_size")?, uint("num_attention_heads")?);
        if num_heads == 0 || hidden_size % num_heads != 0 {
            return Err(bad(format!(
                "hidden_size {hidden_size} is not divisible by {num_heads} heads"
            )));
        }
        let base = v
            .get("rotary_emb_base")
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let fraction = v.get("rotary_pct").and_then(Value::as_f64).unwrap_or(0.25);
        Ok(GptNeoXConfig {
            vocab_size: uint("vocab_size")?,
            max_position_embeddings: uint("max_position_embeddings")?,
            hidden_size,
            num_layers: layer_count(uint("num_hidden_layers")?, "num_hidden_layers", model)?,
            num_heads,
            intermediate_size: uint("intermediate_size")?,
            activation,
            layer_norm_eps: v.get("layer_norm_eps").and_then(Value::as_f64).unwrap_or(1e-5),
            use_parallel_residual: v
                .get("use_parallel_residual")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            rotary: rotary_from_config(v, hidden_size / num_heads, base, fraction, model)?,
        })
    }

    pub fn shape(&self) -> Shape {
        Shape {
            model_type: "gpt_neox".into(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            max_positions: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
        }
    }
}

struct Block {
    ln_1: LayerNorm,
    ln_2: LayerNorm,
    qkv_w: Tensor,
    qkv_b: Option<Tensor>,
    dense_w: Tensor,
    dense_b: Option<Tensor>,
    up_w: Tensor,
    up_b: Option<Tensor>,
    down_w: Tensor,
    down_b: Option<Tensor>,
}

pub struct GptNeoX {
    config: GptNeoXConfig,
    shape: Shape,
    embed: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: Option<Tensor>,
    device: Device,
    n_params: u64,
}

impl GptNeoX {
    pub fn from_tensors(
        config: &GptNeoXConfig,
        mut tensors: HashMap<String, Tensor>,
        id: &str,
    ) -> Result<Self> {
        let before: u64 = tensors.values().map(|t| t.elem_count() as u64).sum();
        let (d, inner, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let eps = config.layer_norm_eps;
        let embed = take(&mut tensors, "gpt_neox.embed_in.weight", &[v, d], id)?;
        let mut blocks = Vec::new();
        for i in 0..config.num_layers {
            let p = format!("gpt_neox.layers.{i}");
            let mut ln = |n: &str| -> Result<LayerNorm> {
                Ok(LayerNorm {
                    weight: take(&mut tensors, &format!("{p}.{n}.weight"), &[d], id)?,
                    bias: take(&mut tensors, &format!("{p}.{n}.bias"), &[d], id)?,
                    eps,
                })
            };
            let (ln_1, ln_2) = (ln("input_layernorm")?, ln("post_attention_layernorm")?);
            let mut w = |n: &str, s: &[usize]| take(&mut tensors, &format!("{p}.{n}"), s, id);
            let (qkv_w, dense_w) = (
                w("attention.query_key_value.weight", &[3 * d, d])?,
                w("attention.dense.weight", &[d, d])?,
            );
            let (up_w, down_w) = (
                w("mlp.dense_h_to_4h.weight", &[inner, d])?,
                w("mlp.dense_4h_to_h.weight", &[d, inner])?,
            );
            let mut b = |n: &str, s: usize| take_opt(&mut tensors, &format!("{p}.{n}"), &[s], id);
            blocks.push(Block {
                ln_1,
                ln_2,
                qkv_w,
                qkv_b: b("attention.query_key_value.bias", 3 * d)?,
                dense_w,
                dense_b: b("attention.dense.bias", d)?,
                up_w,
                up_b: b("mlp.dense_h_to_4h.bias", inner)?,
                down_w,
                down_b: b("mlp.dense_4h_to_h.bias", d)?,
            });
        }
        let ln_f = LayerNorm {
            weight: take(&mut tensors, "gpt_neox.final_layer_norm.weight", &[d], id)?,
            bias: take(&mut tensors, "gpt_neox.final_layer_norm.bias", &[d], id)?,
            eps,
        };
        let head = if config.tie_word_embeddings {
            None
        } else {
            Some(take(&mut tensors, "embed_out.weight", &[v, d], id)?)
        };
        let device = embed.device().clone();
        // What was taken (old checkpoints also carry rotary and mask buffers).
        let n_params = before - tensors.values().map(|t| t.elem_count() as u64).sum::<u64>();
        Ok(GptNeoX {
            shape: config.shape(),
            config: config.clone(),
            embed,
            blocks,
            ln_f,
            head,
            device,
            n_params,
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
        let (d, h) = (c.hidden_size, c.num_heads);
        let dh = d / h;
        let rotary = c.rotary.for_length(t);
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let mut keep = Keep::new(layers);
        keep.at(0, &x);
        let scale = 1.0 / (dh as f64).sqrt();
        for (i, blk) in self.blocks.iter().enumerate() {
            if i > 0 {
                keep.at(i, &x);
            }
            let a = blk.ln_1.forward(&x, false)?;
            // [B, T, H, 3, dh]: q, k, v interleaved per head.
            let qkv = linear(&a, &blk.qkv_w, blk.qkv_b.as_ref())?.reshape((b, t, h, 3, dh))?;
            let part = |k: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(3, k, 1)?.squeeze(3)?.transpose(1, 2)?.contiguous()
            };
            let (q, k, v) = (rotary.apply(&part(0)?)?, rotary.apply(&part(1)?)?, part(2)?);
            let att = attend(&q, &k, &v, Some(scale), None, attention)?;
            let att = linear(&att, &blk.dense_w, blk.dense_b.as_ref())?;
            let mlp = |y: &Tensor| -> candle_core::Result<Tensor> {
                let y = c.activation.apply(&linear(y, &blk.up_w, blk.up_b.as_ref())?)?;
                linear(&y, &blk.down_w, blk.down_b.as_ref())
            };
            x = if c.use_parallel_residual {
                let m = mlp(&blk.ln_2.forward(&x, false)?)?;
                ((x + att)? + m)?
            } else {
                let x = (x + att)?;
                let m = mlp(&blk.ln_2.forward(&x, false)?)?;
                (x + m)?
            };
        }
        let x = self.ln_f.forward(&x, false)?;
        keep.at(c.num_layers, &x);
        keep.finish(c.num_layers)
    }
}

impl CausalLm for GptNeoX {
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
        self.forward(ids, layers, attention).ctx("GPT-NeoX forward")
    }
    fn classifier(&self) -> &Tensor {
        self.head.as_ref().unwrap_or(&self.embed)
    }
    fn n_params(&self) -> u64 {
        self.n_params
    }
}
