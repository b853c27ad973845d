//! `pipeline verify`: check a whole lake, or one table, byte for byte.
//!
//! Reads every artifact's data file and compares its size, hash and block
//! hashes with its manifest; every saved model file with `_checksums.json`;
//! every collection state object with the hash it embeds; every stored
//! tokenizer with the fingerprint it is filed under. Lists what is damaged
//! (content differs from what was recorded), orphaned (a file no manifest
//! accounts for: an interrupted commit, a leftover staging file, something
//! another tool put there) or incomplete (a model save without
//! `trainer_state.json`), and multipart uploads a killed process left on an
//! S3 server. Nothing is changed unless `repair` is asked for, which only
//! aborts those uploads.

use std::collections::{BTreeMap, BTreeSet};

use lc_lake::integrity::{DATA_FILE, MANIFEST_FILE, hash_hex};
use lc_lake::lake::Lake;
use lc_lake::manifest::Manifest;

use crate::error::Result;
use lc_models::checkpoint::{CHECKSUMS_FILE, Checksums};

/// What was found wrong with one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// damaged | orphaned | incomplete | upload
    pub kind: &'static str,
    pub path: String,
    pub detail: String,
}

/// The result of a check.
#[derive(Debug, Default)]
pub struct Report {
    pub checked: u64,
    pub bytes: u64,
    pub findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, kind: &'static str, lake: &Lake, key: &str, detail: impl Into<String>) {
        self.findings.push(Finding {
            kind,
            path: lake.display(key),
            detail: detail.into(),
        });
    }

    pub fn damaged(&self) -> usize {
        self.findings.iter().filter(|f| f.kind == "damaged").count()
    }
}

/// The parent directory of a key ("" at the top).
fn dir_of(key: &str) -> &str {
    key.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
}

/// Check the lake (every table and the weights, states and tokenizers), or
/// only `table` (a table name, or `weights`, `partials`, `tokenizers`).
pub fn verify(lake: &Lake, table: Option<&str>, repair: bool) -> Result<Report> {
    let mut r = Report::default();
    let tables: Vec<String> = lc_lake::schemas::tables()
        .iter()
        .filter(|t| t.kind == "table")
        .map(|t| t.table.clone())
        .collect();
    let areas = ["weights", "partials", "tokenizers"];
    if let Some(t) = table
        && !tables.iter().any(|x| x == t)
        && !areas.contains(&t)
    {
        return Err(crate::Error::invalid(format!(
            "verify: '{t}' is not a table or one of {}; tables: {}",
            areas.join(", "),
            tables.join(", ")
        )));
    }
    let wanted = |name: &str| table.is_none_or(|t| t == name);
    for t in tables.iter().filter(|t| wanted(t)) {
        check_table(lake, t, &mut r)?;
    }
    if wanted("weights") {
        check_weights(lake, &mut r)?;
    }
    if wanted("partials") {
        check_partials(lake, &mut r)?;
    }
    if wanted("tokenizers") {
        check_tokenizers(lake, &mut r)?;
    }
    if table.is_none() {
        for (key, id, _) in lake.stale_uploads(repair)? {
            let what = if repair {
                "aborted"
            } else {
                "left by a killed process; `verify --repair` aborts it"
            };
            r.add(
                "upload",
                lake,
                &key,
                format!("multipart upload {id} never finished ({what})"),
            );
        }
        local_staging_files(lake, &mut r);
    }
    Ok(r)
}

fn check_table(lake: &Lake, table: &str, r: &mut Report) -> Result<()> {
    let mut dirs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (key, _) in lake.list(table)? {
        let name = key.rsplit('/').next().unwrap_or(&key).to_string();
        dirs.entry(dir_of(&key).to_string()).or_default().insert(name);
    }
    for (dir, files) in dirs {
        let data_key = format!("{dir}/{DATA_FILE}");
        let manifest_key = format!("{dir}/{MANIFEST_FILE}");
        for f in files.iter().filter(|f| *f != DATA_FILE && *f != MANIFEST_FILE) {
            r.add(
                "orphaned",
                lake,
                &format!("{dir}/{f}"),
                "not part of any artifact (a leftover or another tool's file)",
            );
        }
        match (files.contains(MANIFEST_FILE), files.contains(DATA_FILE)) {
            (false, true) => r.add(
                "orphaned",
                lake,
                &data_key,
                "data file without a manifest (an interrupted commit); re-run the stage that makes it",
            ),
            (true, false) => r.add(
                "damaged",
                lake,
                &manifest_key,
                "manifest without its data file; re-run the stage that made it",
            ),
            (true, true) => {
                let m: Manifest = match serde_json::from_slice(&lake.get(&manifest_key)?) {
                    Ok(m) => m,
                    Err(e) => {
                        r.add("damaged", lake, &manifest_key, format!("corrupt manifest: {e}"));
                        continue;
                    }
                };
                // Read past the checking layer: this compares everything.
                let data = lake.get_unchecked(&data_key)?;
                r.checked += 1;
                r.bytes += data.len() as u64;
                if let Some(problem) = compare(&data, &m) {
                    r.add(
                        "damaged",
                        lake,
                        &data_key,
                        format!("{problem}; made by stage {}: re-run it with force=true", m.stage),
                    );
                }
            }
            (false, false) => {}
        }
    }
    Ok(())
}

