//! Pairwise and per-class metrics against brute force; model-level SQL.

use lc_lake::artifact::{Artifact, Provenance};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, Int64Type, UInt32Type, UInt64Type};
use lc_metrics::ClassStats;
use lc_metrics::selection::prepare;
use lc_metrics::tiles::{self, Classes, Options};
use pipeline::sql::Sql;

use crate::common::{TestLake, rel, tiny};

fn lcg(seed: &mut u64) -> f64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

/// Synthetic class statistics: `c` classes in `d` dimensions with uneven
/// counts (some of 1), either spread out or in tight clusters; with two
/// identical means and one class exactly at the centre of the others.
fn synthetic(c: usize, d: usize, clustered: bool, seed: u64) -> ClassStats {
    let mut s = seed;
    let centres: Vec<Vec<f64>> = (0..8)
        .map(|_| (0..d).map(|_| 3.0 * lcg(&mut s)).collect())
        .collect();
    let mut st = ClassStats::new(d);
    let mut means: Vec<Vec<f64>> = Vec::new();
    for k in 0..c / 2 {
        let v: Vec<f64> = if clustered {
            centres[k % 8].iter().map(|x| x + 1e-4 * lcg(&mut s)).collect()
        } else {
            (0..d).map(|_| lcg(&mut s)).collect()
        };
        // +v and -v keep the mean of means exactly 0.
        means.push(v.clone());
        means.push(v.iter().map(|x| -x).collect());
    }
    means[5] = means[3].clone(); // identical means (and their mirrors)
    means[4] = means[2].clone();
    means.push(vec![0.0; d]); // exactly the centre: zero-norm centred mean
    for (i, m) in means.iter().enumerate() {
        let count = 1 + (i * 7919 % 97) as u64 * (i % 3) as u64;
        let m2 = if count == 1 {
            0.0
        } else {
            count as f64 * (0.5 + lcg(&mut s).abs())
        };
        st.merge_one(i as u32 * 3 + 1, count, m, m2);
    }
    st
}

struct Brute {
    values: [Vec<f64>; 4],
    excluded: [u64; 4],
    gram: Vec<f64>,
    rows: Vec<[(f64, u64); 4]>,
    top: Vec<(f64, usize)>,
}

/// Every pair, directly from the definitions (differences of vectors, no
/// Gram matrix).
fn brute(cls: &Classes, k: f64, riesz: f64) -> Brute {
    let c = cls.var.len();
    let d = cls.d;
    let m = |a: usize| &cls.centred[a * d..(a + 1) * d];
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut out = Brute {
        values: Default::default(),
        excluded: [0; 4],
        gram: Vec::new(),
        rows: vec![[(0.0, 0); 4]; c],
        top: vec![(f64::NEG_INFINITY, usize::MAX); c],
    };
    for a in 0..c {
        for b in a + 1..c {
            let diff: f64 = m(a)
                .iter()
                .zip(m(b))
                .map(|(x, y)| (x - y) * (x - y))
                .sum::<f64>()
                .sqrt();
            let (na, nb) = (norm(m(a)), norm(m(b)));
            let cdnv = if diff > 0.0 {
                (cls.var[a] + cls.var[b]) / (2.0 * diff.powf(2.0 + k))
            } else {
                f64::NAN
            };
            let (intf, logk, rz) = if na > 0.0 && nb > 0.0 {
                let ua: Vec<f64> = m(a).iter().map(|x| x / na).collect();
                let ub: Vec<f64> = m(b).iter().map(|x| x / nb).collect();
                let cos: f64 = ua.iter().zip(&ub).map(|(x, y)| x * y).sum();
                let du: f64 = ua
                    .iter()
                    .zip(&ub)
                    .map(|(x, y)| (x - y) * (x - y))
                    .sum::<f64>()
                    .sqrt();
                if du > 0.0 {
                    (cos, (1.0 / du).ln(), du.powf(-riesz))
                } else {
                    (cos, f64::NAN, f64::NAN)
                }
            } else {
                (f64::NAN, f64::NAN, f64::NAN)
            };
            for (i, v) in [cdnv, intf, logk, rz].into_iter().enumerate() {
                if v.is_nan() {
                    out.excluded[i] += 1;
                } else {
                    out.values[i].push(v);
                    out.rows[a][i].0 += v;
                    out.rows[a][i].1 += 1;
                    out.rows[b][i].0 += v;
                    out.rows[b][i].1 += 1;
                }
            }
            if !intf.is_nan() {
                if intf > out.top[a].0 || (intf == out.top[a].0 && b < out.top[a].1) {
                    out.top[a] = (intf, b);
                }
                if intf > out.top[b].0 || (intf == out.top[b].0 && a < out.top[b].1) {
                    out.top[b] = (intf, a);
                }
            }
            out.gram.push(m(a).iter().zip(m(b)).map(|(x, y)| x * y).sum());
        }
    }
    out
}

