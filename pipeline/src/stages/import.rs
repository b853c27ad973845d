//! `import`: bring an external per-model metrics table (CSV or Parquet, e.g.
//! results of other neural-collapse code bases) into the lake, so that
//! `correlate` and ad-hoc SQL work on it like on our own metrics.
//!
//! Reads: one CSV or Parquet file with a model column, a loss column and
//! metric columns (local, `s3://` or `lake:KEY`).
//! Writes: `imported_metrics/source=NAME` in long form (one row per model and
//! metric); ids of the form `LLxDDDD_EEcS@K` are parsed into depth, width,
//! epochs, weight decay, seed and checkpoint.
//!
//! The file is parsed with polars (schema inference, casting); the result
//! reaches Arrow through our own writer, never by sharing polars' types.
//! `columns=` maps source columns to metric names (`src:dst,src2:dst2`; a
//! bare name keeps it); empty means every numeric column but the model and
//! loss columns.

use std::io::Cursor;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int32Array, StringArray, UInt32Array};
use arrow::record_batch::RecordBatch;
use polars::prelude::{CsvReadOptions, DataType as PlType, ParquetReader, SerReader};

use crate::artifact::{Artifact, Provenance, file_schema};
use crate::error::{Context, Error, Result};
use crate::model::naming;
use crate::params::{ParamSpec, Params, param, required};
use crate::source::Source;
use crate::stages::{Ctx, Stage};

pub struct Import;

const PARAMS: &[ParamSpec] = &[
    required("input", "CSV or Parquet file with one row per model"),
    required("name", "name of the imported table (source=NAME)"),
    param("model_column", "model", "column holding the model id"),
    param("loss_column", "val_loss", "column holding the validation loss"),
    param(
        "columns",
        "",
        "metric columns: src[:dst],... (empty: every other numeric column)",
    ),
    param("format", "auto", "auto | csv | parquet"),
];

fn polars_err(name: &str) -> impl Fn(polars::error::PolarsError) -> Error + '_ {
    move |e| Error::input(name, e.to_string())
}

