//! The report stage: files, figures that render, CSVs equal to SQL, pages
//! that reference only what exists, and degenerate selections explained.

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type};
use pipeline::sql::Sql;

use crate::common::{TestLake, data, first_stories};

/// A grid of four tiny models through every stage, one of them analysed at
/// every layer.
fn grid_lake() -> TestLake {
    let tl = TestLake::new();
    let train = tl.file(
        "train.txt",
        first_stories(&data("tinystories_train_sample.txt"), 40).as_bytes(),
    );
    let val = tl.file(
        "val.txt",
        first_stories(&data("tinystories_val_sample.txt"), 10).as_bytes(),
    );
    let exp = tl.file(
        "grid.toml",
        format!(
            r#"[data]
dataset = "g"
train = "{train}"
validation = "{val}"
T = 32
[train]
lr = 0.01
batch = 8
context = 64
heads = 2
[grid]
depths = [1]
widths = [8, 16]
epochs = [1]
seeds = [0, 1]
[collect]
batch = 8
layers = "all"
[decide]
batch = 8
[analyze]
dump_pairs = "topk:5"
[correlate]
permutations = 200
"#
        )
        .as_bytes(),
    );
    let out = tl.run("all", &[("experiment", &exp)]);
    assert!(out.contains("report of 4 model(s)"), "{out}");
    tl.run("analyze", &[("model", "01x0016_01n01"), ("layer", "0")]);
    tl
}

/// Parse a CSV file into a header and rows.
fn read_csv(path: &std::path::Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::to_string)
        .collect();
    let rows = lines
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect();
    (header, rows)
}

/// Every value of a query as text keyed by its first column(s).
fn query_f64(sql: &Sql, q: &str) -> Vec<(String, Vec<Option<f64>>)> {
    let mut out = Vec::new();
    for b in sql.query(q, false).unwrap() {
        let key = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
        let key = key.as_string::<i32>();
        for i in 0..b.num_rows() {
            let vals = (1..b.num_columns())
                .map(|c| {
                    let col = arrow::compute::cast(b.column(c), &DataType::Float64).unwrap();
                    let col = col.as_primitive::<Float64Type>();
                    col.is_valid(i).then(|| col.value(i))
                })
                .collect();
            out.push((key.value(i).to_string(), vals));
        }
    }
    out
}

fn parse_opt(s: &str) -> Option<f64> {
    (!s.is_empty()).then(|| s.parse().unwrap())
}

