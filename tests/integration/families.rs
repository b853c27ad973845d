//! The other model families against transformers: GPT-2, GPT-NeoX (Pythia),
//! Llama, Qwen2 and Mistral. Fixtures: tests/fixtures/families, made by
//! tests/fixtures/make_model_fixtures.py (tiny random models, their
//! transformers hidden states and logits in float32).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, FixedSizeListArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field};
use arrow::record_batch::RecordBatch;
use candle_core::{DType, Device, Tensor};
use lc_lake::artifact::{Artifact, Provenance};
use lc_models::AttentionKernel::Blocks;
use pipeline::checkpoint::ModelRef;
use pipeline::sql::Sql;

use crate::common::{TestLake, repo};

const FAMILIES: [&str; 5] = ["gpt2", "pythia/step-1000", "llama", "qwen2", "mistral"];

fn dir(family: &str) -> String {
    repo()
        .join("tests/fixtures/families")
        .join(family)
        .to_string_lossy()
        .to_string()
}

fn expected(family: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(format!("{}/expected.safetensors", dir(family)), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Every hidden state and the logits equal transformers' within 1e-4
/// absolute (float32 arithmetic in both; observed differences are ~1e-6).
#[test]
fn every_family_matches_transformers_layer_by_layer() {
    let tl = TestLake::new();
    for family in FAMILIES {
        let m = ModelRef::resolve(tl.lake(), &dir(family)).unwrap();
        let model = m.load(&Device::Cpu, DType::F32).unwrap();
        let want = expected(family);
        let ids = want["input_ids"].to_dtype(DType::U32).unwrap();
        let depth = model.shape().num_layers;
        let layers: Vec<usize> = (0..=depth).collect();
        let hs = model.hidden_states(&ids, &layers, Blocks).unwrap();
        for (l, h) in hs.iter().enumerate() {
            let diff = max_abs_diff(h, &want[&format!("hidden_{l}")]);
            assert!(diff < 1e-4, "{family}: hidden state {l}: max |diff| {diff}");
        }
        let logits = model.logits(&hs[depth].narrow(0, 0, 2).unwrap()).unwrap();
        let diff = max_abs_diff(&logits, &want["logits"]);
        assert!(diff < 1e-4, "{family}: logits: max |diff| {diff}");
    }
}

/// A lake whose train chunks are exactly the fixture's input ids, tokenized
/// (so to speak) with the fixture's tokenizer: ingest and tokenize run for
/// real on a line of text, and the chunks artifact holds the reference ids,
/// so collect runs on the sequences transformers saw.
fn lake_with_fixture_chunks(family: &str) -> TestLake {
    let tl = TestLake::new();
    let text = tl.file("t.txt", b"Once upon a time there was a cat.\n<|endoftext|>\n");
    tl.run("ingest", &[("dataset", "fx"), ("train", &text)]);
    let tok = format!("{}/tokenizer.json", dir(family));
    tl.run("tokenize", &[("dataset", "fx"), ("tokenizer", &tok)]);
    let tokens = tl
        .lake()
        .manifest(&Artifact::new("tokens", &[("dataset", "fx"), ("split", "train")]).unwrap())
        .unwrap()
        .unwrap();
    let ids: Vec<u32> = expected(family)["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let t = 32usize;
    let rows = ids.len() / t;
    let list = FixedSizeListArray::try_new(
        Arc::new(Field::new("item", DataType::UInt32, true)),
        t as i32,
        Arc::new(UInt32Array::from(ids)),
        None,
    )
    .unwrap();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(0..rows as u64)),
        Arc::new(list),
    ];
    let batch = RecordBatch::try_new(
        lc_lake::schemas::table("chunks")
            .unwrap()
            .file_schema_with_len(t as i32),
        cols,
    )
    .unwrap();
    let mut prov = Provenance::new("test").input(&tokens).extra("T", t as u64);
    for k in ["tokenizer_fingerprint", "vocab_size", "tokenizer_key"] {
        prov = prov.extra(k, tokens.extra[k].clone());
    }
    let a = Artifact::new("chunks", &[("dataset", "fx"), ("split", "train")]).unwrap();
    tl.lake().write_artifact(&a, &[batch], prov).unwrap();
    tl
}

/// collect layers=all equals per-class statistics computed directly from
/// transformers' hidden states (f64 brute force; relative 1e-4 on means and
/// M2, since the hidden states themselves agree to ~1e-6).
#[test]
fn collect_equals_brute_force_on_transformers_hidden_states() {
    for family in ["gpt2", "pythia/step-1000", "llama", "qwen2", "mistral"] {
        let tl = lake_with_fixture_chunks(family);
        let out = tl.run(
            "collect",
            &[
                ("model", &dir(family)),
                ("dataset", "fx"),
                ("layers", "all"),
                ("batch", "4"),
            ],
        );
        assert!(out.contains("3 layer(s)"), "{family}: {out}");
        let want = expected(family);
        let ids: Vec<Vec<u32>> = want["input_ids"].to_dtype(DType::U32).unwrap().to_vec2().unwrap();
        let id = ModelRef::resolve(tl.lake(), &dir(family)).unwrap().id;
        for layer in 0..=2 {
            let h: Vec<Vec<Vec<f32>>> = want[&format!("hidden_{layer}")].to_vec3().unwrap();
            // Brute force: positions 0..T-2 labelled by the next token.
            let mut by: HashMap<u32, Vec<Vec<f64>>> = HashMap::new();
            for (r, row) in ids.iter().enumerate() {
                for p in 0..row.len() - 1 {
                    by.entry(row[p + 1])
                        .or_default()
                        .push(h[r][p].iter().map(|&x| x as f64).collect());
                }
            }
            let a = Artifact::new(
                "class_stats",
                &[("model", &id), ("split", "train"), ("layer", &layer.to_string())],
            )
            .unwrap();
            let st = pipeline::stats::from_batches(&tl.lake().read_artifact(&a).unwrap()).unwrap();
            assert_eq!(st.len(), by.len(), "{family} layer {layer}");
            for (c, hs) in &by {
                let r = st.row_of(*c).unwrap();
                let n = hs.len() as f64;
                let d = hs[0].len();
                let mu: Vec<f64> = (0..d).map(|j| hs.iter().map(|x| x[j]).sum::<f64>() / n).collect();
                let m2: f64 = hs
                    .iter()
                    .map(|x| x.iter().zip(&mu).map(|(a, b)| (a - b) * (a - b)).sum::<f64>())
                    .sum();
                assert_eq!(st.count[r], hs.len() as u64);
                let scale = mu.iter().map(|x| x.abs()).fold(1e-3, f64::max);
                for (a, b) in st.mean_of(r).iter().zip(&mu) {
                    assert!(
                        (a - b).abs() < 1e-4 * scale,
                        "{family} layer {layer} class {c}: {a} vs {b}"
                    );
                }
                assert!(
                    (st.m2[r] - m2).abs() <= 1e-4 * m2.max(1e-3),
                    "{family} layer {layer} class {c} M2"
                );
            }
        }
    }
}

/// A Pythia-style series (step-1000, step-2000 of one model) through
/// collect, analyze layers=all and model_metrics: one row per checkpoint
/// and layer.
#[test]
fn a_checkpoint_series_is_analysed_layer_by_layer() {
    let tl = lake_with_fixture_chunks("pythia/step-1000");
    let series = repo()
        .join("tests/fixtures/families/pythia")
        .to_string_lossy()
        .to_string();
    for k in 0..2 {
        let model = format!("{series}@{k}");
        tl.run(
            "collect",
            &[("model", &model), ("dataset", "fx"), ("layers", "all")],
        );
        let out = tl.run("analyze", &[("model", &model), ("layers", "all")]);
        assert_eq!(out.lines().count(), 3, "{out}");
    }
    let sql = Sql::open(tl.lake()).unwrap();
    let b = sql
        .query(
            "SELECT model, layer, nc1_cdnv, nc3_duality_mean FROM model_metrics ORDER BY model, layer",
            false,
        )
        .unwrap();
    let rows: usize = b.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 6);
    use arrow::array::{Array, AsArray};
    let models: Vec<String> = b
        .iter()
        .flat_map(|b| {
            let c = b.column(0).as_string::<i32>();
            (0..b.num_rows())
                .map(move |i| c.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(models.iter().filter(|m| *m == "pythia@0").count(), 3);
    assert_eq!(models.iter().filter(|m| *m == "pythia@1").count(), 3);
    for batch in &b {
        // NC3 against the untied embed_out exists at every layer.
        assert_eq!(batch.column(3).null_count(), 0);
    }
    // Per depth, correlate's selection works on the layer column: both
    // checkpoints at layer 1 (without eval they have no val_loss, and say so).
    let out = tl.run("correlate", &[("where", "layer = '1'"), ("permutations", "10")]);
    assert!(out.contains("2 selected, 2 without val_loss"), "{out}");
}

/// Unknown families and incomplete checkpoints are refused by name.
#[test]
fn bad_checkpoints_are_refused_clearly() {
    let tl = TestLake::new();
    let bad = tl.dir.path().join("bert");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("config.json"),
        r#"{"model_type": "bert", "hidden_size": 32}"#,
    )
    .unwrap();
    let err = ModelRef::resolve(tl.lake(), bad.to_str().unwrap())
        .unwrap()
        .config()
        .unwrap_err()
        .to_string();
    for want in [
        "'bert' is not supported",
        "gpt2",
        "gpt_neox",
        "llama",
        "qwen2",
        "mistral",
        "gpt_neo",
    ] {
        assert!(err.contains(want), "{err}");
    }
    // Weights without one tensor: the error names it.
    let src = dir("llama");
    let cut = tl.dir.path().join("llama-cut");
    std::fs::create_dir_all(&cut).unwrap();
    std::fs::copy(format!("{src}/config.json"), cut.join("config.json")).unwrap();
    let mut tensors =
        candle_core::safetensors::load(format!("{src}/model.safetensors"), &Device::Cpu).unwrap();
    tensors.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&tensors, cut.join("model.safetensors")).unwrap();
    let err = ModelRef::resolve(tl.lake(), cut.to_str().unwrap())
        .unwrap()
        .load(&Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
}
