//! The lake, schemas, SQL and command line.

use std::process::Command;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, Float64Array, Int32Array, Int64Array,
    ListArray, StringArray, UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use lc_lake::artifact::{Artifact, Provenance};
use lc_lake::schemas::{self, TableSchema};
use pipeline::sql::Sql;

use crate::common::{TestLake, bin};

/// Three rows of plausible values for every column; nullable columns get a
/// null in the second row.
fn sample_batch(s: &TableSchema) -> RecordBatch {
    let n = 3usize;
    let mut fields = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for c in &s.columns {
        let valid = |i: usize| !(c.nullable && i == 1);
        let (dt, arr): (DataType, ArrayRef) = match c.type_name.as_str() {
            "bool" => (
                DataType::Boolean,
                Arc::new(BooleanArray::from_iter(
                    (0..n).map(|i| valid(i).then_some(i % 2 == 0)),
                )),
            ),
            "int32" => (
                DataType::Int32,
                Arc::new(Int32Array::from_iter(
                    (0..n).map(|i| valid(i).then_some(i as i32 - 1)),
                )),
            ),
            "int64" => (
                DataType::Int64,
                Arc::new(Int64Array::from_iter(
                    (0..n).map(|i| valid(i).then_some(i as i64 * 7)),
                )),
            ),
            "uint32" => (
                DataType::UInt32,
                Arc::new(UInt32Array::from_iter(
                    (0..n).map(|i| valid(i).then_some(i as u32 + 5)),
                )),
            ),
            "uint64" => (
                DataType::UInt64,
                Arc::new(UInt64Array::from_iter(
                    (0..n).map(|i| valid(i).then_some(i as u64 * 1000)),
                )),
            ),
            "float32" => (
                DataType::Float32,
                Arc::new(Float32Array::from_iter(
                    (0..n).map(|i| valid(i).then_some(i as f32 * 0.5)),
                )),
            ),
            "float64" => (
                DataType::Float64,
                Arc::new(Float64Array::from_iter(
                    (0..n).map(|i| valid(i).then_some(i as f64 / 3.0)),
                )),
            ),
            "utf8" => (
                DataType::Utf8,
                Arc::new(StringArray::from_iter(
                    (0..n).map(|i| valid(i).then(|| format!("v{i} é"))),
                )),
            ),
            "list<float64>" | "list<float32>" | "list<uint32>" => {
                let values: ArrayRef = match c.type_name.as_str() {
                    "list<float64>" => Arc::new(Float64Array::from(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
                    "list<float32>" => Arc::new(Float32Array::from(vec![1.5, 2.0, 3.0, 4.0, 5.0, 6.0])),
                    _ => Arc::new(UInt32Array::from(vec![1, 2, 3, 4, 5, 6])),
                };
                let inner = values.data_type().clone();
                let field = Arc::new(Field::new("item", inner, true));
                let list = ListArray::new(field.clone(), OffsetBuffer::from_lengths([2, 1, 3]), values, None);
                (DataType::List(field), Arc::new(list))
            }
            "fixed_size_list<uint32>" => {
                let field = Arc::new(Field::new("item", DataType::UInt32, true));
                let values = Arc::new(UInt32Array::from_iter_values(0..(4 * n as u32)));
                (
                    DataType::FixedSizeList(field.clone(), 4),
                    Arc::new(FixedSizeListArray::new(field, 4, values, None)),
                )
            }
            other => panic!("no sample for type {other}"),
        };
        fields.push(Field::new(&c.name, dt, c.nullable));
        cols.push(arr);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
}

fn partition_values(s: &TableSchema) -> Vec<(String, String)> {
    s.partitions
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.clone(), format!("p{i}-x")))
        .collect()
}

/// Every table is written through the real writer, read back by our reader
/// and by DataFusion SQL, and checked against its schema file (pytest reads
/// every table of a real study with polars, pandas and pyarrow).
#[test]
fn every_table_round_trips_and_matches_its_schema() {
    let tl = TestLake::new();
    let sql_tables: Vec<&TableSchema> = schemas::tables().iter().filter(|s| s.kind == "table").collect();
    assert!(sql_tables.len() >= 13, "tables: {}", sql_tables.len());
    for s in &sql_tables {
        let batch = sample_batch(s);
        let parts = partition_values(s);
        let parts_ref: Vec<(&str, &str)> = parts.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let a = Artifact::new(&s.table, &parts_ref).unwrap();
        let m = tl
            .lake()
            .write_artifact(&a, std::slice::from_ref(&batch), Provenance::new("test"))
            .unwrap();
        assert_eq!(m.rows, 3);
        let back = tl.lake().read_artifact(&a).unwrap();
        s.check(back[0].schema().as_ref(), false).unwrap();
        assert_eq!(
            back[0].columns(),
            batch.columns(),
            "{}: values changed on the way",
            s.table
        );
    }
    // SQL sees every table with its partition columns.
    let sql = Sql::open(tl.lake()).unwrap();
    for s in &sql_tables {
        let out = sql.query(&format!("SELECT * FROM {}", s.table), false).unwrap();
        let rows: usize = out.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 3, "{}", s.table);
        s.check(out[0].schema().as_ref(), true).unwrap();
    }
}

