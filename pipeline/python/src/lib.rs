//! `linguistic_collapse._native`: the pipeline's engine for Python.
//!
//! Glue only: every call goes to the `pipeline` library, exactly as the
//! command line does. Three rules hold at this edge:
//! - work runs on its own thread with the GIL released, while the calling
//!   thread wakes every `TICK` to deliver Python's signals (Ctrl-C cancels
//!   the work at its next checkpoint, see `pipeline::cancel`) and to hand the
//!   progress bars' state to a Python callback;
//! - library errors become Python exceptions by kind (`to_py`); a Rust panic
//!   becomes a `PipelineError` and never unwinds into the interpreter;
//! - tables leave as Arrow through the PyCapsule stream interface
//!   (`pyarrow.table` imports them without copying).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use pyo3::exceptions::{
    PyFileNotFoundError, PyKeyboardInterrupt, PyMemoryError, PyRuntimeError, PyTimeoutError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::PyList;

mod class_stats;

use pipeline::cancel::Cancel;
use pipeline::error::Error;
use pipeline::params::Config;
use pipeline::stages::Ctx;

// The library's hot loops allocate step-sized buffers; see
// `pipeline::cli::keep_freed_memory`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pyo3::create_exception!(
    linguistic_collapse,
    PipelineError,
    PyRuntimeError,
    "An error of the pipeline that no built-in exception describes."
);
pyo3::create_exception!(
    linguistic_collapse,
    DamagedArtifactError,
    PipelineError,
    "A lake artifact whose bytes disagree with its manifest; the message names the file and the stage that remakes it."
);

/// A progress bar for Python: `(id, message, position, length, unit, finished)`.
type BarTuple<'a> = (u64, String, u64, Option<u64>, &'a str, bool);
/// An artifact for Python: `(table, partition, rows, bytes, stage, created)`.
type ArtifactTuple = (String, String, u64, u64, String, String);
/// A verify finding for Python: `(kind, path, detail)`.
type FindingTuple = (String, String, String);
/// A stage for Python: `(name, about, reads, writes, [(key, default, doc)])`.
type StageTuple = (
    String,
    String,
    String,
    String,
    Vec<(String, Option<String>, String)>,
);

/// How often the calling thread wakes to deliver signals and progress.
const TICK: Duration = Duration::from_millis(100);

/// A library error (the pipeline's or the lake's) as the Python exception a
/// researcher would catch.
pub(crate) fn to_py(e: impl Into<Error>) -> PyErr {
    let e: Error = e.into();
    let text = pipeline::error::describe(&e);
    if let Some(d) = find_source::<lc_lake::integrity::Damaged>(&e) {
        return DamagedArtifactError::new_err((text, d.file.clone()));
    }
    if e.is_not_found() {
        return PyFileNotFoundError::new_err(text);
    }
    match e {
        Error::Interrupted => PyKeyboardInterrupt::new_err(text),
        Error::Timeout(_) => PyTimeoutError::new_err(text),
        Error::MemoryLimit(_) => PyMemoryError::new_err(text),
        Error::Param { .. }
        | Error::Invalid(_)
        | Error::Sql(_)
        | Error::Url { .. }
        | Error::DataFusion { .. }
        | Error::Input { .. } => PyValueError::new_err(text),
        _ => PipelineError::new_err(text),
    }
}

fn find_source<T: std::error::Error + 'static>(e: &Error) -> Option<&T> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(t) = c.downcast_ref::<T>() {
            return Some(t);
        }
        cause = c.source();
    }
    None
}

/// What a KeyboardInterrupt waits for.
#[derive(Clone, Copy, PartialEq)]
enum OnInterrupt {
    /// Work that writes: raise once it has stopped at its checkpoint, so
    /// the lake is settled when the exception reaches the caller.
    WaitForStop,
    /// Read-only work: raise at once; the thread's result is dropped.
    Abandon,
}

