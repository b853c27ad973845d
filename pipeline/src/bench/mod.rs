//! Benchmarks of the stages that touch every token or every class pair,
//! run through the real stages on real or full-scale synthetic inputs
//! (`pipeline bench NAME [key=value ...]`), one module beside each thing
//! measured: [`data`] (ingest, tokenize, pack), [`model`] (forward and
//! training step), [`collect`], [`eval`], [`decide`], [`analyze`],
//! [`correlate`] and the CUDA [`kernels`]. Each figure is printed beside
//! an anchor measured in the same run (the GEMM peak of this machine, a
//! device copy); the README's performance section quotes them. This
//! module holds the anchors, the shared fixtures and the options of each
//! benchmark, which are checked like a stage's parameters.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use lc_lake::lake::Lake;

use crate::error::{Context, Error, Result};
use crate::params::{Config, ParamSpec, Params, param};
use crate::stages::{self, Ctx};
use lc_models::{GptNeoConfig, init_weights};

pub mod analyze;
pub mod collect;
pub mod correlate;
pub mod data;
pub mod decide;
pub mod eval;
pub mod kernels;
pub mod model;

/// The shipped corpus the stage benchmarks run on.
const SAMPLE: &str = "data/tinystories_train_sample.txt";

/// One benchmark: its name, its options (with their defaults), and what
/// runs it with them resolved.
struct Bench {
    name: &'static str,
    options: &'static [ParamSpec],
    run: fn(&Params) -> Result<String>,
}

/// Every benchmark, in the order `pipeline bench` lists them.
const BENCHES: &[Bench] = &[
    Bench {
        name: "data",
        options: &[
            param("source", SAMPLE, "corpus, replicated to mb"),
            param("tokenizer", "gpt2", "tokenizer file or name"),
            param("mb", "100", "corpus size in MB"),
        ],
        run: |o| data::data(o.str("source"), o.str("tokenizer"), o.usize("mb")?),
    },
    Bench {
        name: "model",
        options: &[
            param("depth", "1", "blocks"),
            param("width", "64", "embedding width"),
            param("T", "2048", "sequence length"),
            param("batch", "2", "sequences per step"),
            param("steps", "3", "timed steps"),
        ],
        run: |o| {
            model::model(
                o.usize("depth")?,
                o.usize("width")?,
                o.usize("T")?,
                o.usize("batch")?,
                o.usize("steps")?,
            )
        },
    },
    Bench {
        name: "collect",
        options: &[
            param("depth", "1", "blocks"),
            param("width", "64", "embedding width"),
            param("train", SAMPLE, "corpus"),
            param("tokenizer", "gpt2", "tokenizer file or name"),
            param("batch", "2", "sequences per forward pass"),
        ],
        run: |o| {
            collect::collect(
                o.usize("depth")?,
                o.usize("width")?,
                o.str("train"),
                o.str("tokenizer"),
                o.usize("batch")?,
            )
        },
    },
    Bench {
        name: "eval",
        options: &[
            param("width", "32", "embedding width"),
            param("batch", "4", "sequences per forward pass"),
            param("reps", "20", "timed repetitions of the output layer"),
        ],
        run: |o| eval::eval(o.usize("width")?, o.usize("batch")?, o.usize("reps")?),
    },
    Bench {
        name: "decide",
        options: &[
            param("width", "32", "embedding width"),
            param("batch", "8", "sequences per forward pass"),
            param("precision", "f64", "f64 | f32"),
            param("reps", "10", "timed repetitions of the two decisions"),
        ],
        run: |o| {
            decide::decide(
                o.usize("width")?,
                o.usize("batch")?,
                o.str("precision"),
                o.usize("reps")?,
            )
        },
    },
    Bench {
        name: "analyze",
        options: &[
            param("classes", "29233", "classes C"),
            param("dim", "1024", "dimensions d"),
            param("tile", "512", "tile edge in classes"),
            param("precision", "f64", "f64 | f32"),
        ],
        run: |o| {
            analyze::analyze(
                o.usize("classes")?,
                o.usize("dim")?,
                o.usize("tile")?,
                o.str("precision"),
            )
        },
    },
    Bench {
        name: "correlate",
        options: &[
            param("models", "230", "models"),
            param("metrics", "7", "metrics per model"),
            param("permutations", "10000", "permutations per test"),
        ],
        run: |o| correlate::correlate(o.usize("models")?, o.usize("metrics")?, o.u64("permutations")?),
    },
    Bench {
        name: "attention",
        options: &[
            param("batch", "8", "sequences"),
            param("heads", "16", "heads"),
            param("T", "2048", "sequence length"),
            param("dim", "64", "head dimension"),
            param("window", "0", "local attention window (0 = global)"),
            param(
                "device",
                "cuda",
                "cuda[:N] (the fused kernel against blocks) | cpu (f32 kernels)",
            ),
            param("reps", "20", "timed repetitions"),
        ],
        run: |o| {
            kernels::attention(
                o.usize("batch")?,
                o.usize("heads")?,
                o.usize("T")?,
                o.usize("dim")?,
                o.usize("window")?,
                o.str("device"),
                o.usize("reps")?,
            )
        },
    },
    Bench {
        name: "epilogues",
        options: &[
            param("rows", "16384", "rows (tokens)"),
            param("width", "1024", "embedding width"),
            param("dtype", "bf16", "bf16 | f32"),
            param("device", "cuda", "cuda[:N]"),
            param("reps", "20", "timed repetitions"),
        ],
        run: |o| {
            kernels::epilogues(
                o.usize("rows")?,
                o.usize("width")?,
                o.str("dtype"),
                o.str("device"),
                o.usize("reps")?,
            )
        },
    },
];

