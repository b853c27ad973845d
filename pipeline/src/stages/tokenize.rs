//! `tokenize`: turn every document into token ids.
//!
//! Reads: `documents/dataset=D/split=S` and a `tokenizer.json` (default: the
//! GPT-Neo = GPT-2 tokenizer of `data/tokenizer.json`,
//! compiled into the binary as `tokenizer=gpt2`).
//! Writes: `tokens/dataset=D/split=S` (one row per document, same doc_id), and
//! a copy of the tokenizer at `tokenizers/<fingerprint>.json` so later stages
//! decode and check vocabularies without the original file.
//!
//! Nothing is added per document (no BOS/EOS), as in the paper. Documents are
//! streamed in batches and tokenized in parallel with rayon, so memory stays
//! bounded by one batch whatever the corpus size. The manifest records the
//! tokenizer's vocabulary fingerprint and size; `pack`, `train` and `collect`
//! use them to refuse data tokenized with another vocabulary.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, ListArray, UInt32Array, UInt64Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, UInt64Type};
use arrow::record_batch::RecordBatch;
use lc_lake::artifact::{Artifact, Provenance, TableWriter, file_schema};
use rayon::prelude::*;

use crate::error::{Context, Error, Result};
use crate::params::{ParamSpec, Params, param};
use crate::stages::{Ctx, Stage};
use crate::tokenizer::{TextTokenizer, tokenizer_key};

pub struct Tokenize;

const PARAMS: &[ParamSpec] = &[
    param("dataset", "sample", "dataset name"),
    param(
        "tokenizer",
        "gpt2",
        "tokenizer.json: path, s3:// URL, lake:KEY, or gpt2 (built in: GPT-Neo = GPT-2 BPE)",
    ),
    param(
        "splits",
        "train,validation",
        "splits to tokenize (those ingested)",
    ),
    param("batch_docs", "8192", "documents per parallel batch"),
    param("force", "false", "re-tokenize even when up to date"),
];

/// tokenize's parameters, checked before any work.
struct TokenizeArgs<'a> {
    dataset: &'a str,
    tokenizer: &'a str,
    splits: Vec<&'a str>,
    batch_docs: usize,
    force: bool,
}

impl<'a> TokenizeArgs<'a> {
    fn parse(p: &'a Params) -> Result<Self> {
        Ok(TokenizeArgs {
            dataset: p.nonempty("dataset")?,
            tokenizer: p.nonempty("tokenizer")?,
            splits: p.list("splits"),
            batch_docs: p.usize_in("batch_docs", 1, 1 << 24)?,
            force: p.bool("force")?,
        })
    }
}

impl Stage for Tokenize {
    fn name(&self) -> &'static str {
        "tokenize"
    }
    fn about(&self) -> &'static str {
        "tokenize documents with a tokenizer.json (GPT-Neo/GPT-2 byte-level BPE by default), in parallel and streaming"
    }
    fn reads(&self) -> &'static str {
        "documents, tokenizer.json"
    }
    fn writes(&self) -> &'static str {
        "tokens, tokenizers/<fingerprint>.json"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn check(&self, p: &Params) -> Result<()> {
        TokenizeArgs::parse(p).map(drop)
    }

    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String> {
        let args = TokenizeArgs::parse(p)?;
        let dataset = args.dataset;
        let (tok_bytes, src_name) = crate::tokenizer::read_tokenizer_json(&ctx.lake, args.tokenizer)?;
        let tok = TextTokenizer::from_bytes(&tok_bytes, &src_name)?;
        let tok_key = tokenizer_key(tok.fingerprint());
        if !ctx.plan_only && !ctx.lake.exists(&tok_key)? {
            ctx.lake.put(&tok_key, tok_bytes.clone())?;
        }
        let mut summary = Vec::new();
        for &split in &args.splits {
            let docs = Artifact::new("documents", &[("dataset", dataset), ("split", split)])?;
            let Some(_) = ctx.lake.manifest(&docs)? else {
                if split == "train" {
                    return Err(Error::artifact(
                        ctx.lake.display(&docs.dir()),
                        "not found; run stage=ingest first",
                    ));
                }
                tracing::info!(split, "no documents for this split; skipped");
                continue;
            };
            let docs_m = ctx.lake.require(&docs, "run stage=ingest")?;
            let out = Artifact::new("tokens", &[("dataset", dataset), ("split", split)])?;
            let prov = Provenance::new("tokenize")
                .param("tokenizer", tok.fingerprint())
                .input(&docs_m)
                .extra("tokenizer_key", tok_key.as_str())
                .extra("tokenizer_fingerprint", tok.fingerprint())
                .extra("tokenizer_source", src_name.as_str())
                .extra("vocab_size", tok.vocab_size() as u64);
            if let Some(m) = ctx.lake.up_to_date(&out, &prov, args.force)? {
                summary.push(format!("{split}: up to date ({} docs)", m.rows));
                continue;
            }
            ctx.would_run(format!("tokenize {split}"))?;
            let started = std::time::Instant::now();
            let (staged, n_tokens, text_bytes) = tokenize_split(ctx, &docs, &tok, args.batch_docs)?;
            let secs = started.elapsed().as_secs_f64();
            let rows = staged.rows;
            ctx.lake.commit(&out, staged, prov.extra("tokens", n_tokens))?;
            summary.push(format!(
                "{split}: {rows} docs, {n_tokens} tokens ({:.1} MB/s)",
                text_bytes as f64 / 1e6 / secs.max(1e-9)
            ));
        }
        Ok(format!("tokens/dataset={dataset}: {}", summary.join("; ")))
    }
}

