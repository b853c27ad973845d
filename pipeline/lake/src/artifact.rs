//! Artifacts: one Parquet file per table partition plus a JSON manifest.
//!
//! Layout (hive style, so DataFusion listing tables pick up new partitions
//! without re-registration):
//!
//! ```text
//! <lake>/<table>/<k1>=<v1>/<k2>=<v2>/part-0.parquet
//! <lake>/<table>/<k1>=<v1>/<k2>=<v2>/_manifest.json
//! ```
//!
//! A partition is always exactly one data file, so replacing it is one atomic
//! object write: a reader sees the old file or the new one, never a mixture.
//! Data is first written to a local staging file (hashed with BLAKE3 on the
//! way), then uploaded, then the manifest is written. The manifest records the
//! producing stage, its parameters, the content hashes of its inputs, the row
//! count, size and hash of the data, and the hash of each 1 MiB block of it.
//! A consumer checks that the data object's size matches its manifest, so an
//! artifact caught between its data and its manifest write is reported, not
//! read, and every byte read is checked against the hashes
//! ([`crate::integrity`]).

use std::collections::BTreeMap;
use std::io::Write;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use futures::StreamExt;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};
use parquet::arrow::async_reader::ParquetRecordBatchStream;

use crate::parquet_io::ObjectReader;
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{Context, Error, Result};
use crate::integrity::{DATA_FILE, MANIFEST_FILE, short};
use crate::lake::Lake;
use crate::manifest::{InputRef, Manifest};
use crate::schemas::{self, TableSchema};

/// One partition of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub table: String,
    pub partition: Vec<(String, String)>,
}

/// Check that a partition value can stand in a path and in SQL unchanged.
pub fn check_partition_value(key: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 200
        && value != "."
        && value != ".."
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | '+'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{key}='{value}' cannot name a lake partition: use 1-200 characters from A-Z a-z 0-9 . _ - @ +"
        )))
    }
}

impl Artifact {
    pub fn new(table: &str, partition: &[(&str, &str)]) -> Result<Self> {
        let schema = schemas::table(table)?;
        let names = schema.partition_names();
        let given: Vec<&str> = partition.iter().map(|p| p.0).collect();
        if names != given {
            return Err(Error::invalid(format!(
                "table {table} is partitioned by {names:?}, not {given:?}"
            )));
        }
        for (k, v) in partition {
            check_partition_value(k, v)?;
        }
        Ok(Artifact {
            table: table.to_string(),
            partition: partition
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    /// Lake-relative directory: `table/k=v/...`.
    pub fn dir(&self) -> String {
        let mut s = self.table.clone();
        for (k, v) in &self.partition {
            s.push('/');
            s.push_str(k);
            s.push('=');
            s.push_str(v);
        }
        s
    }

    pub fn data_key(&self) -> String {
        format!("{}/{DATA_FILE}", self.dir())
    }

    pub fn manifest_key(&self) -> String {
        format!("{}/{MANIFEST_FILE}", self.dir())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.partition
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn schema(&self) -> &'static TableSchema {
        schemas::table(&self.table).expect("artifact tables are checked at construction")
    }

    /// Parse `table/k=v/...` back into an artifact.
    pub fn from_dir(dir: &str) -> Result<Self> {
        let mut parts = dir.trim_matches('/').split('/');
        let table = parts.next().unwrap_or_default();
        let mut partition = Vec::new();
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| Error::invalid(format!("'{dir}' is not a table partition path")))?;
            partition.push((k, v));
        }
        Artifact::new(table, &partition)
    }
}

impl std::fmt::Display for Artifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.dir())
    }
}