fn moments(v: &[f64]) -> (f64, f64, f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
    (
        mean,
        std,
        v.iter().cloned().fold(f64::INFINITY, f64::min),
        v.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    )
}

/// f64 mode agrees with the brute force to 1e-9 relative on random and on
/// clustered data (whose nearly identical means exercise the exact
/// recomputation); the tile edge changes nothing beyond rounding (1e-12);
/// f32 GEMMs stay within 1e-4 relative on the aggregates (documented
/// tolerance of precision=f32).
#[test]
fn pairwise_metrics_equal_brute_force() {
    for clustered in [false, true] {
        let st = synthetic(500, 64, clustered, if clustered { 11 } else { 3 });
        let prep = prepare(&mut st.clone(), 1, 0);
        let cls = Classes {
            centred: &prep.centred,
            d: 64,
            var: &prep.var,
            mean_bar: &prep.mean_bar,
        };
        let want = brute(&cls, 2.0, 1.0);
        let run = |edge: usize, f32_gemm: bool| {
            tiles::pairs(
                &cls,
                &Options {
                    edge,
                    cdnv_k: 2.0,
                    riesz_s: Some(1.0),
                    f32_gemm,
                    top_k: 3,
                },
            )
        };
        let reports = [run(64, false), run(37, false), run(500, false), run(64, true)];
        for (ri, rep) in reports.iter().enumerate() {
            let tol = if ri == 3 { 1e-4 } else { 1e-9 };
            for k in 0..4 {
                let got = tiles::combine(&rep.tiles, k);
                let (mean, std, min, max) = moments(&want.values[k]);
                assert_eq!(got.n as usize, want.values[k].len(), "metric {k}");
                assert_eq!(got.excluded, want.excluded[k], "metric {k}");
                for (g, w, what) in [
                    (got.mean, mean, "mean"),
                    (got.std(), std, "std"),
                    (got.min, min, "min"),
                    (got.max, max, "max"),
                ] {
                    assert!(
                        rel(g, w) <= tol,
                        "clustered={clustered} report {ri} metric {k} {what}: {g} vs {w}"
                    );
                }
            }
            let g = tiles::combine(&rep.tiles, tiles::METRIC_GRAM);
            let (gm, gs, _, _) = moments(&want.gram);
            assert!((g.mean - gm).abs() <= tol * gs && rel(g.std(), gs) <= tol);
            for a in 0..want.rows.len() {
                if ri == 3 {
                    break; // f32 row means near 0 have no useful relative bound
                }
                for k in 0..4 {
                    let (sum, n) = want.rows[a][k];
                    assert_eq!(rep.rows.n[k][a], n);
                    if n > 0 {
                        assert!(
                            rel(rep.rows.mean(k, a).unwrap(), sum / n as f64) <= tol,
                            "row {a} metric {k}"
                        );
                    }
                }
                assert_eq!(rep.rows.top(a).1, want.top[a].1, "top interferer of {a}");
            }
        }
        // Exact duplicates and the zero-norm class were excluded, never NaN.
        assert!(want.excluded[0] >= 2 && want.excluded[1] >= 499);
        assert!(reports[0].extremes[0].0.iter().all(|p| p.value.is_finite()));
        let e = &reports[0].extremes[tiles::METRIC_INTERFERENCE].1;
        let hi = moments(&want.values[1]).3;
        assert!(
            rel(e[0].value, hi) < 1e-12,
            "largest interference {} vs {hi}",
            e[0].value
        );
    }
}

/// Class statistics written to a lake under `model`.
fn write_stats(tl: &TestLake, model: &str, st: &ClassStats) {
    let a = Artifact::new(
        "class_stats",
        &[("model", model), ("split", "train"), ("layer", "1")],
    )
    .unwrap();
    tl.lake()
        .write_artifact(
            &a,
            &[pipeline::stats::to_batch(st).unwrap()],
            Provenance::new("test"),
        )
        .unwrap();
}

