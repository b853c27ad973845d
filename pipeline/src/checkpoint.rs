//! Model checkpoints in Hugging Face format, through `object_store` (the
//! files themselves: [`lc_models::checkpoint`]).
//!
//! A model directory holds `config.json` and `model.safetensors` (or a sharded
//! `model.safetensors.index.json`), optionally `tokenizer.json`, and
//! `checkpoint-N/` subdirectories saved during training. A model reference is
//! either a model trained by this pipeline (`NAME[@K]`, stored in the lake at
//! `weights/NAME/`) or a directory anywhere (`/path/dir[@K]`, `./dir`,
//! `s3://bucket/dir[@K]`), e.g. one downloaded from the Hugging Face hub.
//! `@K` selects the K-th checkpoint subdirectory in increasing step N
//! (0-based): `checkpoint-N` as the Trainer saves them, or `step-N` / `stepN`
//! as Pythia publishes its training checkpoints; without it the directory's
//! top-level weights are used.
//!
//! Saved checkpoints load in `transformers` with
//! `GPTNeoForCausalLM.from_pretrained(dir)`: HF tensor names, tied lm_head left
//! out, safetensors metadata `format = pt`. `_checksums.json` records the size
//! and BLAKE3 of every file saved, and every load checks the files against it;
//! `trainer_state.json` is written last, so a directory without it is an
//! interrupted save.
//!
//! A model's identity in manifests is its content ([`ModelRef::weights_version`]):
//! the recorded hashes, or for a directory from elsewhere the hashes of its
//! files (cached), never its path or modification time, so a lake copied or
//! moved keeps its results up to date.

use std::collections::HashMap;

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use lc_lake::artifact::check_partition_value;
use lc_lake::lake::Lake;
use lc_lake::manifest::InputRef;
use lc_models::checkpoint::{CHECKSUMS_FILE, Checksums, checkpoint_step, safetensors_bytes};
use lc_models::config::ArchConfig;
use lc_models::{CausalLm, GptNeoConfig, parameter_names};
use serde_json::Value;

use crate::error::{Context, Error, Result};

/// Where the weights of one model checkpoint live.
#[derive(Debug, Clone)]
pub struct ModelRef {
    /// The id used in the lake's tables (`NAME@K` or `NAME`).
    pub id: String,
    pub name: String,
    pub checkpoint: Option<usize>,
    /// Store holding the model directory.
    pub store: Lake,
    /// Key prefix of the model root in `store` ("" for a store rooted at it).
    pub root: String,
    /// Key prefix of the selected weights (root or root/checkpoint-N).
    pub dir: String,
    /// The step N of `checkpoint-N`, when selected.
    pub step: Option<u64>,
    /// Whether it was trained by this pipeline (`weights/NAME` in the lake).
    pub in_lake: bool,
    pub source: String,
    /// The lake, where content hashes of outside files are cached.
    pub lake: Lake,
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{}/{}", a.trim_end_matches('/'), b)
    }
}

/// Lake prefix of a model trained by the pipeline.
pub fn lake_root(name: &str) -> String {
    format!("weights/{name}")
}

/// Checkpoint subdirectories of a model root (see [`checkpoint_step`]),
/// sorted by step.
pub fn list_checkpoints(store: &Lake, root: &str) -> Result<Vec<(u64, String)>> {
    let mut out = Vec::new();
    for (key, _) in store.list(root)? {
        let rel = key.strip_prefix(root).unwrap_or(&key).trim_start_matches('/');
        let mut parts = rel.split('/');
        if let (Some(dir), Some("config.json"), None) = (parts.next(), parts.next(), parts.next())
            && let Some(n) = checkpoint_step(dir)
        {
            out.push((n, join(root, dir)));
        }
    }
    out.sort();
    Ok(out)
}

