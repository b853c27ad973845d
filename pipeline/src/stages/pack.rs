//! `pack`: cut token streams into chunks of exactly T tokens.
//!
//! Reads: `tokens/dataset=D/split=S`. Writes: `chunks/dataset=D/split=S`.
//!
//! Modes:
//! - `concat`: the split's documents are concatenated in doc_id order and cut
//!   every T tokens; the one remainder at the end is dropped.
//! - `hf`: the semantics of Hugging Face `run_clm.py` (`group_texts` under
//!   `Dataset.map(batched=True, batch_size=1000, num_proc=P)`): the documents
//!   are split into P contiguous shards (shard i gets `n/P` documents plus one
//!   more for i < n mod P), each shard is processed in batches of 1000
//!   documents, and every batch is concatenated and cut on its own, dropping its
//!   own remainder. Chunks come out shard by shard, batch by batch. With the full
//!   TinyStories v1 train split, T = 2048 and P = 2 this gives the paper's
//!   S = 229,367 chunks.
//!
//! Invariants: every chunk has exactly T tokens; tokens never cross a group
//! boundary in `hf` mode; the manifest records T, the mode, P, the batch size
//! and the number of tokens dropped.

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, FixedSizeListArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, UInt32Type, UInt64Type};
use arrow::record_batch::RecordBatch;
use lc_lake::artifact::{Artifact, Provenance, TableWriter};

use crate::error::{Context, Error, Result};
use crate::params::{ParamSpec, Params, param};
use crate::stages::{Ctx, Stage};

pub struct Pack;

const PARAMS: &[ParamSpec] = &[
    param("dataset", "sample", "dataset name"),
    param("T", "2048", "chunk length in tokens (>= 2)"),
    param(
        "mode",
        "hf",
        "hf (run_clm group_texts per batch and shard) | concat",
    ),
    param("shards", "2", "hf mode: P, the num_proc of the original map"),
    param("batch", "1000", "hf mode: documents per group_texts batch"),
    param("splits", "train,validation", "splits to pack"),
    param("force", "false", "re-pack even when up to date"),
];

/// Which packing group a document belongs to.
#[derive(Debug, Clone, Copy)]
pub enum Grouping {
    /// One group: the whole split.
    Concat,
    /// (shard, batch) groups of `run_clm.py`.
    Hf { n_docs: u64, shards: u64, batch: u64 },
}

impl Grouping {
    /// The group of document `i` (0-based, in doc_id order).
    pub fn group(&self, i: u64) -> u64 {
        match *self {
            Grouping::Concat => 0,
            Grouping::Hf {
                n_docs,
                shards,
                batch,
            } => {
                let div = n_docs / shards;
                let rem = n_docs % shards;
                let (shard, start) = if i < (div + 1) * rem {
                    let s = i / (div + 1);
                    (s, s * (div + 1))
                } else {
                    let s = rem + (i - (div + 1) * rem) / div.max(1);
                    (s, div * s + rem.min(s))
                };
                (shard << 32) | ((i - start) / batch)
            }
        }
    }
}

/// Streaming packer: feed documents in order, receive full chunks.
pub struct Packer {
    t: usize,
    grouping: Grouping,
    buf: Vec<u32>,
    group: Option<u64>,
    pub dropped: u64,
    pub chunks: u64,
}

impl Packer {
    pub fn new(t: usize, grouping: Grouping) -> Self {
        Packer {
            t,
            grouping,
            buf: Vec::with_capacity(2 * t),
            group: None,
            dropped: 0,
            chunks: 0,
        }
    }

    /// Add document `index` with its tokens; `emit` gets each completed chunk.
    pub fn push(
        &mut self,
        index: u64,
        tokens: &[u32],
        emit: &mut impl FnMut(&[u32]) -> Result<()>,
    ) -> Result<()> {
        let g = self.grouping.group(index);
        if self.group.is_some_and(|cur| cur != g) {
            self.dropped += self.buf.len() as u64;
            self.buf.clear();
        }
        self.group = Some(g);
        self.buf.extend_from_slice(tokens);
        if self.buf.len() >= self.t {
            let full = self.buf.len() / self.t * self.t;
            for c in self.buf[..full].chunks_exact(self.t) {
                emit(c)?;
                self.chunks += 1;
            }
            self.buf.drain(..full);
        }
        Ok(())
    }

    /// End of input: the last remainder is dropped.
    pub fn finish(&mut self) {
        self.dropped += self.buf.len() as u64;
        self.buf.clear();
    }
}

/// The Arrow schema of chunks of length T.
pub fn chunks_schema(t: usize) -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("chunk_id", DataType::UInt64, false),
        Field::new(
            "tokens",
            DataType::FixedSizeList(Arc::new(Field::new("item", DataType::UInt32, true)), t as i32),
            false,
        ),
    ]))
}

