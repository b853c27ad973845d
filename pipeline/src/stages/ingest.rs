//! `ingest`: read text corpora as researchers have them and store every
//! document byte-exact in the `documents` table, one artifact per split.
//!
//! Reads: corpus files (local, `s3://`, or `lake:KEY`).
//! Writes: `documents/dataset=D/split=S`.
//!
//! Formats:
//! - `txt` (TinyStories `.txt` files): documents are separated by lines that
//!   consist of exactly the separator (default `<|endoftext|>`, a trailing `\r`
//!   tolerated). A document is every byte between two separator lines, except
//!   the line terminator (`\n` or `\r\n`) of its last line, which belongs to the
//!   separator line. Each separator line ends one document, so two adjacent
//!   separators give an empty document. Text after the last separator is a
//!   final document when it is not empty (its own final line terminator, if
//!   any, is dropped the same way). Nothing else is changed: inner blank lines,
//!   leading spaces and Unicode are kept as they are.
//! - `jsonl`, `csv`, `parquet` (Hugging Face dataset exports): one document per
//!   row, the string in `text_column`, exactly as decoded; a null or missing
//!   value is an error naming the row.
//!
//! `trim=whitespace` strips leading and trailing Unicode whitespace from each
//! document (off by default: the raw `.txt` files and the Hugging Face split
//! differ in whitespace, and that difference changes token counts, so it must be
//! a visible choice). The form read is recorded in the manifest.
//!
//! Splits come from `train=` and `validation=` files, or from one `input=`
//! corpus with a seeded held-out fraction: document i goes to validation iff
//! hash(seed, i) < holdout (so the fraction is exact in expectation, and the
//! assignment streams with bounded memory).
//!
//! Invariants: documents keep input order and get doc_id 0, 1, ... per split;
//! invalid UTF-8 is an error naming the file and byte offset; an empty corpus
//! is an error; nothing is committed unless every input was read completely.

use std::io::BufRead;
use std::sync::Arc;

use arrow::array::{Array, ArrayBuilder, ArrayRef, AsArray, StringBuilder, UInt64Builder};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use lc_lake::artifact::{Artifact, Provenance, TableWriter};
use lc_lake::manifest::Manifest;
use lc_lake::source::Source;

use crate::error::{Context, Error, Result};
use crate::params::{ParamSpec, Params, param};
use crate::stages::{Ctx, Stage};

pub struct Ingest;

const PARAMS: &[ParamSpec] = &[
    param("dataset", "sample", "dataset name (a lake partition)"),
    param("train", "", "train corpus file(s), comma-separated"),
    param("validation", "", "validation corpus file(s), comma-separated"),
    param(
        "input",
        "",
        "one corpus to split into train/validation with holdout",
    ),
    param("holdout", "0", "fraction of input= documents sent to validation"),
    param("seed", "0", "seed of the holdout assignment"),
    param(
        "format",
        "auto",
        "auto|txt|jsonl|csv|parquet (auto: by file extension)",
    ),
    param(
        "text_column",
        "text",
        "column holding the text in jsonl/csv/parquet inputs",
    ),
    param(
        "separator",
        "<|endoftext|>",
        "document separator line in txt inputs",
    ),
    param(
        "trim",
        "none",
        "none|whitespace: strip each document's leading/trailing whitespace",
    ),
    param("force", "false", "re-ingest even when the sources are unchanged"),
];

/// Text per record batch written, to bound memory.
const BATCH_TEXT_BYTES: usize = 8 << 20;

/// ingest's parameters, checked before any file is opened.
struct IngestArgs<'a> {
    dataset: &'a str,
    /// Either `train` (and maybe `validation`) or `input` with `holdout`.
    train: Vec<&'a str>,
    validation: Vec<&'a str>,
    input: Vec<&'a str>,
    /// Of `input`'s documents, in [0, 1).
    holdout: f64,
    seed: u64,
    format: &'a str,
    separator: &'a str,
    text_column: &'a str,
    /// Strip leading and trailing whitespace of each document.
    trim: bool,
    force: bool,
}

