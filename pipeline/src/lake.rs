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
//! a half-written file. Network calls retry a bounded number of times
//! (`PIPELINE_S3_RETRIES`, default 3, within `PIPELINE_S3_RETRY_SECS`, default 15 s).
//!
//! The lake owns a tokio runtime so that the stages, which are plain synchronous
//! compute code, can call the async object-store API with [`Lake::block_on`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};
use tokio::runtime::Runtime;
use url::Url;

use crate::error::{Context, Error, Result};

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
    store: Arc<dyn ObjectStore>,
    /// Prefix of the lake inside `store` (empty for the store's root).
    root: Path,
    /// The URL the user gave, normalised (`file:///abs`, `s3://b/p`, `memory://`).
    url: String,
    /// Scheme and authority DataFusion uses to find `store` in its registry.
    store_url: Url,
    rt: Arc<Runtime>,
}

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
            return Ok(Lake {
                store: Arc::new(InMemory::new()),
                root,
                url: "memory://".to_string() + rest.trim_matches('/'),
                store_url: Url::parse("memory://").expect("static URL"),
                rt,
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
            let store = build_s3(&bucket).map_err(|e| bad(&e))?;
            let root = Path::parse(&prefix).map_err(|e| bad(&format!("invalid prefix: {e}")))?;
            let norm = if prefix.is_empty() {
                format!("s3://{bucket}")
            } else {
                format!("s3://{bucket}/{prefix}")
            };
            return Ok(Lake {
                store: Arc::new(store),
                root,
                url: norm,
                store_url: Url::parse(&format!("s3://{bucket}"))
                    .map_err(|e| bad(&format!("bucket name: {e}")))?,
                rt,
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
        Ok(Lake {
            store: Arc::new(LocalFileSystem::new().with_automatic_cleanup(true)),
            root,
            url: format!("file://{abs_str}"),
            store_url: Url::parse("file:///").expect("static URL"),
            rt,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
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
        self.block_on(async {
            let mut upload = self.store.put_multipart(&path).await.ctx(&what)?;
            let result: Result<()> = async {
                let mut file = std::fs::File::open(local).ctx(format!("staged file {}", local.display()))?;
                loop {
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
                    if filled == 0 {
                        break;
                    }
                    buf.truncate(filled);
                    upload.put_part(PutPayload::from(buf)).await.ctx(&what)?;
                    if filled < part {
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
        })
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

    /// Delete every object under a prefix (used to discard staging areas).
    pub fn delete_prefix(&self, prefix: &str) -> Result<()> {
        for (rel, _) in self.list(prefix)? {
            self.delete(&rel)?;
        }
        Ok(())
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Build an S3 client from the standard AWS environment, for one bucket.
fn build_s3(bucket: &str) -> std::result::Result<object_store::aws::AmazonS3, String> {
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
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: env_u64("PIPELINE_S3_RETRIES", 3) as usize,
        retry_timeout: Duration::from_secs(env_u64("PIPELINE_S3_RETRY_SECS", 15)),
    };
    builder
        .with_client_options(client)
        .with_retry(retry)
        .build()
        .map_err(|e| format!("cannot configure S3 client: {e}"))
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
