//! `report`: the figures and tables a researcher reads, for a selection of
//! models, as one offline HTML page, a Markdown file, every figure as SVG and
//! PNG, and the data behind every figure as CSV beside it.
//!
//! Reads: the `model_metrics` view (over pair_tiles, class_metrics,
//! decisions, models) and, with `source=imported:NAME` or `all`, imported
//! tables (`imported_metrics_long`, whose metrics map onto the report's by
//! name: import with `columns=nc1_cdnv=...`); `correlations` of each
//! source's selection (computed through the correlate stage when missing),
//! `train_log`, `class_metrics` and `pair_extremes` (token tables, the lake's
//! own models only). Writes: `out=` (a directory or `s3://`
//! prefix), by default the lake's `reports/selection=ID/`:
//!
//! - `metric_vs_loss` (the paper's Figure 1): each property against
//!   validation loss, colour = parameter count (viridis, with a colour bar)
//!   when every model has one, else width; marker = depth; with the
//!   least-squares line and R^2, p and n from the correlations table; with
//!   several sources the marker tells them apart, each has its R^2 in the
//!   title, and where two or more have three points the pooled R^2 joins
//!   them and the pooled line is drawn (`pooled_correlations.csv`);
//! - `correlations`: the correlation table (also in the page);
//! - `scale_trends`: each property against parameter count (log axis), one
//!   line per depth x epochs x weight decay (means over seeds);
//! - `through_depth`: each property against layer index, one line per model,
//!   where several layers were analysed;
//! - `training_curves`: training loss against step, per model;
//! - `tokens`: per model, the classes at both ends of the centred-mean norm,
//!   the self-duality and the within-class variance, and the most and least
//!   interfering pairs, with their token text.
//!
//! The last three exist for the lake's own models only: a report of
//! imported tables alone leaves them out and says so.
//!
//! All data comes from named SQL (`sql/report_*.sql`) over the selection, so
//! each CSV holds exactly what `pipeline sql` returns for it. A panel that
//! cannot be drawn (one model, a metric that is NULL, no decisions) says why,
//! on the figure and in the page.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use lc_lake::lake::Lake;

use crate::error::{Context, Error, Result};
use crate::figures::{ColourScale, Marker, Panel, Series, grid_svg, svg_to_png};
use crate::params::{ParamSpec, Params, param};
use crate::sql::Sql;
use crate::sql::selection;
use crate::stages::{Ctx, Stage};

pub struct Report;

const PARAMS: &[ParamSpec] = &[
    param(
        "source",
        "model",
        "model (the lake's own models), imported:NAME (a table brought in by import), or all (both, side by side)",
    ),
    param(
        "where",
        "final_layer",
        "SQL predicate over model_metrics selecting the models (as in correlate)",
    ),
    param(
        "out",
        "",
        "directory or s3:// prefix to write to (default: the lake's reports/selection=ID/)",
    ),
    param(
        "permutations",
        "10000",
        "permutations of the correlate run the report shows",
    ),
    param("bootstrap", "1000", "bootstrap resamples of that run"),
    param("seed", "0", "seed of that run"),
    param("top", "10", "rows of each token table"),
    param(
        "log",
        "auto",
        "auto: an axis whose values span more than two decades is drawn on a log scale; linear: only parameter counts are",
    ),
];

/// The properties plotted, in the paper's order, with short descriptions.
pub const METRICS: [(&str, &str); 8] = [
    ("nc1_cdnv", "NC1 within-class variability (CDNV)"),
    ("nc2_equinorm_cov", "NC2 equinormness (CoV of log norms)"),
    ("nc2_equiangular_cov", "NC2 equiangularity (CoV of interference)"),
    ("nc2_etf_error", "NC2 simplex-ETF error"),
    ("gnc2_uniformity_cov", "GNC2 hyperspherical uniformity (CoV)"),
    ("nc3_duality_mean", "NC3 self-duality (mean cos)"),
    ("unc3_duality_cov", "UNC3 uniform duality (CoV)"),
    ("nc4_agreement", "NC4 classifier agreement"),
];

/// Why a metric can be missing for every model of `sources`: the lake's
/// own lack a stage, an imported table lacks a mapped column.
fn missing_hint(metric: &str, sources: &[String]) -> String {
    let own = match metric {
        "nc4_agreement" => "NC4 needs decisions: run decide for these models",
        "nc3_duality_mean" | "unc3_duality_cov" => "NC3 needs the models' weights at analyze time",
        _ => "run analyze for these models",
    };
    let imported = format!("map a column onto it at import: columns={metric}=EXPR");
    match (
        sources.iter().any(|s| s == "model_metrics"),
        sources.iter().any(|s| s != "model_metrics"),
    ) {
        (true, true) => format!("{own}; for an imported table, {imported}"),
        (false, true) => format!("the imported table has none: {imported}"),
        _ => own.to_string(),
    }
}

/// Rows of a query result as strings / numbers by column name.
struct Table {
    batches: Vec<RecordBatch>,
}