impl ModelRef {
    /// Resolve a model reference (see the module documentation).
    pub fn resolve(lake: &Lake, spec: &str) -> Result<Self> {
        let spec = spec.trim();
        let (base, k) = match spec.rsplit_once('@') {
            Some((b, k)) if !k.contains('/') => {
                let k: usize = k
                    .parse()
                    .map_err(|_| Error::model(spec, format!("'@{k}' is not a checkpoint index")))?;
                (b, Some(k))
            }
            _ => (spec, None),
        };
        if base.is_empty() {
            return Err(Error::model(spec, "empty model reference"));
        }
        let pathlike = base.contains('/') || base.starts_with('.') || base.starts_with("s3://");
        let (store, root, name, in_lake, source) = if !pathlike
            && (lake.exists(&join(&lake_root(base), "config.json"))?
                || !list_checkpoints(lake, &lake_root(base))?.is_empty())
        {
            (
                lake.clone(),
                lake_root(base),
                base.to_string(),
                true,
                lake.display(&lake_root(base)),
            )
        } else if pathlike || std::path::Path::new(base).is_dir() {
            let (store, source) = if base.starts_with("s3://") {
                (lake.open_sibling(base)?, base.to_string())
            } else {
                let p = std::path::Path::new(base);
                if !p.is_dir() {
                    return Err(Error::model(spec, "no such model directory"));
                }
                let abs = std::path::absolute(p).ctx(base)?;
                (
                    lake.open_sibling(&abs.to_string_lossy())?,
                    abs.to_string_lossy().to_string(),
                )
            };
            let name = base
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or(base)
                .to_string();
            (store, String::new(), name, false, source)
        } else {
            return Err(Error::model(
                spec,
                format!(
                    "not found: no trained model {} in the lake {} and no such directory (train it, or give a path to a Hugging Face model directory)",
                    lake_root(base),
                    lake.url()
                ),
            ));
        };
        check_partition_value("model", &name).map_err(|e| Error::model(spec, e.to_string()))?;
        let (dir, step) = match k {
            None => {
                if !store.exists(&join(&root, "config.json"))? {
                    let cks = list_checkpoints(&store, &root)?;
                    if cks.is_empty() {
                        return Err(Error::model(
                            spec,
                            format!(
                                "{source} is not a Hugging Face model directory: it has no config.json and no checkpoint-N/ subdirectories"
                            ),
                        ));
                    }
                    return Err(Error::model(
                        spec,
                        format!(
                            "no top-level config.json in {source}; it has {} checkpoint(s): use {base}@0..{}",
                            cks.len(),
                            cks.len() - 1
                        ),
                    ));
                }
                (root.clone(), None)
            }
            Some(k) => {
                let cks = list_checkpoints(&store, &root)?;
                let (n, dir) = cks.get(k).cloned().ok_or_else(|| {
                    Error::model(
                        spec,
                        format!(
                            "checkpoint index {k} does not exist: {source} has {} checkpoint-N directories",
                            cks.len()
                        ),
                    )
                })?;
                (dir, Some(n))
            }
        };
        let id = match k {
            Some(k) => format!("{name}@{k}"),
            None => name.clone(),
        };
        Ok(ModelRef {
            id,
            name,
            checkpoint: k,
            store,
            root,
            dir,
            step,
            in_lake,
            source,
            lake: lake.clone(),
        })
    }

    /// One concrete checkpoint, for stages that analyse a single model: a
    /// trained model named without `@K` means its last epoch checkpoint (the
    /// same weights as its final ones, under the id `eval` gives them).
    pub fn resolve_one(lake: &Lake, spec: &str) -> Result<Self> {
        let r = ModelRef::resolve(lake, spec)?;
        if r.in_lake && r.checkpoint.is_none() {
            let n = list_checkpoints(&r.store, &r.root)?.len();
            if n > 0 {
                return ModelRef::resolve(lake, &format!("{}@{}", r.name, n - 1));
            }
        }
        Ok(r)
    }

    /// The weight files of the selected checkpoint: the shards named by
    /// `model.safetensors.index.json`, or `model.safetensors`.
    pub fn weight_files(&self) -> Result<Vec<String>> {
        if let Some(idx) = self.store.get_opt(&self.key("model.safetensors.index.json"))? {
            let v: Value = serde_json::from_slice(&idx)
                .map_err(|e| Error::model(&self.id, format!("model.safetensors.index.json: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::model(&self.id, "model.safetensors.index.json has no weight_map"))?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
            shards.sort();
            shards.dedup();
            return Ok(shards);
        }
        if self.store.exists(&self.key("model.safetensors"))? {
            return Ok(vec!["model.safetensors".to_string()]);
        }
        let hint = if self.store.exists(&self.key("pytorch_model.bin"))? {
            " (only pytorch_model.bin: convert it to safetensors first)"
        } else {
            ""
        };
        Err(Error::model(
            &self.id,
            format!("no model.safetensors in {}{hint}", self.store.display(&self.dir)),
        ))
    }

    /// `_checksums.json` of the selected weights, if they have one.
    pub fn checksums(&self) -> Result<Option<Checksums>> {
        match self.store.get_opt(&self.key(CHECKSUMS_FILE))? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                Error::model(
                    &self.id,
                    format!(
                        "{} is corrupt: {e}",
                        self.store.display(&self.key(CHECKSUMS_FILE))
                    ),
                )
            }),
        }
    }

