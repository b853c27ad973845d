//! V', the classes analysed, and their class means centred on the
//! unweighted global mean: the common ground of NC1-NC3 ([`crate::tiles`])
//! and the class-wise metrics ([`crate::per_class`]).
//!
//! V' holds the classes with `min <= N_c` (and `N_c <= max` unless `max` is
//! 0), in ascending class id. With mu_c the class means of V' and C = |V'|,
//! mu_bar = (1 / C) sum_c mu_c, and the centred means are mu_c - mu_bar.
//! sigma^2_c = M2_c / N_c is the class's within-class variance (the trace of
//! its covariance, population normalisation).

use rayon::prelude::*;

use crate::class_stats::ClassStats;

/// The centred means of V' and everything derived from class statistics.
pub struct Prepared {
    /// Rows of V' in the class statistics, ascending class id.
    pub rows: Vec<usize>,
    pub centred: Vec<f64>,
    pub var: Vec<f64>,
    /// mu_bar, the unweighted mean of the class means of V'.
    pub mean_bar: Vec<f64>,
}

/// Centre the means of V'. The means move out of `stats` (its `mean` is
/// left empty) and are centred where they lie: at full scale they are a
/// quarter of a gigabyte, and a second copy costs as much time in fresh
/// pages as a third of the pair tiles' work. V' rows come in class-id order,
/// which is the order the tables are written in, so the rows only move down
/// (or not at all); any other order takes one copy.
pub fn prepare(stats: &mut ClassStats, min: u64, max: u64) -> Prepared {
    let rows = stats.analysed(min, max);
    let d = stats.d;
    let mut means = std::mem::take(&mut stats.mean);
    let mut mean_bar = vec![0f64; d];
    for &r in &rows {
        for (a, x) in mean_bar.iter_mut().zip(&means[r * d..(r + 1) * d]) {
            *a += x;
        }
    }
    let c = rows.len().max(1) as f64;
    mean_bar.iter_mut().for_each(|x| *x /= c);
    let mut centred = if rows.windows(2).all(|w| w[0] < w[1]) {
        for (k, &r) in rows.iter().enumerate() {
            if k != r {
                means.copy_within(r * d..(r + 1) * d, k * d);
            }
        }
        means.truncate(rows.len() * d);
        means
    } else {
        let mut out = Vec::with_capacity(rows.len() * d);
        for &r in &rows {
            out.extend_from_slice(&means[r * d..(r + 1) * d]);
        }
        out
    };
    centred.par_chunks_mut(d.max(1) * 64).for_each(|block| {
        for row in block.chunks_mut(d.max(1)) {
            for (x, m) in row.iter_mut().zip(&mean_bar) {
                *x -= m;
            }
        }
    });
    let var = rows
        .iter()
        .map(|&r| stats.m2[r] / stats.count[r] as f64)
        .collect();
    Prepared {
        rows,
        centred,
        var,
        mean_bar,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v_prime_is_filtered_sorted_and_centred() {
        // Classes seen in the order 9, 2, 5, 7 with 3, 1, 2 and 5 samples.
        let mut st = ClassStats::new(2);
        st.merge_one(9, 3, &[4.0, 0.0], 6.0);
        st.merge_one(2, 1, &[100.0, 100.0], 0.0);
        st.merge_one(5, 2, &[0.0, 2.0], 1.0);
        st.merge_one(7, 5, &[-1.0, 1.0], 10.0);
        // min 2, max 4: V' = {5, 9} in id order; mu_bar = (2, 1).
        let p = prepare(&mut st.clone(), 2, 4);
        assert_eq!(p.rows, [2, 0]);
        assert_eq!(p.mean_bar, [2.0, 1.0]);
        assert_eq!(p.centred, [-2.0, 1.0, 2.0, -1.0]);
        assert_eq!(p.var, [0.5, 2.0]);
        // max 0 is no limit: V' = {5, 7, 9}, mu_bar = (1, 1).
        let p = prepare(&mut st, 2, 0);
        assert_eq!(p.rows, [2, 3, 0]);
        assert_eq!(p.mean_bar, [1.0, 1.0]);
        assert_eq!(p.centred, [-1.0, 1.0, -2.0, 0.0, 3.0, -1.0]);
        assert_eq!(p.var, [0.5, 2.0, 2.0]);
        assert!(st.mean.is_empty(), "the means move out of the statistics");
        // Rows already in id order are centred in place; a class left out
        // (id 2, one sample) moves the later rows down.
        let mut asc = ClassStats::new(1);
        for (class, n, mean) in [(1, 2, 1.0), (2, 1, 50.0), (3, 2, 5.0), (4, 2, 9.0)] {
            asc.merge_one(class, n, &[mean], 0.0);
        }
        let p = prepare(&mut asc, 2, 0);
        assert_eq!(
            (p.rows, p.mean_bar, p.centred),
            (vec![0, 2, 3], vec![5.0], vec![-4.0, 0.0, 4.0])
        );
    }
}