/// Run benchmark `what` with its `key=value` options; an unknown option or
/// a malformed value is refused naming it.
pub fn run(what: &str, opts: &BTreeMap<String, String>) -> Result<String> {
    let bench = BENCHES.iter().find(|b| b.name == what).ok_or_else(|| {
        let names: Vec<&str> = BENCHES.iter().map(|b| b.name).collect();
        Error::invalid(format!(
            "unknown benchmark '{what}'; benchmarks: {}",
            names.join(", ")
        ))
    })?;
    let label = format!("bench {what}");
    // The options' errors say "option", not a stage's "parameter"; the
    // stages a benchmark runs keep their own words.
    let option_error = |e: Error| match e {
        Error::Param { stage, key, problem } if stage == label => {
            Error::invalid(format!("{label}: option {key}: {problem}"))
        }
        e => e,
    };
    let o = Params::resolve(&label, bench.options, &Config::default(), opts).map_err(option_error)?;
    (bench.run)(&o).map_err(option_error)
}

fn temp_ctx() -> Result<(tempfile::TempDir, Ctx)> {
    let dir = tempfile::tempdir().ctx("temporary directory")?;
    let lake = Lake::open(dir.path().join("lake").to_str().unwrap_or("lake"))?;
    Ok((dir, Ctx::new(lake)))
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed().as_secs_f64()))
}

/// One call of `run` on `dev` (its result, and a warm-up), then the mean
/// seconds of `reps` more, timed between device synchronisations.
fn device_time(
    dev: &candle_core::Device,
    reps: usize,
    run: &dyn Fn() -> candle_core::Result<Tensor>,
) -> candle_core::Result<(Tensor, f64)> {
    let out = run()?;
    dev.synchronize()?;
    let started = Instant::now();
    for _ in 0..reps {
        run()?;
    }
    dev.synchronize()?;
    Ok((out, started.elapsed().as_secs_f64() / reps.max(1) as f64))
}

/// The anchor for model throughput, measured in this process: the best of
/// a few f32 GEMMs (1024 x 1024 x 1024) on every rayon thread, GFLOP/s.
pub fn peak_gemm_gflops() -> f64 {
    peak_gemm::<f32>()
}

/// [`peak_gemm_gflops`] in f64: the anchor of f64 work (decide's default
/// precision).
pub fn peak_gemm_gflops_f64() -> f64 {
    peak_gemm::<f64>()
}

