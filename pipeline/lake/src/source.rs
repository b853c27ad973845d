//! Input files outside the lake's tables (corpora, metric tables to import),
//! read through `object_store` like everything else.
//!
//! A source is named by a local path, a `file://` URL, an `s3://bucket/key`
//! URL (same environment as the lake), or `lake:key` for a key inside the
//! current lake.

use bytes::Bytes;

use crate::error::{Context, Error, Result};
use crate::lake::{Lake, StreamReader};

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
        content_id(lake, &self.store, &self.key)
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
    pub fn reader_with_progress(&self, progress: indicatif::ProgressBar) -> Result<StreamReader> {
        Ok(self.reader()?.with_progress(progress))
    }

    /// A synchronous streaming reader over the file.
    pub fn reader(&self) -> Result<StreamReader> {
        self.store.reader_named(&self.key, &self.name)
    }
}

/// The BLAKE3 of an object anywhere (`store`, `key`), as `blake3:HEX`,
/// computed once per version of the object and cached in the lake under
/// `_cache/content/`, keyed by (URL, size, modification time, e-tag). The
/// identity of a file outside the lake's manifests (a corpus, a Hugging Face
/// model's weights) is thereby its content, not its path or time: the cache
/// only saves re-reading it.
pub fn content_id(cache: &Lake, store: &Lake, key: &str) -> Result<String> {
    let meta = store
        .head_opt(key)?
        .ok_or_else(|| Error::input(store.display(key), "no such file"))?;
    let version = format!(
        "{}|{}|{}|{}",
        store.display(key),
        meta.size,
        meta.last_modified.timestamp_nanos_opt().unwrap_or_default(),
        meta.e_tag.clone().unwrap_or_default()
    );
    let cache_key = format!(
        "_cache/content/{}.json",
        &crate::integrity::hash_hex(version.as_bytes())[..32]
    );
    if let Some(b) = cache.get_opt(&cache_key)?
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b)
        && let Some(h) = v.get("blake3").and_then(|h| h.as_str())
    {
        return Ok(format!("blake3:{h}"));
    }
    let mut reader = store.reader(key)?;
    let mut hasher = blake3::Hasher::new();
    while let Some(chunk) = reader.next_chunk()? {
        hasher.update(&chunk);
    }
    let h = hasher.finalize().to_hex().to_string();
    let entry = serde_json::json!({"blake3": h, "of": version});
    // A cache that cannot be written (read-only lake) costs only time.
    if let Err(e) = cache.put(&cache_key, Bytes::from(serde_json::to_vec(&entry).expect("json"))) {
        tracing::debug!(error = %e, "content hash not cached");
    }
    Ok(format!("blake3:{h}"))
}