/// What a stage says about an artifact it commits.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    pub stage: String,
    pub params: BTreeMap<String, String>,
    pub inputs: Vec<InputRef>,
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Provenance {
    pub fn new(stage: &str) -> Self {
        Provenance {
            stage: stage.to_string(),
            ..Default::default()
        }
    }
    pub fn param(mut self, k: &str, v: impl ToString) -> Self {
        self.params.insert(k.to_string(), v.to_string());
        self
    }
    pub fn input(mut self, m: &Manifest) -> Self {
        self.inputs.push(m.input_ref());
        self
    }
    pub fn extra(mut self, k: &str, v: impl Into<serde_json::Value>) -> Self {
        self.extra.insert(k.to_string(), v.into());
        self
    }
    /// Whether an existing manifest was made by the same stage, parameters and
    /// inputs (so recomputing would give the same artifact).
    pub fn matches(&self, m: &Manifest) -> bool {
        m.stage == self.stage && m.params == self.params && m.inputs == self.inputs
    }

    /// [`Provenance::matches`], with the parameters in `ignore` left out of
    /// the comparison (ones that do not change the result).
    pub fn matches_ignoring(&self, m: &Manifest, ignore: &[&str]) -> bool {
        let strip = |p: &BTreeMap<String, String>| -> BTreeMap<String, String> {
            p.iter()
                .filter(|(k, _)| !ignore.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        m.stage == self.stage && strip(&m.params) == strip(&self.params) && m.inputs == self.inputs
    }
}

/// A `Write` that hashes what passes through (whole file and blocks).
struct HashingFile {
    file: std::io::BufWriter<std::fs::File>,
    digest: crate::integrity::Digester,
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.digest.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// A finished Parquet file in local staging, ready to commit.
pub struct StagedFile {
    path: tempfile::TempPath,
    pub rows: u64,
    pub bytes: u64,
    pub content_hash: String,
    pub blocks: crate::integrity::Blocks,
}

/// Streams record batches of one table into a staged Parquet file, checking
/// every batch against the table's schema.
pub struct TableWriter {
    schema: &'static TableSchema,
    writer: Option<ArrowWriter<HashingFile>>,
    path: Option<tempfile::TempPath>,
    rows: u64,
}

fn writer_props(row_group_rows: usize) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("valid level")))
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_created_by(format!("pipeline {}", env!("CARGO_PKG_VERSION")))
        .build()
}

impl TableWriter {
    pub fn new(table: &str) -> Result<Self> {
        let schema = schemas::table(table)?;
        Self::with_arrow_schema(table, schema.file_schema(), 64 * 1024)
    }

    /// A writer with an explicit Arrow schema (e.g. a fixed-size list length)
    /// and row-group size. The schema must satisfy the table's schema file.
    pub fn with_arrow_schema(table: &str, arrow: SchemaRef, row_group_rows: usize) -> Result<Self> {
        let schema = schemas::table(table)?;
        schema.check(&arrow, false)?;
        let tmp = crate::staging::file(".parquet")?;
        let (file, path) = tmp.into_parts();
        let sink = HashingFile {
            file: std::io::BufWriter::with_capacity(1 << 20, file),
            digest: crate::integrity::Digester::new(),
        };
        let writer = ArrowWriter::try_new(sink, arrow, Some(writer_props(row_group_rows)))
            .ctx(format!("starting a Parquet file for {table}"))?;
        Ok(TableWriter {
            schema,
            writer: Some(writer),
            path: Some(path),
            rows: 0,
        })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.schema.check_batch(batch)?;
        self.rows += batch.num_rows() as u64;
        self.writer
            .as_mut()
            .expect("writer is present until finish")
            .write(batch)
            .ctx(format!("writing {} rows", self.schema.table))
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn finish(mut self) -> Result<StagedFile> {
        let writer = self.writer.take().expect("finish is called once");
        let mut sink = writer
            .into_inner()
            .ctx(format!("closing the {} Parquet file", self.schema.table))?;
        sink.flush().ctx("flushing the staging file")?;
        let (bytes, content_hash, blocks) = sink.digest.finish();
        Ok(StagedFile {
            path: self.path.take().expect("finish is called once"),
            rows: self.rows,
            bytes,
            content_hash,
            blocks,
        })
    }
}

/// Rows per row group for `batches`: about [`ROW_GROUP_BYTES`] of data each
/// (at most 64 Ki rows). A reader holds one row group's column chunks at a
/// time, so wide rows (class means of thousands of dimensions) must not make
/// the whole table one group: reading a quarter-gigabyte `class_stats` would
/// then first fetch all of it into fresh memory.
fn rows_per_group(batches: &[RecordBatch]) -> usize {
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let bytes: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
    let per_row = bytes.div_ceil(rows.max(1)).max(1);
    (ROW_GROUP_BYTES / per_row).clamp(1, 64 * 1024)
}

/// Target uncompressed size of a row group written by [`stage_batches`].
const ROW_GROUP_BYTES: usize = 8 << 20;

/// Write a set of batches to a staged file in one call.
pub fn stage_batches(table: &str, batches: &[RecordBatch]) -> Result<StagedFile> {
    let mut w = match batches.first() {
        Some(b) => TableWriter::with_arrow_schema(table, b.schema(), rows_per_group(batches))?,
        None => TableWriter::new(table)?,
    };
    for b in batches {
        w.write(b)?;
    }
    w.finish()
}

/// Synchronous iterator over the record batches of a (possibly large) lake
/// Parquet file, reading row groups as they are needed.
pub struct BatchStream {
    lake: Lake,
    stream: ParquetRecordBatchStream<ObjectReader>,
    key: String,
    pub schema: SchemaRef,
    pub rows: u64,
}

/// A lake Parquet file opened by [`Lake::open_parquet`].
struct ParquetFile {
    lake: Lake,
    what: String,
    path: object_store::path::Path,
    size: u64,
    metadata: ArrowReaderMetadata,
}

impl ParquetFile {
    /// A stream builder over the file, sharing its metadata.
    fn builder(&self) -> ParquetRecordBatchStreamBuilder<ObjectReader> {
        let reader = ObjectReader::new(self.lake.store(), self.path.clone(), self.size);
        ParquetRecordBatchStreamBuilder::new_with_metadata(reader, self.metadata.clone())
    }

