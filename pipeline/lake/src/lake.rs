//! The results lake: every artifact the pipeline reads or writes goes through
//! one [`ObjectStore`], addressed by a URL.
//!
//! Supported lake URLs:
//! - a plain path or `file:///abs/path`: a local directory (created on first write);
//! - `s3://bucket/prefix`: an S3 bucket, credentials and endpoint from the standard
//!   `AWS_*` environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//!   `AWS_ENDPOINT_URL` / `AWS_ENDPOINT`). With a custom endpoint the client uses
//!   path-style requests, and plain `http://` is allowed for loopback endpoints;
//! - `memory://`: a fresh in-process store (tests).
//!
//! Writes are atomic per object: a single `put` or a completed multipart upload is
//! the only way bytes become visible in every backend above, so a reader never sees
//! a half-written file. Every read of a table's data file is checked against its
//! manifest's hashes ([`crate::integrity`]). Network calls retry with exponential
//! backoff and jitter until `PIPELINE_S3_RETRY_SECS` (default 15 s) have passed,
//! so a server that is away for a few seconds does not fail a stage. A multipart
//! upload that cannot finish is aborted: on error, on SIGINT/SIGTERM
//! ([`abort_uploads_in_flight`]), and, after a kill -9, by the next upload to the
//! same key or by `pipeline verify --repair` (uploads are journalled under
//! `_uploads/`).
//!
//! The lake owns a tokio runtime so that the stages, which are plain synchronous
//! compute code, can call the async object-store API with [`Lake::block_on`].

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, MultipartId, ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig,
};
use tokio::runtime::Runtime;
use url::Url;

use crate::error::{Context, Error, Result};
use crate::integrity::CheckedStore;

/// Size of one multipart-upload part when a local file is uploaded
/// (`PIPELINE_UPLOAD_PART_BYTES`, default 16 MiB; S3 needs at least 5 MiB).
fn part_bytes() -> usize {
    std::env::var("PIPELINE_UPLOAD_PART_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16 << 20usize)
        .max(5 << 20)
}

/// A handle on the results lake.
#[derive(Clone)]
pub struct Lake {
    /// The backend wrapped in a [`CheckedStore`].
    store: Arc<dyn ObjectStore>,
    /// The backend itself (for `verify`, which compares everything itself).
    raw: Arc<dyn ObjectStore>,
    /// The backend's multipart API where uploads need journalling (S3).
    multipart: Option<Arc<dyn MultipartStore>>,
    /// Prefix of the lake inside `store` (empty for the store's root).
    root: Path,
    /// The URL the user gave, normalised (`file:///abs`, `s3://b/p`, `memory://`).
    url: String,
    /// The URL exactly as given (a relative path stays relative).
    given: String,
    /// Scheme and authority DataFusion uses to find `store` in its registry.
    store_url: Url,
    rt: Arc<Runtime>,
    /// Where [`Lake::commit`] records what it committed, for a caller that
    /// asked ([`Lake::with_journal`]); shared by clones.
    journal: Option<Journal>,
    /// The lease a stage run holds while it writes through this handle:
    /// commits are refused once it has lapsed ([`Lake::under_lease`]).
    lease: Option<LeaseGuard>,
}

/// The manifests committed through a journaled lake handle, in order.
pub type Journal = Arc<std::sync::Mutex<Vec<crate::manifest::Manifest>>>;

impl std::fmt::Debug for Lake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lake").field("url", &self.url).finish()
    }
}

