//! SQL over the lake with DataFusion.
//!
//! Every lake table is registered as a listing table over its hive-partitioned
//! directory (so new partitions are visible without re-registration), the
//! files under `sql/` marked `-- kind: view` become views named after the file,
//! and the few UDFs SQL lacks are registered (see [`udf`]). Queries run
//! read-only unless the caller allows writes.
//!
//! The SQL text itself lives in `sql/*.sql` (compiled into the binary); this
//! module holds only registration glue and `{{name}}` template filling for the
//! `-- kind: query` files that stages run with parameters.

pub mod udf;

use std::sync::Arc;

use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::context::{SQLOptions, SessionConfig, SessionContext};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;

use crate::error::{Context, Error, Result};
use crate::lake::Lake;
use crate::schemas;

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
        "correlate_permutations",
        include_str!("../../../sql/correlate_permutations.sql"),
    ),
    (
        "correlate_counts",
        include_str!("../../../sql/correlate_counts.sql"),
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

/// A DataFusion session over a lake.
pub struct Sql {
    pub ctx: SessionContext,
    lake: Lake,
}

impl Sql {
    /// Register every lake table, the UDFs and the views.
    pub fn open(lake: &Lake) -> Result<Self> {
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_target_partitions(2);
        // No listing cache: stages add partitions while sessions are open, and
        // a query must see every committed file.
        let runtime = RuntimeEnvBuilder::new()
            .with_cache_manager(CacheManagerConfig::default().with_list_files_cache_limit(0))
            .build_arc()
            .ctx("building the SQL runtime")?;
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        ctx.register_object_store(lake.store_url(), lake.store());
        udf::register(&ctx);
        let sql = Sql {
            ctx,
            lake: lake.clone(),
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

    /// Run one statement. Without `allow_write`, DDL, DML (INSERT, COPY) and
    /// session statements are refused before anything runs.
    pub fn query(&self, sql: &str, allow_write: bool) -> Result<Vec<RecordBatch>> {
        let plan = self
            .lake
            .block_on(self.ctx.state().create_logical_plan(sql))
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
        self.lake
            .block_on(async {
                let df = self.ctx.execute_logical_plan(plan).await?;
                df.collect().await
            })
            .ctx("running the query")
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
