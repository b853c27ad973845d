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
//! The file is read into Arrow batches (CSV: arrow's schema inference over
//! the first 10,000 rows, then a text column whose every value is a number,
//! `NaN` and `inf` included, is read as numbers; Parquet: its own schema),
//! its numeric columns cast to f64, and the batches handed to DataFusion. `columns=` lists the metrics, comma-separated: a bare
//! source column keeps its name, `src:dst` renames it, and `name=EXPR`
//! computes a metric from the source columns with an SQL expression that
//! DataFusion parses as one expression and evaluates (e.g.
//! `equinorm=sqrt(norms_log_var)/norms_log_mean`, the CoV the paper
//! correlates, from the means and variances its table publishes). A value that
//! comes out NaN or infinite (a division by zero) is stored as NULL and
//! counted in the summary. Empty `columns` means every numeric column but the
//! model and loss columns.

use std::io::Cursor;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int32Array, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use lc_lake::artifact::{Artifact, Provenance, file_schema};
use lc_lake::source::Source;

use crate::error::{Context, Error, Result};
use crate::params::{ParamSpec, Params, param, required};
use crate::stages::{Ctx, Stage};
use lc_models::naming;

pub struct Import;

const PARAMS: &[ParamSpec] = &[
    required("input", "CSV or Parquet file with one row per model"),
    required("name", "name of the imported table (source=NAME)"),
    param("model_column", "model", "column holding the model id"),
    param("loss_column", "val_loss", "column holding the validation loss"),
    param(
        "columns",
        "",
        "metrics: src, src:dst or name=SQL_EXPR over source columns, comma-separated (empty: every other numeric column)",
    ),
    param("format", "auto", "auto | csv | parquet"),
];

fn input_err<E: std::fmt::Display>(name: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::input(name, e.to_string())
}

/// Rows whose types CSV inference looks at.
const INFER_ROWS: usize = 10_000;

/// The input as one schema and its batches.
struct Table {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
}

impl Table {
    fn names(&self) -> Vec<String> {
        self.schema.fields().iter().map(|f| f.name().clone()).collect()
    }

    fn is_numeric(&self, name: &str) -> bool {
        self.schema
            .field_with_name(name)
            .is_ok_and(|f| numeric(f.data_type()))
    }

