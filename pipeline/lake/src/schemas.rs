//! Table schemas, one JSON file per lake table under `schemas/`.
//!
//! The files are the contract for readers (each column has a type and a
//! description) and for the code: every writer builds its Arrow schema from
//! here and every written batch is checked against it, so a table can never
//! drift from its documented shape. The files are compiled into the binary so
//! it works away from the repository (e.g. on a GPU machine).
//!
//! Type names: `bool`, `int32`, `int64`, `uint32`, `uint64`, `float32`,
//! `float64`, `utf8`, `list<T>` and `fixed_size_list<T>` (any length; chunks
//! store T tokens). Partition columns live in the hive path (`key=value`) and
//! are strings.

use std::sync::{Arc, OnceLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Raw text of every schema file, by table name.
pub const SCHEMA_FILES: &[(&str, &str)] = &[
    ("documents", include_str!("../../../schemas/documents.json")),
    ("tokens", include_str!("../../../schemas/tokens.json")),
    ("chunks", include_str!("../../../schemas/chunks.json")),
    ("vocab", include_str!("../../../schemas/vocab.json")),
    ("models", include_str!("../../../schemas/models.json")),
    ("train_log", include_str!("../../../schemas/train_log.json")),
    ("class_stats", include_str!("../../../schemas/class_stats.json")),
    ("classifiers", include_str!("../../../schemas/classifiers.json")),
    ("decisions", include_str!("../../../schemas/decisions.json")),
    ("pair_tiles", include_str!("../../../schemas/pair_tiles.json")),
    (
        "class_metrics",
        include_str!("../../../schemas/class_metrics.json"),
    ),
    ("correlations", include_str!("../../../schemas/correlations.json")),
    (
        "imported_metrics",
        include_str!("../../../schemas/imported_metrics.json"),
    ),
    (
        "pair_extremes",
        include_str!("../../../schemas/pair_extremes.json"),
    ),
    (
        "model_metrics",
        include_str!("../../../schemas/model_metrics.json"),
    ),
];

#[derive(Debug, Clone, Deserialize)]
pub struct ColumnSpec {
    pub name: String,
    #[serde(rename = "type", default = "utf8")]
    pub type_name: String,
    #[serde(default)]
    pub nullable: bool,
    #[serde(default)]
    pub doc: String,
}

fn utf8() -> String {
    "utf8".into()
}

#[derive(Debug, Clone, Deserialize)]
pub struct TableSchema {
    pub table: String,
    /// `table` (Parquet files in the lake) or `view` (defined in `sql/`).
    pub kind: String,
    pub doc: String,
    #[serde(default)]
    pub partitions: Vec<ColumnSpec>,
    pub columns: Vec<ColumnSpec>,
}

/// Parse a type name of the schema files into an Arrow type.
/// `fixed_size_list<T>` gets length `fixed_len` (the caller's T).
pub fn parse_type(name: &str, fixed_len: i32) -> Result<DataType> {
    let name = name.trim();
    Ok(match name {
        "bool" => DataType::Boolean,
        "int32" => DataType::Int32,
        "int64" => DataType::Int64,
        "uint32" => DataType::UInt32,
        "uint64" => DataType::UInt64,
        "float32" => DataType::Float32,
        "float64" => DataType::Float64,
        "utf8" => DataType::Utf8,
        _ => {
            if let Some(inner) = name.strip_prefix("list<").and_then(|s| s.strip_suffix('>')) {
                DataType::List(Arc::new(Field::new("item", parse_type(inner, fixed_len)?, true)))
            } else if let Some(inner) = name
                .strip_prefix("fixed_size_list<")
                .and_then(|s| s.strip_suffix('>'))
            {
                DataType::FixedSizeList(
                    Arc::new(Field::new("item", parse_type(inner, fixed_len)?, true)),
                    fixed_len,
                )
            } else {
                return Err(Error::invalid(format!("unknown schema type '{name}'")));
            }
        }
    })
}

/// Whether an actual Arrow type satisfies a schema type (list item names and
/// fixed lengths are not part of the contract).
fn type_matches(expected: &DataType, actual: &DataType) -> bool {
    match (expected, actual) {
        (DataType::List(e), DataType::List(a)) | (DataType::List(e), DataType::LargeList(a)) => {
            type_matches(e.data_type(), a.data_type())
        }
        (DataType::FixedSizeList(e, _), DataType::FixedSizeList(a, _)) => {
            type_matches(e.data_type(), a.data_type())
        }
        (DataType::Utf8, DataType::Utf8View) | (DataType::Utf8, DataType::LargeUtf8) => true,
        (e, a) => e == a,
    }
}

impl TableSchema {
    /// The Arrow schema of the table's Parquet files (no partition columns).
    pub fn file_schema(&self) -> SchemaRef {
        self.file_schema_with_len(1)
    }

    /// As [`TableSchema::file_schema`], with fixed-size lists of length `len`.
    pub fn file_schema_with_len(&self, len: i32) -> SchemaRef {
        let fields: Vec<Field> = self
            .columns
            .iter()
            .map(|c| {
                Field::new(
                    &c.name,
                    parse_type(&c.type_name, len).expect("schema files are validated by tests"),
                    c.nullable,
                )
            })
            .collect();
        Arc::new(Schema::new(fields))
    }

    pub fn partition_names(&self) -> Vec<&str> {
        self.partitions.iter().map(|p| p.name.as_str()).collect()
    }

    /// Check an Arrow schema against this table: same column names in the same
    /// order, matching types, and no nulls where the schema forbids them.
    /// `with_partitions` also expects the partition columns (as SQL sees them).
    pub fn check(&self, actual: &Schema, with_partitions: bool) -> Result<()> {
        let mut expected: Vec<(&str, DataType, bool)> = self
            .columns
            .iter()
            .map(|c| {
                (
                    c.name.as_str(),
                    parse_type(&c.type_name, 1).unwrap_or(DataType::Null),
                    c.nullable,
                )
            })
            .collect();
        if with_partitions {
            for p in &self.partitions {
                expected.push((p.name.as_str(), DataType::Utf8, true));
            }
        }
        let problem = |p: String| Error::Schema {
            table: self.table.clone(),
            problem: p,
        };
        if actual.fields().len() != expected.len() {
            let names: Vec<&str> = actual.fields().iter().map(|f| f.name().as_str()).collect();
            let want: Vec<&str> = expected.iter().map(|e| e.0).collect();
            return Err(problem(format!("columns {names:?}, expected {want:?}")));
        }
        for (field, (name, ty, nullable)) in actual.fields().iter().zip(&expected) {
            if field.name() != name {
                return Err(problem(format!(
                    "column '{}' where '{}' was expected",
                    field.name(),
                    name
                )));
            }
            let partition_col = with_partitions && self.partitions.iter().any(|p| p.name == *name);
            let ok = if partition_col {
                // DataFusion may present partition values as dictionaries.
                matches!(field.data_type(), DataType::Utf8 | DataType::Dictionary(_, _))
                    || type_matches(ty, field.data_type())
            } else {
                type_matches(ty, field.data_type())
            };
            if !ok {
                return Err(problem(format!(
                    "column '{name}' has type {}, expected {ty}",
                    field.data_type()
                )));
            }
            if field.is_nullable() && !*nullable && !partition_col {
                return Err(problem(format!(
                    "column '{name}' is nullable, but the schema says it never is"
                )));
            }
        }
        Ok(())
    }

    /// Check a batch: its schema, and that non-nullable columns hold no nulls.
    pub fn check_batch(&self, batch: &arrow::record_batch::RecordBatch) -> Result<()> {
        self.check(batch.schema().as_ref(), false)?;
        for (col, spec) in batch.columns().iter().zip(&self.columns) {
            if !spec.nullable && col.null_count() > 0 {
                return Err(Error::Schema {
                    table: self.table.clone(),
                    problem: format!("column '{}' holds {} nulls", spec.name, col.null_count()),
                });
            }
        }
        Ok(())
    }
}

fn all() -> &'static Vec<TableSchema> {
    static ALL: OnceLock<Vec<TableSchema>> = OnceLock::new();
    ALL.get_or_init(|| {
        SCHEMA_FILES
            .iter()
            .map(|(name, text)| {
                let s: TableSchema = serde_json::from_str(text)
                    .unwrap_or_else(|e| panic!("schemas/{name}.json is invalid: {e}"));
                assert_eq!(&s.table, name, "schemas/{name}.json names another table");
                s
            })
            .collect()
    })
}

