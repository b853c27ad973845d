//! `correlate`: how well each neural-collapse metric predicts validation loss
//! across a selection of models.
//!
//! Reads: the `model_metrics_long` view (or `imported_metrics_long` for an
//! imported table), i.e. pair_tiles, class_metrics, decisions and models.
//! Writes: `correlations/selection_id=H`, and prints the table.
//!
//! For every metric column x over the models selected by the predicate
//! `where`: R^2 = corr(x, val_loss)^2 with the least-squares line, a
//! permutation test (`permutations` seeded re-assignments of val_loss to the
//! models, p = (1 + #{R^2_perm >= R^2_obs}) / (1 + permutations)), Spearman's
//! rho, and a seeded percentile bootstrap 95 % interval for R^2
//! (`bootstrap` resamples). All of it is computed by DataFusion from
//! `sql/correlate_*.sql`: regr_r2 and the aggregates of [`crate::sql::udaf`],
//! in O(models) memory per metric. `where` is parsed as one SQL expression
//! over the columns of the long-form view and applied as a filter, never
//! pasted into SQL text, so anything but a predicate is refused. A value is
//! left NULL, with a note saying why, when it is undefined: fewer than 3
//! models, a metric or a val_loss that is constant over the selection.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, StringArray, UInt64Array};
use arrow::datatypes::{Float64Type, Int64Type};
use arrow::record_batch::RecordBatch;
use lc_lake::artifact::{Artifact, Provenance, check_partition_value, file_schema};

use crate::error::{Context, Error, Result};
use crate::params::{ParamSpec, Params, param};
use crate::sql::Sql;
use crate::stages::{Ctx, Stage};

pub struct Correlate;

const PARAMS: &[ParamSpec] = &[
    param(
        "where",
        "final_layer",
        "SQL predicate selecting the models (columns of model_metrics_long)",
    ),
    param(
        "source",
        "model_metrics",
        "model_metrics, or imported:NAME for an imported table",
    ),
    param("permutations", "10000", "permutations of val_loss in the test"),
    param("bootstrap", "1000", "bootstrap resamples for the R^2 interval"),
    param("seed", "0", "seed of the permutations and resamples"),
];

/// One output row.
#[derive(Debug, Clone, PartialEq)]
pub struct Correlation {
    pub metric: String,
    pub n_models: u64,
    pub r2: Option<f64>,
    pub slope: Option<f64>,
    pub intercept: Option<f64>,
    pub p_value: Option<f64>,
    pub spearman_rho: Option<f64>,
    pub r2_ci_low: Option<f64>,
    pub r2_ci_high: Option<f64>,
    pub note: Option<String>,
}

fn f64_at(b: &RecordBatch, col: &str, i: usize) -> Option<f64> {
    let c = b.column_by_name(col)?;
    let a = c.as_primitive_opt::<Float64Type>()?;
    (!a.is_null(i)).then(|| a.value(i)).filter(|x| !x.is_nan())
}

fn i64_at(b: &RecordBatch, col: &str, i: usize) -> i64 {
    b.column_by_name(col)
        .and_then(|c| {
            c.as_primitive_opt::<Int64Type>()
                .map(|a| if a.is_null(i) { 0 } else { a.value(i) })
        })
        .unwrap_or(0)
}

fn str_at(b: &RecordBatch, col: &str, i: usize) -> String {
    b.column_by_name(col)
        .and_then(|c| c.as_string_opt::<i32>().map(|a| a.value(i).to_string()))
        .unwrap_or_default()
}

/// Name of the session view holding the selected rows.
const SELECTION: &str = "correlate_selection";

/// Run the analysis (no writing): the rows of the correlations table.
pub fn correlations(
    sql: &Sql,
    source: &str,
    predicate: &str,
    n_perm: u64,
    seed: u64,
) -> Result<Vec<Correlation>> {
    correlations_with(sql, source, predicate, n_perm, 1000, seed)
}

