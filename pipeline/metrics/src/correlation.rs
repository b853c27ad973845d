//! Statistics that relate one metric to another across models:
//!
//! - [`r2`]: R^2 = corr(x, y)^2;
//! - [`least_squares`]: the line y = slope x + intercept of least squares;
//! - [`perm_pvalue`]: permutation test of R^2. p = (1 + #{R^2_perm >=
//!   R^2_obs}) / (1 + n) over `n` seeded permutations of y against x;
//! - [`spearman`]: Spearman's rank correlation (average ranks for ties);
//! - [`r2_bootstrap`]: the q-quantile of R^2 over `n` seeded bootstrap
//!   resamples of the (x, y) pairs (a percentile interval comes from
//!   q = 0.025 and q = 0.975 with the same seed, i.e. the same resamples).
//!
//! Pairs where x or y is not finite are left out; fewer than 3 pairs, or a
//! constant x or y, give `None`. The pairs are put in a canonical order (by
//! x, then y) before any random draw, so a seed gives the same answer
//! whatever order the pairs arrive in, on every platform: the generator is
//! our own xoshiro256** seeded through SplitMix64 ([`Rng`]), and shuffles
//! are Fisher-Yates with Lemire's unbiased bounded draws.

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

/// The least-squares line through the pairs, `(slope, intercept)`; `None`
/// for fewer than 3 pairs or a constant x. Centred sums, in f64.
pub fn least_squares(xs: &[f64], ys: &[f64]) -> Option<(f64, f64)> {
    let (x, y) = canonical(xs, ys);
    if x.len() < 3 {
        return None;
    }
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let sxx: f64 = x.iter().map(|a| (a - mx) * (a - mx)).sum();
    let sxy: f64 = x.iter().zip(&y).map(|(a, b)| (a - mx) * (b - my)).sum();
    (sxx > 0.0).then(|| {
        let slope = sxy / sxx;
        (slope, my - slope * mx)
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-worked: (0, 1), (1, 2), (2, 2), (3, 4): x̄ = 1.5, ȳ = 2.25,
    /// Sxx = 5, Sxy = 4.5, so slope 0.9 and intercept 2.25 - 1.35 = 0.9;
    /// R² = Sxy² / (Sxx Syy) = 20.25 / (5 * 4.75).
    #[test]
    fn least_squares_by_hand() {
        let (xs, ys) = ([0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 2.0, 4.0]);
        let (slope, intercept) = least_squares(&xs, &ys).unwrap();
        assert!((slope - 0.9).abs() < 1e-15 && (intercept - 0.9).abs() < 1e-15);
        assert!((r2(&xs, &ys).unwrap() - 20.25 / 23.75).abs() < 1e-15);
        assert_eq!(least_squares(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
        assert_eq!(least_squares(&[1.0, f64::NAN, 2.0], &[1.0, 2.0, 3.0]), None);
    }

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

    #[test]
    fn a_hand_worked_case() {
        // Centred x = (-1.5, -0.5, 0.5, 1.5), y = (-1.5, 0.5, -0.5, 1.5):
        // sum xy = 4, sum x^2 = sum y^2 = 5, so r = 0.8; the values are
        // their own ranks, so rho = 0.8 too.
        let (x, y) = ([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]);
        assert!((r2(&x, &y).unwrap() - 0.64).abs() < 1e-12);
        assert!((spearman(&x, &y).unwrap() - 0.8).abs() < 1e-12);
        // Non-finite pairs are left out; too few pairs or a constant side
        // give no answer.
        assert!(
            (r2(&[1.0, f64::NAN, 2.0, 3.0, 4.0], &[1.0, 9.0, 3.0, 2.0, 4.0]).unwrap() - 0.64).abs() < 1e-12
        );
        assert_eq!(r2(&[1.0, 2.0], &[2.0, 1.0]), None);
        assert_eq!(spearman(&x, &[2.0; 4]), None);
    }

    /// The permutation p-value converges to the exact one, counted over all
    /// 5! orders of y: 20,000 draws put it within 4 standard errors.
    #[test]
    fn the_permutation_p_value_approaches_the_exact_one() {
        let x = [0.0, 1.0, 2.0, 3.0, 4.0];
        let y = [0.5, 2.0, 1.0, 4.0, 3.5];
        let observed = r2(&x, &y).unwrap();
        let mut hits = 0;
        let mut perm = [0usize, 1, 2, 3, 4];
        // Heap's algorithm over the 120 permutations.
        let mut c = [0usize; 5];
        let mut visit = |p: &[usize; 5]| {
            let yp: Vec<f64> = p.iter().map(|&i| y[i]).collect();
            if r2(&x, &yp).unwrap() >= observed - 1e-12 {
                hits += 1;
            }
        };
        visit(&perm);
        let mut i = 0;
        while i < 5 {
            if c[i] < i {
                perm.swap(if i % 2 == 0 { 0 } else { c[i] }, i);
                visit(&perm);
                c[i] += 1;
                i = 0;
            } else {
                c[i] = 0;
                i += 1;
            }
        }
        let exact = hits as f64 / 120.0;
        let n = 20_000;
        let got = perm_pvalue(&x, &y, n, 3).unwrap();
        let se = (exact * (1.0 - exact) / n as f64).sqrt();
        assert!(
            (got - exact).abs() < 4.0 * se + 1.0 / n as f64,
            "{got} vs exact {exact}"
        );
    }
}