    /// The batches `builder` selects, `rows` of them.
    fn stream(
        &self,
        builder: ParquetRecordBatchStreamBuilder<ObjectReader>,
        rows: u64,
    ) -> Result<BatchStream> {
        Ok(BatchStream {
            lake: self.lake.clone(),
            stream: builder.build().ctx(&self.what)?,
            key: self.what.clone(),
            schema: self.metadata.schema().clone(),
            rows,
        })
    }
}

impl Iterator for BatchStream {
    type Item = Result<RecordBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        let key = &self.key;
        let next = self.lake.block_on(self.stream.next());
        next.map(|r| r.ctx(format!("reading {key}")))
    }
}

impl Lake {
    /// Upload a staged file as the artifact's data and write its manifest.
    pub fn commit(&self, artifact: &Artifact, staged: StagedFile, prov: Provenance) -> Result<Manifest> {
        // The manifest version this commit replaces: if another writer
        // commits in between, ours is refused rather than interleaved.
        let before = self.head_opt(&artifact.manifest_key())?.map(|m| m.e_tag);
        self.check_lease(&self.display(&artifact.dir()))?;
        self.put_file(&artifact.data_key(), &staged.path)?;
        let manifest = Manifest {
            artifact: artifact.dir(),
            table: artifact.table.clone(),
            partition: artifact.partition.iter().cloned().collect(),
            stage: prov.stage,
            params: prov.params,
            inputs: prov.inputs,
            rows: staged.rows,
            bytes: staged.bytes,
            content_hash: staged.content_hash,
            blocks: Some(staged.blocks),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            extra: prov.extra,
        };
        let json = Bytes::from(serde_json::to_vec_pretty(&manifest).expect("manifests serialise"));
        let tag = match before {
            // A store without e-tags cannot condition the write.
            Some(None) => {
                self.put(&artifact.manifest_key(), json.clone())?;
                None
            }
            Some(Some(t)) => Some(Some(t)),
            None => Some(None),
        };
        if let Some(tag) = tag
            && !self.put_if_unchanged(&artifact.manifest_key(), json, tag)?
        {
            return Err(Error::Stale(format!(
                "{}: another worker committed this partition while this one was computing it; its result is kept (run the stage again to check it)",
                self.display(&artifact.dir())
            )));
        }
        tracing::debug!(artifact = %artifact, rows = manifest.rows, bytes = manifest.bytes, "committed");
        self.note_commit(&manifest);
        Ok(manifest)
    }

