//! The library's error type.
//!
//! Every variant carries enough context to act on: the file, lake key, row,
//! stage parameter or model that was wrong, and what was expected instead.
//! The binary turns these into `anyhow` errors at the edge.

use std::fmt::Display;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An object-store operation failed (network, credentials, missing key).
    #[error("{what}: {source}")]
    Store {
        what: String,
        #[source]
        source: object_store::Error,
    },
    /// The lake URL or an input URL could not be understood.
    #[error("{url}: {problem}")]
    Url { url: String, problem: String },
    #[error("{what}: {source}")]
    Parquet {
        what: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("{what}: {source}")]
    Arrow {
        what: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    #[error("{what}: {source}")]
    DataFusion {
        what: String,
        #[source]
        source: Box<datafusion::error::DataFusionError>,
    },
    #[error("{what}: {source}")]
    Candle {
        what: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A written or read table does not have the columns its schema file fixes.
    #[error("table {table}: {problem}")]
    Schema { table: String, problem: String },
    /// A stage parameter is unknown, missing or malformed.
    #[error("stage {stage}: parameter {key}: {problem}")]
    Param {
        stage: String,
        key: String,
        problem: String,
    },
    /// User-supplied input (a corpus file, a table to import) is malformed.
    #[error("{source_name}: {problem}")]
    Input { source_name: String, problem: String },
    /// An artifact's manifest is missing, corrupt, or disagrees with its data.
    #[error("artifact {key}: {problem}")]
    Artifact { key: String, problem: String },
    /// A stage's inputs changed since existing outputs were made.
    #[error("{0}")]
    Stale(String),
    /// A commit refused because this worker's lease lapsed: the partition
    /// may be another worker's now.
    #[error("{0}")]
    LeaseLapsed(String),
    /// A model checkpoint is unsupported or inconsistent with the data.
    #[error("model {model}: {problem}")]
    Model { model: String, problem: String },
    #[error("tokenizer {path}: {problem}")]
    Tokenizer { path: String, problem: String },
    /// An SQL statement was refused (e.g. a write in read-only mode).
    #[error("{0}")]
    Sql(String),
    /// Anything else that is the caller's mistake, explained in words.
    #[error("{0}")]
    Invalid(String),
    /// A query ran past its time limit.
    #[error("{0}")]
    Timeout(String),
    /// A query needed more memory than its limit allows.
    #[error("{0}")]
    MemoryLimit(String),
    /// Stopped on request ([`crate::cancel::Cancel`]) before committing.
    #[error("interrupted")]
    Interrupted,
    /// In plan mode: the stage is not up to date and would now do this work.
    #[error("would run: {0}")]
    WouldRun(String),
}

/// The math's complaints are the caller's mistake; the caller adds the file
/// or table where it knows them.
impl From<lc_metrics::Error> for Error {
    fn from(e: lc_metrics::Error) -> Self {
        match e {
            lc_metrics::Error::Invalid(problem) => Error::Invalid(problem),
        }
    }
}

/// A kernel's complaint keeps its words; the caller adds the model or stage.
impl From<lc_kernels::Error> for Error {
    fn from(e: lc_kernels::Error) -> Self {
        match e {
            lc_kernels::Error::Invalid(problem) => Error::Invalid(problem),
            lc_kernels::Error::Candle { what, source } => Error::Candle { what, source },
        }
    }
}

/// The lake's errors keep their variant and words; the caller adds the stage.
impl From<lc_lake::Error> for Error {
    fn from(e: lc_lake::Error) -> Self {
        use lc_lake::Error as L;
        match e {
            L::Store { what, source } => Error::Store { what, source },
            L::Url { url, problem } => Error::Url { url, problem },
            L::Parquet { what, source } => Error::Parquet { what, source },
            L::Arrow { what, source } => Error::Arrow { what, source },
            L::Io { path, source } => Error::Io { path, source },
            L::Schema { table, problem } => Error::Schema { table, problem },
            L::Input { source_name, problem } => Error::Input { source_name, problem },
            L::Artifact { key, problem } => Error::Artifact { key, problem },
            L::Stale(m) => Error::Stale(m),
            L::LeaseLapsed(m) => Error::LeaseLapsed(m),
            L::Invalid(m) => Error::Invalid(m),
        }
    }
}

/// A model's complaint names the model; the caller adds the stage or key.
impl From<lc_models::Error> for Error {
    fn from(e: lc_models::Error) -> Self {
        match e {
            lc_models::Error::Model { model, problem } => Error::Model { model, problem },
            lc_models::Error::Invalid(problem) => Error::Invalid(problem),
            lc_models::Error::Candle { what, source } => Error::Candle { what, source },
        }
    }
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
    pub fn input(source_name: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Input {
            source_name: source_name.into(),
            problem: problem.into(),
        }
    }
    pub fn artifact(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Artifact {
            key: key.into(),
            problem: problem.into(),
        }
    }
    pub fn model(model: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Model {
            model: model.into(),
            problem: problem.into(),
        }
    }
}

impl Error {
    /// A missing file, lake object, input artifact or model: object-store or
    /// I/O "not found" anywhere in the chain, or the library's own "not
    /// found" of an artifact, model or input file.
    pub fn is_not_found(&self) -> bool {
        match self {
            Error::Artifact { problem, .. } | Error::Model { problem, .. }
                if problem.starts_with("not found") || problem == "data file not found" =>
            {
                return true;
            }
            Error::Input { problem, .. } if problem == "no such file" => return true,
            _ => {}
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(c) = cause {
            if let Some(object_store::Error::NotFound { .. }) = c.downcast_ref::<object_store::Error>() {
                return true;
            }
            if let Some(io) = c.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::NotFound
            {
                return true;
            }
            cause = c.source();
        }
        false
    }
}

/// An error and its causes in one message, leaving out causes whose text an
/// earlier message already contains (object-store errors repeat their
/// sources). Both front ends print errors this way.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        let msg = c.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cause = c.source();
    }
    parts.join("\n  caused by: ")
}

/// Attach a description of what was being done to a foreign error.
pub trait Context<T> {
    fn ctx(self, what: impl Display) -> Result<T>;
}

/// The lake's errors for the lake's foreign errors, with the same words.
macro_rules! impl_context_as_lake {
    ($err:ty) => {
        impl<T> Context<T> for std::result::Result<T, $err> {
            fn ctx(self, what: impl Display) -> Result<T> {
                lc_lake::error::Context::ctx(self, what).map_err(Error::from)
            }
        }
    };
}

impl_context_as_lake!(object_store::Error);
impl_context_as_lake!(parquet::errors::ParquetError);
impl_context_as_lake!(arrow::error::ArrowError);
impl_context_as_lake!(std::io::Error);

impl<T> Context<T> for candle_core::Result<T> {
    fn ctx(self, what: impl Display) -> Result<T> {
        self.map_err(|source| Error::Candle {
            what: what.to_string(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, datafusion::error::DataFusionError> {
    fn ctx(self, what: impl Display) -> Result<T> {
        self.map_err(|source| Error::DataFusion {
            what: what.to_string(),
            source: Box::new(source),
        })
    }
}
