//! The one trait every family implements ([`CausalLm`]), the shape the
//! stages read from it, and the checks that build a family from a
//! checkpoint's named tensors.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::error::{Context, Error, Result};
use crate::layers::{self, AttentionKernel};

/// Layers a `config.json` may declare: far more than any published causal
/// LM has (Llama 3.1 405B: 126), few enough that a mistyped count is refused
/// before a list sized by it is made.
pub const MAX_LAYERS: usize = 4096;

/// A config's layer count `n` (under `key`), checked against [`MAX_LAYERS`].
pub fn layer_count(n: usize, key: &str, model: &str) -> Result<usize> {
    if n > MAX_LAYERS {
        return Err(Error::model(
            model,
            format!("config.json: {key} = {n} is more than {MAX_LAYERS} layers"),
        ));
    }
    Ok(n)
}

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
    /// `hidden_states` indexing), in the order asked, attending with
    /// `attention` where the device and dtype allow it.
    fn hidden_states(
        &self,
        ids: &Tensor,
        layers: &[usize],
        attention: AttentionKernel,
    ) -> Result<Vec<Tensor>>;
    /// Classifier rows W (vocab x d): the output layer.
    fn classifier(&self) -> &Tensor;
    /// Logits [.., vocab] of final hidden states [.., d]: h Wᵀ for every
    /// family. eval and decide walk `classifier()` without forming them
    /// ([`crate::output_layer`]); a family whose output layer were more than h Wᵀ
    /// (a bias, a soft cap) would need that path to know.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        layers::linear(hidden, self.classifier(), None).ctx("output layer")
    }
    /// Parameters, a tied classifier counted once.
    fn n_params(&self) -> u64;
}

/// Take a named tensor of an expected shape out of a checkpoint's tensors,
/// or say which is missing or misshapen.
pub fn take(tensors: &mut HashMap<String, Tensor>, name: &str, shape: &[usize], id: &str) -> Result<Tensor> {
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
pub fn take_opt(
    tensors: &mut HashMap<String, Tensor>,
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