impl Lake {
    /// Open the lake at `url` (see the module documentation for the forms).
    pub fn open(url: &str) -> Result<Self> {
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .thread_name("lake-io")
                .build()
                .ctx("starting the I/O runtime")?,
        );
        Self::open_with_runtime(url, rt)
    }

    /// Open a second lake (e.g. an input location) sharing this lake's runtime.
    pub fn open_sibling(&self, url: &str) -> Result<Self> {
        Self::open_with_runtime(url, self.rt.clone())
    }

    fn open_with_runtime(url: &str, rt: Arc<Runtime>) -> Result<Self> {
        let bad = |problem: &str| Error::Url {
            url: url.to_string(),
            problem: problem.to_string(),
        };
        if url.is_empty() {
            return Err(bad("empty lake URL"));
        }
        if let Some(rest) = url.strip_prefix("memory://") {
            let root = Path::parse(rest.trim_matches('/')).map_err(|e| bad(&format!("invalid path: {e}")))?;
            let raw: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
            return Ok(Lake {
                store: Arc::new(CheckedStore::new(raw.clone())),
                raw,
                multipart: None,
                root,
                url: "memory://".to_string() + rest.trim_matches('/'),
                given: url.to_string(),
                store_url: Url::parse("memory://").expect("static URL"),
                rt,
                journal: None,
                lease: None,
            });
        }
        if url.starts_with("s3://") || url.starts_with("s3a://") {
            let parsed = Url::parse(url).map_err(|e| bad(&format!("not a URL: {e}")))?;
            let bucket = parsed
                .host_str()
                .filter(|b| !b.is_empty())
                .ok_or_else(|| bad("expected s3://bucket[/prefix]"))?
                .to_string();
            let prefix = parsed.path().trim_matches('/').to_string();
            let store = Arc::new(build_s3(&bucket).map_err(|e| bad(&e))?);
            let root = Path::parse(&prefix).map_err(|e| bad(&format!("invalid prefix: {e}")))?;
            let norm = if prefix.is_empty() {
                format!("s3://{bucket}")
            } else {
                format!("s3://{bucket}/{prefix}")
            };
            return Ok(Lake {
                store: Arc::new(CheckedStore::new(store.clone())),
                raw: store.clone(),
                multipart: Some(store),
                root,
                url: norm,
                given: url.to_string(),
                store_url: Url::parse(&format!("s3://{bucket}"))
                    .map_err(|e| bad(&format!("bucket name: {e}")))?,
                rt,
                journal: None,
                lease: None,
            });
        }
        if url.contains("://") && !url.starts_with("file://") {
            return Err(bad(
                "unsupported scheme; expected a local path, file://, s3:// or memory://",
            ));
        }
        let local = if let Some(rest) = url.strip_prefix("file://") {
            std::path::PathBuf::from(rest)
        } else {
            std::path::PathBuf::from(url)
        };
        let abs = std::path::absolute(&local).map_err(|e| bad(&e.to_string()))?;
        let abs_str = abs
            .to_str()
            .ok_or_else(|| bad("path is not valid UTF-8"))?
            .trim_end_matches('/')
            .to_string();
        let root =
            Path::parse(abs_str.trim_start_matches('/')).map_err(|e| bad(&format!("invalid path: {e}")))?;
        let raw: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new().with_automatic_cleanup(true));
        Ok(Lake {
            store: Arc::new(CheckedStore::new(raw.clone())),
            raw,
            multipart: None,
            root,
            url: format!("file://{abs_str}"),
            given: url.to_string(),
            store_url: Url::parse("file:///").expect("static URL"),
            rt,
            journal: None,
            lease: None,
        })
    }

    /// The same lake, recording every artifact committed through this
    /// handle and its clones in `journal` (what a stage run wrote).
    pub fn with_journal(&self, journal: Journal) -> Lake {
        Lake {
            journal: Some(journal),
            ..self.clone()
        }
    }

    /// The same lake, for a stage run holding `lease`: its commits are
    /// refused once the lease has lapsed (the process was stopped past its
    /// expiry, or could not renew it), so a worker that another has since
    /// replaced writes nothing over that worker's results.
    pub fn under_lease(&self, lease: LeaseGuard) -> Lake {
        Lake {
            lease: Some(lease),
            ..self.clone()
        }
    }

    /// Err if this handle's lease has lapsed.
    pub(crate) fn check_lease(&self, what: &str) -> Result<()> {
        match &self.lease {
            Some(l) if !l.held() => Err(Error::LeaseLapsed(format!(
                "{what}: this worker's lease lapsed before it could commit (stopped past its expiry, or unable to renew it), so another worker may own the partition now; nothing was written (run the stage again to check it)"
            ))),
            _ => Ok(()),
        }
    }

    /// Record a commit in the journal, if there is one.
    pub(crate) fn note_commit(&self, manifest: &crate::manifest::Manifest) {
        if let Some(j) = &self.journal {
            j.lock().unwrap_or_else(|e| e.into_inner()).push(manifest.clone());
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The lake URL as the user gave it.
    pub fn given_url(&self) -> &str {
        &self.given
    }

    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// The URL under which DataFusion must find [`Lake::store`].
    pub fn store_url(&self) -> &Url {
        &self.store_url
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.rt
    }

    /// Run an async operation to completion from synchronous stage code.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.rt.block_on(fut)
    }

    /// The store path of a lake-relative key (`a/b/c.parquet`).
    pub fn path(&self, rel: &str) -> Path {
        let mut p = self.root.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.clone().join(part);
        }
        p
    }

    /// A full URL of a lake-relative key, for messages and for DataFusion.
    pub fn display(&self, rel: &str) -> String {
        format!(
            "{}/{}",
            self.url.trim_end_matches('/'),
            rel.trim_start_matches('/')
        )
    }

    /// The URL of a table directory as DataFusion's listing tables expect it.
    pub fn table_url(&self, rel_dir: &str) -> String {
        let mut base = self.store_url.as_str().to_string();
        if !base.ends_with('/') {
            base.push('/');
        }
        let root = self.root.as_ref();
        if !root.is_empty() {
            base.push_str(root);
            base.push('/');
        }
        base.push_str(rel_dir.trim_matches('/'));
        base.push('/');
        base
    }

    /// Strip the lake root from a store path, giving the lake-relative key.
    pub fn relative(&self, path: &Path) -> String {
        let root = self.root.as_ref();
        let p = path.as_ref();
        if root.is_empty() {
            p.to_string()
        } else {
            p.strip_prefix(root)
                .map(|s| s.trim_start_matches('/').to_string())
                .unwrap_or_else(|| p.to_string())
        }
    }

    pub fn get(&self, rel: &str) -> Result<Bytes> {
        let path = self.path(rel);
        self.block_on(async {
            let r = self.store.get(&path).await?;
            r.bytes().await
        })
        .ctx(format!("reading {}", self.display(rel)))
    }

    /// Read a key without checking it against its manifest (for `verify`).
    pub fn get_unchecked(&self, rel: &str) -> Result<Bytes> {
        let path = self.path(rel);
        self.block_on(async {
            let r = self.raw.get(&path).await?;
            r.bytes().await
        })
        .ctx(format!("reading {}", self.display(rel)))
    }

    /// Read a key, or `None` where it does not exist.
    pub fn get_opt(&self, rel: &str) -> Result<Option<Bytes>> {
        match self.get(rel) {
            Ok(b) => Ok(Some(b)),
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn head_opt(&self, rel: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(rel);
        match self.block_on(self.store.head(&path)) {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e).ctx(format!("checking {}", self.display(rel))),
        }
    }

    pub fn exists(&self, rel: &str) -> Result<bool> {
        Ok(self.head_opt(rel)?.is_some())
    }

    /// Write one object atomically (it appears whole or not at all).
    pub fn put(&self, rel: &str, bytes: Bytes) -> Result<()> {
        let path = self.path(rel);
        self.block_on(self.store.put(&path, PutPayload::from_bytes(bytes)))
            .ctx(format!("writing {}", self.display(rel)))?;
        Ok(())
    }

    /// Create `rel` only if nothing is there: `Ok(false)` when it exists
    /// (a create-if-absent put: `If-None-Match: *` on S3, an exclusive link
    /// on a filesystem).
    pub fn put_if_absent(&self, rel: &str, bytes: Bytes) -> Result<bool> {
        let path = self.path(rel);
        let opts = object_store::PutOptions {
            mode: object_store::PutMode::Create,
            ..Default::default()
        };
        match self.block_on(self.store.put_opts(&path, PutPayload::from_bytes(bytes), opts)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(e).ctx(format!("creating {}", self.display(rel))),
        }
    }

    /// Replace `rel` only if it is still the version `e_tag` (or create it
    /// when `e_tag` is `None` and nothing is there): `Ok(false)` when another
    /// writer got there first. Stores without conditional updates (local
    /// filesystems) replace it unconditionally; leases keep writers apart
    /// there.
    pub fn put_if_unchanged(&self, rel: &str, bytes: Bytes, e_tag: Option<String>) -> Result<bool> {
        let Some(tag) = e_tag else {
            return self.put_if_absent(rel, bytes);
        };
        let path = self.path(rel);
        let opts = object_store::PutOptions {
            mode: object_store::PutMode::Update(object_store::UpdateVersion {
                e_tag: Some(tag),
                version: None,
            }),
            ..Default::default()
        };
        match self.block_on(
            self.store
                .put_opts(&path, PutPayload::from_bytes(bytes.clone()), opts),
        ) {
            Ok(_) => Ok(true),
            Err(object_store::Error::Precondition { .. })
            | Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(object_store::Error::NotImplemented { .. }) => {
                self.put(rel, bytes)?;
                Ok(true)
            }
            Err(e) => Err(e).ctx(format!("writing {}", self.display(rel))),
        }
    }

    /// Upload a local file to `rel` atomically: small files with one put, large
    /// ones as a multipart upload that becomes visible only when it completes.
    /// A failed upload is aborted so no parts linger.
    pub fn put_file(&self, rel: &str, local: &std::path::Path) -> Result<()> {
        use std::io::Read;
        let size = std::fs::metadata(local)
            .ctx(format!("staged file {}", local.display()))?
            .len() as usize;
        let part = part_bytes();
        if size <= part {
            let data = std::fs::read(local).ctx(format!("staged file {}", local.display()))?;
            return self.put(rel, Bytes::from(data));
        }
        let path = self.path(rel);
        let what = format!("uploading {}", self.display(rel));
        let read_part = |file: &mut std::fs::File| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; part];
            let mut filled = 0;
            while filled < part {
                let n = file
                    .read(&mut buf[filled..])
                    .ctx(format!("staged file {}", local.display()))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            buf.truncate(filled);
            Ok(buf)
        };
        let mut file = std::fs::File::open(local).ctx(format!("staged file {}", local.display()))?;
        let Some(mp) = self.multipart.clone() else {
            // Local and in-memory stores: the backend stages and renames.
            return self.block_on(async {
                let mut upload = self.store.put_multipart(&path).await.ctx(&what)?;
                let result: Result<()> = async {
                    loop {
                        let buf = read_part(&mut file)?;
                        let last = buf.len() < part;
                        if !buf.is_empty() {
                            upload.put_part(PutPayload::from(buf)).await.ctx(&what)?;
                        }
                        if last {
                            break;
                        }
                    }
                    upload.complete().await.ctx(&what)?;
                    Ok(())
                }
                .await;
                if result.is_err() {
                    let _ = upload.abort().await;
                }
                result
            });
        };
        // S3: an upload left by a killed writer of this key goes first.
        self.abort_journalled(rel)?;
        self.block_on(async {
            let id = mp.create_multipart(&path).await.ctx(&what)?;
            // Registered before the journal is written: once the journal is
            // visible, a Ctrl-C must find the upload to abort it.
            let token = in_flight::register(mp.clone(), path.clone(), id.clone());
            let journal = upload_journal_key(rel);
            let entry = serde_json::json!({
                "key": rel,
                "upload_id": id,
                "started": chrono::Utc::now().to_rfc3339(),
                "pid": std::process::id(),
            });
            let result: Result<()> = async {
                self.store
                    .put(
                        &self.path(&journal),
                        PutPayload::from(serde_json::to_vec(&entry).expect("json")),
                    )
                    .await
                    .ctx(format!("journalling {what}"))?;
                let mut parts: Vec<PartId> = Vec::new();
                loop {
                    let buf = read_part(&mut file)?;
                    let last = buf.len() < part;
                    if !buf.is_empty() {
                        let p = mp
                            .put_part(&path, &id, parts.len(), PutPayload::from(buf))
                            .await
                            .ctx(&what)?;
                        parts.push(p);
                    }
                    if last {
                        break;
                    }
                }
                mp.complete_multipart(&path, &id, parts).await.ctx(&what)?;
                Ok(())
            }
            .await;
            if result.is_err() {
                let _ = mp.abort_multipart(&path, &id).await;
            }
            in_flight::unregister(token);
            let _ = self.store.delete(&self.path(&journal)).await;
            result
        })
    }

    /// Abort an upload to `rel` that a killed process left behind (S3 only).
    fn abort_journalled(&self, rel: &str) -> Result<()> {
        let Some(mp) = self.multipart.clone() else {
            return Ok(());
        };
        let key = upload_journal_key(rel);
        let Some(bytes) = self.get_opt(&key)? else {
            return Ok(());
        };
        if let Ok(entry) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && let Some(id) = entry.get("upload_id").and_then(|v| v.as_str())
        {
            let id: MultipartId = id.to_string();
            tracing::warn!(key = rel, upload = %id, "aborting an upload a killed process left behind");
            let _ = self.block_on(mp.abort_multipart(&self.path(rel), &id));
        }
        self.delete(&key)
    }

    /// Journalled multipart uploads that never finished: (lake key, upload id,
    /// journal key). `abort` aborts them and removes their journal entries.
    pub fn stale_uploads(&self, abort: bool) -> Result<Vec<(String, String, String)>> {
        let mut out = Vec::new();
        for (jkey, _) in self.list(UPLOAD_JOURNAL)? {
            let bytes = self.get(&jkey)?;
            let entry: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let key = entry
                .get("key")
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .to_string();
            let id = entry
                .get("upload_id")
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .to_string();
            if abort {
                if let Some(mp) = &self.multipart {
                    let _ = self.block_on(mp.abort_multipart(&self.path(&key), &id.clone()));
                }
                self.delete(&jkey)?;
            }
            out.push((key, id, jkey));
        }
        Ok(out)
    }

    pub fn delete(&self, rel: &str) -> Result<()> {
        let path = self.path(rel);
        match self.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e).ctx(format!("deleting {}", self.display(rel))),
        }
    }

    /// Copy one object inside the lake (atomic at the destination).
    pub fn copy(&self, from: &str, to: &str) -> Result<()> {
        let (f, t) = (self.path(from), self.path(to));
        self.block_on(self.store.copy(&f, &t)).ctx(format!(
            "copying {} to {}",
            self.display(from),
            self.display(to)
        ))
    }

    /// All objects under a lake-relative prefix, as (relative key, metadata),
    /// sorted by key.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, ObjectMeta)>> {
        let path = self.path(prefix);
        let metas: Vec<ObjectMeta> = self
            .block_on(self.store.list(Some(&path)).try_collect())
            .ctx(format!("listing {}", self.display(prefix)))?;
        let mut out: Vec<(String, ObjectMeta)> = metas
            .into_iter()
            .map(|m| (self.relative(&m.location), m))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// A synchronous streaming reader over the object at `rel`, fetching as
    /// it goes (through the integrity check, like every read).
    pub fn reader(&self, rel: &str) -> Result<StreamReader> {
        self.reader_named(rel, &self.display(rel))
    }

    /// [`Lake::reader`], naming the object `name` in its errors (what the
    /// user called it).
    pub fn reader_named(&self, rel: &str, name: &str) -> Result<StreamReader> {
        let result = self
            .block_on(self.store.get(&self.path(rel)))
            .ctx(format!("reading {name}"))?;
        Ok(StreamReader {
            lake: self.clone(),
            stream: result.into_stream(),
            current: Bytes::new(),
            name: name.to_string(),
            progress: indicatif::ProgressBar::hidden(),
        })
    }

    /// Copy every object of this lake into `dest` (another URL: disk to
    /// bucket, bucket to disk, one directory to another). Data files are read
    /// through the integrity check, so damage is never copied; manifests go
    /// last, so an interrupted copy leaves data without manifests (which
    /// stages ignore and `verify` lists) rather than manifests without data.
    /// Returns (objects, bytes).
    pub fn copy_to(&self, dest: &Lake) -> Result<(u64, u64)> {
        let mut keys: Vec<(String, u64)> = self
            .list("")?
            .into_iter()
            .filter(|(k, _)| !k.starts_with(&format!("{UPLOAD_JOURNAL}/")))
            .map(|(k, m)| (k, m.size))
            .collect();
        keys.sort_by_key(|(k, _)| (k.ends_with(crate::integrity::MANIFEST_FILE), k.clone()));
        let total: u64 = keys.iter().map(|(_, s)| s).sum();
        let bar = crate::progress::bytes_bar(total, "copy");
        let mut bytes = 0u64;
        for (key, size) in &keys {
            if *size as usize <= part_bytes() {
                dest.put(key, self.get(key)?)?;
            } else {
                let mut staged = crate::staging::file("")?;
                let mut reader = self.reader(key)?;
                std::io::copy(&mut reader, staged.as_file_mut())
                    .ctx(format!("copying {}", self.display(key)))?;
                dest.put_file(key, staged.path())?;
            }
            bytes += size;
            bar.inc(*size);
        }
        bar.finish_and_clear();
        Ok((keys.len() as u64, bytes))
    }

    /// Delete every object under a prefix (used to discard staging areas).
    pub fn delete_prefix(&self, prefix: &str) -> Result<()> {
        for (rel, _) in self.list(prefix)? {
            self.delete(&rel)?;
        }
        Ok(())
    }
}

