//! NC4: how often the classifier's decision agrees with the nearest class
//! centre's (DESIGN.md, "Metrics").
//!
//! For a sample h, over the analysed classes V' (ascending id), the linear
//! decision is argmax_c <w_c, h> and the nearest-class-centre decision
//! argmin_c ||h - mu_c||, computed as argmax_c (2 <h, mu_c> - ||mu_c||^2):
//! ||h||^2 is the same for every c, so both decisions are one matrix product
//! each, run by whichever device holds h ([`Centres`] holds the operands of
//! the second). Ties resolve to the lowest class id. [`Nc4Tally`] counts the
//! decisions per true class.

use std::collections::BTreeMap;

use crate::class_stats::ClassStats;

/// The class centres of V' as the nearest-centre decision needs them.
#[derive(Debug, Clone, PartialEq)]
pub struct Centres {
    /// The classes of V', ascending: column k of a decision is class `ids[k]`.
    pub ids: Vec<u32>,
    /// ids.len() x d, row-major: mu_c.
    pub mu: Vec<f64>,
    /// ||mu_c||^2.
    pub mu_sq: Vec<f64>,
}

impl Centres {
    /// The centres of the statistics rows `rows` (from
    /// [`ClassStats::analysed`], ascending class id).
    pub fn new(stats: &ClassStats, rows: &[usize]) -> Self {
        let mut mu = Vec::with_capacity(rows.len() * stats.d);
        for &r in rows {
            mu.extend_from_slice(stats.mean_of(r));
        }
        Centres {
            ids: rows.iter().map(|&r| stats.classes[r]).collect(),
            mu,
            mu_sq: rows
                .iter()
                .map(|&r| stats.mean_of(r).iter().map(|x| x * x).sum())
                .collect(),
        }
    }

    /// Whether `class` is in V'.
    pub fn contains(&self, class: u32) -> bool {
        self.ids.binary_search(&class).is_ok()
    }
}

/// The decisions on the samples of one true class.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub samples: u64,
    /// Both decisions name the same class.
    pub agree: u64,
    /// The linear decision is the true class.
    pub linear_correct: u64,
    /// The nearest-centre decision is the true class.
    pub ncc_correct: u64,
}

/// Decisions counted per true class, in ascending class id.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Nc4Tally {
    pub by_class: BTreeMap<u32, Tally>,
}

impl Nc4Tally {
    /// Count one sample of true class `label` decided `linear` and `ncc`.
    pub fn record(&mut self, label: u32, linear: u32, ncc: u32) {
        let t = self.by_class.entry(label).or_default();
        t.samples += 1;
        t.agree += u64::from(linear == ncc);
        t.linear_correct += u64::from(linear == label);
        t.ncc_correct += u64::from(ncc == label);
    }

    /// (samples, agreements) over every class.
    pub fn total(&self) -> (u64, u64) {
        self.by_class
            .values()
            .fold((0, 0), |a, t| (a.0 + t.samples, a.1 + t.agree))
    }

    /// NC4 agreement over every sample (0 with none).
    pub fn agreement(&self) -> f64 {
        let (samples, agree) = self.total();
        agree as f64 / samples.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centres_and_tally_by_hand() {
        let mut st = ClassStats::new(2);
        st.merge_one(8, 2, &[1.0, 2.0], 0.0);
        st.merge_one(3, 1, &[9.0, 9.0], 0.0);
        st.merge_one(5, 4, &[-3.0, 0.0], 0.0);
        let rows = st.analysed(2, 0);
        let c = Centres::new(&st, &rows);
        assert_eq!(c.ids, [5, 8]);
        assert_eq!(c.mu, [-3.0, 0.0, 1.0, 2.0]);
        assert_eq!(c.mu_sq, [9.0, 5.0]);
        assert!(c.contains(8) && !c.contains(3));
        let mut t = Nc4Tally::default();
        for (y, lin, ncc) in [(5, 5, 5), (5, 8, 5), (8, 8, 8), (3, 5, 8)] {
            t.record(y, lin, ncc);
        }
        let want = |samples, agree, linear_correct, ncc_correct| Tally {
            samples,
            agree,
            linear_correct,
            ncc_correct,
        };
        assert_eq!(t.by_class[&5], want(2, 1, 1, 2));
        assert_eq!(t.by_class[&8], want(1, 1, 1, 1));
        assert_eq!(t.by_class[&3], want(1, 0, 0, 0));
        assert_eq!(t.by_class.keys().copied().collect::<Vec<_>>(), [3, 5, 8]);
        assert_eq!(t.total(), (4, 2));
        assert_eq!(t.agreement(), 0.5);
    }
}