#[test]
fn sql_is_read_only_unless_allowed() {
    let tl = TestLake::new();
    let sql = Sql::open(tl.lake()).unwrap();
    for stmt in [
        "CREATE TABLE t AS SELECT 1 AS x",
        "CREATE VIEW v AS SELECT 1",
        "INSERT INTO models SELECT * FROM models",
        &format!("COPY (SELECT 1) TO '{}/x.csv'", tl.dir.path().display()),
        "SET datafusion.execution.batch_size = 10",
    ] {
        let err = sql.query(stmt, false).unwrap_err().to_string();
        assert!(
            err.contains("read-only") && err.contains("--allow-write"),
            "{stmt}: {err}"
        );
    }
    assert!(!tl.dir.path().join("x.csv").exists());
    sql.query("CREATE VIEW v AS SELECT 1 AS x", true).unwrap();
    let out = sql.query("SELECT x FROM v", false).unwrap();
    assert_eq!(out[0].num_rows(), 1);
}

/// A partition written after the session was opened is visible to it.
#[test]
fn new_partitions_appear_without_reregistration() {
    let tl = TestLake::new();
    let sql = Sql::open(tl.lake()).unwrap();
    let count = |sql: &Sql| -> i64 {
        let out = sql.query("SELECT COUNT(*) AS n FROM pair_tiles", false).unwrap();
        use arrow::array::AsArray;
        out[0]
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0)
    };
    assert_eq!(count(&sql), 0);
    let s = schemas::table("pair_tiles").unwrap();
    for model in ["a", "b"] {
        let a = Artifact::new(
            "pair_tiles",
            &[("model", model), ("split", "train"), ("layer", "1")],
        )
        .unwrap();
        tl.lake()
            .write_artifact(&a, &[sample_batch(s)], Provenance::new("test"))
            .unwrap();
        assert_eq!(count(&sql), if model == "a" { 3 } else { 6 });
    }
}

#[test]
fn interrupted_artifacts_and_stale_inputs_are_reported() {
    let tl = TestLake::new();
    let s = schemas::table("vocab").unwrap();
    let a = Artifact::new("vocab", &[("dataset", "d"), ("split", "train")]).unwrap();
    let m = tl
        .lake()
        .write_artifact(&a, &[sample_batch(s)], Provenance::new("test"))
        .unwrap();
    tl.lake().require(&a, "run vocab").unwrap();
    // Data replaced without its manifest (a writer died between the two).
    tl.lake()
        .put(&a.data_key(), bytes::Bytes::from_static(b"not parquet"))
        .unwrap();
    let err = tl.lake().require(&a, "run vocab").unwrap_err().to_string();
    assert!(
        err.contains("being rewritten or a write was interrupted"),
        "{err}"
    );
    // Siblings computed from other inputs are refused, or replaced with force.
    let other = vec![lc_lake::manifest::InputRef {
        artifact: "chunks/x".into(),
        content_hash: "abc".into(),
    }];
    let err = tl
        .lake()
        .check_siblings(std::slice::from_ref(&m), &other, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("refusing to mix") && err.contains("force=true"),
        "{err}"
    );
    tl.lake().check_siblings(&[m], &other, true).unwrap();
    assert!(tl.lake().manifest(&a).unwrap().is_none());
}

fn cli(lake: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .arg("--lake")
        .arg(lake)
        .arg("-q")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn cli_lists_valid_stages_and_keys_and_formats_results() {
    let tl = TestLake::new();
    let lake = tl.url();
    let (ok, _, err) = cli(&lake, &["run", "stage=nope"]);
    assert!(
        !ok && err.contains("unknown stage 'nope'") && err.contains("ingest") && err.contains("correlate"),
        "{err}"
    );
    let (ok, _, err) = cli(&lake, &["run", "stage=pack", "TT=3"]);
    assert!(
        !ok && err.contains("parameter TT") && err.contains("valid keys: T, batch, dataset"),
        "{err}"
    );
    let (ok, out, _) = cli(&lake, &["stages"]);
    assert!(ok && out.contains("collect") && out.contains("reads:") && out.contains("checkpoint_every"));

    let s = schemas::table("models").unwrap();
    let a = Artifact::new("models", &[("model", "m1")]).unwrap();
    tl.lake()
        .write_artifact(&a, &[sample_batch(s)], Provenance::new("test"))
        .unwrap();
    let q = "SELECT model, name, val_loss FROM models ORDER BY val_loss";
    let (ok, out, err) = cli(&lake, &["sql", q, "--format", "csv"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().next().unwrap(), "model,name,val_loss");
    assert_eq!(out.lines().count(), 4);
    let (ok, out, _) = cli(&lake, &["sql", q, "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(ok && v.as_array().unwrap().len() == 3);
    let qf = tl.file("q.sql", q.as_bytes());
    let parquet_out = tl.dir.path().join("out/result.parquet");
    let (ok, out, err) = cli(&lake, &["sql", "-f", &qf, "--out", parquet_out.to_str().unwrap()]);
    assert!(ok && out.contains("val_loss"), "{err}");
    let rows: usize = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(&parquet_out).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap()
    .map(|b| b.unwrap().num_rows())
    .sum();
    assert_eq!(rows, 3);
    let (ok, _, err) = cli(&lake, &["sql", "DROP TABLE models"]);
    assert!(!ok && err.contains("read-only"), "{err}");
    let (ok, out, _) = cli(&lake, &["status"]);
    assert!(
        ok && out.contains("models") && out.contains("model=m1") && out.contains(" 3 "),
        "{out}"
    );
}
