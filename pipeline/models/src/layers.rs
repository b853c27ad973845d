//! Building blocks shared by the model families: linear maps, layer and RMS
//! norms, rotary position embeddings and causal attention.

use candle_core::{D, DType, Tensor};

use lc_kernels::bias_add::{bias_add, bias_gelu};
use lc_kernels::{attention, block_attention, flash_attention};

pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if !train && x.is_contiguous() {
            return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        let d = x.dim(D::Minus1)? as f64;
        let mean = (x.sum_keepdim(D::Minus1)? / d)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / d)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// `x @ w^T (+ b)` for x of shape [.., in] and w of shape [out, in].
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = *dims.last().expect("linear input has a last dimension");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => bias_add(&y, b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().expect("non-empty") = w.dim(0)?;
    y.reshape(out)
}

/// `x * w / sqrt(mean(x^2) + eps)`, computed in f32 at least.
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dt = x.dtype();
        let xf = match dt {
            DType::BF16 | DType::F16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let y = if xf.is_contiguous() {
            candle_nn::ops::rms_norm(&xf, &self.weight.to_dtype(xf.dtype())?, self.eps as f32)?
        } else {
            let d = xf.dim(D::Minus1)? as f64;
            let ms = (xf.sqr()?.sum_keepdim(D::Minus1)? / d)?;
            xf.broadcast_div(&(ms + self.eps)?.sqrt()?)?
                .broadcast_mul(&self.weight.to_dtype(xf.dtype())?)?
        };
        y.to_dtype(dt)
    }
}

/// The activations the families use, by their `config.json` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// exact, with erf (`gelu`).
    GeluErf,
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::GeluErf,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }

    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::GeluTanh => x.gelu(),
            Activation::GeluErf => x.gelu_erf(),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
    }

    /// The activation of `y + b` for a bias b on y's rows; the tanh GELU
    /// fused with the bias into one pass where `bias_gelu` can.
    pub fn apply_biased(self, y: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::GeluTanh => bias_gelu(y, b),
            other => other.apply(&bias_add(y, b)?),
        }
    }
}

/// Rotary position embeddings (the "rotate half" form of GPT-NeoX and
/// Llama) on the first `dims` dimensions of each head.
pub struct Rotary {
    pub dims: usize,
    /// Inverse frequencies, `dims / 2` of them.
    pub inv_freq: Vec<f64>,
}

impl Rotary {
    /// cos and sin [T, dims/2] for positions 0..T, in `dtype`.
    fn tables(
        &self,
        t: usize,
        dtype: DType,
        dev: &candle_core::Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in 0..t {
            for &f in &self.inv_freq {
                // f32 frequencies, as Hugging Face computes them.
                let a = (p as f32) * (f as f32);
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (t, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (t, half), dev)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// Rotate q or k [B, H, T, dh] at positions 0..T.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, t, dh) = x.dims4()?;
        let (cos, sin) = self.tables(t, x.dtype(), x.device())?;
        if self.dims == dh {
            return candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin);
        }
        let rot = x.narrow(3, 0, self.dims)?.contiguous()?;
        let pass = x.narrow(3, self.dims, dh - self.dims)?;
        let rot = candle_nn::rotary_emb::rope(&rot, &cos, &sin)?;
        Tensor::cat(&[&rot, &pass], 3)
    }
}

/// How inference attends on CUDA devices: block attention from device
/// primitives, or, for bf16 models, the one-kernel flash attention of
/// [`flash_attention`] (what `collect` chooses for bf16 on CUDA unless told
/// `attention=blocks`). The stage passes it with each forward pass
/// ([`crate::CausalLm::hidden_states`]); the CPU and the training path
/// ignore it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionKernel {
    #[default]
    Blocks,
    Fused,
}

/// Causal attention of q [B, H, T, dh] over k, v [B, Hkv, T, dh] (grouped
/// queries share a key/value head), scores scaled by `scale` and computed in
/// f32 at least, keys restricted to the last `window` positions when given.
/// Returns [B, T, H * dh]. Without gradients this works in blocks of
/// queries against the keys they see: on the CPU the kernel of
/// [`block_attention`], on other devices [`attention::blocked_attention`]
/// (device primitives), or [`flash_attention`] where `kernel` asks for it
/// and it takes the tensors. With gradients the scores are materialised
/// so that the step is differentiable.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: Option<f64>,
    window: Option<usize>,
    kernel: AttentionKernel,
) -> candle_core::Result<Tensor> {
    let (b, h, t, dh) = q.dims4()?;
    let no_grad = !(q.track_op() || k.track_op() || v.track_op());
    let cpu_float = q.device().is_cpu()
        && matches!(q.dtype(), DType::F32 | DType::F64)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype();
    if no_grad && cpu_float {
        return block_attention::attend(q, k, v, scale.unwrap_or(1.0), window)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, h * dh));
    }
    if no_grad
        && !q.device().is_cpu()
        && kernel == AttentionKernel::Fused
        && let Some(out) = flash_attention::attend(q, k, v, scale.unwrap_or(1.0), window)?
    {
        return Ok(out);
    }
    let hkv = k.dim(1)?;
    let (k, v) = if hkv != h {
        let rep = h / hkv;
        let expand = |x: &Tensor| -> candle_core::Result<Tensor> {
            x.unsqueeze(2)?
                .expand((b, hkv, rep, t, dh))?
                .reshape((b, h, t, dh))
        };
        (expand(k)?, expand(v)?)
    } else {
        (k.clone(), v.clone())
    };
    let score_dtype = match q.dtype() {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    };
    if no_grad {
        return attention::blocked_attention(q, &k, &v, scale, window, score_dtype)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, h * dh));
    }
    let mut scores = q
        .to_dtype(score_dtype)?
        .contiguous()?
        .matmul(&k.to_dtype(score_dtype)?.t()?.contiguous()?)?;
    if let Some(s) = scale {
        scores = (scores * s)?;
    }
    let probs = attention::causal_softmax(&scores, window)?;
    probs
        .to_dtype(v.dtype())?
        .matmul(&v.contiguous()?)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, t, h * dh))
}

