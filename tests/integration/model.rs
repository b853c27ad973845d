//! GPT-Neo in candle: numerical identity with transformers, gradients,
//! checkpoints, training, evaluation and grids.

use std::collections::HashMap;

use arrow::array::AsArray;
use arrow::datatypes::Float64Type;
use candle_core::{DType, Device, Tensor, Var};
use lc_lake::artifact::Artifact;
use lc_models::AttentionKernel::Blocks;
use lc_models::{CausalLm, GptNeo, GptNeoConfig, init_weights, loss, parameter_names};
use pipeline::checkpoint::{ModelRef, save_dir};

use crate::common::{TestLake, repo, tiny};

fn fixture_dir() -> String {
    repo()
        .join("tests/fixtures/gpt_neo_tiny")
        .to_string_lossy()
        .to_string()
}

/// max |a - b| over all elements of two f32 tensors of one shape.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The forward pass equals Hugging Face transformers' on a random 3-layer
/// model with a local window shorter than the sequence: every hidden state
/// and the logits, to 1e-4 absolute (f32; observed max difference ~1e-6).
#[test]
fn forward_matches_transformers() {
    let lake = lc_lake::lake::Lake::open("memory://").unwrap();
    let m = ModelRef::resolve(&lake, &fixture_dir()).unwrap();
    assert_eq!(m.id, "gpt_neo_tiny");
    let model = m.load(&Device::Cpu, DType::F32).unwrap();
    let expected = candle_core::safetensors::load(
        repo().join("tests/fixtures/gpt_neo_tiny/expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
    let layers: Vec<usize> = (0..=3).collect();
    let hs = model.hidden_states(&ids, &layers, Blocks).unwrap();
    for (l, h) in hs.iter().enumerate() {
        let diff = max_abs_diff(h, &expected[&format!("hidden_{l}")]);
        assert!(diff < 1e-4, "hidden state {l}: max |diff| {diff}");
    }
    let logits = model.logits(&hs[3]).unwrap();
    let diff = max_abs_diff(&logits, &expected["logits"]);
    assert!(diff < 1e-4, "logits: max |diff| {diff}");
    // The training formulation (primitive ops) gives the same numbers.
    let lc_models::config::ArchConfig::GptNeo(config) = m.config().unwrap() else {
        panic!("not GPT-Neo")
    };
    let neo = GptNeo::from_tensors(config, &m.tensors(&Device::Cpu, DType::F32).unwrap(), "t").unwrap();
    let ht = neo.forward(&ids, &[3], true).unwrap().remove(0);
    let diff = max_abs_diff(&ht, &hs[3]);
    assert!(diff < 1e-5, "train-mode forward differs by {diff}");
}

/// Autograd gradients of the loss against central finite differences on a
/// micro model in f64 (relative agreement 1e-5 or absolute 1e-8).
#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let mut config = GptNeoConfig::grid(2, 8, 2, 13, 16);
    config.window_size = 3;
    config.initializer_range = 0.3;
    let init = lc_models::to_dtype(&init_weights(&config, 5, &dev).unwrap(), DType::F64).unwrap();
    let names = parameter_names(&config);
    let ids: Vec<u32> = vec![1, 5, 7, 2, 12, 3, 3, 8, 0, 4, 9, 11];
    let (b, t) = (2, 6);
    let labels: Vec<u32> = ids.chunks(t).flat_map(|r| r[1..].to_vec()).collect();
    let loss_of = |tensors: &HashMap<String, Tensor>| -> Tensor {
        let model = GptNeo::from_tensors(config.clone(), tensors, "micro").unwrap();
        let x = Tensor::from_vec(ids.clone(), (b, t), &dev).unwrap();
        let h = model.forward(&x, &[2], true).unwrap().remove(0);
        let h = h.narrow(1, 0, t - 1).unwrap().reshape((b * (t - 1), 8)).unwrap();
        loss::cross_entropy(&model.logits(&h).unwrap(), &labels).unwrap()
    };
    let vars: HashMap<String, Var> = names
        .iter()
        .map(|n| (n.clone(), Var::from_tensor(&init[n]).unwrap()))
        .collect();
    let as_tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let grads = loss_of(&as_tensors).backward().unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    for name in [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.attn.attention.q_proj.weight",
        "transformer.h.1.attn.attention.k_proj.weight",
        "transformer.h.1.attn.attention.out_proj.bias",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.bias",
        "transformer.ln_f.bias",
    ] {
        let g = grads
            .get(vars[name].as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = init[name].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for idx in [0, base.len() / 2, base.len() - 1] {
            let numeric = {
                let f = |delta: f64| {
                    let mut v = base.clone();
                    v[idx] += delta;
                    let mut ts = init.clone();
                    ts.insert(
                        name.to_string(),
                        Tensor::from_vec(v, init[name].shape(), &dev).unwrap(),
                    );
                    loss_of(&ts).to_scalar::<f64>().unwrap()
                };
                (f(eps) - f(-eps)) / (2.0 * eps)
            };
            let err = (g[idx] - numeric).abs();
            assert!(
                err < 1e-8 || err < 1e-5 * numeric.abs(),
                "{name}[{idx}]: autograd {} vs numeric {numeric}",
                g[idx]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 27);
}

/// Saving and loading gives the same tensors bit for bit, and the same
/// forward; saved directories resolve by path like downloaded ones.
#[test]
fn saved_models_load_back_bit_identically() {
    let tl = TestLake::new();
    let config = GptNeoConfig::grid(2, 16, 4, 50257, 64);
    let w = init_weights(&config, 3, &Device::Cpu).unwrap();
    let state = serde_json::json!({"global_step": 7});
    save_dir(tl.lake(), "weights/m", &config, &w, &[], &state).unwrap();
    let m = ModelRef::resolve(tl.lake(), "m").unwrap();
    assert!(m.in_lake);
    let back = m.tensors(&Device::Cpu, DType::F32).unwrap();
    assert_eq!(back.len(), w.len(), "tied lm_head must not be saved");
    for (k, v) in &w {
        let a = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = back[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{k}");
    }
    assert_eq!(m.config().unwrap(), lc_models::config::ArchConfig::GptNeo(config));
    // The same directory on the local file system, addressed by path.
    let dir = tl.dir.path().join("lake/weights/m");
    let by_path = ModelRef::resolve(tl.lake(), dir.to_str().unwrap()).unwrap();
    assert!(!by_path.in_lake);
    let x = Tensor::new(&[[1u32, 50256, 7, 9]], &Device::Cpu).unwrap();
    let h1 = m
        .load(&Device::Cpu, DType::F32)
        .unwrap()
        .hidden_states(&x, &[2], Blocks)
        .unwrap()
        .remove(0);
    let h2 = by_path
        .load(&Device::Cpu, DType::F32)
        .unwrap()
        .hidden_states(&x, &[2], Blocks)
        .unwrap()
        .remove(0);
    assert_eq!(
        h1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        h2.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn unsupported_or_inconsistent_checkpoints_are_refused() {
    let tl = TestLake::new();
    let src = repo().join("tests/fixtures/gpt_neo_tiny");
    let copy = |name: &str, edit: &dyn Fn(&str) -> String, drop_weights: bool| -> String {
        let d = tl.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
        std::fs::write(d.join("config.json"), edit(&cfg)).unwrap();
        if !drop_weights {
            std::fs::copy(src.join("model.safetensors"), d.join("model.safetensors")).unwrap();
        }
        d.to_string_lossy().to_string()
    };
    let bert = copy("bertish", &|c| c.replace("\"gpt_neo\"", "\"bert\""), false);
    let err = ModelRef::resolve(tl.lake(), &bert)
        .unwrap()
        .load(&Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model_type 'bert' is not supported"), "{err}");
    let wide = copy(
        "wide",
        &|c| c.replace("\"hidden_size\": 32", "\"hidden_size\": 64"),
        false,
    );
    let err = ModelRef::resolve(tl.lake(), &wide)
        .unwrap()
        .load(&Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("has shape") && err.contains("config implies"),
        "{err}"
    );
    let empty = copy("noweights", &|c| c.to_string(), true);
    let err = ModelRef::resolve(tl.lake(), &empty)
        .unwrap()
        .load(&Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no model.safetensors"), "{err}");
    let err = ModelRef::resolve(tl.lake(), "no_such_model")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not found"), "{err}");
    let err = ModelRef::resolve(tl.lake(), &format!("{}@3", fixture_dir()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("checkpoint index 3 does not exist"), "{err}");
}

/// A tiny model really learns: its validation loss ends far below the
/// cross-entropy of the train-set unigram distribution on the same text.
#[test]
fn training_learns_and_eval_reports_it() {
    let guard = tiny();
    let tl = &*guard;
    let out = tl.run("eval", &[("model", "tiny")]);
    assert!(out.contains("tiny@0") && out.contains("tiny@1"), "{out}");
    // Unigram baseline with add-half smoothing, from the vocab tables.
    let sql = pipeline::sql::Sql::open(tl.lake()).unwrap();
    let q = "WITH t AS (SELECT token_id, count FROM vocab WHERE dataset = 'small' AND split = 'train'),
                  v AS (SELECT token_id, count FROM vocab WHERE dataset = 'small' AND split = 'validation'),
                  n AS (SELECT CAST(SUM(count) AS DOUBLE) AS n FROM t)
             SELECT SUM(CAST(v.count AS DOUBLE) * -ln((CAST(t.count AS DOUBLE) + 0.5) / (n.n + 0.5 * 50257))) / SUM(CAST(v.count AS DOUBLE))
             FROM v JOIN t USING (token_id) CROSS JOIN n";
    let baseline = sql.query(q, false).unwrap()[0]
        .column(0)
        .as_primitive::<Float64Type>()
        .value(0);
    let q = "SELECT val_loss, val_acc, perplexity, epoch, depth, width, n_params FROM models WHERE model = 'tiny@1'";
    let b = &sql.query(q, false).unwrap()[0];
    let val_loss = b.column(0).as_primitive::<Float64Type>().value(0);
    let ppl = b.column(2).as_primitive::<Float64Type>().value(0);
    assert!((ppl - val_loss.exp()).abs() < 1e-9 * ppl);
    assert!(
        val_loss < baseline - 0.4,
        "val_loss {val_loss} vs unigram baseline {baseline}"
    );
    let q0 = "SELECT val_loss FROM models WHERE model = 'tiny@0'";
    let first = sql.query(q0, false).unwrap()[0]
        .column(0)
        .as_primitive::<Float64Type>()
        .value(0);
    assert!(
        val_loss < first,
        "epoch 2 ({val_loss}) should improve on epoch 1 ({first})"
    );
    // The train log is complete: one row per 10 steps plus epoch ends.
    let log = sql
        .query(
            "SELECT MAX(step), MIN(loss), MAX(loss) FROM train_log WHERE model = 'tiny'",
            false,
        )
        .unwrap();
    let max_loss = log[0].column(2).as_primitive::<Float64Type>().value(0);
    let min_loss = log[0].column(1).as_primitive::<Float64Type>().value(0);
    assert!(max_loss > 9.0 && min_loss < 7.0, "{min_loss} .. {max_loss}");
    // Re-running eval changes nothing; loading and evaluating again is identical.
    assert!(tl.run("eval", &[("model", "tiny")]).contains("up to date"));
    let again = tl.run("eval", &[("model", "tiny@1"), ("force", "true")]);
    assert!(again.contains(&format!("{val_loss:.4}")), "{again} vs {val_loss}");
}

/// eval (the fused output layer, which never forms the logits) against
/// the logits formed through candle on the same validation chunks, each row's
/// cross-entropy from them (`loss::row_losses`) and candle's argmax: the
/// loss agrees to 1e-6 relative (f32 products summed in another order) and
/// the accuracy exactly (the trained model has no tie within f32 rounding
/// at its top logit on these samples: checked).
#[test]
fn eval_equals_the_formed_logits() {
    let guard = tiny();
    let tl = &*guard;
    tl.run("eval", &[("model", "tiny@1"), ("force", "true")]);
    let sql = pipeline::sql::Sql::open(tl.lake()).unwrap();
    let b = &sql
        .query(
            "SELECT val_loss, val_acc FROM models WHERE model = 'tiny@1'",
            false,
        )
        .unwrap()[0];
    let (val_loss, val_acc) = (
        b.column(0).as_primitive::<Float64Type>().value(0),
        b.column(1).as_primitive::<Float64Type>().value(0),
    );
    let m = ModelRef::resolve(tl.lake(), "tiny@1").unwrap();
    let model = m.load(&Device::Cpu, DType::F32).unwrap();
    let chunks = pipeline::chunks::Chunks::open(tl.lake(), "small", "validation").unwrap();
    let (t, d, depth) = (chunks.t, model.shape().hidden_size, model.shape().num_layers);
    let (mut loss_sum, mut correct, mut samples, mut close_calls) = (0f64, 0u64, 0u64, 0u64);
    chunks
        .for_each_batch(tl.lake(), 0..chunks.count, 3, |_, ids, b| {
            let labels: Vec<u32> = ids.chunks_exact(t).flat_map(|r| r[1..].iter().copied()).collect();
            let x = Tensor::from_slice(ids, (b, t), &Device::Cpu).unwrap();
            let h = model.hidden_states(&x, &[depth], Blocks).unwrap().remove(0);
            let h = h.narrow(1, 0, t - 1).unwrap().reshape((b * (t - 1), d)).unwrap();
            let logits = model.logits(&h).unwrap();
            let losses: Vec<f32> = loss::row_losses(&logits, &labels).unwrap().to_vec1().unwrap();
            loss_sum += losses.iter().map(|&l| l as f64).sum::<f64>();
            let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
            let argmax: Vec<u32> = logits.argmax(candle_core::D::Minus1).unwrap().to_vec1().unwrap();
            for ((row, &a), &y) in rows.iter().zip(&argmax).zip(&labels) {
                correct += u64::from(a == y);
                let mut top = row.clone();
                top.sort_by(|p, q| q.total_cmp(p));
                close_calls += u64::from(top[0] - top[1] <= 1e-5 * top[0].abs().max(1.0));
            }
            samples += labels.len() as u64;
            Ok(())
        })
        .unwrap();
    assert_eq!(
        close_calls, 0,
        "a near-tie would make the accuracy comparison loose"
    );
    let want_loss = loss_sum / samples as f64;
    assert!(
        (val_loss - want_loss).abs() <= 1e-6 * want_loss,
        "{val_loss} vs {want_loss}"
    );
    assert_eq!(val_acc, correct as f64 / samples as f64);
}

/// eval of a model with Qwen's 152,064-token vocabulary stays in bounded
/// memory: its peak RSS exceeds that of the same model with GPT-2's 50,257
/// tokens by less than 100 MB (the weights differ by 26 MB; forming the
/// logits in 256 MiB row blocks, as eval did before, cost 222 MB more).
/// Each eval is its own process, measured by wait4.
#[test]
fn eval_memory_is_bounded_for_a_large_vocabulary() {
    let guard = tiny();
    let tl = &*guard;
    let peak_kb = |vocab: &str| -> i64 {
        let dir = tl.dir.path().join(format!("model-{vocab}"));
        let dir = dir.to_str().unwrap();
        let made = std::process::Command::new(crate::common::bin())
            .args([
                "-q",
                "make-model",
                "--depth",
                "1",
                "--width",
                "64",
                "--vocab",
                vocab,
                "--out",
                dir,
            ])
            .output()
            .unwrap();
        assert!(made.status.success(), "{made:?}");
        let child = std::process::Command::new(crate::common::bin())
            .args(["--lake", &tl.url(), "-q", "run", "stage=eval"])
            .arg(format!("model={dir}"))
            // 16 x 31 = 496 samples a batch: the old row blocks held 441.
            .args(["dataset=small", "batch=16", "force=true"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // wait4 reaps the child (std's wait would not report its rusage).
        #[allow(clippy::zombie_processes)]
        let child = child;
        let (mut status, mut usage) = (0i32, unsafe { std::mem::zeroed::<libc::rusage>() });
        // SAFETY: waits for our own child and fills the two out-parameters.
        let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
        assert_eq!(pid, child.id() as i32);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "eval of a {vocab}-token model failed"
        );
        usage.ru_maxrss
    };
    let (small, large) = (peak_kb("50257"), peak_kb("152064"));
    assert!(
        large - small < 100_000,
        "peak RSS {small} KB with 50,257 tokens, {large} KB with 152,064"
    );
}

/// A run interrupted (stop_after) and resumed ends with the same weights as
/// an uninterrupted one.
#[test]
fn interrupted_training_resumes_to_the_same_model() {
    let tl = crate::common::small_dataset(40, 10, 32);
    let base = [
        ("dataset", "small"),
        ("depth", "1"),
        ("width", "8"),
        ("heads", "2"),
        ("context", "64"),
        ("epochs", "2"),
        ("lr", "0.01"),
        ("batch", "8"),
    ];
    let with = |name: &'static str, extra: &[(&'static str, &'static str)]| {
        let mut v: Vec<(&str, &str)> = base.to_vec();
        v.push(("name", name));
        v.extend_from_slice(extra);
        v
    };
    tl.run("train", &with("whole", &[]));
    let out = tl.run(
        "train",
        &with("halves", &[("stop_after", "3"), ("save_every", "2")]),
    );
    assert!(out.contains("stopped after step 3"), "{out}");
    let out = tl.run(
        "train",
        &with("halves", &[("stop_after", "4"), ("save_every", "2")]),
    );
    assert!(out.contains("stopped after step 7"), "{out}");
    tl.run("train", &with("halves", &[("save_every", "2")]));
    let a = ModelRef::resolve(tl.lake(), "whole")
        .unwrap()
        .tensors(&Device::Cpu, DType::F32)
        .unwrap();
    let b = ModelRef::resolve(tl.lake(), "halves")
        .unwrap()
        .tensors(&Device::Cpu, DType::F32)
        .unwrap();
    for (k, v) in &a {
        let x = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let worst = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-6, "{k}: resumed weights differ by {worst}");
    }
    let logs = pipeline::sql::Sql::open(tl.lake())
        .unwrap()
        .query(
            "SELECT model, COUNT(*), MAX(step) FROM train_log GROUP BY model ORDER BY model",
            false,
        )
        .unwrap();
    let counts = logs[0].column(1).as_primitive::<arrow::datatypes::Int64Type>();
    assert_eq!(counts.value(0), counts.value(1), "resumed log rows differ");
}

#[test]
fn grids_train_each_model_once() {
    let tl = crate::common::small_dataset(30, 10, 32);
    let grid = tl.file(
        "g.toml",
        br#"[train]
dataset = "small"
heads = 2
context = 64
lr = 0.01
batch = 8
[grid]
depths = [1]
widths = [4, 8]
epochs = [1]
weight_decays = [0.0005]
seeds = [3]
"#,
    );
    let out = tl.run("train", &[("grid", &grid)]);
    assert!(
        out.contains("01x0004_01d03") && out.contains("01x0008_01d03"),
        "{out}"
    );
    let again = tl.run("train", &[("grid", &grid)]);
    assert_eq!(again.matches("up to date").count(), 2, "{again}");
    // The same name with another recipe is refused rather than overwritten.
    let err = tl.run_err(
        "train",
        &[
            ("dataset", "small"),
            ("depth", "1"),
            ("width", "8"),
            ("heads", "2"),
            ("context", "64"),
            ("seed", "3"),
            ("weight_decay", "0.0005"),
            ("lr", "0.02"),
        ],
    );
    assert!(err.contains("exists with another recipe"), "{err}");
    let a = Artifact::new("train_log", &[("model", "01x0004_01d03")]).unwrap();
    assert!(tl.lake().manifest(&a).unwrap().is_some());
}
