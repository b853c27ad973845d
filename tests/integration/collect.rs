//! Collect, merge and decide against brute force.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, FixedSizeListArray, UInt64Array};
use arrow::datatypes::{DataType, Field};
use arrow::record_batch::RecordBatch;
use candle_core::{DType, Device, Tensor};
use lc_lake::artifact::{Artifact, Provenance};
use lc_metrics::ClassStats;
use lc_models::AttentionKernel::Blocks;
use pipeline::checkpoint::ModelRef;
use pipeline::chunks::Chunks;

use crate::common::{TestLake, rel, tiny};

fn stats_of(tl: &TestLake, model: &str, split: &str, layer: usize) -> ClassStats {
    let a = Artifact::new(
        "class_stats",
        &[("model", model), ("split", split), ("layer", &layer.to_string())],
    )
    .unwrap();
    pipeline::stats::from_batches(&tl.lake().read_artifact(&a).unwrap()).unwrap()
}

/// Per class: (count, mean, M2) computed directly in f64 from explicitly
/// materialised embeddings (same batches as collect, so the same f32 values).
fn brute_force(
    tl: &TestLake,
    model: &str,
    dataset: &str,
    split: &str,
    layer: usize,
    batch: usize,
) -> HashMap<u32, (u64, Vec<f64>, f64)> {
    let m = ModelRef::resolve_one(tl.lake(), model).unwrap();
    let net = m.load(&Device::Cpu, DType::F32).unwrap();
    let chunks = Chunks::open(tl.lake(), dataset, split).unwrap();
    let t = chunks.t;
    let d = net.shape().hidden_size;
    let mut samples: HashMap<u32, Vec<Vec<f64>>> = HashMap::new();
    chunks
        .for_each_batch(tl.lake(), 0..chunks.count, batch, |_, ids, b| {
            let x = Tensor::from_slice(ids, (b, t), &Device::Cpu).unwrap();
            let h = net.hidden_states(&x, &[layer], Blocks).unwrap().remove(0);
            let h: Vec<Vec<Vec<f32>>> = h.to_vec3().unwrap();
            for (r, row) in ids.chunks(t).enumerate() {
                for pos in 0..t - 1 {
                    let y = row[pos + 1];
                    samples
                        .entry(y)
                        .or_default()
                        .push(h[r][pos].iter().map(|&v| v as f64).collect());
                }
            }
            Ok(())
        })
        .unwrap();
    samples
        .into_iter()
        .map(|(c, hs)| {
            let n = hs.len() as f64;
            let mu: Vec<f64> = (0..d).map(|j| hs.iter().map(|h| h[j]).sum::<f64>() / n).collect();
            let m2 = hs
                .iter()
                .map(|h| h.iter().zip(&mu).map(|(a, b)| (a - b) * (a - b)).sum::<f64>())
                .sum();
            (c, (hs.len() as u64, mu, m2))
        })
        .collect()
}

fn assert_stats_close(got: &ClassStats, want: &HashMap<u32, (u64, Vec<f64>, f64)>, tol: f64) {
    assert_eq!(got.len(), want.len());
    let mut worst: f64 = 0.0;
    for (c, (n, mu, m2)) in want {
        let r = got.row_of(*c).unwrap_or_else(|| panic!("class {c} missing"));
        assert_eq!(got.count[r], *n, "class {c}");
        let scale = mu.iter().map(|x| x.abs()).fold(0.0, f64::max);
        for (a, b) in got.mean_of(r).iter().zip(mu) {
            worst = worst.max((a - b).abs() / scale);
        }
        if *m2 > 0.0 {
            worst = worst.max(rel(got.m2[r], *m2));
        } else {
            assert!(got.m2[r].abs() < 1e-12, "class {c}: m2 {}", got.m2[r]);
        }
    }
    assert!(worst <= tol, "worst relative difference {worst:e} > {tol:e}");
}