fn chunks_batch(t: usize, first_id: u64, tokens: Vec<u32>) -> Result<RecordBatch> {
    let n = tokens.len() / t;
    let ids = UInt64Array::from_iter_values(first_id..first_id + n as u64);
    let list = FixedSizeListArray::try_new(
        Arc::new(Field::new("item", DataType::UInt32, true)),
        t as i32,
        Arc::new(UInt32Array::from(tokens)),
        None,
    )
    .ctx("building chunks")?;
    RecordBatch::try_new(chunks_schema(t), vec![Arc::new(ids) as ArrayRef, Arc::new(list)])
        .ctx("building a chunks batch")
}

/// pack's parameters, checked before any work.
struct PackArgs<'a> {
    dataset: &'a str,
    splits: Vec<&'a str>,
    t: usize,
    /// `hf` (the Hugging Face group_texts recipe) or `concat`.
    mode: &'a str,
    shards: u64,
    batch: u64,
    force: bool,
}

impl<'a> PackArgs<'a> {
    fn parse(p: &'a Params) -> Result<Self> {
        let t = p.usize("T")?;
        if t < 2 {
            return Err(p.invalid(
                "T",
                format!("{t} is too short: a chunk needs at least 2 tokens (a context and a label)"),
            ));
        }
        if t > 1 << 20 {
            return Err(p.invalid("T", format!("{t} is larger than 2^20")));
        }
        let mode = p.choice("mode", &["hf", "concat"])?;
        let shards = p.u64("shards")?;
        let batch = p.u64("batch")?;
        if mode == "hf" && (shards == 0 || batch == 0) {
            return Err(p.invalid("shards", "shards and batch must be at least 1"));
        }
        Ok(PackArgs {
            dataset: p.nonempty("dataset")?,
            splits: p.list("splits"),
            t,
            mode,
            shards,
            batch,
            force: p.bool("force")?,
        })
    }
}

