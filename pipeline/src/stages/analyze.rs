//! `analyze`: every neural-collapse metric of one model and layer, from its
//! class statistics, per class and per class pair (in streaming tiles).
//!
//! Reads: `class_stats/model=ID/split=S/layer=L`; the model's classifier rows
//! W (NC3: from its weights when reachable, else from `classifiers/model=ID`
//! when written from Python); `decisions/model=ID/split=
//! validation/layer=L` (NC4, when present); the dataset tokenizer (token text).
//! Writes: `pair_tiles` (per tile and metric: n, mean, M2, min, max,
//! excluded), `class_metrics` (per class), and with `dump_pairs=topk:K` the
//! K most extreme pairs per metric in `pair_extremes`.
//!
//! Definitions (DESIGN.md): V' = classes with min_per_class <= N_c (<=
//! max_per_class when given); mu_bar = unweighted mean of mu_c over V'; m_c =
//! mu_c - mu_bar; u_c = m_c/||m_c||. Pairs are c < c' in V'. CDNV =
//! (s2_c + s2_c') / (2 ||mu_c - mu_c'||^(2+k)); interference <u_c, u_c'>; log
//! kernel log(1/||u_c - u_c'||); Riesz ||u_c - u_c'||^-s; gram <m_c, m_c'>
//! (for the simplex-ETF error in SQL). Model-level aggregates are SQL views
//! over these tables (sql/model_metrics.sql).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::AsArray;
use arrow::array::{ArrayRef, BooleanArray, Float64Array, StringArray, UInt32Array, UInt64Array};
use arrow::datatypes::{UInt32Type, UInt64Type};
use arrow::record_batch::RecordBatch;
use lc_lake::artifact::{Artifact, Provenance, file_schema};
use lc_metrics::ClassStats;
use lc_metrics::per_class;
use lc_metrics::selection::{Prepared, prepare};
use lc_metrics::tiles::{self, Classes, METRICS, Options, PairReport};

use crate::checkpoint::ModelRef;
use crate::error::{Context, Error, Result};
use crate::params::{LayerSpec, ParamSpec, Params, param, required};
use crate::stages::{Ctx, Stage};

pub struct Analyze;

const PARAMS: &[ParamSpec] = &[
    required(
        "model",
        "model id whose class_stats to analyse (NAME[@K] or a directory[@K])",
    ),
    param("split", "train", "split of the class statistics"),
    param("layer", "last", "hidden-state index (last = ln_f output)"),
    param(
        "layers",
        "",
        "several layers in one run: all (every collected layer) or a comma-separated list; overrides layer",
    ),
    param(
        "min_per_class",
        "1",
        "V': classes with at least this many samples",
    ),
    param(
        "max_per_class",
        "0",
        "V': classes with at most this many samples (0 = no limit)",
    ),
    param(
        "cdnv_k",
        "2",
        "CDNV exponent k in ||mu_c - mu_c'||^(2+k) (0 = Galanti's CDNV)",
    ),
    param("tile", "512", "tile edge in classes"),
    param("kernels", "log", "log, or log,riesz to add the Riesz kernel"),
    param("riesz_s", "1", "Riesz exponent s in ||u_c - u_c'||^-s"),
    param(
        "precision",
        "f64",
        "f64 | f32 (the Gram products; aggregates stay f64)",
    ),
    param(
        "dump_pairs",
        "",
        "topk:K writes the K most extreme pairs per metric",
    ),
    param(
        "decisions_split",
        "validation",
        "split of the NC4 decisions to join",
    ),
    param("force", "false", "recompute even when up to date"),
];

/// Rows per decoded `class_stats` batch. A row group is about 8 MB, some
/// 1,000 rows of 1,024 dimensions; decoding it whole grows an 8 MB values
/// buffer by doubling, in fresh pages each time. An eighth of that fits the
/// allocator's reused pages (full scale: reading 0.84-1.05 s -> 0.62-0.86 s).
const STATS_BATCH_ROWS: usize = 128;

fn parse_topk(s: &str) -> Result<usize> {
    if s.is_empty() {
        return Ok(0);
    }
    s.strip_prefix("topk:")
        .and_then(|k| k.parse().ok())
        .ok_or_else(|| Error::invalid(format!("dump_pairs '{s}' is not topk:K")))
}

