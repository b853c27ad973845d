//! GPT-Neo as a plain candle model.
//!
//! The architecture of Hugging Face `GPTNeoForCausalLM`: learned absolute
//! positions, pre-LN blocks (ln_1 -> attention -> residual; ln_2 -> MLP ->
//! residual), q/k/v projections without bias, out_proj with bias, attention
//! scores **not** scaled by 1/sqrt(d_head) and computed in f32, layers
//! alternating global and local attention (local: key j visible to query i iff
//! 0 <= i - j < window), an MLP of width 4d with `gelu_new` (the tanh
//! approximation), a final `ln_f`, and an lm_head tied to the token embedding.
//!
//! With `train = true` the layer norm is built from primitive operations so
//! candle's autograd can differentiate it; otherwise candle's fused kernel is
//! used. The attention softmax is a fused causal op with its own backward
//! ([`lc_kernels::attention`]). This is the one family the pipeline also trains.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::causal_lm::{CausalLm, Shape};
use crate::config::GptNeoConfig;
use crate::error::{Context, Error, Result};
use crate::layers::{AttentionKernel, Keep, LayerNorm, attend, heads, linear};
use lc_kernels::bias_add::{bias_gelu, bias_residual};

struct Block {
    ln_1: LayerNorm,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out_w: Tensor,
    out_b: Tensor,
    ln_2: LayerNorm,
    fc_w: Tensor,
    fc_b: Tensor,
    proj_w: Tensor,
    proj_b: Tensor,
    local: bool,
}

/// The model: plain tensors, whether loaded for inference or shared with the
/// optimizer's variables during training.
pub struct GptNeo {
    pub config: GptNeoConfig,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// Untied classifier, when the checkpoint has one.
    lm_head: Option<Tensor>,
    device: Device,
    shape: Shape,
}

/// HF names of every parameter of a config, in a fixed order.
pub fn parameter_names(config: &GptNeoConfig) -> Vec<String> {
    let mut names = vec![
        "transformer.wte.weight".to_string(),
        "transformer.wpe.weight".to_string(),
    ];
    for i in 0..config.num_layers {
        let p = format!("transformer.h.{i}");
        for n in [
            "ln_1.weight",
            "ln_1.bias",
            "attn.attention.q_proj.weight",
            "attn.attention.k_proj.weight",
            "attn.attention.v_proj.weight",
            "attn.attention.out_proj.weight",
            "attn.attention.out_proj.bias",
            "ln_2.weight",
            "ln_2.bias",
            "mlp.c_fc.weight",
            "mlp.c_fc.bias",
            "mlp.c_proj.weight",
            "mlp.c_proj.bias",
        ] {
            names.push(format!("{p}.{n}"));
        }
    }
    names.push("transformer.ln_f.weight".to_string());
    names.push("transformer.ln_f.bias".to_string());
    if !config.tie_word_embeddings {
        names.push("lm_head.weight".to_string());
    }
    names
}

/// Expected shape of a parameter.
pub fn parameter_shape(config: &GptNeoConfig, name: &str) -> Vec<usize> {
    let d = config.hidden_size;
    let inner = config.inner_size();
    let tail = name
        .rsplit_once(".h.")
        .map(|(_, t)| t.split_once('.').map(|x| x.1).unwrap_or(t));
    match (name, tail) {
        ("transformer.wte.weight", _) | ("lm_head.weight", _) => vec![config.vocab_size, d],
        ("transformer.wpe.weight", _) => vec![config.max_position_embeddings, d],
        (_, Some("mlp.c_fc.weight")) => vec![inner, d],
        (_, Some("mlp.c_fc.bias")) => vec![inner],
        (_, Some("mlp.c_proj.weight")) => vec![d, inner],
        (_, Some(t)) if t.ends_with("_proj.weight") => vec![d, d],
        _ => vec![d],
    }
}

/// Whether AdamW weight decay applies (Hugging Face Trainer: not to biases
/// and layer-norm parameters).
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains(".ln_"))
}

