//! Content integrity of the lake: every byte read back is the byte written.
//!
//! A manifest carries the BLAKE3 hash of its data file and of each 1 MiB block
//! of it ([`Blocks`]). [`CheckedStore`] wraps the lake's object store and
//! checks every read of a table's data file (`.../part-0.parquet`) against its
//! manifest: a whole-file read against the file hash, a range read (Parquet
//! footers and row groups, for the stages and for DataFusion alike) against
//! the hashes of the blocks it touches, fetched whole and checked before any
//! byte is handed on. A flipped bit therefore fails the read with an error
//! that names the file and the stage that produces it, instead of flowing
//! into results. Files without a manifest (staging leftovers, files other
//! tools put there) are passed through; `pipeline verify` lists them.
//!
//! Manifests are cached per data file and dropped whenever this process
//! writes, copies or deletes the file or its manifest, so a stage that
//! rewrites an artifact reads its new content back.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetRange, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};
use serde::{Deserialize, Serialize};

/// Block size of the per-block hashes.
pub const BLOCK_BYTES: u64 = 1 << 20;

/// The data file of every table partition, and its manifest beside it.
pub const DATA_FILE: &str = "part-0.parquet";
pub const MANIFEST_FILE: &str = "_manifest.json";

/// BLAKE3 of consecutive blocks of a file: block `i` covers bytes
/// `[i * size, min((i + 1) * size, file length))`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocks {
    pub size: u64,
    pub hashes: Vec<String>,
}

/// Hashes a byte stream as it passes: the whole and each block.
pub struct Digester {
    whole: blake3::Hasher,
    block: blake3::Hasher,
    in_block: u64,
    hashes: Vec<String>,
    bytes: u64,
}

impl Default for Digester {
    fn default() -> Self {
        Self::new()
    }
}

impl Digester {
    pub fn new() -> Self {
        Digester {
            whole: blake3::Hasher::new(),
            block: blake3::Hasher::new(),
            in_block: 0,
            hashes: Vec::new(),
            bytes: 0,
        }
    }

    pub fn update(&mut self, mut buf: &[u8]) {
        self.whole.update(buf);
        self.bytes += buf.len() as u64;
        while !buf.is_empty() {
            let take = ((BLOCK_BYTES - self.in_block) as usize).min(buf.len());
            self.block.update(&buf[..take]);
            self.in_block += take as u64;
            buf = &buf[take..];
            if self.in_block == BLOCK_BYTES {
                self.hashes.push(self.block.finalize().to_hex().to_string());
                self.block.reset();
                self.in_block = 0;
            }
        }
    }

    /// (bytes, whole-file hash, block hashes).
    pub fn finish(mut self) -> (u64, String, Blocks) {
        if self.in_block > 0 || self.hashes.is_empty() {
            self.hashes.push(self.block.finalize().to_hex().to_string());
        }
        (
            self.bytes,
            self.whole.finalize().to_hex().to_string(),
            Blocks {
                size: BLOCK_BYTES,
                hashes: self.hashes,
            },
        )
    }
}

/// BLAKE3 of a byte slice, hex.
pub fn hash_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// The first 12 characters of a hash, for messages.
pub fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// What a manifest says about its data file (the fields this layer needs).
#[derive(Debug, Clone, Deserialize)]
struct Expected {
    #[serde(default)]
    artifact: String,
    #[serde(default)]
    stage: String,
    bytes: u64,
    content_hash: String,
    #[serde(default)]
    blocks: Option<Blocks>,
}

/// Why a read was refused.
#[derive(Debug)]
pub struct Damaged {
    pub file: String,
    pub stage: String,
    pub problem: String,
}

impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is damaged: {}; it is made by stage {} — re-run that stage with force=true (`pipeline verify` lists every damaged artifact)",
            self.file, self.problem, self.stage
        )
    }
}

impl std::error::Error for Damaged {}

fn damaged(file: &Path, exp: &Expected, problem: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "lake",
        source: Box::new(Damaged {
            file: file.to_string(),
            stage: if exp.stage.is_empty() {
                "that wrote it".to_string()
            } else {
                exp.stage.clone()
            },
            problem,
        }),
    }
}

/// The manifest path beside a data file, if `location` is one.
fn manifest_of(location: &Path) -> Option<Path> {
    if location.filename() != Some(DATA_FILE) {
        return None;
    }
    let parts: Vec<_> = location.parts().collect();
    let dir = Path::from_iter(parts[..parts.len() - 1].iter().cloned());
    Some(dir.clone().join(MANIFEST_FILE))
}

/// The data file a written path concerns (itself or its manifest's).
fn data_of(location: &Path) -> Option<Path> {
    match location.filename() {
        Some(DATA_FILE) => Some(location.clone()),
        Some(MANIFEST_FILE) => {
            let parts: Vec<_> = location.parts().collect();
            let dir = Path::from_iter(parts[..parts.len() - 1].iter().cloned());
            Some(dir.join(DATA_FILE))
        }
        _ => None,
    }
}

