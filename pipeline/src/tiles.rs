//! Pairwise neural-collapse metrics over all class pairs, tile by tile,
//! without ever materialising the C x C matrix.
//!
//! The upper triangle of the pair matrix is cut into tiles of `edge x edge`
//! classes. For each tile one GEMM of centred means gives the Gram block
//! G = M_i M_j^T, from which every pairwise metric follows elementwise:
//!
//! - distance: ||mu_a - mu_b||^2 = G_aa + G_bb - 2 G_ab (CDNV)
//! - interference: <u_a, u_b> = G_ab / (||m_a|| ||m_b||)
//! - ||u_a - u_b||^2 = 2 - 2 <u_a, u_b> (log and Riesz kernels)
//!
//! Both subtractions cancel for nearly identical vectors, so a pair whose
//! difference is small against its terms (below `recompute_below`, relative)
//! is recomputed directly from the vectors in f64. Each tile is reduced on
//! the spot to (n, mean, M2, min, max, excluded) per metric and to per-class
//! row sums; tiles run in parallel with rayon. Memory is O(C d + edge^2) per
//! worker.
//!
//! Undefined values are excluded, counted, and never enter an aggregate:
//! identical means (CDNV infinite), a zero-norm centred mean (no direction),
//! identical directions (log and Riesz kernels infinite).

use rayon::prelude::*;

/// Which kernels to evaluate besides CDNV, interference and the Gram entries.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub edge: usize,
    /// CDNV exponent k in ||mu_a - mu_b||^(2+k).
    pub cdnv_k: f64,
    pub riesz_s: Option<f64>,
    /// GEMM in f32 (faster) instead of f64.
    pub f32_gemm: bool,
    /// Keep the K most extreme pairs per metric (0 = none).
    pub top_k: usize,
}

pub const METRICS: [&str; 5] = ["cdnv", "interference", "logkernel", "riesz", "gram"];
const CDNV: usize = 0;
const INTF: usize = 1;
const LOGK: usize = 2;
const RIESZ: usize = 3;
const GRAM: usize = 4;

/// Moments of a set of values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Moments {
    pub n: u64,
    pub mean: f64,
    pub m2: f64,
    pub min: f64,
    pub max: f64,
    pub excluded: u64,
}

impl Default for Moments {
    fn default() -> Self {
        Moments {
            n: 0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            excluded: 0,
        }
    }
}

impl Moments {
    /// Exact two-pass moments of `values` (NaN marks an excluded value).
    fn of(values: &[f64]) -> Moments {
        let mut m = Moments::default();
        let mut sum = 0.0;
        for &v in values {
            if v.is_nan() {
                m.excluded += 1;
                continue;
            }
            m.n += 1;
            sum += v;
            if v < m.min {
                m.min = v;
            }
            if v > m.max {
                m.max = v;
            }
        }
        if m.n > 0 {
            m.mean = sum / m.n as f64;
            let mut m2 = 0.0;
            for &v in values {
                // NaN compares false, so excluded values add nothing.
                let e = v - m.mean;
                if e == e {
                    m2 += e * e;
                }
            }
            m.m2 = m2;
        }
        m
    }

    /// Chan's combination of two sets of moments.
    pub fn combine(&self, o: &Moments) -> Moments {
        let n = self.n + o.n;
        let (mean, m2) = if n == 0 {
            (0.0, 0.0)
        } else {
            let delta = o.mean - self.mean;
            let (a, b) = (self.n as f64, o.n as f64);
            (
                self.mean + delta * b / n as f64,
                self.m2 + o.m2 + delta * delta * a * b / n as f64,
            )
        };
        Moments {
            n,
            mean,
            m2,
            min: self.min.min(o.min),
            max: self.max.max(o.max),
            excluded: self.excluded + o.excluded,
        }
    }

    /// Population standard deviation.
    pub fn std(&self) -> f64 {
        if self.n == 0 {
            f64::NAN
        } else {
            (self.m2 / self.n as f64).sqrt()
        }
    }
}

/// One reduced tile.
#[derive(Debug, Clone)]
pub struct TileResult {
    pub ti: usize,
    pub tj: usize,
    pub metrics: [Moments; 5],
}