fn f64_col(sql: &Sql, q: &str) -> Vec<Option<f64>> {
    let out = sql.query(q, false).unwrap();
    out.iter()
        .flat_map(|b| {
            let c = b.column(0).as_primitive::<Float64Type>().clone();
            (0..c.len()).map(move |i| (!c.is_null(i)).then(|| c.value(i)))
        })
        .collect()
}

/// An exact simplex ETF: interference -1/(C-1) for every pair, zero ETF
/// error, equal norms (equinorm CoV 0). Checked through the SQL views.
#[test]
fn simplex_etf_is_recognised() {
    let tl = TestLake::new();
    let c = 50;
    let mut st = ClassStats::new(c);
    for i in 0..c {
        let mut m = vec![-1.0 / c as f64; c];
        m[i] += 1.0;
        st.merge_one(i as u32, 10, &m, 5.0);
    }
    write_stats(&tl, "etf", &st);
    tl.run("analyze", &[("model", "etf"), ("layer", "1"), ("tile", "16")]);
    let sql = Sql::open(tl.lake()).unwrap();
    let one = |col: &str| {
        f64_col(
            &sql,
            &format!("SELECT {col} FROM model_metrics WHERE model = 'etf'"),
        )[0]
    };
    let intf = one("nc2_interference_mean").unwrap();
    assert!((intf + 1.0 / (c as f64 - 1.0)).abs() < 1e-12, "{intf}");
    assert!(one("nc2_interference_std").unwrap() < 1e-12);
    let etf = one("nc2_etf_error").unwrap();
    // sqrt(2 - 2x) with x = 1 - O(1e-16): the error is exact to ~1e-8.
    assert!(etf < 1e-6, "ETF error {etf}");
    assert!(one("nc2_equinorm_std").unwrap() < 1e-12);
    assert!(one("nc1_cdnv").unwrap() > 0.0);
    assert!(
        one("nc3_duality_mean").is_none(),
        "no weights: NC3 must be NULL, not invented"
    );
    // A non-ETF (random) configuration has a clearly positive error.
    write_stats(&tl, "rnd", &synthetic(60, 16, false, 5));
    tl.run("analyze", &[("model", "rnd"), ("layer", "1")]);
    let e = f64_col(
        &sql,
        "SELECT nc2_etf_error FROM model_metrics WHERE model = 'rnd'",
    )[0]
    .unwrap();
    assert!(e > 0.1 && e.is_finite(), "{e}");
}

/// The SQL combination of tiles (Chan's formula in sql/tile_totals.sql)
/// equals the Rust combination and the brute force.
#[test]
fn sql_tile_totals_equal_rust_and_brute_force() {
    let tl = TestLake::new();
    let st = synthetic(300, 24, true, 9);
    write_stats(&tl, "syn", &st);
    tl.run(
        "analyze",
        &[
            ("model", "syn"),
            ("layer", "1"),
            ("tile", "41"),
            ("kernels", "log,riesz"),
        ],
    );
    let prep = prepare(&mut st.clone(), 1, 0);
    let cls = Classes {
        centred: &prep.centred,
        d: 24,
        var: &prep.var,
        mean_bar: &prep.mean_bar,
    };
    let want = brute(&cls, 2.0, 1.0);
    let sql = Sql::open(tl.lake()).unwrap();
    for (k, name) in ["cdnv", "interference", "logkernel", "riesz"].iter().enumerate() {
        let out = sql
            .query(&format!("SELECT mean, std, min, max, n, excluded FROM tile_totals WHERE model = 'syn' AND metric = '{name}'"), false)
            .unwrap();
        let b = &out[0];
        let f = |i: usize| b.column(i).as_primitive::<Float64Type>().value(0);
        let (mean, std, min, max) = moments(&want.values[k]);
        for (g, w) in [(f(0), mean), (f(1), std), (f(2), min), (f(3), max)] {
            assert!(rel(g, w) < 1e-9, "{name}: {g} vs {w}");
        }
        assert_eq!(
            b.column(4).as_primitive::<Int64Type>().value(0) as usize,
            want.values[k].len()
        );
        assert_eq!(
            b.column(5).as_primitive::<Int64Type>().value(0) as u64,
            want.excluded[k]
        );
    }
    // No NaN reaches a model-level number.
    let row = sql
        .query("SELECT * FROM model_metrics WHERE model = 'syn'", false)
        .unwrap();
    for (i, c) in row[0].columns().iter().enumerate() {
        if let Some(f) = c.as_primitive_opt::<Float64Type>() {
            assert!(
                f.is_null(0) || f.value(0).is_finite(),
                "column {} is {}",
                row[0].schema().field(i).name(),
                f.value(0)
            );
        }
    }
}

