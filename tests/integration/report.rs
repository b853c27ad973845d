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

/// The columns of the paper's published per-model table
/// (`artifacts/lc-2024_10_24.csv` of rhubarbwu/linguistic-collapse).
const PAPER_COLUMNS: &str = "model,n_params,val_acc,val_loss,perplex,cdnv,norms_mean,norms_var,etf_error,interfere_mean,interfere_var,log_kern_mean,log_kern_var,dual_error,simdot_mean,simdot_var,simcos_mean,simcos_var,dists_mean,dists_var,hits,misses,norms_log_mean,norms_log_var";

/// The README's mapping of those columns onto the report's metrics.
const PAPER_MAPPING: &str = "nc1_cdnv=cdnv, nc2_equinorm_cov=sqrt(norms_log_var)/norms_log_mean, nc2_etf_error=etf_error, nc3_duality_mean=simcos_mean, unc3_duality_cov=sqrt(simcos_var)/simcos_mean, nc4_agreement=hits/(hits+misses), n_params=n_params";

/// R² and the least-squares line of (x, y) pairs, by their definitions in
/// f64: Sxy² / (Sxx Syy), slope Sxy / Sxx.
fn brute_fit(pairs: &[(f64, f64)]) -> (f64, f64, f64) {
    let n = pairs.len() as f64;
    let mx = pairs.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pairs.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pairs.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let syy: f64 = pairs.iter().map(|p| (p.1 - my).powi(2)).sum();
    let sxy: f64 = pairs.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxy * sxy / (sxx * syy), sxy / sxx, my - sxy / sxx * mx)
}

/// A table in the layout of the paper's published CSV, imported with its
/// columns mapped onto the report's metric names as the README maps them,
/// drawn beside the lake's own models (source=all) and alone
/// (source=imported:paper): every row of Figure 1's CSV equals SQL over the
/// same selection, for both sources, and the pooled R² and line equal an
/// f64 brute force over both.
fn imported_models_beside_the_lakes(tl: &TestLake) {
    let mut csv = format!("{PAPER_COLUMNS}\n");
    for (i, model) in [
        "02x0064_01d@0",
        "02x0128_01d@0",
        "04x0128_01L@0",
        "04x0256_10d@5",
        "08x0256_10L@9",
    ]
    .iter()
    .enumerate()
    {
        let k = i as f64;
        let mut row = vec![model.to_string()];
        for column in PAPER_COLUMNS.split(',').skip(1) {
            let v = match column {
                "n_params" => 1e6 * 4f64.powf(k),
                "val_loss" => 3.2 - 0.2 * k + 0.03 * (k * k),
                "cdnv" => 10f64.powf(-k),
                "etf_error" => 1.41 - 0.002 * k,
                "simcos_mean" => 0.1 + 0.05 * k,
                "simcos_var" => 0.01 + 0.001 * k,
                "hits" => 500.0 + 60.0 * k,
                "misses" => 500.0 - 60.0 * k,
                "norms_log_mean" => 2.0 + 0.1 * k,
                "norms_log_var" => 0.09 - 0.01 * k,
                _ => 0.5 + k,
            };
            row.push(v.to_string());
        }
        csv.push_str(&row.join(","));
        csv.push('\n');
    }
    let f = tl.file("paper.csv", csv.as_bytes());
    tl.run(
        "import",
        &[("input", &f), ("name", "paper"), ("columns", PAPER_MAPPING)],
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
    // The paper's table maps no column onto these two.
    let unmapped = ["nc2_equiangular_cov", "gnc2_uniformity_cov"];
    let mut pooled_want = BTreeMap::new();
    for (metric, got) in &theirs {
        let want = imported(metric);
        if unmapped.contains(&metric.as_str()) {
            assert!(want.is_empty() && got.iter().all(|r| r.1.is_none()), "{got:?}");
            continue;
        }
        assert_eq!(got.len(), 5, "{metric}");
        for ((m, v, l), (wm, wv)) in got.iter().zip(&want) {
            assert_eq!((m, *v, *l), (wm, wv[0], wv[1]), "{metric}");
        }
        let ours = query_f64(
            &sql,
            &format!(
                "SELECT model, {metric}, val_loss FROM model_metrics WHERE final_layer ORDER BY model, layer"
            ),
        );
        let own_rows = &own[metric];
        assert_eq!(own_rows.len(), ours.len());
        for ((m, v, _), (wm, wv)) in own_rows.iter().zip(&ours) {
            assert_eq!((m, *v), (wm, wv[0]), "{metric}");
        }
        // Both sources' points, from SQL, for the pooled fit.
        let pairs = |rows: &[(String, Vec<Option<f64>>)]| -> Vec<(f64, f64)> {
            rows.iter()
                .filter_map(|(_, v)| Some((v[0]?, v[1]?)))
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        };
        let (a, b) = (pairs(&ours), pairs(&want));
        if a.len() >= 3 && b.len() >= 3 {
            pooled_want.insert(metric.clone(), brute_fit(&[a, b].concat()));
        }
    }
    // The pooled R² and line where both sources have three points; the
    // agreement to 1e-9 (relative) allows for summation order.
    let (header, pooled) = read_csv(&both.join("pooled_correlations.csv"));
    assert_eq!(header, ["metric", "n_models", "r2", "slope", "intercept"]);
    assert_eq!(pooled.len(), pooled_want.len(), "{pooled:?}");
    assert!(pooled.len() >= 5, "{pooled:?}");
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1e-12);
    for r in &pooled {
        let (r2, slope, intercept) = pooled_want[&r[0]];
        let got: Vec<f64> = r[2..5].iter().map(|v| v.parse().unwrap()).collect();
        assert!(
            close(got[0], r2) && close(got[1], slope) && close(got[2], intercept),
            "{r:?} vs {:?}",
            (r2, slope, intercept)
        );
    }
    let svg = std::fs::read_to_string(both.join("metric_vs_loss.svg")).unwrap();
    let cdnv_r2 = pooled
        .iter()
        .find(|r| r[0] == "nc1_cdnv")
        .map(|r| r[2].parse::<f64>().unwrap());
    assert!(
        svg.contains(&format!("pooled {:.2}", cdnv_r2.unwrap())),
        "the pooled R² is in the title"
    );
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
    for metric in unmapped {
        assert!(md.contains(&format!("no model of paper has {metric}")), "{md}");
    }
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
    // The columns the table lacks are left out of the figure (the page says
    // why), and so are the sections only the lake's own models have.
    let svg = std::fs::read_to_string(alone.join("metric_vs_loss.svg")).unwrap();
    assert!(svg.contains("nc1_cdnv") && !svg.contains("nc2_equiangular_cov"));
    let md = std::fs::read_to_string(alone.join("report.md")).unwrap();
    assert!(
        md.contains("nc2_equiangular_cov: no model in the selection has nc2_equiangular_cov")
            && md.contains("map a column onto it at import"),
        "{md}"
    );
    assert!(md.contains("Imported tables carry one number per model") && !md.contains("Token tables"));
    assert!(!alone.join("through_depth.png").exists() && !alone.join("tokens.csv").exists());
    assert!(!alone.join("pooled_correlations.csv").exists());
    assert_png_drawn(&alone.join("metric_vs_loss.png"));
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
