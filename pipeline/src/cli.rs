//! The `pipeline` command line, shared by the binary (`src/main.rs`) and the
//! Python wheel's `pipeline` console script: [`main`] parses the arguments,
//! runs one command and returns the exit status.
//!
//! Also the resolution both front ends share: where the lake is
//! ([`lake_url`]), which configuration file applies ([`load_config`]) and
//! what the lake holds ([`artifacts`]).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use lc_lake::lake::Lake;

use crate::params::{Config, parse_pairs};
use crate::sql::Sql;
use crate::stages::{self, Ctx};

#[derive(Parser)]
#[command(
    name = "pipeline",
    version,
    about = "Measure neural collapse in causal language models"
)]
struct Cli {
    /// Results lake: a directory, file:///dir, s3://bucket/prefix or memory://
    #[arg(long, global = true, env = "PIPELINE_LAKE")]
    lake: Option<String>,
    /// Configuration file (default: ./pipeline.toml when it exists)
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Only warnings and errors on stderr
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a stage: pipeline run stage=NAME [key=value ...]
    Run {
        #[arg(required = true, value_name = "stage=NAME [key=value ...]")]
        pairs: Vec<String>,
    },
    /// List the stages with what they read, write and accept
    Stages,
    /// Query the lake with SQL (read-only unless --allow-write)
    Sql(SqlArgs),
    /// What exists in the lake, per table and partition, with row counts;
    /// with experiment=FILE the grid as a table, model x stage
    Status {
        #[arg(value_name = "experiment=FILE [device=cpu]")]
        options: Vec<String>,
    },
    /// Copy the whole lake to another location (a directory or s3:// URL);
    /// results stay up to date there, since identities are content hashes
    Copy {
        /// Where to: a directory, file:// or s3://bucket/prefix
        dest: String,
        /// Copy into a destination that already holds objects
        #[arg(long)]
        force: bool,
    },
    /// Check every artifact of the lake (or one table) against its recorded
    /// hashes; list what is damaged or orphaned (exit status 1 if damaged)
    Verify {
        /// Only this table (or weights, partials, tokenizers)
        table: Option<String>,
        /// Abort multipart uploads that killed processes left on the server
        #[arg(long)]
        repair: bool,
    },
    /// Benchmark a stage: data | model | collect | eval | decide | analyze | correlate | attention | epilogues [key=value ...]
    Bench {
        what: String,
        #[arg(value_name = "key=value")]
        options: Vec<String>,
    },
    /// Write a GPT-Neo model with freshly initialised (random) weights, in
    /// Hugging Face format: for benchmarks and GPU checks
    MakeModel(MakeModelArgs),
    /// Build a GPT-2 style tokenizer.json from encoder.json + vocab.bpe
    MakeTokenizer(MakeTokenizerArgs),
}

