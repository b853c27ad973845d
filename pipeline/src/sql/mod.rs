//! SQL over the lake with DataFusion.
//!
//! Every lake table is registered as a listing table over its hive-partitioned
//! directory (so new partitions are visible without re-registration), the
//! files under `sql/` marked `-- kind: view` become views named after the file,
//! and the few functions SQL lacks are registered (see [`udaf`]). Queries run
//! read-only unless the caller allows writes.
//!
//! The SQL text itself lives in `sql/*.sql` (compiled into the binary); this
//! module holds only registration glue and `{{name}}` template filling for the
//! `-- kind: query` files that stages run with parameters. Aggregates SQL
//! lacks (permutation tests, Spearman, bootstrap) are registered from
//! [`udaf`].
//!
//! Every session runs under a memory pool ([`Limits`]): operators that buffer
//! (sorts, joins, aggregations) account their memory there, spill to disk
//! where DataFusion can, and otherwise fail with an error that names the
//! limit. Results can be consumed as a stream ([`Sql::query_each`]), so a
//! large result never has to be held whole.

pub mod selection;
pub mod udaf;

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::context::{SQLOptions, SessionConfig, SessionContext};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use lc_lake::lake::Lake;
use lc_lake::schemas;

use crate::error::{Context, Error, Result};

/// The SQL files, by name. Views are registered under their name, in this
/// order (a view may use the ones before it); queries are run by stages
/// through [`render`].
pub const SQL_FILES: &[(&str, &str)] = &[
    ("tile_totals", include_str!("../../../sql/tile_totals.sql")),
    ("model_metrics", include_str!("../../../sql/model_metrics.sql")),
    (
        "model_metrics_long",
        include_str!("../../../sql/model_metrics_long.sql"),
    ),
    (
        "imported_metrics_long",
        include_str!("../../../sql/imported_metrics_long.sql"),
    ),
    (
        "correlate_observed",
        include_str!("../../../sql/correlate_observed.sql"),
    ),
    (
        "correlate_counts",
        include_str!("../../../sql/correlate_counts.sql"),
    ),
    ("report_points", include_str!("../../../sql/report_points.sql")),
    ("report_layers", include_str!("../../../sql/report_layers.sql")),
    (
        "report_training",
        include_str!("../../../sql/report_training.sql"),
    ),
    (
        "report_correlations",
        include_str!("../../../sql/report_correlations.sql"),
    ),
    ("report_tokens", include_str!("../../../sql/report_tokens.sql")),
    (
        "report_points_imported",
        include_str!("../../../sql/report_points_imported.sql"),
    ),
];

/// The text of a named SQL file.
pub fn named(name: &str) -> Result<&'static str> {
    SQL_FILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<&str> = SQL_FILES.iter().map(|(n, _)| *n).collect();
            Error::invalid(format!("no SQL file '{name}'; files: {}", names.join(", ")))
        })
}

fn kind_of(text: &str) -> &str {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("-- kind:"))
        .map(str::trim)
        .unwrap_or("query")
}

/// Fill the `{{name}}` placeholders of a named query. Every placeholder must be
/// given and every given value used, so a typo cannot silently change a query.
pub fn render(name: &str, vars: &[(&str, &str)]) -> Result<String> {
    let mut text = named(name)?.to_string();
    for (k, v) in vars {
        let pat = format!("{{{{{k}}}}}");
        if !text.contains(&pat) {
            return Err(Error::invalid(format!("sql/{name}.sql has no placeholder {pat}")));
        }
        text = text.replace(&pat, v);
    }
    if let Some(start) = text.find("{{") {
        let end = text[start..]
            .find("}}")
            .map(|e| start + e + 2)
            .unwrap_or(text.len());
        return Err(Error::invalid(format!(
            "sql/{name}.sql placeholder {} was not given",
            &text[start..end]
        )));
    }
    Ok(text)
}

/// Resource limits of a session.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes the session's operators may hold before spilling or failing.
    pub memory_bytes: usize,
    /// Wall-clock limit of one statement.
    pub timeout: Option<Duration>,
}

