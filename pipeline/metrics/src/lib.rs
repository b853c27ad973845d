//! `lc-metrics`: the mathematics of neural collapse, with no I/O.

pub mod class_stats;
pub mod correlation;
pub mod error;
pub mod nc4;
pub mod per_class;
pub mod selection;
pub mod tiles;

pub use class_stats::{ClassStats, LabelGroups, Partial};
pub use error::{Error, Result};
