//! Aggregate functions for cross-model statistics, registered with every
//! session, so the tests of significance stay in SQL and cost O(rows) memory:
//!
//! - `perm_pvalue(x, y, n, seed)`: permutation test of R^2 = corr(x, y)^2.
//!   p = (1 + #{R^2_perm >= R^2_obs}) / (1 + n) over `n` seeded permutations
//!   of y against x;
//! - `spearman(x, y)`: Spearman's rank correlation (average ranks for ties);
//! - `r2_bootstrap(x, y, n, seed, q)`: the q-quantile of R^2 over `n` seeded
//!   bootstrap resamples of the (x, y) pairs (a percentile interval comes
//!   from q = 0.025 and q = 0.975 with the same seed, i.e. the same resamples).
//!
//! Rows where x or y is NULL or NaN are left out; fewer than 3 pairs, or a
//! constant x or y, give NULL. The pairs are put in a canonical order (by x,
//! then y) before any random draw, so a seed gives the same answer whatever
//! order the rows arrive in, on every platform: the generator is our own
//! xoshiro256** seeded through SplitMix64, and shuffles are Fisher-Yates with
//! Lemire's unbiased bounded draws.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::{Accumulator, Volatility, create_udaf};

/// xoshiro256** (Blackman & Vigna), seeded with SplitMix64.
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in 0..bound (Lemire's method, unbiased).
    pub fn below(&mut self, bound: u64) -> u64 {
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let m = (self.next_u64() as u128) * (bound as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// Pairs in canonical order (by x, then y).
fn canonical(xs: &[f64], ys: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut pairs: Vec<(f64, f64)> = xs
        .iter()
        .zip(ys)
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .map(|(&x, &y)| (x, y))
        .collect();
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    pairs.into_iter().unzip()
}

/// Centred and scaled copies (unit population variance), or `None` when
/// the values are constant.
fn standardise(v: &[f64]) -> Option<Vec<f64>> {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (var > 0.0).then(|| {
        let sd = var.sqrt();
        v.iter().map(|x| (x - mean) / sd).collect()
    })
}

/// R^2 of standardised vectors: (mean of products)^2.
fn r2_std(x: &[f64], y: &[f64]) -> f64 {
    let r = x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>() / x.len() as f64;
    r * r
}

/// R^2 = corr(x, y)^2; `None` for fewer than 3 pairs or a constant side.
pub fn r2(xs: &[f64], ys: &[f64]) -> Option<f64> {
    let (x, y) = canonical(xs, ys);
    if x.len() < 3 {
        return None;
    }
    Some(r2_std(&standardise(&x)?, &standardise(&y)?))
}

/// The permutation test's p-value (see the module documentation). Ties
/// with the observed R^2 count as reaching it (relative tolerance 1e-12).
pub fn perm_pvalue(xs: &[f64], ys: &[f64], n: u64, seed: u64) -> Option<f64> {
    let (x, y) = canonical(xs, ys);
    if x.len() < 3 || n == 0 {
        return None;
    }
    let (x, mut y) = (standardise(&x)?, standardise(&y)?);
    let observed = r2_std(&x, &y);
    let bar = observed - 1e-12 * observed.abs();
    let mut rng = Rng::new(seed);
    let k = y.len();
    let mut hits = 0u64;
    for _ in 0..n {
        for i in (1..k).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            y.swap(i, j);
        }
        if r2_std(&x, &y) >= bar {
            hits += 1;
        }
    }
    Some((1 + hits) as f64 / (1 + n) as f64)
}

/// Ranks 1..n, ties given their average rank.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &o in &order[i..=j] {
            out[o] = avg;
        }
        i = j + 1;
    }
    out
}

/// Spearman's rank correlation.
pub fn spearman(xs: &[f64], ys: &[f64]) -> Option<f64> {
    let (x, y) = canonical(xs, ys);
    if x.len() < 3 {
        return None;
    }
    let (rx, ry) = (standardise(&ranks(&x))?, standardise(&ranks(&y))?);
    Some(rx.iter().zip(&ry).map(|(a, b)| a * b).sum::<f64>() / rx.len() as f64)
}