/// An object store that checks reads of table data files against their
/// manifests (see the module documentation).
#[derive(Debug)]
pub struct CheckedStore {
    inner: Arc<dyn ObjectStore>,
    expected: Mutex<HashMap<Path, Arc<Expected>>>,
}

impl std::fmt::Display for CheckedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Checked({})", self.inner)
    }
}

impl CheckedStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        CheckedStore {
            inner,
            expected: Mutex::new(HashMap::new()),
        }
    }

    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    fn forget(&self, location: &Path) {
        if let Some(data) = data_of(location) {
            self.expected.lock().expect("cache lock").remove(&data);
        }
    }

    /// The manifest's expectations for a data file, `None` where it has none.
    async fn expected_for(&self, location: &Path) -> object_store::Result<Option<Arc<Expected>>> {
        let Some(mpath) = manifest_of(location) else {
            return Ok(None);
        };
        if let Some(e) = self.expected.lock().expect("cache lock").get(location) {
            return Ok(Some(e.clone()));
        }
        let bytes = match self.inner.get(&mpath).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let exp: Expected = serde_json::from_slice(&bytes).map_err(|e| object_store::Error::Generic {
            store: "lake",
            source: format!(
                "{mpath}: corrupt manifest ({e}); `pipeline verify` lists every damaged artifact"
            )
            .into(),
        })?;
        let exp = Arc::new(exp);
        self.expected
            .lock()
            .expect("cache lock")
            .insert(location.clone(), exp.clone());
        Ok(Some(exp))
    }

    async fn checked_get(
        &self,
        location: &Path,
        options: GetOptions,
        exp: Arc<Expected>,
    ) -> object_store::Result<GetResult> {
        let size = exp.bytes;
        let (start, end) = match &options.range {
            None => (0, size),
            Some(GetRange::Bounded(r)) => (r.start, r.end.min(size)),
            Some(GetRange::Offset(o)) => (*o, size),
            Some(GetRange::Suffix(n)) => (size.saturating_sub(*n), size),
        };
        if start >= end && size > 0 {
            // Out of range: let the store give its own error.
            return self.inner.get_opts(location, options).await;
        }
        match exp.blocks.clone() {
            Some(blocks) if blocks.size > 0 => {
                let bs = blocks.size;
                let first = start / bs;
                let aligned = (first * bs)..((end.div_ceil(bs) * bs).min(size));
                let mut inner_opts = options;
                inner_opts.range = (size > 0).then(|| GetRange::Bounded(aligned.clone()));
                let r = self.inner.get_opts(location, inner_opts).await?;
                if r.meta.size != size {
                    self.forget(location);
                    return Err(damaged(
                        location,
                        &exp,
                        format!(
                            "it is {} bytes but its manifest says {size} (a write was interrupted, or it is being replaced)",
                            r.meta.size
                        ),
                    ));
                }
                let stream = verify_blocks(
                    payload_stream(r.payload, r.range.clone()),
                    location.clone(),
                    exp.clone(),
                    blocks,
                    first,
                    aligned.start,
                    start..end,
                );
                Ok(GetResult {
                    payload: GetResultPayload::Stream(stream),
                    meta: r.meta,
                    range: start..end,
                    attributes: r.attributes,
                })
            }
            _ => {
                // A manifest without block hashes (written before they
                // existed): check the whole file, then serve the range.
                let mut whole_opts = options;
                whole_opts.range = None;
                let r = self.inner.get_opts(location, whole_opts).await?;
                let meta = r.meta.clone();
                let attributes = r.attributes.clone();
                let all = r.bytes().await?;
                if all.len() as u64 != size || hash_hex(&all) != exp.content_hash {
                    self.forget(location);
                    return Err(damaged(
                        location,
                        &exp,
                        format!(
                            "its {} bytes do not hash to its manifest's BLAKE3 {}",
                            all.len(),
                            short(&exp.content_hash)
                        ),
                    ));
                }
                let part = all.slice(start as usize..end as usize);
                Ok(GetResult {
                    payload: GetResultPayload::Stream(futures::stream::once(async move { Ok(part) }).boxed()),
                    meta,
                    range: start..end,
                    attributes,
                })
            }
        }
    }
}

