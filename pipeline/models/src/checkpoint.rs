//! What a saved model directory holds, apart from where it is stored: the
//! safetensors bytes `transformers` reads, the `_checksums.json` record of
//! every file saved, and the step of a checkpoint subdirectory's name. The
//! pipeline reads and writes these through its lake.

use std::collections::{BTreeMap, HashMap};

use candle_core::Tensor;

use crate::error::{Context, Error, Result};

/// Sizes and hashes of the files of a saved weights directory.
pub const CHECKSUMS_FILE: &str = "_checksums.json";

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct FileSum {
    pub bytes: u64,
    pub blake3: String,
}

/// `_checksums.json`: file name -> size and BLAKE3.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Checksums {
    pub files: BTreeMap<String, FileSum>,
}

impl Checksums {
    /// Record the size and BLAKE3 of a file saved as `name`.
    pub fn add(&mut self, name: &str, bytes: &[u8]) {
        self.files.insert(
            name.to_string(),
            FileSum {
                bytes: bytes.len() as u64,
                blake3: blake3::hash(bytes).to_hex().to_string(),
            },
        );
    }
}

/// The step N of a checkpoint directory name: `checkpoint-N` (Trainer),
/// `step-N` or `stepN` (Pythia's revisions), `global_stepN`.
pub fn checkpoint_step(dir: &str) -> Option<u64> {
    ["checkpoint-", "global_step", "step-", "step"]
        .iter()
        .find_map(|p| dir.strip_prefix(p))
        .and_then(|n| n.parse::<u64>().ok())
}

/// Serialise tensors as safetensors bytes with the metadata `transformers` expects.
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.contiguous().ctx("preparing tensors")?)))
        .collect::<Result<_>>()?;
    safetensors::serialize(contiguous.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
        .map_err(|e| Error::invalid(format!("serialising safetensors: {e}")))
}
