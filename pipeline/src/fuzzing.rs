//! The fuzz targets: one function per parser of outside input, each taking
//! the raw bytes a user or another tool could have written.
//!
//! `fuzz/fuzz_targets/*.rs` hands them to libFuzzer (coverage-guided, run
//! with `scripts/fuzz.sh`); `tests/fuzz_corpus.rs` replays every
//! committed seed and found crash through the same functions, then mutates
//! the seeds for a fixed number of inputs, in every `cargo test`.
//!
//! Contract, checked here for every input: no panic; a refusal is an error
//! whose message names the file or argument it was given (the fuzzer's
//! time and memory limits check the rest: `scripts/fuzz.sh` states them).
//! Inputs are written into an in-memory lake, so nothing touches the disk
//! or the network; a target that needs more than one value (a format and a
//! file, a stage and its parameters) takes them from its first line.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use lc_lake::artifact::{Artifact, Provenance};
use lc_lake::lake::Lake;

use crate::checkpoint::ModelRef;
use crate::error::Result;
use crate::experiment::Experiment;
use crate::params::{Config, Params, parse_pairs};
use crate::stages::{self, Ctx};
use crate::tokenizer::TextTokenizer;

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    /// The parser it reaches and how the input is laid out.
    pub about: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, by name (the names of `fuzz/fuzz_targets/*.rs` and of the
/// corpus folders `fuzz/corpus/NAME`).
pub fn targets() -> &'static [Target] {
    &[
        Target {
            name: "experiment_toml",
            about: "an experiment file (experiments/*.toml), parsed and expanded into every stage run",
            run: experiment_toml,
        },
        Target {
            name: "pipeline_toml",
            about: "a pipeline.toml, resolved and checked against every stage's parameters",
            run: pipeline_toml,
        },
        Target {
            name: "stage_params",
            about: "first line a stage, then one key=value word per line, as on the command line",
            run: stage_params,
        },
        Target {
            name: "model_id",
            about: "a model reference (NAME, NAME@K, a directory) resolved in a lake holding a model",
            run: model_id,
        },
        Target {
            name: "manifest",
            about: "an artifact's manifest (JSON), read back beside its data file",
            run: manifest,
        },
        Target {
            name: "model_config",
            about: "a model's config.json, any family, parsed and loaded without weights",
            run: model_config,
        },
        Target {
            name: "safetensors",
            about: "a model.safetensors beside a tiny GPT-2 config.json, loaded and run on four tokens",
            run: safetensors,
        },
        Target {
            name: "tokenizer",
            about: "a tokenizer.json, loaded and used to encode and decode a sentence",
            run: tokenizer,
        },
        Target {
            name: "ingest",
            about: "first line txt|jsonl|csv|parquet, then a corpus file, ingested",
            run: ingest,
        },
        Target {
            name: "import",
            about: "first line csv|parquet, second line columns=, then a metrics table, imported",
            run: import,
        },
    ]
}

/// For the libFuzzer build (`fuzz_target!`'s `init`): libfuzzer-sys aborts
/// on every panic, even one our code catches to turn into the file's error
/// (the readers of third-party formats do: parquet divides by zero on some
/// damaged pages). The default hook again: a panic is reported, and it is a
/// crash only when it escapes the target.
pub fn crash_only_on_escaped_panics() {
    let _ = std::panic::take_hook();
}

/// What every target asks of a refusal: that it names what it refused.
#[track_caller]
fn named<T>(result: Result<T>, name: &str) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains(name),
                "the error does not name '{name}': {message}"
            );
            None
        }
    }
}

/// A fresh in-memory lake per input, all sharing one I/O runtime.
fn fresh_lake() -> Lake {
    static BASE: OnceLock<Lake> = OnceLock::new();
    let base = BASE.get_or_init(|| Lake::open("memory://").expect("an in-memory lake opens"));
    base.open_sibling("memory://").expect("an in-memory lake opens")
}