impl<'a> IngestArgs<'a> {
    fn parse(p: &'a Params) -> Result<Self> {
        let holdout = p.f64("holdout")?;
        if !(0.0..1.0).contains(&holdout) {
            return Err(p.invalid("holdout", format!("{holdout} is not in [0, 1)")));
        }
        let (train, validation, input) = (p.list("train"), p.list("validation"), p.list("input"));
        if input.is_empty() && train.is_empty() {
            return Err(p.invalid(
                "train",
                "give train= (and optionally validation=) or input= with holdout=",
            ));
        }
        if !input.is_empty() && (!train.is_empty() || !validation.is_empty()) {
            return Err(p.invalid("input", "input= cannot be combined with train= or validation="));
        }
        if input.is_empty() && holdout > 0.0 {
            return Err(p.invalid("holdout", "holdout applies to input=, not to train="));
        }
        Ok(IngestArgs {
            dataset: p.nonempty("dataset")?,
            train,
            validation,
            input,
            holdout,
            seed: p.u64("seed")?,
            format: p.choice("format", &["auto", "txt", "jsonl", "csv", "parquet"])?,
            separator: p.nonempty("separator")?,
            text_column: p.nonempty("text_column")?,
            trim: p.choice("trim", &["none", "whitespace"])? == "whitespace",
            force: p.bool("force")?,
        })
    }
}

impl Stage for Ingest {
    fn name(&self) -> &'static str {
        "ingest"
    }
    fn about(&self) -> &'static str {
        "read corpora (txt with separator lines, jsonl/csv/parquet with a text column) byte-exact into documents"
    }
    fn reads(&self) -> &'static str {
        "corpus files"
    }
    fn writes(&self) -> &'static str {
        "documents"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn check(&self, p: &Params) -> Result<()> {
        IngestArgs::parse(p).map(drop)
    }

    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String> {
        let args = IngestArgs::parse(p)?;
        let IngestArgs {
            dataset,
            holdout,
            seed,
            format,
            separator,
            text_column,
            trim,
            ..
        } = args;
        let open_all = |specs: &[&str]| -> Result<Vec<Source>> {
            Ok(specs
                .iter()
                .map(|s| Source::open(&ctx.lake, s))
                .collect::<lc_lake::Result<_>>()?)
        };
        let (train_src, val_src, input_src) = (
            open_all(&args.train)?,
            open_all(&args.validation)?,
            open_all(&args.input)?,
        );

        let mut prov = Provenance::new("ingest")
            .param("dataset", dataset)
            .param("format", format)
            .param("text_column", text_column)
            .param("separator", separator)
            .param("trim", if trim { "whitespace" } else { "none" })
            .param("holdout", holdout)
            .param("seed", seed);
        for (role, srcs) in [
            ("train", &train_src),
            ("validation", &val_src),
            ("input", &input_src),
        ] {
            for (i, s) in srcs.iter().enumerate() {
                // The input's identity is its content; its name is only noted.
                prov = prov
                    .param(&format!("{role}.{i}"), s.content_id(&ctx.lake)?)
                    .extra(&format!("{role}.{i}"), s.name.as_str());
            }
        }

        let splits: Vec<&str> = if !input_src.is_empty() {
            if holdout > 0.0 {
                vec!["train", "validation"]
            } else {
                vec!["train"]
            }
        } else if val_src.is_empty() {
            vec!["train"]
        } else {
            vec!["train", "validation"]
        };
        let artifacts: Vec<Artifact> = splits
            .iter()
            .map(|s| Artifact::new("documents", &[("dataset", dataset), ("split", s)]))
            .collect::<lc_lake::Result<_>>()?;
        if !args.force {
            let existing: Vec<Option<Manifest>> = artifacts
                .iter()
                .map(|a| ctx.lake.manifest(a))
                .collect::<lc_lake::Result<_>>()?;
            if existing
                .iter()
                .all(|m| m.as_ref().is_some_and(|m| prov.matches(m)))
            {
                let rows: Vec<String> = existing
                    .iter()
                    .flatten()
                    .map(|m| format!("{} {} docs", m.partition["split"], m.rows))
                    .collect();
                return Ok(format!("documents up to date ({})", rows.join(", ")));
            }
        }
        ctx.would_run(format!("ingest dataset={dataset}"))?;

        let opts = ReadOptions {
            format,
            text_column,
            separator,
            trim,
        };
        let mut sinks: Vec<DocSink> = splits
            .iter()
            .map(|_| DocSink::new(&ctx.cancel))
            .collect::<Result<_>>()?;
        let total_bytes: u64 = train_src
            .iter()
            .chain(&val_src)
            .chain(&input_src)
            .map(|s| s.size)
            .sum();
        let bar = lc_lake::progress::bytes_bar(total_bytes, "ingest");
        // Read one source; a source without any text (only separators,
        // blank lines) is refused by name rather than ingested as blanks.
        let read = |src: &Source, f: &mut dyn FnMut(u64, &str) -> Result<()>| -> Result<()> {
            let (mut docs, mut with_text) = (0u64, 0u64);
            read_documents(src, &opts, &bar, &mut |o, t| {
                docs += 1;
                with_text += u64::from(!t.trim().is_empty());
                f(o, t)
            })?;
            if docs == 0 {
                return Err(Error::input(&src.name, "holds no documents (the file is empty)"));
            }
            if with_text == 0 {
                return Err(Error::input(
                    &src.name,
                    format!(
                        "holds no text: its {docs} document(s) are empty or whitespace (a file of separator lines only?)"
                    ),
                ));
            }
            Ok(())
        };
        if !input_src.is_empty() {
            let mut index: u64 = 0;
            for src in &input_src {
                read(src, &mut |offset, text| {
                    let to_val = holdout > 0.0 && unit_hash(seed, index) < holdout;
                    index += 1;
                    sinks[usize::from(to_val)].push(&src.name, offset, text)
                })?;
            }
        } else {
            for src in &train_src {
                read(src, &mut |o, t| sinks[0].push(&src.name, o, t))?;
            }
            for src in &val_src {
                read(src, &mut |o, t| sinks[1].push(&src.name, o, t))?;
            }
        }
        bar.finish_and_clear();
        let total_docs: u64 = sinks.iter().map(|s| s.next_id).sum();
        if total_docs == 0 {
            return Err(Error::input(
                [&args.train, &args.validation, &args.input]
                    .into_iter()
                    .flatten()
                    .copied()
                    .collect::<Vec<_>>()
                    .join(","),
                "the corpus holds no documents",
            ));
        }
        let mut staged = Vec::new();
        for (sink, split) in sinks.into_iter().zip(&splits) {
            if sink.next_id == 0 {
                return Err(Error::invalid(format!(
                    "split {split} would be empty; check the inputs or the holdout fraction"
                )));
            }
            staged.push(sink.finish()?);
        }
        let mut summary = Vec::new();
        for ((artifact, (file, docs, bytes)), split) in artifacts.iter().zip(staged).zip(&splits) {
            ctx.lake.commit(
                artifact,
                file,
                prov.clone().extra("documents", docs).extra("text_bytes", bytes),
            )?;
            summary.push(format!("{split}: {docs} documents, {bytes} bytes"));
        }
        Ok(format!("documents/dataset={dataset}: {}", summary.join("; ")))
    }
}

