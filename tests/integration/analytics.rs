//! Cross-model analysis: import, correlate (R^2 and permutation tests in
//! DataFusion), and the end-to-end `stage=all`.

use arrow::array::{Array, AsArray};
use arrow::datatypes::Float64Type;
use pipeline::sql::Sql;
use pipeline::stages::correlate::{Correlation, correlations};

use crate::common::{BIT_EXACT_RESULTS, TestLake, micro_experiment, rel, table_lines};

/// Imported metrics for n grid models: `lin` is exactly linear in val_loss,
/// `noise` is pseudo-random, `flat` is constant; one model lacks val_loss.
fn imported(tl: &TestLake, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut csv = String::from("model,val_loss,lin,noise,flat\n");
    let mut s = 17u64;
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for i in 0..n {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let noise = (s >> 11) as f64 / (1u64 << 53) as f64;
        let loss = 2.0 + 0.1 * i as f64 + 0.05 * ((i * 7 % 5) as f64);
        xs.push(noise);
        ys.push(loss);
        csv.push_str(&format!(
            "02x0768_01d{i:02}@0,{loss},{},{noise},3.5\n",
            4.0 - 2.0 * loss
        ));
    }
    csv.push_str("02x0768_01d99@0,,1.0,0.5,3.5\n");
    let f = tl.file("ext.csv", csv.as_bytes());
    let out = tl.run("import", &[("input", &f), ("name", "ext")]);
    assert!(out.contains(&format!("{} models x 3 metrics", n + 1)), "{out}");
    (xs, ys)
}

fn by_metric<'a>(rows: &'a [Correlation], m: &str) -> &'a Correlation {
    rows.iter()
        .find(|r| r.metric == m)
        .unwrap_or_else(|| panic!("no row for {m}"))
}

#[test]
fn r2_slope_and_permutation_p_values() {
    let tl = TestLake::new();
    let n = 12;
    let (xs, ys) = imported(&tl, n);
    let sql = Sql::open(tl.lake()).unwrap();
    let n_perm = 2000;
    let rows = correlations(&sql, "imported:ext", "true", n_perm, 1).unwrap();
    // Closed form for the noise column.
    let (mx, my) = (
        xs.iter().sum::<f64>() / n as f64,
        ys.iter().sum::<f64>() / n as f64,
    );
    let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    let syy: f64 = ys.iter().map(|y| (y - my) * (y - my)).sum();
    let noise = by_metric(&rows, "noise");
    assert_eq!(noise.n_models, n as u64);
    assert!(
        rel(noise.r2.unwrap(), sxy * sxy / (sxx * syy)) < 1e-12,
        "{noise:?}"
    );
    assert!(rel(noise.slope.unwrap(), sxy / sxx) < 1e-12);
    assert!(rel(noise.intercept.unwrap(), my - sxy / sxx * mx) < 1e-12);
    assert!(
        noise
            .note
            .as_deref()
            .unwrap()
            .contains("1 model(s) without val_loss"),
        "{noise:?}"
    );
    // A perfectly correlated metric beats every permutation: p = 1/(n_perm+1).
    let lin = by_metric(&rows, "lin");
    assert!((lin.r2.unwrap() - 1.0).abs() < 1e-12);
    assert_eq!(lin.p_value.unwrap(), 1.0 / (n_perm as f64 + 1.0));
    // A constant metric has no R^2, and says why.
    let flat = by_metric(&rows, "flat");
    assert!(flat.r2.is_none() && flat.p_value.is_none());
    assert!(flat.note.as_deref().unwrap().contains("constant"), "{flat:?}");
    // Same seed, same p; another seed, within Monte-Carlo error.
    let again = correlations(&sql, "imported:ext", "true", n_perm, 1).unwrap();
    assert_eq!(by_metric(&again, "noise").p_value, noise.p_value);
    let other = correlations(&sql, "imported:ext", "true", n_perm, 2).unwrap();
    let (p1, p2) = (
        noise.p_value.unwrap(),
        by_metric(&other, "noise").p_value.unwrap(),
    );
    assert_ne!(p1, p2);
    let sd = (p1 * (1.0 - p1) / n_perm as f64).sqrt();
    assert!((p1 - p2).abs() < 5.0 * sd * 2f64.sqrt() + 1e-3, "{p1} vs {p2}");
    // The p-value of an R^2 of 0.3 or so with 12 points is not tiny.
    assert!(p1 > 0.0 && p1 <= 1.0);
}

