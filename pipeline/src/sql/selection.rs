//! Selections of models: an SQL predicate a user gives (`where=`) parsed as
//! one expression over a view's columns and applied as a DataFrame filter,
//! registered as a session view that named queries read. The predicate is
//! never pasted into SQL text, so `1=1) UNION ...` is refused as not a
//! predicate rather than run.

use datafusion::prelude::{col, lit};

use crate::error::{Context, Error, Result};
use crate::sql::Sql;

/// Register the rows of `view` with `column = value` for each of `equal`,
/// and for which `predicate` holds, as the session view `name`.
pub fn register(sql: &Sql, name: &str, view: &str, equal: &[(&str, &str)], predicate: &str) -> Result<()> {
    let df = sql
        .lake()
        .block_on(sql.ctx.table(view))
        .ctx(format!("reading {view}"))?;
    let expr = sql.ctx.parse_sql_expr(predicate, df.schema()).map_err(|e| {
        Error::invalid(format!(
            "where=`{predicate}` is not one SQL predicate over the columns of {view} ({})",
            e.strip_backtrace()
        ))
    })?;
    let mut df = df;
    for (c, v) in equal {
        df = df.filter(col(*c).eq(lit(*v))).ctx("selecting")?;
    }
    let df = df.filter(expr).map_err(|e| {
        Error::invalid(format!(
            "where=`{predicate}` cannot select rows of {view}: {}",
            e.strip_backtrace()
        ))
    })?;
    let _ = sql.ctx.deregister_table(name);
    sql.ctx
        .register_table(name, df.into_view())
        .ctx(format!("registering the selection {name}"))?;
    Ok(())
}

/// The partition id of the correlations of a selection: a hash of
/// everything that determines them.
pub fn correlations_id(source: &str, predicate: &str, n_perm: u64, n_boot: u64, seed: u64) -> String {
    blake3::hash(format!("{source}\n{predicate}\n{n_perm}\n{n_boot}\n{seed}").as_bytes()).to_hex()[..16]
        .to_string()
}

/// A fingerprint of every artifact a source's view reads: for
/// `model_metrics` the content hashes of pair_tiles, class_metrics,
/// decisions and models; for `imported:NAME` those of that import. Analyses
/// of a selection are up to date while it is unchanged.
pub fn inputs_fingerprint(lake: &lc_lake::lake::Lake, source: &str) -> Result<String> {
    let tables: Vec<(&str, String)> = match source.strip_prefix("imported:") {
        Some(name) => vec![("imported_metrics", format!("source={name}"))],
        None => ["pair_tiles", "class_metrics", "decisions", "models"]
            .iter()
            .map(|t| (*t, String::new()))
            .collect(),
    };
    let mut parts = Vec::new();
    for (t, under) in &tables {
        for m in lake.manifests(t, under)? {
            parts.push(format!("{}={}", m.artifact, m.content_hash));
        }
    }
    parts.sort();
    Ok(blake3::hash(parts.join("\n").as_bytes()).to_hex()[..32].to_string())
}
