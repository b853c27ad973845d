//! `lc-lake`: the results lake of the neural-collapse pipeline.
//!
//! Every artifact is one Parquet file per table partition plus a JSON
//! manifest ([`artifact`], [`manifest`]) in an object store addressed by a
//! URL: a local folder, an S3 bucket or memory ([`lake::Lake`]). Tables have
//! the shapes `schemas/` fixes ([`schemas`]); every byte read back is checked
//! against the manifest's hashes ([`integrity`]); leases keep two workers off
//! one piece of work ([`lease`]); outside inputs are read through the same
//! stores ([`source`]).
//!
//! The lake knows no model and no stage: the pipeline crate's stages decide
//! what to write, this crate how it is stored. Its modules import one way:
//! `host`, `progress`, `staging`, `parquet_io`, `schemas`, `integrity` ←
//! `manifest` ← `lake` ← `lease`, `source`, `artifact`.

pub mod artifact;
pub mod error;
pub mod host;
pub mod integrity;
pub mod lake;
pub mod lease;
pub mod manifest;
pub mod parquet_io;
pub mod progress;
pub mod schemas;
pub mod source;
pub mod staging;

pub use artifact::{Artifact, Provenance};
pub use error::{Error, Result};
pub use lake::Lake;
pub use manifest::{InputRef, Manifest};