/// The bytes of a get result's `range` as a stream (a local file payload is
/// an open file that still has to be positioned and bounded).
fn payload_stream(p: GetResultPayload, range: Range<u64>) -> BoxStream<'static, object_store::Result<Bytes>> {
    match p {
        GetResultPayload::Stream(s) => s,
        GetResultPayload::File(file, path) => {
            // Local files: read on a blocking thread, a block at a time.
            let state = (file, path, range.start, range.end);
            futures::stream::try_unfold(state, |(mut file, path, at, end)| async move {
                if at >= end {
                    return Ok(None);
                }
                let (file, path, chunk) = tokio::task::spawn_blocking(move || {
                    use std::io::{Read, Seek, SeekFrom};
                    let want = (end - at).min(BLOCK_BYTES) as usize;
                    let mut buf = vec![0u8; want];
                    let read = file
                        .seek(SeekFrom::Start(at))
                        .and_then(|_| file.read_exact(&mut buf));
                    match read {
                        Ok(()) => Ok((file, path, buf)),
                        Err(e) => Err((e, path)),
                    }
                })
                .await
                .map_err(|e| object_store::Error::Generic {
                    store: "lake",
                    source: Box::new(e),
                })?
                .map_err(|(e, path)| object_store::Error::Generic {
                    store: "lake",
                    source: format!("reading {}: {e}", path.display()).into(),
                })?;
                let next = at + chunk.len() as u64;
                Ok(Some((Bytes::from(chunk), (file, path, next, end))))
            })
            .boxed()
        }
    }
}

/// Check the blocks of a stream that starts at block `first` (byte
/// `offset`), yielding only the bytes of `window`.
fn verify_blocks(
    inner: BoxStream<'static, object_store::Result<Bytes>>,
    location: Path,
    exp: Arc<Expected>,
    blocks: Blocks,
    first: u64,
    offset: u64,
    window: Range<u64>,
) -> BoxStream<'static, object_store::Result<Bytes>> {
    struct State {
        inner: BoxStream<'static, object_store::Result<Bytes>>,
        buf: BytesMut,
        index: u64,
        pos: u64,
        done: bool,
    }
    let size = exp.bytes;
    let bs = blocks.size;
    let state = State {
        inner,
        buf: BytesMut::new(),
        index: first,
        pos: offset,
        done: false,
    };
    futures::stream::try_unfold(state, move |mut st| {
        let (location, exp, blocks, window) = (location.clone(), exp.clone(), blocks.clone(), window.clone());
        async move {
            loop {
                if st.done || st.pos >= window.end {
                    return Ok(None);
                }
                let block_len = bs.min(size - st.pos) as usize;
                if st.buf.len() >= block_len {
                    let block = st.buf.split_to(block_len).freeze();
                    let want = blocks.hashes.get(st.index as usize);
                    let got = hash_hex(&block);
                    if want != Some(&got) {
                        st.done = true;
                        return Err(damaged(
                            &location,
                            &exp,
                            format!(
                                "block {} of {} (bytes {}..{}) does not hash to its manifest's BLAKE3 ({})",
                                st.index,
                                blocks.hashes.len(),
                                st.pos,
                                st.pos + block_len as u64,
                                if exp.artifact.is_empty() {
                                    "no artifact name".to_string()
                                } else {
                                    exp.artifact.clone()
                                }
                            ),
                        ));
                    }
                    let (b0, b1) = (st.pos, st.pos + block_len as u64);
                    st.index += 1;
                    st.pos = b1;
                    let lo = window.start.max(b0);
                    let hi = window.end.min(b1);
                    if lo < hi {
                        let part = block.slice((lo - b0) as usize..(hi - b0) as usize);
                        return Ok(Some((part, st)));
                    }
                    continue;
                }
                match st.inner.next().await {
                    Some(chunk) => st.buf.extend_from_slice(&chunk?),
                    None => {
                        st.done = true;
                        return Err(damaged(
                            &location,
                            &exp,
                            format!(
                                "it ends at byte {} but its manifest says {size}",
                                st.pos + st.buf.len() as u64
                            ),
                        ));
                    }
                }
            }
        }
    })
    .boxed()
}

#[async_trait]
impl ObjectStore for CheckedStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.forget(location);
        let r = self.inner.put_opts(location, payload, opts).await;
        self.forget(location);
        r
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.forget(location);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        if options.head {
            return self.inner.get_opts(location, options).await;
        }
        match self.expected_for(location).await? {
            None => self.inner.get_opts(location, options).await,
            Some(exp) => self.checked_get(location, options, exp).await,
        }
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        // Deletions drop the whole cache: cheap, and never stale.
        self.expected.lock().expect("cache lock").clear();
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.forget(to);
        let r = self.inner.copy_opts(from, to, options).await;
        self.forget(to);
        r
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
        self.forget(from);
        self.forget(to);
        let r = self.inner.rename_opts(from, to, options).await;
        self.forget(to);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digester_blocks_cover_the_file() {
        let data: Vec<u8> = (0..(BLOCK_BYTES as usize * 2 + 17))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut d = Digester::new();
        for part in data.chunks(333_333) {
            d.update(part);
        }
        let (bytes, whole, blocks) = d.finish();
        assert_eq!(bytes, data.len() as u64);
        assert_eq!(whole, hash_hex(&data));
        assert_eq!(blocks.hashes.len(), 3);
        assert_eq!(blocks.hashes[2], hash_hex(&data[2 * BLOCK_BYTES as usize..]));
        let empty = Digester::new().finish();
        assert_eq!(empty.2.hashes, vec![hash_hex(b"")]);
    }
}