    /// The identity of the weights by content: BLAKE3 over the hashes of the
    /// weight files and `config.json`, from `_checksums.json` where the save
    /// recorded them, else hashed (once per file version; see
    /// [`lc_lake::source::content_id`]).
    pub fn weights_version(&self) -> Result<String> {
        let sums = self.checksums()?.unwrap_or_default();
        let mut files = self.weight_files()?;
        files.push("config.json".to_string());
        let mut h = blake3::Hasher::new();
        for f in &files {
            let id = match sums.files.get(f) {
                Some(s) => format!("blake3:{}", s.blake3),
                None => lc_lake::source::content_id(&self.lake, &self.store, &self.key(f))?,
            };
            h.update(f.as_bytes());
            h.update(b"=");
            h.update(id.as_bytes());
            h.update(b"\n");
        }
        Ok(format!("blake3:{}", &h.finalize().to_hex()[..32]))
    }

    /// The weights as a manifest input: named by model id, identified by content.
    pub fn weights_input(&self) -> Result<InputRef> {
        Ok(InputRef {
            artifact: format!("weights:{}", self.id),
            content_hash: self.weights_version()?,
        })
    }

    /// Read one file of the selected weights, checked against
    /// `_checksums.json` when the save recorded it.
    pub fn read_checked(&self, file: &str, sums: Option<&Checksums>) -> Result<Bytes> {
        let key = self.key(file);
        let bytes = self.store.get(&key)?;
        if let Some(want) = sums.and_then(|s| s.files.get(file)) {
            let got = lc_lake::integrity::hash_hex(&bytes);
            if bytes.len() as u64 != want.bytes || got != want.blake3 {
                let repair = if self.in_lake {
                    format!("run stage=train for {} again to repair it", self.name)
                } else {
                    "restore it from its source".to_string()
                };
                return Err(Error::model(
                    &self.id,
                    format!(
                        "{} is damaged: {} bytes with BLAKE3 {}, but {CHECKSUMS_FILE} records {} bytes with {} (a truncated copy or an interrupted write); {repair}",
                        self.store.display(&key),
                        bytes.len(),
                        lc_lake::integrity::short(&got),
                        want.bytes,
                        lc_lake::integrity::short(&want.blake3)
                    ),
                ));
            }
        }
        Ok(bytes)
    }

    /// Problems with the recorded files of the selected weights (missing,
    /// other size or hash); empty when they are whole or nothing is recorded.
    pub fn damaged_files(&self) -> Result<Vec<String>> {
        let Some(sums) = self.checksums()? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for name in sums.files.keys() {
            if !self.store.exists(&self.key(name))? {
                out.push(format!("{} is missing", self.store.display(&self.key(name))));
            } else if let Err(e) = self.read_checked(name, Some(&sums)) {
                out.push(e.to_string());
            }
        }
        Ok(out)
    }

    /// The dataset a model was trained on, from its recipe.
    pub fn trained_dataset(&self) -> Result<Option<String>> {
        Ok(self.recipe()?.and_then(|r| {
            r.get("recipe")
                .and_then(|x| x.get("dataset"))
                .and_then(|d| d.as_str())
                .map(str::to_string)
        }))
    }

    /// Check a model against the tokenizer of the data it will read.
    pub fn check_vocab(&self, config: &ArchConfig, tok: &crate::tokenizer::TextTokenizer) -> Result<()> {
        let vocab_size = config.shape().vocab_size;
        if vocab_size < tok.vocab_size() {
            return Err(Error::model(
                &self.id,
                format!(
                    "vocabulary of {} is smaller than the data's tokenizer ({} ids, {})",
                    vocab_size,
                    tok.vocab_size(),
                    tok.name
                ),
            ));
        }
        if let Some(bytes) = self.tokenizer_json()? {
            let own = crate::tokenizer::TextTokenizer::from_bytes(
                &bytes,
                &format!("{}/tokenizer.json", self.source),
            )?;
            if own.fingerprint() != tok.fingerprint() {
                return Err(Error::model(
                    &self.id,
                    format!(
                        "its tokenizer.json has another vocabulary than the one the data was tokenized with ({}); re-tokenize the data with tokenizer={}/tokenizer.json",
                        tok.name, self.source
                    ),
                ));
            }
        }
        Ok(())
    }

    fn key(&self, file: &str) -> String {
        join(&self.dir, file)
    }

    pub fn config(&self) -> Result<ArchConfig> {
        if !self.store.exists(&self.key("config.json"))? {
            return Err(Error::model(
                &self.id,
                format!("no config.json in {}", self.store.display(&self.dir)),
            ));
        }
        let bytes = self.read_checked("config.json", self.checksums()?.as_ref())?;
        let text =
            std::str::from_utf8(&bytes).map_err(|_| Error::model(&self.id, "config.json is not UTF-8"))?;
        Ok(ArchConfig::from_json(text, &self.id)?)
    }