/// splitmix64 of (seed, index) mapped to [0, 1).
fn unit_hash(seed: u64, index: u64) -> f64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

struct ReadOptions<'a> {
    format: &'a str,
    text_column: &'a str,
    separator: &'a str,
    trim: bool,
}

/// Accumulates documents of one split into record batches and a staged file.
struct DocSink {
    writer: TableWriter,
    ids: UInt64Builder,
    sources: StringBuilder,
    offsets: UInt64Builder,
    texts: StringBuilder,
    pending_bytes: usize,
    next_id: u64,
    text_bytes: u64,
    /// Checked at every batch of documents.
    cancel: crate::cancel::Cancel,
}

impl DocSink {
    fn new(cancel: &crate::cancel::Cancel) -> Result<Self> {
        Ok(DocSink {
            cancel: cancel.clone(),
            writer: TableWriter::new("documents")?,
            ids: UInt64Builder::new(),
            sources: StringBuilder::new(),
            offsets: UInt64Builder::new(),
            texts: StringBuilder::new(),
            pending_bytes: 0,
            next_id: 0,
            text_bytes: 0,
        })
    }

    fn push(&mut self, source: &str, offset: u64, text: &str) -> Result<()> {
        self.ids.append_value(self.next_id);
        self.sources.append_value(source);
        self.offsets.append_value(offset);
        self.texts.append_value(text);
        self.next_id += 1;
        self.text_bytes += text.len() as u64;
        self.pending_bytes += text.len();
        if self.pending_bytes >= BATCH_TEXT_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.cancel.check()?;
        if self.ids.len() == 0 {
            return Ok(());
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.ids.finish()),
            Arc::new(self.sources.finish()),
            Arc::new(self.offsets.finish()),
            Arc::new(self.texts.finish()),
        ];
        let batch = RecordBatch::try_new(lc_lake::artifact::file_schema("documents")?, cols)
            .ctx("building a documents batch")?;
        self.pending_bytes = 0;
        Ok(self.writer.write(&batch)?)
    }

    fn finish(mut self) -> Result<(lc_lake::artifact::StagedFile, u64, u64)> {
        self.flush()?;
        let (docs, bytes) = (self.next_id, self.text_bytes);
        Ok((self.writer.finish()?, docs, bytes))
    }
}