#[test]
fn report_files_render_and_match_sql() {
    let tl = grid_lake();
    let out_dir = tl.dir.path().join("report");
    let out = tl.run(
        "report",
        &[("out", out_dir.to_str().unwrap()), ("permutations", "200")],
    );
    assert!(out.contains("index.html"), "{out}");
    let sql = Sql::open(tl.lake()).unwrap();

    // Figure 1's data: every metric of every selected model, as SQL has it.
    let (header, rows) = read_csv(&out_dir.join("metric_vs_loss.csv"));
    assert_eq!(header, ["model", "width", "depth", "metric", "value", "val_loss"]);
    // metric -> (model, value, val_loss) rows.
    type Rows = Vec<(String, Option<f64>, Option<f64>)>;
    let mut by_metric: BTreeMap<String, Rows> = BTreeMap::new();
    for r in &rows {
        by_metric
            .entry(r[3].clone())
            .or_default()
            .push((r[0].clone(), parse_opt(&r[4]), parse_opt(&r[5])));
    }
    assert_eq!(by_metric.len(), 8);
    for (metric, got) in &by_metric {
        let want = query_f64(
            &sql,
            &format!(
                "SELECT model, {metric}, val_loss FROM model_metrics WHERE final_layer ORDER BY model, layer"
            ),
        );
        assert_eq!(got.len(), want.len(), "{metric}");
        for ((m, v, l), (wm, wv)) in got.iter().zip(&want) {
            assert_eq!(m, wm);
            assert_eq!((*v, *l), (wv[0], wv[1]), "{metric} of {m}");
        }
    }
    // Training curves: train_log of the selected models.
    let (_, rows) = read_csv(&out_dir.join("training_curves.csv"));
    let want = query_f64(
        &sql,
        "SELECT model, step, loss FROM train_log ORDER BY model, step",
    );
    assert_eq!(rows.len(), want.len());
    for (r, (m, v)) in rows.iter().zip(&want) {
        assert_eq!((&r[0], parse_opt(&r[1]), parse_opt(&r[2])), (m, v[0], v[1]));
    }
    // Through depth: the model analysed at layers 0 and 1.
    let (_, rows) = read_csv(&out_dir.join("through_depth.csv"));
    let want = query_f64(
        &sql,
        "SELECT layer, nc1_cdnv FROM model_metrics WHERE model = '01x0016_01n01@0' ORDER BY CAST(layer AS INT)",
    );
    let got: Vec<(String, Option<f64>)> = rows
        .iter()
        .filter(|r| r[0] == "01x0016_01n01@0" && r[2] == "nc1_cdnv")
        .map(|r| (r[1].clone(), parse_opt(&r[3])))
        .collect();
    assert_eq!(got.len(), 2);
    for ((l, v), (wl, wv)) in got.iter().zip(&want) {
        assert_eq!((l, *v), (wl, wv[0]));
    }
    // The correlation table is the correlations table of this selection.
    let (header, rows) = read_csv(&out_dir.join("correlations.csv"));
    assert_eq!(header[0], "metric");
    let r2_col = header.iter().position(|h| h == "r2").unwrap();
    let want = query_f64(
        &sql,
        "SELECT metric, r2 FROM correlations WHERE selection = 'final_layer' AND n_permutations = 200 ORDER BY metric",
    );
    assert_eq!(rows.len(), want.len());
    for (r, (m, v)) in rows.iter().zip(&want) {
        assert_eq!((&r[0], parse_opt(&r[r2_col])), (m, v[0]));
    }

    // Every figure: SVG that parses and renders, PNG that decodes and is not blank.
    for name in [
        "metric_vs_loss",
        "scale_trends",
        "through_depth",
        "training_curves",
    ] {
        let svg = std::fs::read_to_string(out_dir.join(format!("{name}.svg"))).unwrap();
        pipeline::figures::svg_to_png(&svg).unwrap_or_else(|e| panic!("{name}.svg: {e}"));
        let png = std::fs::read(out_dir.join(format!("{name}.png"))).unwrap();
        let img = resvg::tiny_skia::Pixmap::decode_png(&png).unwrap();
        let first = img.pixels()[0];
        let differing = img.pixels().iter().filter(|p| **p != first).count();
        assert!(differing > img.pixels().len() / 100, "{name}.png is blank");
    }
    // The page references only files that exist, and nothing online.
    let html = std::fs::read_to_string(out_dir.join("index.html")).unwrap();
    let mut refs = 0;
    for attr in ["src=\"", "href=\""] {
        for part in html.split(attr).skip(1) {
            let target = &part[..part.find('"').unwrap()];
            assert!(!target.contains("://"), "index.html fetches {target}");
            assert!(
                out_dir.join(target).is_file(),
                "index.html references missing {target}"
            );
            refs += 1;
        }
    }
    assert!(refs >= 14, "{refs} references");
    assert!(!html.contains("<script"));
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(md.contains("![") && md.contains("metric_vs_loss.png"));
    // Token tables name tokens.
    assert!(html.contains("most interfering pairs") && html.contains("smallest centred-mean norm"));
}

/// One model with no decisions: the report is written, and says why the
/// correlations and the NC4 panel are empty.
#[test]
fn a_degenerate_selection_is_explained() {
    let tl = grid_lake();
    let out = tl.run(
        "report",
        &[
            ("where", "final_layer AND model = '01x0008_01n00@0'"),
            ("permutations", "100"),
        ],
    );
    assert!(out.contains("report of 1 model(s)"), "{out}");
    let dir = tl.dir.path().join("lake/reports");
    let sel = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read_to_string(p.join("report.md")).is_ok_and(|m| m.contains("1 model(s)")));
    let sel = sel.expect("the report is under the lake's reports/");
    let md = std::fs::read_to_string(sel.join("report.md")).unwrap();
    assert!(md.contains("R^2 needs at least 3"), "{md}");
    // Without decisions NC4 is NULL: the panel and the page say why.
    tl.lake().delete_prefix("decisions").unwrap();
    let out_dir = tl.dir.path().join("no-decisions");
    tl.run(
        "report",
        &[
            ("out", out_dir.to_str().unwrap()),
            ("permutations", "100"),
            ("seed", "3"),
        ],
    );
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(md.contains("NC4 needs decisions"), "{md}");
    let svg = std::fs::read_to_string(out_dir.join("metric_vs_loss.svg")).unwrap();
    assert!(svg.contains("NC4 needs decisions"));
}
