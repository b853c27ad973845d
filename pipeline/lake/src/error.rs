//! The lake's error: a store, file or table that failed, named by its key or
//! path, and what was expected. The pipeline wraps it, adding the stage.

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
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A written or read table does not have the columns its schema file fixes.
    #[error("table {table}: {problem}")]
    Schema { table: String, problem: String },
    /// An input file outside the lake (a corpus, a table to import) is
    /// missing or malformed.
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
    /// Anything else that is the caller's mistake, explained in words.
    #[error("{0}")]
    Invalid(String),
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
}

/// Attach a description of what was being done to a foreign error.
pub trait Context<T> {
    fn ctx(self, what: impl Display) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, object_store::Error> {
    fn ctx(self, what: impl Display) -> Result<T> {
        self.map_err(|source| {
            let hint = match &source {
                object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. } => {
                    " (refused: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's permissions)"
                }
                _ => "",
            };
            Error::Store {
                what: format!("{what}{hint}"),
                source,
            }
        })
    }
}

impl<T> Context<T> for std::result::Result<T, parquet::errors::ParquetError> {
    fn ctx(self, what: impl Display) -> Result<T> {
        self.map_err(|source| Error::Parquet {
            what: what.to_string(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, arrow::error::ArrowError> {
    fn ctx(self, what: impl Display) -> Result<T> {
        self.map_err(|source| Error::Arrow {
            what: what.to_string(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn ctx(self, what: impl Display) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: what.to_string(),
            source,
        })
    }
}