/// Per-class sums over the pairs a class takes part in.
#[derive(Debug, Clone)]
pub struct RowSums {
    pub sum: [Vec<f64>; 4],
    pub n: [Vec<u64>; 4],
    pub excluded: Vec<u64>,
    /// Largest interference and the class index (in V' order) it is with.
    pub top: Vec<(f64, usize)>,
}

impl RowSums {
    fn new(c: usize) -> Self {
        RowSums {
            sum: std::array::from_fn(|_| vec![0.0; c]),
            n: std::array::from_fn(|_| vec![0; c]),
            excluded: vec![0; c],
            top: vec![(f64::NEG_INFINITY, usize::MAX); c],
        }
    }

    fn add(&mut self, o: &RowSums) {
        for k in 0..4 {
            for (a, b) in self.sum[k].iter_mut().zip(&o.sum[k]) {
                *a += b;
            }
            for (a, b) in self.n[k].iter_mut().zip(&o.n[k]) {
                *a += b;
            }
        }
        for (a, b) in self.excluded.iter_mut().zip(&o.excluded) {
            *a += b;
        }
        for (a, b) in self.top.iter_mut().zip(&o.top) {
            if better(*b, *a) {
                *a = *b;
            }
        }
    }

    /// Mean of metric `k` over the finite pairs of class `a`.
    pub fn mean(&self, k: usize, a: usize) -> Option<f64> {
        (self.n[k][a] > 0).then(|| self.sum[k][a] / self.n[k][a] as f64)
    }
}

/// Larger value wins; equal values go to the lower index.
fn better(x: (f64, usize), y: (f64, usize)) -> bool {
    x.0 > y.0 || (x.0 == y.0 && x.1 < y.1)
}

/// One extreme pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairValue {
    pub value: f64,
    pub a: usize,
    pub b: usize,
}

/// Everything `analyze` needs from the pairs.
pub struct PairReport {
    pub tiles: Vec<TileResult>,
    pub rows: RowSums,
    /// Per metric: K smallest and K largest pairs.
    pub extremes: Vec<(Vec<PairValue>, Vec<PairValue>)>,
    pub recomputed: u64,
}

/// Class data for the pair computation, in V' order.
pub struct Classes<'a> {
    /// Centred means m_c, C x d row-major.
    pub centred: &'a [f64],
    pub d: usize,
    /// sigma^2_c.
    pub var: &'a [f64],
}

/// Threshold below which a Gram-derived squared difference is recomputed
/// directly: in f64 the Gram form then still has at least ~6 significant
/// digits, in f32 ~2, and the direct recomputation gives full f64 precision.
fn recompute_below(f32_gemm: bool) -> f64 {
    if f32_gemm { 1e-2 } else { 1e-6 }
}

/// Insert `v` into the K most extreme values kept in `list` (smallest or
/// largest). Once the list is full its worst kept value sits at index 0, so
/// the common case, a value that does not qualify, costs one comparison.
fn keep_extremes(list: &mut Vec<PairValue>, v: PairValue, k: usize, largest: bool) {
    if k == 0 {
        return;
    }
    let beats = |x: f64, y: f64| if largest { x > y } else { x < y };
    let worst_to_front = |list: &mut Vec<PairValue>| {
        let mut w = 0;
        for i in 1..list.len() {
            if beats(list[w].value, list[i].value) {
                w = i;
            }
        }
        list.swap(0, w);
    };
    if list.len() < k {
        list.push(v);
        if list.len() == k {
            worst_to_front(list);
        }
        return;
    }
    if beats(v.value, list[0].value) {
        list[0] = v;
        worst_to_front(list);
    }
}