impl Table {
    fn rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }

    fn locate(&self, mut row: usize) -> (&RecordBatch, usize) {
        for b in &self.batches {
            if row < b.num_rows() {
                return (b, row);
            }
            row -= b.num_rows();
        }
        panic!("row out of range")
    }

    fn f64(&self, col: &str, row: usize) -> Option<f64> {
        let (b, i) = self.locate(row);
        let c = b.column_by_name(col)?;
        let c = arrow::compute::cast(c, &DataType::Float64).ok()?;
        let c = c.as_primitive::<Float64Type>();
        (c.is_valid(i) && c.value(i).is_finite()).then(|| c.value(i))
    }

    fn str(&self, col: &str, row: usize) -> String {
        let (b, i) = self.locate(row);
        let Some(c) = b.column_by_name(col) else {
            return String::new();
        };
        let Ok(c) = arrow::compute::cast(c, &DataType::Utf8) else {
            return String::new();
        };
        let c = c.as_string::<i32>();
        if c.is_valid(i) {
            c.value(i).to_string()
        } else {
            String::new()
        }
    }

    /// The whole result as CSV.
    fn csv(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(&mut out);
            for b in &self.batches {
                w.write(b).ctx("writing CSV")?;
            }
        }
        if self.batches.is_empty() {
            out.extend_from_slice(b"\n");
        }
        Ok(out)
    }
}

fn fmt(x: Option<f64>, prec: usize) -> String {
    x.map(|v| format!("{v:.prec$}")).unwrap_or_else(|| "–".into())
}

/// A number in a table cell.
fn cell(x: Option<f64>) -> String {
    match x {
        None => "–".into(),
        Some(v) if v != 0.0 && !(1e-3..1e5).contains(&v.abs()) => format!("{v:.3e}"),
        Some(v) => format!("{v:.4}"),
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', "\\n")
}

/// Token text shown in tables (visible whitespace).
fn show_token(t: &str) -> String {
    format!("«{}»", t.replace('\n', "\\n").replace('\t', "\\t"))
}

/// A finished figure: its name and what the page says under it.
struct Figure {
    name: String,
    title: String,
    notes: Vec<String>,
}

/// Where and how the report's files are written.
struct Output {
    store: Lake,
    prefix: String,
    files: Vec<String>,
    /// The figures' panels choose log axes themselves (`log=auto`).
    auto_log: bool,
}

impl Output {
    fn put(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let key = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        };
        self.store.put(&key, Bytes::from(bytes))?;
        self.files.push(name.to_string());
        Ok(())
    }

    fn figure(&mut self, name: &str, svg: String, data: &[u8]) -> Result<()> {
        let png = svg_to_png(&svg)?;
        self.put(&format!("{name}.svg"), svg.into_bytes())?;
        self.put(&format!("{name}.png"), png)?;
        self.put(&format!("{name}.csv"), data.to_vec())?;
        Ok(())
    }

    fn location(&self) -> String {
        self.store.display(&self.prefix)
    }
}

/// report's parameters, checked before any work.
struct ReportArgs<'a> {
    /// An SQL predicate over `source`'s columns.
    predicate: &'a str,
    source: &'a str,
    permutations: u64,
    bootstrap: u64,
    seed: u64,
    top: usize,
    /// `auto` (log axes where the data spans decades) or `linear`.
    log: &'a str,
    out: Option<&'a str>,
}

impl<'a> ReportArgs<'a> {
    fn parse(p: &'a Params) -> Result<Self> {
        Ok(ReportArgs {
            predicate: p.nonempty("where")?,
            permutations: p.u64("permutations")?,
            bootstrap: p.u64("bootstrap")?,
            seed: p.u64("seed")?,
            top: p.usize_in("top", 1, 1000)?,
            log: p.choice("log", &["auto", "linear"])?,
            source: p.nonempty("source")?,
            out: p.opt("out"),
        })
    }
}

