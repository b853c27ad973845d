//! The fuzz targets (`pipeline::fuzzing`) on stable Rust, in every
//! `cargo test`: every committed seed (`fuzz/corpus/TARGET/`) and every
//! input that once failed (`fuzz/regressions/TARGET/`) is replayed, then the
//! seeds are mutated for a fixed number of inputs per target (bit flips,
//! interesting bytes and numbers, deleted, repeated and spliced ranges,
//! tokens of the formats). This is not coverage-guided: the long,
//! coverage-guided runs are libFuzzer's (`scripts/fuzz.sh`); this keeps
//! what they found fixed and samples around the seeds.
//!
//! Bounds, per input: no panic; at most `TIME_LIMIT` (the dev build, the
//! import target's DataFusion query unoptimised, takes well under a second);
//! at most `ALLOC_LIMIT` bytes live beyond what was live before it (counted
//! by this binary's allocator, which refuses allocations past four times
//! that, so the process aborts before the machine runs out). A failing input
//! is written to `$CARGO_TARGET_DIR/fuzz-failures/TARGET/` (else the temp
//! directory's `lc-fuzz/`), an input the process died on to `in-flight`
//! there, for `scripts/fuzz.sh replay` and the regression folder.
//!
//! `LC_FUZZ_INPUTS=N` sets the mutants per target (default 1000).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pipeline::fuzzing::{Target, targets};

const TIME_LIMIT: Duration = Duration::from_secs(10);
const ALLOC_LIMIT: usize = 512 << 20;
const DEFAULT_MUTANTS: usize = 1000;
/// Mutants grow no longer than this (libFuzzer's `-max_len` in scripts/fuzz.sh).
const MAX_LEN: usize = 1 << 18;

/// The system allocator, counting live bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Live bytes past which an allocation fails (the process aborts, naming its
/// size, and the input is left in `in-flight`): before the machine does.
static REFUSE_PAST: AtomicUsize = AtomicUsize::new(usize::MAX);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if LIVE.load(Ordering::Relaxed).saturating_add(layout.size()) > REFUSE_PAST.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let grow = new_size.saturating_sub(layout.size());
        if LIVE.load(Ordering::Relaxed).saturating_add(grow) > REFUSE_PAST.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let live =
                    LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The files of `fuzz/<kind>/<target>/`, sorted (none when it is absent).
fn inputs(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = repo().join("fuzz").join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| {
            let p = e.path();
            let bytes = std::fs::read(&p).unwrap_or_else(|err| panic!("{}: {err}", p.display()));
            (
                format!("{kind}/{target}/{}", e.file_name().to_string_lossy()),
                bytes,
            )
        })
        .collect();
    out.sort();
    out
}

/// Why one input failed the contract, if it did.
fn try_input(target: &Target, data: &[u8]) -> Option<String> {
    // Left behind if the process dies on this input.
    let dir = failure_dir(target.name);
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("in-flight"), data);
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    REFUSE_PAST.store(before + 4 * ALLOC_LIMIT, Ordering::Relaxed);
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(|| (target.run)(data));
    let took = started.elapsed();
    REFUSE_PAST.store(usize::MAX, Ordering::Relaxed);
    let grew = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    match outcome {
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            Some(format!("panicked: {why}"))
        }
        Ok(()) if took > TIME_LIMIT => Some(format!("took {took:?} (limit {TIME_LIMIT:?})")),
        Ok(()) if grew > ALLOC_LIMIT => Some(format!(
            "allocated {} MiB beyond what was live (limit {} MiB)",
            grew >> 20,
            ALLOC_LIMIT >> 20
        )),
        Ok(()) => None,
    }
}

/// xorshift64*: the mutants are the same on every run.
struct Rng(u64);

