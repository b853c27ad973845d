//! `vocab`: the class census of a split, the paper's "empirical vocabulary".
//!
//! Reads: `chunks/dataset=D/split=S` and the dataset's tokenizer (lake copy).
//! Writes: `vocab/dataset=D/split=S`, one row for every token id of the
//! tokenizer: how often it occurs as a label, i.e. at positions 2..T of a
//! chunk (every token that has a context before it), and its decoded text.
//! C = number of ids with count > 0 is recorded in the manifest (29,233 for
//! the full TinyStories train split in the paper).

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, StringArray, UInt32Array, UInt64Array};
use arrow::datatypes::UInt32Type;
use arrow::record_batch::RecordBatch;
use lc_lake::artifact::{Artifact, Provenance, file_schema};

use crate::error::{Context, Error, Result};
use crate::params::{ParamSpec, Params, param};
use crate::stages::{Ctx, Stage};

pub struct Vocab;

const PARAMS: &[ParamSpec] = &[
    param("dataset", "sample", "dataset name"),
    param("splits", "train,validation", "splits to count"),
    param("force", "false", "recount even when up to date"),
];

/// vocab's parameters, checked before any work.
struct VocabArgs<'a> {
    dataset: &'a str,
    splits: Vec<&'a str>,
    force: bool,
}

impl<'a> VocabArgs<'a> {
    fn parse(p: &'a Params) -> Result<Self> {
        Ok(VocabArgs {
            dataset: p.nonempty("dataset")?,
            splits: p.list("splits"),
            force: p.bool("force")?,
        })
    }
}

impl Stage for Vocab {
    fn name(&self) -> &'static str {
        "vocab"
    }
    fn about(&self) -> &'static str {
        "count every token id as a label (positions 2..T of each chunk); C = classes with count > 0"
    }
    fn reads(&self) -> &'static str {
        "chunks, tokenizer"
    }
    fn writes(&self) -> &'static str {
        "vocab"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn check(&self, p: &Params) -> Result<()> {
        VocabArgs::parse(p).map(drop)
    }

    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String> {
        let args = VocabArgs::parse(p)?;
        let dataset = args.dataset;
        let (tok, _) = crate::tokenizer::for_dataset(&ctx.lake, dataset)?;
        let v = tok.vocab_size();
        let mut summary = Vec::new();
        for &split in &args.splits {
            let chunks = Artifact::new("chunks", &[("dataset", dataset), ("split", split)])?;
            if ctx.lake.manifest(&chunks)?.is_none() && split != "train" {
                continue;
            }
            let chunks_m = ctx.lake.require(&chunks, "run stage=pack")?;
            let out = Artifact::new("vocab", &[("dataset", dataset), ("split", split)])?;
            let prov = Provenance::new("vocab").input(&chunks_m);
            if let Some(m) = ctx.lake.up_to_date(&out, &prov, args.force)? {
                let classes = m.extra_u64("classes").unwrap_or(0);
                summary.push(format!("{split}: up to date (C = {classes})"));
                continue;
            }
            ctx.would_run(format!("vocab {split}"))?;
            let mut counts = vec![0u64; v];
            let stream = ctx.lake.stream_artifact(&chunks, 1024)?;
            let bar = lc_lake::progress::bar(stream.rows, "vocab", "chunks");
            for b in stream {
                let b = b?;
                let lists = b.column(1).as_fixed_size_list();
                let t = lists.value_length() as usize;
                let values = lists.values().as_primitive::<UInt32Type>().values();
                for chunk in values.chunks_exact(t) {
                    for &id in &chunk[1..] {
                        let slot = counts.get_mut(id as usize).ok_or_else(|| {
                            Error::artifact(
                                ctx.lake.display(&chunks.data_key()),
                                format!("token id {id} is outside the tokenizer's vocabulary of {v}: chunks and tokenizer disagree"),
                            )
                        })?;
                        *slot += 1;
                    }
                }
                ctx.cancel.check()?;
                bar.inc(b.num_rows() as u64);
            }
            bar.finish_and_clear();
            let classes = counts.iter().filter(|&&c| c > 0).count() as u64;
            let labels: u64 = counts.iter().sum();
            let texts: StringArray = (0..v as u32).map(|id| Some(tok.token_text(id))).collect();
            let cols: Vec<ArrayRef> = vec![
                Arc::new(UInt32Array::from_iter_values(0..v as u32)),
                Arc::new(UInt64Array::from(counts)),
                Arc::new(texts),
            ];
            let batch = RecordBatch::try_new(file_schema("vocab")?, cols).ctx("building vocab")?;
            ctx.lake.write_artifact(
                &out,
                &[batch],
                prov.extra("classes", classes)
                    .extra("labels", labels)
                    .extra("vocab_size", v as u64),
            )?;
            summary.push(format!("{split}: C = {classes} classes over {labels} labels"));
        }
        Ok(format!("vocab/dataset={dataset}: {}", summary.join("; ")))
    }
}
