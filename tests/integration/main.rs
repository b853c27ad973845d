//! Integration tests: every stage through the real lake, SQL engine, model
//! and data. One test binary so the heavy dependencies are linked once.

mod common;
mod foundation;
