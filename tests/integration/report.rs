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

/// metric -> (model, value, val_loss) rows of one source of a
/// metric_vs_loss.csv.
type Figure1Rows = BTreeMap<String, Vec<(String, Option<f64>, Option<f64>)>>;

fn figure1_rows(rows: &[Vec<String>], source: &str) -> Figure1Rows {
    let mut by_metric = Figure1Rows::new();
    for r in rows.iter().filter(|r| r[0] == source) {
        by_metric
            .entry(r[4].clone())
            .or_default()
            .push((r[1].clone(), parse_opt(&r[5]), parse_opt(&r[6])));
    }
    by_metric
}

/// The PNG decodes and is not blank: over 1 % of its pixels differ from
/// the first.
fn assert_png_drawn(path: &std::path::Path) {
    let png = std::fs::read(path).unwrap();
    let img = resvg::tiny_skia::Pixmap::decode_png(&png).unwrap();
    let first = img.pixels()[0];
    let differing = img.pixels().iter().filter(|p| **p != first).count();
    assert!(
        differing > img.pixels().len() / 100,
        "{} is blank",
        path.display()
    );
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
    assert_eq!(
        header,
        [
            "source", "model", "width", "depth", "metric", "value", "val_loss", "n_params"
        ]
    );
    let by_metric = figure1_rows(&rows, "model_metrics");
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
    assert_eq!(header[..2], ["source", "metric"]);
    let r2_col = header.iter().position(|h| h == "r2").unwrap();
    let want = query_f64(
        &sql,
        "SELECT metric, r2 FROM correlations WHERE selection = 'final_layer' AND n_permutations = 200 ORDER BY metric",
    );
    assert_eq!(rows.len(), want.len());
    for (r, (m, v)) in rows.iter().zip(&want) {
        assert_eq!((&r[1], parse_opt(&r[r2_col])), (m, v[0]));
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
        assert_png_drawn(&out_dir.join(format!("{name}.png")));
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

    imported_models_beside_the_lakes(&tl);
}

/// A table in the layout of the paper's published CSV, imported with its
/// columns mapped onto the report's metric names, drawn beside the lake's
/// own models (source=all) and alone (source=imported:paper): every row of
/// Figure 1's CSV equals SQL over the same selection, for both sources.
fn imported_models_beside_the_lakes(tl: &TestLake) {
    let mut csv = String::from(
        "model,cdnv_mean,norms_log_mean,norms_log_std,interfere_mean,interfere_std,log_dist_mean,log_dist_std,sims_mean,sims_std,matches,misses,val_loss,params\n",
    );
    for (i, model) in [
        "02x0064_01d@0",
        "02x0128_01d@0",
        "04x0128_01d@0",
        "04x0256_01d@0",
        "08x0256_01d@0",
    ]
    .iter()
    .enumerate()
    {
        let k = i as f64;
        csv.push_str(&format!(
            "{model},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            10f64.powf(-k),
            2.0 + 0.1 * k,
            0.3 - 0.02 * k,
            0.05 + 0.01 * k,
            0.4 - 0.03 * k,
            -1.0 - 0.1 * k,
            0.2,
            0.1 + 0.05 * k,
            0.05,
            500.0 + 60.0 * k,
            500.0 - 60.0 * k,
            3.2 - 0.2 * k,
            1e6 * 4f64.powf(k)
        ));
    }
    let f = tl.file("paper.csv", csv.as_bytes());
    tl.run(
        "import",
        &[
            ("input", &f),
            ("name", "paper"),
            (
                "columns",
                "nc1_cdnv=cdnv_mean, nc2_equinorm_cov=norms_log_std/norms_log_mean, nc2_equiangular_cov=interfere_std/interfere_mean, gnc2_uniformity_cov=log_dist_std/abs(log_dist_mean), nc3_duality_mean=sims_mean, unc3_duality_cov=sims_std/sims_mean, nc4_agreement=matches/(matches+misses), n_params=params",
            ),
        ],
    );
    let sql = Sql::open(tl.lake()).unwrap();
    let imported = |metric: &str| {
        query_f64(
            &sql,
            &format!(
                "SELECT model, value, val_loss FROM imported_metrics_long WHERE source = 'paper' AND metric = '{metric}' ORDER BY model"
            ),
        )
    };
    let both = tl.dir.path().join("report-all");
    tl.run(
        "report",
        &[
            ("out", both.to_str().unwrap()),
            ("source", "all"),
            ("permutations", "200"),
        ],
    );
    let (_, rows) = read_csv(&both.join("metric_vs_loss.csv"));
    let (own, theirs) = (
        figure1_rows(&rows, "model_metrics"),
        figure1_rows(&rows, "imported:paper"),
    );
    assert_eq!((own.len(), theirs.len()), (8, 8));
    for (metric, got) in &theirs {
        let want = imported(metric);
        if metric == "nc2_etf_error" {
            // The paper's table has no ETF error: its rows are empty.
            assert!(want.is_empty() && got.iter().all(|r| r.1.is_none()), "{got:?}");
            continue;
        }
        assert_eq!(got.len(), 5, "{metric}");
        for ((m, v, l), (wm, wv)) in got.iter().zip(&want) {
            assert_eq!((m, *v, *l), (wm, wv[0], wv[1]), "{metric}");
        }
        let ours = query_f64(
            &sql,
            &format!("SELECT model, {metric} FROM model_metrics WHERE final_layer ORDER BY model, layer"),
        );
        let own_rows = &own[metric];
        assert_eq!(own_rows.len(), ours.len());
        for ((m, v, _), (wm, wv)) in own_rows.iter().zip(&ours) {
            assert_eq!((m, *v), (wm, wv[0]), "{metric}");
        }
    }
    // The correlations of both sources, and the metric one source lacks
    // explained.
    let (header, rows) = read_csv(&both.join("correlations.csv"));
    assert_eq!(header[0], "source");
    for source in ["model_metrics", "imported:paper"] {
        let want = query_f64(
            &sql,
            &format!(
                "SELECT metric FROM correlations WHERE source = '{source}' AND selection = 'final_layer' AND n_permutations = 200"
            ),
        );
        let got = rows.iter().filter(|r| r[0] == source).count();
        assert_eq!(got, want.len(), "{source}");
        assert!(got >= 7, "{source}: {got} correlations");
    }
    let md = std::fs::read_to_string(both.join("report.md")).unwrap();
    assert!(md.contains("no model of paper has nc2_etf_error"), "{md}");
    // Every model has a size: points coloured by it, with the colour bar,
    // and the CSV's sizes are SQL's.
    let svg = std::fs::read_to_string(both.join("metric_vs_loss.svg")).unwrap();
    assert!(svg.contains("colour: parameters") && svg.contains(">\nparameters\n<"));
    let (_, figure1) = read_csv(&both.join("metric_vs_loss.csv"));
    let sizes: BTreeMap<String, Option<f64>> = figure1
        .iter()
        .filter(|r| r[4] == "nc1_cdnv")
        .map(|r| (r[1].clone(), parse_opt(&r[7])))
        .collect();
    let want = query_f64(
        &sql,
        "SELECT model, n_params FROM model_metrics WHERE final_layer UNION ALL SELECT model, value FROM imported_metrics_long WHERE source = 'paper' AND metric = 'n_params'",
    );
    assert_eq!(sizes.len(), want.len());
    for (m, v) in &want {
        assert_eq!(sizes[m], v[0], "{m}");
    }
    // Scale trends, source by source: the paper's models have distinct
    // sizes, so each mean is one model's value.
    let (header, trends) = read_csv(&both.join("scale_trends.csv"));
    assert_eq!(header[..3], ["source", "family", "n_params"]);
    let mut got: Vec<(String, Option<f64>)> = trends
        .iter()
        .filter(|r| r[0] == "imported:paper" && r[3] == "nc1_cdnv")
        .map(|r| (r[2].clone(), parse_opt(&r[4])))
        .collect();
    got.sort_by(|a, b| a.0.parse::<f64>().unwrap().total_cmp(&b.0.parse().unwrap()));
    let want = query_f64(
        &sql,
        "SELECT CAST(CAST(s.value AS BIGINT) AS VARCHAR) AS n_params, c.value AS cdnv FROM imported_metrics_long s JOIN imported_metrics_long c ON s.model = c.model WHERE s.source = 'paper' AND c.source = 'paper' AND s.metric = 'n_params' AND c.metric = 'nc1_cdnv' ORDER BY s.value",
    );
    assert_eq!(got.len(), 5);
    for ((n, v), (wn, wv)) in got.iter().zip(&want) {
        assert_eq!((n, *v), (wn, wv[0]));
    }
    assert!(trends.iter().any(|r| r[0] == "model_metrics"));
    assert_png_drawn(&both.join("metric_vs_loss.png"));

    // The paper's models alone.
    let alone = tl.dir.path().join("report-paper");
    tl.run(
        "report",
        &[
            ("out", alone.to_str().unwrap()),
            ("source", "imported:paper"),
            ("permutations", "200"),
        ],
    );
    let (_, rows) = read_csv(&alone.join("metric_vs_loss.csv"));
    assert!(rows.iter().all(|r| r[0] == "imported:paper") && rows.len() == 5 * 8);
    let err = tl.run_err("report", &[("source", "imported:nosuch")]);
    assert!(err.contains("no imported table named nosuch"), "{err}");
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
