//! `pipeline bench data`: ingest, tokenize and pack on the shipped sample
//! replicated to a size, in MB/s of text.

use std::io::Write;

use super::{temp_ctx, timed};
use crate::error::{Context, Result};
use crate::stages;

/// ingest + tokenize + pack on `source` replicated to at least `mb` MB.
pub fn data(source: &str, tokenizer: &str, mb: usize) -> Result<String> {
    let (dir, ctx) = temp_ctx()?;
    let text = std::fs::read(source).ctx(source)?;
    let path = dir.path().join("corpus.txt");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).ctx("corpus")?);
    let mut written = 0usize;
    while written < mb << 20 {
        f.write_all(&text).ctx("corpus")?;
        if !text.ends_with(b"\n") {
            f.write_all(b"\n").ctx("corpus")?;
        }
        f.write_all(b"<|endoftext|>\n").ctx("corpus")?;
        written += text.len() + 15;
    }
    drop(f);
    let bytes = std::fs::metadata(&path).ctx("corpus")?.len() as f64;
    let corpus = path.to_string_lossy().to_string();
    let (_, t_ingest) = timed(|| stages::run_pairs(&ctx, "ingest", &[("dataset", "b"), ("train", &corpus)]))?;
    let (_, t_tok) =
        timed(|| stages::run_pairs(&ctx, "tokenize", &[("dataset", "b"), ("tokenizer", tokenizer)]))?;
    let (_, t_pack) = timed(|| {
        stages::run_pairs(
            &ctx,
            "pack",
            &[("dataset", "b"), ("T", "2048"), ("mode", "hf"), ("shards", "2")],
        )
    })?;
    let mbs = |t: f64| bytes / 1e6 / t;
    let total = t_ingest + t_tok + t_pack;
    Ok(format!(
        "data: {:.1} MB of text ({} x {})\n  ingest   {t_ingest:6.2} s  {:7.1} MB/s\n  tokenize {t_tok:6.2} s  {:7.1} MB/s\n  pack     {t_pack:6.2} s  {:7.1} MB/s\n  end to end {total:6.2} s  {:7.1} MB/s",
        bytes / 1e6,
        source,
        (written / text.len().max(1)),
        mbs(t_ingest),
        mbs(t_tok),
        mbs(t_pack),
        mbs(total)
    ))
}
