//! Per-class embedding statistics: count, mean and M2 = sum ||h - mu||^2, in
//! f64, mergeable.
//!
//! Partial statistics (a batch, a shard, a checkpoint) combine with Chan's
//! formula, which is exact in real arithmetic and associative, so one pass
//! over the data in any order, split across any number of workers, gives the
//! statistics of the whole:
//!
//! ```text
//! n = n_a + n_b,  delta = mu_b - mu_a
//! mu = mu_a + delta * n_b / n
//! M2 = M2_a + M2_b + ||delta||^2 * n_a * n_b / n
//! ```
//!
//! A batch's own partial is two passes over each class's rows (the mean,
//! then squared distances to it: [`one_class_moments`]); [`cpu_moments`]
//! runs them for every class of a batch on all cores, and the pipeline's
//! device op runs the same arithmetic where the model ran.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Statistics of the classes seen so far, rows in first-seen order.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassStats {
    pub d: usize,
    /// class id -> row.
    index: HashMap<u32, usize>,
    pub classes: Vec<u32>,
    pub count: Vec<u64>,
    /// rows x d, row-major.
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

/// One batch reduced to its classes.
#[derive(Debug, Clone)]
pub struct Partial {
    pub classes: Vec<u32>,
    pub count: Vec<u64>,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

/// Chan's merge of a batch's (nb, mean mb, M2 m2b) into running
/// (count, mean, M2); an empty running row takes the batch's as they are.
fn chan_merge(mean: &mut [f64], m2: &mut f64, count: &mut u64, nb: u64, mb: &[f64], m2b: f64) {
    let na = *count;
    if na == 0 {
        mean.copy_from_slice(mb);
        *m2 = m2b;
        *count = nb;
        return;
    }
    let n = na + nb;
    let (fa, fb) = (na as f64, nb as f64);
    let w = fb / n as f64;
    let mut dd = 0.0;
    for (a, &b) in mean.iter_mut().zip(mb) {
        let delta = b - *a;
        dd += delta * delta;
        *a += delta * w;
    }
    *m2 += m2b + dd * fa * fb / n as f64;
    *count = n;
}

/// Every chosen row of a host batch lies within it, and has a label.
fn check_host_rows<T>(h: &[T], d: usize, rows: &[u32], labels: &[u32]) -> Result<()> {
    if rows.len() != labels.len() || rows.iter().any(|&r| (r as usize + 1) * d > h.len()) {
        return Err(Error::Invalid(format!(
            "{} rows for {} labels, or a row past the {} values given",
            rows.len(),
            labels.len(),
            h.len()
        )));
    }
    Ok(())
}

impl ClassStats {
    pub fn new(d: usize) -> Self {
        ClassStats {
            d,
            index: HashMap::new(),
            classes: Vec::new(),
            count: Vec::new(),
            mean: Vec::new(),
            m2: Vec::new(),
        }
    }

    /// Statistics from their rows: `classes[r]` has `count[r]` samples, mean
    /// `mean[r * d..(r + 1) * d]` and M2 `m2[r]`. Refused when the lengths
    /// disagree or a class appears twice.
    pub fn from_rows(
        d: usize,
        classes: Vec<u32>,
        count: Vec<u64>,
        mean: Vec<f64>,
        m2: Vec<f64>,
    ) -> Result<Self> {
        let n = classes.len();
        if count.len() != n || m2.len() != n || Some(mean.len()) != n.checked_mul(d) {
            return Err(Error::Invalid(format!(
                "{n} classes with {} counts, {} M2 and {} mean values of width {d}",
                count.len(),
                m2.len(),
                mean.len()
            )));
        }
        let mut index = HashMap::with_capacity(n);
        for (r, &class) in classes.iter().enumerate() {
            if index.insert(class, r).is_some() {
                return Err(Error::Invalid(format!("class {class} appears twice")));
            }
        }
        Ok(ClassStats {
            d,
            index,
            classes,
            count,
            mean,
            m2,
        })
    }