impl GptNeo {
    /// A freshly initialised model ([`init_weights`] with `seed`) whose
    /// parameters are `Var`s, in [`parameter_names`] order: an optimiser
    /// updates them in place and the model reads the updated values.
    pub fn trainable(
        config: GptNeoConfig,
        seed: u64,
        device: &Device,
        model: &str,
    ) -> Result<(Self, Vec<(String, Var)>)> {
        let init = init_weights(&config, seed, device)?;
        let vars: Vec<(String, Var)> = parameter_names(&config)
            .into_iter()
            .map(|n| {
                let v = Var::from_tensor(&init[&n]).ctx("creating variables")?;
                Ok((n, v))
            })
            .collect::<Result<_>>()?;
        let tensors: HashMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        Ok((Self::from_tensors(config, &tensors, model)?, vars))
    }

    /// Build from named tensors (HF checkpoint names), checking every shape.
    pub fn from_tensors(
        config: GptNeoConfig,
        tensors: &HashMap<String, Tensor>,
        model: &str,
    ) -> Result<Self> {
        let mut missing = Vec::new();
        for n in parameter_names(&config) {
            match tensors.get(&n) {
                None => missing.push(n),
                Some(t) => {
                    let want = parameter_shape(&config, &n);
                    if t.dims() != want.as_slice() {
                        return Err(Error::model(
                            model,
                            format!("tensor {n} has shape {:?}, the config implies {want:?}", t.dims()),
                        ));
                    }
                }
            }
        }
        if !missing.is_empty() {
            let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
            return Err(Error::model(
                model,
                format!(
                    "{} tensors missing from the checkpoint, e.g. {}",
                    missing.len(),
                    shown.join(", ")
                ),
            ));
        }
        let get = |n: &str| -> Tensor { tensors[n].clone() };
        let ln = |p: &str| LayerNorm {
            weight: get(&format!("{p}.weight")),
            bias: get(&format!("{p}.bias")),
            eps: config.layer_norm_epsilon,
        };
        let layer_types = config.layer_types();
        let blocks = (0..config.num_layers)
            .map(|i| {
                let p = format!("transformer.h.{i}");
                Block {
                    ln_1: ln(&format!("{p}.ln_1")),
                    q: get(&format!("{p}.attn.attention.q_proj.weight")),
                    k: get(&format!("{p}.attn.attention.k_proj.weight")),
                    v: get(&format!("{p}.attn.attention.v_proj.weight")),
                    out_w: get(&format!("{p}.attn.attention.out_proj.weight")),
                    out_b: get(&format!("{p}.attn.attention.out_proj.bias")),
                    ln_2: ln(&format!("{p}.ln_2")),
                    fc_w: get(&format!("{p}.mlp.c_fc.weight")),
                    fc_b: get(&format!("{p}.mlp.c_fc.bias")),
                    proj_w: get(&format!("{p}.mlp.c_proj.weight")),
                    proj_b: get(&format!("{p}.mlp.c_proj.bias")),
                    local: layer_types[i] == "local",
                }
            })
            .collect();
        let wte = get("transformer.wte.weight");
        let device = wte.device().clone();
        let shape = config.shape();
        Ok(GptNeo {
            shape,
            wpe: get("transformer.wpe.weight"),
            ln_f: ln("transformer.ln_f"),
            lm_head: (!config.tie_word_embeddings).then(|| get("lm_head.weight")),
            wte,
            blocks,
            config,
            device,
        })
    }

    /// Run the model on token ids [B, T]. Returns the requested hidden states
    /// (see the module docs for the indexing), in the order asked. Attention
    /// is block attention (training differentiates it; see
    /// [`CausalLm::hidden_states`] for the choice of inference kernel).
    pub fn forward(&self, ids: &Tensor, layers: &[usize], train: bool) -> Result<Vec<Tensor>> {
        self.forward_with(ids, layers, train, AttentionKernel::Blocks)
            .ctx("GPT-Neo forward")
    }

