//! The Hugging Face `GPTNeoConfig` (`config.json`), read and written.
//!
//! Reading accepts what `transformers` writes and refuses what this model
//! does not implement (other model types, activations, attention types,
//! dropout in the forward pass is irrelevant and ignored). Writing produces a
//! file `GPTNeoForCausalLM.from_pretrained` loads.

use serde_json::{Value, json};

use crate::causal_lm::{Shape, layer_count};
use crate::error::{Error, Result};
use crate::gpt_neox::GptNeoXConfig;
use crate::gpt2::Gpt2Config;
use crate::llama::LlamaConfig;

/// The `model_type`s this pipeline runs.
pub const SUPPORTED: &[&str] = &["gpt_neo", "gpt2", "gpt_neox", "llama", "qwen2", "mistral"];

/// A model's `config.json`, by family.
#[derive(Debug, Clone, PartialEq)]
pub enum ArchConfig {
    GptNeo(GptNeoConfig),
    Gpt2(Gpt2Config),
    GptNeoX(GptNeoXConfig),
    /// Llama, Qwen2 and Mistral.
    Llama(LlamaConfig),
}

impl ArchConfig {
    /// Parse a `config.json`; the family comes from its `model_type`.
    pub fn from_json(text: &str, model: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::model(model, format!("config.json: not JSON: {e}")))?;
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        Ok(match model_type {
            "gpt_neo" => ArchConfig::GptNeo(GptNeoConfig::from_json(text, model)?),
            "gpt2" => ArchConfig::Gpt2(Gpt2Config::from_json(&v, model)?),
            "gpt_neox" => ArchConfig::GptNeoX(GptNeoXConfig::from_json(&v, model)?),
            "llama" | "qwen2" | "mistral" => ArchConfig::Llama(LlamaConfig::from_json(&v, model)?),
            other => {
                return Err(Error::model(
                    model,
                    format!(
                        "config.json: model_type '{other}' is not supported; supported: {} (GPTNeoForCausalLM, GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)",
                        SUPPORTED.join(", ")
                    ),
                ));
            }
        })
    }

    pub fn shape(&self) -> Shape {
        match self {
            ArchConfig::GptNeo(c) => c.shape(),
            ArchConfig::Gpt2(c) => c.shape(),
            ArchConfig::GptNeoX(c) => c.shape(),
            ArchConfig::Llama(c) => c.shape(),
        }
    }

    /// Checkpoint names the classifier rows may have, most likely first.
    pub fn classifier_names(&self) -> &'static [&'static str] {
        match self {
            ArchConfig::GptNeo(c) if c.tie_word_embeddings => &["transformer.wte.weight"],
            ArchConfig::GptNeo(_) => &["lm_head.weight"],
            ArchConfig::Gpt2(_) => &["transformer.wte.weight", "wte.weight"],
            ArchConfig::GptNeoX(c) if c.tie_word_embeddings => &["gpt_neox.embed_in.weight"],
            ArchConfig::GptNeoX(_) => &["embed_out.weight"],
            ArchConfig::Llama(c) if c.tie_word_embeddings => &["model.embed_tokens.weight"],
            ArchConfig::Llama(_) => &["lm_head.weight"],
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GptNeoConfig {
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// `[[["global", "local"], n], ...]` as in the HF config.
    pub attention_types: Vec<(Vec<String>, usize)>,
    pub window_size: usize,
    pub intermediate_size: Option<usize>,
    pub layer_norm_epsilon: f64,
    pub initializer_range: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl GptNeoConfig {
    /// A config for the paper's grid: `depth` blocks alternating global/local,
    /// width `d`, `heads` heads, GPT-Neo's vocabulary and context.
    pub fn grid(depth: usize, width: usize, heads: usize, vocab_size: usize, context: usize) -> Self {
        let mut attention_types = Vec::new();
        if depth >= 2 {
            attention_types.push((vec!["global".to_string(), "local".to_string()], depth / 2));
        }
        if depth % 2 == 1 {
            attention_types.push((vec!["global".to_string()], 1));
        }
        GptNeoConfig {
            vocab_size,
            max_position_embeddings: context,
            hidden_size: width,
            num_layers: depth,
            num_heads: heads,
            attention_types,
            window_size: 256,
            intermediate_size: None,
            layer_norm_epsilon: 1e-5,
            initializer_range: 0.02,
            tie_word_embeddings: true,
            bos_token_id: Some(50256),
            eos_token_id: Some(50256),
        }
    }

    pub fn shape(&self) -> Shape {
        Shape {
            model_type: "gpt_neo".into(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            max_positions: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
        }
    }

    pub fn inner_size(&self) -> usize {
        self.intermediate_size.unwrap_or(4 * self.hidden_size)
    }

    /// One of "global" / "local" per layer.
    pub fn layer_types(&self) -> Vec<String> {
        self.attention_types
            .iter()
            .flat_map(|(types, n)| std::iter::repeat_n(types.clone(), *n).flatten())
            .collect()
    }

    /// Parse a `config.json`.
    pub fn from_json(text: &str, model: &str) -> Result<Self> {
        let bad = |p: String| Error::model(model, format!("config.json: {p}"));
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if model_type != "gpt_neo" {
            return Err(bad(format!(
                "model_type '{model_type}' is not supported; only gpt_neo (GPTNeoForCausalLM) is"
            )));
        }
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
        if act != "gelu_new" {
            return Err(bad(format!(
                "activation_function '{act}' is not supported (gelu_new is)"
            )));
        }
        let mut attention_types = Vec::new();
        let at = v
            .get("attention_types")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("missing 'attention_types'".into()))?;
        for entry in at {
            let pair = entry.as_array().filter(|a| a.len() == 2);
            let parsed = pair.and_then(|a| {
                let types: Option<Vec<String>> = a[0]
                    .as_array()?
                    .iter()
                    .map(|t| t.as_str().map(str::to_string))
                    .collect();
                Some((types?, a[1].as_u64()? as usize))
            });
            let (types, n) =
                parsed.ok_or_else(|| bad(format!("attention_types entry {entry} is not [[types...], n]")))?;
            if let Some(t) = types.iter().find(|t| *t != "global" && *t != "local") {
                return Err(bad(format!(
                    "attention type '{t}' is not supported (global, local)"
                )));
            }
            attention_types.push((types, n));
        }
        let cfg = GptNeoConfig {
            vocab_size: uint("vocab_size")?,
            max_position_embeddings: uint("max_position_embeddings")?,
            hidden_size: uint("hidden_size")?,
            num_layers: layer_count(uint("num_layers")?, "num_layers", model)?,
            num_heads: uint("num_heads")?,
            attention_types,
            window_size: uint("window_size").unwrap_or(256),
            intermediate_size: v
                .get("intermediate_size")
                .and_then(Value::as_u64)
                .map(|x| x as usize),
            layer_norm_epsilon: v
                .get("layer_norm_epsilon")
                .and_then(Value::as_f64)
                .unwrap_or(1e-5),
            initializer_range: v.get("initializer_range").and_then(Value::as_f64).unwrap_or(0.02),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            bos_token_id: v.get("bos_token_id").and_then(Value::as_u64).map(|x| x as u32),
            eos_token_id: v.get("eos_token_id").and_then(Value::as_u64).map(|x| x as u32),
        };
        cfg.validate(model)?;
        Ok(cfg)
    }

    pub fn validate(&self, model: &str) -> Result<()> {
        let bad = |p: String| Err(Error::model(model, format!("config: {p}")));
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        // Counted without expanding them: `[["global"], 4294967295]` is a
        // few bytes of JSON and would be 100 GB of layer names.
        let described = self.attention_types.iter().try_fold(0usize, |sum, (types, n)| {
            sum.checked_add(types.len().checked_mul(*n)?)
        });
        if described != Some(self.num_layers) {
            return bad(format!(
                "attention_types describe {} layers but num_layers is {}",
                described.map_or("more than 2^64".to_string(), |n| n.to_string()),
                self.num_layers
            ));
        }
        if self.vocab_size == 0 || self.max_position_embeddings == 0 || self.window_size == 0 {
            return bad("vocab_size, max_position_embeddings and window_size must be positive".into());
        }
        Ok(())
    }

    /// A `config.json` that `transformers` loads as GPTNeoForCausalLM.
    pub fn to_json(&self) -> String {
        let at: Vec<Value> = self.attention_types.iter().map(|(t, n)| json!([t, n])).collect();
        let v = json!({
            "architectures": ["GPTNeoForCausalLM"],
            "model_type": "gpt_neo",
            "activation_function": "gelu_new",
            "attention_dropout": 0.0,
            "attention_types": at,
            "bos_token_id": self.bos_token_id,
            "embed_dropout": 0.0,
            "eos_token_id": self.eos_token_id,
            "hidden_size": self.hidden_size,
            "initializer_range": self.initializer_range,
            "intermediate_size": self.intermediate_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "max_position_embeddings": self.max_position_embeddings,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "resid_dropout": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
            "use_cache": true,
            "vocab_size": self.vocab_size,
            "window_size": self.window_size,
        });
        serde_json::to_string_pretty(&v).expect("config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_configs_round_trip_and_alternate() {
        for depth in [1, 2, 3, 4] {
            let c = GptNeoConfig::grid(depth, 64, 16, 50257, 2048);
            let types = c.layer_types();
            assert_eq!(types.len(), depth);
            for (i, t) in types.iter().enumerate() {
                assert_eq!(t, if i % 2 == 0 { "global" } else { "local" });
            }
            let back = GptNeoConfig::from_json(&c.to_json(), "m").unwrap();
            assert_eq!(back, c);
        }
    }

    #[test]
    fn unsupported_configs_are_refused_by_name() {
        let c = GptNeoConfig::grid(2, 64, 16, 50257, 2048);
        let gpt2 = c.to_json().replace("\"gpt_neo\"", "\"gpt2\"");
        let err = GptNeoConfig::from_json(&gpt2, "m").unwrap_err().to_string();
        assert!(err.contains("model_type 'gpt2' is not supported"), "{err}");
        let relu = c.to_json().replace("\"gelu_new\"", "\"relu\"");
        assert!(
            GptNeoConfig::from_json(&relu, "m")
                .unwrap_err()
                .to_string()
                .contains("relu")
        );
        let heads = c.to_json().replace("\"num_heads\": 16", "\"num_heads\": 7");
        assert!(
            GptNeoConfig::from_json(&heads, "m")
                .unwrap_err()
                .to_string()
                .contains("divisible")
        );
    }

    /// Found by the model_config fuzz target: a GPT-Neo `attention_types`
    /// count of 2^32 - 1 was expanded into that many layer names before
    /// the layer count was compared. Counts are now checked unexpanded,
    /// and every family's layer count is bounded.
    #[test]
    fn huge_layer_counts_are_refused_before_anything_is_sized_by_them() {
        let c = GptNeoConfig::grid(2, 64, 16, 50257, 2048);
        let mut v: Value = serde_json::from_str(&c.to_json()).unwrap();
        v["attention_types"][0][1] = json!(4294967295u64);
        let err = GptNeoConfig::from_json(&v.to_string(), "m")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("attention_types describe") && err.contains("num_layers is 2"),
            "{err}"
        );
        let llama = r#"{"model_type": "llama", "vocab_size": 16, "max_position_embeddings": 8,
            "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
            "num_hidden_layers": 1000000000000}"#;
        let err = ArchConfig::from_json(llama, "m").unwrap_err().to_string();
        assert!(
            err.contains("num_hidden_layers = 1000000000000 is more than 4096 layers"),
            "{err}"
        );
    }
}