// The options of `pipeline sql` (its help is the variant's doc comment).
#[derive(clap::Args)]
struct SqlArgs {
    /// The query (or use -f)
    query: Option<String>,
    /// Read the query from a file
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Also write the result to a Parquet file (local path or s3:// URL;
    /// inside the lake only with --allow-write)
    #[arg(long)]
    out: Option<String>,
    /// Replace the --out file if it exists
    #[arg(long)]
    force: bool,
    /// Allow DDL/DML statements (CREATE, INSERT, COPY, SET) and --out
    /// targets inside the lake
    #[arg(long)]
    allow_write: bool,
    /// Memory the query may hold before spilling or failing: bytes, or
    /// with K, M, G (default: half of this machine's memory)
    #[arg(long, value_name = "SIZE")]
    memory_limit: Option<String>,
    /// Stop the query after this many seconds
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
}

// The options of `pipeline make-model`.
#[derive(clap::Args)]
struct MakeModelArgs {
    #[arg(long)]
    depth: usize,
    #[arg(long)]
    width: usize,
    #[arg(long, default_value_t = 16)]
    heads: usize,
    #[arg(long, default_value_t = 2048)]
    context: usize,
    #[arg(long, default_value_t = 50257)]
    vocab: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Standard deviation of random biases (default 0: zero biases, as
    /// Hugging Face initialises them); nonzero values exercise the bias
    /// code, e.g. in GPU checks
    #[arg(long, default_value_t = 0.0)]
    bias_std: f64,
    /// Output directory
    #[arg(long)]
    out: PathBuf,
}

// The options of `pipeline make-tokenizer`.
#[derive(clap::Args)]
struct MakeTokenizerArgs {
    /// encoder.json (the vocabulary)
    #[arg(long)]
    vocab: PathBuf,
    /// vocab.bpe (the merges)
    #[arg(long)]
    merges: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

/// Index of `mi_option_purge_delay` in mimalloc.h (v2 and v3).
const MI_OPTION_PURGE_DELAY: i32 = 15;

/// Where mimalloc is the global allocator (the binary, the Python module):
/// keep freed memory for the next step instead of returning it to the
/// kernel, which would zero-fill it again (a third of a training step under
/// perf). Call it before other threads start.
pub fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option; no allocation is in flight.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// candle's CPU worker pool spins 25,000 rounds after each elementwise op
/// before parking; with rayon's threads busy in our kernels on the same
/// cores, the spinning takes their time (12-16 % of a small model's training
/// step on two cores, `pipeline bench model width=32 T=128 batch=4`). Its
/// workers park at once unless the user set `CANDLE_BARRIER_POOL_SPIN_LIMIT`.
/// candle reads only the environment, so this sets it: call it first thing
/// in `main`, before any other thread exists.
pub fn park_idle_candle_workers() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: called before any other thread starts (see above), so no
        // concurrent reader of the environment exists.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0") };
    }
}

/// On SIGINT or SIGTERM (Ctrl-C, `scancel`, a scheduler's preemption),
/// abort the multipart uploads in progress so no parts stay on the server,
/// then exit as the signal asks. Resumable stages continue from their last
/// checkpoint when run again.
fn handle_signals() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) =
                (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
            else {
                return;
            };
            let code = tokio::select! {
                _ = int.recv() => 130,
                _ = term.recv() => 143,
            };
            let aborted = lc_lake::lake::abort_uploads_in_flight().await;
            if aborted > 0 {
                eprintln!("interrupted: aborted {aborted} upload(s) in progress");
            } else {
                eprintln!("interrupted");
            }
            std::process::exit(code);
        });
    });
}

/// Run the command line `args` (the program name first) and return its exit
/// status: 0 on success, 1 on an error (printed on stderr) or damage found by
/// `verify`, 2 on a usage error. Installs the SIGINT/SIGTERM handler and the
/// log subscriber unless the process already has one.
pub fn main<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print and succeed; usage errors fail.
            let _ = e.print();
            return e.exit_code();
        }
    };
    handle_signals();
    let filter = if cli.quiet { "warn" } else { "info" };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", crate::error::describe(e.as_ref()));
            1
        }
    }
}

/// The configuration: `path` when given, else `./pipeline.toml` when it
/// exists, else none.
pub fn load_config(path: Option<&Path>) -> crate::Result<Config> {
    match path {
        Some(p) => Config::load(p),
        None => {
            let default = PathBuf::from("pipeline.toml");
            if default.is_file() {
                Config::load(&default)
            } else {
                Ok(Config::default())
            }
        }
    }
}

/// The lake's URL: the one given (`--lake`, or `PIPELINE_LAKE` read by the
/// caller), else `lake =` in the configuration, else `./lake`.
pub fn lake_url(given: Option<&str>, config: &Config) -> String {
    given
        .map(str::to_string)
        .or_else(|| config.lake.clone())
        .unwrap_or_else(|| "./lake".to_string())
}

/// Run one command; its exit status.
fn real_main(cli: Cli) -> Result<i32> {
    let config = load_config(cli.config.as_deref())?;
    let lake_url = lake_url(cli.lake.as_deref(), &config);
    match cli.command {
        Command::Stages => list_stages(),
        Command::Run { pairs } => run_stage(&lake_url, config, &pairs),
        Command::Sql(args) => sql(&lake_url, args),
        Command::Copy { dest, force } => copy(&lake_url, &dest, force),
        Command::Verify { table, repair } => verify(&lake_url, table.as_deref(), repair),
        Command::Bench { what, options } => {
            println!("{}", crate::bench::run(&what, &parse_pairs(&options)?)?);
            Ok(0)
        }
        Command::MakeModel(args) => make_model(args),
        Command::MakeTokenizer(args) => make_tokenizer(args),
        Command::Status { options } => status(&lake_url, config, &options),
    }
}

/// A stage context on the lake at `lake_url`.
fn context(lake_url: &str, config: Config) -> Result<Ctx> {
    Ok(Ctx {
        config,
        ..Ctx::new(Lake::open(lake_url)?)
    })
}

/// `pipeline stages`: every stage with its tables and parameters.
fn list_stages() -> Result<i32> {
    for s in stages::all() {
        println!(
            "{}\n    {}\n    reads: {}\n    writes: {}",
            s.name(),
            s.about(),
            s.reads(),
            s.writes()
        );
        for p in s.params() {
            let default = match p.default {
                Some("") => "(empty)".to_string(),
                Some(d) => d.to_string(),
                None => "required".to_string(),
            };
            println!("      {:<16} {:<14} {}", p.name, default, p.doc);
        }
    }
    Ok(0)
}

