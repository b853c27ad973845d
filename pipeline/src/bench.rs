//! Benchmarks of the stages that touch every token or every class pair,
//! run through the real stages on real or full-scale synthetic inputs
//! (`pipeline bench data|model|collect|eval|decide|analyze`). Figures are printed as
//! text; the README's performance section quotes them.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use candle_core::{Device, Tensor};
use lc_lake::artifact::{Artifact, Provenance};
use lc_lake::lake::Lake;
use lc_metrics::ClassStats;

use crate::error::{Context, Error, Result};
use crate::stages::{self, Ctx};
use lc_models::{CausalLm, GptNeo, GptNeoConfig, init_weights, loss};

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

/// ingest + tokenize + pack on `source` replicated to at least `mb` MB.
pub fn data(source: &str, tokenizer: &str, mb: usize) -> Result<String> {
    let (dir, ctx) = temp_ctx()?;
    let text = std::fs::read(source).ctx(source)?;
    let path = dir.path().join("corpus.txt");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).ctx("corpus")?);
    let mut written = 0usize;
    while written < mb << 20 {
        f.write_all(&text).ctx("corpus")?;
        if !text.ends_with(b"\n") {
            f.write_all(b"\n").ctx("corpus")?;
        }
        f.write_all(b"<|endoftext|>\n").ctx("corpus")?;
        written += text.len() + 15;
    }
    drop(f);
    let bytes = std::fs::metadata(&path).ctx("corpus")?.len() as f64;
    let corpus = path.to_string_lossy().to_string();
    let (_, t_ingest) = timed(|| stages::run_pairs(&ctx, "ingest", &[("dataset", "b"), ("train", &corpus)]))?;
    let (_, t_tok) =
        timed(|| stages::run_pairs(&ctx, "tokenize", &[("dataset", "b"), ("tokenizer", tokenizer)]))?;
    let (_, t_pack) = timed(|| {
        stages::run_pairs(
            &ctx,
            "pack",
            &[("dataset", "b"), ("T", "2048"), ("mode", "hf"), ("shards", "2")],
        )
    })?;
    let mbs = |t: f64| bytes / 1e6 / t;
    let total = t_ingest + t_tok + t_pack;
    Ok(format!(
        "data: {:.1} MB of text ({} x {})\n  ingest   {t_ingest:6.2} s  {:7.1} MB/s\n  tokenize {t_tok:6.2} s  {:7.1} MB/s\n  pack     {t_pack:6.2} s  {:7.1} MB/s\n  end to end {total:6.2} s  {:7.1} MB/s",
        bytes / 1e6,
        source,
        (written / text.len().max(1)),
        mbs(t_ingest),
        mbs(t_tok),
        mbs(t_pack),
        mbs(total)
    ))
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

/// Forward (with logits) and training tokens/s of a randomly initialised
/// model on random token ids.
pub fn model(depth: usize, width: usize, t: usize, batch: usize, steps: usize) -> Result<String> {
    let dev = Device::Cpu;
    let config = GptNeoConfig::grid(depth, width, 16, 50257, t.max(2048));
    let (net, vars) = GptNeo::trainable(config.clone(), 0, &dev, "bench")?;
    let mut opt = lc_models::optim::AdamW::new(
        vars,
        lc_models::optim::AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let mut s = 7u64;
    let ids: Vec<u32> = (0..batch * t)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % 50257) as u32
        })
        .collect();
    let labels: Vec<u32> = ids.chunks(t).flat_map(|r| r[1..].to_vec()).collect();
    let x = Tensor::from_vec(ids, (batch, t), &dev).ctx("batch")?;
    let forward = |train: bool| -> Result<Tensor> {
        let h = net.forward(&x, &[depth], train)?.remove(0);
        let h = h
            .narrow(1, 0, t - 1)
            .and_then(|h| h.reshape((batch * (t - 1), width)))
            .ctx("positions")?;
        Ok(net.logits(&h)?)
    };
    forward(false)?;
    let (_, tf) = timed(|| {
        for _ in 0..steps {
            forward(false)?;
        }
        Ok(())
    })?;
    let (_, tt) = timed(|| {
        for _ in 0..steps {
            // As the train stage computes it: output layer fused into the loss.
            let h = net.forward(&x, &[depth], true)?.remove(0);
            let h = h
                .narrow(1, 0, t - 1)
                .and_then(|h| h.reshape((batch * (t - 1), width)))
                .ctx("positions")?;
            let l = loss::linear_cross_entropy(&h, net.classifier(), &labels)?;
            let g = l.backward().ctx("backward")?;
            opt.step(&g, 1e-4, 1.0)?;
        }
        Ok(())
    })?;
    let tokens = (steps * batch * t) as f64;
    let peak = peak_gemm_gflops();
    let fwd = forward_flops_per_token(&config, t, true);
    // A training step is a forward and a backward of twice its cost.
    let (gf, gt) = (fwd * tokens / tf / 1e9, 3.0 * fwd * tokens / tt / 1e9);
    Ok(format!(
        "model {depth}x{width} (T = {t}, batch {batch}, {} params), as a share of the in-process peak GEMM ({peak:.0} GFLOP/s):\n  \
         forward with logits {:.1}% ({gf:.1} GFLOP/s, {:.0} tokens/s on this machine)\n  \
         training step {:.1}% ({gt:.1} GFLOP/s, {:.0} tokens/s on this machine)",
        net.n_params(),
        100.0 * gf / peak,
        tokens / tf,
        100.0 * gt / peak,
        tokens / tt
    ))
}