/// One-pass statistics equal the brute force to 1e-10 relative (f64
/// accumulation; the only differences are summation order), for the final
/// layer and an inner one; two-pass equals one-pass to 1e-9.
#[test]
fn collected_statistics_equal_brute_force() {
    let guard = tiny();
    let tl = &*guard;
    let out = tl.run("collect", &[("model", "tiny"), ("layers", "all"), ("batch", "3")]);
    assert!(out.contains("tiny@1") && out.contains("3 layer(s)"), "{out}");
    for layer in [2, 1] {
        let want = brute_force(tl, "tiny", "small", "train", layer, 3);
        assert_stats_close(&stats_of(tl, "tiny@1", "train", layer), &want, 1e-10);
    }
    let one = stats_of(tl, "tiny@1", "train", 2);
    let collect_validation = |vars: &str, force: &str| {
        tl.run(
            "collect",
            &[
                ("model", "tiny"),
                ("split", "validation"),
                ("vars", vars),
                ("batch", "3"),
                ("force", force),
            ],
        )
    };
    collect_validation("two-pass", "false");
    collect_validation("one-pass", "true");
    let v1 = stats_of(tl, "tiny@1", "validation", 2);
    let want = brute_force(tl, "tiny", "small", "validation", 2, 3);
    assert_stats_close(&v1, &want, 1e-10);
    collect_validation("two-pass", "true");
    let v2 = stats_of(tl, "tiny@1", "validation", 2);
    for r in 0..v1.len() {
        let r2 = v2.row_of(v1.classes[r]).unwrap();
        if v1.m2[r] > 0.0 {
            assert!(
                rel(v2.m2[r2], v1.m2[r]) < 1e-9,
                "class {}: {} vs {}",
                v1.classes[r],
                v2.m2[r2],
                v1.m2[r]
            );
        }
    }
    assert!(one.len() > 100);
    // Re-running is a no-op.
    assert!(
        tl.run("collect", &[("model", "tiny"), ("layers", "all"), ("batch", "3")])
            .contains("up to date")
    );
}

/// Shards merged equal a single pass (1e-12: only the merge order differs),
/// and merge refuses an incomplete set. One chunk per forward pass, so both
/// runs see bit-identical embeddings (f32 results of a batched forward can
/// differ by ~1e-7 with the batch's composition).
#[test]
fn shards_merge_to_the_single_pass() {
    let guard = tiny();
    let tl = &*guard;
    tl.run("collect", &[("model", "tiny"), ("batch", "1"), ("force", "true")]);
    let single = stats_of(tl, "tiny@1", "train", 2);
    for i in 0..3 {
        let out = tl.run(
            "collect",
            &[("model", "tiny"), ("batch", "1"), ("shard", &format!("{i}/3"))],
        );
        assert!(out.contains(&format!("shard {i}/3")), "{out}");
    }
    // The single pass already made these statistics: merge has nothing to do.
    let out = tl.run("merge", &[("model", "tiny"), ("shards", "3")]);
    assert!(out.contains("up to date"), "{out}");
    let err = tl.run_err("merge", &[("model", "tiny"), ("shards", "4"), ("force", "true")]);
    assert!(
        err.contains("shards 0, 1, 2, 3 of 4") && err.contains("not finished"),
        "{err}"
    );
    tl.run("merge", &[("model", "tiny"), ("shards", "3"), ("force", "true")]);
    let merged = stats_of(tl, "tiny@1", "train", 2);
    assert_eq!(merged.len(), single.len());
    let mut worst: f64 = 0.0;
    for r in 0..single.len() {
        let r2 = merged.row_of(single.classes[r]).unwrap();
        assert_eq!(merged.count[r2], single.count[r]);
        let scale = single.mean_of(r).iter().map(|x| x.abs()).fold(1e-300, f64::max);
        for (a, b) in merged.mean_of(r2).iter().zip(single.mean_of(r)) {
            worst = worst.max((a - b).abs() / scale);
        }
        if single.m2[r] > 0.0 {
            worst = worst.max(rel(merged.m2[r2], single.m2[r]));
        }
    }
    eprintln!("shard merge: worst relative difference {worst:e}");
    assert!(worst <= 1e-12, "{worst:e}");
}

