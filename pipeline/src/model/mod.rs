//! Causal language models as plain candle structs, one module per family,
//! behind one trait: "hidden states at these layers, and the classifier
//! rows" ([`CausalLm`]).
//!
//! Families: GPT-Neo ([`gpt_neo`], the paper's; also trained here), GPT-2
//! ([`gpt2`]), GPT-NeoX / Pythia ([`gpt_neox`]) and the Llama family (Llama,
//! Qwen2, Mistral: [`llama`]). The family comes from `config.json`'s
//! `model_type` ([`config::ArchConfig`]); anything else is refused with the
//! list of supported types. candle-transformers' implementations return only
//! the last hidden state, so the families are written here, sharing the
//! pieces in [`layers`].
//!
//! Hidden states are indexed as Hugging Face's `hidden_states`: 0 = the
//! embeddings, i = the output of block i (the input of block i + 1), L = the
//! output of the final norm (the embedding the paper studies). Logits are a
//! separate step, so stages that only need embeddings (collect) never pay
//! for the vocabulary-sized product. The classifier is the output layer (tied
//! or untied); for intermediate layers it is still the output layer.

pub mod attention;
pub mod bias_add;
pub mod block_attention;
pub mod block_softmax;
pub mod checkpoint;
pub mod config;
pub mod flash_attention;
pub mod gpt2;
pub mod gpt_neo;
pub mod gpt_neox;
pub mod layers;
pub mod llama;
pub mod loss;
pub mod naming;
pub mod optim;
pub mod output_layer;

use candle_core::{DType, Device, Tensor};

pub use config::GptNeoConfig;
pub use gpt_neo::{GptNeo, decays, init_weights, parameter_names, parameter_shape, to_dtype};

use crate::error::{Context, Error, Result};

/// What the stages need to know about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// `config.json`'s model_type.
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// The longest sequence the model takes.
    pub max_positions: usize,
    pub tie_word_embeddings: bool,
}

/// A causal language model, whatever its family.
pub trait CausalLm: Send + Sync {
    fn shape(&self) -> &Shape;
    fn device(&self) -> &Device;
    /// Hidden states of token ids [B, T] at `layers` (Hugging Face
    /// `hidden_states` indexing), in the order asked.
    fn hidden_states(&self, ids: &Tensor, layers: &[usize]) -> Result<Vec<Tensor>>;
    /// Classifier rows W (vocab x d): the output layer.
    fn classifier(&self) -> &Tensor;
    /// Logits [.., vocab] of final hidden states [.., d]: h Wᵀ for every
    /// family. eval and decide walk `classifier()` without forming them
    /// ([`output_layer`]); a family whose output layer were more than h Wᵀ
    /// (a bias, a soft cap) would need that path to know.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        layers::linear(hidden, self.classifier(), None).ctx("output layer")
    }
    /// Parameters, a tied classifier counted once.
    fn n_params(&self) -> u64;
}

/// Build a model of any supported family from named tensors.
pub fn from_tensors(
    config: &config::ArchConfig,
    tensors: std::collections::HashMap<String, Tensor>,
    id: &str,
) -> Result<Box<dyn CausalLm>> {
    use config::ArchConfig as A;
    Ok(match config {
        A::GptNeo(c) => {
            let mut tensors = tensors;
            // Some exports carry a tied lm_head explicitly; the tie makes it redundant.
            if c.tie_word_embeddings {
                tensors.remove("lm_head.weight");
            }
            Box::new(GptNeo::from_tensors(c.clone(), &tensors, id)?)
        }
        A::Gpt2(c) => Box::new(gpt2::Gpt2::from_tensors(c, tensors, id)?),
        A::GptNeoX(c) => Box::new(gpt_neox::GptNeoX::from_tensors(c, tensors, id)?),
        A::Llama(c) => Box::new(llama::Llama::from_tensors(c, tensors, id)?),
    })
}

/// Take a named tensor of an expected shape out of a checkpoint's tensors,
/// or say which is missing or misshapen.
pub(crate) fn take(
    tensors: &mut std::collections::HashMap<String, Tensor>,
    name: &str,
    shape: &[usize],
    id: &str,
) -> Result<Tensor> {
    let t = tensors.remove(name).ok_or_else(|| {
        Error::model(
            id,
            format!("the checkpoint has no tensor {name} (expected shape {shape:?})"),
        )
    })?;
    if t.dims() != shape {
        return Err(Error::model(
            id,
            format!(
                "tensor {name} has shape {:?}, the config implies {shape:?}",
                t.dims()
            ),
        ));
    }
    Ok(t)
}

/// Like [`take`], for a tensor some checkpoints of the family have (biases).
pub(crate) fn take_opt(
    tensors: &mut std::collections::HashMap<String, Tensor>,
    name: &str,
    shape: &[usize],
    id: &str,
) -> Result<Option<Tensor>> {
    if tensors.contains_key(name) {
        take(tensors, name, shape, id).map(Some)
    } else {
        Ok(None)
    }
}

pub fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n: usize = s
                .strip_prefix("cuda:")
                .map(|n| n.parse().unwrap_or(usize::MAX))
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::invalid(format!(
                    "device {s}: this binary was built without CUDA (cargo build --features cuda)"
                )));
            }
            candle_core::Device::new_cuda(n).ctx(format!("opening {s}"))
        }
        s => Err(Error::invalid(format!("device '{s}' is not cpu, cuda or cuda:N"))),
    }
}

/// Free memory of a GPU in bytes; None for the CPU (or where it cannot be
/// read).
pub fn free_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free as u64);
    }
    let _ = device;
    None
}

/// Parse a compute dtype name.
pub fn dtype(spec: &str) -> Result<DType> {
    match spec {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => Err(Error::invalid(format!("dtype '{other}' is not f32 or bf16"))),
    }
}