impl Stage for Report {
    fn name(&self) -> &'static str {
        "report"
    }
    fn about(&self) -> &'static str {
        "figures and tables of a selection of models: offline HTML, Markdown, SVG, PNG and the CSV behind each figure"
    }
    fn reads(&self) -> &'static str {
        "model_metrics, correlations, train_log, class_metrics, pair_extremes"
    }
    fn writes(&self) -> &'static str {
        "reports/selection=ID/ (or out=): index.html, report.md, *.svg, *.png, *.csv"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn check(&self, p: &Params) -> Result<()> {
        ReportArgs::parse(p).map(drop)
    }

    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String> {
        let args = ReportArgs::parse(p)?;
        let ReportArgs {
            predicate,
            source,
            permutations: n_perm,
            bootstrap: n_boot,
            seed,
            top,
            ..
        } = args;
        let auto_log = args.log == "auto";
        let sources = resolve_sources(&ctx.lake, source).map_err(|e| p.invalid("source", e.to_string()))?;
        // The lake's own models keep the id they always had.
        let id_source = if source == "model" {
            "model_metrics"
        } else {
            source
        };
        let sel_id = selection::correlations_id(id_source, predicate, n_perm, n_boot, seed);

        let (store, prefix) = match args.out {
            Some(o) => (ctx.lake.open_sibling(o)?, String::new()),
            None => (ctx.lake.clone(), format!("reports/selection={sel_id}")),
        };
        // What the report was made from: up to date while it is unchanged.
        let stamp = serde_json::json!({
            "where": predicate,
            "permutations": n_perm,
            "bootstrap": n_boot,
            "seed": seed,
            "top": top,
            "source": source,
            "log": args.log,
            "inputs": sources
                .iter()
                .map(|s| selection::inputs_fingerprint(&ctx.lake, s))
                .collect::<Result<Vec<_>>>()?,
            "tool_version": env!("CARGO_PKG_VERSION"),
        });
        let stamp_key = if prefix.is_empty() {
            "report.json".to_string()
        } else {
            format!("{prefix}/report.json")
        };
        if let Some(old) = store.get_opt(&stamp_key)?
            && serde_json::from_slice::<serde_json::Value>(&old).ok().as_ref() == Some(&stamp)
        {
            return Ok(format!(
                "report: up to date -> {}/index.html",
                store.display(&prefix).trim_end_matches('/')
            ));
        }
        ctx.would_run(format!("report `{predicate}`"))?;
        let sql = Sql::open(&ctx.lake)?;
        let (points, corr, corr_note) = gather(ctx, &sql, &sources, predicate, (n_perm, n_boot, seed))?;
        // Layers, training and tokens exist for the lake's own models only,
        // over the selection gather registered as report_selection.
        let own = |name: &str, extra: &[(&str, &str)]| -> Result<Table> {
            if !sources.iter().any(|s| s == "model_metrics") {
                return Ok(Table { batches: Vec::new() });
            }
            let mut vars = vec![("selection", "report_selection")];
            vars.extend_from_slice(extra);
            Ok(Table {
                batches: sql.run_named(name, &vars)?,
            })
        };
        let layers = own("report_layers", &[])?;
        let training = own("report_training", &[])?;
        let top_s = top.to_string();
        let tokens = own("report_tokens", &[("top", top_s.as_str())])?;

        let mut out = Output {
            store,
            prefix,
            files: Vec::new(),
            auto_log,
        };
        let mut figures = Vec::new();
        figures.push(metric_vs_loss(&points, &corr, &mut out)?);
        out.put("correlations.csv", corr.csv()?)?;
        figures.push(scale_trends(&points, &mut out)?);
        let own_models = sources.iter().any(|s| s == "model_metrics");
        if own_models {
            figures.push(through_depth(&layers, &mut out)?);
            figures.push(training_curves(&training, &mut out)?);
            out.put("tokens.csv", tokens.csv()?)?;
        }

        let models: BTreeSet<String> = (0..points.rows()).map(|i| points.str("model", i)).collect();
        let page = Page {
            predicate,
            lake: ctx.lake.url(),
            models: &models,
            corr: &corr,
            corr_note: corr_note.as_deref(),
            figures: &figures,
            tokens: own_models.then_some(&tokens),
        };
        out.put("report.md", page.markdown().into_bytes())?;
        out.put("index.html", page.html().into_bytes())?;
        out.put("report.json", serde_json::to_vec_pretty(&stamp).expect("json"))?;
        Ok(format!(
            "report of {} model(s) selected by `{predicate}`: {} files -> {}/index.html",
            models.len(),
            out.files.len(),
            out.location().trim_end_matches('/')
        ))
    }
}

/// Every source's selected models (one Table, a `source` column telling
/// them apart) and their correlations, running correlate for a source whose
/// correlations are missing; a failed correlate becomes a note. Registers
/// the lake's own selection as `report_selection`.
fn gather(
    ctx: &Ctx,
    sql: &Sql,
    sources: &[String],
    predicate: &str,
    (n_perm, n_boot, seed): (u64, u64, u64),
) -> Result<(Table, Table, Option<String>)> {
    let mut points = Table { batches: Vec::new() };
    let mut corr = Table { batches: Vec::new() };
    let mut corr_notes = Vec::new();
    for s in sources {
        let drawn = source_points(sql, s, predicate)?;
        if drawn.rows() == 0 {
            return Err(Error::invalid(format!(
                "the selection `{predicate}` matches no models of {s}; check `pipeline sql \"SELECT model, final_layer FROM {}\"`",
                if s == "model_metrics" {
                    "model_metrics"
                } else {
                    "imported_metrics_long"
                }
            )));
        }
        points.batches.extend(drawn.batches);
        // The correlations of this selection, computed by correlate if missing.
        let id = selection::correlations_id(s, predicate, n_perm, n_boot, seed);
        let corr_artifact = lc_lake::artifact::Artifact::new("correlations", &[("selection_id", &id)])?;
        if ctx.lake.manifest(&corr_artifact)?.is_none() {
            let mut pairs = BTreeMap::new();
            pairs.insert("source".to_string(), s.clone());
            pairs.insert("where".to_string(), predicate.to_string());
            pairs.insert("permutations".to_string(), n_perm.to_string());
            pairs.insert("bootstrap".to_string(), n_boot.to_string());
            pairs.insert("seed".to_string(), seed.to_string());
            if let Err(e) = crate::stages::run(ctx, "correlate", &pairs) {
                corr_notes.push(format!("no correlations of {s}: {e}"));
            }
        }
        corr.batches
            .extend(sql.run_named("report_correlations", &[("selection_id", &id)])?);
    }
    let corr_note = (!corr_notes.is_empty()).then(|| corr_notes.join("; "));
    Ok((points, corr, corr_note))
}