/// Compute every pairwise metric over classes `cls` (C = var.len()).
pub fn pairs(cls: &Classes, opt: &Options) -> PairReport {
    let c = cls.var.len();
    let d = cls.d;
    let edge = opt.edge.max(1);
    let nt = c.div_ceil(edge);
    let norm2: Vec<f64> = (0..c)
        .map(|a| cls.centred[a * d..(a + 1) * d].iter().map(|x| x * x).sum())
        .collect();
    let inv_norm: Vec<f64> = norm2
        .iter()
        .map(|&n| if n > 0.0 { 1.0 / n.sqrt() } else { 0.0 })
        .collect();
    let single: Vec<f32> = if opt.f32_gemm {
        cls.centred.iter().map(|&x| x as f32).collect()
    } else {
        Vec::new()
    };
    let tiles: Vec<(usize, usize)> = (0..nt).flat_map(|i| (i..nt).map(move |j| (i, j))).collect();
    let threshold = recompute_below(opt.f32_gemm);
    let half_power = (2.0 + opt.cdnv_k) / 2.0;
    let k_top = opt.top_k;

    type Acc = (
        Vec<TileResult>,
        RowSums,
        Vec<(Vec<PairValue>, Vec<PairValue>)>,
        u64,
    );
    let init = || -> Acc { (Vec::new(), RowSums::new(c), vec![(Vec::new(), Vec::new()); 5], 0) };
    let (mut results, rows, extremes, recomputed) = tiles
        .par_iter()
        .fold(init, |mut acc, &(ti, tj)| {
            let (r0, r1) = (ti * edge, ((ti + 1) * edge).min(c));
            let (s0, s1) = (tj * edge, ((tj + 1) * edge).min(c));
            let (m, n) = (r1 - r0, s1 - s0);
            let mut g = vec![0f64; m * n];
            gram_block(cls, &single, opt.f32_gemm, r0, m, s0, n, &mut g);
            let mut vals: [Vec<f64>; 5] = std::array::from_fn(|_| Vec::with_capacity(m * n));
            let rows = &mut acc.1;
            let riesz_s = opt.riesz_s;
            for (ia, a) in (r0..r1).enumerate() {
                let ma = &cls.centred[a * d..(a + 1) * d];
                let start = if ti == tj { a + 1 } else { s0 };
                // Row a's sums stay in registers for the whole row of the tile.
                let mut sum_a = [0f64; 4];
                let mut n_a = [0u64; 4];
                let mut excl_a = 0u64;
                let mut top_a = rows.top[a];
                let (n2a, inva, vara) = (norm2[a], inv_norm[a], cls.var[a]);
                for b in start..s1 {
                    let gab = g[ia * n + (b - s0)];
                    let (n2b, invb) = (norm2[b], inv_norm[b]);
                    // CDNV, from the Gram distance unless it cancelled.
                    let mut dist2 = n2a + n2b - 2.0 * gab;
                    if dist2 < threshold * (n2a + n2b) {
                        let mb = &cls.centred[b * d..(b + 1) * d];
                        dist2 = ma.iter().zip(mb).map(|(x, y)| (x - y) * (x - y)).sum();
                        acc.3 += 1;
                    }
                    let cdnv = if dist2 > 0.0 {
                        let denom = if half_power == 2.0 {
                            dist2 * dist2
                        } else if half_power == 1.0 {
                            dist2
                        } else {
                            dist2.powf(half_power)
                        };
                        (vara + cls.var[b]) / (2.0 * denom)
                    } else {
                        f64::NAN
                    };
                    // Directions, likewise recomputed when 2 - 2cos cancels.
                    let (intf, logk, riesz) = if n2a > 0.0 && n2b > 0.0 {
                        let mut cos = (gab * inva * invb).clamp(-1.0, 1.0);
                        let mut u2 = 2.0 - 2.0 * cos;
                        if u2 < threshold {
                            let mb = &cls.centred[b * d..(b + 1) * d];
                            u2 = ma
                                .iter()
                                .zip(mb)
                                .map(|(x, y)| {
                                    let e = x * inva - y * invb;
                                    e * e
                                })
                                .sum();
                            cos = 1.0 - u2 / 2.0;
                            acc.3 += 1;
                        }
                        if u2 > 0.0 {
                            (
                                cos,
                                -0.5 * u2.ln(),
                                riesz_s.map_or(f64::NAN, |s| u2.powf(-s / 2.0)),
                            )
                        } else {
                            (cos, f64::NAN, f64::NAN)
                        }
                    } else {
                        (f64::NAN, f64::NAN, f64::NAN)
                    };
                    let values = [cdnv, intf, logk, riesz];
                    let mut excluded = false;
                    for k in 0..4 {
                        let v = values[k];
                        if k == RIESZ && riesz_s.is_none() {
                            continue;
                        }
                        vals[k].push(v);
                        if v.is_nan() {
                            excluded = true;
                        } else {
                            sum_a[k] += v;
                            n_a[k] += 1;
                            rows.sum[k][b] += v;
                            rows.n[k][b] += 1;
                        }
                    }
                    vals[GRAM].push(gab);
                    if excluded {
                        excl_a += 1;
                        rows.excluded[b] += 1;
                    }
                    if !intf.is_nan() {
                        if better((intf, b), top_a) {
                            top_a = (intf, b);
                        }
                        if better((intf, a), rows.top[b]) {
                            rows.top[b] = (intf, a);
                        }
                    }
                    if k_top > 0 {
                        for (k, &v) in values.iter().chain(std::iter::once(&gab)).enumerate() {
                            if !v.is_nan() && (k != RIESZ || riesz_s.is_some()) {
                                let pv = PairValue { value: v, a, b };
                                keep_extremes(&mut acc.2[k].0, pv, k_top, false);
                                keep_extremes(&mut acc.2[k].1, pv, k_top, true);
                            }
                        }
                    }
                }
                for k in 0..4 {
                    rows.sum[k][a] += sum_a[k];
                    rows.n[k][a] += n_a[k];
                }
                rows.excluded[a] += excl_a;
                rows.top[a] = top_a;
            }
            let metrics = std::array::from_fn(|k| Moments::of(&vals[k]));
            acc.0.push(TileResult { ti, tj, metrics });
            acc
        })
        .reduce(init, |mut x, y| {
            x.0.extend(y.0);
            x.1.add(&y.1);
            for (k, (lo, hi)) in y.2.into_iter().enumerate() {
                for v in lo {
                    keep_extremes(&mut x.2[k].0, v, k_top, false);
                }
                for v in hi {
                    keep_extremes(&mut x.2[k].1, v, k_top, true);
                }
            }
            x.3 += y.3;
            x
        });
    results.sort_by_key(|t| (t.ti, t.tj));
    let mut extremes = extremes;
    for (lo, hi) in extremes.iter_mut() {
        lo.sort_by(|x, y| x.value.total_cmp(&y.value).then((x.a, x.b).cmp(&(y.a, y.b))));
        hi.sort_by(|x, y| y.value.total_cmp(&x.value).then((x.a, x.b).cmp(&(y.a, y.b))));
    }
    PairReport {
        tiles: results,
        rows,
        extremes,
        recomputed,
    }
}