    /// Write batches and commit them as an artifact in one step.
    pub fn write_artifact(
        &self,
        artifact: &Artifact,
        batches: &[RecordBatch],
        prov: Provenance,
    ) -> Result<Manifest> {
        let staged = stage_batches(&artifact.table, batches)?;
        self.commit(artifact, staged, prov)
    }

    /// The manifest of an artifact, if it has one.
    pub fn manifest(&self, artifact: &Artifact) -> Result<Option<Manifest>> {
        let key = artifact.manifest_key();
        match self.get_opt(&key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::artifact(self.display(&key), format!("corrupt manifest: {e}"))),
        }
    }

    /// The manifest of an artifact made by the same stage, parameters and
    /// inputs as `prov` would make it now (so there is nothing to redo);
    /// `None` when it is missing, different, or `force` asks for a redo.
    pub fn up_to_date(
        &self,
        artifact: &Artifact,
        prov: &Provenance,
        force: bool,
    ) -> Result<Option<Manifest>> {
        if force {
            return Ok(None);
        }
        Ok(self.manifest(artifact)?.filter(|m| prov.matches(m)))
    }

    /// The manifest of an input artifact, checked against its data object.
    /// `hint` tells the user which stage produces it.
    pub fn require(&self, artifact: &Artifact, hint: &str) -> Result<Manifest> {
        let m = self.manifest(artifact)?.ok_or_else(|| {
            Error::artifact(
                self.display(&artifact.dir()),
                format!("not found in the lake; {hint}"),
            )
        })?;
        match self.head_opt(&artifact.data_key())? {
            None => Err(Error::artifact(
                self.display(&artifact.data_key()),
                "manifest present but data missing; re-run the producing stage",
            )),
            Some(meta) if meta.size != m.bytes => Err(Error::artifact(
                self.display(&artifact.data_key()),
                format!(
                    "data is {} bytes but its manifest says {}: it is being rewritten or a write was interrupted; re-run the producing stage ({})",
                    meta.size, m.bytes, m.stage
                ),
            )),
            Some(_) => Ok(m),
        }
    }

    /// Read a whole (small) artifact into memory.
    pub fn read_artifact(&self, artifact: &Artifact) -> Result<Vec<RecordBatch>> {
        let key = artifact.data_key();
        let bytes = self.get(&key)?;
        let what = self.display(&key);
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .ctx(&what)?
            .with_batch_size(64 * 1024)
            .build()
            .ctx(&what)?;
        let batches: Vec<RecordBatch> = reader.collect::<std::result::Result<_, _>>().ctx(&what)?;
        if let Some(b) = batches.first() {
            artifact.schema().check(b.schema().as_ref(), false)?;
        }
        Ok(batches)
    }

    /// Stream an artifact's batches without loading the file.
    pub fn stream_artifact(&self, artifact: &Artifact, batch_rows: usize) -> Result<BatchStream> {
        self.stream_artifact_range(artifact, batch_rows, 0, usize::MAX)
    }

    /// Stream `limit` rows starting at row `offset`.
    pub fn stream_artifact_range(
        &self,
        artifact: &Artifact,
        batch_rows: usize,
        offset: usize,
        limit: usize,
    ) -> Result<BatchStream> {
        let file = self.open_parquet(artifact)?;
        let rows = file.metadata.metadata().file_metadata().num_rows().max(0) as u64;
        let mut builder = file.builder().with_batch_size(batch_rows);
        if offset > 0 {
            builder = builder.with_offset(offset);
        }
        if limit != usize::MAX {
            builder = builder.with_limit(limit);
        }
        file.stream(builder, rows)
    }

    /// An artifact's data file, its Parquet metadata read once and its
    /// schema checked against the table's, for streams to be built on.
    fn open_parquet(&self, artifact: &Artifact) -> Result<ParquetFile> {
        let key = artifact.data_key();
        let what = self.display(&key);
        let meta = self
            .head_opt(&key)?
            .ok_or_else(|| Error::artifact(&what, "data file not found"))?;
        let path = self.path(&key);
        let mut reader = ObjectReader::new(self.store(), path.clone(), meta.size);
        let metadata = self
            .block_on(ArrowReaderMetadata::load_async(&mut reader, Default::default()))
            .ctx(&what)?;
        artifact.schema().check(metadata.schema(), false)?;
        Ok(ParquetFile {
            lake: self.clone(),
            what,
            path,
            size: meta.size,
            metadata,
        })
    }

    /// The artifact's rows as up to `parts` streams of consecutive row
    /// groups with about equal rows each, in file order, to be decoded on
    /// as many threads. Each stream's `rows` is its own.
    pub fn stream_artifact_parts(
        &self,
        artifact: &Artifact,
        batch_rows: usize,
        parts: usize,
    ) -> Result<Vec<BatchStream>> {
        let file = self.open_parquet(artifact)?;
        let groups: Vec<u64> = file
            .metadata
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows().max(0) as u64)
            .collect();
        let total: u64 = groups.iter().sum();
        let parts = parts.clamp(1, groups.len().max(1));
        let mut out = Vec::with_capacity(parts);
        let (mut start, mut done) = (0, 0u64);
        for p in 0..parts {
            // Whole row groups until this part's share of the rows is reached,
            // at least one each, and the rest to the last part.
            let target = total * (p as u64 + 1) / parts as u64;
            let mut end = start;
            let mut rows = 0;
            while end < groups.len() && (end == start || done + rows < target || p + 1 == parts) {
                rows += groups[end];
                end += 1;
            }
            let builder = file
                .builder()
                .with_batch_size(batch_rows)
                .with_row_groups((start..end).collect());
            out.push(file.stream(builder, rows)?);
            (start, done) = (end, done + rows);
        }
        Ok(out)
    }

    /// Every manifest under a table (optionally under a partition prefix such as
    /// `model=X`), sorted by artifact path.
    pub fn manifests(&self, table: &str, under: &str) -> Result<Vec<Manifest>> {
        let prefix = if under.is_empty() {
            table.to_string()
        } else {
            format!("{table}/{}", under.trim_matches('/'))
        };
        let mut out = Vec::new();
        for (key, _) in self.list(&prefix)? {
            if key.ends_with(MANIFEST_FILE) {
                let bytes = self.get(&key)?;
                let m: Manifest = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::artifact(self.display(&key), format!("corrupt manifest: {e}")))?;
                out.push(m);
            }
        }
        Ok(out)
    }

    /// Refuse to add an artifact next to siblings computed from other inputs.
    ///
    /// `siblings` are the manifests of artifacts that must share inputs with the
    /// one about to be written (e.g. the other layers of the same model and
    /// split). With `force` the stale siblings are deleted instead.
    pub fn check_siblings(&self, siblings: &[Manifest], inputs: &[InputRef], force: bool) -> Result<()> {
        for m in siblings {
            if m.inputs != inputs {
                if force {
                    tracing::warn!(artifact = %m.artifact, "deleting artifact computed from other inputs (force=true)");
                    self.delete(&format!("{}/{MANIFEST_FILE}", m.artifact))?;
                    self.delete(&format!("{}/{DATA_FILE}", m.artifact))?;
                } else {
                    let old: Vec<String> = m
                        .inputs
                        .iter()
                        .map(|i| format!("{} {}", i.artifact, short(&i.content_hash)))
                        .collect();
                    let new: Vec<String> = inputs
                        .iter()
                        .map(|i| format!("{} {}", i.artifact, short(&i.content_hash)))
                        .collect();
                    return Err(Error::Stale(format!(
                        "{} was computed from [{}] but the inputs are now [{}]; refusing to mix old and new results (re-run with force=true to replace them)",
                        m.artifact,
                        old.join(", "),
                        new.join(", ")
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Convenience: a shared schema reference for a table.
pub fn file_schema(table: &str) -> Result<SchemaRef> {
    Ok(schemas::table(table)?.file_schema())
}