impl Stage for Pack {
    fn name(&self) -> &'static str {
        "pack"
    }
    fn about(&self) -> &'static str {
        "cut token streams into chunks of T tokens (hf: run_clm group_texts per batch and shard; concat)"
    }
    fn reads(&self) -> &'static str {
        "tokens"
    }
    fn writes(&self) -> &'static str {
        "chunks"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn check(&self, p: &Params) -> Result<()> {
        PackArgs::parse(p).map(drop)
    }

    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String> {
        let args = PackArgs::parse(p)?;
        let PackArgs {
            dataset,
            t,
            mode,
            shards,
            batch,
            ..
        } = args;
        let mut summary = Vec::new();
        for &split in &args.splits {
            let tokens = Artifact::new("tokens", &[("dataset", dataset), ("split", split)])?;
            if ctx.lake.manifest(&tokens)?.is_none() && split != "train" {
                tracing::info!(split, "no tokens for this split; skipped");
                continue;
            }
            let tokens_m = ctx.lake.require(&tokens, "run stage=tokenize")?;
            let out = Artifact::new("chunks", &[("dataset", dataset), ("split", split)])?;
            let mut prov = Provenance::new("pack")
                .param("T", t)
                .param("mode", mode)
                .input(&tokens_m)
                .extra("T", t as u64);
            if mode == "hf" {
                prov = prov.param("shards", shards).param("batch", batch);
            }
            for k in ["tokenizer_fingerprint", "vocab_size", "tokenizer_key"] {
                if let Some(v) = tokens_m.extra.get(k) {
                    prov = prov.extra(k, v.clone());
                }
            }
            if let Some(m) = ctx.lake.up_to_date(&out, &prov, args.force)? {
                summary.push(format!("{split}: up to date ({} chunks)", m.rows));
                continue;
            }
            ctx.would_run(format!("pack {split}"))?;
            let grouping = if mode == "hf" {
                Grouping::Hf {
                    n_docs: tokens_m.rows,
                    shards,
                    batch,
                }
            } else {
                Grouping::Concat
            };
            let rows_per_group = ((8usize << 20) / (4 * t)).max(1);
            let mut writer = TableWriter::with_arrow_schema("chunks", chunks_schema(t), rows_per_group)?;
            let mut packer = Packer::new(t, grouping);
            let mut pending: Vec<u32> = Vec::new();
            let mut next_id = 0u64;
            let mut index = 0u64;
            let stream = ctx.lake.stream_artifact(&tokens, 8192)?;
            let bar = lc_lake::progress::bar(stream.rows, "pack", "docs");
            for b in stream {
                let b = b?;
                let ids = b.column(0).as_primitive::<UInt64Type>();
                let lists = b.column(2).as_list::<i32>();
                let values = lists.values().as_primitive::<UInt32Type>();
                for row in 0..b.num_rows() {
                    if ids.value(row) != index {
                        return Err(Error::artifact(
                            ctx.lake.display(&tokens.data_key()),
                            format!(
                                "row {index} has doc_id {}, expected {index}: documents must be in doc_id order",
                                ids.value(row)
                            ),
                        ));
                    }
                    let (s, e) = (
                        lists.value_offsets()[row] as usize,
                        lists.value_offsets()[row + 1] as usize,
                    );
                    packer.push(index, &values.values()[s..e], &mut |c| {
                        pending.extend_from_slice(c);
                        Ok(())
                    })?;
                    index += 1;
                    if pending.len() >= rows_per_group * t {
                        let n = (pending.len() / t) as u64;
                        writer.write(&chunks_batch(t, next_id, std::mem::take(&mut pending))?)?;
                        next_id += n;
                    }
                }
                ctx.cancel.check()?;
                bar.inc(b.num_rows() as u64);
            }
            bar.finish_and_clear();
            packer.finish();
            if !pending.is_empty() {
                let n = (pending.len() / t) as u64;
                writer.write(&chunks_batch(t, next_id, pending)?)?;
                next_id += n;
            }
            if next_id == 0 {
                return Err(Error::invalid(format!(
                    "{split}: no chunk of {t} tokens could be cut from {} documents ({} tokens, all dropped as remainders); use a smaller T{}",
                    tokens_m.rows,
                    packer.dropped,
                    if mode == "hf" { " or mode=concat" } else { "" }
                )));
            }
            let staged = writer.finish()?;
            ctx.lake.commit(
                &out,
                staged,
                prov.extra("chunks", next_id)
                    .extra("dropped_tokens", packer.dropped),
            )?;
            summary.push(format!(
                "{split}: {next_id} chunks of {t} ({} tokens dropped)",
                packer.dropped
            ));
        }
        Ok(format!(
            "chunks/dataset={dataset} ({mode}): {}",
            summary.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The straightforward version: shards, batches of documents, concatenate,
    /// cut, drop each batch's remainder.
    fn reference_hf(docs: &[Vec<u32>], t: usize, shards: usize, batch: usize) -> Vec<Vec<u32>> {
        let n = docs.len();
        let mut out = Vec::new();
        for s in 0..shards {
            let div = n / shards;
            let rem = n % shards;
            let start = div * s + s.min(rem);
            let end = start + div + usize::from(s < rem);
            let shard = &docs[start..end];
            for b in shard.chunks(batch) {
                let cat: Vec<u32> = b.iter().flatten().copied().collect();
                let total = cat.len() / t * t;
                for i in (0..total).step_by(t) {
                    out.push(cat[i..i + t].to_vec());
                }
            }
        }
        out
    }

    fn run_packer(docs: &[Vec<u32>], t: usize, g: Grouping) -> Vec<Vec<u32>> {
        let mut p = Packer::new(t, g);
        let mut out = Vec::new();
        for (i, d) in docs.iter().enumerate() {
            p.push(i as u64, d, &mut |c| {
                out.push(c.to_vec());
                Ok(())
            })
            .unwrap();
        }
        p.finish();
        out
    }

    fn docs(n: usize, seed: u64) -> Vec<Vec<u32>> {
        let mut x = seed;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x >> 33
        };
        (0..n)
            .map(|i| {
                // Empty documents, short ones and ones longer than T.
                let len = match next() % 7 {
                    0 => 0,
                    1 => 40 + (next() % 30) as usize,
                    _ => (next() % 12) as usize,
                };
                (0..len).map(|k| (i * 1000 + k) as u32).collect()
            })
            .collect()
    }

    #[test]
    fn hf_packing_matches_the_straightforward_implementation() {
        for (n, t, shards, batch) in [
            (0, 8, 2, 1000),
            (1, 8, 2, 1000),
            (3, 8, 5, 1000), // more shards than documents
            (999, 8, 2, 1000),
            (2501, 16, 2, 1000), // uneven shards and batches
            (2501, 7, 3, 100),
            (57, 32, 4, 5),
        ] {
            let d = docs(n, n as u64 + t as u64);
            let want = reference_hf(&d, t, shards, batch);
            let got = run_packer(
                &d,
                t,
                Grouping::Hf {
                    n_docs: n as u64,
                    shards: shards as u64,
                    batch: batch as u64,
                },
            );
            assert_eq!(got, want, "n={n} t={t} shards={shards} batch={batch}");
        }
    }

    #[test]
    fn concat_packing_drops_one_remainder() {
        let d = docs(300, 9);
        let cat: Vec<u32> = d.iter().flatten().copied().collect();
        let got = run_packer(&d, 10, Grouping::Concat);
        assert_eq!(got.len(), cat.len() / 10);
        assert_eq!(got.concat(), cat[..cat.len() / 10 * 10].to_vec());
    }
}