/// G[r, s] = <m_{r0+r}, m_{s0+s}> for an m x n block.
#[allow(clippy::too_many_arguments)]
fn gram_block(
    cls: &Classes,
    single: &[f32],
    f32_gemm: bool,
    r0: usize,
    m: usize,
    s0: usize,
    n: usize,
    out: &mut [f64],
) {
    let d = cls.d;
    if f32_gemm {
        let mut g32 = vec![0f32; m * n];
        // SAFETY: the pointers cover m*d, n*d and m*n elements with the given
        // strides (row-major operands, rhs read transposed).
        unsafe {
            gemm::gemm(
                m,
                n,
                d,
                g32.as_mut_ptr(),
                1,
                n as isize,
                false,
                single.as_ptr().add(r0 * d),
                1,
                d as isize,
                single.as_ptr().add(s0 * d),
                d as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (o, x) in out.iter_mut().zip(g32) {
            *o = x as f64;
        }
    } else {
        // SAFETY: as above, in f64.
        unsafe {
            gemm::gemm(
                m,
                n,
                d,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                cls.centred.as_ptr().add(r0 * d),
                1,
                d as isize,
                cls.centred.as_ptr().add(s0 * d),
                d as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

/// Combine every tile of one metric (Rust-side counterpart of the SQL view).
pub fn combine(tiles: &[TileResult], metric: usize) -> Moments {
    tiles
        .iter()
        .fold(Moments::default(), |acc, t| acc.combine(&t.metrics[metric]))
}

pub const METRIC_CDNV: usize = CDNV;
pub const METRIC_INTERFERENCE: usize = INTF;
pub const METRIC_LOGKERNEL: usize = LOGK;
pub const METRIC_RIESZ: usize = RIESZ;
pub const METRIC_GRAM: usize = GRAM;
