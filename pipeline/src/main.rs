//! The `pipeline` command line.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use pipeline::lake::Lake;
use pipeline::params::{Config, parse_pairs};
use pipeline::sql::Sql;
use pipeline::stages::{self, Ctx};

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
    Sql {
        /// The query (or use -f)
        query: Option<String>,
        /// Read the query from a file
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Also write the result to a Parquet file (local path or s3:// URL)
        #[arg(long)]
        out: Option<String>,
        /// Allow DDL/DML statements (CREATE, INSERT, COPY, SET)
        #[arg(long)]
        allow_write: bool,
    },
    /// What exists in the lake, per table and partition, with row counts
    Status,
    /// Benchmark a stage: data | model | collect | analyze [key=value ...]
    Bench {
        what: String,
        #[arg(value_name = "key=value")]
        options: Vec<String>,
    },
    /// Build a GPT-2 style tokenizer.json from encoder.json + vocab.bpe
    MakeTokenizer {
        /// encoder.json (the vocabulary)
        #[arg(long)]
        vocab: PathBuf,
        /// vocab.bpe (the merges)
        #[arg(long)]
        merges: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

// Training and collection allocate the same score- and vocabulary-sized
// tensors every step. With the system allocator each of them is fresh memory
// the kernel must zero-fill (a third of a training step under perf);
// mimalloc with purging off keeps freed memory for the next step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Index of `mi_option_purge_delay` in mimalloc.h (v2 and v3).
const MI_OPTION_PURGE_DELAY: i32 = 15;

fn tune_allocator() {
    // SAFETY: sets a process-wide allocator option before other threads exist.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    let filter = if cli.quiet { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    if let Err(e) = real_main(cli) {
        eprintln!("error: {}", describe(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, leaving out causes whose text an earlier
/// message already contains (object-store errors repeat their sources).
fn describe(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
    }
    parts.join("\n  caused by: ")
}

fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None => {
            let default = PathBuf::from("pipeline.toml");
            if default.is_file() {
                Ok(Config::load(&default)?)
            } else {
                Ok(Config::default())
            }
        }
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let config = load_config(cli.config.as_ref())?;
    let lake_url = cli
        .lake
        .clone()
        .or_else(|| config.lake.clone())
        .unwrap_or_else(|| "./lake".to_string());
    match cli.command {
        Command::Stages => {
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
            Ok(())
        }
        Command::Run { pairs } => {
            let mut map: BTreeMap<String, String> = parse_pairs(&pairs)?;
            let stage = map
                .remove("stage")
                .context("missing stage=NAME (see `pipeline stages`)")?;
            let lake = Lake::open(&lake_url)?;
            let ctx = Ctx { lake, config };
            let summary = stages::run(&ctx, &stage, &map)?;
            println!("{summary}");
            Ok(())
        }
        Command::Sql {
            query,
            file,
            format,
            out,
            allow_write,
        } => {
            let text = match (query, file) {
                (Some(q), None) => q,
                (None, Some(f)) => {
                    std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?
                }
                (Some(_), Some(_)) => bail!("give the query as an argument or with -f, not both"),
                (None, None) => bail!("give a query, or -f FILE"),
            };
            let lake = Lake::open(&lake_url)?;
            let sql = Sql::open(&lake)?;
            let batches = sql.query(&text, allow_write)?;
            print_batches(&batches, format)?;
            if let Some(out) = out {
                write_parquet_out(&lake, &out, &batches)?;
                eprintln!("wrote {out}");
            }
            Ok(())
        }
        Command::Bench { what, options } => {
            let opts = parse_pairs(&options)?;
            println!("{}", pipeline::bench::run(&what, &opts)?);
            Ok(())
        }
        Command::MakeTokenizer { vocab, merges, out } => {
            let json = pipeline::tokenizer::build_gpt2_tokenizer(
                &vocab.to_string_lossy(),
                &merges.to_string_lossy(),
            )?;
            std::fs::write(&out, json).with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Command::Status => {
            let lake = Lake::open(&lake_url)?;
            print_status(&lake)
        }
    }
}

fn print_batches(batches: &[arrow::record_batch::RecordBatch], format: Format) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match format {
        Format::Table => {
            let table = arrow::util::pretty::pretty_format_batches(batches)?;
            writeln!(stdout, "{table}")?;
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut stdout);
            for b in batches {
                w.write(b)?;
            }
        }
        Format::Json => {
            let mut w = arrow::json::ArrayWriter::new(&mut stdout);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
            writeln!(stdout)?;
        }
    }
    Ok(())
}

/// Write a query result as a Parquet file through object_store.
fn write_parquet_out(lake: &Lake, out: &str, batches: &[arrow::record_batch::RecordBatch]) -> Result<()> {
    let Some(first) = batches.first() else {
        bail!("the query returned no batches; nothing written to {out}");
    };
    let mut buf = Vec::new();
    {
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, first.schema(), None)?;
        for b in batches {
            w.write(b)?;
        }
        w.close()?;
    }
    let (dir, key) = if out.starts_with("s3://") {
        let url = url::Url::parse(out)?;
        (
            format!("s3://{}", url.host_str().unwrap_or_default()),
            url.path().trim_start_matches('/').to_string(),
        )
    } else {
        let abs = std::path::absolute(out)?;
        let parent = abs.parent().context("output path has no directory")?;
        std::fs::create_dir_all(parent)?;
        (
            parent.to_string_lossy().to_string(),
            abs.file_name()
                .context("output path has no file name")?
                .to_string_lossy()
                .to_string(),
        )
    };
    let store = lake.open_sibling(&dir)?;
    store.put(&key, bytes::Bytes::from(buf))?;
    Ok(())
}

fn print_status(lake: &Lake) -> Result<()> {
    let mut rows: Vec<[String; 6]> = Vec::new();
    for t in pipeline::schemas::tables().iter().filter(|t| t.kind == "table") {
        for m in lake.manifests(&t.table, "")? {
            let part: Vec<String> = m.partition.iter().map(|(k, v)| format!("{k}={v}")).collect();
            rows.push([
                t.table.clone(),
                part.join("/"),
                m.rows.to_string(),
                m.bytes.to_string(),
                m.stage.clone(),
                m.created.clone(),
            ]);
        }
    }
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