    pub fn len(&self) -> usize {
        self.classes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    pub fn samples(&self) -> u64 {
        self.count.iter().sum()
    }

    /// Rows of the analysed classes V' (min <= N_c, and N_c <= max unless
    /// max is 0), in ascending class id.
    pub fn analysed(&self, min: u64, max: u64) -> Vec<usize> {
        let mut rows: Vec<usize> = (0..self.len())
            .filter(|&r| self.count[r] >= min && (max == 0 || self.count[r] <= max))
            .collect();
        rows.sort_by_key(|&r| self.classes[r]);
        rows
    }

    pub fn row_of(&self, class: u32) -> Option<usize> {
        self.index.get(&class).copied()
    }

    pub fn mean_of(&self, row: usize) -> &[f64] {
        &self.mean[row * self.d..(row + 1) * self.d]
    }

    /// Chan-merge one class's partial (n_b, mu_b, M2_b).
    pub fn merge_one(&mut self, class: u32, nb: u64, mb: &[f64], m2b: f64) {
        if nb == 0 {
            return;
        }
        let d = self.d;
        match self.index.get(&class) {
            None => {
                self.index.insert(class, self.classes.len());
                self.classes.push(class);
                self.count.push(nb);
                self.mean.extend_from_slice(mb);
                self.m2.push(m2b);
            }
            Some(&r) => chan_merge(
                &mut self.mean[r * d..(r + 1) * d],
                &mut self.m2[r],
                &mut self.count[r],
                nb,
                mb,
                m2b,
            ),
        }
    }

    /// Merge one batch held in host memory: `h` holds rows of `d` values
    /// (row-major, read in place, converted by `to_f64`), and `labels[i]` is
    /// the class of row `rows[i]` (rows the caller skips are absent). The
    /// result equals collect's path (`batch_partial` + `merge_partial`) bit
    /// for bit, in one pass on all cores: each class of the batch is reduced
    /// (`one_class_moments`) and Chan-merged straight into its row, so no
    /// per-class partial of the batch is built, copied or merged on one
    /// thread.
    pub fn merge_host_batch<T: Copy + Sync>(
        &mut self,
        h: &[T],
        to_f64: impl Fn(T) -> f64 + Sync,
        rows: &[u32],
        labels: &[u32],
    ) -> Result<()> {
        let d = self.d;
        check_host_rows(h, d, rows, labels)?;
        let groups = LabelGroups::new(labels);
        // Each statistics row's group in the batch; new classes get rows.
        let mut group_of = vec![u32::MAX; self.len() + groups.classes.len()];
        for (g, &c) in groups.classes.iter().enumerate() {
            let r = match self.index.get(&c) {
                Some(&r) => r,
                None => {
                    self.index.insert(c, self.classes.len());
                    self.classes.push(c);
                    self.count.push(0);
                    self.m2.push(0.0);
                    self.classes.len() - 1
                }
            };
            group_of[r] = g as u32;
        }
        group_of.truncate(self.len());
        // New rows' pages are first touched on every core.
        let new_values = self.len() * d - self.mean.len();
        self.mean.par_extend(rayon::iter::repeat_n(0.0, new_values));
        // The batch's row ids, class by class.
        let order: Vec<u32> = groups.order.iter().map(|&i| rows[i as usize]).collect();
        let starts = &groups.starts;
        self.mean
            .par_chunks_mut(d)
            .zip(self.m2.par_iter_mut())
            .zip(self.count.par_iter_mut())
            .zip(group_of.par_iter())
            .for_each_init(
                || vec![0f64; 2 * d],
                |buf, (((mean, m2), count), &g)| {
                    if g == u32::MAX {
                        return;
                    }
                    let members = &order[starts[g as usize] as usize..starts[g as usize + 1] as usize];
                    let (mb, acc) = buf.split_at_mut(d);
                    let m2b = one_class_moments(h, &to_f64, members, mb, acc);
                    chan_merge(mean, m2, count, members.len() as u64, mb, m2b);
                },
            );
        Ok(())
    }

    pub fn merge_partial(&mut self, p: &Partial) {
        for (i, &c) in p.classes.iter().enumerate() {
            self.merge_one(c, p.count[i], &p.mean[i * self.d..(i + 1) * self.d], p.m2[i]);
        }
    }

    /// Merge another accumulator into this one.
    pub fn merge(&mut self, other: &ClassStats) -> Result<()> {
        if other.d != self.d {
            return Err(Error::Invalid(format!(
                "cannot merge statistics of width {} into {}",
                other.d, self.d
            )));
        }
        for (r, &c) in other.classes.iter().enumerate() {
            self.merge_one(c, other.count[r], other.mean_of(r), other.m2[r]);
        }
        Ok(())
    }

    /// Add squared distances to *fixed* means (second pass of two-pass mode).
    pub fn add_m2(&mut self, p: &Partial) {
        for (i, &c) in p.classes.iter().enumerate() {
            if let Some(&r) = self.index.get(&c) {
                self.m2[r] += p.m2[i];
            }
        }
    }
}

/// A batch's labels grouped by class: class `classes[s]` (in order of first
/// appearance) has `count[s]` rows, `order[starts[s]..starts[s + 1]]`.
pub struct LabelGroups {
    pub classes: Vec<u32>,
    pub count: Vec<u64>,
    pub order: Vec<u32>,
    pub starts: Vec<u32>,
}

impl LabelGroups {
    pub fn new(labels: &[u32]) -> Self {
        let mut slot: HashMap<u32, u32> = HashMap::new();
        let mut classes = Vec::new();
        let mut count: Vec<u64> = Vec::new();
        let idx: Vec<u32> = labels
            .iter()
            .map(|&y| {
                let s = *slot.entry(y).or_insert_with(|| {
                    classes.push(y);
                    count.push(0);
                    (classes.len() - 1) as u32
                });
                count[s as usize] += 1;
                s
            })
            .collect();
        let u = classes.len();
        let mut starts = vec![0u32; u + 1];
        for (s, &c) in count.iter().enumerate() {
            starts[s + 1] = starts[s] + c as u32;
        }
        let mut fill = starts[..u].to_vec();
        let mut order = vec![0u32; labels.len()];
        for (row, &s) in idx.iter().enumerate() {
            order[fill[s as usize] as usize] = row as u32;
            fill[s as usize] += 1;
        }
        LabelGroups {
            classes,
            count,
            order,
            starts,
        }
    }
}

/// Per-class mean and M2 of rows of `h` ([n, d] row-major, read in place,
/// converted by `f`): class `c` is rows `order[starts[c]..starts[c + 1]]`.
/// One output row of d means, then M2, per class; classes in parallel.
pub fn cpu_moments<T: Copy + Sync>(
    h: &[T],
    f: impl Fn(T) -> f64 + Sync,
    order: &[u32],
    starts: &[u32],
    d: usize,
) -> Vec<f64> {
    let u = starts.len() - 1;
    let mut out = vec![0f64; u * (d + 1)];
    out.par_chunks_mut(d + 1).enumerate().for_each_init(
        || vec![0f64; d],
        |acc, (c, o)| {
            let rows = &order[starts[c] as usize..starts[c + 1] as usize];
            let (mean, m2) = o.split_at_mut(d);
            m2[0] = one_class_moments(h, &f, rows, mean, acc);
        },
    );
    out
}

/// The mean (into `mean`) and M2 (returned) of the rows `rows` of `h`, two
/// passes in f64: sums, then squared distances to the mean, per coordinate
/// in `acc`. `mean` and `acc` are `d` wide and overwritten.
pub fn one_class_moments<T: Copy>(
    h: &[T],
    f: impl Fn(T) -> f64,
    rows: &[u32],
    mean: &mut [f64],
    acc: &mut [f64],
) -> f64 {
    let d = mean.len();
    let row = |r: u32| &h[r as usize * d..(r as usize + 1) * d];
    mean.fill(0.0);
    acc.fill(0.0);
    for &r in rows {
        for (m, &x) in mean.iter_mut().zip(row(r)) {
            *m += f(x);
        }
    }
    let n = rows.len() as f64;
    mean.iter_mut().for_each(|m| *m /= n);
    for &r in rows {
        for ((a, &m), &x) in acc.iter_mut().zip(mean.iter()).zip(row(r)) {
            let e = f(x) - m;
            *a += e * e;
        }
    }
    acc.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch's partial as the pipeline's CPU op computes it: the chosen
    /// rows of `h` grouped by label, then [`cpu_moments`].
    fn host_partial<T: Copy + Sync + Into<f64>>(h: &[T], d: usize, rows: &[u32], labels: &[u32]) -> Partial {
        let g = LabelGroups::new(labels);
        let order: Vec<u32> = g.order.iter().map(|&i| rows[i as usize]).collect();
        let both = cpu_moments(h, |x| x.into(), &order, &g.starts, d);
        Partial {
            classes: g.classes,
            count: g.count,
            mean: both.chunks(d + 1).flat_map(|r| r[..d].to_vec()).collect(),
            m2: both.chunks(d + 1).map(|r| r[d]).collect(),
        }
    }

    #[test]
    fn label_groups_list_each_class_s_rows_in_order() {
        let g = LabelGroups::new(&[7, 3, 7, 7, 0, 3]);
        assert_eq!(g.classes, [7, 3, 0]);
        assert_eq!(g.count, [3, 2, 1]);
        assert_eq!(g.starts, [0, 3, 5, 6]);
        assert_eq!(g.order, [0, 2, 3, 1, 5, 4]);
    }

    #[test]
    fn rows_that_do_not_fit_together_are_refused() {
        let ok = ClassStats::from_rows(2, vec![5, 1], vec![2, 1], vec![0.0; 4], vec![1.0, 0.0]).unwrap();
        assert_eq!(
            (ok.row_of(1), ok.row_of(5), ok.row_of(2)),
            (Some(1), Some(0), None)
        );
        let twice = ClassStats::from_rows(2, vec![5, 5], vec![2, 1], vec![0.0; 4], vec![1.0, 0.0]);
        assert_eq!(twice.unwrap_err().to_string(), "class 5 appears twice");
        assert!(ClassStats::from_rows(2, vec![5], vec![2], vec![0.0; 3], vec![1.0]).is_err());
        assert!(ClassStats::from_rows(2, vec![5], vec![], vec![0.0; 2], vec![1.0]).is_err());
        let mut wide = ClassStats::new(3);
        assert!(wide.merge(&ok).is_err());
    }

    #[test]
    fn fused_host_merges_equal_partials_merged_bit_for_bit() {
        // Zipf-like labels over batches of uneven size, into statistics that
        // already hold some classes: the fused pass and the per-batch path
        // (a partial from cpu_moments, which the pipeline's CPU op runs, then
        // merge_partial) agree exactly, and both match the brute force.
        let d = 5;
        let n = 700;
        let h: Vec<f32> = (0..n * d)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0)
            .collect();
        let labels: Vec<u32> = (0..n as u32).map(|i| (i * i) % 61 % (1 + i % 13)).collect();
        let (mut fused, mut split) = (ClassStats::new(d), ClassStats::new(d));
        let mut samples = Vec::new();
        let mut start = 0usize;
        for size in [1usize, 40, 3, 250, 6, 400] {
            let end = (start + size).min(n);
            // Every third row is skipped, as ignore_index rows are.
            let rows: Vec<u32> = (start as u32..end as u32).filter(|r| r % 3 != 1).collect();
            let ls: Vec<u32> = rows.iter().map(|&r| labels[r as usize]).collect();
            fused.merge_host_batch(&h, |x| x as f64, &rows, &ls).unwrap();
            split.merge_partial(&host_partial(&h, d, &rows, &ls));
            for (&r, &c) in rows.iter().zip(&ls) {
                let x = h[r as usize * d..(r as usize + 1) * d]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                samples.push((c, x));
            }
            start = end;
        }
        assert_eq!(fused.classes, split.classes);
        assert_eq!(fused.count, split.count);
        assert_eq!(fused.mean, split.mean);
        assert_eq!(fused.m2, split.m2);
        for (c, (count, mu, m2)) in brute(&samples) {
            let r = fused.classes.iter().position(|&x| x == c).unwrap();
            assert_eq!(fused.count[r], count);
            for (a, b) in fused.mean_of(r).iter().zip(&mu) {
                assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "class {c}: {a} vs {b}");
            }
            assert!(
                (fused.m2[r] - m2).abs() <= 1e-10 * (1.0 + m2),
                "class {c}: {} vs {m2}",
                fused.m2[r]
            );
        }
        assert!(
            fused
                .merge_host_batch(&h, |x| x as f64, &[n as u32], &[0])
                .is_err()
        );
    }