    /// This table with some columns replaced: `new[i]`, where given, is
    /// column i's new type and its arrays, one per batch.
    fn replace(&self, new: Vec<Option<(DataType, Vec<ArrayRef>)>>, name: &str) -> Result<Table> {
        let fields: Vec<Field> = self
            .schema
            .fields()
            .iter()
            .zip(&new)
            .map(|(f, n)| match n {
                Some((t, _)) => Field::new(f.name(), t.clone(), true),
                None => f.as_ref().clone(),
            })
            .collect();
        let schema = Arc::new(Schema::new(fields));
        let batches = self
            .batches
            .iter()
            .enumerate()
            .map(|(k, b)| {
                let cols = b
                    .columns()
                    .iter()
                    .zip(&new)
                    .map(|(c, n)| {
                        n.as_ref()
                            .map_or_else(|| c.clone(), |(_, arrays)| arrays[k].clone())
                    })
                    .collect();
                RecordBatch::try_new(schema.clone(), cols).map_err(input_err(name))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Table { schema, batches })
    }
}

/// The column types imported as numbers (integers and floats of any width).
fn numeric(t: &DataType) -> bool {
    t.is_integer() || t.is_floating()
}

/// Reads a CSV file with a header row, or a Parquet file.
fn read_table(bytes: Vec<u8>, format: &str, name: &str) -> Result<Table> {
    let table = if format == "csv" {
        let csv = arrow::csv::reader::Format::default().with_header(true);
        let (schema, _) = csv
            .infer_schema(Cursor::new(&bytes), Some(INFER_ROWS))
            .map_err(input_err(name))?;
        let schema = Arc::new(schema);
        let batches = arrow::csv::ReaderBuilder::new(schema.clone())
            .with_format(csv)
            .build(Cursor::new(bytes))
            .map_err(input_err(name))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(input_err(name))?;
        numeric_text_as_numbers(Table { schema, batches }, name)?
    } else {
        read_parquet(bytes::Bytes::from(bytes), name)?
    };
    Ok(table)
}

/// A Parquet file's columns as its Parquet schema types them. The Arrow
/// schema some writers embed is skipped: arrow-ipc 59 panics
/// (`unimplemented!`) on a damaged one, and the columns are cast anyway. A
/// panic of the reader on any other damage becomes this file's error.
fn read_parquet(bytes: bytes::Bytes, name: &str) -> Result<Table> {
    use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
    let read = || -> Result<Table> {
        let options = ArrowReaderOptions::new().with_skip_arrow_metadata(true);
        let reader = ParquetRecordBatchReaderBuilder::try_new_with_options(bytes, options)
            .map_err(input_err(name))?
            .build()
            .map_err(input_err(name))?;
        let schema = arrow::record_batch::RecordBatchReader::schema(&reader);
        let batches = reader
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(input_err(name))?;
        Ok(Table { schema, batches })
    };
    std::panic::catch_unwind(read).unwrap_or_else(|_| {
        Err(Error::input(
            name,
            "not a readable Parquet file: the Parquet reader failed on it (damaged?)",
        ))
    })
}

/// CSV inference types a column holding `NaN` or `inf` as text: such a
/// column whose every value parses as a number (blanks are nulls) is read
/// as f64, as a researcher's metric column with a NaN should be.
fn numeric_text_as_numbers(table: Table, name: &str) -> Result<Table> {
    // Every value parsed once: None as soon as one is not a number.
    let numbers = |col: &ArrayRef| -> Option<ArrayRef> {
        let values = col
            .as_string::<i32>()
            .iter()
            .map(|v| v.map(|v| v.trim().parse::<f64>()).transpose().ok())
            .collect::<Option<Float64Array>>()?;
        Some(Arc::new(values))
    };
    let new = (0..table.schema.fields().len())
        .map(|i| {
            let all_blank = table
                .batches
                .iter()
                .all(|b| b.column(i).null_count() == b.num_rows());
            if table.schema.field(i).data_type() != &DataType::Utf8 || all_blank {
                return None;
            }
            let arrays = table
                .batches
                .iter()
                .map(|b| numbers(b.column(i)))
                .collect::<Option<Vec<_>>>()?;
            Some((DataType::Float64, arrays))
        })
        .collect();
    table.replace(new, name)
}

/// One metric to import.
#[derive(Debug, Clone, PartialEq)]
enum Metric {
    /// A source column, under a (possibly new) name.
    Column(String, String),
    /// `name=EXPR`: an SQL expression over the source columns.
    Expr(String, String),
}

impl Metric {
    fn name(&self) -> &str {
        match self {
            Metric::Column(_, to) | Metric::Expr(to, _) => to,
        }
    }
}

fn is_ident(s: &str) -> bool {
    let mut cs = s.chars();
    cs.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Split `columns=` at the commas that are outside parentheses and quotes
/// (expressions may call functions of several arguments).
fn split_top_level(spec: &str) -> Result<Vec<String>, String> {
    let (mut out, mut cur, mut depth, mut quote) = (Vec::new(), String::new(), 0i32, None::<char>);
    for c in spec.chars() {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '(') => depth += 1,
            (None, ')') => depth -= 1,
            (None, ',') if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        if depth < 0 {
            return Err(format!("unbalanced ')' in '{spec}'"));
        }
        cur.push(c);
    }
    if depth != 0 || quote.is_some() {
        return Err(format!("unbalanced parentheses or quotes in '{spec}'"));
    }
    out.push(cur);
    Ok(out
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

/// Parse `columns=`: `src`, `src:dst` or `name=EXPR`, comma-separated.
fn parse_columns(spec: &str) -> Result<Vec<Metric>, String> {
    let mut out = Vec::new();
    for item in split_top_level(spec)? {
        let m = match (item.split_once('='), item.split_once(':')) {
            (Some((name, expr)), _) if is_ident(name.trim()) && !expr.trim().is_empty() => {
                Metric::Expr(name.trim().to_string(), expr.trim().to_string())
            }
            (_, Some((a, b))) if is_ident(a.trim()) && is_ident(b.trim()) => {
                Metric::Column(a.trim().to_string(), b.trim().to_string())
            }
            _ if !item.contains(['=', ':']) => Metric::Column(item.clone(), item.clone()),
            _ => {
                return Err(format!(
                    "'{item}' is not src, src:dst or name=EXPR (name a letter or _ followed by letters, digits, _)"
                ));
            }
        };
        if out.iter().any(|o: &Metric| o.name() == m.name()) {
            return Err(format!("metric '{}' is named twice", m.name()));
        }
        out.push(m);
    }
    Ok(out)
}

type Evaluated = (
    Vec<Option<String>>,
    Vec<Option<f64>>,
    Vec<(String, Vec<Option<f64>>)>,
    Vec<(String, usize)>,
);

/// The model ids, losses and metric values of every row: numeric source
/// columns become f64, the table goes to DataFusion as Parquet, and each
/// metric is a column or a parsed expression there. Non-finite values become
/// NULL and are counted per metric.
fn evaluate(
    table: &Table,
    source: &str,
    model_col: &str,
    loss_col: &str,
    mapping: &[Metric],
    ctx: &Ctx,
) -> Result<Evaluated> {
    use datafusion::datasource::MemTable;
    use datafusion::prelude::{Expr, SessionContext, cast, col};
    // Numbers as f64, the model ids as text.
    let target = |f: &Field| -> Option<DataType> {
        if numeric(f.data_type()) {
            Some(DataType::Float64)
        } else if f.name() == model_col && f.data_type() != &DataType::Utf8 {
            Some(DataType::Utf8)
        } else {
            None
        }
    };
    let new = table
        .schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            target(f)
                .map(|t| {
                    let arrays = table
                        .batches
                        .iter()
                        .map(|b| arrow::compute::cast(b.column(i), &t))
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    Ok((t, arrays))
                })
                .transpose()
        })
        .collect::<std::result::Result<Vec<_>, arrow::error::ArrowError>>()
        .map_err(input_err(source))?;
    let Table { schema, batches } = table.replace(new, source)?;
    let memory = MemTable::try_new(schema, vec![batches]).ctx("staging the imported table")?;
    let session = SessionContext::new();
    let lake = &ctx.lake;
    let table = session
        .read_table(Arc::new(memory))
        .ctx("reading the imported table")?;
    let mut exprs: Vec<Expr> = vec![
        cast(col(format!("\"{model_col}\"")), arrow::datatypes::DataType::Utf8).alias("__model"),
        cast(
            col(format!("\"{loss_col}\"")),
            arrow::datatypes::DataType::Float64,
        )
        .alias("__loss"),
    ];
    for m in mapping {
        let e = match m {
            Metric::Column(from, _) => col(format!("\"{from}\"")),
            Metric::Expr(name, text) => session.parse_sql_expr(text, table.schema()).map_err(|e| {
                Error::input(
                    source,
                    format!(
                        "{name}={text} is not an SQL expression over its columns: {}",
                        e.strip_backtrace()
                    ),
                )
            })?,
        };
        exprs.push(cast(e, arrow::datatypes::DataType::Float64).alias(format!("m{}", exprs.len())));
    }
    let batches = lake
        .block_on(async { table.select(exprs)?.collect().await })
        .map_err(|e| Error::input(source, format!("evaluating columns=: {}", e.strip_backtrace())))?;
    let mut models = Vec::new();
    let mut loss = Vec::new();
    let mut values: Vec<Vec<Option<f64>>> = vec![Vec::new(); mapping.len()];
    let mut dropped = vec![0usize; mapping.len()];
    for b in &batches {
        let ids = b.column(0).as_string::<i32>();
        models.extend((0..b.num_rows()).map(|i| ids.is_valid(i).then(|| ids.value(i).to_string())));
        let l = b.column(1).as_primitive::<Float64Type>();
        loss.extend((0..b.num_rows()).map(|i| l.is_valid(i).then(|| l.value(i))));
        for (k, v) in values.iter_mut().enumerate() {
            let a = b.column(2 + k).as_primitive::<Float64Type>();
            for i in 0..b.num_rows() {
                let x = a.is_valid(i).then(|| a.value(i));
                if x.is_some_and(|x| !x.is_finite()) {
                    dropped[k] += 1;
                    v.push(None);
                } else {
                    v.push(x);
                }
            }
        }
    }
    Ok((
        models,
        loss,
        mapping.iter().map(|m| m.name().to_string()).zip(values).collect(),
        mapping
            .iter()
            .map(|m| m.name().to_string())
            .zip(dropped)
            .collect(),
    ))
}

/// import's parameters, checked before the file is read.
struct ImportArgs<'a> {
    input: &'a str,
    name: &'a str,
    model_column: &'a str,
    loss_column: &'a str,
    /// `columns=` parsed; `None`: every other numeric column.
    columns: Option<Vec<Metric>>,
    /// `auto` (from the file's extension), `csv` or `parquet`.
    format: &'a str,
}