/// A collection stopped part-way and resumed from its checkpoint ends with
/// exactly the statistics of an uninterrupted run.
#[test]
fn interrupted_collection_resumes_to_the_same_statistics() {
    let guard = tiny();
    let tl = &*guard;
    tl.run(
        "collect",
        &[
            ("model", "tiny"),
            ("split", "validation"),
            ("batch", "2"),
            ("force", "true"),
        ],
    );
    let whole = stats_of(tl, "tiny@1", "validation", 2);
    // Start from nothing, as a first run would.
    let a = Artifact::new(
        "class_stats",
        &[("model", "tiny@1"), ("split", "validation"), ("layer", "2")],
    )
    .unwrap();
    tl.lake().delete_prefix(&a.dir()).unwrap();
    let out = tl.run(
        "collect",
        &[
            ("model", "tiny"),
            ("split", "validation"),
            ("batch", "2"),
            ("stop_after", "4"),
        ],
    );
    assert!(out.contains("stopped at chunk 4"), "{out}");
    let out = tl.run(
        "collect",
        &[
            ("model", "tiny"),
            ("split", "validation"),
            ("batch", "2"),
            ("stop_after", "6"),
        ],
    );
    assert!(out.contains("stopped at chunk 10"), "{out}");
    // A corrupt checkpoint is reported, not trusted.
    let key = pipeline::partials::shard_key("tiny@1", "validation", 1, 0, true);
    let good = tl.lake().get(&key).unwrap();
    tl.lake()
        .put(&key, bytes::Bytes::from_static(b"garbage"))
        .unwrap();
    let err = tl.run_err(
        "collect",
        &[("model", "tiny"), ("split", "validation"), ("batch", "2")],
    );
    assert!(
        err.contains("corrupt collection state") && err.contains("force=true"),
        "{err}"
    );
    tl.lake().put(&key, good).unwrap();
    tl.run(
        "collect",
        &[("model", "tiny"), ("split", "validation"), ("batch", "2")],
    );
    let resumed = stats_of(tl, "tiny@1", "validation", 2);
    assert_eq!(resumed, whole);
    assert!(
        tl.lake().get_opt(&key).unwrap().is_none(),
        "checkpoint left behind"
    );

    // Running tables on the device (here the CPU, whose merge is the host's
    // arithmetic), checkpointed and resumed: the same statistics bit for bit.
    let device = |extra: &[(&str, &str)]| {
        let mut args = vec![
            ("model", "tiny"),
            ("split", "validation"),
            ("batch", "2"),
            ("accumulate", "device"),
        ];
        args.extend_from_slice(extra);
        tl.run("collect", &args)
    };
    tl.lake().delete_prefix(&a.dir()).unwrap();
    let out = device(&[("stop_after", "4")]);
    assert!(out.contains("stopped at chunk 4"), "{out}");
    let out = device(&[]);
    assert!(out.contains("statistics on the device"), "{out}");
    assert_eq!(stats_of(tl, "tiny@1", "validation", 2), whole);
}

/// Samples pair the embedding at position t with the token at t + 1.
#[test]
fn labels_are_the_next_tokens() {
    let guard = tiny();
    let tl = &*guard;
    // A hand-built split: one chunk [a, b, a, c, ...] of the dataset's T.
    let t = 32usize;
    let seq: Vec<u32> = (0..t).map(|i| [464, 3290, 464, 11][i % 4]).collect();
    let src = Artifact::new("chunks", &[("dataset", "small"), ("split", "train")]).unwrap();
    let m = tl.lake().manifest(&src).unwrap().unwrap();
    let a = Artifact::new("chunks", &[("dataset", "small"), ("split", "hand")]).unwrap();
    let field = Arc::new(Field::new("item", DataType::UInt32, true));
    let list = FixedSizeListArray::new(
        field,
        t as i32,
        Arc::new(arrow::array::UInt32Array::from(seq.clone())),
        None,
    );
    let batch = RecordBatch::try_new(
        pipeline::stages::pack::chunks_schema(t),
        vec![
            Arc::new(UInt64Array::from(vec![0u64])) as ArrayRef,
            Arc::new(list),
        ],
    )
    .unwrap();
    let mut prov = Provenance::new("test").extra("T", t as u64);
    for k in ["tokenizer_fingerprint", "vocab_size", "tokenizer_key"] {
        prov = prov.extra(k, m.extra[k].clone());
    }
    tl.lake().write_artifact(&a, &[batch], prov).unwrap();
    tl.run("collect", &[("model", "tiny"), ("split", "hand")]);
    let st = stats_of(tl, "tiny@1", "hand", 2);
    // Hidden states of the chunk, by position.
    let net = ModelRef::resolve_one(tl.lake(), "tiny")
        .unwrap()
        .load(&Device::Cpu, DType::F32)
        .unwrap();
    let h: Vec<Vec<f32>> = net
        .hidden_states(
            &Tensor::from_vec(seq.clone(), (1, t), &Device::Cpu).unwrap(),
            &[2],
            Blocks,
        )
        .unwrap()[0]
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    // Class 3290 follows positions 0, 4, 8, ...: its mean is their average.
    let positions: Vec<usize> = (0..t - 1).filter(|p| seq[p + 1] == 3290).collect();
    assert_eq!(positions, (0..t - 1).step_by(4).collect::<Vec<_>>());
    let r = st.row_of(3290).unwrap();
    assert_eq!(st.count[r], positions.len() as u64);
    assert_eq!(st.mean_of(r).len(), h[0].len());
    for (j, &got) in st.mean_of(r).iter().enumerate() {
        let want: f64 = positions.iter().map(|&p| h[p][j] as f64).sum::<f64>() / positions.len() as f64;
        assert!((got - want).abs() < 1e-6, "dim {j}");
    }
    // The first token is never a label; the last position is never a sample.
    assert_eq!(st.samples(), (t - 1) as u64);
}