/// Whether a lease is still held: the expiry its last successful renewal
/// wrote. A process stopped past it (SIGSTOP, a frozen node) or unable to
/// renew finds it lapsed, and its renewer stops rather than bring the claim
/// back.
#[derive(Clone, Debug)]
pub struct LeaseGuard(Arc<AtomicI64>);

impl LeaseGuard {
    /// A guard held until `expires_ms` (Unix milliseconds).
    pub fn until(expires_ms: i64) -> Self {
        LeaseGuard(Arc::new(AtomicI64::new(expires_ms)))
    }

    pub fn held(&self) -> bool {
        chrono::Utc::now().timestamp_millis() < self.0.load(Ordering::SeqCst)
    }

    /// Move the expiry (a renewal, or a lapse).
    pub fn extend_to(&self, expires_ms: i64) {
        self.0.store(expires_ms, Ordering::SeqCst)
    }
}

/// `std::io::Read` over an object's byte stream, fetching as it goes
/// ([`Lake::reader`]).
pub struct StreamReader {
    lake: Lake,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    current: Bytes,
    name: String,
    progress: indicatif::ProgressBar,
}

impl StreamReader {
    /// The same reader, counting the bytes it delivers on `progress`.
    pub fn with_progress(mut self, progress: indicatif::ProgressBar) -> Self {
        self.progress = progress;
        self
    }

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

impl std::io::Read for StreamReader {
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

/// Where multipart uploads in progress are journalled.
pub const UPLOAD_JOURNAL: &str = "_uploads";

fn upload_journal_key(rel: &str) -> String {
    format!(
        "{UPLOAD_JOURNAL}/{}.json",
        &blake3::hash(rel.as_bytes()).to_hex()[..24]
    )
}

/// Multipart uploads in progress in this process, so a signal handler can
/// abort them before the process exits.
mod in_flight {
    use std::sync::{Arc, Mutex};