impl Default for Limits {
    /// Half of the machine's memory (a quarter if it cannot be read), no time
    /// limit.
    fn default() -> Self {
        Limits {
            memory_bytes: total_memory_bytes().map(|b| b / 2).unwrap_or(1 << 30),
            timeout: None,
        }
    }
}

/// Physical memory of this machine (Linux `/proc/meminfo`).
pub fn total_memory_bytes() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: usize = info
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// A memory size as people write it (`512M`, `2G`, `1.5GiB`, or a byte
/// count), as both front ends accept for a query's memory limit.
pub fn parse_size(text: &str) -> Result<usize> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        None => (t, 1f64),
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let m = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1f64,
                "K" => 1024f64,
                "M" => 1024f64 * 1024.0,
                "G" => 1024f64 * 1024.0 * 1024.0,
                "T" => 1024f64 * 1024.0 * 1024.0 * 1024.0,
                _ => {
                    return Err(Error::invalid(format!(
                        "unknown unit '{}' (use K, M, G or T)",
                        &t[i..]
                    )));
                }
            };
            (&t[..i], m)
        }
    };
    let x: f64 = num
        .trim()
        .parse()
        .map_err(|_| Error::invalid(format!("'{text}' is not a size")))?;
    if !(x > 0.0 && x.is_finite()) {
        return Err(Error::invalid(format!("'{text}' is not a positive size")));
    }
    Ok((x * mult) as usize)
}

/// A byte count for messages ("512.0 MiB").
pub fn human_bytes(b: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < units.len() {
        x /= 1024.0;
        u += 1;
    }
    format!("{x:.1} {}", units[u])
}

/// A DataFusion session over a lake.
pub struct Sql {
    pub ctx: SessionContext,
    lake: Lake,
    limits: Limits,
}

impl Sql {
    /// Register every lake table, the UDFs and the views, with default limits.
    pub fn open(lake: &Lake) -> Result<Self> {
        Self::open_with(lake, Limits::default())
    }

    /// As [`Sql::open`], under `limits`.
    pub fn open_with(lake: &Lake, limits: Limits) -> Result<Self> {
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_target_partitions(2);
        // No listing cache: stages add partitions while sessions are open, and
        // a query must see every committed file.
        let runtime = RuntimeEnvBuilder::new()
            .with_cache_manager(CacheManagerConfig::default().with_list_files_cache_limit(0))
            .with_memory_limit(limits.memory_bytes, 1.0)
            .build_arc()
            .ctx("building the SQL runtime")?;
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        ctx.register_object_store(lake.store_url(), lake.store());
        udaf::register(&ctx);
        let sql = Sql {
            ctx,
            lake: lake.clone(),
            limits,
        };
        for t in schemas::tables().iter().filter(|t| t.kind == "table") {
            sql.register_table(&t.table)?;
        }
        for (name, text) in SQL_FILES {
            if kind_of(text) == "view" {
                let df = lake
                    .block_on(sql.ctx.sql(text))
                    .ctx(format!("defining view {name} from sql/{name}.sql"))?;
                sql.ctx
                    .register_table(*name, df.into_view())
                    .ctx(format!("registering view {name}"))?;
            }
        }
        Ok(sql)
    }

    fn register_table(&self, table: &str) -> Result<()> {
        let schema = schemas::table(table)?;
        let url = ListingTableUrl::parse(self.lake.table_url(table)).ctx(format!("table {table}"))?;
        let parts: Vec<(String, DataType)> = schema
            .partitions
            .iter()
            .map(|p| (p.name.clone(), DataType::Utf8))
            .collect();
        let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
            .with_file_extension(".parquet")
            .with_table_partition_cols(parts);
        let has_fixed = schema
            .columns
            .iter()
            .any(|c| c.type_name.starts_with("fixed_size_list"));
        let mut config = ListingTableConfig::new(url).with_listing_options(options.clone());
        // Fixed-size lists (chunks) carry their length in the files: take the
        // schema from the data when there is any.
        let file_schema = if has_fixed {
            let state = self.ctx.state();
            match self
                .lake
                .block_on(options.infer_schema(&state, &config.table_paths[0]))
            {
                Ok(s) if !s.fields().is_empty() => s,
                _ => schema.file_schema(),
            }
        } else {
            schema.file_schema()
        };
        config = config.with_schema(file_schema);
        let table_provider = ListingTable::try_new(config).ctx(format!("table {table}"))?;
        self.ctx
            .register_table(table, Arc::new(table_provider))
            .ctx(format!("registering table {table}"))?;
        Ok(())
    }