/// Collection throughput on the shipped sample packed at T = 2048.
pub fn collect(
    depth: usize,
    width: usize,
    train_text: &str,
    tokenizer: &str,
    batch: usize,
) -> Result<String> {
    let (_dir, ctx) = temp_ctx()?;
    stages::run_pairs(&ctx, "ingest", &[("dataset", "b"), ("train", train_text)])?;
    stages::run_pairs(&ctx, "tokenize", &[("dataset", "b"), ("tokenizer", tokenizer)])?;
    stages::run_pairs(
        &ctx,
        "pack",
        &[("dataset", "b"), ("T", "2048"), ("mode", "concat")],
    )?;
    let config = GptNeoConfig::grid(depth, width, 16, 50257, 2048);
    let w = init_weights(&config, 0, &Device::Cpu)?;
    let state = serde_json::json!({"global_step": 0});
    crate::checkpoint::save_dir(&ctx.lake, "weights/bench", &config, &w, &[], &state)?;
    let b = batch.to_string();
    let out = stages::run_pairs(
        &ctx,
        "collect",
        &[("model", "bench"), ("dataset", "b"), ("batch", &b)],
    )?;
    let m = ctx
        .lake
        .manifest(&Artifact::new(
            "class_stats",
            &[
                ("model", "bench"),
                ("split", "train"),
                ("layer", &depth.to_string()),
            ],
        )?)?
        .ok_or_else(|| Error::invalid("no class_stats written"))?;
    let rate = m
        .extra
        .get("tokens_per_s")
        .and_then(|v| v.as_f64())
        .unwrap_or(f64::NAN);
    let share = m
        .extra
        .get("accumulate_share")
        .and_then(|v| v.as_f64())
        .unwrap_or(f64::NAN);
    let peak = peak_gemm_gflops();
    let gf = forward_flops_per_token(&config, 2048, false) * rate / 1e9;
    Ok(format!(
        "collect {depth}x{width} (T = 2048, batch {batch}): {:.1}% of the in-process peak GEMM ({peak:.0} GFLOP/s): \
         {gf:.1} GFLOP/s, {rate:.0} tokens/s on this machine, {:.1}% of the time accumulating\n  ({out})",
        100.0 * gf / peak,
        100.0 * share
    ))
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

/// `eval` on the shipped validation sample (T = 128): the stage's
/// tokens/s, and its output layer alone (one batch of rows, `reps` times)
/// as a share of the in-process f32 GEMM peak.
pub fn eval(width: usize, batch: usize, reps: usize) -> Result<String> {
    let (_dir, ctx, classifier) = sample_lake(width)?;
    let b = batch.to_string();
    let (out, secs) = timed(|| {
        stages::run_pairs(
            &ctx,
            "eval",
            &[("model", "bench"), ("dataset", "b"), ("batch", &b)],
        )
    })?;
    let samples = sample_count(&out)?;
    let rows = batch * 127;
    let h = bench_hidden(rows, width)?;
    let w = classifier;
    let labels: Vec<u32> = (0..rows).map(|r| (r * 7919 % 50257) as u32).collect();
    lc_models::output_layer::loss_and_argmax(&h, &w, &labels)?;
    let (_, t) = timed(|| {
        for _ in 0..reps {
            lc_models::output_layer::loss_and_argmax(&h, &w, &labels)?;
        }
        Ok(())
    })?;
    let peak = peak_gemm_gflops();
    let flops = 2.0 * (rows * width * 50257) as f64 * reps as f64;
    let gf = flops / t / 1e9;
    let layer_share = (2.0 * (width * 50257) as f64 * samples as f64 / 1e9 / gf) / secs;
    Ok(format!(
        "eval 1x{width} on the validation sample (T = 128, batch {batch}, V = 50257): \
         {:.0} tokens/s, {secs:.2} s for {samples} samples ({:.0}% of it the output layer);\n  \
         output layer (loss + argmax, {rows} rows): {:.1}% of the in-process f32 GEMM peak \
         ({gf:.1} of {peak:.0} GFLOP/s)",
        samples as f64 / secs,
        100.0 * layer_share,
        100.0 * gf / peak
    ))
}

/// `decide` on the shipped validation sample (T = 128) after collecting
/// the class means on its train split: the stage's tokens/s, and its two
/// decisions alone (one batch of rows, `reps` times) as a share of the
/// in-process GEMM peak of the precision (f64 by default).
pub fn decide(width: usize, batch: usize, precision: &str, reps: usize) -> Result<String> {
    let (_dir, ctx, classifier) = sample_lake(width)?;
    stages::run_pairs(
        &ctx,
        "collect",
        &[("model", "bench"), ("dataset", "b"), ("batch", "8")],
    )?;
    let b = batch.to_string();
    let (out, secs) = timed(|| {
        stages::run_pairs(
            &ctx,
            "decide",
            &[
                ("model", "bench"),
                ("dataset", "b"),
                ("batch", &b),
                ("precision", precision),
            ],
        )
    })?;
    let samples = sample_count(&out)?;
    let classes: usize = out
        .split("|V'| = ")
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::invalid(format!("decide said: {out}")))?;
    let dt = match precision {
        "f32" => candle_core::DType::F32,
        _ => candle_core::DType::F64,
    };
    let rows = batch * 127;
    let h = bench_hidden(rows, width)?.to_dtype(dt).ctx("hidden states")?;
    let w = classifier
        .narrow(0, 0, classes)
        .and_then(|w| w.to_dtype(dt))
        .ctx("class rows")?;
    let offset = w.sqr().and_then(|s| s.sum(1)).ctx("offsets")?;
    let both = || -> Result<()> {
        lc_models::output_layer::affine_argmax(&h, &w, 1.0, None)?;
        lc_models::output_layer::affine_argmax(&h, &w, 2.0, Some(&offset))?;
        Ok(())
    };
    both()?;
    let (_, t) = timed(|| {
        for _ in 0..reps {
            both()?;
        }
        Ok(())
    })?;
    let peak = if precision == "f32" {
        peak_gemm_gflops()
    } else {
        peak_gemm_gflops_f64()
    };
    let flops = 2.0 * 2.0 * (rows * width * classes) as f64 * reps as f64;
    let gf = flops / t / 1e9;
    let layer_share = (4.0 * (width * classes) as f64 * samples as f64 / 1e9 / gf) / secs;
    Ok(format!(
        "decide 1x{width} on the validation sample (T = 128, batch {batch}, |V'| = {classes}, {precision}): \
         {:.0} tokens/s, {secs:.2} s for {samples} samples ({:.0}% of it the two decisions);\n  \
         both decisions ({rows} rows): {:.1}% of the in-process {precision} GEMM peak ({gf:.1} of {peak:.0} GFLOP/s)",
        samples as f64 / secs,
        100.0 * layer_share,
        100.0 * gf / peak
    ))
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

/// Synthetic class statistics of `c` classes in `d` dimensions with
/// Zipf-like counts, as a `class_stats` artifact.
pub fn synthetic_stats(lake: &Lake, model: &str, c: usize, d: usize) -> Result<()> {
    let mut s = 99u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    let mut st = ClassStats::new(d);
    let mut mean = vec![0f64; d];
    for i in 0..c {
        for x in mean.iter_mut() {
            *x = next();
        }
        let count = 1 + (1_000_000 / (i + 1)) as u64;
        st.merge_one(i as u32, count, &mean, count as f64 * (0.5 + next().abs()));
    }
    let a = Artifact::new(
        "class_stats",
        &[("model", model), ("split", "train"), ("layer", "1")],
    )?;
    lake.write_artifact(&a, &[crate::stats::to_batch(&st)?], Provenance::new("bench"))?;
    Ok(())
}

/// The analyze stage on synthetic statistics of `c` classes in `d` dims,
/// run as a separate `pipeline` process so its peak memory is its own.
pub fn analyze(c: usize, d: usize, tile: usize, precision: &str) -> Result<String> {
    let (dir, ctx) = temp_ctx()?;
    synthetic_stats(&ctx.lake, "synthetic", c, d)?;
    let exe = std::env::current_exe().ctx("locating the pipeline binary")?;
    let t = Instant::now();
    let out = std::process::Command::new(exe)
        .arg("--lake")
        .arg(dir.path().join("lake"))
        .args(["-q", "run", "stage=analyze", "model=synthetic", "layer=1"])
        .arg(format!("tile={tile}"))
        .arg(format!("precision={precision}"))
        .output()
        .ctx("running analyze")?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(Error::invalid(format!(
            "analyze failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let pairs = (c * (c - 1) / 2) as f64;
    // The anchor, in this process on the same pool: the Gram products alone.
    let floor = lc_metrics::tiles::gram_floor(c, d, tile, precision == "f32");
    let gflops = (c as f64) * (c as f64 + tile as f64) * d as f64 / floor / 1e9;
    Ok(format!(
        "analyze C = {c}, d = {d}, tile {tile}, {precision}: {:.2}x the GEMM floor\n  \
         stage {secs:.2} s (process start, reading, writing), {:.1} M pairs/s; \
         floor {floor:.2} s: the same upper-triangle Gram tiles alone, {gflops:.0} GFLOP/s, on this machine\n  {}",
        secs / floor,
        pairs / secs / 1e6,
        String::from_utf8_lossy(&out.stdout).trim()
    ))
}

/// Peak resident memory of the finished child processes, in MiB.
fn children_peak_rss_mib() -> f64 {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_CHILDREN is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    ru.ru_maxrss as f64 / 1024.0
}

/// `correlate` over an imported table of `models` x `metrics` random values
/// with `perms` permutations (and 1,000 bootstrap resamples), in a separate
/// process so its time and peak memory are its own.
pub fn correlate(models: usize, metrics: usize, perms: u64) -> Result<String> {
    let (dir, ctx) = temp_ctx()?;
    let mut csv = String::from("model,val_loss");
    for m in 0..metrics {
        csv.push_str(&format!(",m{m}"));
    }
    csv.push('\n');
    let mut s = 5u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    for i in 0..models {
        let loss = 1.5 + next();
        csv.push_str(&format!(
            "{:02}x{:04}_01d{}@0,{loss}",
            1 + i % 12,
            64 * (1 + i % 16),
            i
        ));
        for m in 0..metrics {
            // Metric m correlates with the loss more as m grows.
            csv.push_str(&format!(",{}", m as f64 * loss / metrics as f64 + next()));
        }
        csv.push('\n');
    }
    let path = dir.path().join("metrics.csv");
    std::fs::write(&path, csv).ctx("writing the benchmark table")?;
    stages::run_pairs(
        &ctx,
        "import",
        &[("input", &path.to_string_lossy()), ("name", "bench")],
    )?;
    let exe = std::env::current_exe().ctx("locating the pipeline binary")?;
    let t = Instant::now();
    let out = std::process::Command::new(exe)
        .arg("--lake")
        .arg(dir.path().join("lake"))
        .args(["-q", "run", "stage=correlate", "source=imported:bench"])
        .arg(format!("permutations={perms}"))
        .output()
        .ctx("running correlate")?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(Error::invalid(format!(
            "correlate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(format!(
        "correlate {models} models x {metrics} metrics, {perms} permutations + 1000 bootstrap resamples: {secs:.2} s for the whole stage (process start, SQL, writing), peak RSS {:.0} MiB",
        children_peak_rss_mib()
    ))
}

/// Inference attention on a CUDA device: block attention from device
/// primitives against the fused kernel of `attention=fused`, on the same
/// random bf16 heads ([B, T, H * D] projections viewed as [B, H, T, D], as
/// the models make them): time per call, useful TFLOP/s (4 D FLOPs per
/// visible query-key pair) and the largest difference of their outputs,
/// beside the bound both paths' bf16 roundings allow: each rounds the
/// probabilities and the output once (relative 2^-9 each, the
/// probabilities summing to 1), so each is within 2^-8 max|v| of the exact
/// attention and they are within 2^-7 max|v| of each other.
pub fn attention(
    batch: usize,
    heads: usize,
    t: usize,
    dim: usize,
    window: usize,
    device: &str,
    reps: usize,
) -> Result<String> {
    use lc_kernels::flash_attention;
    use lc_models::layers::{self, AttentionKernel};
    let dev = lc_models::device(device)?;
    if dev.is_cpu() {
        return Err(Error::invalid(
            "bench attention compares the two CUDA attention paths: give device=cuda[:N] (a CUDA build on a GPU machine)",
        ));
    }
    let window = (window > 0).then_some(window);
    let scale = 1.0 / (dim as f64).sqrt();
    let measure = || -> candle_core::Result<(f64, f64, f32, f32)> {
        let heads_of = |seed: u64| -> candle_core::Result<Tensor> {
            dev.set_seed(seed)?;
            let x = Tensor::randn(0f32, 1.0, (batch, t, heads * dim), &dev)?
                .to_dtype(candle_core::DType::BF16)?;
            layers::heads(&x, heads, dim)
        };
        let (q, k, v) = (heads_of(1)?, heads_of(2)?, heads_of(3)?);
        let time = |run: &dyn Fn() -> candle_core::Result<Tensor>| device_time(&dev, reps, run);
        // Block attention as the models call it (casts, head copies and the
        // output's transpose included), and the kernel alone, which must
        // take these heads rather than fall back.
        let (blocks, t_blocks) =
            time(&|| layers::attend(&q, &k, &v, Some(scale), window, AttentionKernel::Blocks))?;
        let (fused, t_fused) = time(&|| {
            flash_attention::attend(&q, &k, &v, scale, window)?.ok_or_else(|| {
                candle_core::Error::Msg("the fused kernel cannot take these heads (see the log)".into())
            })
        })?;
        let f32s = |x: &Tensor| x.to_dtype(candle_core::DType::F32);
        let diff = (f32s(&fused)? - f32s(&blocks)?)?.abs()?.max_all()?.to_scalar()?;
        let max_v = f32s(&v)?.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok((t_blocks, t_fused, diff, max_v / 128.0))
    };
    let (t_blocks, t_fused, diff, bound) = measure().ctx("bench attention")?;
    let pairs: usize = (0..t)
        .map(|i| window.map_or(i + 1, |w| (i + 1).min(w)))
        .sum::<usize>()
        * batch
        * heads;
    let tflops = |secs: f64| 4.0 * dim as f64 * pairs as f64 / secs / 1e12;
    Ok(format!(
        "attention bf16, batch {batch}, {heads} heads of {dim}, T = {t}, window {window:?}: fused {:.3} ms ({:.1} TFLOP/s), \
         blocks {:.3} ms ({:.1} TFLOP/s): fused takes {:.2}x the time of blocks; max |fused - blocks| {diff:.2e} (bf16 bound {bound:.2e})",
        t_fused * 1e3,
        tflops(t_fused),
        t_blocks * 1e3,
        tflops(t_blocks),
        t_fused / t_blocks
    ))
}

/// The fused bias epilogues of GPT-2/GPT-Neo blocks on a CUDA device
/// (`bias_gelu` on the MLP's [rows, 4d], `bias_residual` on [rows, d])
/// against the unfused passes the CPU runs (bias add, then candle's GELU or
/// add): time per call, and the fused kernels' bandwidth as a share of a
/// plain device copy's measured in the same run (the floor of any pass
/// that reads and writes the same bytes). Prints the largest difference
/// beside one rounding of the dtype (the unfused paths round y + b once
/// more).
pub fn epilogues(rows: usize, width: usize, dtype: &str, device: &str, reps: usize) -> Result<String> {
    use lc_kernels::bias_add::{bias_add, bias_gelu, bias_residual};
    let dev = lc_models::device(device)?;
    if dev.is_cpu() {
        return Err(Error::invalid(
            "bench epilogues compares the CUDA bias epilogues: give device=cuda[:N] (a CUDA build on a GPU machine)",
        ));
    }
    let dt = lc_models::dtype(dtype)?;
    let measure = || -> candle_core::Result<String> {
        let rand = |shape: &[usize], seed: u64| -> candle_core::Result<Tensor> {
            dev.set_seed(seed)?;
            Tensor::randn(0f32, 1.0, shape, &dev)?.to_dtype(dt)
        };
        let time = |run: &dyn Fn() -> candle_core::Result<Tensor>| device_time(&dev, reps, run);
        let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            let f = |x: &Tensor| x.to_dtype(candle_core::DType::F32);
            (f(a)? - f(b)?)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        let bytes = dt.size_in_bytes() as f64;
        let mut lines = Vec::new();
        // The copy floor: read and write rows x 4d elements once.
        let y4 = rand(&[rows, 4 * width], 1)?;
        let (_, t_copy) = time(&|| y4.copy())?;
        let copy_gbs = 2.0 * bytes * y4.elem_count() as f64 / t_copy / 1e9;
        let b4 = rand(&[4 * width], 2)?;
        let (unfused, t_unfused) = time(&|| bias_add(&y4, &b4)?.gelu())?;
        let (fused, t_fused) = time(&|| bias_gelu(&y4, &b4))?;
        let gbs = 2.0 * bytes * y4.elem_count() as f64 / t_fused / 1e9;
        lines.push(format!(
            "bias + GELU [{rows}, {}]: fused {:.3} ms ({gbs:.0} GB/s, {:.0}% of the copy's), unfused {:.3} ms: {:.2}x; max diff {:.2e}",
            4 * width,
            t_fused * 1e3,
            100.0 * gbs / copy_gbs,
            t_unfused * 1e3,
            t_unfused / t_fused,
            max_diff(&fused, &unfused)?
        ));
        let (y, x, b) = (
            rand(&[rows, width], 3)?,
            rand(&[rows, width], 4)?,
            rand(&[width], 5)?,
        );
        let (unfused, t_unfused) = time(&|| &x + bias_add(&y, &b)?)?;
        let (fused, t_fused) = time(&|| bias_residual(&x, &y, &b))?;
        let gbs = 3.0 * bytes * y.elem_count() as f64 / t_fused / 1e9;
        lines.push(format!(
            "bias + residual [{rows}, {width}]: fused {:.3} ms ({gbs:.0} GB/s, {:.0}% of the copy's), unfused {:.3} ms: {:.2}x; max diff {:.2e}",
            t_fused * 1e3,
            100.0 * gbs / copy_gbs,
            t_unfused * 1e3,
            t_unfused / t_fused,
            max_diff(&fused, &unfused)?
        ));
        lines.push(format!(
            "copy floor: {copy_gbs:.0} GB/s on this device ({dtype}, one unit of rounding {:.1e})",
            match dt {
                candle_core::DType::BF16 => 2f64.powi(-8),
                _ => 2f64.powi(-23),
            }
        ));
        Ok(lines.join("\n"))
    };
    measure().ctx("bench epilogues")
}

/// Options of `pipeline bench`, as key=value pairs.
pub fn run(what: &str, opts: &BTreeMap<String, String>) -> Result<String> {
    let get = |k: &str, d: &str| opts.get(k).cloned().unwrap_or_else(|| d.to_string());
    let num = |k: &str, d: usize| -> Result<usize> {
        get(k, &d.to_string())
            .parse()
            .map_err(|_| Error::invalid(format!("bench option {k} must be a number")))
    };
    match what {
        "data" => data(
            &get("source", "data/tinystories_train_sample.txt"),
            &get("tokenizer", "gpt2"),
            num("mb", 100)?,
        ),
        "model" => model(
            num("depth", 1)?,
            num("width", 64)?,
            num("T", 2048)?,
            num("batch", 2)?,
            num("steps", 3)?,
        ),
        "collect" => collect(
            num("depth", 1)?,
            num("width", 64)?,
            &get("train", "data/tinystories_train_sample.txt"),
            &get("tokenizer", "gpt2"),
            num("batch", 2)?,
        ),
        "eval" => eval(num("width", 32)?, num("batch", 4)?, num("reps", 20)?),
        "decide" => decide(
            num("width", 32)?,
            num("batch", 8)?,
            &get("precision", "f64"),
            num("reps", 10)?,
        ),
        "analyze" => analyze(
            num("classes", 29233)?,
            num("dim", 1024)?,
            num("tile", 512)?,
            &get("precision", "f64"),
        ),
        "correlate" => correlate(
            num("models", 230)?,
            num("metrics", 7)?,
            num("permutations", 10_000)? as u64,
        ),
        "attention" => attention(
            num("batch", 8)?,
            num("heads", 16)?,
            num("T", 2048)?,
            num("dim", 64)?,
            num("window", 0)?,
            &get("device", "cuda"),
            num("reps", 20)?,
        ),
        "epilogues" => epilogues(
            num("rows", 16384)?,
            num("width", 1024)?,
            &get("dtype", "bf16"),
            &get("device", "cuda"),
            num("reps", 20)?,
        ),
        other => Err(Error::invalid(format!(
            "unknown benchmark '{other}'; benchmarks: data, model, collect, eval, decide, analyze, correlate, attention, epilogues"
        ))),
    }
}