/// The sources `source=` names, as correlate names them: `model_metrics`
/// for the lake's own models, `imported:NAME` for an imported table; `all`
/// is both, every imported table in name order.
fn resolve_sources(lake: &Lake, source: &str) -> Result<Vec<String>> {
    let imported = || -> Result<Vec<String>> {
        let mut names: Vec<String> = lake
            .manifests("imported_metrics", "")?
            .iter()
            .filter_map(|m| m.artifact.split("source=").nth(1))
            .map(|n| format!("imported:{}", n.trim_end_matches('/')))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    };
    match source {
        "model" => Ok(vec!["model_metrics".into()]),
        "all" => Ok(std::iter::once("model_metrics".to_string())
            .chain(imported()?)
            .collect()),
        s => match s.strip_prefix("imported:") {
            Some(name) if imported()?.iter().any(|n| n == s) => Ok(vec![format!("imported:{name}")]),
            Some(name) => Err(Error::invalid(format!(
                "no imported table named {name}: run stage=import name={name} input=FILE first"
            ))),
            None => Err(Error::invalid(format!(
                "'{s}' is not model, imported:NAME or all"
            ))),
        },
    }
}

/// The selected models of one source with the columns of report_points.
fn source_points(sql: &Sql, source: &str, predicate: &str) -> Result<Table> {
    let batches = match source.strip_prefix("imported:") {
        None => {
            selection::register(sql, "report_selection", "model_metrics", &[], predicate)?;
            sql.run_named("report_points", &[("selection", "report_selection")])?
        }
        Some(name) => {
            selection::register(
                sql,
                "report_imported",
                "imported_metrics_long",
                &[("source", name)],
                predicate,
            )?;
            sql.run_named("report_points_imported", &[("selection", "report_imported")])?
        }
    };
    Ok(Table { batches })
}

