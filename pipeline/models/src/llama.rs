//! The Llama family (`LlamaForCausalLM`, `Qwen2ForCausalLM`,
//! `MistralForCausalLM`) as a plain candle model.
//!
//! RMSNorm before attention and MLP, rotary embeddings on whole heads with
//! the config's scaling, grouped-query attention (`num_key_value_heads`),
//! scores scaled by 1/sqrt(head_dim), a SwiGLU MLP down(silu(gate(x)) *
//! up(x)), a final RMSNorm and a tied or untied `lm_head`. Biases are used
//! where the checkpoint has them (Qwen2's q/k/v; `attention_bias` and
//! `mlp_bias` Llamas). Sliding windows: Mistral's `sliding_window` on every
//! layer; Qwen2's on the layers `layer_types` (or `use_sliding_window` with
//! `max_window_layers`) marks as sliding.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::causal_lm::{CausalLm, Shape, layer_count, take, take_opt};
use crate::error::{Context, Error, Result};
use crate::layers::{
    Activation, AttentionKernel, Keep, RmsNorm, RotarySpec, attend, heads, linear, rotary_from_config,
};

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub activation: Activation,
    pub tie_word_embeddings: bool,
    pub rotary: RotarySpec,
    /// Per layer, the attention window (None = full causal).
    pub windows: Vec<Option<usize>>,
}

impl LlamaConfig {
    pub fn from_json(v: &Value, model: &str) -> Result<Self> {
        let bad = |p: String| Error::model(model, format!("config.json: {p}"));
        let uint = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("missing or non-integer '{k}'")))
        };
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("llama")
            .to_string();
        let (hidden_size, num_heads) = (uint("hidden_size")?, uint("num_attention_heads")?);
        if num_heads == 0 {
            return Err(bad("num_attention_heads is 0".into()));
        }
        let num_kv_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(bad(format!(
                "{num_heads} attention heads cannot share {num_kv_heads} key/value heads"
            )));
        }
        let head_dim = v
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_heads);
        let act = v.get("hidden_act").and_then(Value::as_str).unwrap_or("silu");
        let activation =
            Activation::parse(act).ok_or_else(|| bad(format!("hidden_act '{act}' is not supported")))?;
        let num_layers = layer_count(uint("num_hidden_layers")?, "num_hidden_layers", model)?;
        let window = v
            .get("sliding_window")
            .and_then(Value::as_u64)
            .map(|w| w as usize);
        let windows = match model_type.as_str() {
            "mistral" => vec![window; num_layers],
            _ => {
                let types: Option<Vec<String>> = v
                    .get("layer_types")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().map(|t| t.as_str().unwrap_or("").to_string()).collect());
                let sliding_on = v
                    .get("use_sliding_window")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let max_window_layers =
                    v.get("max_window_layers").and_then(Value::as_u64).unwrap_or(0) as usize;
                (0..num_layers)
                    .map(|i| {
                        let sliding = match &types {
                            Some(t) => t.get(i).is_some_and(|t| t == "sliding_attention"),
                            None => sliding_on && i >= max_window_layers,
                        };
                        if sliding { window } else { None }
                    })
                    .collect()
            }
        };
        let default_base = if model_type == "qwen2" {
            1_000_000.0
        } else {
            10_000.0
        };
        Ok(LlamaConfig {
            vocab_size: uint("vocab_size")?,
            max_position_embeddings: uint("max_position_embeddings")?,
            hidden_size,
            intermediate_size: uint("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            activation,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            rotary: rotary_from_config(v, head_dim, default_base, 1.0, model)?,
            windows,
            model_type,
        })
    }

    pub fn shape(&self) -> Shape {
        Shape {
            model_type: self.model_type.clone(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            max_positions: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
        }
    }
}

struct Proj {
    w: Tensor,
    b: Option<Tensor>,
}

impl Proj {
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear(x, &self.w, self.b.as_ref())
    }
}

struct Block {
    ln_1: RmsNorm,
    ln_2: RmsNorm,
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    gate: Proj,
    up: Proj,
    down: Proj,
}