fn peak_gemm<T: Copy + 'static + From<u8>>() -> f64 {
    let n = 1024;
    let a: Vec<T> = (0..n * n).map(|i| T::from((i % 17) as u8)).collect();
    let b: Vec<T> = (0..n * n).map(|i| T::from((i % 13) as u8)).collect();
    let mut c = vec![T::from(0); n * n];
    let threads = rayon::current_num_threads();
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        // SAFETY: three n x n row-major buffers of the stated strides.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                T::from(0),
                T::from(1),
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// Useful FLOPs per token of a GPT-Neo forward at context `t`: the matrix
/// products of every block (attention projections, MLP), the causal
/// attention over the keys each query may see (all earlier positions in a
/// global layer, at most `window_size` in a local one; masked scores are
/// not counted), and the vocabulary projection when `logits`.
pub fn forward_flops_per_token(config: &GptNeoConfig, t: usize, logits: bool) -> f64 {
    let d = config.hidden_size as f64;
    let ffn = config.inner_size() as f64;
    let types = config.layer_types();
    let mut flops = 0.0;
    for kind in types.iter().take(config.num_layers) {
        flops += 2.0 * (4.0 * d * d + 2.0 * d * ffn);
        // Mean number of keys a query sees.
        let keys = (0..t)
            .map(|i| {
                if kind == "local" {
                    (i + 1).min(config.window_size)
                } else {
                    i + 1
                }
            })
            .sum::<usize>() as f64
            / t as f64;
        flops += 2.0 * 2.0 * d * keys;
    }
    if logits {
        flops += 2.0 * d * config.vocab_size as f64;
    }
    flops
}

/// A lake with the shipped sample ingested, tokenized and packed at the
/// quickstart's T = 128, and a randomly initialised one-layer model of
/// `width` saved in it as `bench`; returns its classifier rows [V, width].
fn sample_lake(width: usize) -> Result<(tempfile::TempDir, Ctx, Tensor)> {
    let (dir, ctx) = temp_ctx()?;
    stages::run_pairs(
        &ctx,
        "ingest",
        &[
            ("dataset", "b"),
            ("train", "data/tinystories_train_sample.txt"),
            ("validation", "data/tinystories_val_sample.txt"),
        ],
    )?;
    stages::run_pairs(&ctx, "tokenize", &[("dataset", "b"), ("tokenizer", "gpt2")])?;
    stages::run_pairs(
        &ctx,
        "pack",
        &[("dataset", "b"), ("T", "128"), ("mode", "concat")],
    )?;
    let config = GptNeoConfig::grid(1, width, 16, 50257, 2048);
    let w = init_weights(&config, 0, &Device::Cpu)?;
    let state = serde_json::json!({"global_step": 0});
    crate::checkpoint::save_dir(&ctx.lake, "weights/bench", &config, &w, &[], &state)?;
    let classifier = w
        .get("transformer.wte.weight")
        .cloned()
        .ok_or_else(|| Error::invalid("the bench model has no embedding"))?;
    Ok((dir, ctx, classifier))
}

/// Hidden states of `rows` samples: standard normal values (the output
/// layer's time does not depend on them; the stage's own run above uses
/// the real ones).
fn bench_hidden(rows: usize, width: usize) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, (rows, width), &Device::Cpu).ctx("hidden states")
}

/// The sample count a stage's summary states (`over N samples`).
fn sample_count(summary: &str) -> Result<u64> {
    summary
        .split(" over ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::invalid(format!("no sample count in: {summary}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(what: &str, pairs: &[(&str, &str)]) -> String {
        let opts = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        run(what, &opts).unwrap_err().to_string()
    }

    #[test]
    fn unknown_and_malformed_options_are_refused_naming_them() {
        assert_eq!(
            err("eval", &[("widht", "3")]),
            "bench eval: option widht: unknown; valid keys: batch, reps, width"
        );
        assert!(err("nope", &[]).starts_with("unknown benchmark 'nope'; benchmarks: data, model,"));
        // Every listed benchmark reaches its own options (a malformed number
        // is refused before anything runs).
        let first_number = [
            ("data", "mb"),
            ("model", "depth"),
            ("collect", "depth"),
            ("eval", "width"),
            ("decide", "width"),
            ("analyze", "classes"),
            ("correlate", "models"),
            ("attention", "batch"),
            ("epilogues", "rows"),
        ];
        assert_eq!(first_number.len(), BENCHES.len());
        for (what, key) in first_number {
            assert_eq!(
                err(what, &[(key, "x")]),
                format!("bench {what}: option {key}: 'x' is not a non-negative integer")
            );
        }
    }
}