/// Which layers one run analyses.
enum LayerChoice {
    /// `layer=` (when `layers=` is empty).
    One(LayerSpec),
    /// `layers=all`: every layer with class statistics.
    All,
    /// `layers=` as a list of indices.
    List(Vec<u64>),
}

/// analyze's parameters, checked before any work. The `kernels`,
/// `riesz_s`, `precision` and `dump_pairs` texts are kept as given, as the
/// provenance records them.
struct AnalyzeArgs<'a> {
    model: &'a str,
    split: &'a str,
    layers: LayerChoice,
    min_per_class: u64,
    max_per_class: u64,
    options: Options,
    decisions_split: &'a str,
    kernels: &'a str,
    riesz_s: &'a str,
    precision: &'a str,
    dump_pairs: &'a str,
    force: bool,
}

impl<'a> AnalyzeArgs<'a> {
    fn parse(p: &'a Params) -> Result<Self> {
        let layers = match p.opt("layers") {
            None => LayerChoice::One(p.layer("layer")?),
            Some("all") => LayerChoice::All,
            Some(list) => LayerChoice::List(
                list.split(',')
                    .map(|l| {
                        let l = l.trim();
                        l.parse::<u64>()
                            .map_err(|_| p.invalid("layers", format!("'{l}' is not a layer index")))
                    })
                    .collect::<Result<_>>()?,
            ),
        };
        let options = Options {
            edge: p.usize_in("tile", 1, 1 << 16)?,
            cdnv_k: p.f64("cdnv_k")?,
            riesz_s: match p.choice("kernels", &["log", "log,riesz"])? {
                "log,riesz" => Some(p.f64("riesz_s")?),
                _ => None,
            },
            f32_gemm: p.choice("precision", &["f64", "f32"])? == "f32",
            top_k: parse_topk(p.str("dump_pairs")).map_err(|e| p.invalid("dump_pairs", e.to_string()))?,
        };
        Ok(AnalyzeArgs {
            model: p.nonempty("model")?,
            split: p.nonempty("split")?,
            layers,
            min_per_class: p.u64("min_per_class")?,
            max_per_class: p.u64("max_per_class")?,
            options,
            decisions_split: p.nonempty("decisions_split")?,
            kernels: p.str("kernels"),
            riesz_s: p.str("riesz_s"),
            precision: p.str("precision"),
            dump_pairs: p.str("dump_pairs"),
            force: p.bool("force")?,
        })
    }
}

impl Stage for Analyze {
    fn name(&self) -> &'static str {
        "analyze"
    }
    fn about(&self) -> &'static str {
        "NC1-NC4 per class and per class pair from class_stats, in streaming tiles (rayon)"
    }
    fn reads(&self) -> &'static str {
        "class_stats, weights (NC3), decisions (NC4), tokenizer"
    }
    fn writes(&self) -> &'static str {
        "pair_tiles, class_metrics, pair_extremes"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn check(&self, p: &Params) -> Result<()> {
        AnalyzeArgs::parse(p).map(drop)
    }

    fn run(&self, ctx: &Ctx, p: &Params) -> Result<String> {
        let args = AnalyzeArgs::parse(p)?;
        let spec = args.model;
        let model_ref = ModelRef::resolve_one(&ctx.lake, spec).ok();
        let id = model_ref
            .as_ref()
            .map(|m| m.id.clone())
            .unwrap_or_else(|| spec.to_string());
        let split = args.split;
        let layers: Vec<String> = match &args.layers {
            LayerChoice::One(layer) => vec![single_layer(p, *layer, spec, model_ref.as_ref())?],
            LayerChoice::All => {
                let mut ls: Vec<String> = ctx
                    .lake
                    .manifests("class_stats", &format!("model={id}/split={split}"))?
                    .iter()
                    .filter_map(|m| m.partition.get("layer").cloned())
                    .collect();
                ls.sort_by_key(|l| l.parse::<u64>().unwrap_or(u64::MAX));
                if ls.is_empty() {
                    return Err(p.invalid(
                        "layers",
                        format!("no class_stats for {id} on {split}: run collect (layers=all) first"),
                    ));
                }
                ls
            }
            LayerChoice::List(list) => list.iter().map(u64::to_string).collect(),
        };
        let mut lines = Vec::new();
        for layer in &layers {
            ctx.cancel.check()?;
            lines.push(analyze_layer(ctx, &args, model_ref.as_ref(), &id, layer)?);
        }
        Ok(lines.join("\n"))
    }
}

