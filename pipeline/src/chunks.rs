//! Reading packed chunks for inference: a split's chunks (or a contiguous
//! range of them, for shards and resumption) in batches of B sequences.

use std::ops::Range;

use arrow::array::AsArray;
use arrow::datatypes::UInt32Type;
use lc_lake::artifact::Artifact;
use lc_lake::lake::Lake;
use lc_lake::manifest::Manifest;

use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;

/// A split's chunks, checked against the tokenizer a model expects.
pub struct Chunks {
    pub artifact: Artifact,
    pub manifest: Manifest,
    pub t: usize,
    pub count: u64,
}

impl Chunks {
    pub fn open(lake: &Lake, dataset: &str, split: &str) -> Result<Self> {
        let artifact = Artifact::new("chunks", &[("dataset", dataset), ("split", split)])?;
        let manifest = lake.require(&artifact, "run stage=pack")?;
        if manifest.rows == 0 {
            return Err(Error::artifact(&manifest.artifact, "the split has no chunks"));
        }
        let t = manifest
            .extra_u64("T")
            .ok_or_else(|| Error::artifact(&manifest.artifact, "manifest lacks T"))? as usize;
        Ok(Chunks {
            count: manifest.rows,
            artifact,
            manifest,
            t,
        })
    }

    /// Refuse chunks made with another tokenizer than `tok`.
    pub fn check_tokenizer(&self, tok: &TextTokenizer) -> Result<()> {
        match self.manifest.extra_str("tokenizer_fingerprint") {
            Some(f) if f == tok.fingerprint() => Ok(()),
            _ => Err(Error::Stale(format!(
                "{} was tokenized with another tokenizer than {}; re-run tokenize and pack",
                self.manifest.artifact, tok.name
            ))),
        }
    }

    /// Iterate over the chunks in `range` in batches of `batch` sequences,
    /// calling `f(first_chunk_index, tokens, rows)` with row-major tokens.
    pub fn for_each_batch(
        &self,
        lake: &Lake,
        range: Range<u64>,
        batch: usize,
        mut f: impl FnMut(u64, &[u32], usize) -> Result<()>,
    ) -> Result<()> {
        if range.start >= range.end {
            return Ok(());
        }
        let stream = lake.stream_artifact_range(
            &self.artifact,
            batch.max(1),
            range.start as usize,
            (range.end - range.start) as usize,
        )?;
        let mut pending: Vec<u32> = Vec::with_capacity(batch * self.t);
        let mut next = range.start;
        let t = self.t;
        for b in stream {
            let b = b?;
            let l = b.column(1).as_fixed_size_list();
            if l.value_length() as usize != t {
                return Err(Error::artifact(
                    &self.manifest.artifact,
                    "chunk length differs from the manifest's T",
                ));
            }
            let vals = l.values().as_primitive::<UInt32Type>().values();
            for row in vals.chunks_exact(t) {
                pending.extend_from_slice(row);
                if pending.len() == batch * t {
                    f(next, &pending, batch)?;
                    next += batch as u64;
                    pending.clear();
                }
            }
        }
        if !pending.is_empty() {
            let rows = pending.len() / t;
            f(next, &pending, rows)?;
        }
        Ok(())
    }
}