pub struct Llama {
    config: LlamaConfig,
    shape: Shape,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    head: Option<Tensor>,
    device: Device,
    n_params: u64,
}

impl Llama {
    pub fn from_tensors(
        config: &LlamaConfig,
        mut tensors: HashMap<String, Tensor>,
        id: &str,
    ) -> Result<Self> {
        let before: u64 = tensors.values().map(|t| t.elem_count() as u64).sum();
        let c = config;
        let (d, inner, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let embed = take(&mut tensors, "model.embed_tokens.weight", &[v, d], id)?;
        let mut blocks = Vec::new();
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let mut proj = |n: &str, out: usize, inp: usize| -> Result<Proj> {
                Ok(Proj {
                    w: take(&mut tensors, &format!("{p}.{n}.weight"), &[out, inp], id)?,
                    b: take_opt(&mut tensors, &format!("{p}.{n}.bias"), &[out], id)?,
                })
            };
            let (q, k, vv, o) = (
                proj("self_attn.q_proj", qd, d)?,
                proj("self_attn.k_proj", kvd, d)?,
                proj("self_attn.v_proj", kvd, d)?,
                proj("self_attn.o_proj", d, qd)?,
            );
            let (gate, up, down) = (
                proj("mlp.gate_proj", inner, d)?,
                proj("mlp.up_proj", inner, d)?,
                proj("mlp.down_proj", d, inner)?,
            );
            let mut norm = |n: &str| -> Result<RmsNorm> {
                Ok(RmsNorm {
                    weight: take(&mut tensors, &format!("{p}.{n}.weight"), &[d], id)?,
                    eps: c.rms_norm_eps,
                })
            };
            blocks.push(Block {
                ln_1: norm("input_layernorm")?,
                ln_2: norm("post_attention_layernorm")?,
                q,
                k,
                v: vv,
                o,
                gate,
                up,
                down,
            });
        }
        let norm = RmsNorm {
            weight: take(&mut tensors, "model.norm.weight", &[d], id)?,
            eps: c.rms_norm_eps,
        };
        let head = if c.tie_word_embeddings {
            tensors.remove("lm_head.weight");
            None
        } else {
            Some(take(&mut tensors, "lm_head.weight", &[v, d], id)?)
        };
        let n_params = before - tensors.values().map(|t| t.elem_count() as u64).sum::<u64>();
        let device = embed.device().clone();
        Ok(Llama {
            shape: c.shape(),
            config: c.clone(),
            embed,
            blocks,
            norm,
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
        let (h, hkv, dh) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let rotary = c.rotary.for_length(t);
        let scale = 1.0 / (dh as f64).sqrt();
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, c.hidden_size))?;
        let mut keep = Keep::new(layers);
        keep.at(0, &x);
        for (i, blk) in self.blocks.iter().enumerate() {
            if i > 0 {
                keep.at(i, &x);
            }
            let a = blk.ln_1.forward(&x)?;
            let q = rotary.apply(&heads(&blk.q.apply(&a)?, h, dh)?)?;
            let k = rotary.apply(&heads(&blk.k.apply(&a)?, hkv, dh)?)?;
            let v = heads(&blk.v.apply(&a)?, hkv, dh)?;
            let att = attend(&q, &k, &v, Some(scale), c.windows[i], attention)?;
            x = (x + blk.o.apply(&att)?)?;
            let m = blk.ln_2.forward(&x)?;
            let m = (c.activation.apply(&blk.gate.apply(&m)?)? * blk.up.apply(&m)?)?;
            x = (x + blk.down.apply(&m)?)?;
        }
        let x = self.norm.forward(&x)?;
        keep.at(c.num_layers, &x);
        keep.finish(c.num_layers)
    }
}

impl CausalLm for Llama {
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
        self.forward(ids, layers, attention)
            .ctx(format!("{} forward", self.config.model_type))
    }
    fn classifier(&self) -> &Tensor {
        self.head.as_ref().unwrap_or(&self.embed)
    }
    fn n_params(&self) -> u64 {
        self.n_params
    }
}
