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