/// The stage on a trained model: NC3 against the classifier rows, NC4 from
/// decisions, top interferers and extremes, and one model_metrics row.
#[test]
fn analyze_a_trained_model() {
    let guard = tiny();
    let tl = &*guard;
    tl.run("eval", &[("model", "tiny")]);
    tl.run("collect", &[("model", "tiny")]);
    tl.run("decide", &[("model", "tiny")]);
    let out = tl.run(
        "analyze",
        &[("model", "tiny"), ("dump_pairs", "topk:3"), ("force", "true")],
    );
    assert!(out.contains("tiny@1/train/layer=2"), "{out}");
    let a = Artifact::new(
        "class_stats",
        &[("model", "tiny@1"), ("split", "train"), ("layer", "2")],
    )
    .unwrap();
    let st = pipeline::stats::from_batches(&tl.lake().read_artifact(&a).unwrap()).unwrap();
    let prep = prepare(&mut st.clone(), 1, 0);
    let m = pipeline::checkpoint::ModelRef::resolve_one(tl.lake(), "tiny").unwrap();
    let w: Vec<Vec<f32>> = m
        .load(&candle_core::Device::Cpu, candle_core::DType::F32)
        .unwrap()
        .classifier()
        .to_vec2()
        .unwrap();
    let sql = Sql::open(tl.lake()).unwrap();
    let out = sql
        .query("SELECT class_id, nc3_cos, nc3_dot, norm, top_interferer, nc4_hits, nc4_samples, token FROM class_metrics WHERE model = 'tiny@1' AND analysed ORDER BY class_id", false)
        .unwrap();
    let mut rows = 0;
    for b in &out {
        let ids = b.column(0).as_primitive::<UInt32Type>();
        let cos = b.column(1).as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            let c = ids.value(i);
            let r = prep.rows.iter().position(|&r| st.classes[r] == c).unwrap();
            let mc = &prep.centred[r * 8..(r + 1) * 8];
            let wc: Vec<f64> = w[c as usize].iter().map(|&x| x as f64).collect();
            let dot: f64 = wc.iter().zip(mc).map(|(a, b)| a * b).sum();
            let want = dot
                / (wc.iter().map(|x| x * x).sum::<f64>().sqrt()
                    * mc.iter().map(|x| x * x).sum::<f64>().sqrt());
            assert!((cos.value(i) - want).abs() < 1e-12, "class {c}");
            rows += 1;
        }
    }
    assert_eq!(rows, prep.rows.len());
    // NC4 per class equals the decisions table.
    let q = "SELECT SUM(c.nc4_hits) - SUM(d.agree) FROM class_metrics c JOIN decisions d ON c.class_id = d.class_id AND c.model = d.model WHERE c.model = 'tiny@1'";
    let diff = sql.query(q, false).unwrap()[0]
        .column(0)
        .as_primitive::<UInt64Type>()
        .value(0);
    assert_eq!(diff, 0);
    let mm = sql
        .query("SELECT nc4_agreement, val_loss, nc3_duality_mean, final_layer, n_classes FROM model_metrics WHERE model = 'tiny@1'", false)
        .unwrap();
    assert_eq!(mm[0].num_rows(), 1);
    assert!(mm[0].column(1).as_primitive::<Float64Type>().value(0) > 0.0);
    assert!(mm[0].column(3).as_boolean().value(0));
    let ext = sql
        .query("SELECT COUNT(*) FROM pair_extremes WHERE model = 'tiny@1'", false)
        .unwrap();
    // cdnv, interference, logkernel, gram, logkernel_uncentred; min and max; top 3.
    assert_eq!(ext[0].column(0).as_primitive::<Int64Type>().value(0), 5 * 2 * 3);
}