#[test]
fn mismatched_inputs_are_refused() {
    let guard = tiny();
    let tl = &*guard;
    let err = tl.run_err("collect", &[("model", "nope")]);
    assert!(err.contains("model nope") && err.contains("not found"), "{err}");
    let err = tl.run_err("collect", &[("model", "tiny"), ("split", "test")]);
    assert!(
        err.contains("chunks/dataset=small/split=test") && err.contains("stage=pack"),
        "{err}"
    );
    let err = tl.run_err("collect", &[("model", "tiny"), ("shard", "3/3")]);
    assert!(err.contains("shard"), "{err}");
    // The second pass of two-pass runs on the host.
    let err = tl.run_err(
        "collect",
        &[("model", "tiny"), ("vars", "two-pass"), ("accumulate", "device")],
    );
    assert!(
        err.contains("accumulate") && err.contains("two-pass accumulates on the host"),
        "{err}"
    );
    // The fused attention kernel exists for bf16 on CUDA only.
    let err = tl.run_err("collect", &[("model", "tiny"), ("attention", "fused")]);
    assert!(
        err.contains("attention") && err.contains("device=cuda and dtype=bf16"),
        "{err}"
    );
    // Data tokenized with another vocabulary than the model's own tokenizer:
    // the shipped tokenizer with the ids of two tokens swapped.
    let other = std::fs::read_to_string(crate::common::data("tokenizer.json"))
        .unwrap()
        .replacen("\"hello\":31373", "\"hello\":X", 1)
        .replacen("\"world\":6894", "\"world\":31373", 1)
        .replacen("\"hello\":X", "\"hello\":6894", 1);
    let other = tl.file("other_tokenizer.json", other.as_bytes());
    let text = tl.file(
        "few.txt",
        crate::common::first_stories(&crate::common::data("tinystories_val_sample.txt"), 12).as_bytes(),
    );
    tl.run("ingest", &[("dataset", "other"), ("train", &text)]);
    tl.run("tokenize", &[("dataset", "other"), ("tokenizer", &other)]);
    tl.run("pack", &[("dataset", "other"), ("T", "32")]);
    let err = tl.run_err("collect", &[("model", "tiny"), ("dataset", "other")]);
    assert!(
        err.contains("another vocabulary than the one the data was tokenized with"),
        "{err}"
    );
    // A model whose vocabulary is smaller than the tokenizer's.
    let fixture = crate::common::repo().join("tests/fixtures/gpt_neo_tiny");
    let err = tl.run_err(
        "collect",
        &[("model", fixture.to_str().unwrap()), ("dataset", "small")],
    );
    assert!(err.contains("vocabulary of 500 is smaller"), "{err}");
}