/// Figure 1: each property against validation loss. With several sources
/// (the lake's models and imported tables), each has its own marker and
/// its own R^2 in the panel's title.
fn metric_vs_loss(points: &Table, corr: &Table, out: &mut Output) -> Result<Figure> {
    let sources: Vec<String> = distinct(points, "source");
    let several = sources.len() > 1;
    let widths: Vec<String> = distinct(points, "width");
    let depths: Vec<String> = distinct(points, "depth");
    let scale = size_scale(points);
    let imported_only = imported_only(&sources);
    let mut csv = String::from("source,model,width,depth,metric,value,val_loss,n_params\n");
    let mut pooled_csv = String::from("metric,n_models,r2,slope,intercept\n");
    let mut panels = Vec::new();
    let mut notes = Vec::new();
    for (metric, about) in METRICS {
        // (source, width, depth) -> points and their parameter counts; the
        // marker tells sources apart when there are several, depths
        // otherwise; the colour is the width's, or the size's on a scale.
        let mut groups: BTreeMap<(usize, usize, usize), PointGroup> = BTreeMap::new();
        let mut missing = vec![0usize; sources.len()];
        let mut present = vec![0usize; sources.len()];
        for i in 0..points.rows() {
            let (x, y) = (points.f64(metric, i), points.f64("val_loss", i));
            let (src, w, d) = (
                points.str("source", i),
                points.str("width", i),
                points.str("depth", i),
            );
            let size = points.f64("n_params", i);
            let _ = writeln!(
                csv,
                "{src},{},{w},{d},{metric},{},{},{}",
                points.str("model", i),
                x.map(|v| v.to_string()).unwrap_or_default(),
                y.map(|v| v.to_string()).unwrap_or_default(),
                size.map(|v| v.to_string()).unwrap_or_default()
            );
            let si = sources.iter().position(|v| *v == src).unwrap_or(0);
            match (x, y) {
                (Some(x), Some(y)) => {
                    let wi = widths.iter().position(|v| *v == w).unwrap_or(0);
                    let di = depths.iter().position(|v| *v == d).unwrap_or(0);
                    // Several sources: the marker is the source's, and
                    // depths share it; sizes on a scale: widths share a group.
                    let wi = if scale.is_some() { 0 } else { wi };
                    let key = if several { (si, wi, 0) } else { (si, wi, di) };
                    let group = groups.entry(key).or_default();
                    group.0.push((x, y));
                    group.1.push(size.unwrap_or(f64::NAN));
                    present[si] += 1;
                }
                _ => missing[si] += 1,
            }
        }
        let row_of = |src: &str| {
            (0..corr.rows()).find(|&i| corr.str("metric", i) == metric && corr.str("source", i) == src)
        };
        let stat = |src: &str, c: &str| row_of(src).and_then(|r| corr.f64(c, r));
        let n_of = |src: &str| {
            row_of(src)
                .map(|r| corr.str("n_models", r))
                .unwrap_or_else(|| "0".into())
        };
        // Pooled over the sources: meaningful where at least two of them
        // have three points or more (the metrics share their definitions
        // through import's columns=); otherwise one source is the pool.
        let pooled = if several && present.iter().filter(|&&n| n >= 3).count() >= 2 {
            let (xs, ys): (Vec<f64>, Vec<f64>) = groups.values().flat_map(|g| g.0.iter().copied()).unzip();
            let fit = lc_metrics::correlation::least_squares(&xs, &ys);
            let r2 = lc_metrics::correlation::r2(&xs, &ys);
            let _ = writeln!(
                pooled_csv,
                "{metric},{},{},{},{}",
                xs.len(),
                r2.map(|v| v.to_string()).unwrap_or_default(),
                fit.map(|f| f.0.to_string()).unwrap_or_default(),
                fit.map(|f| f.1.to_string()).unwrap_or_default()
            );
            Some((r2, fit))
        } else {
            None
        };
        let title = if several {
            let mut parts: Vec<String> = sources
                .iter()
                .map(|src| format!("{} {}", short_source(src), fmt(stat(src, "r2"), 2)))
                .collect();
            if let Some((r2, _)) = pooled {
                parts.push(format!("pooled {}", fmt(r2, 2)));
            }
            format!("{metric}  R²: {}", parts.join(", "))
        } else {
            let src = sources.first().map(String::as_str).unwrap_or("model_metrics");
            format!(
                "{metric}  R² = {}, p = {}, n = {}",
                fmt(stat(src, "r2"), 3),
                fmt(stat(src, "p_value"), 4),
                n_of(src)
            )
        };
        let mut note = Vec::new();
        if groups.is_empty() {
            note.push(format!(
                "no model in the selection has {metric} and val_loss ({})",
                missing_hint(metric, &sources)
            ));
        } else {
            for (si, src) in sources.iter().enumerate() {
                if missing[si] == 0 {
                    continue;
                }
                let whose = if several {
                    format!(" of {}", short_source(src))
                } else {
                    String::new()
                };
                if present[si] == 0 {
                    note.push(format!("no model{whose} has {metric}: drawn for the others only"));
                } else {
                    note.push(format!(
                        "{} model(s){whose} without a value left out",
                        missing[si]
                    ));
                }
            }
        }
        for src in &sources {
            if let Some(r) = row_of(src) {
                let cn = corr.str("note", r);
                if !cn.is_empty() {
                    note.push(cn);
                }
            }
        }
        if !note.is_empty() {
            notes.push(format!("{metric}: {}", note.join("; ")));
        }
        if groups.is_empty() && imported_only {
            // A column the tables do not have: the page says so, and the
            // figure keeps the panels that have data.
            continue;
        }
        let series = groups
            .into_iter()
            .map(|((si, wi, di), (pts, sizes))| {
                let label = match (&scale, several) {
                    (Some(_), true) => short_source(&sources[si]).to_string(),
                    (Some(_), false) => format!("L={}", depths[di]),
                    (None, true) => format!("{} d={}", short_source(&sources[si]), widths[wi]),
                    (None, false) => format!("d={} L={}", widths[wi], depths[di]),
                };
                Series {
                    label,
                    colour: wi,
                    marker: Marker::nth(if several { si } else { di }),
                    points: pts,
                    line: false,
                    values: if scale.is_some() { sizes } else { Vec::new() },
                }
            })
            .collect();
        // One source: its line as correlate fitted it; several: the pooled
        // line (each source's R^2 is in the title).
        let fit = match sources.as_slice() {
            [src] => match (stat(src, "slope"), stat(src, "intercept")) {
                (Some(s), Some(b)) => Some((s, b)),
                _ => None,
            },
            _ => pooled.and_then(|p| p.1),
        };
        panels.push(Panel {
            title,
            x_label: about.to_string(),
            y_label: "validation loss".into(),
            series,
            fit,
            note: (!note.is_empty()).then(|| note.join("; ")),
            auto_log: out.auto_log,
            colour_scale: scale.clone(),
            ..Default::default()
        });
    }
    let title = match (&scale, several) {
        (Some(_), true) => {
            "Neural-collapse properties against validation loss (colour: parameters, marker: source, line: pooled fit)"
        }
        (Some(_), false) => {
            "Neural-collapse properties against validation loss (colour: parameters, marker: depth L)"
        }
        (None, true) => {
            "Neural-collapse properties against validation loss (colour: width d, marker: source, line: pooled fit)"
        }
        (None, false) => {
            "Neural-collapse properties against validation loss (colour: width d, marker: depth L)"
        }
    };
    out.figure(
        "metric_vs_loss",
        grid_svg(title, &panels, grid_cols(panels.len()), 380, 300)?,
        csv.as_bytes(),
    )?;
    if several {
        out.put("pooled_correlations.csv", pooled_csv.into_bytes())?;
    }
    Ok(Figure {
        name: "metric_vs_loss".into(),
        title: title.into(),
        notes,
    })
}

/// Points of one legend entry and, beside each, its model's parameter count.
type PointGroup = (Vec<(f64, f64)>, Vec<f64>);

/// Models coloured by size, as the paper colours them: a scale over the
/// parameter counts when every selected model has one and they are not all
/// equal (logarithmic beyond one decade); otherwise colour is the width's.
fn size_scale(points: &Table) -> Option<ColourScale> {
    let sizes: Vec<f64> = (0..points.rows())
        .map(|i| points.f64("n_params", i).filter(|v| *v > 0.0))
        .collect::<Option<_>>()?;
    let lo = sizes.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = sizes.iter().copied().fold(0.0, f64::max);
    (hi > lo).then(|| ColourScale {
        label: "parameters".into(),
        lo,
        hi,
        log: hi > 10.0 * lo,
    })
}

/// Whether every source is an imported table: a metric none of them has
/// is a column they lack, not a stage to run, so its panel is left out.
fn imported_only(sources: &[String]) -> bool {
    sources.iter().all(|s| s != "model_metrics")
}

/// Columns of a grid of `n` panels: 4, or 3 for six or fewer.
fn grid_cols(n: usize) -> usize {
    if n <= 6 { 3 } else { 4 }
}

