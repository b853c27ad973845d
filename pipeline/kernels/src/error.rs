//! The crate's error: inputs that do not fit a kernel, or a failed device
//! operation with what was being done. The crates above add the model,
//! file or stage.

use std::fmt::Display;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Sizes, classes or layers that disagree, explained in words.
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Candle {
        what: String,
        #[source]
        source: candle_core::Error,
    },
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

/// Attach a description of what was being done to a candle error.
pub trait Context<T> {
    fn ctx(self, what: impl Display) -> Result<T>;
}

impl<T> Context<T> for candle_core::Result<T> {
    fn ctx(self, what: impl Display) -> Result<T> {
        self.map_err(|source| Error::Candle {
            what: what.to_string(),
            source,
        })
    }
}
