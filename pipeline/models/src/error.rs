//! The crate's error: a model or its configuration that cannot be used
//! (naming the model), arguments that do not fit, or a failed tensor
//! operation with what was being done. The pipeline adds the stage and the
//! lake key.

use std::fmt::Display;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model's configuration or tensors are not what its family expects.
    #[error("model {model}: {problem}")]
    Model { model: String, problem: String },
    /// Sizes, names or settings that disagree, explained in words.
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
    pub fn model(model: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Model {
            model: model.into(),
            problem: problem.into(),
        }
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
