//! Cross-model analysis: import, correlate (R^2 and permutation tests in
//! DataFusion), and the end-to-end `stage=all`.

use arrow::array::{Array, AsArray};
use arrow::datatypes::Float64Type;
use pipeline::sql::Sql;
use pipeline::stages::correlate::{Correlation, correlations};

use crate::common::{TestLake, data, first_stories, rel};

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

/// The main job on a micro experiment: every stage, every table, the
/// correlation table printed; a second run only says everything is done.
#[test]
fn the_whole_study_runs_and_resumes() {
    let tl = TestLake::new();
    let train = tl.file(
        "tr.txt",
        first_stories(&data("tinystories_train_sample.txt"), 60).as_bytes(),
    );
    let val = tl.file(
        "va.txt",
        first_stories(&data("tinystories_val_sample.txt"), 20).as_bytes(),
    );
    let exp = tl.file(
        "exp.toml",
        format!(
            r#"[data]
dataset = "micro"
train = "{train}"
validation = "{val}"
tokenizer = "{}"
T = 32
[train]
heads = 2
context = 64
lr = 0.01
batch = 8
[grid]
depths = [1]
widths = [4, 8]
epochs = [1]
weight_decays = [0.0005]
seeds = [0, 1]
[collect]
batch = 8
[correlate]
permutations = 200
"#,
            data("tokenizer.json")
        )
        .as_bytes(),
    );
    let out = tl.run("all", &[("experiment", &exp)]);
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
    assert_eq!(n, 10);
    // A second run finds everything done: nothing is trained or collected again.
    let manifest_of = |t: &str, part: &[(&str, &str)]| {
        tl.lake()
            .manifest(&pipeline::artifact::Artifact::new(t, part).unwrap())
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
