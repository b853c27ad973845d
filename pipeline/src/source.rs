//! Input files outside the lake's tables (corpora, metric tables to import),
//! read through `object_store` like everything else.
//!
//! A source is named by a local path, a `file://` URL, an `s3://bucket/key`
//! URL (same environment as the lake), or `lake:key` for a key inside the
//! current lake.

use std::io::Read;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::ObjectStoreExt;

use crate::error::{Context, Error, Result};
use crate::lake::Lake;

/// One input file.
#[derive(Debug, Clone)]
pub struct Source {
    /// The store holding the file (a sibling of the lake sharing its runtime).
    pub store: Lake,
    /// Key of the file in `store`.
    pub key: String,
    /// The name the user gave, for messages.
    pub name: String,
    pub size: u64,
}

impl Source {
    pub fn open(lake: &Lake, spec: &str) -> Result<Self> {
        let spec = spec.trim();
        let (store, key) = if let Some(key) = spec.strip_prefix("lake:") {
            (lake.clone(), key.trim_start_matches('/').to_string())
        } else if spec.starts_with("s3://") || spec.starts_with("s3a://") {
            let url = url::Url::parse(spec).map_err(|e| Error::Url {
                url: spec.to_string(),
                problem: e.to_string(),
            })?;
            let bucket = url.host_str().unwrap_or_default();
            let store = lake.open_sibling(&format!("s3://{bucket}"))?;
            (store, url.path().trim_start_matches('/').to_string())
        } else if spec.starts_with("memory://") {
            return Err(Error::input(
                spec,
                "memory:// inputs are not supported; use lake:KEY",
            ));
        } else {
            let local = std::path::PathBuf::from(spec.strip_prefix("file://").unwrap_or(spec));
            if !local.is_file() {
                return Err(Error::input(spec, "no such file"));
            }
            let abs = std::path::absolute(&local).ctx(spec)?;
            let parent = abs
                .parent()
                .ok_or_else(|| Error::input(spec, "not a file path"))?;
            let name = abs
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| Error::input(spec, "file name is not UTF-8"))?;
            let parent_str = parent
                .to_str()
                .ok_or_else(|| Error::input(spec, "path is not UTF-8"))?;
            (lake.open_sibling(parent_str)?, name.to_string())
        };
        let mut src = Self::open_key(&store, &key).map_err(|e| match e {
            Error::Input { problem, .. } => Error::input(spec, problem),
            other => other,
        })?;
        src.name = spec.to_string();
        Ok(src)
    }

    /// A file at `key` of an opened store.
    pub fn open_key(store: &Lake, key: &str) -> Result<Self> {
        let name = store.display(key);
        let meta = store
            .head_opt(key)?
            .ok_or_else(|| Error::input(&name, "no such file"))?;
        Ok(Source {
            store: store.clone(),
            key: key.to_string(),
            name,
            size: meta.size,
        })
    }

    /// The file's identity by content (BLAKE3, cached in `lake`).
    pub fn content_id(&self, lake: &Lake) -> Result<String> {
        crate::integrity::content_id(lake, &self.store, &self.key)
    }

    /// The file name's extension, lower-cased.
    pub fn extension(&self) -> String {
        let base = self.key.rsplit('/').next().unwrap_or(&self.key);
        let base = base.strip_suffix(".gz").unwrap_or(base);
        base.rsplit_once('.')
            .map(|(_, e)| e.to_ascii_lowercase())
            .unwrap_or_default()
    }

    /// Read the whole file.
    pub fn bytes(&self) -> Result<Bytes> {
        self.store.get(&self.key)
    }

    /// A synchronous streaming reader over the file; `progress` counts the
    /// bytes as they arrive.
    pub fn reader_with_progress(&self, progress: indicatif::ProgressBar) -> Result<SourceReader> {
        let mut r = self.reader()?;
        r.progress = progress;
        Ok(r)
    }

    /// A synchronous streaming reader over the file.
    pub fn reader(&self) -> Result<SourceReader> {
        let path = self.store.path(&self.key);
        let store = self.store.store();
        let result = self
            .store
            .block_on(store.get(&path))
            .ctx(format!("reading {}", self.name))?;
        Ok(SourceReader {
            lake: self.store.clone(),
            stream: result.into_stream(),
            current: Bytes::new(),
            name: self.name.clone(),
            progress: indicatif::ProgressBar::hidden(),
        })
    }
}

/// `std::io::Read` over an object's byte stream, fetching as it goes.
pub struct SourceReader {
    lake: Lake,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    current: Bytes,
    name: String,
    progress: indicatif::ProgressBar,
}

impl SourceReader {
    /// The next chunk of bytes as the store delivers it (None at the end).
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        if !self.current.is_empty() {
            return Ok(Some(std::mem::take(&mut self.current)));
        }
        match self.lake.block_on(self.stream.next()) {
            None => Ok(None),
            Some(r) => {
                let b = r.ctx(format!("reading {}", self.name))?;
                self.progress.inc(b.len() as u64);
                Ok(Some(b))
            }
        }
    }
}

impl Read for SourceReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.lake.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(b)) => {
                    self.progress.inc(b.len() as u64);
                    self.current = b
                }
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}