/// NC4 decisions equal a direct evaluation: for every validation sample the
/// argmax of <w_c, h> and the argmin of ||h - mu_c|| over V', in f64.
#[test]
fn decisions_equal_a_direct_evaluation() {
    let guard = tiny();
    let tl = &*guard;
    tl.run("collect", &[("model", "tiny")]);
    tl.run("decide", &[("model", "tiny"), ("min_per_class", "2")]);
    let st = stats_of(tl, "tiny@1", "train", 2);
    let vp: Vec<usize> = st.analysed(2, 0);
    let net = ModelRef::resolve_one(tl.lake(), "tiny")
        .unwrap()
        .load(&Device::Cpu, DType::F32)
        .unwrap();
    let w: Vec<Vec<f32>> = net.classifier().to_vec2().unwrap();
    let chunks = Chunks::open(tl.lake(), "small", "validation").unwrap();
    let t = chunks.t;
    let mut want: HashMap<u32, [u64; 4]> = HashMap::new();
    chunks
        .for_each_batch(tl.lake(), 0..chunks.count, 2, |_, ids, b| {
            let h: Vec<Vec<Vec<f32>>> = net
                .hidden_states(
                    &Tensor::from_slice(ids, (b, t), &Device::Cpu).unwrap(),
                    &[2],
                    Blocks,
                )
                .unwrap()[0]
                .to_vec3()
                .unwrap();
            for (r, row) in ids.chunks(t).enumerate() {
                for p in 0..t - 1 {
                    let hv: Vec<f64> = h[r][p].iter().map(|&x| x as f64).collect();
                    let mut best_lin = (f64::NEG_INFINITY, 0u32);
                    let mut best_ncc = (f64::INFINITY, 0u32);
                    for &row_i in &vp {
                        let c = st.classes[row_i];
                        let dot: f64 = w[c as usize].iter().zip(&hv).map(|(a, b)| *a as f64 * b).sum();
                        let dist: f64 = st
                            .mean_of(row_i)
                            .iter()
                            .zip(&hv)
                            .map(|(a, b)| (a - b) * (a - b))
                            .sum();
                        if dot > best_lin.0 {
                            best_lin = (dot, c);
                        }
                        if dist < best_ncc.0 {
                            best_ncc = (dist, c);
                        }
                    }
                    let y = row[p + 1];
                    let e = want.entry(y).or_default();
                    e[0] += 1;
                    e[1] += u64::from(best_lin.1 == best_ncc.1);
                    e[2] += u64::from(best_lin.1 == y);
                    e[3] += u64::from(best_ncc.1 == y);
                }
            }
            Ok(())
        })
        .unwrap();
    let a = Artifact::new(
        "decisions",
        &[("model", "tiny@1"), ("split", "validation"), ("layer", "2")],
    )
    .unwrap();
    let mut got: HashMap<u32, [u64; 4]> = HashMap::new();
    let mut analysed: HashMap<u32, bool> = HashMap::new();
    use arrow::array::AsArray;
    use arrow::datatypes::{UInt32Type, UInt64Type};
    for b in tl.lake().read_artifact(&a).unwrap() {
        for i in 0..b.num_rows() {
            let v = |c: usize| b.column(c).as_primitive::<UInt64Type>().value(i);
            let y = b.column(0).as_primitive::<UInt32Type>().value(i);
            got.insert(y, [v(1), v(2), v(3), v(4)]);
            analysed.insert(y, b.column(5).as_boolean().value(i));
        }
    }
    assert_eq!(got, want);
    let in_vp: std::collections::HashSet<u32> = vp.iter().map(|&r| st.classes[r]).collect();
    for (y, flag) in &analysed {
        assert_eq!(*flag, in_vp.contains(y), "class {y}");
    }
    // Both NC4 denominators, from the direct evaluation: every sample, and
    // only samples whose true label is in V' (the authors' convention).
    let (all_agree, all_n) = want.values().fold((0, 0), |a, v| (a.0 + v[1], a.1 + v[0]));
    let (vp_agree, vp_n) = want
        .iter()
        .filter(|(y, _)| in_vp.contains(y))
        .fold((0, 0), |a, (_, v)| (a.0 + v[1], a.1 + v[0]));
    assert!(
        vp_n < all_n,
        "some validation labels must fall outside V' for this check"
    );
    // One V' for all metrics: analyze over other classes is refused.
    let err = tl.run_err("analyze", &[("model", "tiny"), ("min_per_class", "1")]);
    assert!(err.contains("one V' must govern"), "{err}");
    tl.run("analyze", &[("model", "tiny"), ("min_per_class", "2")]);
    let sql = pipeline::sql::Sql::open(tl.lake()).unwrap();
    let b = &sql
        .query(
            "SELECT nc4_agreement, nc4_agreement_analysed, nc4_samples, nc4_samples_analysed \
             FROM model_metrics WHERE model = 'tiny@1' AND layer = '2'",
            false,
        )
        .unwrap()[0];
    use arrow::datatypes::{Float64Type, Int64Type};
    assert_eq!(
        b.column(0).as_primitive::<Float64Type>().value(0),
        all_agree as f64 / all_n as f64
    );
    assert_eq!(
        b.column(1).as_primitive::<Float64Type>().value(0),
        vp_agree as f64 / vp_n as f64
    );
    assert_eq!(b.column(2).as_primitive::<Int64Type>().value(0), all_n as i64);
    assert_eq!(b.column(3).as_primitive::<Int64Type>().value(0), vp_n as i64);
    let agree: u64 = got.values().map(|v| v[1]).sum();
    assert!(
        agree > 0,
        "no agreement at all is implausible for a trained model"
    );
}