/// The schema of a table or view by name.
pub fn table(name: &str) -> Result<&'static TableSchema> {
    all().iter().find(|s| s.table == name).ok_or_else(|| {
        let names: Vec<&str> = all().iter().map(|s| s.table.as_str()).collect();
        Error::invalid(format!("unknown table '{name}'; tables: {}", names.join(", ")))
    })
}

/// Every schema (tables and views).
pub fn tables() -> &'static [TableSchema] {
    all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_file_parses_and_types_are_known() {
        for s in tables() {
            assert!(
                s.kind == "table" || s.kind == "view",
                "{}: kind {}",
                s.table,
                s.kind
            );
            for c in &s.columns {
                parse_type(&c.type_name, 4).unwrap_or_else(|e| panic!("{}.{}: {e}", s.table, c.name));
                assert!(!c.doc.is_empty(), "{}.{} has no doc", s.table, c.name);
            }
            let _ = s.file_schema();
        }
    }

    #[test]
    fn check_reports_the_offending_column() {
        let s = table("pair_tiles").unwrap();
        let mut fields: Vec<Field> = s.file_schema().fields().iter().map(|f| (**f).clone()).collect();
        fields[3] = Field::new("n", DataType::Int64, false);
        let err = s.check(&Schema::new(fields), false).unwrap_err().to_string();
        assert!(err.contains("'n'") && err.contains("UInt64"), "{err}");
    }
}