#[test]
fn bad_selections_are_explained() {
    let tl = TestLake::new();
    imported(&tl, 4);
    let sql = Sql::open(tl.lake()).unwrap();
    let err = correlations(&sql, "imported:ext", "depth = 99", 100, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("matches no models"), "{err}");
    let rows = correlations(&sql, "imported:ext", "model = '02x0768_01d00@0'", 100, 0).unwrap();
    let r = by_metric(&rows, "noise");
    assert!(
        r.r2.is_none() && r.note.as_deref().unwrap().contains("needs at least 3"),
        "{r:?}"
    );
    let rows = correlations(&sql, "imported:ext", "val_loss IS NULL", 100, 0).unwrap();
    assert!(
        by_metric(&rows, "noise")
            .note
            .as_deref()
            .unwrap()
            .contains("no model has both"),
        "{rows:?}"
    );
    let err = correlations(&sql, "imported:nope", "true", 100, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("matches no models"), "{err}");
    let err = tl.run_err(
        "correlate",
        &[("source", "imported:ext"), ("where", "nonsense_column > 1")],
    );
    assert!(err.contains("nonsense_column"), "{err}");
    // The selection is one predicate, not SQL text to splice.
    for bad in [
        "1=1) UNION SELECT * FROM imported_metrics_long WHERE (1=1",
        "true; DROP TABLE x",
        "depth = 2 ORDER BY model",
    ] {
        let err = correlations(&sql, "imported:ext", bad, 100, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not one SQL predicate"), "{bad}: {err}");
    }
    // Imported grid ids are parsed.
    let out = sql
        .query("SELECT depth, width, epochs, weight_decay, seed, checkpoint FROM imported_metrics WHERE model = '02x0768_01d03@0' LIMIT 1", false)
        .unwrap();
    let b = &out[0];
    assert_eq!(b.column(3).as_primitive::<Float64Type>().value(0), 5e-4);
    assert_eq!(
        format!(
            "{:?}",
            b.column(1)
                .as_primitive::<arrow::datatypes::UInt32Type>()
                .value(0)
        ),
        "768"
    );
    assert!(!b.column(5).is_null(0));
}

/// Every permutation of 8 models enumerated: the exact permutation p-value.
/// The aggregate's Monte-Carlo estimate (20,000 draws) lies within 4
/// standard errors of it; Spearman's rho equals the closed form for
/// distinct values; the bootstrap interval brackets the observed R^2.
#[test]
fn permutation_test_matches_exact_enumeration() {
    let tl = TestLake::new();
    let n = 8;
    let (xs, ys) = imported(&tl, n);
    let sql = Sql::open(tl.lake()).unwrap();
    let n_perm = 20_000u64;
    let rows = correlations(&sql, "imported:ext", "val_loss IS NOT NULL", n_perm, 3).unwrap();
    let noise = by_metric(&rows, "noise");
    let r2 = |x: &[f64], y: &[f64]| {
        let k = x.len() as f64;
        let (mx, my) = (x.iter().sum::<f64>() / k, y.iter().sum::<f64>() / k);
        let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
        let sxx: f64 = x.iter().map(|a| (a - mx) * (a - mx)).sum();
        let syy: f64 = y.iter().map(|b| (b - my) * (b - my)).sum();
        sxy * sxy / (sxx * syy)
    };
    let observed = r2(&xs, &ys);
    // Heap's algorithm over all 8! orders of the losses.
    let mut perm = ys.clone();
    let mut c = vec![0usize; n];
    let (mut total, mut hits) = (1u64, u64::from(r2(&xs, &perm) >= observed * (1.0 - 1e-12)));
    let mut i = 0;
    while i < n {
        if c[i] < i {
            if i % 2 == 0 {
                perm.swap(0, i);
            } else {
                perm.swap(c[i], i);
            }
            total += 1;
            hits += u64::from(r2(&xs, &perm) >= observed * (1.0 - 1e-12));
            c[i] += 1;
            i = 0;
        } else {
            c[i] = 0;
            i += 1;
        }
    }
    assert_eq!(total, 40_320);
    let exact = hits as f64 / total as f64;
    let p = noise.p_value.unwrap();
    let se = (exact * (1.0 - exact) / n_perm as f64).sqrt();
    assert!(
        (p - exact).abs() < 4.0 * se + 1.0 / n_perm as f64,
        "{p} vs exact {exact}"
    );
    // Spearman: 1 - 6 sum d^2 / (n (n^2 - 1)) for distinct values.
    let rank = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .map(|x| 1.0 + v.iter().filter(|y| *y < x).count() as f64)
            .collect()
    };
    let (rx, ry) = (rank(&xs), rank(&ys));
    let d2: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - b) * (a - b)).sum();
    let nf = n as f64;
    let rho = 1.0 - 6.0 * d2 / (nf * (nf * nf - 1.0));
    assert!(
        (noise.spearman_rho.unwrap() - rho).abs() < 1e-12,
        "{noise:?} vs {rho}"
    );
    let (lo, hi) = (noise.r2_ci_low.unwrap(), noise.r2_ci_high.unwrap());
    assert!(
        0.0 <= lo && lo <= observed && observed <= hi && hi <= 1.0,
        "{lo} {observed} {hi}"
    );
}