/// Run `work` on its own thread with the GIL released. Every [`TICK`] the
/// calling thread takes the GIL back to deliver signals (a pending
/// KeyboardInterrupt cancels the work and is raised as `on_interrupt`
/// says) and to call `tick`.
fn interruptible<T: Send + 'static>(
    py: Python<'_>,
    cancel: &Cancel,
    on_interrupt: OnInterrupt,
    mut tick: impl FnMut(Python<'_>) -> PyResult<()>,
    work: impl FnOnce() -> pipeline::Result<T> + Send + 'static,
) -> PyResult<T> {
    let (tx, rx) = mpsc::channel();
    // Shared with the GIL-free closures below, which need a `Sync` handle.
    let rx = std::sync::Mutex::new(rx);
    let worker = std::thread::Builder::new()
        .name("linguistic-collapse".into())
        .spawn(move || {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            let _ = tx.send(out);
        })
        .map_err(|e| PipelineError::new_err(format!("starting a worker thread: {e}")))?;
    let stop = |py: Python<'_>, err: PyErr| -> PyErr {
        cancel.cancel();
        if on_interrupt == OnInterrupt::WaitForStop {
            wait_for_stop(py, &rx);
        }
        err
    };
    loop {
        match py.detach(|| lock(&rx).recv_timeout(TICK)) {
            Ok(out) => {
                let _ = worker.join();
                // The last state of the bars, after a success only: a
                // failed run's bars stay where the work stopped.
                if matches!(out, Ok(Ok(_))) {
                    tick(py)?;
                }
                return match out {
                    Ok(result) => result.map_err(to_py),
                    Err(panic) => Err(PipelineError::new_err(format!(
                        "internal error (a bug; please report it): {}",
                        panic_text(&panic)
                    ))),
                };
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(PipelineError::new_err("the worker thread ended without a result"));
            }
        }
        if let Err(e) = py.check_signals() {
            return Err(stop(py, e));
        }
        if let Err(e) = tick(py) {
            return Err(stop(py, e));
        }
    }
}