/// Both GNC2 conventions from one analyze run equal a direct f64 evaluation:
/// equation 7 on the centred means (gnc2_*) and the authors' code on the
/// uncentred means (gnc2_uncentred_*). The means sit far from the origin,
/// so the two differ visibly.
#[test]
fn both_gnc2_conventions_equal_brute_force_far_from_the_origin() {
    let tl = TestLake::new();
    let (c, d) = (300usize, 16usize);
    let mut s = 17u64;
    let offset: Vec<f64> = (0..d).map(|i| 6.0 + (i % 3) as f64).collect();
    let mut st = ClassStats::new(d);
    let mut means: Vec<Vec<f64>> = Vec::new();
    for i in 0..c {
        let mut m: Vec<f64> = offset.iter().map(|o| o + lcg(&mut s)).collect();
        if i == 7 {
            // Nearly (not exactly) the direction of class 3: the Gram form
            // cancels, the pair is recomputed from the vectors.
            m = means[3].iter().map(|x| x + 1e-4 * lcg(&mut s)).collect();
        }
        st.merge_one(i as u32, 1 + (i % 5) as u64, &m, 0.5);
        means.push(m);
    }
    let a = Artifact::new(
        "class_stats",
        &[("model", "far"), ("split", "train"), ("layer", "1")],
    )
    .unwrap();
    tl.lake()
        .write_artifact(
            &a,
            &[pipeline::stats::to_batch(&st).unwrap()],
            Provenance::new("test"),
        )
        .unwrap();
    tl.run("analyze", &[("model", "far"), ("layer", "1"), ("tile", "64")]);

    let bar: Vec<f64> = (0..d)
        .map(|j| means.iter().map(|m| m[j]).sum::<f64>() / c as f64)
        .collect();
    let unit = |v: Vec<f64>| {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.into_iter().map(|x| x / n).collect::<Vec<f64>>()
    };
    let centred: Vec<Vec<f64>> = means
        .iter()
        .map(|m| unit(m.iter().zip(&bar).map(|(x, b)| x - b).collect()))
        .collect();
    let raw: Vec<Vec<f64>> = means.iter().map(|m| unit(m.clone())).collect();
    let kernel = |u: &[Vec<f64>]| {
        let mut v = Vec::new();
        for i in 0..c {
            for j in i + 1..c {
                let dist = u[i]
                    .iter()
                    .zip(&u[j])
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f64>()
                    .sqrt();
                v.push((1.0 / dist).ln());
            }
        }
        let (mean, std, _, _) = moments(&v);
        (mean, std / mean)
    };
    let (cm, ccov) = kernel(&centred);
    let (rm, rcov) = kernel(&raw);
    let sql = Sql::open(tl.lake()).unwrap();
    let b = &sql
        .query(
            "SELECT gnc2_logkernel_mean, gnc2_uniformity_cov, gnc2_uncentred_logkernel_mean, gnc2_uncentred_uniformity_cov \
             FROM model_metrics WHERE model = 'far'",
            false,
        )
        .unwrap()[0];
    let got = |i: usize| b.column(i).as_primitive::<Float64Type>().value(0);
    // Tolerance 1e-9 relative: f64 Gram products and Chan merges, as for the
    // other pairwise metrics.
    for (i, want) in [cm, ccov, rm, rcov].into_iter().enumerate() {
        assert!(rel(got(i), want) < 1e-9, "column {i}: {} vs {want}", got(i));
    }
    assert!(
        rel(rm, cm) > 0.5 && rel(rcov, ccov) > 0.1,
        "conventions too close: {cm} {rm} {ccov} {rcov}"
    );
}

/// A `class_stats` table of several row groups reads in parts, one per
/// thread, exactly as in one piece: rows of 1,024 dims make row groups of
/// about 1,000 classes (8 MiB), so 2,101 classes are three groups and two
/// parts of whole groups.
#[test]
fn wide_class_stats_read_in_parts_equal_the_whole() {
    let tl = TestLake::new();
    let st = synthetic(2100, 1024, false, 5);
    write_stats(&tl, "wide", &st);
    let a = Artifact::new(
        "class_stats",
        &[("model", "wide"), ("split", "train"), ("layer", "1")],
    )
    .unwrap();
    let parts = tl.lake().stream_artifact_parts(&a, 256, 2).unwrap();
    let rows: Vec<usize> = parts.iter().map(|p| p.rows as usize).collect();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|&r| r > 0 && r < st.len()), "{rows:?}");
    assert_eq!(rows.iter().sum::<usize>(), st.len());
    let read = pipeline::stats::from_parts(parts.into_iter().zip(rows).collect()).unwrap();
    let whole = pipeline::stats::from_batches(&tl.lake().read_artifact(&a).unwrap()).unwrap();
    assert_eq!(read, whole);
    for i in [0, 1000, 1500, st.len() - 1] {
        let class = st.classes[i];
        let (r, w) = (read.row_of(class).unwrap(), st.row_of(class).unwrap());
        assert_eq!(read.mean_of(r), st.mean_of(w), "class {class}");
        assert_eq!((read.count[r], read.m2[r]), (st.count[w], st.m2[w]));
    }
}