/// The q-quantile (linear interpolation) of R^2 over `n` bootstrap
/// resamples; resamples with a constant side are skipped.
pub fn r2_bootstrap(xs: &[f64], ys: &[f64], n: u64, seed: u64, q: f64) -> Option<f64> {
    let (x, y) = canonical(xs, ys);
    let k = x.len();
    if k < 3 || n == 0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let mut rng = Rng::new(seed);
    let mut values = Vec::with_capacity(n as usize);
    let (mut bx, mut by) = (vec![0.0; k], vec![0.0; k]);
    for _ in 0..n {
        for i in 0..k {
            let j = rng.below(k as u64) as usize;
            bx[i] = x[j];
            by[i] = y[j];
        }
        if let (Some(sx), Some(sy)) = (standardise(&bx), standardise(&by)) {
            values.push(r2_std(&sx, &sy));
        }
    }
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let pos = q * (values.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(values[lo] + (values[hi] - values[lo]) * (pos - lo as f64))
}

/// Which statistic an accumulator computes at the end.
#[derive(Debug, Clone, Copy)]
enum Kind {
    PermPvalue,
    Spearman,
    Bootstrap,
}

/// Collects the (x, y) pairs of a group and the constant arguments.
#[derive(Debug)]
struct PairsAccumulator {
    kind: Kind,
    xs: Vec<f64>,
    ys: Vec<f64>,
    n: Option<i64>,
    seed: Option<i64>,
    q: Option<f64>,
}

fn first_i64(a: &ArrayRef) -> Option<i64> {
    let a = a.as_primitive_opt::<Int64Type>()?;
    (0..a.len()).find(|&i| a.is_valid(i)).map(|i| a.value(i))
}

fn first_f64(a: &ArrayRef) -> Option<f64> {
    let a = a.as_primitive_opt::<Float64Type>()?;
    (0..a.len()).find(|&i| a.is_valid(i)).map(|i| a.value(i))
}

fn push_pairs(xs: &mut Vec<f64>, ys: &mut Vec<f64>, x: &ArrayRef, y: &ArrayRef) -> Result<()> {
    let (x, y) = (
        x.as_primitive_opt::<Float64Type>()
            .ok_or_else(|| DataFusionError::Plan("x must be DOUBLE".into()))?,
        y.as_primitive_opt::<Float64Type>()
            .ok_or_else(|| DataFusionError::Plan("y must be DOUBLE".into()))?,
    );
    for i in 0..x.len() {
        if x.is_valid(i) && y.is_valid(i) {
            xs.push(x.value(i));
            ys.push(y.value(i));
        }
    }
    Ok(())
}

impl Accumulator for PairsAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        push_pairs(&mut self.xs, &mut self.ys, &values[0], &values[1])?;
        if values.len() > 2 {
            self.n = self.n.or(first_i64(&values[2]));
            self.seed = self.seed.or(first_i64(&values[3]));
        }
        if values.len() > 4 {
            self.q = self.q.or(first_f64(&values[4]));
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let arg = |v: Option<i64>, what: &str| -> Result<u64> {
            match v {
                Some(x) if x >= 0 => Ok(x as u64),
                None => Ok(0),
                Some(x) => Err(DataFusionError::Plan(format!("{what} must be >= 0, not {x}"))),
            }
        };
        let out = match self.kind {
            Kind::PermPvalue => perm_pvalue(&self.xs, &self.ys, arg(self.n, "n")?, arg(self.seed, "seed")?),
            Kind::Spearman => spearman(&self.xs, &self.ys),
            Kind::Bootstrap => r2_bootstrap(
                &self.xs,
                &self.ys,
                arg(self.n, "n")?,
                arg(self.seed, "seed")?,
                self.q.unwrap_or(f64::NAN),
            ),
        };
        Ok(ScalarValue::Float64(out))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + 8 * (self.xs.capacity() + self.ys.capacity())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let list = |v: &[f64]| {
            let values: Vec<ScalarValue> = v.iter().map(|&x| ScalarValue::Float64(Some(x))).collect();
            ScalarValue::List(ScalarValue::new_list_nullable(&values, &DataType::Float64))
        };
        let mut out = vec![list(&self.xs), list(&self.ys)];
        if matches!(self.kind, Kind::PermPvalue | Kind::Bootstrap) {
            out.push(ScalarValue::Int64(self.n));
            out.push(ScalarValue::Int64(self.seed));
        }
        if matches!(self.kind, Kind::Bootstrap) {
            out.push(ScalarValue::Float64(self.q));
        }
        Ok(out)
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let (lx, ly) = (states[0].as_list::<i32>(), states[1].as_list::<i32>());
        for i in 0..lx.len() {
            if lx.is_valid(i) && ly.is_valid(i) {
                push_pairs(&mut self.xs, &mut self.ys, &lx.value(i), &ly.value(i))?;
            }
        }
        if states.len() > 2 {
            self.n = self.n.or(first_i64(&states[2]));
            self.seed = self.seed.or(first_i64(&states[3]));
        }
        if states.len() > 4 {
            self.q = self.q.or(first_f64(&states[4]));
        }
        Ok(())
    }
}