impl Stage for Import {
    fn name(&self) -> &'static str {
        "import"
    }
    fn about(&self) -> &'static str {
        "import an external per-model metrics table (CSV/Parquet, via polars) for correlate and SQL"
    }
    fn reads(&self) -> &'static str {
        "a CSV or Parquet file"
    }
    fn writes(&self) -> &'static str {
        "imported_metrics"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }

    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String> {
        let src = Source::open(&ctx.lake, p.nonempty("input")?)?;
        let name = p.nonempty("name")?;
        let out = Artifact::new("imported_metrics", &[("source", name)])?;
        let format = match p.choice("format", &["auto", "csv", "parquet"])? {
            "auto" => match src.extension().as_str() {
                "csv" => "csv",
                "parquet" => "parquet",
                e => {
                    return Err(p.invalid(
                        "format",
                        format!("cannot tell the format of '.{e}'; give csv or parquet"),
                    ));
                }
            },
            f => f,
        };
        let bytes = src.bytes()?.to_vec();
        let df = if format == "csv" {
            CsvReadOptions::default()
                .with_has_header(true)
                .with_infer_schema_length(Some(10_000))
                .into_reader_with_file_handle(Cursor::new(bytes))
                .finish()
                .map_err(polars_err(&src.name))?
        } else {
            ParquetReader::new(Cursor::new(bytes))
                .finish()
                .map_err(polars_err(&src.name))?
        };
        let names: Vec<String> = df.get_column_names().iter().map(|s| s.to_string()).collect();
        let need = |col: &str| -> Result<()> {
            if names.iter().any(|n| n == col) {
                Ok(())
            } else {
                Err(Error::input(
                    &src.name,
                    format!("no column '{col}'; columns: {}", names.join(", ")),
                ))
            }
        };
        let model_col = p.nonempty("model_column")?;
        let loss_col = p.nonempty("loss_column")?;
        need(model_col)?;
        need(loss_col)?;
        let mapping: Vec<(String, String)> = match p.opt("columns") {
            Some(spec) => spec
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| match s.split_once(':') {
                    Some((a, b)) => (a.trim().to_string(), b.trim().to_string()),
                    None => (s.to_string(), s.to_string()),
                })
                .collect(),
            None => names
                .iter()
                .filter(|n| *n != model_col && *n != loss_col)
                .filter(|n| {
                    df.column(n)
                        .map(|c| c.dtype().is_primitive_numeric())
                        .unwrap_or(false)
                })
                .map(|n| (n.clone(), n.clone()))
                .collect(),
        };
        if mapping.is_empty() {
            return Err(Error::input(
                &src.name,
                "no metric columns to import (give columns=)",
            ));
        }
        for (from, _) in &mapping {
            need(from)?;
        }
        let models_c = df
            .column(model_col)
            .and_then(|c| c.cast(&PlType::String))
            .map_err(polars_err(&src.name))?;
        let models: Vec<Option<String>> = models_c
            .str()
            .map_err(polars_err(&src.name))?
            .iter()
            .map(|s| s.map(str::to_string))
            .collect();
        let float = |col: &str| -> Result<Vec<Option<f64>>> {
            let c = df
                .column(col)
                .and_then(|c| c.cast(&PlType::Float64))
                .map_err(|e| Error::input(&src.name, format!("column '{col}' is not numeric: {e}")))?;
            Ok(c.f64().map_err(polars_err(&src.name))?.iter().collect())
        };
        let loss = float(loss_col)?;
        let mut model_out = Vec::new();
        let mut grid: Vec<Option<naming::GridId>> = Vec::new();
        let (mut losses, mut metric, mut value) = (Vec::new(), Vec::new(), Vec::new());
        let metric_values: Vec<(String, Vec<Option<f64>>)> = mapping
            .iter()
            .map(|(from, to)| Ok((to.clone(), float(from)?)))
            .collect::<Result<_>>()?;
        for (row, m) in models.iter().enumerate() {
            let m = m
                .as_ref()
                .ok_or_else(|| Error::input(&src.name, format!("row {row}: the model id is empty")))?;
            for (to, vals) in &metric_values {
                model_out.push(m.clone());
                grid.push(naming::parse(m));
                losses.push(loss[row]);
                metric.push(to.clone());
                value.push(vals[row]);
            }
        }
        let g = |f: fn(&naming::GridId) -> Option<u32>| -> ArrayRef {
            Arc::new(UInt32Array::from_iter(
                grid.iter().map(|x| x.as_ref().and_then(f)),
            ))
        };
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(model_out)),
            g(|x| Some(x.depth)),
            g(|x| Some(x.width)),
            g(|x| Some(x.epochs)),
            Arc::new(Float64Array::from_iter(
                grid.iter().map(|x| x.as_ref().map(|x| x.weight_decay)),
            )),
            g(|x| x.seed),
            Arc::new(Int32Array::from_iter(
                grid.iter().map(|x| x.as_ref().and_then(|x| x.checkpoint)),
            )),
            Arc::new(Float64Array::from(losses)),
            Arc::new(StringArray::from(metric)),
            Arc::new(Float64Array::from(value)),
        ];
        let batch =
            RecordBatch::try_new(file_schema("imported_metrics")?, cols).ctx("building imported_metrics")?;
        let rows = batch.num_rows();
        ctx.lake.write_artifact(
            &out,
            &[batch],
            Provenance::new("import")
                .param("input", src.content_id(&ctx.lake)?)
                .extra("input", src.name.as_str())
                .param("columns", p.str("columns")),
        )?;
        Ok(format!(
            "imported_metrics/source={name}: {} models x {} metrics = {rows} rows; correlate with source=imported:{name}",
            models.len(),
            mapping.len()
        ))
    }
}
