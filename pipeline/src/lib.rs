//! `pipeline`: measure neural collapse in causal language models.
//!
//! Stages (see [`stages`]) read and write Parquet artifacts in a results lake
//! ([`lake`], [`artifact`]) whose tables are fixed by `schemas/` ([`schemas`])
//! and queried with DataFusion SQL ([`sql`]).

pub mod artifact;
pub mod bench;
pub mod cancel;
pub mod checkpoint;
pub mod chunks;
pub mod cli;
pub mod error;
pub mod experiment;
pub mod external;
pub mod figures;
pub mod grid_status;
pub mod host;
pub mod integrity;
pub mod lake;
pub mod lease;
pub mod manifest;
pub mod params;
pub mod parquet_io;
pub mod partials;
pub mod progress;
pub mod schemas;
pub mod source;
pub mod sql;
pub mod stages;
pub mod staging;
pub mod stats;
pub mod tokenizer;
pub mod verify;

pub use error::{Error, Result};