/// The `layer=` parameter as an index ("last" needs the model's config).
fn single_layer(p: &Params, layer: LayerSpec, spec: &str, model_ref: Option<&ModelRef>) -> Result<String> {
    Ok(match layer {
        LayerSpec::Last => model_ref
            .as_ref()
            // Not a parameter error: the model may simply not be trained yet,
            // which planning reports as work to do.
            .ok_or_else(|| {
                Error::invalid(format!(
                    "model {spec} is not reachable to tell its last layer (not trained yet?); give layer=N"
                ))
            })?
            .config()?
            .shape()
            .num_layers
            .to_string(),
        // Checked against the depth where the model is known; a model known
        // only by its statistics has the layers it has.
        LayerSpec::Index(l) => match model_ref {
            Some(m) => LayerSpec::Index(l)
                .index(p, "layer", m.config()?.shape().num_layers)?
                .to_string(),
            None => l.to_string(),
        },
    })
}

/// Every metric of one layer (see the module documentation).
fn analyze_layer(
    ctx: &Ctx,
    args: &AnalyzeArgs,
    model_ref: Option<&ModelRef>,
    id: &str,
    layer: &str,
) -> Result<String> {
    let id = id.to_string();
    let layer = layer.to_string();
    let split = args.split;
    let (min, max, opt) = (args.min_per_class, args.max_per_class, args.options);
    let stats_a = Artifact::new(
        "class_stats",
        &[("model", &id), ("split", split), ("layer", &layer)],
    )?;
    let stats_m = ctx
        .lake
        .require(&stats_a, "run stage=collect for this model first")?;
    let dec_a = Artifact::new(
        "decisions",
        &[("model", &id), ("split", args.decisions_split), ("layer", &layer)],
    )?;
    let dec_m = ctx.lake.manifest(&dec_a)?;
    if let Some(d) = &dec_m {
        check_same_analysed_classes(d, &stats_m, min, max)?;
    }
    let weights = match model_ref {
        Some(m) => Some((m, m.weights_input()?)),
        None => None,
    };
    // A model known only by its statistics may have had its classifier
    // rows written from Python (external::commit_classifier).
    let written_rows = match weights {
        None => crate::external::classifier_manifest(&ctx.lake, &id)?,
        Some(_) => None,
    };
    let mut prov = Provenance::new("analyze")
        .param("min_per_class", min)
        .param("max_per_class", max)
        .param("cdnv_k", opt.cdnv_k)
        .param("tile", opt.edge)
        .param("kernels", args.kernels)
        .param("riesz_s", args.riesz_s)
        .param("precision", args.precision)
        .param("dump_pairs", args.dump_pairs)
        .input(&stats_m);
    if let Some(d) = &dec_m {
        prov = prov.input(d);
    }
    if let Some((_, w)) = &weights {
        prov.inputs.push(w.clone());
    }
    if let Some(m) = &written_rows {
        prov = prov.input(m);
    }
    let parts = [
        ("model", id.as_str()),
        ("split", split),
        ("layer", layer.as_str()),
    ];
    let tiles_a = Artifact::new("pair_tiles", &parts)?;
    let class_a = Artifact::new("class_metrics", &parts)?;
    if !args.force {
        let done = [&tiles_a, &class_a]
            .iter()
            .map(|a| ctx.lake.manifest(a))
            .collect::<lc_lake::Result<Vec<_>>>()?
            .iter()
            .all(|m| m.as_ref().is_some_and(|m| prov.matches(m)));
        if done {
            return Ok(format!(
                "pair_tiles, class_metrics for {id}/{split}/{layer}: up to date"
            ));
        }
    }
    ctx.would_run(format!("analyze {id}/{split}/{layer}"))?;

    let started = std::time::Instant::now();
    // Streamed in small batches, one part of the row groups per thread: the
    // reader's buffers are reused and the means land in their final place once.
    let stats_parts = ctx
        .lake
        .stream_artifact_parts(&stats_a, STATS_BATCH_ROWS, rayon::current_num_threads())?
        .into_iter()
        .map(|s| {
            let rows = usize::try_from(s.rows).map_err(|_| {
                Error::artifact(
                    stats_a.to_string(),
                    format!("{} rows do not fit in memory", s.rows),
                )
            })?;
            Ok((s, rows))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut stats = crate::stats::from_parts(stats_parts).map_err(|e| match e {
        // The decoder's own complaints do not know the file.
        Error::Invalid(problem) => Error::artifact(stats_a.to_string(), problem),
        e => e,
    })?;
    let read_secs = started.elapsed().as_secs_f64();
    let prep = prepare(&mut stats, min, max);
    let pairs_started = std::time::Instant::now();
    let c = prep.rows.len();
    if c < 2 {
        return Err(Error::invalid(format!(
            "{stats_a}: {c} class(es) in V' (min_per_class={min}, max_per_class={max}); the pairwise metrics need at least 2"
        )));
    }
    let report = tiles::pairs(
        &Classes {
            centred: &prep.centred,
            d: stats.d,
            var: &prep.var,
            mean_bar: &prep.mean_bar,
        },
        &opt,
    );
    let pair_secs = pairs_started.elapsed().as_secs_f64();

    // NC3 needs the classifier rows.
    let w: Option<(Vec<f64>, usize)> = match (&weights, written_rows) {
        (None, Some(m)) => {
            let (flat, v, d) = crate::external::read_classifier(&ctx.lake, &id)?;
            if d != stats.d {
                return Err(Error::artifact(
                    m.artifact,
                    format!("classifier width {d} differs from the statistics' {}", stats.d),
                ));
            }
            Some((flat, v))
        }
        (Some((m, _)), _) => {
            let (flat, v, d) = m.classifier_rows()?;
            if d != stats.d {
                return Err(Error::model(
                    &m.id,
                    format!("classifier width {d} differs from the statistics' {}", stats.d),
                ));
            }
            Some((flat.into_iter().map(f64::from).collect(), v))
        }
        (None, None) => {
            tracing::warn!(model = %id, "weights not reachable and no classifier rows written: NC3 columns will be null");
            None
        }
    };
    let decisions: HashMap<u32, (u64, u64)> = match &dec_m {
        Some(_) => {
            let mut out = HashMap::new();
            for b in ctx.lake.read_artifact(&dec_a)? {
                let ids = b.column(0).as_primitive::<UInt32Type>();
                let samples = b.column(1).as_primitive::<UInt64Type>();
                let agree = b.column(2).as_primitive::<UInt64Type>();
                for i in 0..b.num_rows() {
                    out.insert(ids.value(i), (agree.value(i), samples.value(i)));
                }
            }
            out
        }
        None => HashMap::new(),
    };
    let tokenizer = stats_m
        .extra_str("dataset")
        .and_then(|ds| crate::tokenizer::for_dataset(&ctx.lake, ds).ok())
        .map(|(t, _)| t);

    let class_batch = class_metrics_batch(
        &stats,
        &prep,
        &report,
        w.as_ref(),
        dec_m.as_ref().map(|_| &decisions),
        tokenizer.as_ref(),
    )?;
    let tiles_batch = pair_tiles_batch(&report, opt.riesz_s.is_some())?;
    ctx.lake
        .write_artifact(&tiles_a, &[tiles_batch], prov.clone().extra("classes", c as u64))?;
    ctx.lake
        .write_artifact(&class_a, &[class_batch], prov.clone().extra("classes", c as u64))?;
    if opt.top_k > 0 {
        let ext = Artifact::new("pair_extremes", &parts)?;
        ctx.lake.write_artifact(
            &ext,
            &[extremes_batch(&report, &prep, &stats, opt.riesz_s.is_some())?],
            prov.clone(),
        )?;
    }
    let cdnv = tiles::combine(&report.tiles, tiles::METRIC_CDNV);
    let intf = tiles::combine(&report.tiles, tiles::METRIC_INTERFERENCE);
    let rss = lc_lake::host::peak_rss_mib()
        .map(|m| format!(", process peak RSS {m:.0} MiB"))
        .unwrap_or_default();
    Ok(format!(
        "{id}/{split}/layer={layer}: |V'| = {c}, {} pairs in {} tiles ({pair_secs:.2} s, statistics read in {read_secs:.2} s, {} recomputed exactly{rss}); CDNV mean {:.4e}, interference mean {:.4}",
        c * (c - 1) / 2,
        report.tiles.len(),
        report.recomputed,
        cdnv.mean,
        intf.mean
    ))
}

/// One V' must govern NC1-NC3 (here) and NC4 (decide) for a model: refuse
/// decisions made over other classes, or from other class statistics.
fn check_same_analysed_classes(
    dec: &lc_lake::manifest::Manifest,
    stats: &lc_lake::manifest::Manifest,
    min: u64,
    max: u64,
) -> Result<()> {
    let theirs = |k: &str| dec.params.get(k).cloned().unwrap_or_default();
    if theirs("min_per_class") != min.to_string() || theirs("max_per_class") != max.to_string() {
        return Err(Error::Stale(format!(
            "{} chose V' with min_per_class={} max_per_class={}, but analyze was given min_per_class={min} max_per_class={max}: one V' must govern all metrics of a model; run decide (force=true) or analyze again with the same values",
            dec.artifact,
            theirs("min_per_class"),
            theirs("max_per_class")
        )));
    }
    if !dec.inputs.contains(&stats.input_ref()) {
        return Err(Error::Stale(format!(
            "{} was decided from other class statistics than {}; run decide again",
            dec.artifact, stats.artifact
        )));
    }
    Ok(())
}

fn opt_f64(v: impl IntoIterator<Item = Option<f64>>) -> ArrayRef {
    Arc::new(Float64Array::from_iter(v))
}

fn class_metrics_batch(
    stats: &ClassStats,
    prep: &Prepared,
    report: &PairReport,
    w: Option<&(Vec<f64>, usize)>,
    decisions: Option<&HashMap<u32, (u64, u64)>>,
    tok: Option<&crate::tokenizer::TextTokenizer>,
) -> Result<RecordBatch> {
    let d = stats.d;
    // Position in V' of each statistics row.
    let mut vpos: HashMap<usize, usize> = HashMap::new();
    for (i, &r) in prep.rows.iter().enumerate() {
        vpos.insert(r, i);
    }
    let mut order: Vec<usize> = (0..stats.len()).collect();
    order.sort_by_key(|&r| stats.classes[r]);
    let n = order.len();
    let mut norm = Vec::with_capacity(n);
    let mut log_norm = Vec::with_capacity(n);
    let (mut cos, mut dot, mut dist) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut row_means: [Vec<Option<f64>>; 4] = std::array::from_fn(|_| Vec::with_capacity(n));
    let mut row_excl = Vec::with_capacity(n);
    let mut top_id = Vec::with_capacity(n);
    let mut top_val = Vec::with_capacity(n);
    for &r in &order {
        let class = stats.classes[r];
        match vpos.get(&r) {
            None => {
                norm.push(None);
                log_norm.push(None);
                cos.push(None);
                dot.push(None);
                dist.push(None);
                for rm in row_means.iter_mut() {
                    rm.push(None);
                }
                row_excl.push(0u64);
                top_id.push(None);
                top_val.push(None);
            }
            Some(&i) => {
                let m = &prep.centred[i * d..(i + 1) * d];
                let nm = per_class::norm(m);
                norm.push(Some(nm));
                log_norm.push(per_class::log_norm(nm));
                let duality = match w {
                    Some((wv, v)) if (class as usize) < *v => Some(per_class::self_duality(
                        &wv[class as usize * d..(class as usize + 1) * d],
                        m,
                    )),
                    _ => None,
                };
                dot.push(duality.map(|x| x.dot));
                cos.push(duality.and_then(|x| x.cos));
                dist.push(duality.and_then(|x| x.dist));
                for (k, rm) in row_means.iter_mut().enumerate() {
                    rm.push(report.rows.mean(k, i));
                }
                row_excl.push(report.rows.excluded[i]);
                let (tv, tj) = report.rows.top(i);
                if tj == usize::MAX {
                    top_id.push(None);
                    top_val.push(None);
                } else {
                    top_id.push(Some(stats.classes[prep.rows[tj]]));
                    top_val.push(Some(tv));
                }
            }
        }
    }
    let [cdnv_rm, intf_rm, logk_rm, riesz_rm] = row_means;
    let token: Vec<Option<String>> = order
        .iter()
        .map(|&r| tok.map(|t| t.token_text(stats.classes[r])))
        .collect();
    let hits: Vec<Option<u64>> = order
        .iter()
        .map(|&r| decisions.map(|dm| dm.get(&stats.classes[r]).map(|x| x.0).unwrap_or(0)))
        .collect();
    let samples: Vec<Option<u64>> = order
        .iter()
        .map(|&r| decisions.map(|dm| dm.get(&stats.classes[r]).map(|x| x.1).unwrap_or(0)))
        .collect();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(
            order.iter().map(|&r| stats.classes[r]),
        )),
        Arc::new(StringArray::from(token)),
        Arc::new(UInt64Array::from_iter_values(
            order.iter().map(|&r| stats.count[r]),
        )),
        Arc::new(Float64Array::from_iter_values(
            order.iter().map(|&r| stats.m2[r] / stats.count[r] as f64),
        )),
        Arc::new(BooleanArray::from_iter(
            order.iter().map(|r| Some(vpos.contains_key(r))),
        )),
        opt_f64(norm),
        opt_f64(log_norm),
        opt_f64(cos),
        opt_f64(dot),
        opt_f64(dist),
        Arc::new(UInt64Array::from(hits)),
        Arc::new(UInt64Array::from(samples)),
        opt_f64(cdnv_rm),
        opt_f64(intf_rm),
        opt_f64(logk_rm),
        opt_f64(riesz_rm),
        Arc::new(UInt64Array::from(row_excl)),
        Arc::new(UInt32Array::from(top_id)),
        opt_f64(top_val),
    ];
    RecordBatch::try_new(file_schema("class_metrics")?, cols).ctx("building class_metrics")
}