/// A source as a legend names it: `lake` for the lake's own models, the
/// imported table's name otherwise.
fn short_source(source: &str) -> &str {
    match source.strip_prefix("imported:") {
        Some(name) => name,
        None => "lake",
    }
}

fn distinct(t: &Table, col: &str) -> Vec<String> {
    let mut v: Vec<String> = (0..t.rows())
        .map(|i| t.str(col, i))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    v.sort_by_key(|s| s.parse::<f64>().unwrap_or(f64::MAX) as i64);
    v
}

/// Each property against parameter count, one line per recipe family.
fn scale_trends(points: &Table, out: &mut Output) -> Result<Figure> {
    let mut csv = String::from("source,family,n_params,metric,mean,n_models\n");
    let mut panels = Vec::new();
    let mut notes = Vec::new();
    let sources = distinct(points, "source");
    let several = sources.len() > 1;
    // (source, family) of each row; the legend names the source when several.
    let row_family: Vec<(String, String)> = (0..points.rows())
        .map(|i| {
            (
                points.str("source", i),
                format!(
                    "L={} E={} wd={}",
                    points.str("depth", i),
                    points.str("epochs", i),
                    points.str("weight_decay", i)
                ),
            )
        })
        .collect();
    // Families in numeric order (L=2 before L=12), by source first: each
    // keyed by the recipe of its first row.
    let mut recipes: BTreeMap<&(String, String), [f64; 3]> = BTreeMap::new();
    for (i, f) in row_family.iter().enumerate() {
        recipes.entry(f).or_insert_with(|| {
            ["depth", "epochs", "weight_decay"].map(|c| points.f64(c, i).unwrap_or(f64::NAN))
        });
    }
    let mut order: Vec<(&(String, String), [f64; 3])> = recipes.into_iter().collect();
    order.sort_by(|(fa, ka), (fb, kb)| {
        fa.0.cmp(&fb.0).then_with(|| {
            ka.iter()
                .zip(kb)
                .map(|(x, y)| x.total_cmp(y))
                .find(|o| o.is_ne())
                .unwrap_or(std::cmp::Ordering::Equal)
        })
    });
    let families: Vec<(String, String)> = order.into_iter().map(|(f, _)| f.clone()).collect();
    let row_index: Vec<usize> = row_family
        .iter()
        .map(|f| families.iter().position(|g| g == f).unwrap_or(0))
        .collect();
    for (metric, about) in METRICS {
        // family index -> n_params -> (sum, n)
        let mut acc: BTreeMap<usize, BTreeMap<u64, (f64, u64)>> = BTreeMap::new();
        for (i, &fi) in row_index.iter().enumerate() {
            if let (Some(x), Some(v)) = (points.f64("n_params", i), points.f64(metric, i)) {
                let e = acc.entry(fi).or_default().entry(x as u64).or_default();
                e.0 += v;
                e.1 += 1;
            }
        }
        let mut series = Vec::new();
        for (&fi, by) in &acc {
            let (src, f) = &families[fi];
            let pts: Vec<(f64, f64)> = by.iter().map(|(x, (s, n))| (*x as f64, s / *n as f64)).collect();
            for (x, (s, n)) in by {
                let _ = writeln!(csv, "{src},{f},{x},{metric},{},{n}", s / *n as f64);
            }
            series.push(Series {
                label: if several {
                    format!("{} {f}", short_source(src))
                } else {
                    f.clone()
                },
                colour: fi,
                marker: Marker::nth(fi),
                points: pts,
                line: true,
                values: Vec::new(),
            });
        }
        let sizes: BTreeSet<u64> = acc.values().flat_map(|m| m.keys().copied()).collect();
        let note = if acc.is_empty() {
            Some(format!(
                "no model has {metric} and a parameter count ({})",
                missing_hint(metric, &sources)
            ))
        } else if sizes.len() < 2 {
            Some("every selected model has the same size: no trend to show".to_string())
        } else {
            None
        };
        if let Some(n) = &note {
            notes.push(format!("{metric}: {n}"));
        }
        if acc.is_empty() && imported_only(&sources) {
            continue;
        }
        panels.push(Panel {
            title: metric.to_string(),
            x_label: "parameters (log)".into(),
            y_label: about.to_string(),
            log_x: true,
            series,
            note,
            auto_log: out.auto_log,
            ..Default::default()
        });
    }
    let title = "Scale trends: each property against parameter count (mean over seeds)";
    out.figure(
        "scale_trends",
        grid_svg(title, &panels, grid_cols(panels.len()), 380, 300)?,
        csv.as_bytes(),
    )?;
    Ok(Figure {
        name: "scale_trends".into(),
        title: title.into(),
        notes,
    })
}