    use object_store::MultipartId;
    use object_store::multipart::MultipartStore;
    use object_store::path::Path;

    type Entry = (u64, Arc<dyn MultipartStore>, Path, MultipartId);
    static UPLOADS: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    pub fn register(store: Arc<dyn MultipartStore>, path: Path, id: MultipartId) -> u64 {
        let token = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        UPLOADS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((token, store, path, id));
        token
    }

    pub fn unregister(token: u64) {
        UPLOADS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|e| e.0 != token);
    }

    pub fn take_all() -> Vec<Entry> {
        std::mem::take(&mut *UPLOADS.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Abort every multipart upload this process has in progress (called on
/// SIGINT/SIGTERM before exiting, so no parts stay on the server).
pub async fn abort_uploads_in_flight() -> usize {
    let all = in_flight::take_all();
    let n = all.len();
    for (_, store, path, id) in all {
        let _ = store.abort_multipart(&path, &id).await;
    }
    n
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Build an S3 client from the standard AWS environment, for one bucket.
fn build_s3(bucket: &str) -> std::result::Result<object_store::aws::AmazonS3, String> {
    check_s3_credentials()?;
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let endpoint = std::env::var("AWS_ENDPOINT_URL")
        .ok()
        .or_else(|| std::env::var("AWS_ENDPOINT").ok())
        .filter(|e| !e.is_empty());
    let mut client = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(env_u64("PIPELINE_S3_CONNECT_SECS", 5)))
        .with_timeout(Duration::from_secs(env_u64("PIPELINE_S3_TIMEOUT_SECS", 120)));
    if let Some(ep) = &endpoint {
        builder = builder.with_endpoint(ep.clone());
        // S3-compatible servers (MinIO, s3s, Ceph) expect path-style requests.
        let vhost = std::env::var("AWS_VIRTUAL_HOSTED_STYLE_REQUEST")
            .map(|v| v == "true")
            .unwrap_or(false);
        builder = builder.with_virtual_hosted_style_request(vhost);
        if ep.starts_with("http://") {
            let host = Url::parse(ep)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
                .unwrap_or_default();
            let loopback = host == "localhost"
                || host
                    .trim_matches(|c| c == '[' || c == ']')
                    .parse::<std::net::IpAddr>()
                    .map(|ip| ip.is_loopback())
                    .unwrap_or(false);
            let allowed = std::env::var("AWS_ALLOW_HTTP")
                .map(|v| v == "true")
                .unwrap_or(false);
            if !loopback && !allowed {
                return Err(format!(
                    "endpoint {ep} is plain http and not on loopback; set AWS_ALLOW_HTTP=true to allow it"
                ));
            }
            client = client.with_allow_http(true);
        }
    }
    if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
        builder = builder.with_region("us-east-1");
    }
    // Exponential backoff with decorrelated jitter (object_store's), retried
    // until the time budget is spent: the budget, not a count, ends retries.
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(3),
            base: 2.0,
        },
        max_retries: env_u64("PIPELINE_S3_RETRIES", 1000) as usize,
        retry_timeout: Duration::from_secs(env_u64("PIPELINE_S3_RETRY_SECS", 15)),
    };
    // Conditional puts (If-None-Match / If-Match) for leases and commits;
    // AWS S3 and S3-compatible servers such as MinIO and s3s honour them.
    if std::env::var("AWS_CONDITIONAL_PUT").is_err() {
        builder = builder.with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch);
    }
    builder
        .with_client_options(client)
        .with_retry(retry)
        .build()
        .map_err(|e| format!("cannot configure S3 client: {e}"))
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Refuse to go on without credentials rather than asking the cloud's
/// instance-metadata address (169.254.169.254) and reporting its refusal.
fn check_s3_credentials() -> std::result::Result<(), String> {
    let key = env_set("AWS_ACCESS_KEY_ID");
    let secret = env_set("AWS_SECRET_ACCESS_KEY");
    match (key, secret) {
        (true, true) => return Ok(()),
        (true, false) => return Err("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into()),
        (false, true) => return Err("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into()),
        (false, false) => {}
    }
    let other_provider = env_set("AWS_WEB_IDENTITY_TOKEN_FILE")
        || env_set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || env_set("AWS_CONTAINER_CREDENTIALS_FULL_URI");
    let anonymous = std::env::var("AWS_SKIP_SIGNATURE").is_ok_and(|v| v == "true");
    let metadata = std::env::var("PIPELINE_S3_INSTANCE_METADATA").is_ok_and(|v| v == "true");
    if other_provider || anonymous || metadata {
        return Ok(());
    }
    Err("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (with AWS_ENDPOINT_URL for an S3-compatible server); \
         or PIPELINE_S3_INSTANCE_METADATA=true to use the cloud instance's role, or AWS_SKIP_SIGNATURE=true for a public bucket"
        .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_lake_round_trip_and_listing() {
        let lake = Lake::open("memory://").unwrap();
        lake.put("t/a=1/part-0.parquet", Bytes::from_static(b"x"))
            .unwrap();
        lake.put("t/a=2/part-0.parquet", Bytes::from_static(b"yy"))
            .unwrap();
        let listed: Vec<String> = lake.list("t").unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(listed, vec!["t/a=1/part-0.parquet", "t/a=2/part-0.parquet"]);
        assert_eq!(lake.get("t/a=2/part-0.parquet").unwrap().as_ref(), b"yy");
        assert!(lake.get_opt("nope").unwrap().is_none());
        lake.delete_prefix("t").unwrap();
        assert!(lake.list("t").unwrap().is_empty());
    }

    #[test]
    fn local_lake_urls_are_normalised() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        assert!(lake.url().starts_with("file:///"));
        assert!(lake.table_url("class_stats").starts_with("file:///"));
        assert!(lake.table_url("class_stats").ends_with("/class_stats/"));
        lake.put("x/y.bin", Bytes::from_static(b"abc")).unwrap();
        assert!(dir.path().join("x/y.bin").exists());
        let rel: Vec<String> = lake.list("x").unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(rel, vec!["x/y.bin"]);
    }

    #[test]
    fn unknown_schemes_are_refused_with_the_url() {
        let err = Lake::open("gopher://x/y").unwrap_err().to_string();
        assert!(
            err.contains("gopher://x/y") && err.contains("unsupported scheme"),
            "{err}"
        );
    }

    #[test]
    fn multipart_upload_is_invisible_until_complete() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        let big = vec![7u8; part_bytes() + 1000];
        let staged = dir.path().join("staged.bin");
        std::fs::write(&staged, &big).unwrap();
        // Start an upload by hand, put one part, and list before completion.
        let path = lake.path("t/part-0.parquet");
        let store = lake.store();
        let mut up = lake.block_on(store.put_multipart(&path)).unwrap();
        lake.block_on(up.put_part(PutPayload::from(vec![1u8; 100])))
            .unwrap();
        assert!(lake.list("t").unwrap().is_empty(), "partial upload visible");
        lake.block_on(up.abort()).unwrap();
        lake.put_file("t/part-0.parquet", &staged).unwrap();
        assert_eq!(lake.get("t/part-0.parquet").unwrap().len(), big.len());
    }
}