type DocFn<'a> = dyn FnMut(u64, &str) -> Result<()> + 'a;

fn read_documents(
    src: &Source,
    opts: &ReadOptions,
    bar: &indicatif::ProgressBar,
    f: &mut DocFn,
) -> Result<()> {
    let format = match opts.format {
        "auto" => match src.extension().as_str() {
            "txt" | "text" => "txt",
            "jsonl" | "json" | "ndjson" => "jsonl",
            "csv" => "csv",
            "parquet" => "parquet",
            other => {
                return Err(Error::input(
                    &src.name,
                    format!(
                        "cannot tell the format from extension '{other}'; pass format=txt|jsonl|csv|parquet"
                    ),
                ));
            }
        },
        f => f,
    };
    tracing::info!(source = %src.name, format, bytes = src.size, "reading corpus");
    let mut emit = |offset: u64, text: &str| -> Result<()> {
        if opts.trim {
            f(offset, text.trim())
        } else {
            f(offset, text)
        }
    };
    match format {
        "txt" => read_txt(src, opts.separator, bar, &mut emit),
        "parquet" => read_parquet(src, opts.text_column, bar, &mut emit),
        _ => read_delimited(src, format, opts.text_column, bar, &mut emit),
    }
}

/// Stream a separator-delimited text file (see the module docs for the rules).
pub fn read_txt(src: &Source, separator: &str, bar: &indicatif::ProgressBar, f: &mut DocFn) -> Result<()> {
    let mut reader = src.reader_with_progress(bar.clone())?;
    let sep = separator.as_bytes();
    let mut pending: Vec<u8> = Vec::new(); // bytes after the last complete line
    let mut pending_at: u64 = 0; // file offset of pending[0]
    let mut doc: Vec<u8> = Vec::new();
    let mut doc_at: u64 = 0;
    let emit = |doc: &mut Vec<u8>, doc_at: u64, f: &mut DocFn| -> Result<()> {
        if doc.ends_with(b"\r\n") {
            doc.truncate(doc.len() - 2);
        } else if doc.ends_with(b"\n") {
            doc.truncate(doc.len() - 1);
        }
        let text = std::str::from_utf8(doc).map_err(|e| {
            Error::input(
                &src.name,
                format!("invalid UTF-8 at byte offset {}", doc_at + e.valid_up_to() as u64),
            )
        })?;
        f(doc_at, text)?;
        doc.clear();
        Ok(())
    };
    let is_sep = |line: &[u8]| {
        line == sep || (line.len() == sep.len() + 1 && line.ends_with(b"\r") && &line[..sep.len()] == sep)
    };
    while let Some(chunk) = reader.next_chunk()? {
        pending.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(nl) = memchr::memchr(b'\n', &pending[start..]) {
            let line = &pending[start..start + nl];
            if is_sep(line) {
                emit(&mut doc, doc_at, f)?;
                doc_at = pending_at + (start + nl + 1) as u64;
            } else {
                doc.extend_from_slice(&pending[start..=start + nl]);
            }
            start += nl + 1;
        }
        pending.drain(..start);
        pending_at += start as u64;
    }
    // The last line has no terminator.
    if is_sep(&pending) {
        emit(&mut doc, doc_at, f)?;
    } else {
        doc.extend_from_slice(&pending);
        if !doc.is_empty() {
            emit(&mut doc, doc_at, f)?;
        }
    }
    Ok(())
}