/// Tokenize one split; returns the staged file, the token count and text bytes.
fn tokenize_split(
    ctx: &Ctx,
    docs: &Artifact,
    tok: &TextTokenizer,
    batch_docs: usize,
) -> Result<(lc_lake::artifact::StagedFile, u64, u64)> {
    let stream = ctx.lake.stream_artifact(docs, batch_docs)?;
    let bar = lc_lake::progress::bar(stream.rows, "tokenize", "docs");
    let mut writer = TableWriter::new("tokens")?;
    let (mut n_tokens, mut text_bytes) = (0u64, 0u64);
    for batch in stream {
        let batch = batch?;
        let ids = batch
            .column_by_name("doc_id")
            .expect("schema checked")
            .as_primitive::<UInt64Type>()
            .clone();
        let texts = batch
            .column_by_name("text")
            .expect("schema checked")
            .as_string::<i32>();
        text_bytes += texts.value_data().len() as u64;
        let encoded: Vec<Vec<u32>> = (0..texts.len())
            .into_par_iter()
            .with_min_len(64)
            .map(|i| tok.encode(texts.value(i)))
            .collect::<Result<_>>()?;
        let out = tokens_batch(ids, &encoded)?;
        n_tokens += encoded.iter().map(|v| v.len() as u64).sum::<u64>();
        writer.write(&out)?;
        ctx.cancel.check()?;
        bar.inc(batch.num_rows() as u64);
    }
    bar.finish_and_clear();
    Ok((writer.finish()?, n_tokens, text_bytes))
}

/// Build a `tokens` batch from doc ids and their token lists.
pub fn tokens_batch(doc_ids: UInt64Array, encoded: &[Vec<u32>]) -> Result<RecordBatch> {
    let mut lens = Vec::with_capacity(encoded.len());
    for (i, e) in encoded.iter().enumerate() {
        let n = u32::try_from(e.len()).map_err(|_| {
            Error::invalid(format!("document {} has more than 2^32 tokens", doc_ids.value(i)))
        })?;
        lens.push(n);
    }
    let values: Vec<u32> = encoded.iter().flatten().copied().collect();
    let offsets = OffsetBuffer::<i32>::from_lengths(lens.iter().map(|&n| n as usize));
    let list = ListArray::try_new(
        Arc::new(Field::new("item", DataType::UInt32, true)),
        offsets,
        Arc::new(UInt32Array::from(values)),
        None,
    )
    .ctx("building token lists")?;
    let cols: Vec<ArrayRef> = vec![
        Arc::new(doc_ids),
        Arc::new(UInt32Array::from(lens)),
        Arc::new(list),
    ];
    RecordBatch::try_new(file_schema("tokens")?, cols).ctx("building a tokens batch")
}