    /// Run one statement and collect its result. Without `allow_write`, DDL,
    /// DML (INSERT, COPY) and session statements are refused before anything
    /// runs.
    pub fn query(&self, sql: &str, allow_write: bool) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        self.query_each(sql, allow_write, |b| {
            out.push(b);
            Ok(())
        })?;
        Ok(out)
    }

    /// Run one statement, handing each result batch to `f` as it arrives, under
    /// the session's memory and time limits. Returns the result's schema.
    pub fn query_each(
        &self,
        sql: &str,
        allow_write: bool,
        mut f: impl FnMut(RecordBatch) -> Result<()>,
    ) -> Result<arrow::datatypes::SchemaRef> {
        let work = async {
            let plan = self
                .ctx
                .state()
                .create_logical_plan(sql)
                .await
                .ctx("planning the query")?;
            if !allow_write {
                let ro = SQLOptions::new()
                    .with_allow_ddl(false)
                    .with_allow_dml(false)
                    .with_allow_statements(false);
                ro.verify_plan(&plan).map_err(|e| {
                    Error::Sql(format!(
                        "refused: SQL is read-only by default and this statement would write or change the session ({}); pass --allow-write to run it",
                        e.strip_backtrace()
                    ))
                })?;
            }
            let df = self
                .ctx
                .execute_logical_plan(plan)
                .await
                .map_err(|e| self.explain(e))?;
            let mut stream = df.execute_stream().await.map_err(|e| self.explain(e))?;
            let schema = stream.schema();
            use futures::StreamExt;
            while let Some(b) = stream.next().await {
                f(b.map_err(|e| self.explain(e))?)?;
            }
            Ok(schema)
        };
        match self.limits.timeout {
            None => self.lake.block_on(work),
            Some(t) => self
                .lake
                .block_on(async { tokio::time::timeout(t, work).await })
                .map_err(|_| {
                    Error::Timeout(format!(
                        "the query was stopped after its time limit of {} s (--timeout)",
                        t.as_secs_f64()
                    ))
                })?,
        }
    }

    /// A DataFusion error in words, naming the memory limit when it was hit.
    fn explain(&self, e: datafusion::error::DataFusionError) -> Error {
        let text = e.to_string();
        // DataFusion reports an exhausted pool as "Resources exhausted", and
        // at very small limits sometimes as a failed spill.
        if text.contains("Resources exhausted") || text.contains("to spill") {
            return Error::MemoryLimit(format!(
                "the query needs more memory than the SQL memory limit of {} (--memory-limit; spilling to disk did not suffice): {}",
                human_bytes(self.limits.memory_bytes),
                e.strip_backtrace()
            ));
        }
        Error::DataFusion {
            what: "running the query".into(),
            source: Box::new(e),
        }
    }

    /// The lake this session reads (its runtime drives async DataFusion calls).
    pub fn lake(&self) -> &Lake {
        &self.lake
    }

    /// Run a named query file with its placeholders filled (always read-only).
    pub fn run_named(&self, name: &str, vars: &[(&str, &str)]) -> Result<Vec<RecordBatch>> {
        let text = render(name, vars)?;
        self.query(&text, false)
            .map_err(|e| Error::Sql(format!("sql/{name}.sql: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_must_be_filled_exactly() {
        let err = render("correlate_observed", &[("nope", "1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no placeholder {{nope}}"), "{err}");
        let err = render("correlate_observed", &[]).unwrap_err().to_string();
        assert!(err.contains("was not given"), "{err}");
    }

    #[test]
    fn every_sql_file_declares_its_kind() {
        for (name, text) in SQL_FILES {
            assert!(
                text.lines().any(|l| l.trim().starts_with("-- kind:")),
                "sql/{name}.sql lacks a '-- kind:' line"
            );
        }
    }
}