/// Each property against layer index, one line per model.
fn through_depth(layers: &Table, out: &mut Output) -> Result<Figure> {
    let mut per_model: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..layers.rows() {
        *per_model.entry(layers.str("model", i)).or_default() += 1;
    }
    let layered: Vec<String> = per_model
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(m, _)| m.clone())
        .collect();
    let mut csv = String::from("model,layer,metric,value\n");
    let mut panels = Vec::new();
    let mut notes = Vec::new();
    if layered.is_empty() {
        notes.push(
            "only one layer per model was analysed: run collect layers=all and analyze layers=all to see collapse through depth"
                .to_string(),
        );
    }
    for (metric, about) in METRICS {
        let mut series = Vec::new();
        for (mi, m) in layered.iter().enumerate() {
            let mut pts = Vec::new();
            for i in (0..layers.rows()).filter(|&i| &layers.str("model", i) == m) {
                if let (Some(l), Some(v)) = (layers.f64("layer", i), layers.f64(metric, i)) {
                    pts.push((l, v));
                    let _ = writeln!(csv, "{m},{l},{metric},{v}");
                }
            }
            series.push(Series {
                label: m.clone(),
                colour: mi,
                marker: Marker::nth(mi),
                points: pts,
                line: true,
                values: Vec::new(),
            });
        }
        let note = if layered.is_empty() {
            Some("one layer per model: run collect and analyze with layers=all".to_string())
        } else if series.iter().all(|s| s.points.is_empty()) {
            Some(format!(
                "no layer has {metric} ({})",
                missing_hint(metric, &["model_metrics".to_string()])
            ))
        } else {
            None
        };
        panels.push(Panel {
            title: metric.to_string(),
            x_label: "layer (0 = embeddings)".into(),
            y_label: about.to_string(),
            series,
            note,
            auto_log: out.auto_log,
            ..Default::default()
        });
    }
    let title =
        "Through depth: each property against layer index (NC3/NC4 use the output layer's classifier)";
    out.figure(
        "through_depth",
        grid_svg(title, &panels, 4, 380, 300)?,
        csv.as_bytes(),
    )?;
    Ok(Figure {
        name: "through_depth".into(),
        title: title.into(),
        notes,
    })
}

/// Training loss against step, per model.
fn training_curves(training: &Table, out: &mut Output) -> Result<Figure> {
    let mut by: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut csv = String::from("model,step,loss\n");
    for i in 0..training.rows() {
        if let (Some(s), Some(l)) = (training.f64("step", i), training.f64("loss", i)) {
            let m = training.str("model", i);
            let _ = writeln!(csv, "{m},{s},{l}");
            by.entry(m).or_default().push((s, l));
        }
    }
    let mut notes = Vec::new();
    let note = by.is_empty().then(|| {
        "no training log for the selected models (models loaded from elsewhere were not trained here)"
            .to_string()
    });
    if let Some(n) = &note {
        notes.push(n.clone());
    }
    let series = by
        .into_iter()
        .enumerate()
        .map(|(i, (m, pts))| Series {
            label: m,
            colour: i,
            marker: Marker::nth(i),
            points: pts,
            line: true,
            values: Vec::new(),
        })
        .collect();
    let panel = Panel {
        title: "training loss".into(),
        x_label: "step".into(),
        y_label: "cross-entropy (train batches)".into(),
        series,
        note,
        auto_log: out.auto_log,
        ..Default::default()
    };
    let title = "Training curves";
    out.figure(
        "training_curves",
        grid_svg(title, &[panel], 1, 720, 380)?,
        csv.as_bytes(),
    )?;
    Ok(Figure {
        name: "training_curves".into(),
        title: title.into(),
        notes,
    })
}

/// The page, as HTML and as Markdown.
struct Page<'a> {
    predicate: &'a str,
    lake: &'a str,
    models: &'a BTreeSet<String>,
    corr: &'a Table,
    corr_note: Option<&'a str>,
    figures: &'a [Figure],
    /// The token tables; `None` when only imported tables are reported,
    /// which carry one number per model (no layers, training or tokens).
    tokens: Option<&'a Table>,
}

/// Why an imported-only report has fewer sections.
const IMPORTED_ONLY: &str = "Imported tables carry one number per model: metrics through depth, \
     training curves and token tables are drawn for the lake's own models (source=model or source=all).";

const CORR_COLUMNS: [(&str, &str); 7] = [
    ("n_models", "n"),
    ("r2", "R²"),
    ("r2_ci_low", "R² 2.5%"),
    ("r2_ci_high", "R² 97.5%"),
    ("p_value", "p"),
    ("spearman_rho", "Spearman ρ"),
    ("note", "note"),
];

/// (model, layer) -> list name -> (token text, value) rows.
type TokenLists = BTreeMap<(String, String), BTreeMap<String, Vec<(String, String)>>>;