/// The first line (without its newline) and the rest.
fn first_line(data: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(b'\n', data) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

fn put(lake: &Lake, key: &str, bytes: &[u8]) {
    lake.put(key, Bytes::copy_from_slice(bytes))
        .expect("an in-memory put succeeds");
}

pub fn experiment_toml(data: &[u8]) {
    const NAME: &str = "fuzz/experiment.toml";
    let Ok(text) = std::str::from_utf8(data) else {
        return; // `Experiment::load` refuses it reading the file, naming it.
    };
    let Some(e) = named(Experiment::parse(text, NAME), NAME) else {
        return;
    };
    // Expanding the grid names every model; a malformed setting is the
    // stage's to refuse when it runs, but nothing here may panic.
    if let Ok(steps) = e.steps("cpu") {
        for m in &steps.models {
            let _ = m.train.label();
        }
    }
}

pub fn pipeline_toml(data: &[u8]) {
    const NAME: &str = "fuzz/pipeline.toml";
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(config) = named(Config::parse(text, NAME), NAME) else {
        return;
    };
    for stage in stages::all() {
        // Errors name the stage and key (Error::Param).
        if let Some(p) = named(
            Params::resolve(stage.name(), stage.params(), &config, &BTreeMap::new()),
            stage.name(),
        ) {
            let _ = named(stage.check(&p), stage.name());
        }
    }
}

pub fn stage_params(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // the shell hands over UTF-8 words
    };
    let (stage, words) = text.split_once('\n').unwrap_or((text, ""));
    let Ok(stage) = stages::find(stage.trim()) else {
        return;
    };
    let words: Vec<String> = words.lines().map(str::to_string).collect();
    let Ok(explicit) = parse_pairs(&words) else {
        return; // it quotes the word it refused (see params' tests)
    };
    // A refusal names the stage or the parameter it refused.
    let named_here = |e: &crate::error::Error| {
        let message = e.to_string();
        assert!(
            message.contains(stage.name()) || explicit.keys().any(|k| message.contains(k.as_str())),
            "the error names neither the stage nor a parameter: {message}"
        );
    };
    let p = match Params::resolve(stage.name(), stage.params(), &Config::default(), &explicit) {
        Ok(p) => p,
        Err(e) => return named_here(&e),
    };
    if let Err(e) = stage.check(&p) {
        named_here(&e);
    }
}

/// A GPT-2 small enough to run on every input: d 8, 2 heads, 1 layer,
/// 8 positions, 16 tokens.
const TINY_GPT2: &str = r#"{"model_type": "gpt2", "activation_function": "gelu_new",
  "n_embd": 8, "n_head": 2, "n_layer": 1, "n_positions": 8, "vocab_size": 16,
  "layer_norm_epsilon": 1e-05, "tie_word_embeddings": true}"#;

pub fn model_id(data: &[u8]) {
    let Ok(spec) = std::str::from_utf8(data) else {
        return;
    };
    // Remote stores and the local file system are not the parser's: the
    // target stays inside its in-memory lake.
    if spec.contains("://") || spec.contains('/') || spec.contains('\\') || spec.trim().starts_with('.') {
        return;
    }
    let lake = fresh_lake();
    for dir in [
        "weights/tiny",
        "weights/tiny/checkpoint-10",
        "weights/tiny/checkpoint-20",
    ] {
        put(&lake, &format!("{dir}/config.json"), TINY_GPT2.as_bytes());
    }
    let Some(m) = named(ModelRef::resolve(&lake, spec), spec.trim()) else {
        return;
    };
    let _ = named(m.config().map(|c| c.shape()), &m.id);
}

