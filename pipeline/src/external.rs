//! Results made outside the pipeline's stages, committed as the stages
//! commit theirs: per-class statistics accumulated by another program (the
//! Python module's `ClassStats.write`) and the output-layer rows of a model
//! whose weights the lake does not hold (`write_classifier`).
//!
//! Writes: `class_stats/model=ID/split=S/layer=L`, exactly the table
//! `collect` writes (same schema, manifest fields and content identity), so
//! `analyze`, `status` and SQL take it unchanged; `classifiers/model=ID`,
//! which `analyze` reads for NC3 when the model's weights are not in the lake.
//!
//! Invariants: such results cannot be recomputed from the lake, so an
//! existing artifact is never replaced by different content without `force`;
//! committing the same content again is a no-op ("up to date"). Statistics
//! of one model and split from other inputs (a `collect` run) are not mixed
//! with them, as `collect` refuses to mix its own.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float32Array, ListArray, UInt32Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Float32Type, UInt32Type};
use arrow::record_batch::RecordBatch;
use lc_lake::artifact::{Artifact, Provenance, file_schema};
use lc_lake::lake::Lake;
use lc_lake::manifest::Manifest;
use lc_metrics::ClassStats;

use crate::checkpoint::ModelRef;
use crate::error::{Context, Error, Result};
use crate::partials::commit_class_stats;

/// The `stage` recorded in the manifests of results made outside the stages.
pub const STAGE: &str = "python";

/// What committing found: a new artifact, or the same content already there.
#[derive(Debug, Clone)]
pub struct Committed {
    pub manifest: Manifest,
    pub up_to_date: bool,
}

/// Where statistics computed outside `collect` belong.
#[derive(Debug, Clone)]
pub struct StatsTarget<'a> {
    pub model: &'a str,
    /// The dataset whose tokenizer names the classes (analyze's token
    /// text); none when the classes are not a lake dataset's tokens.
    pub dataset: Option<&'a str>,
    pub split: &'a str,
    pub layer: usize,
}

/// A digest of statistics' exact content, in class order.
fn stats_digest(stats: &ClassStats) -> String {
    let mut order: Vec<usize> = (0..stats.len()).collect();
    order.sort_by_key(|&r| stats.classes[r]);
    let mut h = blake3::Hasher::new();
    h.update(&(stats.d as u64).to_le_bytes());
    for r in order {
        h.update(&stats.classes[r].to_le_bytes());
        h.update(&stats.count[r].to_le_bytes());
        h.update(&stats.m2[r].to_le_bytes());
        for x in stats.mean_of(r) {
            h.update(&x.to_le_bytes());
        }
    }
    h.finalize().to_hex().to_string()
}

/// Refuse to replace an existing artifact by different content unless
/// `force`; `Some` when the same content is already committed.
fn existing(lake: &Lake, a: &Artifact, prov: &Provenance, force: bool) -> Result<Option<Manifest>> {
    let Some(m) = lake.manifest(a)? else {
        return Ok(None);
    };
    if prov.matches(&m) {
        return Ok(Some(m));
    }
    if force {
        return Ok(None);
    }
    Err(Error::Stale(format!(
        "{a} already holds other results (made by {}); they cannot be recomputed from the lake, so they are kept (pass force=True to replace them)",
        m.stage
    )))
}

/// Commit statistics accumulated outside `collect` as `class_stats`.
pub fn commit_class_stats_from(
    lake: &Lake,
    target: &StatsTarget<'_>,
    stats: &ClassStats,
    force: bool,
) -> Result<Committed> {
    if stats.is_empty() {
        return Err(Error::invalid(format!(
            "no samples to write for {}/{}/layer {}: update the statistics first",
            target.model, target.split, target.layer
        )));
    }
    let a = Artifact::new(
        "class_stats",
        &[
            ("model", target.model),
            ("split", target.split),
            ("layer", &target.layer.to_string()),
        ],
    )?;
    // What collect records, less what only a forward pass knows (its
    // inputs, the model's source, its speed); the digest names the content.
    let mut prov = Provenance::new(STAGE).param("stats", stats_digest(stats));
    if let Some(ds) = target.dataset {
        prov = prov.extra("dataset", ds);
    }
    if let Some(m) = existing(lake, &a, &prov.clone().param("layer", target.layer), force)? {
        return Ok(Committed {
            manifest: m,
            up_to_date: true,
        });
    }
    let mut written = commit_class_stats(
        lake,
        target.model,
        target.split,
        &[target.layer],
        std::slice::from_ref(stats),
        &prov,
        force,
    )?;
    Ok(Committed {
        manifest: written.remove(0),
        up_to_date: false,
    })
}