pub fn register(ctx: &SessionContext) {
    let list = DataType::List(Arc::new(arrow::datatypes::Field::new(
        "item",
        DataType::Float64,
        true,
    )));
    let f = DataType::Float64;
    let i = DataType::Int64;
    let make = |kind: Kind| -> datafusion::logical_expr::function::AccumulatorFactoryFunction {
        Arc::new(move |_| {
            Ok(Box::new(PairsAccumulator {
                kind,
                xs: Vec::new(),
                ys: Vec::new(),
                n: None,
                seed: None,
                q: None,
            }))
        })
    };
    ctx.register_udaf(create_udaf(
        "perm_pvalue",
        vec![f.clone(), f.clone(), i.clone(), i.clone()],
        Arc::new(f.clone()),
        Volatility::Immutable,
        make(Kind::PermPvalue),
        Arc::new(vec![list.clone(), list.clone(), i.clone(), i.clone()]),
    ));
    ctx.register_udaf(create_udaf(
        "spearman",
        vec![f.clone(), f.clone()],
        Arc::new(f.clone()),
        Volatility::Immutable,
        make(Kind::Spearman),
        Arc::new(vec![list.clone(), list.clone()]),
    ));
    ctx.register_udaf(create_udaf(
        "r2_bootstrap",
        vec![f.clone(), f.clone(), i.clone(), i.clone(), f.clone()],
        Arc::new(f.clone()),
        Volatility::Immutable,
        make(Kind::Bootstrap),
        Arc::new(vec![list.clone(), list, i.clone(), i, f]),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_perfect_correlation_beats_every_permutation() {
        let x: Vec<f64> = (0..20).map(f64::from).collect();
        let y: Vec<f64> = x.iter().map(|v| 3.0 * v - 1.0).collect();
        assert_eq!(perm_pvalue(&x, &y, 999, 4), Some(1.0 / 1000.0));
        assert!((r2(&x, &y).unwrap() - 1.0).abs() < 1e-12);
        assert!((spearman(&x, &y).unwrap() - 1.0).abs() < 1e-12);
        // A monotone but non-linear relation: rho = 1, R^2 < 1.
        let cube: Vec<f64> = x.iter().map(|v| v.powi(3)).collect();
        assert!((spearman(&x, &cube).unwrap() - 1.0).abs() < 1e-12);
        assert!(r2(&x, &cube).unwrap() < 0.95);
    }

    #[test]
    fn answers_do_not_depend_on_row_order() {
        let x = [0.3, 1.2, -0.5, 2.2, 0.9, 1.7, -1.1];
        let y = [1.0, 2.1, 0.2, 2.0, 0.7, 2.5, -0.3];
        let (mut xr, mut yr) = (x.to_vec(), y.to_vec());
        xr.reverse();
        yr.reverse();
        assert_eq!(perm_pvalue(&x, &y, 500, 9), perm_pvalue(&xr, &yr, 500, 9));
        assert_eq!(
            r2_bootstrap(&x, &y, 300, 2, 0.025),
            r2_bootstrap(&xr, &yr, 300, 2, 0.025)
        );
        assert_ne!(perm_pvalue(&x, &y, 500, 9), perm_pvalue(&x, &y, 500, 10));
    }

    #[test]
    fn ties_get_average_ranks() {
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
    }

    #[test]
    fn bounded_draws_are_uniform() {
        let mut r = Rng::new(1);
        let mut counts = [0u32; 7];
        for _ in 0..70_000 {
            counts[r.below(7) as usize] += 1;
        }
        // 10,000 expected per value; 5 sigma is about 480.
        assert!(
            counts.iter().all(|&c| (c as i64 - 10_000).abs() < 480),
            "{counts:?}"
        );
    }
}