    fn brute(samples: &[(u32, Vec<f64>)]) -> HashMap<u32, (u64, Vec<f64>, f64)> {
        let mut by: HashMap<u32, Vec<&Vec<f64>>> = HashMap::new();
        for (c, h) in samples {
            by.entry(*c).or_default().push(h);
        }
        by.into_iter()
            .map(|(c, hs)| {
                let d = hs[0].len();
                let n = hs.len() as f64;
                let mu: Vec<f64> = (0..d).map(|j| hs.iter().map(|h| h[j]).sum::<f64>() / n).collect();
                let m2: f64 = hs
                    .iter()
                    .map(|h| h.iter().zip(&mu).map(|(a, b)| (a - b).powi(2)).sum::<f64>())
                    .sum();
                (c, (hs.len() as u64, mu, m2))
            })
            .collect()
    }

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    /// Batches merged with Chan's formula equal the brute-force statistics
    /// of all samples (tolerance 1e-12 relative: a few f64 roundings).
    #[test]
    fn batched_chan_merge_equals_brute_force() {
        let d = 5;
        let mut seed = 7u64;
        let samples: Vec<(u32, Vec<f64>)> = (0..997)
            .map(|i| {
                (
                    (i * 31 % 13) as u32,
                    (0..d).map(|_| 10.0 + lcg(&mut seed)).collect(),
                )
            })
            .collect();
        let mut acc = ClassStats::new(d);
        for batch in samples.chunks(100) {
            let flat: Vec<f64> = batch.iter().flat_map(|s| s.1.clone()).collect();
            let labels: Vec<u32> = batch.iter().map(|s| s.0).collect();
            let rows: Vec<u32> = (0..batch.len() as u32).collect();
            acc.merge_partial(&host_partial(&flat, d, &rows, &labels));
        }
        let want = brute(&samples);
        assert_eq!(acc.len(), want.len());
        for (c, (n, mu, m2)) in want {
            let r = acc.row_of(c).unwrap();
            assert_eq!(acc.count[r], n);
            for (a, b) in acc.mean_of(r).iter().zip(&mu) {
                assert!((a - b).abs() <= 1e-12 * b.abs(), "{a} {b}");
            }
            assert!((acc.m2[r] - m2).abs() <= 1e-12 * m2, "{} {m2}", acc.m2[r]);
        }
        // Merging in another grouping and order gives the same numbers.
        let mut halves = [ClassStats::new(d), ClassStats::new(d)];
        for (i, s) in samples.iter().enumerate().rev() {
            halves[i % 2].merge_one(s.0, 1, &s.1, 0.0);
        }
        let [mut a, b] = halves;
        a.merge(&b).unwrap();
        for (r, &c) in acc.classes.iter().enumerate() {
            let r2 = a.row_of(c).unwrap();
            assert_eq!(a.count[r2], acc.count[r]);
            assert!((a.m2[r2] - acc.m2[r]).abs() <= 1e-11 * acc.m2[r]);
        }
    }
}