    fn forward_with(
        &self,
        ids: &Tensor,
        layers: &[usize],
        train: bool,
        attention: AttentionKernel,
    ) -> candle_core::Result<Vec<Tensor>> {
        let (b, t) = ids.dims2()?;
        let d = self.config.hidden_size;
        let h_n = self.config.num_heads;
        let dh = d / h_n;
        let last = self.config.num_layers;
        let flat = ids.flatten_all()?;
        let tok = self.wte.index_select(&flat, 0)?.reshape((b, t, d))?;
        let pos = self.wpe.narrow(0, 0, t)?;
        let mut x = tok.broadcast_add(&pos)?;
        let mut keep = Keep::new(layers);
        keep.at(0, &x);
        let window = self.config.window_size;
        for (i, blk) in self.blocks.iter().enumerate() {
            if i > 0 {
                keep.at(i, &x);
            }
            let h = blk.ln_1.forward(&x, train)?;
            let (q, k, v) = (
                heads(&linear(&h, &blk.q, None)?, h_n, dh)?,
                heads(&linear(&h, &blk.k, None)?, h_n, dh)?,
                heads(&linear(&h, &blk.v, None)?, h_n, dh)?,
            );
            // GPT-Neo does not scale its scores.
            let att = attend(&q, &k, &v, None, blk.local.then_some(window), attention)?;
            // Each bias joins the operation after it (one pass on a GPU).
            x = bias_residual(&x, &linear(&att, &blk.out_w, None)?, &blk.out_b)?;
            let h = blk.ln_2.forward(&x, train)?;
            let h = bias_gelu(&linear(&h, &blk.fc_w, None)?, &blk.fc_b)?;
            x = bias_residual(&x, &linear(&h, &blk.proj_w, None)?, &blk.proj_b)?;
        }
        let x = self.ln_f.forward(&x, train)?;
        keep.at(last, &x);
        keep.finish(last)
    }
}

impl CausalLm for GptNeo {
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
        self.forward_with(ids, layers, false, attention)
            .ctx("GPT-Neo forward")
    }

    /// The tied embedding or the untied head.
    fn classifier(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }

    fn n_params(&self) -> u64 {
        parameter_names(&self.config)
            .iter()
            .map(|n| parameter_shape(&self.config, n).iter().product::<usize>() as u64)
            .sum()
    }
}

/// Initial weights as Hugging Face initialises GPT-Neo: normal(0, 0.02) for
/// linear and embedding weights, zero biases, unit layer-norm gains.
pub fn init_weights(config: &GptNeoConfig, seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, config.initializer_range as f32)
        .map_err(|e| Error::invalid(format!("initializer_range: {e}")))?;
    let mut out = HashMap::new();
    for name in parameter_names(config) {
        let shape = parameter_shape(config, &name);
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = if name.contains(".ln_") {
            vec![if name.ends_with(".weight") { 1.0 } else { 0.0 }; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        };
        let t = Tensor::from_vec(vals, shape, device).ctx("initialising weights")?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Replace every bias (linear and layer-norm) with normal(0, `std`) values:
/// Hugging Face initialises them to zero, which leaves bias code unexercised
/// in checks on fresh models.
pub fn randomize_biases(weights: &mut HashMap<String, Tensor>, std: f64, seed: u64) -> Result<()> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let normal =
        Normal::new(0.0f32, std as f32).map_err(|e| Error::invalid(format!("bias std {std}: {e}")))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut names: Vec<String> = weights.keys().filter(|n| n.ends_with(".bias")).cloned().collect();
    names.sort();
    for name in names {
        let t = &weights[&name];
        let vals: Vec<f32> = (0..t.elem_count()).map(|_| normal.sample(&mut rng)).collect();
        let fresh = Tensor::from_vec(vals, t.dims(), t.device()).ctx("randomising biases")?;
        weights.insert(name, fresh);
    }
    Ok(())
}

/// Convert a set of tensors to another dtype (f64 for gradient checks).
pub fn to_dtype(tensors: &HashMap<String, Tensor>, dtype: DType) -> Result<HashMap<String, Tensor>> {
    tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype).ctx("converting weights")?)))
        .collect()
}
