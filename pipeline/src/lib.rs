//! `pipeline`: measure neural collapse in causal language models.
//!
//! Stages (see [`stages`]) read and write Parquet artifacts in a results lake
//! (the `lc-lake` crate) whose tables are fixed by `schemas/` and queried with
//! DataFusion SQL ([`sql`]).

pub mod bench;
pub mod cancel;
pub mod checkpoint;
pub mod chunks;
pub mod cli;
pub mod error;
pub mod experiment;
pub mod external;
pub mod figures;
pub mod fuzzing;
pub mod grid_status;
pub mod params;
pub mod partials;
pub mod sql;
pub mod stages;
pub mod stats;
pub mod tokenizer;
pub mod verify;

pub use error::{Error, Result};
