//! Integration tests: every stage through the real lake, SQL engine, model
//! and data. One test binary so the heavy dependencies are linked once.

mod analytics;
mod analyze;
mod campaign;
mod collect;
mod common;
mod concurrency;
mod data;
mod families;
mod faults;
mod foundation;
mod layers;
mod model;
mod report;
mod s3;
mod slurm;