/// What rows made outside the stages were made from, for their manifest:
/// parameters and input artifacts as a stage records them (analyze checks
/// decisions' `min_per_class` and inputs, for one), and free-form facts.
#[derive(Debug, Clone, Default)]
pub struct MadeFrom {
    pub params: std::collections::BTreeMap<String, String>,
    pub inputs: Vec<Artifact>,
    pub about: serde_json::Map<String, serde_json::Value>,
}

/// Rows made outside the stages (e.g. the Python module's evaluation of a
/// Hugging Face model) as `batches` of `table`, cast to the table's schema
/// by column name, committed at `partition` with `existing`'s refusal of
/// different content. `about` goes to the manifest's extra fields.
pub fn commit_rows(
    lake: &Lake,
    table: &str,
    partition: &[(&str, &str)],
    batches: &[RecordBatch],
    made_from: &MadeFrom,
    force: bool,
) -> Result<Committed> {
    let a = Artifact::new(table, partition)?;
    let schema = file_schema(table)?;
    let mut cast = Vec::with_capacity(batches.len());
    for b in batches {
        cast.push(to_schema(b, &schema).map_err(|e| Error::invalid(format!("{a}: {e}")))?);
    }
    if cast.iter().all(|b| b.num_rows() == 0) {
        return Err(Error::invalid(format!("{a}: no rows to write")));
    }
    let mut digest = blake3::Hasher::new();
    {
        let mut w = arrow::ipc::writer::StreamWriter::try_new(HashWriter(&mut digest), &schema)
            .ctx("hashing rows")?;
        for b in &cast {
            w.write(b).ctx("hashing rows")?;
        }
        w.finish().ctx("hashing rows")?;
    }
    let mut prov = Provenance::new(STAGE).param("rows", digest.finalize().to_hex());
    for (k, v) in &made_from.params {
        prov = prov.param(k, v);
    }
    for input in &made_from.inputs {
        prov = prov.input(&lake.require(input, "it is an input of these rows")?);
    }
    prov.extra = made_from.about.clone();
    if let Some(m) = existing(lake, &a, &prov, force)? {
        return Ok(Committed {
            manifest: m,
            up_to_date: true,
        });
    }
    Ok(Committed {
        manifest: lake.write_artifact(&a, &cast, prov)?,
        up_to_date: false,
    })
}

/// Feeds bytes to a hash.
struct HashWriter<'a>(&'a mut blake3::Hasher);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `batch` with the columns of `schema`, found by name and cast to its
/// types; a missing nullable column is null, a missing required one or a
/// column the schema lacks is an error naming it.
fn to_schema(
    batch: &RecordBatch,
    schema: &arrow::datatypes::SchemaRef,
) -> std::result::Result<RecordBatch, String> {
    let given = batch.schema();
    if let Some(extra) = given
        .fields()
        .iter()
        .find(|f| schema.field_with_name(f.name()).is_err())
    {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        return Err(format!(
            "no column {:?} in this table (its columns: {})",
            extra.name(),
            names.join(", ")
        ));
    }
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        let col = match batch.column_by_name(f.name()) {
            Some(c) => arrow::compute::cast(c, f.data_type())
                .map_err(|e| format!("column {:?}: expected {} ({e})", f.name(), f.data_type()))?,
            None if f.is_nullable() => arrow::array::new_null_array(f.data_type(), batch.num_rows()),
            None => return Err(format!("column {:?} ({}) is required", f.name(), f.data_type())),
        };
        if !f.is_nullable() && col.null_count() > 0 {
            return Err(format!("column {:?} may not hold nulls", f.name()));
        }
        cols.push(col);
    }
    RecordBatch::try_new(schema.clone(), cols).map_err(|e| e.to_string())
}

/// Whether the lake holds `model`'s weights (analyze then reads its
/// classifier rows from them).
pub fn holds_weights(lake: &Lake, model: &str) -> bool {
    ModelRef::resolve_one(lake, model).is_ok_and(|m| m.in_lake && m.weights_input().is_ok())
}

/// The `classifiers/model=ID` artifact.
fn classifier_artifact(model: &str) -> Result<Artifact> {
    Ok(Artifact::new("classifiers", &[("model", model)])?)
}

