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

pub mod causal_lm;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod gpt2;
pub mod gpt_neo;
pub mod gpt_neox;
pub mod layers;
pub mod llama;
pub mod loss;
pub mod naming;
pub mod optim;
pub mod output_layer;

pub use causal_lm::{CausalLm, Shape};
pub use config::GptNeoConfig;
pub use device::{device, dtype, free_memory};
pub use error::{Error, Result};
pub use gpt_neo::{GptNeo, decays, init_weights, parameter_names, parameter_shape, to_dtype};
pub use layers::AttentionKernel;

use candle_core::Tensor;

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