/// A malformed setting of the study's last stages is refused before its
/// first stage runs: nothing is ingested, let alone trained.
#[test]
fn a_bad_setting_of_a_late_stage_is_refused_before_any_work() {
    let tl = TestLake::new();
    let exp = std::fs::read_to_string(micro_experiment(&tl)).unwrap();
    let bad = tl.file("bad.toml", format!("{exp}[analyze]\ntile = 0\n").as_bytes());
    let err = tl.run_err("all", &[("experiment", &bad)]);
    assert_eq!(err, "stage analyze: parameter tile: 0 is outside 1..=65536");
    // Only the failure record `pipeline status` shows.
    let keys: Vec<String> = tl.lake().list("").unwrap().into_iter().map(|(k, _)| k).collect();
    assert!(
        keys.iter().all(|k| k.starts_with("_status/failed/all/")),
        "{keys:?}"
    );
}

/// The main job on a micro experiment: every stage, every table, the
/// correlation table printed; a second run only says everything is done.
#[test]
fn the_whole_study_runs_and_resumes() {
    let tl = TestLake::new();
    let exp = micro_experiment(&tl);
    // Two training workers (the grid's four models two at a time).
    let out = tl.run("all", &[("experiment", &exp), ("train_workers", "2")]);
    for m in [
        "nc1_cdnv",
        "nc2_equinorm_cov",
        "nc3_duality_mean",
        "nc4_agreement",
        "gnc2_uniformity_cov",
    ] {
        assert!(out.contains(m), "{m} missing from\n{out}");
    }
    assert!(out.contains("lake: file://"), "{out}");
    let sql = Sql::open(tl.lake()).unwrap();
    let mm = sql
        .query(
            "SELECT model, val_loss, nc1_cdnv FROM model_metrics WHERE final_layer ORDER BY model",
            false,
        )
        .unwrap();
    assert_eq!(mm[0].num_rows(), 4);
    let corr = sql
        .query("SELECT metric, n_models, r2, p_value FROM correlations", false)
        .unwrap();
    let n: usize = corr.iter().map(|b| b.num_rows()).sum();
    assert_eq!(n, 13);
    // One worker gives the same results: every logged loss, validation
    // loss, class statistic and decision equal to the last bit in a second
    // lake (each worker takes its models through train, eval, collect and
    // decide).
    let one = TestLake::new();
    one.run("all", &[("experiment", &exp), ("train_workers", "1")]);
    for q in BIT_EXACT_RESULTS {
        let (two, single) = (table_lines(tl.lake(), q), table_lines(one.lake(), q));
        assert!(two.len() >= 8, "{two:?}");
        assert_eq!(two, single, "{q}");
    }
    // A second run finds everything done: nothing is trained or collected again.
    let manifest_of = |t: &str, part: &[(&str, &str)]| {
        tl.lake()
            .manifest(&lc_lake::artifact::Artifact::new(t, part).unwrap())
            .unwrap()
            .unwrap()
            .created
    };
    let trained = manifest_of("train_log", &[("model", "01x0008_01d01")]);
    let collected = manifest_of(
        "class_stats",
        &[("model", "01x0008_01d01@0"), ("split", "train"), ("layer", "1")],
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let again = tl.run("all", &[("experiment", &exp)]);
    assert!(again.contains("nc1_cdnv"));
    assert_eq!(manifest_of("train_log", &[("model", "01x0008_01d01")]), trained);
    assert_eq!(
        manifest_of(
            "class_stats",
            &[("model", "01x0008_01d01@0"), ("split", "train"), ("layer", "1")]
        ),
        collected
    );
    let status = std::process::Command::new(crate::common::bin())
        .args(["--lake", &tl.url(), "-q", "status"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    for t in [
        "documents",
        "tokens",
        "chunks",
        "vocab",
        "models",
        "train_log",
        "class_stats",
        "decisions",
        "pair_tiles",
        "class_metrics",
        "correlations",
    ] {
        assert!(status.contains(t), "{t} not in status:\n{status}");
    }
}

/// A published per-model table (means and standard deviations, match
/// counts) imported with derived metrics as SQL expressions: the ratios
/// come out as computed by hand, a division by zero is NULL with a note,
/// seedless paper ids get their recipe, and the result correlates.
#[test]
fn import_derives_metrics_with_sql_expressions() {
    let tl = TestLake::new();
    let rows = [
        ("02x0768_01d@0", 2.10, 1.60, 0.32, 800.0, 200.0),
        ("02x0768_01d05@0", 2.05, 1.70, 0.30, 820.0, 180.0),
        ("02x0768_01d07@0", 2.20, 1.50, 0.36, 760.0, 240.0),
        ("02x0768_01d09@0", 2.00, 1.75, 0.28, 850.0, 150.0),
        ("04x0256_03L@1", 2.40, 0.0, 0.40, 700.0, 300.0),
    ];
    let mut csv = String::from("model,val_loss,norms_log_mean,norms_log_std,nc4_matches,nc4_misses\n");
    for (m, l, mean, std, hit, miss) in rows {
        csv.push_str(&format!("{m},{l},{mean},{std},{hit},{miss}\n"));
    }
    let f = tl.file("published.csv", csv.as_bytes());
    let out = tl.run(
        "import",
        &[
            ("input", &f),
            ("name", "paper"),
            (
                "columns",
                "equinorm=norms_log_std / norms_log_mean, agreement=nc4_matches/(nc4_matches + nc4_misses), norms_log_mean:lognorm_mean",
            ),
        ],
    );
    assert!(out.contains("5 models x 3 metrics"), "{out}");
    assert!(out.contains("equinorm: 1 value(s) not finite"), "{out}");
    let sql = Sql::open(tl.lake()).unwrap();
    let got = sql
        .query(
            "SELECT model, metric, value, depth, seed FROM imported_metrics ORDER BY model, metric",
            false,
        )
        .unwrap();
    let mut seen = 0;
    for b in &got {
        for i in 0..b.num_rows() {
            let model = b.column(0).as_string::<i32>().value(i);
            let metric = b.column(1).as_string::<i32>().value(i);
            let value = b.column(2).as_primitive::<Float64Type>();
            let (_, _, mean, std, hit, miss) = rows.iter().find(|r| r.0 == model).unwrap();
            let want: f64 = match metric {
                "equinorm" => std / mean,
                "agreement" => hit / (hit + miss),
                "lognorm_mean" => *mean,
                other => panic!("unexpected metric {other}"),
            };
            if want.is_finite() {
                assert!(rel(value.value(i), want) < 1e-15, "{model} {metric}");
            } else {
                assert!(value.is_null(i), "{model} {metric}");
            }
            let depth = b.column(3).as_primitive::<arrow::datatypes::UInt32Type>();
            assert_eq!(depth.value(i), if model.starts_with("04") { 4 } else { 2 });
            let seed = b.column(4).as_primitive::<arrow::datatypes::UInt32Type>();
            assert_eq!(seed.is_null(i), !model.contains("d0"), "{model}");
            seen += 1;
        }
    }
    assert_eq!(seen, 15);
    // Seedless ids are selected by their recipe like any other.
    let rows = correlations(&sql, "imported:paper", "depth = 2 AND width = 768", 100, 0).unwrap();
    assert_eq!(by_metric(&rows, "agreement").n_models, 4);
    // A column that is not there, or text that is not an expression, is named.
    for (cols, word) in [
        ("x=no_such_column * 2", "no_such_column"),
        ("x=norms_log_mean +", "x=norms_log_mean +"),
    ] {
        let err = tl.run_err("import", &[("input", &f), ("name", "bad"), ("columns", cols)]);
        assert!(err.contains(word) && err.contains("published.csv"), "{err}");
    }
}

/// The value of `metric` for `model` in imported_metrics/source=`name`
/// (None: NULL).
fn imported_value(tl: &TestLake, name: &str, model: &str, metric: &str) -> Option<f64> {
    let sql = Sql::open(tl.lake()).unwrap();
    let got = sql
        .query(
            &format!(
                "SELECT value FROM imported_metrics WHERE source = '{name}' AND model = '{model}' AND metric = '{metric}'"
            ),
            false,
        )
        .unwrap();
    let b = got.iter().find(|b| b.num_rows() > 0).expect("one row");
    let v = b.column(0).as_primitive::<Float64Type>();
    v.is_valid(0).then(|| v.value(0))
}

/// What researchers' tables hold: integer columns with blanks, a metric
/// column with NaN and inf written as text (numbers, stored as NULL and
/// counted), a text column (not a metric); and the same table as Parquet
/// with 32-bit columns and a dictionary-encoded model column.
#[test]
fn import_reads_numbers_written_as_text_and_narrow_parquet_types() {
    let tl = TestLake::new();
    let csv = "model,val_loss,matches,ratio,label\n\
               02x0768_01d00@0,2.5,7,NaN,x\n\
               02x0768_01d01@0,2.25,,inf,y\n\
               02x0768_01d02@0,2.0,9,0.125,z\n";
    let f = tl.file("mixed.csv", csv.as_bytes());
    let out = tl.run("import", &[("input", &f), ("name", "mixed")]);
    assert!(out.contains("3 models x 2 metrics"), "{out}");
    assert!(out.contains("ratio: 2 value(s) not finite"), "{out}");
    assert_eq!(
        imported_value(&tl, "mixed", "02x0768_01d00@0", "matches"),
        Some(7.0)
    );
    assert_eq!(imported_value(&tl, "mixed", "02x0768_01d01@0", "matches"), None);
    assert_eq!(imported_value(&tl, "mixed", "02x0768_01d00@0", "ratio"), None);
    assert_eq!(
        imported_value(&tl, "mixed", "02x0768_01d02@0", "ratio"),
        Some(0.125)
    );
    let err = tl.run_err(
        "import",
        &[("input", &f), ("name", "bad"), ("loss_column", "loss")],
    );
    assert!(
        err.contains("mixed.csv") && err.contains("no column 'loss'"),
        "{err}"
    );

    use arrow::array::{ArrayRef, DictionaryArray, Float32Array, Int32Array};
    use arrow::datatypes::Int32Type;
    use std::sync::Arc;
    let models: DictionaryArray<Int32Type> = ["02x0768_01d00@0", "02x0768_01d01@0"].into_iter().collect();
    let batch = arrow::record_batch::RecordBatch::try_from_iter([
        ("model", Arc::new(models) as ArrayRef),
        ("val_loss", Arc::new(Float32Array::from(vec![2.5f32, 2.25]))),
        ("matches", Arc::new(Int32Array::from(vec![Some(7), None]))),
    ])
    .unwrap();
    let mut bytes = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let f = tl.file("narrow.parquet", &bytes);
    let out = tl.run("import", &[("input", &f), ("name", "narrow")]);
    assert!(out.contains("2 models x 1 metrics"), "{out}");
    assert_eq!(
        imported_value(&tl, "narrow", "02x0768_01d00@0", "matches"),
        Some(7.0)
    );
    assert_eq!(imported_value(&tl, "narrow", "02x0768_01d01@0", "matches"), None);
}