/// Commit a model's output-layer rows W [v, d] (row c = class c), row-major,
/// for NC3 of a model whose weights the lake does not hold. Refused for a
/// model whose weights are in the lake: analyze reads its rows from them.
pub fn commit_classifier(
    lake: &Lake,
    model: &str,
    rows: &[f32],
    v: usize,
    d: usize,
    force: bool,
) -> Result<Committed> {
    if v == 0 || d == 0 || rows.len() != v * d {
        return Err(Error::invalid(format!(
            "weight: expected [num_classes, dim] with both positive, got {} values for [{v}, {d}]",
            rows.len()
        )));
    }
    if v > u32::MAX as usize {
        return Err(Error::invalid(format!("weight: {v} rows; class ids are 32-bit")));
    }
    if let Some(i) = rows.iter().position(|x| !x.is_finite()) {
        return Err(Error::invalid(format!(
            "weight: row {} column {} is {} (expected finite values)",
            i / d,
            i % d,
            rows[i]
        )));
    }
    if holds_weights(lake, model) {
        return Err(Error::model(
            model,
            "its weights are in the lake, and analyze reads the classifier from them",
        ));
    }
    let a = classifier_artifact(model)?;
    let mut h = blake3::Hasher::new();
    h.update(&(d as u64).to_le_bytes());
    for x in rows {
        h.update(&x.to_le_bytes());
    }
    let prov = Provenance::new(STAGE)
        .param("weight", h.finalize().to_hex())
        .extra("classes", v as u64)
        .extra("d", d as u64);
    if let Some(m) = existing(lake, &a, &prov, force)? {
        return Ok(Committed {
            manifest: m,
            up_to_date: true,
        });
    }
    let list = ListArray::try_new(
        Arc::new(Field::new("item", DataType::Float32, true)),
        OffsetBuffer::<i32>::from_lengths(std::iter::repeat_n(d, v)),
        Arc::new(Float32Array::from(rows.to_vec())),
        None,
    )
    .ctx("building classifier rows")?;
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(0..v as u32)),
        Arc::new(list),
    ];
    let batch = RecordBatch::try_new(file_schema("classifiers")?, cols).ctx("building classifiers")?;
    Ok(Committed {
        manifest: lake.write_artifact(&a, &[batch], prov)?,
        up_to_date: false,
    })
}

/// The manifest of the classifier rows written by [`commit_classifier`]
/// for `model`, if any (checked against its data object).
pub fn classifier_manifest(lake: &Lake, model: &str) -> Result<Option<Manifest>> {
    let a = classifier_artifact(model)?;
    if lake.manifest(&a)?.is_none() {
        return Ok(None);
    }
    Ok(Some(lake.require(
        &a,
        "write it with linguistic_collapse.write_classifier",
    )?))
}