/// Wait for a cancelled worker to reach its checkpoint (its result is
/// dropped). A second Ctrl-C stops waiting: the work then ends on its own,
/// committing at most what it was already committing.
fn wait_for_stop<T: Send>(py: Python<'_>, rx: &std::sync::Mutex<mpsc::Receiver<T>>) {
    loop {
        match py.detach(|| lock(rx).recv_timeout(TICK)) {
            Ok(_) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if py.check_signals().is_err() {
                    eprintln!("interrupted again: not waiting for the stage to reach its checkpoint");
                    return;
                }
            }
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

/// The state of every live progress bar, as tuples for the Python side:
/// `(id, message, position, length or None, unit, finished)`.
fn bar_states(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let rows: Vec<BarTuple> = lc_lake::progress::live_bars()
        .into_iter()
        .map(|b| (b.id, b.message, b.position, b.length, b.unit, b.finished))
        .collect();
    PyList::new(py, rows)
}

fn table_to_py(py: Python<'_>, batches: Vec<RecordBatch>, schema: SchemaRef) -> PyResult<Py<PyAny>> {
    Ok(pyo3_arrow::PyTable::try_new(batches, schema)?
        .into_pyarrow(py)?
        .unbind())
}

/// A results lake: SQL over its tables and the stages that write them.
#[pyclass(module = "linguistic_collapse._native", name = "Lake", frozen)]
pub(crate) struct PyLake {
    pub(crate) lake: lc_lake::lake::Lake,
    config: Config,
}

#[pymethods]
impl PyLake {
    /// Open the lake at `url`, else `PIPELINE_LAKE`, else `lake =` in the
    /// configuration (`config`, else `./pipeline.toml` when it exists), else
    /// `./lake`.
    #[new]
    #[pyo3(signature = (url=None, config=None))]
    fn new(url: Option<String>, config: Option<PathBuf>) -> PyResult<Self> {
        if let Some(c) = &config
            && !c.is_file()
        {
            return Err(PyFileNotFoundError::new_err(format!(
                "{}: no such configuration file",
                c.display()
            )));
        }
        let config = pipeline::cli::load_config(config.as_deref()).map_err(to_py)?;
        let given = url.or_else(|| std::env::var("PIPELINE_LAKE").ok().filter(|v| !v.is_empty()));
        let url = pipeline::cli::lake_url(given.as_deref(), &config);
        let lake = lc_lake::lake::Lake::open(&url).map_err(to_py)?;
        Ok(PyLake { lake, config })
    }

    /// The lake's normalised URL (`file:///abs/path`, `s3://bucket/prefix`).
    #[getter]
    fn url(&self) -> String {
        self.lake.url().to_string()
    }

    fn __repr__(&self) -> String {
        format!("Lake('{}')", self.lake.url())
    }

    /// Run one read-only SQL statement; the result as a `pyarrow.Table`.
    #[pyo3(signature = (query, memory_limit=None, timeout=None))]
    fn sql(
        &self,
        py: Python<'_>,
        query: String,
        memory_limit: Option<String>,
        timeout: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        self.require_exists()?;
        let mut limits = pipeline::sql::Limits::default();
        if let Some(m) = memory_limit {
            limits.memory_bytes = pipeline::sql::parse_size(&m).map_err(|e| {
                PyValueError::new_err(format!(
                    "memory_limit={m}: {e}; expected bytes or a size like '512M', '2G'"
                ))
            })?;
        }
        if let Some(t) = timeout {
            if !(t > 0.0 && t.is_finite()) {
                return Err(PyValueError::new_err(format!(
                    "timeout={t}: expected a positive number of seconds"
                )));
            }
            limits.timeout = Some(Duration::from_secs_f64(t));
        }
        let lake = self.lake.clone();
        let cancel = Cancel::new();
        let stop = cancel.clone();
        let (batches, schema) = interruptible(
            py,
            &cancel,
            OnInterrupt::Abandon,
            |_| Ok(()),
            move || {
                let sql = pipeline::sql::Sql::open_with(&lake, limits)?;
                let mut batches = Vec::new();
                let schema = sql.query_each(&query, false, |b| {
                    stop.check()?;
                    batches.push(b);
                    Ok(())
                })?;
                Ok((batches, schema))
            },
        )?;
        table_to_py(py, batches, schema)
    }

    /// Every committed artifact: `(table, partition, rows, bytes, stage,
    /// created)` tuples.
    fn status(&self, py: Python<'_>) -> PyResult<Vec<ArtifactTuple>> {
        self.require_exists()?;
        let lake = self.lake.clone();
        let rows = interruptible(
            py,
            &Cancel::new(),
            OnInterrupt::Abandon,
            |_| Ok(()),
            move || pipeline::cli::artifacts(&lake),
        )?;
        Ok(rows
            .into_iter()
            .map(|a| (a.table, a.partition, a.rows, a.bytes, a.stage, a.created))
            .collect())
    }

    /// Check every artifact (or one table's) against its recorded hashes:
    /// `(checked, bytes, findings, text)` where findings are `(kind, path,
    /// detail)` tuples and text is what `pipeline verify` prints.
    #[pyo3(signature = (table=None))]
    fn verify(
        &self,
        py: Python<'_>,
        table: Option<String>,
    ) -> PyResult<(u64, u64, Vec<FindingTuple>, String)> {
        self.require_exists()?;
        let lake = self.lake.clone();
        let (report, text) = interruptible(
            py,
            &Cancel::new(),
            OnInterrupt::Abandon,
            |_| Ok(()),
            move || {
                let report = pipeline::verify::verify(&lake, table.as_deref(), false)?;
                let text = pipeline::verify::render(&lake, &report);
                Ok((report, text))
            },
        )?;
        let findings = report
            .findings
            .iter()
            .map(|f| (f.kind.to_string(), f.path.clone(), f.detail.clone()))
            .collect();
        Ok((report.checked, report.bytes, findings, text))
    }

    /// The content hash of an artifact's manifest, or None when absent.
    fn _content_hash(
        &self,
        py: Python<'_>,
        table: &str,
        partition: Vec<(String, String)>,
    ) -> PyResult<Option<String>> {
        let parts: Vec<(&str, &str)> = partition.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let artifact = lc_lake::artifact::Artifact::new(table, &parts).map_err(to_py)?;
        let found = py.detach(|| self.lake.manifest(&artifact)).map_err(to_py)?;
        Ok(found.map(|m| m.content_hash))
    }

    /// Whether the lake holds `model`'s weights (NC3 then comes from them).
    fn _holds_weights(&self, py: Python<'_>, model: &str) -> bool {
        py.detach(|| pipeline::external::holds_weights(&self.lake, model))
    }

    /// Run one stage with the command line's semantics; `params` are the
    /// `key=value` pairs as strings. Calls `progress(bars)` about ten times a
    /// second with the live bars' state (see `bar_states`). Returns the
    /// stage's summary and the manifests it committed, as dicts.
    #[pyo3(signature = (stage, params, progress=None))]
    fn run_stage(
        &self,
        py: Python<'_>,
        stage: String,
        params: BTreeMap<String, String>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<(String, Vec<Py<PyAny>>)> {
        if params.contains_key("stage") {
            return Err(PyValueError::new_err(
                "give the stage as the first argument, not as a parameter",
            ));
        }
        lc_lake::progress::draw_elsewhere();
        let journal = lc_lake::lake::Journal::default();
        let ctx = Ctx {
            lake: self.lake.with_journal(journal.clone()),
            config: self.config.clone(),
            plan_only: false,
            cancel: Cancel::new(),
        };
        let cancel = ctx.cancel.clone();
        let tick = |py: Python<'_>| -> PyResult<()> {
            if let Some(cb) = &progress {
                cb.call1(py, (bar_states(py)?,))?;
            }
            Ok(())
        };
        let summary = interruptible(py, &cancel, OnInterrupt::WaitForStop, tick, move || {
            pipeline::stages::run(&ctx, &stage, &params)
        })?;
        let written = journal.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let out = written
            .iter()
            .map(|m| manifest_to_py(py, m))
            .collect::<PyResult<Vec<_>>>()?;
        Ok((summary, out))
    }
}

/// A manifest as the dict its JSON file holds.
pub(crate) fn manifest_to_py(py: Python<'_>, m: &lc_lake::manifest::Manifest) -> PyResult<Py<PyAny>> {
    let text =
        serde_json::to_string(m).map_err(|e| PipelineError::new_err(format!("a manifest as JSON: {e}")))?;
    Ok(py.import("json")?.call_method1("loads", (text,))?.unbind())
}

/// An artifact named from Python: its table and partition pairs.
type ArtifactSpec = (String, Vec<(String, String)>);

fn artifact_of((table, partition): &ArtifactSpec) -> PyResult<lc_lake::artifact::Artifact> {
    let parts: Vec<(&str, &str)> = partition.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    lc_lake::artifact::Artifact::new(table, &parts).map_err(to_py)
}

/// Commit `data` (anything with `__arrow_c_stream__`, e.g. a pyarrow.Table)
/// as the artifact `target`, its columns cast to the table's schema by
/// name, with `params` and the manifests of `inputs` recorded as a stage
/// records its own, and `about` among the manifest's extra fields. Returns
/// (up_to_date, manifest).
#[pyfunction]
#[pyo3(signature = (lake, target, data, params, inputs, about, force=false))]
#[allow(clippy::too_many_arguments)] // the Python function's arguments
fn write_table(
    py: Python<'_>,
    lake: PyRef<'_, PyLake>,
    target: ArtifactSpec,
    data: pyo3_arrow::PyTable,
    params: BTreeMap<String, String>,
    inputs: Vec<ArtifactSpec>,
    about: BTreeMap<String, String>,
    force: bool,
) -> PyResult<(bool, Py<PyAny>)> {
    let (batches, _) = data.into_inner();
    let made_from = pipeline::external::MadeFrom {
        params,
        inputs: inputs.iter().map(artifact_of).collect::<PyResult<_>>()?,
        about: about
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect(),
    };
    let parts: Vec<(&str, &str)> = target.1.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let table = target.0.as_str();
    let store = &lake.lake;
    let committed = py
        .detach(|| pipeline::external::commit_rows(store, table, &parts, &batches, &made_from, force))
        .map_err(to_py)?;
    Ok((committed.up_to_date, manifest_to_py(py, &committed.manifest)?))
}

/// Commit a model's output-layer rows `weight` [num_classes, dim] (float32,
/// C-contiguous) as `classifiers/model=...`, which analyze reads for NC3
/// when the model's weights are not in the lake; returns (up_to_date,
/// manifest).
#[pyfunction]
#[pyo3(signature = (lake, model, weight, force=false))]
fn write_classifier(
    py: Python<'_>,
    lake: PyRef<'_, PyLake>,
    model: &str,
    weight: numpy::PyReadonlyArray2<'_, f32>,
    force: bool,
) -> PyResult<(bool, Py<PyAny>)> {
    use numpy::PyUntypedArrayMethods;
    let [v, d] = [weight.shape()[0], weight.shape()[1]];
    let rows = weight
        .as_slice()
        .ok()
        .filter(|_| weight.is_c_contiguous())
        .ok_or_else(|| {
            PyValueError::new_err(
                "weight: expected a C-contiguous array (numpy.ascontiguousarray copies a strided view)",
            )
        })?;
    let store = &lake.lake;
    let committed = py
        .detach(|| pipeline::external::commit_classifier(store, model, rows, v, d, force))
        .map_err(to_py)?;
    Ok((committed.up_to_date, manifest_to_py(py, &committed.manifest)?))
}

impl PyLake {
    /// Reading a local lake that does not exist is a mistake worth naming
    /// (SQL over it would quietly find empty tables).
    fn require_exists(&self) -> PyResult<()> {
        if let Some(path) = self.lake.url().strip_prefix("file://")
            && !std::path::Path::new(path).is_dir()
        {
            return Err(PyFileNotFoundError::new_err(format!(
                "lake {path} does not exist: run a stage first (Lake.run), or give the lake's location"
            )));
        }
        Ok(())
    }
}

/// Every stage: `(name, about, reads, writes, [(key, default or None, doc)])`.
#[pyfunction]
fn stages() -> Vec<StageTuple> {
    pipeline::stages::all()
        .iter()
        .map(|s| {
            let params = s
                .params()
                .iter()
                .map(|p| {
                    (
                        p.name.to_string(),
                        p.default.map(str::to_string),
                        p.doc.to_string(),
                    )
                })
                .collect();
            (
                s.name().to_string(),
                s.about().to_string(),
                s.reads().to_string(),
                s.writes().to_string(),
                params,
            )
        })
        .collect()
}

/// The `pipeline` command line (`argv` with the program name first); returns
/// its exit status. The wheel's `pipeline` console script calls this.
#[pyfunction]
fn cli_main(py: Python<'_>, argv: Vec<String>) -> i32 {
    py.detach(|| pipeline::cli::main(argv))
}

/// Where the module's log lines go: stderr, at `level` unless `RUST_LOG` says
/// otherwise. The first call wins (a process has one subscriber).
#[pyfunction]
#[pyo3(signature = (level="warn"))]
fn init_logging(level: &str) -> bool {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init()
        .is_ok()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    pipeline::cli::keep_freed_memory();
    let py = m.py();
    m.add_class::<PyLake>()?;
    m.add_class::<class_stats::PyClassStats>()?;
    m.add_function(wrap_pyfunction!(stages, m)?)?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(write_classifier, m)?)?;
    m.add_function(wrap_pyfunction!(write_table, m)?)?;
    m.add_function(wrap_pyfunction!(class_stats::save_state, m)?)?;
    m.add_function(wrap_pyfunction!(class_stats::load_state, m)?)?;
    m.add_function(wrap_pyfunction!(class_stats::delete_state, m)?)?;
    m.add("PipelineError", py.get_type::<PipelineError>())?;
    m.add("DamagedArtifactError", py.get_type::<DamagedArtifactError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