impl Rng {
    fn for_target(name: &str) -> Self {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        Rng(h | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const BYTES: &[u8] = b"\x00\xff\x7f\x80\"'{}[],:=\n\r\t .-+0123456789eE\\";
const TOKENS: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "7",
    "255",
    "256",
    "65536",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "18446744073709551616",
    "1e308",
    "-1e308",
    "1e-320",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "null",
    "true",
    "false",
    "\"\"",
    "[]",
    "{}",
    "[[",
    "]]",
    "=",
    "\"a\"",
    "\u{0}",
    "\u{feff}",
    "é",
    "\u{10ffff}",
    "\\u0000",
    "\\ud800",
    "@",
    "@0",
    "@99",
    ",",
    ";",
    "\n",
    "\r\n",
    "<|endoftext|>",
    "model",
    "val_loss",
    "text",
    "layers",
    "last",
    "depth",
    "\"model_type\": \"gpt2\"",
    "\"model_type\": \"llama\"",
    "\"model_type\": \"gpt_neox\"",
    "\"model_type\": \"gpt_neo\"",
    "\"F16\"",
    "\"BF16\"",
    "\"F64\"",
    "\"I64\"",
    "\"U8\"",
    "\"shape\"",
    "\"data_offsets\"",
    "PAR1",
    "sqrt(",
    "/0",
    "x:y",
];

/// One mutant of `seeds[i]`: one to four stacked edits.
fn mutate(rng: &mut Rng, seeds: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut d = seeds[rng.below(seeds.len())].1.clone();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(d.len() + 1);
        match rng.below(7) {
            0 if !d.is_empty() => {
                let i = at.min(d.len() - 1);
                d[i] ^= 1 << rng.below(8);
            }
            1 if !d.is_empty() => {
                let i = at.min(d.len() - 1);
                d[i] = BYTES[rng.below(BYTES.len())];
            }
            2 => {
                let n = (1 + rng.below(16)).min(d.len() - at);
                d.drain(at..at + n);
            }
            3 => {
                let n = (1 + rng.below(64)).min(d.len() - at);
                let copy = d[at..at + n].to_vec();
                let to = rng.below(d.len() + 1);
                d.splice(to..to, copy);
            }
            4 | 5 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                d.splice(at..at, t.iter().copied());
            }
            _ => {
                // Splice: this seed's head, another's tail.
                let other = &seeds[rng.below(seeds.len())].1;
                let from = rng.below(other.len() + 1);
                d.truncate(at);
                d.extend_from_slice(&other[from..]);
            }
        }
        // Numbers are where sizes and counts live: replace a digit run.
        let from = rng.below(d.len() + 1);
        if rng.below(4) == 0
            && let Some(offset) = d[from..].iter().position(u8::is_ascii_digit)
        {
            let start = from + offset;
            let end = start + d[start..].iter().take_while(|b| b.is_ascii_digit()).count();
            let n = TOKENS[rng.below(11)].as_bytes();
            d.splice(start..end, n.iter().copied());
        }
    }
    d.truncate(MAX_LEN);
    d
}

fn failure_dir(target: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("lc-fuzz"));
    base.join("fuzz-failures").join(target)
}