    /// The tokenizer shipped with the model, if any.
    pub fn tokenizer_json(&self) -> Result<Option<Bytes>> {
        if let Some(b) = self.store.get_opt(&self.key("tokenizer.json"))? {
            return Ok(Some(b));
        }
        if self.dir != self.root {
            return Ok(self.store.get_opt(&join(&self.root, "tokenizer.json"))?);
        }
        Ok(None)
    }

    /// `trainer_state.json` of the selected weights, if any.
    pub fn trainer_state(&self) -> Result<Option<Value>> {
        Ok(self
            .store
            .get_opt(&self.key("trainer_state.json"))?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// The training recipe written by the train stage (`pipeline.json`).
    pub fn recipe(&self) -> Result<Option<Value>> {
        Ok(self
            .store
            .get_opt(&join(&self.root, "pipeline.json"))?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// All tensors of the selected weights, converted to `dtype` on `device`.
    pub fn tensors(&self, device: &Device, dtype: DType) -> Result<HashMap<String, Tensor>> {
        let files = self.weight_files()?;
        let sums = self.checksums()?;
        let mut out = HashMap::new();
        for f in files {
            let bytes = self.read_checked(&f, sums.as_ref())?;
            let loaded = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
                Error::model(
                    &self.id,
                    format!(
                        "{} is not a readable safetensors file ({e}): truncated or damaged",
                        self.store.display(&self.key(&f))
                    ),
                )
            })?;
            for (k, t) in loaded {
                let t = if t.dtype() == dtype {
                    t
                } else {
                    t.to_dtype(dtype).ctx("converting weights")?
                };
                out.insert(k, t);
            }
        }
        Ok(out)
    }

    /// Load the model (its family from `config.json`).
    pub fn load(&self, device: &Device, dtype: DType) -> Result<Box<dyn CausalLm>> {
        let config = self.config()?;
        let tensors = self.tensors(device, dtype)?;
        Ok(lc_models::from_tensors(&config, tensors, &self.id)?)
    }

    /// The classifier rows W (vocab x d) alone, in f32 on the CPU, without
    /// loading the rest of the model.
    pub fn classifier_rows(&self) -> Result<(Vec<f32>, usize, usize)> {
        let config = self.config()?;
        let sums = self.checksums()?;
        let names = config.classifier_names();
        for f in self.weight_files()? {
            let bytes = self.read_checked(&f, sums.as_ref())?;
            let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
                Error::model(
                    &self.id,
                    format!(
                        "{} is not a readable safetensors file ({e})",
                        self.store.display(&self.key(&f))
                    ),
                )
            })?;
            for n in names {
                if let Ok(view) = st.tensor(n) {
                    use candle_core::safetensors::Load;
                    let t = view
                        .load(&Device::Cpu)
                        .and_then(|t| t.to_dtype(DType::F32))
                        .ctx(format!("classifier {n}"))?;
                    let (v, d) = t.dims2().ctx(format!("classifier {n}"))?;
                    let flat: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).ctx("classifier")?;
                    return Ok((flat, v, d));
                }
            }
        }
        Err(Error::model(
            &self.id,
            format!("the checkpoint has no classifier tensor ({})", names.join(" or ")),
        ))
    }
}

/// Save a model directory: weights, config, optional extra files, and
/// `trainer_state.json` last (its presence marks a complete save).
pub fn save_dir(
    store: &Lake,
    dir: &str,
    config: &GptNeoConfig,
    tensors: &HashMap<String, Tensor>,
    extra: &[(&str, Bytes)],
    trainer_state: &Value,
) -> Result<()> {
    let named: Vec<(String, Tensor)> = parameter_names(config)
        .into_iter()
        .map(|n| {
            let t = tensors
                .get(&n)
                .ok_or_else(|| Error::invalid(format!("no tensor {n} to save")))?
                .to_dtype(DType::F32)
                .ctx("saving weights")?;
            Ok((n, t))
        })
        .collect::<Result<_>>()?;
    store.delete(&join(dir, "trainer_state.json"))?;
    let mut sums = Checksums::default();
    let weights = Bytes::from(safetensors_bytes(&named)?);
    sums.add("model.safetensors", &weights);
    store.put(&join(dir, "model.safetensors"), weights)?;
    let config_json = Bytes::from(config.to_json());
    sums.add("config.json", &config_json);
    store.put(&join(dir, "config.json"), config_json)?;
    for (name, bytes) in extra {
        sums.add(name, bytes);
        store.put(&join(dir, name), bytes.clone())?;
    }
    store.put(
        &join(dir, CHECKSUMS_FILE),
        Bytes::from(serde_json::to_vec_pretty(&sums).expect("json")),
    )?;
    store.put(
        &join(dir, "trainer_state.json"),
        Bytes::from(serde_json::to_vec_pretty(trainer_state).expect("json")),
    )?;
    Ok(())
}