fn text_of_batch(src: &Source, batch: &RecordBatch, row0: u64, f: &mut DocFn) -> Result<()> {
    let col = batch.column(0);
    let col =
        arrow::compute::cast(col, &DataType::Utf8).ctx(format!("{}: text column as strings", src.name))?;
    let strings = col.as_string::<i32>();
    for i in 0..strings.len() {
        let row = row0 + i as u64;
        if strings.is_null(i) {
            return Err(Error::input(
                &src.name,
                format!("row {row}: the text is null or missing"),
            ));
        }
        f(row, strings.value(i))?;
    }
    Ok(())
}

fn read_delimited(
    src: &Source,
    format: &str,
    column: &str,
    bar: &indicatif::ProgressBar,
    f: &mut DocFn,
) -> Result<()> {
    let schema = Arc::new(Schema::new(vec![Field::new(column, DataType::Utf8, true)]));
    let mut row0 = 0u64;
    if format == "jsonl" {
        let reader = std::io::BufReader::with_capacity(1 << 20, src.reader_with_progress(bar.clone())?);
        let json = arrow::json::ReaderBuilder::new(schema)
            .with_batch_size(4096)
            .build(reader)
            .ctx(&src.name)?;
        let mut seen_text = false;
        for batch in json {
            let batch = batch.map_err(|e| Error::input(&src.name, format!("after row {row0}: {e}")))?;
            if batch.column(0).null_count() < batch.num_rows() {
                seen_text = true;
            }
            if !seen_text && batch.num_rows() > 0 {
                return Err(Error::input(
                    &src.name,
                    format!("no '{column}' field in the first rows; pass text_column=NAME"),
                ));
            }
            text_of_batch(src, &batch, row0, f)?;
            row0 += batch.num_rows() as u64;
        }
        return Ok(());
    }
    // CSV: read the header to find the column, then parse only that column.
    let mut head = std::io::BufReader::new(src.reader()?);
    let mut header = String::new();
    head.read_line(&mut header).ctx(&src.name)?;
    let names: Vec<String> = {
        let mut r = arrow::csv::reader::Format::default().with_header(true);
        r = r.with_delimiter(b',');
        let (s, _) = r
            .infer_schema(std::io::Cursor::new(header.as_bytes()), Some(0))
            .map_err(|e| Error::input(&src.name, format!("CSV header: {e}")))?;
        s.fields().iter().map(|f| f.name().clone()).collect()
    };
    let idx = names.iter().position(|n| n == column).ok_or_else(|| {
        Error::input(
            &src.name,
            format!("no column '{column}'; columns: {}", names.join(", ")),
        )
    })?;
    let all_utf8 = Arc::new(Schema::new(
        names
            .iter()
            .map(|n| Field::new(n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    // An empty field is an empty document, not a missing one (CSV cannot
    // tell them apart), so no value is read as null.
    let never = regex::Regex::new(r"^[^\s\S]$").expect("static regex");
    let csv = arrow::csv::ReaderBuilder::new(all_utf8)
        .with_header(true)
        .with_null_regex(never)
        .with_batch_size(4096)
        .with_projection(vec![idx])
        .build(std::io::BufReader::with_capacity(
            1 << 20,
            src.reader_with_progress(bar.clone())?,
        ))
        .ctx(&src.name)?;
    for batch in csv {
        let batch = batch.map_err(|e| Error::input(&src.name, format!("after row {row0}: {e}")))?;
        text_of_batch(src, &batch, row0, f)?;
        row0 += batch.num_rows() as u64;
    }
    Ok(())
}

fn read_parquet(src: &Source, column: &str, bar: &indicatif::ProgressBar, f: &mut DocFn) -> Result<()> {
    use futures::StreamExt;
    use parquet::arrow::arrow_reader::ArrowReaderOptions;
    use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};
    use std::panic::{AssertUnwindSafe, catch_unwind};
    // The Parquet reader panics on some damaged files: arrow-ipc 59 on a
    // damaged embedded Arrow schema (skipped: the Parquet schema types the
    // text column), parquet 59.3.2 dividing by zero on a dictionary page of
    // no values (fuzz/regressions/ingest). Such a panic is this file's error.
    let damaged = || {
        Error::input(
            &src.name,
            "not a readable Parquet file: the reader failed on it (damaged?)",
        )
    };
    let reader =
        lc_lake::parquet_io::ObjectReader::new(src.store.store(), src.store.path(&src.key), src.size);
    let options = ArrowReaderOptions::new().with_skip_arrow_metadata(true);
    let builder = catch_unwind(AssertUnwindSafe(|| {
        src.store
            .block_on(ParquetRecordBatchStreamBuilder::new_with_options(reader, options))
    }))
    .map_err(|_| damaged())?
    .map_err(|e| Error::input(&src.name, format!("not a readable Parquet file: {e}")))?;
    let schema = builder.schema().clone();
    let Some((pos, field)) = schema.column_with_name(column) else {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        return Err(Error::input(
            &src.name,
            format!("no column '{column}'; columns: {}", names.join(", ")),
        ));
    };
    if !matches!(
        field.data_type(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    ) {
        return Err(Error::input(
            &src.name,
            format!(
                "column '{column}' has type {}, expected strings",
                field.data_type()
            ),
        ));
    }
    let leaf = builder
        .parquet_schema()
        .columns()
        .iter()
        .position(|c| c.path().parts().first().map(String::as_str) == Some(column))
        .unwrap_or(pos);
    let mask = ProjectionMask::leaves(builder.parquet_schema(), [leaf]);
    let total_rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
    let mut stream = builder
        .with_projection(mask)
        .with_batch_size(4096)
        .build()
        .ctx(&src.name)?;
    let mut row0 = 0u64;
    // Progress in bytes, pro rata of the rows read.
    let start = bar.position();
    while let Some(batch) =
        catch_unwind(AssertUnwindSafe(|| src.store.block_on(stream.next()))).map_err(|_| damaged())?
    {
        let batch = batch.ctx(&src.name)?;
        text_of_batch(src, &batch, row0, f)?;
        row0 += batch.num_rows() as u64;
        bar.set_position(start + src.size * row0 / total_rows.max(1));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lc_lake::lake::Lake;

    fn docs_of(content: &[u8]) -> Result<Vec<(u64, String)>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.txt");
        std::fs::write(&path, content).unwrap();
        let lake = Lake::open("memory://").unwrap();
        let src = Source::open(&lake, path.to_str().unwrap())?;
        let mut out = Vec::new();
        read_txt(
            &src,
            "<|endoftext|>",
            &indicatif::ProgressBar::hidden(),
            &mut |o, t| {
                out.push((o, t.to_string()));
                Ok(())
            },
        )?;
        Ok(out)
    }

    #[test]
    fn txt_documents_are_delimited_exactly() {
        let docs = docs_of(b"A b.\n\nC\n<|endoftext|>\n  D\n<|endoftext|>\n<|endoftext|>\nE").unwrap();
        let texts: Vec<&str> = docs.iter().map(|d| d.1.as_str()).collect();
        assert_eq!(texts, vec!["A b.\n\nC", "  D", "", "E"]);
        // Offsets point at the first byte of each document.
        assert_eq!(docs.iter().map(|d| d.0).collect::<Vec<_>>(), vec![0, 22, 40, 54]);
        // CRLF separators and a trailing separator without newline.
        let docs = docs_of(b"x\r\n<|endoftext|>\r\ny\n<|endoftext|>").unwrap();
        let texts: Vec<&str> = docs.iter().map(|d| d.1.as_str()).collect();
        assert_eq!(texts, vec!["x", "y"]);
        // A separator inside a line is text.
        let docs = docs_of(b"a <|endoftext|> b\n").unwrap();
        assert_eq!(docs[0].1, "a <|endoftext|> b");
    }

    #[test]
    fn invalid_utf8_names_file_and_offset() {
        let err = docs_of(b"ok\n<|endoftext|>\nab\xffcd\n").unwrap_err().to_string();
        assert!(err.contains("c.txt") && err.contains("byte offset 19"), "{err}");
    }

    #[test]
    fn holdout_hash_is_uniform_enough() {
        let n = 100_000;
        let hits = (0..n).filter(|&i| unit_hash(3, i) < 0.1).count();
        // Binomial(1e5, 0.1): sd ~ 95, allow 5 sd.
        assert!((hits as i64 - 10_000).abs() < 475, "{hits}");
    }
}
