//! The crate's error: inputs that do not fit together. The crates above it
//! add what they know (the file, the table, the argument).

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Sizes, widths or contents that disagree, explained in words.
    #[error("{0}")]
    Invalid(String),
}