impl Page<'_> {
    fn corr_value(&self, col: &str, i: usize) -> String {
        match col {
            "note" | "n_models" => self.corr.str(col, i),
            _ => cell(self.corr.f64(col, i)),
        }
    }

    /// Token tables grouped by (model, layer, list).
    fn token_lists(&self) -> TokenLists {
        let mut out = TokenLists::new();
        let Some(t) = self.tokens else {
            return out;
        };
        for i in 0..t.rows() {
            let text = match t.str("token_b", i) {
                b if b.is_empty() => show_token(&t.str("token", i)),
                b => format!("{} · {}", show_token(&t.str("token", i)), show_token(&b)),
            };
            out.entry((t.str("model", i), t.str("layer", i)))
                .or_default()
                .entry(t.str("list", i))
                .or_default()
                .push((text, cell(t.f64("value", i))));
        }
        out
    }

    fn html(&self) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Neural collapse report</title>\n<style>\
             body{{font-family:sans-serif;max-width:1560px;margin:2em auto;padding:0 1em;color:#222}}\
             table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}\
             th{{background:#f3f3f3}}td.l{{text-align:left}}img{{max-width:100%;border:1px solid #eee}}\
             .note{{color:#963;}}.tok{{display:inline-block;vertical-align:top;margin-right:1.5em}}\
             </style></head><body>\n<h1>Neural collapse report</h1>\n<p>{} model(s) selected by <code>{}</code> from <code>{}</code>.</p>\n",
            self.models.len(),
            html_escape(self.predicate),
            html_escape(self.lake)
        );
        if self.tokens.is_none() {
            let _ = writeln!(h, "<p class=\"note\">{}</p>", html_escape(IMPORTED_ONLY));
        }
        h.push_str("<h2>Correlation with validation loss</h2>\n");
        if let Some(n) = self.corr_note {
            let _ = writeln!(h, "<p class=\"note\">{}</p>", html_escape(n));
        }
        h.push_str("<table><tr><th>metric</th>");
        for (_, label) in CORR_COLUMNS {
            let _ = write!(h, "<th>{label}</th>");
        }
        h.push_str("</tr>\n");
        for i in 0..self.corr.rows() {
            let _ = write!(
                h,
                "<tr><td class=\"l\">{}</td>",
                html_escape(&self.corr.str("metric", i))
            );
            for (col, _) in CORR_COLUMNS {
                let class = if col == "note" { " class=\"l\"" } else { "" };
                let _ = write!(h, "<td{class}>{}</td>", html_escape(&self.corr_value(col, i)));
            }
            h.push_str("</tr>\n");
        }
        h.push_str("</table>\n<p><a href=\"correlations.csv\">correlations.csv</a></p>\n");
        for f in self.figures {
            let _ = writeln!(
                h,
                "<h2>{}</h2>\n<p><img src=\"{n}.svg\" alt=\"{}\"></p>\n<p><a href=\"{n}.png\">PNG</a> · <a href=\"{n}.svg\">SVG</a> · <a href=\"{n}.csv\">data (CSV)</a></p>",
                html_escape(&f.title),
                html_escape(&f.title),
                n = f.name
            );
            for note in &f.notes {
                let _ = writeln!(h, "<p class=\"note\">{}</p>", html_escape(note));
            }
        }
        if self.tokens.is_none() {
            h.push_str("</body></html>\n");
            return h;
        }
        h.push_str("<h2>Token tables</h2>\n<p><a href=\"tokens.csv\">tokens.csv</a></p>\n");
        let lists = self.token_lists();
        if lists.is_empty() {
            h.push_str("<p class=\"note\">no per-class metrics for the selected models (run analyze)</p>\n");
        }
        for ((model, layer), by_list) in lists {
            let _ = writeln!(
                h,
                "<h3>{} (layer {})</h3>",
                html_escape(&model),
                html_escape(&layer)
            );
            for (list, rows) in by_list {
                let _ = write!(
                    h,
                    "<div class=\"tok\"><table><tr><th colspan=\"2\">{}</th></tr>",
                    html_escape(&list)
                );
                for (t, v) in rows {
                    let _ = write!(
                        h,
                        "<tr><td class=\"l\">{}</td><td>{}</td></tr>",
                        html_escape(&t),
                        v
                    );
                }
                h.push_str("</table></div>\n");
            }
        }
        h.push_str("</body></html>\n");
        h
    }

    fn markdown(&self) -> String {
        let mut m = format!(
            "# Neural collapse report\n\n{} model(s) selected by `{}` from `{}`.\n\n## Correlation with validation loss\n\n",
            self.models.len(),
            self.predicate,
            self.lake
        );
        if self.tokens.is_none() {
            m = m.replace(
                "\n\n## Correlation",
                &format!("\n\n> {IMPORTED_ONLY}\n\n## Correlation"),
            );
        }
        if let Some(n) = self.corr_note {
            let _ = writeln!(m, "> {n}\n");
        }
        m.push_str("| metric |");
        for (_, label) in CORR_COLUMNS {
            let _ = write!(m, " {label} |");
        }
        m.push_str("\n|---|");
        for _ in CORR_COLUMNS {
            m.push_str("---:|");
        }
        m.push('\n');
        for i in 0..self.corr.rows() {
            let _ = write!(m, "| {} |", md_escape(&self.corr.str("metric", i)));
            for (col, _) in CORR_COLUMNS {
                let _ = write!(m, " {} |", md_escape(&self.corr_value(col, i)));
            }
            m.push('\n');
        }
        for f in self.figures {
            let _ = write!(
                m,
                "\n## {}\n\n![{}]({n}.png)\n\n[SVG]({n}.svg) · [data]({n}.csv)\n",
                f.title,
                f.title,
                n = f.name
            );
            for note in &f.notes {
                let _ = writeln!(m, "\n> {}", note);
            }
        }
        if self.tokens.is_none() {
            return m;
        }
        m.push_str("\n## Token tables\n\n[tokens.csv](tokens.csv)\n");
        for ((model, layer), by_list) in self.token_lists() {
            let _ = writeln!(m, "\n### {model} (layer {layer})\n");
            for (list, rows) in by_list {
                let _ = writeln!(m, "| {} | value |\n|---|---:|", md_escape(&list));
                for (t, v) in rows {
                    let _ = writeln!(m, "| {} | {v} |", md_escape(&t));
                }
                m.push('\n');
            }
        }
        m
    }
}