/// `pipeline run stage=NAME key=value ...`.
fn run_stage(lake_url: &str, config: Config, pairs: &[String]) -> Result<i32> {
    let mut map: BTreeMap<String, String> = parse_pairs(pairs)?;
    let stage = map
        .remove("stage")
        .context("missing stage=NAME (see `pipeline stages`)")?;
    let ctx = context(lake_url, config)?;
    println!("{}", stages::run(&ctx, &stage, &map)?);
    Ok(0)
}

/// `pipeline sql`: stream the result to stdout, and to `--out` when asked.
fn sql(lake_url: &str, args: SqlArgs) -> Result<i32> {
    let SqlArgs {
        query,
        file,
        format,
        out,
        force,
        allow_write,
        memory_limit,
        timeout,
    } = args;
    let text = match (query, file) {
        (Some(q), None) => q,
        (None, Some(f)) => std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?,
        (Some(_), Some(_)) => bail!("give the query as an argument or with -f, not both"),
        (None, None) => bail!("give a query, or -f FILE"),
    };
    let lake = Lake::open(lake_url)?;
    let mut limits = crate::sql::Limits::default();
    if let Some(m) = &memory_limit {
        limits.memory_bytes = crate::sql::parse_size(m).with_context(|| format!("--memory-limit {m}"))?;
    }
    if let Some(t) = timeout {
        if !(t > 0.0 && t.is_finite()) {
            bail!("--timeout {t}: expected a positive number of seconds");
        }
        limits.timeout = Some(std::time::Duration::from_secs_f64(t));
    }
    // Check the output target before running anything.
    let target = match &out {
        Some(o) => Some(OutTarget::check(&lake, o, allow_write, force)?),
        None => None,
    };
    let sql = Sql::open_with(&lake, limits)?;
    let mut printer = Printer::new(format);
    let mut writer: Option<parquet::arrow::ArrowWriter<std::fs::File>> = None;
    let staging = lc_lake::staging::file(".parquet")?;
    let schema = sql.query_each(&text, allow_write, |b| {
        printer.batch(&b)?;
        if target.is_some() {
            use crate::error::Context as _;
            if writer.is_none() {
                let f = staging.reopen().ctx("the --out staging file")?;
                writer =
                    Some(parquet::arrow::ArrowWriter::try_new(f, b.schema(), None).ctx("writing --out")?);
            }
            writer
                .as_mut()
                .expect("created above")
                .write(&b)
                .ctx("writing --out")?;
        }
        Ok(())
    })?;
    printer.finish(schema.clone())?;
    if let Some(t) = target {
        let w = match writer {
            Some(w) => w,
            None => parquet::arrow::ArrowWriter::try_new(staging.reopen()?, schema, None)?,
        };
        w.close()?;
        t.store.put_file(&t.key, staging.path())?;
        eprintln!("wrote {}", t.display);
    }
    Ok(0)
}

/// `pipeline copy DEST`: the whole lake to another location.
fn copy(lake_url: &str, dest: &str, force: bool) -> Result<i32> {
    let lake = Lake::open(lake_url)?;
    let to = lake.open_sibling(dest)?;
    if to.url() == lake.url() {
        bail!("copy: {dest} is the lake itself");
    }
    if !force && !to.list("")?.is_empty() {
        bail!("copy: {} is not empty; pass --force to copy into it", to.url());
    }
    let (n, bytes) = lake.copy_to(&to)?;
    println!(
        "copied {n} objects ({:.1} MB) from {} to {}",
        bytes as f64 / 1e6,
        lake.url(),
        to.url()
    );
    Ok(0)
}

/// `pipeline verify [TABLE]`: exit status 1 when something is damaged.
fn verify(lake_url: &str, table: Option<&str>, repair: bool) -> Result<i32> {
    let lake = Lake::open(lake_url)?;
    let report = crate::verify::verify(&lake, table, repair)?;
    print!("{}", crate::verify::render(&lake, &report));
    if report.damaged() > 0 {
        return Ok(1);
    }
    Ok(0)
}