pub fn manifest(data: &[u8]) {
    let lake = fresh_lake();
    let artifact = Artifact::new("imported_metrics", &[("source", "fuzz")]).expect("a valid artifact");
    let batch = arrow::record_batch::RecordBatch::new_empty(
        lc_lake::artifact::file_schema("imported_metrics").expect("a known table"),
    );
    lake.write_artifact(&artifact, &[batch], Provenance::new("fuzz"))
        .expect("an in-memory write succeeds");
    let key = artifact.manifest_key();
    put(&lake, &key, data);
    let name = lake.display(&key);
    let Some(found) = named(lake.manifest(&artifact).map_err(Into::into), &name) else {
        return;
    };
    if found.is_some() {
        let _ = named(
            lake.require(&artifact, "fuzz").map_err(Into::into),
            &artifact.dir(),
        );
    }
    let _ = lake.manifests("imported_metrics", "");
}

pub fn model_config(data: &[u8]) {
    const NAME: &str = "fuzz-model";
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(config) = named(
        lc_models::config::ArchConfig::from_json(text, NAME).map_err(Into::into),
        NAME,
    ) else {
        return;
    };
    let _ = config.shape();
    let _ = config.classifier_names();
    // Loading checks the weights against the config before it allocates
    // anything the config alone sizes: with none, a clean refusal.
    let loaded = lc_models::from_tensors(&config, Default::default(), NAME);
    assert!(
        named(loaded.map_err(Into::into), NAME).is_none(),
        "a model without weights loaded"
    );
}

pub fn safetensors(data: &[u8]) {
    let lake = fresh_lake();
    put(&lake, "weights/tiny/config.json", TINY_GPT2.as_bytes());
    put(&lake, "weights/tiny/model.safetensors", data);
    let m = ModelRef::resolve(&lake, "tiny").expect("the model resolves");
    let Some(model) = named(m.load(&Device::Cpu, DType::F32), "tiny") else {
        return;
    };
    // Loading checked every shape against the config: the forward runs.
    let ids = Tensor::new(&[[0u32, 1, 2, 3]], &Device::Cpu).expect("a tensor");
    if let Err(e) = model.hidden_states(&ids, &[0, 1], lc_models::AttentionKernel::default()) {
        panic!("weights that load do not run: {e}");
    }
}

pub fn tokenizer(data: &[u8]) {
    const NAME: &str = "fuzz/tokenizer.json";
    let Some(tok) = named(TextTokenizer::from_bytes(data, NAME), NAME) else {
        return;
    };
    let text = "Once upon a time, a little girl named Lily found a needle.\n<|endoftext|> Ünïcödé 123";
    if let Ok(ids) = tok.encode(text) {
        for &id in ids.iter().take(64) {
            let _ = tok.token_text(id);
        }
    }
    let _ = tok.vocab_size();
}

pub fn ingest(data: &[u8]) {
    let (format, corpus) = first_line(data);
    let format = match format {
        b"txt" | b"jsonl" | b"csv" | b"parquet" => std::str::from_utf8(format).expect("ASCII"),
        _ => return,
    };
    let lake = fresh_lake();
    let key = format!("corpus.{format}");
    put(&lake, &key, corpus);
    let train = format!("lake:{key}");
    let ctx = Ctx::new(lake);
    let _ = named(
        stages::run_pairs(&ctx, "ingest", &[("dataset", "fuzz"), ("train", &train)]),
        &train,
    );
}

pub fn import(data: &[u8]) {
    let (format, rest) = first_line(data);
    let format = match format {
        b"csv" | b"parquet" => std::str::from_utf8(format).expect("ASCII"),
        _ => return,
    };
    let (columns, table) = first_line(rest);
    let Ok(columns) = std::str::from_utf8(columns) else {
        return;
    };
    let lake = fresh_lake();
    let key = format!("metrics.{format}");
    put(&lake, &key, table);
    let input = format!("lake:{key}");
    let ctx = Ctx::new(lake);
    let mut pairs = vec![("input", input.as_str()), ("name", "fuzz")];
    if !columns.is_empty() {
        pairs.push(("columns", columns));
    }
    let result = stages::run_pairs(&ctx, "import", &pairs);
    // A refusal names the file, or the parameter it found malformed.
    if let Err(e) = &result
        && !matches!(e, crate::error::Error::Param { .. })
    {
        let _ = named(result, &input);
    }
}
