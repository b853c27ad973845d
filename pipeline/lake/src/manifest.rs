//! What an artifact's `_manifest.json` records: the producing stage, its
//! parameters, the content hashes of its inputs, the row count, size and
//! hash of the data and of each block of it. Plain data: writing and reading
//! manifests is [`crate::artifact`]'s, checking reads against them
//! [`crate::integrity`]'s.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::integrity::Blocks;

/// An input an artifact was computed from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InputRef {
    pub artifact: String,
    pub content_hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub artifact: String,
    pub table: String,
    pub partition: BTreeMap<String, String>,
    pub stage: String,
    pub params: BTreeMap<String, String>,
    pub inputs: Vec<InputRef>,
    pub rows: u64,
    pub bytes: u64,
    pub content_hash: String,
    /// BLAKE3 of each block of the data file (range reads are checked
    /// against these); absent in manifests written before they existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<Blocks>,
    pub created: String,
    pub tool_version: String,
    /// Stage-specific facts (chunk length T, classes C, ...).
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Manifest {
    pub fn input_ref(&self) -> InputRef {
        InputRef {
            artifact: self.artifact.clone(),
            content_hash: self.content_hash.clone(),
        }
    }

    pub fn extra_u64(&self, key: &str) -> Option<u64> {
        self.extra.get(key).and_then(|v| v.as_u64())
    }

    pub fn extra_str(&self, key: &str) -> Option<&str> {
        self.extra.get(key).and_then(|v| v.as_str())
    }
}