/// `pipeline make-model`: a random GPT-Neo in Hugging Face format.
fn make_model(args: MakeModelArgs) -> Result<i32> {
    let MakeModelArgs {
        depth,
        width,
        heads,
        context,
        vocab,
        seed,
        bias_std,
        out,
    } = args;
    let config = lc_models::GptNeoConfig::grid(depth, width, heads, vocab, context);
    config.validate("make-model")?;
    let mut w = lc_models::init_weights(&config, seed, &candle_core::Device::Cpu)?;
    if bias_std != 0.0 {
        lc_models::gpt_neo::randomize_biases(&mut w, bias_std, seed ^ 0xb1a5)?;
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let store = Lake::open(&out.to_string_lossy())?;
    let state = serde_json::json!({"global_step": 0, "complete": true});
    let tok = bytes::Bytes::from_static(crate::tokenizer::GPT2_TOKENIZER_JSON);
    crate::checkpoint::save_dir(&store, "", &config, &w, &[("tokenizer.json", tok)], &state)?;
    eprintln!(
        "wrote {} ({depth}x{width}, random weights, seed {seed}, bias std {bias_std})",
        out.display()
    );
    Ok(0)
}

/// `pipeline make-tokenizer`: tokenizer.json from GPT-2's two files.
fn make_tokenizer(args: MakeTokenizerArgs) -> Result<i32> {
    let MakeTokenizerArgs { vocab, merges, out } = args;
    let json = crate::tokenizer::build_gpt2_tokenizer(&vocab.to_string_lossy(), &merges.to_string_lossy())?;
    std::fs::write(&out, json).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(0)
}

/// `pipeline status [experiment=FILE device=...]`.
fn status(lake_url: &str, config: Config, options: &[String]) -> Result<i32> {
    let ctx = context(lake_url, config)?;
    let opts = parse_pairs(options)?;
    match opts.get("experiment") {
        None => print_status(&ctx.lake).map(|()| 0),
        Some(path) => {
            let device = opts.get("device").map(String::as_str).unwrap_or("cpu");
            print!("{}", crate::grid_status::render(&ctx, path, device)?);
            Ok(0)
        }
    }
}

/// Rows of a table-format result printed per table block, so results
/// stream instead of being held whole.
const TABLE_BLOCK_ROWS: usize = 1000;

/// Prints result batches as they arrive.
struct Printer {
    format: Format,
    pending: Vec<arrow::record_batch::RecordBatch>,
    pending_rows: usize,
    csv: Option<arrow::csv::Writer<std::io::Stdout>>,
    json: Option<arrow::json::ArrayWriter<std::io::Stdout>>,
    printed_any: bool,
}

impl Printer {
    fn new(format: Format) -> Self {
        Printer {
            format,
            pending: Vec::new(),
            pending_rows: 0,
            csv: None,
            json: None,
            printed_any: false,
        }
    }

    fn batch(&mut self, b: &arrow::record_batch::RecordBatch) -> crate::Result<()> {
        let arrow_err = |e: arrow::error::ArrowError| crate::Error::Arrow {
            what: "printing the result".into(),
            source: e,
        };
        self.printed_any = true;
        match self.format {
            Format::Table => {
                self.pending_rows += b.num_rows();
                self.pending.push(b.clone());
                if self.pending_rows >= TABLE_BLOCK_ROWS {
                    self.flush_table().map_err(arrow_err)?;
                }
            }
            Format::Csv => self
                .csv
                .get_or_insert_with(|| {
                    arrow::csv::WriterBuilder::new()
                        .with_header(true)
                        .build(std::io::stdout())
                })
                .write(b)
                .map_err(arrow_err)?,
            Format::Json => self
                .json
                .get_or_insert_with(|| arrow::json::ArrayWriter::new(std::io::stdout()))
                .write(b)
                .map_err(arrow_err)?,
        }
        Ok(())
    }

    fn flush_table(&mut self) -> std::result::Result<(), arrow::error::ArrowError> {
        use std::io::Write;
        if self.pending.is_empty() {
            return Ok(());
        }
        let table = arrow::util::pretty::pretty_format_batches(&self.pending)?;
        writeln!(std::io::stdout().lock(), "{table}")?;
        self.pending.clear();
        self.pending_rows = 0;
        Ok(())
    }

    /// Print what is pending; an empty result still shows its columns.
    fn finish(mut self, schema: arrow::datatypes::SchemaRef) -> Result<()> {
        use std::io::Write;
        if !self.printed_any {
            self.batch(&arrow::record_batch::RecordBatch::new_empty(schema))?;
        }
        match self.format {
            Format::Table => self.flush_table()?,
            Format::Csv => {}
            Format::Json => match self.json.take() {
                Some(mut w) => {
                    w.finish()?;
                    writeln!(std::io::stdout())?;
                }
                None => println!("[]"),
            },
        }
        Ok(())
    }
}

/// Where `sql --out` writes, checked before the query runs.
struct OutTarget {
    store: Lake,
    key: String,
    display: String,
}

impl OutTarget {
    /// Resolve `out` and refuse a target inside the lake (unless
    /// `allow_write`) or an existing file (unless `force`).
    fn check(lake: &Lake, out: &str, allow_write: bool, force: bool) -> Result<Self> {
        let (store, key, inside) = if out.starts_with("s3://") || out.starts_with("s3a://") {
            let url = url::Url::parse(out).with_context(|| format!("--out {out}"))?;
            let bucket = url.host_str().unwrap_or_default().to_string();
            let key = url.path().trim_start_matches('/').to_string();
            if key.is_empty() || key.ends_with('/') {
                bail!("--out {out}: give a file name, not a bucket or prefix");
            }
            let inside = match lake.url().strip_prefix("s3://") {
                Some(rest) => {
                    let (lb, lp) = rest.split_once('/').unwrap_or((rest, ""));
                    lb == bucket && (lp.is_empty() || key == lp || key.starts_with(&format!("{lp}/")))
                }
                None => false,
            };
            (lake.open_sibling(&format!("s3://{bucket}"))?, key, inside)
        } else if out.contains("://") && !out.starts_with("file://") {
            bail!("--out {out}: expected a local path, file:// or s3:// URL");
        } else {
            let path = std::path::PathBuf::from(out.strip_prefix("file://").unwrap_or(out));
            let abs = resolve_path(&std::path::absolute(&path)?);
            let parent = abs.parent().context("--out has no directory")?.to_path_buf();
            let name = abs
                .file_name()
                .context("--out has no file name")?
                .to_string_lossy()
                .to_string();
            let inside = match lake.url().strip_prefix("file://") {
                Some(root) => abs.starts_with(resolve_path(std::path::Path::new(root))),
                None => false,
            };
            std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
            (lake.open_sibling(&parent.to_string_lossy())?, name, inside)
        };
        if inside && !allow_write {
            bail!(
                "--out {out} is inside the lake {}: writing there could replace or break its tables; choose a path outside it (or pass --allow-write if you mean it)",
                lake.url()
            );
        }
        if store.exists(&key)? && !force {
            bail!("--out {out} exists; pass --force to replace it");
        }
        Ok(OutTarget {
            display: store.display(&key),
            store,
            key,
        })
    }
}

/// A path with symbolic links and `..` resolved as far as it exists.
fn resolve_path(p: &std::path::Path) -> std::path::PathBuf {
    let mut existing = p.to_path_buf();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = std::fs::canonicalize(&existing).unwrap_or(existing);
    for part in rest.into_iter().rev() {
        if part == ".." {
            out.pop();
        } else if part != "." {
            out.push(part);
        }
    }
    out
}

/// One committed artifact, as `pipeline status` lists it.
#[derive(Debug, Clone)]
pub struct ArtifactRow {
    pub table: String,
    /// `key=value` pairs joined by `/`, as in the lake's paths.
    pub partition: String,
    pub rows: u64,
    pub bytes: u64,
    pub stage: String,
    /// RFC 3339, UTC.
    pub created: String,
}

/// Every committed artifact of every lake table, table by table.
pub fn artifacts(lake: &Lake) -> crate::Result<Vec<ArtifactRow>> {
    let mut rows = Vec::new();
    for t in lc_lake::schemas::tables().iter().filter(|t| t.kind == "table") {
        for m in lake.manifests(&t.table, "")? {
            let part: Vec<String> = m.partition.iter().map(|(k, v)| format!("{k}={v}")).collect();
            rows.push(ArtifactRow {
                table: t.table.clone(),
                partition: part.join("/"),
                rows: m.rows,
                bytes: m.bytes,
                stage: m.stage.clone(),
                created: m.created.clone(),
            });
        }
    }
    Ok(rows)
}

fn print_status(lake: &Lake) -> Result<()> {
    let rows: Vec<[String; 6]> = artifacts(lake)?
        .into_iter()
        .map(|a| {
            [
                a.table,
                a.partition,
                a.rows.to_string(),
                a.bytes.to_string(),
                a.stage,
                a.created,
            ]
        })
        .collect();
    println!("lake: {}", lake.url());
    if rows.is_empty() {
        println!("(empty: run `pipeline run stage=all` or a single stage)");
        return Ok(());
    }
    let headers = ["table", "partition", "rows", "bytes", "stage", "created"];
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(headers.to_vec()));
    for r in &rows {
        println!("{}", line(r.iter().map(String::as_str).collect()));
    }
    Ok(())
}