/// The classifier rows written by [`commit_classifier`]: W row-major in
/// f64, and its shape [v, d].
pub fn read_classifier(lake: &Lake, model: &str) -> Result<(Vec<f64>, usize, usize)> {
    let a = classifier_artifact(model)?;
    let bad = |problem: String| Error::artifact(a.to_string(), problem);
    let (mut flat, mut v, mut d) = (Vec::new(), 0usize, None::<usize>);
    for b in lake.read_artifact(&a)? {
        let ids = b.column(0).as_primitive::<UInt32Type>();
        let lists = b.column(1).as_list::<i32>();
        for i in 0..b.num_rows() {
            if ids.value(i) as usize != v {
                return Err(bad(format!(
                    "row {v} holds class {}; expected classes 0, 1, ... in order",
                    ids.value(i)
                )));
            }
            let row = lists.value(i);
            let row = row.as_primitive::<Float32Type>();
            if *d.get_or_insert(row.len()) != row.len() || row.null_count() > 0 {
                return Err(bad(format!(
                    "class {v}: expected {} values, got {}",
                    d.unwrap_or(0),
                    row.len()
                )));
            }
            flat.extend(row.values().iter().map(|&x| f64::from(x)));
            v += 1;
        }
    }
    match d {
        Some(d) if v > 0 => Ok((flat, v, d)),
        _ => Err(bad("no rows".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_of(rows: &[(u32, [f64; 2])]) -> ClassStats {
        let mut s = ClassStats::new(2);
        for (c, x) in rows {
            s.merge_one(*c, 1, x, 0.0);
        }
        s
    }

    #[test]
    fn the_same_content_is_up_to_date_and_other_content_needs_force() {
        let lake = Lake::open("memory://").unwrap();
        let target = StatsTarget {
            model: "ext",
            dataset: None,
            split: "train",
            layer: 3,
        };
        let a = stats_of(&[(0, [1.0, 2.0]), (5, [3.0, 4.0])]);
        let first = commit_class_stats_from(&lake, &target, &a, false).unwrap();
        assert!(!first.up_to_date);
        assert_eq!(first.manifest.rows, 2);
        let again = commit_class_stats_from(&lake, &target, &a, false).unwrap();
        assert!(again.up_to_date);
        assert_eq!(again.manifest.content_hash, first.manifest.content_hash);
        let b = stats_of(&[(0, [1.0, 2.5])]);
        let refused = commit_class_stats_from(&lake, &target, &b, false).unwrap_err();
        assert!(refused.to_string().contains("force=True"), "{refused}");
        let replaced = commit_class_stats_from(&lake, &target, &b, true).unwrap();
        assert_eq!(replaced.manifest.rows, 1);
        let a = Artifact::new(
            "class_stats",
            &[("model", "ext"), ("split", "train"), ("layer", "3")],
        )
        .unwrap();
        let back = crate::stats::from_batches(&lake.read_artifact(&a).unwrap()).unwrap();
        assert_eq!(back.mean_of(0), &[1.0, 2.5]);
    }

    #[test]
    fn rows_are_cast_to_the_table_and_bad_columns_named() {
        use arrow::array::{Int64Array, StringArray};
        let lake = Lake::open("memory://").unwrap();
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            Field::new("class_id", DataType::Int64, false),
            Field::new("samples", DataType::Int64, false),
            Field::new("agree", DataType::Int64, false),
            Field::new("linear_correct", DataType::Int64, false),
            Field::new("ncc_correct", DataType::Int64, false),
            Field::new("analysed", DataType::Boolean, false),
        ]));
        let ints = |v: &[i64]| Arc::new(Int64Array::from(v.to_vec())) as ArrayRef;
        let batch = RecordBatch::try_new(
            schema,
            vec![
                ints(&[3, 7]),
                ints(&[10, 4]),
                ints(&[9, 1]),
                ints(&[8, 2]),
                ints(&[9, 3]),
                Arc::new(arrow::array::BooleanArray::from(vec![true, false])),
            ],
        )
        .unwrap();
        let parts = [("model", "ext"), ("split", "validation"), ("layer", "2")];
        let first = commit_rows(
            &lake,
            "decisions",
            &parts,
            std::slice::from_ref(&batch),
            &MadeFrom::default(),
            false,
        )
        .unwrap();
        assert!(!first.up_to_date && first.manifest.rows == 2);
        assert!(
            commit_rows(&lake, "decisions", &parts, &[batch], &MadeFrom::default(), false)
                .unwrap()
                .up_to_date
        );
        let back = lake
            .read_artifact(&Artifact::new("decisions", &parts).unwrap())
            .unwrap();
        assert_eq!(back[0].column(0).as_primitive::<UInt32Type>().values(), &[3, 7]);

        let odd = RecordBatch::try_from_iter(vec![
            ("class_id", ints(&[1])),
            ("colour", Arc::new(StringArray::from(vec!["red"])) as ArrayRef),
        ])
        .unwrap();
        let e = commit_rows(&lake, "decisions", &parts, &[odd], &MadeFrom::default(), true).unwrap_err();
        assert!(e.to_string().contains("no column \"colour\""), "{e}");
        let short = RecordBatch::try_from_iter(vec![("class_id", ints(&[1]))]).unwrap();
        let e = commit_rows(&lake, "decisions", &parts, &[short], &MadeFrom::default(), true).unwrap_err();
        assert!(
            e.to_string().contains("column \"samples\" (UInt64) is required"),
            "{e}"
        );
    }

    #[test]
    fn classifier_rows_round_trip_and_bad_shapes_are_named() {
        let lake = Lake::open("memory://").unwrap();
        let rows: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        commit_classifier(&lake, "ext", &rows, 4, 3, false).unwrap();
        assert!(classifier_manifest(&lake, "ext").unwrap().is_some());
        let (flat, v, d) = read_classifier(&lake, "ext").unwrap();
        assert_eq!((v, d), (4, 3));
        assert_eq!(flat, rows.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
        assert!(classifier_manifest(&lake, "other").unwrap().is_none());
        let e = commit_classifier(&lake, "ext", &rows, 5, 3, false).unwrap_err();
        assert!(e.to_string().contains("[5, 3]"), "{e}");
        let mut nan = rows.clone();
        nan[7] = f32::NAN;
        let e = commit_classifier(&lake, "ext", &nan, 4, 3, true).unwrap_err();
        assert!(e.to_string().contains("row 2 column 1"), "{e}");
    }
}