/// [B, T, H * dh] -> [B, H, T, dh]. On GPUs a strided view: consumers make
/// it contiguous where they must, and the cast of q and k to the scores'
/// dtype does that in the same pass. On the CPU it is copied at once, while
/// the projection's output is still in cache (copied later, 2x128
/// collection was 10 % slower).
pub fn heads(x: &Tensor, h: usize, dh: usize) -> candle_core::Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let view = x.reshape((b, t, h, dh))?.transpose(1, 2)?;
    if x.device().is_cpu() {
        view.contiguous()
    } else {
        Ok(view)
    }
}

/// Collects the hidden states asked for while a forward pass runs.
pub struct Keep<'a> {
    layers: &'a [usize],
    out: Vec<Option<Tensor>>,
}

impl<'a> Keep<'a> {
    pub fn new(layers: &'a [usize]) -> Self {
        Keep {
            layers,
            out: vec![None; layers.len()],
        }
    }

    /// Offer hidden state `index`.
    pub fn at(&mut self, index: usize, x: &Tensor) {
        for (slot, &l) in self.out.iter_mut().zip(self.layers) {
            if l == index {
                *slot = Some(x.clone());
            }
        }
    }

    /// The states in the order asked; an index past `last` is an error.
    pub fn finish(self, last: usize) -> candle_core::Result<Vec<Tensor>> {
        self.out
            .into_iter()
            .zip(self.layers)
            .map(|(o, l)| {
                o.ok_or_else(|| candle_core::Error::Msg(format!("layer {l} is outside 0..={last}")))
            })
            .collect()
    }
}

/// Rotary settings from a `config.json`: `rope_parameters` (transformers 5)
/// or `rope_theta` + `rope_scaling` (transformers 4, most published
/// checkpoints), with `default_base` and `default_fraction` where the family
/// names them otherwise (GPT-NeoX: `rotary_emb_base`, `rotary_pct`).
/// Scalings: none/default, linear, dynamic (NTK, at the sequence length),
/// llama3; others are refused by name.
pub fn rotary_from_config(
    v: &serde_json::Value,
    head_dim: usize,
    default_base: f64,
    default_fraction: f64,
    model: &str,
) -> crate::Result<RotarySpec> {
    use serde_json::Value;
    let params = v.get("rope_parameters").filter(|p| p.is_object());
    let scaling = v.get("rope_scaling").filter(|p| p.is_object());
    let num = |obj: Option<&Value>, k: &str| obj.and_then(|o| o.get(k)).and_then(Value::as_f64);
    let base = num(params, "rope_theta")
        .or_else(|| v.get("rope_theta").and_then(Value::as_f64))
        .unwrap_or(default_base);
    let fraction = num(params, "partial_rotary_factor")
        .or_else(|| v.get("partial_rotary_factor").and_then(Value::as_f64))
        .unwrap_or(default_fraction);
    let spec = params.or(scaling);
    let kind = spec
        .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let dims = ((head_dim as f64) * fraction) as usize;
    let dims = dims - dims % 2;
    if dims == 0 {
        return Err(crate::Error::model(
            model,
            "config.json: the rotary part of a head is empty",
        ));
    }
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear(num(spec, "factor").unwrap_or(1.0)),
        "dynamic" => RopeScaling::Dynamic {
            factor: num(spec, "factor").unwrap_or(1.0),
            max_positions: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(2048) as usize,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num(spec, "factor").unwrap_or(8.0),
            low_freq_factor: num(spec, "low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num(spec, "high_freq_factor").unwrap_or(4.0),
            original_max_positions: num(spec, "original_max_position_embeddings").unwrap_or(8192.0),
        },
        other => {
            return Err(crate::Error::model(
                model,
                format!(
                    "config.json: rotary scaling '{other}' is not supported (default, linear, dynamic, llama3 are)"
                ),
            ));
        }
    };
    Ok(RotarySpec { dims, base, scaling })
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear(f64),
    Dynamic {
        factor: f64,
        max_positions: usize,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: f64,
    },
}

/// Rotary settings of a model; [`RotarySpec::for_length`] makes the tables'
/// frequencies for a sequence length.
#[derive(Debug, Clone, PartialEq)]
pub struct RotarySpec {
    pub dims: usize,
    pub base: f64,
    pub scaling: RopeScaling,
}

impl RotarySpec {
    pub fn for_length(&self, t: usize) -> Rotary {
        let dims = self.dims;
        let mut base = self.base;
        if let RopeScaling::Dynamic {
            factor,
            max_positions,
        } = self.scaling
            && t > max_positions
        {
            let d = dims as f64;
            base *= ((factor * t as f64 / max_positions as f64) - (factor - 1.0)).powf(d / (d - 2.0));
        }
        // As transformers computes them: base^(2k/d) in f32.
        let mut inv_freq: Vec<f64> = (0..dims / 2)
            .map(|k| 1.0 / (base as f32).powf((2 * k) as f32 / dims as f32) as f64)
            .collect();
        match self.scaling {
            RopeScaling::Linear(f) => inv_freq.iter_mut().for_each(|x| *x /= f),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => {
                let low_wavelen = original_max_positions / low_freq_factor;
                let high_wavelen = original_max_positions / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (original_max_positions / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            RopeScaling::None | RopeScaling::Dynamic { .. } => {}
        }
        Rotary { dims, inv_freq }
    }
}
