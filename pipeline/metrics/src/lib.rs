//! `lc-metrics`: the mathematics of neural collapse in causal language
//! models (Wu & Papyan, *Linguistic Collapse*, NeurIPS 2024), with no I/O.
//!
//! A class is a next token; a sample is the hidden state h of a context
//! whose next token is that class. Everything here works on plain slices of
//! f64 (or values converted to f64 as they are read) and accumulates in
//! f64. Reading models, tables and object stores is the business of the
//! crates above this one, which convert their data into these slices.
//!
//! # The path from samples to metrics
//!
//! 1. [`class_stats`]: per class c, the count N_c, the mean mu_c and M2_c =
//!    sum ||h - mu_c||^2, from batches reduced in two passes and merged with
//!    Chan's formula in any grouping and order ([`ClassStats`]).
//! 2. [`selection`]: V', the classes analysed (N_c within bounds), their
//!    within-class variances sigma^2_c = M2_c / N_c, and their means centred
//!    on the unweighted global mean, m_c = mu_c - mu_bar.
//! 3. [`tiles`]: every pairwise metric over all pairs of V', one GEMM tile at
//!    a time, never holding the C x C matrix: NC1's CDNV
//!    (sigma^2_c + sigma^2_c') / (2 ||mu_c - mu_c'||^(2+k)), NC2's
//!    interference <u_c, u_c'> of the unit directions u_c = m_c / ||m_c||,
//!    GNC2's log kernel log(1 / ||u_c - u_c'||) and Riesz kernel, the Gram
//!    entries, and the uncentred kernels of the authors' published numbers.
//! 4. [`per_class`]: NC2's norms ||m_c|| and NC3's self-duality
//!    cos(w_c, m_c) against the classifier row w_c.
//! 5. [`nc4`]: the operands and the per-class count of NC4, the agreement
//!    of the classifier's decision with the nearest class centre's.
//! 6. [`correlation`]: R^2, its permutation test, Spearman's rho and a
//!    bootstrap interval, to relate the metrics to each other and to
//!    generalisation across models.
//!
//! The full definitions, with the paper's equation numbers and the summary
//! statistics reported for each, are in the repository's DESIGN.md
//! ("Metrics").
//!
//! # Example
//!
//! Two workers each see half of six samples of three classes; their merged
//! statistics are those of all six, and the mean CDNV (k = 0) over the
//! three pairs equals the definition worked by hand.
//!
//! ```
//! use lc_metrics::{ClassStats, selection, tiles};
//!
//! // (class, hidden state of dimension 2)
//! let samples = [
//!     (0, [1.0, 0.0]), (0, [3.0, 0.0]),
//!     (1, [0.0, 4.0]), (1, [0.0, 6.0]),
//!     (2, [-5.0, 0.0]), (2, [-5.0, 2.0]),
//! ];
//! let mut workers = [ClassStats::new(2), ClassStats::new(2)];
//! for (i, (class, h)) in samples.iter().enumerate() {
//!     // Each batch here is one sample: a partial with N = 1 and M2 = 0.
//!     workers[i % 2].merge_one(*class, 1, h, 0.0);
//! }
//! let [mut all, other] = workers;
//! all.merge(&other)?;
//! let r = all.row_of(0).unwrap();
//! assert_eq!((all.count[r], all.mean_of(r)), (2, &[2.0, 0.0][..]));
//! assert_eq!(all.m2[r], 2.0); // (1 - 2)^2 + (3 - 2)^2
//!
//! // V' = classes with at least one sample; every sigma^2_c = 2 / 2 = 1.
//! let v = selection::prepare(&mut all, 1, 0);
//! let classes = tiles::Classes {
//!     centred: &v.centred,
//!     d: 2,
//!     var: &v.var,
//!     mean_bar: &v.mean_bar,
//! };
//! let options = tiles::Options { edge: 64, cdnv_k: 0.0, riesz_s: None, f32_gemm: false, top_k: 0 };
//! let report = tiles::pairs(&classes, &options);
//! let cdnv = tiles::combine(&report.tiles, tiles::METRIC_CDNV);
//! // Means (2, 0), (0, 5), (-5, 1): squared distances 29, 41 and 50.
//! let by_hand = [29.0, 41.0, 50.0].map(|d2: f64| (1.0 + 1.0) / (2.0 * d2));
//! assert_eq!(cdnv.n, 3);
//! assert!((cdnv.mean - by_hand.iter().sum::<f64>() / 3.0).abs() < 1e-12);
//! # Ok::<(), lc_metrics::Error>(())
//! ```

pub mod class_stats;
pub mod correlation;
pub mod error;
pub mod nc4;
pub mod per_class;
pub mod selection;
pub mod tiles;

pub use class_stats::{ClassStats, LabelGroups, Partial};
pub use error::{Error, Result};
