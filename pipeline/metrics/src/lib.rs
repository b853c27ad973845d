//! `lc-metrics`: the mathematics of neural collapse, with no I/O.

pub mod class_stats;
pub mod correlation;
pub mod error;
pub mod tiles;

pub use class_stats::{ClassStats, LabelGroups, Partial};
pub use error::{Error, Result};