/// What differs between a data file and its manifest, if anything.
fn compare(data: &[u8], m: &Manifest) -> Option<String> {
    if data.len() as u64 != m.bytes {
        return Some(format!("{} bytes, its manifest says {}", data.len(), m.bytes));
    }
    if let Some(blocks) = &m.blocks {
        for (i, (chunk, want)) in data
            .chunks(blocks.size.max(1) as usize)
            .zip(&blocks.hashes)
            .enumerate()
        {
            if &hash_hex(chunk) != want {
                let at = i as u64 * blocks.size;
                return Some(format!(
                    "block {i} (bytes {at}..{}) differs from its manifest's hash",
                    at + chunk.len() as u64
                ));
            }
        }
    }
    if hash_hex(data) != m.content_hash {
        return Some("its BLAKE3 differs from its manifest's".into());
    }
    None
}

fn check_weights(lake: &Lake, r: &mut Report) -> Result<()> {
    let mut dirs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (key, _) in lake.list("weights")? {
        let name = key.rsplit('/').next().unwrap_or(&key).to_string();
        dirs.entry(dir_of(&key).to_string()).or_default().insert(name);
    }
    for (dir, files) in dirs {
        let has_weights = files
            .iter()
            .any(|f| f.ends_with(".safetensors") && !f.starts_with('_'));
        if !has_weights {
            continue;
        }
        if !files.contains("trainer_state.json") {
            r.add(
                "incomplete",
                lake,
                &dir,
                "no trainer_state.json: the save was interrupted; run train again",
            );
        }
        let Some(bytes) = lake.get_opt(&format!("{dir}/{CHECKSUMS_FILE}"))? else {
            continue;
        };
        let sums: Checksums = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                r.add(
                    "damaged",
                    lake,
                    &format!("{dir}/{CHECKSUMS_FILE}"),
                    format!("corrupt: {e}"),
                );
                continue;
            }
        };
        for (name, want) in &sums.files {
            let key = format!("{dir}/{name}");
            match lake.get_opt(&key)? {
                None => r.add("damaged", lake, &key, "missing (recorded in _checksums.json)"),
                Some(b) => {
                    r.checked += 1;
                    r.bytes += b.len() as u64;
                    if b.len() as u64 != want.bytes || hash_hex(&b) != want.blake3 {
                        r.add(
                            "damaged",
                            lake,
                            &key,
                            format!(
                                "{} bytes, recorded {} bytes with another BLAKE3; run train for this model again to repair it",
                                b.len(),
                                want.bytes
                            ),
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn check_partials(lake: &Lake, r: &mut Report) -> Result<()> {
    for (key, _) in lake.list("partials")? {
        if !key.ends_with(".safetensors") {
            continue;
        }
        let bytes = lake.get(&key)?;
        r.checked += 1;
        r.bytes += bytes.len() as u64;
        if let Err(e) = crate::partials::StateObject::from_bytes(&bytes, &lake.display(&key)) {
            r.add("damaged", lake, &key, e.to_string());
        }
    }
    Ok(())
}

fn check_tokenizers(lake: &Lake, r: &mut Report) -> Result<()> {
    for (key, _) in lake.list("tokenizers")? {
        let Some(fp) = key
            .strip_prefix("tokenizers/")
            .and_then(|k| k.strip_suffix(".json"))
        else {
            r.add("orphaned", lake, &key, "not a stored tokenizer");
            continue;
        };
        let bytes = lake.get(&key)?;
        r.checked += 1;
        r.bytes += bytes.len() as u64;
        match crate::tokenizer::TextTokenizer::from_bytes(&bytes, &lake.display(&key)) {
            Ok(t) if t.fingerprint() == fp => {}
            Ok(_) => r.add(
                "damaged",
                lake,
                &key,
                "its vocabulary does not match its fingerprint",
            ),
            Err(e) => r.add("damaged", lake, &key, e.to_string()),
        }
    }
    Ok(())
}

/// Staging files a killed local upload left (`NAME#N`; object_store hides
/// them from listings).
fn local_staging_files(lake: &Lake, r: &mut Report) {
    let Some(root) = lake.url().strip_prefix("file://") else {
        return;
    };
    let mut stack = vec![std::path::PathBuf::from(root)];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.file_name().to_string_lossy().contains('#') {
                let rel = p
                    .strip_prefix(root)
                    .map(|x| x.to_string_lossy().to_string())
                    .unwrap_or_else(|_| p.to_string_lossy().to_string());
                r.add("orphaned", lake, &rel, "staging file of an interrupted write");
            }
        }
    }
}

/// The report as text, one finding per line.
pub fn render(lake: &Lake, r: &Report) -> String {
    let mut s = format!(
        "lake {}: {} objects checked ({:.1} MB)\n",
        lake.url(),
        r.checked,
        r.bytes as f64 / 1e6
    );
    if r.findings.is_empty() {
        s.push_str("everything is whole\n");
    }
    for f in &r.findings {
        s.push_str(&format!("{:<10} {}: {}\n", f.kind, f.path, f.detail));
    }
    s
}
