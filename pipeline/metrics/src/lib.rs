//! `lc-metrics`: the mathematics of neural collapse, with no I/O.

pub mod tiles;