impl<'a> ImportArgs<'a> {
    fn parse(p: &'a Params) -> Result<Self> {
        Ok(ImportArgs {
            input: p.nonempty("input")?,
            name: p.nonempty("name")?,
            model_column: p.nonempty("model_column")?,
            loss_column: p.nonempty("loss_column")?,
            columns: p
                .opt("columns")
                .map(|spec| parse_columns(spec).map_err(|e| p.invalid("columns", e)))
                .transpose()?,
            format: p.choice("format", &["auto", "csv", "parquet"])?,
        })
    }
}

impl Stage for Import {
    fn name(&self) -> &'static str {
        "import"
    }
    fn about(&self) -> &'static str {
        "import an external per-model metrics table (CSV/Parquet) for correlate and SQL"
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
    fn check(&self, p: &Params) -> Result<()> {
        ImportArgs::parse(p).map(drop)
    }

    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String> {
        let args = ImportArgs::parse(p)?;
        let src = Source::open(&ctx.lake, args.input)?;
        let name = args.name;
        let out = Artifact::new("imported_metrics", &[("source", name)])?;
        let format = match args.format {
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
        let table = read_table(src.bytes()?.to_vec(), format, &src.name)?;
        let names = table.names();
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
        let (model_col, loss_col) = (args.model_column, args.loss_column);
        need(model_col)?;
        need(loss_col)?;
        let mapping: Vec<Metric> = match args.columns {
            Some(columns) => columns,
            None => names
                .iter()
                .filter(|n| *n != model_col && *n != loss_col)
                .filter(|n| table.is_numeric(n))
                .map(|n| Metric::Column(n.clone(), n.clone()))
                .collect(),
        };
        if mapping.is_empty() {
            return Err(Error::input(
                &src.name,
                "no metric columns to import (give columns=)",
            ));
        }
        for m in &mapping {
            if let Metric::Column(from, _) = m {
                need(from)?;
            }
        }
        let (models, loss, metric_values, dropped) =
            evaluate(&table, &src.name, model_col, loss_col, &mapping, ctx)?;
        let mut model_out = Vec::new();
        let mut grid: Vec<Option<naming::GridId>> = Vec::new();
        let (mut losses, mut metric, mut value) = (Vec::new(), Vec::new(), Vec::new());
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
        let notes: Vec<String> = dropped
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(m, n)| format!("{m}: {n} value(s) not finite (a division by zero?) stored as NULL"))
            .collect();
        let note = if notes.is_empty() {
            String::new()
        } else {
            format!("\nnote: {}", notes.join("; "))
        };
        Ok(format!(
            "imported_metrics/source={name}: {} models x {} metrics = {rows} rows; correlate with source=imported:{name}{note}",
            models.len(),
            mapping.len()
        ))
    }
}