fn pair_tiles_batch(report: &PairReport, riesz: bool) -> Result<RecordBatch> {
    let mut metric = Vec::new();
    let (mut ti, mut tj, mut n, mut mean, mut m2, mut min, mut max, mut excl) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for t in &report.tiles {
        for (k, name) in METRICS.iter().enumerate() {
            if !tiles::metric_active(k, riesz) {
                continue;
            }
            let mo = &t.metrics[k];
            metric.push(*name);
            ti.push(t.ti as u32);
            tj.push(t.tj as u32);
            n.push(mo.n);
            mean.push(mo.mean);
            m2.push(mo.m2);
            min.push((mo.n > 0).then_some(mo.min));
            max.push((mo.n > 0).then_some(mo.max));
            excl.push(mo.excluded);
        }
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(metric)),
        Arc::new(UInt32Array::from(ti)),
        Arc::new(UInt32Array::from(tj)),
        Arc::new(UInt64Array::from(n)),
        Arc::new(Float64Array::from(mean)),
        Arc::new(Float64Array::from(m2)),
        Arc::new(Float64Array::from(min)),
        Arc::new(Float64Array::from(max)),
        Arc::new(UInt64Array::from(excl)),
    ];
    RecordBatch::try_new(file_schema("pair_tiles")?, cols).ctx("building pair_tiles")
}

fn extremes_batch(
    report: &PairReport,
    prep: &Prepared,
    stats: &ClassStats,
    riesz: bool,
) -> Result<RecordBatch> {
    let (mut metric, mut kind, mut rank, mut a, mut b, mut value) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (k, (lo, hi)) in report.extremes.iter().enumerate() {
        if !tiles::metric_active(k, riesz) {
            continue;
        }
        for (label, list) in [("min", lo), ("max", hi)] {
            for (i, pv) in list.iter().enumerate() {
                metric.push(METRICS[k]);
                kind.push(label);
                rank.push(i as u32 + 1);
                a.push(stats.classes[prep.rows[pv.a]]);
                b.push(stats.classes[prep.rows[pv.b]]);
                value.push(pv.value);
            }
        }
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(metric)),
        Arc::new(StringArray::from(kind)),
        Arc::new(UInt32Array::from(rank)),
        Arc::new(UInt32Array::from(a)),
        Arc::new(UInt32Array::from(b)),
        Arc::new(Float64Array::from(value)),
    ];
    RecordBatch::try_new(file_schema("pair_extremes")?, cols).ctx("building pair_extremes")
}