#[test]
fn every_target_has_seeds_and_survives_its_corpus_and_mutants() {
    let mutants: usize = std::env::var("LC_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_MUTANTS);
    // The panics a target is caught in are reported below, once each.
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    for target in targets() {
        let started = Instant::now();
        let seeds = inputs("corpus", target.name);
        assert!(!seeds.is_empty(), "fuzz/corpus/{} has no seeds", target.name);
        let mut replay = seeds.clone();
        replay.extend(inputs("regressions", target.name));
        let mut fail = |what: String, data: &[u8], why: String| {
            let dir = failure_dir(target.name);
            let _ = std::fs::create_dir_all(&dir);
            let file = dir.join(format!("{:016x}", blake3_64(data)));
            let _ = std::fs::write(&file, data);
            failures.push(format!(
                "{} {what}: {why}\n    input saved as {}",
                target.name,
                file.display()
            ));
        };
        for (name, data) in &replay {
            if let Some(why) = try_input(target, data) {
                fail(name.clone(), data, why);
            }
        }
        let mut rng = Rng::for_target(target.name);
        for i in 0..mutants {
            let data = mutate(&mut rng, &seeds);
            if let Some(why) = try_input(target, &data) {
                fail(format!("mutant {i}"), &data, why);
            }
        }
        let _ = std::fs::remove_file(failure_dir(target.name).join("in-flight"));
        eprintln!(
            "{} ({}): {} replayed, {mutants} mutants, {:.1} s",
            target.name,
            target.about,
            replay.len(),
            started.elapsed().as_secs_f64()
        );
    }
    let _ = std::panic::take_hook();
    assert!(
        failures.is_empty(),
        "{} failing inputs:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A short content name for a saved input.
fn blake3_64(data: &[u8]) -> u64 {
    let h = blake3::hash(data);
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The seeds no text editor writes: a manifest as the lake writes it,
/// weights for the tiny GPT-2 of `pipeline::fuzzing`, Parquet inputs.
/// `cargo test --test fuzz_corpus -- --ignored` rewrites them.
#[test]
#[ignore]
fn write_generated_seeds() {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Float64Array, StringArray};
    use arrow::record_batch::RecordBatch;
    use lc_lake::artifact::{Artifact, Provenance, file_schema};

    let corpus = repo().join("fuzz").join("corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).expect("corpus folder");
        std::fs::write(dir.join(name), bytes).expect("seed written");
    };

    // The manifest the `manifest` target writes, then overwrites.
    let lake = lc_lake::lake::Lake::open("memory://").expect("lake");
    let artifact = Artifact::new("imported_metrics", &[("source", "fuzz")]).expect("artifact");
    let batch = RecordBatch::new_empty(file_schema("imported_metrics").expect("schema"));
    lake.write_artifact(&artifact, &[batch], Provenance::new("fuzz").param("input", "x"))
        .expect("write");
    write(
        "manifest",
        "imported_metrics.json",
        &lake.get(&artifact.manifest_key()).expect("manifest"),
    );

    // Weights of the tiny GPT-2 (d 8, 1 layer, 8 positions, 16 tokens), in
    // f32 and in bf16 (converted on load).
    let shapes: &[(&str, &[usize])] = &[
        ("transformer.wte.weight", &[16, 8]),
        ("transformer.wpe.weight", &[8, 8]),
        ("transformer.h.0.ln_1.weight", &[8]),
        ("transformer.h.0.ln_1.bias", &[8]),
        ("transformer.h.0.attn.c_attn.weight", &[8, 24]),
        ("transformer.h.0.attn.c_attn.bias", &[24]),
        ("transformer.h.0.attn.c_proj.weight", &[8, 8]),
        ("transformer.h.0.attn.c_proj.bias", &[8]),
        ("transformer.h.0.ln_2.weight", &[8]),
        ("transformer.h.0.ln_2.bias", &[8]),
        ("transformer.h.0.mlp.c_fc.weight", &[8, 32]),
        ("transformer.h.0.mlp.c_fc.bias", &[32]),
        ("transformer.h.0.mlp.c_proj.weight", &[32, 8]),
        ("transformer.h.0.mlp.c_proj.bias", &[8]),
        ("transformer.ln_f.weight", &[8]),
        ("transformer.ln_f.bias", &[8]),
    ];
    let mut rng = Rng::for_target("safetensors");
    for (file, dtype) in [
        ("gpt2_f32", candle_core::DType::F32),
        ("gpt2_bf16", candle_core::DType::BF16),
    ] {
        let tensors: Vec<(String, candle_core::Tensor)> = shapes
            .iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = (0..n).map(|_| (rng.below(2001) as f32 - 1000.0) * 2e-4).collect();
                let t = candle_core::Tensor::from_vec(values, *shape, &candle_core::Device::Cpu)
                    .and_then(|t| t.to_dtype(dtype))
                    .expect("tensor");
                (name.to_string(), t)
            })
            .collect();
        let bytes = lc_models::checkpoint::safetensors_bytes(&tensors).expect("serialised");
        write("safetensors", file, &bytes);
    }

    // Parquet inputs: a corpus with a text column, a metrics table.
    let parquet = |columns: Vec<(&str, ArrayRef)>| -> Vec<u8> {
        let batch = RecordBatch::try_from_iter(columns).expect("batch");
        let mut out = Vec::new();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).expect("writer");
        w.write(&batch).expect("write");
        w.close().expect("close");
        out
    };
    let mut seed = b"parquet\n".to_vec();
    seed.extend(parquet(vec![
        (
            "id",
            Arc::new(Float64Array::from(vec![1.0, 2.0, 3.0])) as ArrayRef,
        ),
        (
            "text",
            Arc::new(StringArray::from(vec!["Once upon a time.", "", "The end."])),
        ),
    ]));
    write("ingest", "parquet", &seed);
    let mut seed = b"parquet\n\n".to_vec();
    seed.extend(parquet(vec![
        (
            "model",
            Arc::new(StringArray::from(vec!["01x0016_02d05@1", "01x0032_02d05@1"])) as ArrayRef,
        ),
        ("val_loss", Arc::new(Float64Array::from(vec![2.5, 2.1]))),
        ("nc1", Arc::new(Float64Array::from(vec![Some(0.3), None]))),
    ]));
    write("import", "parquet", &seed);
}