/// As [`correlations`], with the number of bootstrap resamples.
pub fn correlations_with(
    sql: &Sql,
    source: &str,
    predicate: &str,
    n_perm: u64,
    n_boot: u64,
    seed: u64,
) -> Result<Vec<Correlation>> {
    let (view, imported) = match source.strip_prefix("imported:") {
        Some(name) => {
            check_partition_value("source", name)?;
            ("imported_metrics_long", Some(name))
        }
        None if source == "model_metrics" => ("model_metrics_long", None),
        None => {
            return Err(Error::invalid(format!(
                "source '{source}' is not model_metrics or imported:NAME"
            )));
        }
    };
    let equal: Vec<(&str, &str)> = imported.map(|n| ("source", n)).into_iter().collect();
    crate::sql::selection::register(sql, SELECTION, view, &equal, predicate)?;
    let vars = [("source", SELECTION)];
    let counts = sql.run_named("correlate_counts", &vars)?;
    let mut count_by: HashMap<String, (i64, i64, i64, i64)> = HashMap::new();
    for b in &counts {
        for i in 0..b.num_rows() {
            count_by.insert(
                str_at(b, "metric", i),
                (
                    i64_at(b, "n_rows", i),
                    i64_at(b, "n_distinct", i),
                    i64_at(b, "n_no_loss", i),
                    i64_at(b, "n_no_value", i),
                ),
            );
        }
    }
    if count_by.is_empty() {
        return Err(Error::invalid(format!(
            "the selection `{predicate}` matches no models in {view}; check `pipeline sql \"SELECT DISTINCT model, split, layer, final_layer FROM {view}\"`"
        )));
    }
    if let Some((m, (rows, distinct, _, _))) = count_by.iter().find(|(_, c)| c.0 != c.1) {
        return Err(Error::invalid(format!(
            "the selection `{predicate}` has {rows} rows for metric {m} but only {distinct} distinct models: some models appear with several layers or splits; narrow it, e.g. `final_layer AND split = 'train'`"
        )));
    }
    let (n_perm_s, n_boot_s, seed_s) = (n_perm.to_string(), n_boot.to_string(), seed.to_string());
    let observed = sql.run_named(
        "correlate_observed",
        &[
            ("source", SELECTION),
            ("n_permutations", n_perm_s.as_str()),
            ("n_bootstrap", n_boot_s.as_str()),
            ("seed", seed_s.as_str()),
        ],
    )?;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for b in &observed {
        for i in 0..b.num_rows() {
            let metric = str_at(b, "metric", i);
            seen.insert(metric.clone());
            let n = i64_at(b, "n_models", i) as u64;
            let var_x = f64_at(b, "var_x", i).unwrap_or(0.0);
            let var_y = f64_at(b, "var_y", i).unwrap_or(0.0);
            let (_, _, no_loss, no_value) = count_by.get(&metric).copied().unwrap_or_default();
            let mut notes = Vec::new();
            if no_loss > 0 {
                notes.push(format!("{no_loss} model(s) without val_loss left out (run eval)"));
            }
            if no_value > 0 {
                notes.push(format!("{no_value} model(s) without this metric left out"));
            }
            let defined = if n < 3 {
                notes.push(format!("{n} model(s): R^2 needs at least 3"));
                false
            } else if var_x <= 0.0 {
                notes.push("the metric is constant over the selection".into());
                false
            } else if var_y <= 0.0 {
                notes.push("val_loss is constant over the selection".into());
                false
            } else {
                true
            };
            let get = |c: &str| if defined { f64_at(b, c, i) } else { None };
            out.push(Correlation {
                metric,
                n_models: n,
                r2: get("r2"),
                slope: get("slope"),
                intercept: get("intercept"),
                p_value: get("p_value"),
                spearman_rho: get("spearman_rho"),
                r2_ci_low: get("r2_ci_low"),
                r2_ci_high: get("r2_ci_high"),
                note: (!notes.is_empty()).then(|| notes.join("; ")),
            });
        }
    }
    // Metrics with no usable model at all still get a row that says so.
    for (metric, (rows, _, no_loss, no_value)) in &count_by {
        if !seen.contains(metric) {
            out.push(Correlation {
                metric: metric.clone(),
                n_models: 0,
                r2: None,
                slope: None,
                intercept: None,
                p_value: None,
                spearman_rho: None,
                r2_ci_low: None,
                r2_ci_high: None,
                note: Some(format!(
                    "no model has both this metric and val_loss ({rows} selected, {no_loss} without val_loss, {no_value} without the metric)"
                )),
            });
        }
    }
    out.sort_by(|a, b| a.metric.cmp(&b.metric));
    Ok(out)
}

/// Rows of a stored correlations artifact.
fn stored_rows(batches: &[RecordBatch]) -> Vec<Correlation> {
    let mut out = Vec::new();
    for b in batches {
        for i in 0..b.num_rows() {
            let n = b
                .column_by_name("n_models")
                .and_then(|c| {
                    c.as_primitive_opt::<arrow::datatypes::UInt64Type>()
                        .map(|a| a.value(i))
                })
                .unwrap_or(0);
            let note = str_at(b, "note", i);
            out.push(Correlation {
                metric: str_at(b, "metric", i),
                n_models: n,
                r2: f64_at(b, "r2", i),
                slope: f64_at(b, "slope", i),
                intercept: f64_at(b, "intercept", i),
                p_value: f64_at(b, "p_value", i),
                spearman_rho: f64_at(b, "spearman_rho", i),
                r2_ci_low: f64_at(b, "r2_ci_low", i),
                r2_ci_high: f64_at(b, "r2_ci_high", i),
                note: (!note.is_empty()).then_some(note),
            });
        }
    }
    out
}

/// Fixed-width text table of correlations.
pub fn render(rows: &[Correlation]) -> String {
    let fmt = |x: Option<f64>, prec: usize| x.map(|v| format!("{v:.prec$}")).unwrap_or_else(|| "-".into());
    let mut s = format!(
        "{:<32} {:>8} {:>8} {:>17} {:>8} {:>10} {:>9}  note\n",
        "metric", "n_models", "R^2", "R^2 95% CI", "rho", "slope", "p"
    );
    for r in rows {
        let ci = match (r.r2_ci_low, r.r2_ci_high) {
            (Some(a), Some(b)) => format!("[{a:.3}, {b:.3}]"),
            _ => "-".into(),
        };
        s.push_str(&format!(
            "{:<32} {:>8} {:>8} {:>17} {:>8} {:>10} {:>9}  {}\n",
            r.metric,
            r.n_models,
            fmt(r.r2, 4),
            ci,
            fmt(r.spearman_rho, 3),
            r.slope.map(|v| format!("{v:.3e}")).unwrap_or_else(|| "-".into()),
            fmt(r.p_value, 5),
            r.note.clone().unwrap_or_default()
        ));
    }
    s
}

/// correlate's parameters, checked before any work.
struct CorrelateArgs<'a> {
    /// An SQL predicate over `source`'s columns.
    predicate: &'a str,
    source: &'a str,
    permutations: u64,
    bootstrap: u64,
    /// Fits in an i64 (stored in a signed column).
    seed: u64,
}

impl<'a> CorrelateArgs<'a> {
    fn parse(p: &'a Params) -> Result<Self> {
        let permutations = p.u64("permutations")?;
        if permutations == 0 || permutations > 10_000_000 {
            return Err(p.invalid("permutations", "must be in 1..=10000000"));
        }
        let bootstrap = p.u64("bootstrap")?;
        if bootstrap == 0 || bootstrap > 10_000_000 {
            return Err(p.invalid("bootstrap", "must be in 1..=10000000"));
        }
        let seed = p.u64("seed")?;
        if seed > i64::MAX as u64 {
            return Err(p.invalid("seed", "must fit in a signed 64-bit integer"));
        }
        Ok(CorrelateArgs {
            predicate: p.nonempty("where")?,
            source: p.nonempty("source")?,
            permutations,
            bootstrap,
            seed,
        })
    }
}

impl Stage for Correlate {
    fn name(&self) -> &'static str {
        "correlate"
    }
    fn about(&self) -> &'static str {
        "R^2 of every metric with val_loss over an SQL-selected set of models, with a seeded permutation test"
    }
    fn reads(&self) -> &'static str {
        "model_metrics (view over pair_tiles, class_metrics, decisions, models) or imported_metrics"
    }
    fn writes(&self) -> &'static str {
        "correlations"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn check(&self, p: &Params) -> Result<()> {
        CorrelateArgs::parse(p).map(drop)
    }

    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String> {
        let CorrelateArgs {
            predicate,
            source,
            permutations: n_perm,
            bootstrap: n_boot,
            seed,
        } = CorrelateArgs::parse(p)?;
        let sel_id = crate::sql::selection::correlations_id(source, predicate, n_perm, n_boot, seed);
        let a = Artifact::new("correlations", &[("selection_id", &sel_id)])?;
        let prov = Provenance::new("correlate")
            .param("source", source)
            .param("where", predicate)
            .param("permutations", n_perm)
            .param("bootstrap", n_boot)
            .param("seed", seed)
            .param(
                "inputs",
                crate::sql::selection::inputs_fingerprint(&ctx.lake, source)?,
            );
        if ctx.lake.up_to_date(&a, &prov, false)?.is_some() {
            let rows = stored_rows(&ctx.lake.read_artifact(&a)?);
            return Ok(format!(
                "correlations over `{predicate}` ({source}): up to date -> {}\n{}",
                ctx.lake.display(&a.dir()),
                render(&rows)
            ));
        }
        ctx.would_run(format!("correlate `{predicate}`"))?;
        let sql = Sql::open(&ctx.lake)?;
        let rows = correlations_with(&sql, source, predicate, n_perm, n_boot, seed)?;
        let n = rows.len();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![source; n])),
            Arc::new(StringArray::from(vec![predicate; n])),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.metric.as_str()),
            )),
            Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.n_models))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.r2))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.slope))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.intercept))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.p_value))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.spearman_rho))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.r2_ci_low))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.r2_ci_high))),
            Arc::new(UInt64Array::from(vec![n_perm; n])),
            Arc::new(UInt64Array::from(vec![n_boot; n])),
            Arc::new(UInt64Array::from(vec![seed; n])),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.note.clone()))),
        ];
        let batch = RecordBatch::try_new(file_schema("correlations")?, cols).ctx("building correlations")?;
        ctx.lake.write_artifact(&a, &[batch], prov)?;
        Ok(format!(
            "correlations over `{predicate}` ({source}, {n_perm} permutations, seed {seed}) -> {}\n{}",
            ctx.lake.display(&a.dir()),
            render(&rows)
        ))
    }
}
