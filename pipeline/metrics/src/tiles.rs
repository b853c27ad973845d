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
//! The same kernels on the uncentred means mu_c = m_c + mu_bar (the
//! convention of the paper authors' published numbers, `*_uncentred`) come
//! from the same product: <mu_a, mu_b> = G_ab + <m_a, mu_bar> + <m_b,
//! mu_bar> + ||mu_bar||^2, i.e. the centred Gram plus rank-one corrections
//! whose per-class dot products are computed once in f64. The centred
//! metrics keep the full precision of the centred product (no subtraction
//! of a large mean ever enters them), and uncentred pairs whose directions
//! nearly coincide are recomputed from the vectors like centred ones.
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
use std::sync::atomic::{AtomicUsize, Ordering};

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

pub const METRICS: [&str; 7] = [
    "cdnv",
    "interference",
    "logkernel",
    "riesz",
    "gram",
    "logkernel_uncentred",
    "riesz_uncentred",
];
const CDNV: usize = 0;
const INTF: usize = 1;
const LOGK: usize = 2;
const RIESZ: usize = 3;
const GRAM: usize = 4;
const LOGK_UNC: usize = 5;
const RIESZ_UNC: usize = 6;
const N_METRICS: usize = METRICS.len();

/// Whether metric `k` is computed under these options.
fn active(k: usize, riesz: bool) -> bool {
    riesz || (k != RIESZ && k != RIESZ_UNC)
}

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
    pub metrics: [Moments; N_METRICS],
}

/// Metrics with per-class row sums: cdnv, interference, logkernel, riesz.
const ROW_METRICS: usize = 4;

/// Per-class sums over the pairs a class takes part in.
#[derive(Debug, Clone)]
pub struct RowSums {
    pub sum: [Vec<f64>; ROW_METRICS],
    /// Defined (non-NaN) values per class; filled by [`pairs`] from
    /// `undefined` (each class is in C - 1 pairs), so the tiles count only
    /// the rare undefined ones.
    pub n: [Vec<u64>; ROW_METRICS],
    undefined: [Vec<u64>; ROW_METRICS],
    pub excluded: Vec<u64>,
    /// Largest interference and the class index (in V' order) it is with,
    /// as two arrays so that the column updates vectorise.
    top_value: Vec<f64>,
    top_index: Vec<usize>,
}

impl RowSums {
    fn new(c: usize) -> Self {
        RowSums {
            sum: std::array::from_fn(|_| vec![0.0; c]),
            n: std::array::from_fn(|_| vec![0; c]),
            undefined: std::array::from_fn(|_| vec![0; c]),
            excluded: vec![0; c],
            top_value: vec![f64::NEG_INFINITY; c],
            top_index: vec![usize::MAX; c],
        }
    }

    fn add(&mut self, o: &RowSums) {
        for k in 0..ROW_METRICS {
            for (a, b) in self.sum[k].iter_mut().zip(&o.sum[k]) {
                *a += b;
            }
            for (a, b) in self.undefined[k].iter_mut().zip(&o.undefined[k]) {
                *a += b;
            }
        }
        for (a, b) in self.excluded.iter_mut().zip(&o.excluded) {
            *a += b;
        }
        for a in 0..self.top_value.len() {
            let theirs = o.top(a);
            if better(theirs, self.top(a)) {
                (self.top_value[a], self.top_index[a]) = theirs;
            }
        }
    }

    /// The largest interference of class `a` and the class it is with
    /// (ties go to the lower index); (-inf, usize::MAX) when it has none.
    pub fn top(&self, a: usize) -> (f64, usize) {
        (self.top_value[a], self.top_index[a])
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
    /// The mean mu_bar that was subtracted (d values), for the uncentred
    /// kernels.
    pub mean_bar: &'a [f64],
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

/// Runs `step` on every tile with one state per worker, then merges the
/// states. Each worker takes the next tile from a shared counter until none
/// is left. rayon's fold would make one state per split, about thirty at
/// full scale, and each is megabytes of fresh pages to fault in and add up;
/// the counter also balances the triangle's uneven tail. Nested inside
/// another parallel job the workers may share one thread: the first drains
/// the queue, the rest find it empty, and the result is still complete.
/// [`pairs`] and its anchor [`gram_floor`] both schedule through here, so
/// the floor sees the same order and balance as the stage.
fn per_worker<S: Send>(
    tiles: &[(usize, usize)],
    init: impl Fn() -> S + Sync + Send,
    step: impl Fn(&mut S, usize, usize) + Sync + Send,
    merge: impl Fn(S, S) -> S + Sync + Send,
) -> S {
    let next = AtomicUsize::new(0);
    let workers = rayon::current_num_threads().clamp(1, tiles.len().max(1));
    (0..workers)
        .into_par_iter()
        .map(|_| {
            let mut state = init();
            while let Some(&(ti, tj)) = tiles.get(next.fetch_add(1, Ordering::Relaxed)) {
                step(&mut state, ti, tj);
            }
            state
        })
        .reduce_with(merge)
        .unwrap_or_else(init)
}

/// Compute every pairwise metric over classes `cls` (C = var.len()).
pub fn pairs(cls: &Classes, opt: &Options) -> PairReport {
    let c = cls.var.len();
    let d = cls.d;
    let edge = opt.edge.max(1);
    let nt = c.div_ceil(edge);
    // Per-class norms and dot products, and the f32 copy, in parallel: at
    // full scale these are serial passes over a quarter gigabyte otherwise.
    let row = |a: usize| &cls.centred[a * d..(a + 1) * d];
    let bar2: f64 = cls.mean_bar.iter().map(|x| x * x).sum();
    let per_class: Vec<[f64; 3]> = (0..c)
        .into_par_iter()
        .map(|a| {
            let m = row(a);
            // ||m||^2, <m, mu_bar> and the uncentred ||mu||^2 = ||m + mu_bar||^2.
            let norm2: f64 = m.iter().map(|x| x * x).sum();
            let dot: f64 = m.iter().zip(cls.mean_bar).map(|(x, y)| x * y).sum();
            let raw2: f64 = m.iter().zip(cls.mean_bar).map(|(x, y)| (x + y) * (x + y)).sum();
            [norm2, dot, raw2]
        })
        .collect();
    let inv_sqrt = |n: f64| if n > 0.0 { 1.0 / n.sqrt() } else { 0.0 };
    let norm2: Vec<f64> = per_class.iter().map(|p| p[0]).collect();
    let inv_norm: Vec<f64> = per_class.iter().map(|p| inv_sqrt(p[0])).collect();
    let dot_bar: Vec<f64> = per_class.iter().map(|p| p[1]).collect();
    let inv_raw: Vec<f64> = per_class.iter().map(|p| inv_sqrt(p[2])).collect();
    let blocks = Operand::new(cls, edge, opt.f32_gemm);
    let tiles: Vec<(usize, usize)> = (0..nt).flat_map(|i| (i..nt).map(move |j| (i, j))).collect();
    let threshold = recompute_below(opt.f32_gemm);
    let half_power = (2.0 + opt.cdnv_k) / 2.0;

    let k_top = opt.top_k;
    let shared = Shared {
        cls,
        norm2: &norm2,
        inv_norm: &inv_norm,
        dot_bar: &dot_bar,
        inv_raw: &inv_raw,
        bar2,
        blocks: &blocks,
        edge,
        threshold,
        half_power,
        riesz_s: opt.riesz_s,
        k_top,
    };

    type Acc = (
        Vec<TileResult>,
        RowSums,
        Vec<(Vec<PairValue>, Vec<PairValue>)>,
        u64,
    );
    let init = || -> Acc {
        (
            Vec::new(),
            RowSums::new(c),
            vec![(Vec::new(), Vec::new()); N_METRICS],
            0,
        )
    };
    let ((mut results, mut rows, extremes, recomputed), _) = per_worker(
        &tiles,
        || (init(), Scratch::default()),
        |(acc, scratch), ti, tj| {
            let metrics = shared.tile(ti, tj, &mut acc.1, &mut acc.2, &mut acc.3, scratch);
            acc.0.push(TileResult { ti, tj, metrics });
        },
        |(mut x, scratch), (y, _)| {
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
            (x, scratch)
        },
    );
    for k in 0..ROW_METRICS {
        for (n, &u) in rows.n[k].iter_mut().zip(&rows.undefined[k]) {
            *n = (c as u64 - 1) - u;
        }
    }
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

/// Buffers a worker reuses from tile to tile: fresh multi-megabyte
/// allocations per tile cost page faults, a fifth of the stage's time.
#[derive(Default)]
struct Scratch {
    gram: Vec<f64>,
    /// The f32 products before widening (f32 mode).
    gram32: Vec<f32>,
    columns: [Vec<f64>; N_METRICS],
    excluded: Vec<bool>,
}

/// Where [`Shared::row_values`] writes one tile row's metric values.
struct RowValues<'r> {
    gram: &'r mut [f64],
    cdnv: &'r mut [f64],
    intf: &'r mut [f64],
    logk: &'r mut [f64],
    logku: &'r mut [f64],
}

/// A pair's geometry, from its Gram entry or recomputed from the vectors.
#[derive(Clone, Copy)]
struct PairGeometry {
    /// ||mu_a - mu_b||^2.
    dist2: f64,
    /// <u_a, u_b>.
    cos: f64,
    /// ||u_a - u_b||^2, centred and uncentred.
    u2: f64,
    u2r: f64,
}

/// What one tile row (class a against the column classes b) reads besides
/// the Gram products: both the vectorised pass and the scalar
/// recomputation go through it, so they agree on every formula.
struct Row<'r> {
    n2a: f64,
    inva: f64,
    ira: f64,
    vara: f64,
    /// <m_a, mu_bar> + ||mu_bar||^2: class a's part of the uncentred Gram.
    base: f64,
    n2b: &'r [f64],
    invb: &'r [f64],
    dbb: &'r [f64],
    irb: &'r [f64],
    varb: &'r [f64],
    threshold: f64,
}

impl Row<'_> {
    /// The geometry of pair (a, b_j) from their centred Gram entry.
    #[inline(always)]
    fn geometry(&self, j: usize, gj: f64) -> PairGeometry {
        let cos = (gj * self.inva * self.invb[j]).clamp(-1.0, 1.0);
        let cos_raw = ((gj + self.base + self.dbb[j]) * self.ira * self.irb[j]).clamp(-1.0, 1.0);
        PairGeometry {
            dist2: self.n2a + self.n2b[j] - 2.0 * gj,
            cos,
            u2: 2.0 - 2.0 * cos,
            u2r: 2.0 - 2.0 * cos_raw,
        }
    }

    /// Which of the distance, the centred and the uncentred direction
    /// difference cancelled (are small against their terms).
    #[inline(always)]
    fn cancelled(&self, j: usize, g: &PairGeometry) -> [bool; 3] {
        let thr = self.threshold;
        [g.dist2 < thr * (self.n2a + self.n2b[j]), g.u2 < thr, g.u2r < thr]
    }

    /// CDNV (with `power`(d) = d^((2+k)/2)), interference and both log
    /// kernels -ln(||u_a - u_b||^2)/2 of pair (a, b_j); NaN where undefined:
    /// identical means, a class without a direction, identical directions.
    /// Branch-free, so loops over it vectorise.
    #[inline(always)]
    fn values(
        &self,
        j: usize,
        g: &PairGeometry,
        ln: impl Fn(f64) -> f64,
        power: impl Fn(f64) -> f64,
    ) -> [f64; 4] {
        let cdnv = (self.vara + self.varb[j]) / (2.0 * power(g.dist2));
        let directed = (self.n2a > 0.0) & (self.n2b[j] > 0.0);
        let directed_raw = (self.ira > 0.0) & (self.irb[j] > 0.0);
        let logk = -0.5 * ln(g.u2);
        let logku = -0.5 * ln(g.u2r);
        [
            if g.dist2 > 0.0 { cdnv } else { f64::NAN },
            if directed { g.cos } else { f64::NAN },
            if directed & (g.u2 > 0.0) { logk } else { f64::NAN },
            if directed_raw & (g.u2r > 0.0) {
                logku
            } else {
                f64::NAN
            },
        ]
    }
}

/// What every tile reads.
struct Shared<'a> {
    cls: &'a Classes<'a>,
    norm2: &'a [f64],
    inv_norm: &'a [f64],
    /// <m_c, mu_bar>, 1/||mu_c|| and ||mu_bar||^2 for the uncentred kernels.
    dot_bar: &'a [f64],
    inv_raw: &'a [f64],
    bar2: f64,
    blocks: &'a Operand<'a>,
    edge: usize,
    threshold: f64,
    half_power: f64,
    riesz_s: Option<f64>,
    k_top: usize,
}

impl Shared<'_> {
    /// One tile row's Gram products `grow` into every metric value, in one
    /// pass: f32 products are widened here, where they are read. The
    /// exponent of CDNV is chosen outside the loop: inside, a vectorised
    /// loop would call pow for every lane. Returns whether any value
    /// cancelled and must be recomputed from the vectors.
    #[inline(always)]
    fn row_values<T: Copy + Into<f64>>(
        &self,
        row: &Row,
        grow: &[T],
        out: RowValues,
        ln: impl Fn(f64) -> f64 + Copy,
    ) -> bool {
        let hp = self.half_power;
        if hp == 2.0 {
            row_pass(row, grow, out, ln, |x| x * x)
        } else if hp == 1.0 {
            row_pass(row, grow, out, ln, |x| x)
        } else {
            row_pass(row, grow, out, ln, |x| x.powf(hp))
        }
    }

    /// d^((2+k)/2), as the vectorised pass computes it.
    fn power(&self, x: f64) -> f64 {
        let hp = self.half_power;
        if hp == 2.0 {
            x * x
        } else if hp == 1.0 {
            x
        } else {
            x.powf(hp)
        }
    }

    /// Reduce tile (ti, tj), the classes of tile ti against those of tj
    /// (the upper triangle only when ti = tj): per-metric moments, and the
    /// row/column sums into `rows`.
    ///
    /// The portable build targets SSE2 only, so the tile is compiled again
    /// for AVX2 and AVX-512 and the widest the CPU has is chosen at run time.
    /// The arithmetic is the same in every version (Rust never contracts
    /// a multiply and an add into an FMA on its own), so results are too.
    #[allow(clippy::too_many_arguments)]
    fn tile(
        &self,
        ti: usize,
        tj: usize,
        rows: &mut RowSums,
        extremes: &mut [(Vec<PairValue>, Vec<PairValue>)],
        recomputed: &mut u64,
        scratch: &mut Scratch,
    ) -> [Moments; N_METRICS] {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked above).
                return unsafe { self.tile_avx512(ti, tj, rows, extremes, recomputed, scratch) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked above).
                return unsafe { self.tile_avx2(ti, tj, rows, extremes, recomputed, scratch) };
            }
        }
        self.tile_body::<PORTABLE>(ti, tj, rows, extremes, recomputed, scratch)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_avx512(
        &self,
        ti: usize,
        tj: usize,
        rows: &mut RowSums,
        extremes: &mut [(Vec<PairValue>, Vec<PairValue>)],
        recomputed: &mut u64,
        scratch: &mut Scratch,
    ) -> [Moments; N_METRICS] {
        self.tile_body::<AVX512>(ti, tj, rows, extremes, recomputed, scratch)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_avx2(
        &self,
        ti: usize,
        tj: usize,
        rows: &mut RowSums,
        extremes: &mut [(Vec<PairValue>, Vec<PairValue>)],
        recomputed: &mut u64,
        scratch: &mut Scratch,
    ) -> [Moments; N_METRICS] {
        self.tile_body::<AVX2>(ti, tj, rows, extremes, recomputed, scratch)
    }

    /// Each row of the tile is evaluated column-wise into small buffers with
    /// branch-free loops (NaN marks an undefined value), which the compiler
    /// vectorises; only the rare cancelled pairs take a scalar path.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn tile_body<const ISA: u8>(
        &self,
        ti: usize,
        tj: usize,
        rows: &mut RowSums,
        extremes: &mut [(Vec<PairValue>, Vec<PairValue>)],
        recomputed: &mut u64,
        scratch: &mut Scratch,
    ) -> [Moments; N_METRICS] {
        let cls = self.cls;
        let (d, c, edge) = (cls.d, cls.var.len(), self.edge);
        let r = (ti * edge)..((ti + 1) * edge).min(c);
        let s = (tj * edge)..((tj + 1) * edge).min(c);
        let diag = ti == tj;
        let n = s.len();
        let Scratch {
            gram: g,
            gram32,
            columns: buf,
            excluded: excl_buf,
        } = scratch;
        self.blocks.gram(ti, tj, g, gram32);
        let riesz_on = self.riesz_s.is_some();
        // Per metric: the tile's moments, each row's (one pass while it is
        // in cache) merged in by Chan's formula.
        let mut tile = [Moments::default(); N_METRICS];
        for b in buf.iter_mut() {
            b.resize(n, 0.0);
        }
        excl_buf.resize(n, false);
        for (ia, a) in r.clone().enumerate() {
            let j0 = if diag { ia + 1 } else { 0 };
            if j0 >= n {
                continue;
            }
            let cols = s.start + j0..s.end;
            let len = cols.len();
            let row_span = ia * n + j0..(ia + 1) * n;
            let row = Row {
                n2a: self.norm2[a],
                inva: self.inv_norm[a],
                ira: self.inv_raw[a],
                vara: cls.var[a],
                base: self.dot_bar[a] + self.bar2,
                n2b: &self.norm2[cols.clone()],
                invb: &self.inv_norm[cols.clone()],
                dbb: &self.dot_bar[cols.clone()],
                irb: &self.inv_raw[cols.clone()],
                varb: &cls.var[cols.clone()],
                threshold: self.threshold,
            };
            let [cdnv, intf, logk, riesz, gram, logku, rieszu] = buf;
            let (cdnv, intf, logk, riesz, gram, logku, rieszu) = (
                &mut cdnv[..len],
                &mut intf[..len],
                &mut logk[..len],
                &mut riesz[..len],
                &mut gram[..len],
                &mut logku[..len],
                &mut rieszu[..len],
            );
            let values = RowValues {
                gram,
                cdnv,
                intf,
                logk,
                logku,
            };
            let suspect = match self.blocks {
                Operand::Single(_) => self.row_values(&row, &gram32[row_span], values, ln_fast_f32),
                Operand::Double(..) => self.row_values(&row, &g[row_span], values, ln_fast),
            };
            // Pairs whose subtraction cancelled (rare): recompute from the
            // vectors, with the library's logarithm (an exact value can be
            // too small for the fast one).
            let ma = &cls.centred[a * d..(a + 1) * d];
            for j in (0..len).filter(|_| suspect) {
                let mut geo = row.geometry(j, gram[j]);
                let [far, apart, apart_raw] = row.cancelled(j, &geo);
                let mb = &cls.centred[(cols.start + j) * d..][..d];
                let mut again = false;
                if far {
                    geo.dist2 = ma.iter().zip(mb).map(|(x, y)| (x - y) * (x - y)).sum();
                    *recomputed += 1;
                    again = true;
                }
                if apart && row.n2a > 0.0 && row.n2b[j] > 0.0 {
                    let (sa, sb) = (row.inva, row.invb[j]);
                    geo.u2 = ma
                        .iter()
                        .zip(mb)
                        .map(|(x, y)| {
                            let e = x * sa - y * sb;
                            e * e
                        })
                        .sum();
                    geo.cos = 1.0 - geo.u2 / 2.0;
                    *recomputed += 1;
                    again = true;
                }
                if apart_raw && row.ira > 0.0 && row.irb[j] > 0.0 {
                    let (sa, sb) = (row.ira, row.irb[j]);
                    geo.u2r = ma
                        .iter()
                        .zip(mb)
                        .zip(cls.mean_bar)
                        .map(|((x, y), z)| {
                            let e = (x + z) * sa - (y + z) * sb;
                            e * e
                        })
                        .sum();
                    *recomputed += 1;
                    again = true;
                }
                if again {
                    [cdnv[j], intf[j], logk[j], logku[j]] = row.values(j, &geo, f64::ln, |x| self.power(x));
                }
            }
            if let Some(rs) = self.riesz_s {
                for (x, &l) in riesz
                    .iter_mut()
                    .zip(logk.iter())
                    .chain(rieszu.iter_mut().zip(logku.iter()))
                {
                    // ||u - u'||^-s = exp(s * log(1/||u - u'||)).
                    *x = if !l.is_nan() { (rs * l).exp() } else { f64::NAN };
                }
            }
            // Reductions: tile moments, row a, columns b.
            let excl = &mut excl_buf[..len];
            excl.fill(false);
            let mut any_undefined = false;
            let columns = [&*cdnv, &*intf, &*logk, &*riesz, &*gram, &*logku, &*rieszu];
            for (k, v) in columns.into_iter().enumerate() {
                if !active(k, riesz_on) {
                    continue;
                }
                let (m, sum) = if k < ROW_METRICS {
                    row_moments_on::<ISA, true>(v, &mut rows.sum[k][cols.clone()])
                } else {
                    row_moments_on::<ISA, false>(v, &mut [])
                };
                tile[k] = tile[k].combine(&m);
                if k < ROW_METRICS {
                    rows.sum[k][a] += sum;
                    rows.undefined[k][a] += m.excluded;
                    if m.excluded > 0 {
                        any_undefined = true;
                        let undefined = &mut rows.undefined[k][cols.clone()];
                        for ((u, e), &x) in undefined.iter_mut().zip(excl.iter_mut()).zip(v) {
                            let nan = x.is_nan();
                            *u += nan as u64;
                            *e |= nan;
                        }
                    }
                }
            }
            // Pairs undefined in some metric.
            if any_undefined {
                let mut row_excluded = 0u64;
                for (x, &e) in rows.excluded[cols.clone()].iter_mut().zip(excl.iter()) {
                    *x += e as u64;
                    row_excluded += e as u64;
                }
                rows.excluded[a] += row_excluded;
            }
            top_interferers(intf, a, cols.start, rows);
            if self.k_top > 0 {
                for (k, v) in columns.into_iter().enumerate() {
                    if !active(k, riesz_on) {
                        continue;
                    }
                    for (j, &x) in v.iter().enumerate() {
                        if !x.is_nan() {
                            let pv = PairValue {
                                value: x,
                                a,
                                b: cols.start + j,
                            };
                            keep_extremes(&mut extremes[k].0, pv, self.k_top, false);
                            keep_extremes(&mut extremes[k].1, pv, self.k_top, true);
                        }
                    }
                }
            }
        }
        tile
    }
}

/// Fold one tile row (class `a` against the classes from `b0`, with
/// interferences `intf`, NaN where undefined) into the top interferers of
/// `a` and of each column class. Branch-free, so both loops vectorise: the
/// row's maximum in [`LANES`] lanes (a lane keeps its first, lowest-index
/// maximum), the columns as elementwise selects.
#[inline(always)]
fn top_interferers(intf: &[f64], a: usize, b0: usize, rows: &mut RowSums) {
    let len = intf.len();
    let tv = &mut rows.top_value[b0..b0 + len];
    let ti = &mut rows.top_index[b0..b0 + len];
    for j in 0..len {
        let x = intf[j];
        let win = x > tv[j] || (x == tv[j] && a < ti[j]);
        tv[j] = if win { x } else { tv[j] };
        ti[j] = if win { a } else { ti[j] };
    }
    let mut best = [f64::NEG_INFINITY; LANES];
    let mut at = [usize::MAX; LANES];
    let chunks = intf.chunks_exact(LANES);
    let rest = chunks.remainder();
    for (c, ch) in chunks.enumerate() {
        for l in 0..LANES {
            let win = ch[l] > best[l];
            best[l] = if win { ch[l] } else { best[l] };
            at[l] = if win { c * LANES + l } else { at[l] };
        }
    }
    // The rest as one more chunk padded with NaN, which never wins: a
    // loop over it with a variable lane index would keep the lanes in
    // memory.
    let tail = len - rest.len();
    let mut last = [f64::NAN; LANES];
    last[..rest.len()].copy_from_slice(rest);
    for l in 0..LANES {
        let win = last[l] > best[l];
        best[l] = if win { last[l] } else { best[l] };
        at[l] = if win { tail + l } else { at[l] };
    }
    let mut top = rows.top(a);
    for l in 0..LANES {
        if at[l] != usize::MAX && better((best[l], b0 + at[l]), top) {
            top = (best[l], b0 + at[l]);
        }
    }
    (rows.top_value[a], rows.top_index[a]) = top;
}

/// The loop of [`Shared::row_values`].
#[inline(always)]
fn row_pass<T: Copy + Into<f64>>(
    row: &Row,
    grow: &[T],
    out: RowValues,
    ln: impl Fn(f64) -> f64 + Copy,
    power: impl Fn(f64) -> f64 + Copy,
) -> bool {
    let RowValues {
        gram,
        cdnv,
        intf,
        logk,
        logku,
    } = out;
    let mut suspect = 0u32;
    for j in 0..grow.len() {
        let gj: f64 = grow[j].into();
        gram[j] = gj;
        let g = row.geometry(j, gj);
        let [x, y, z] = row.cancelled(j, &g);
        suspect |= (x | y | z) as u32;
        [cdnv[j], intf[j], logk[j], logku[j]] = row.values(j, &g, ln, power);
    }
    suspect != 0
}

/// Lanes of the row reductions below: independent partial sums, so the
/// loops vectorise (one running sum would chain every addition), added up
/// in a fixed order, so results do not depend on the CPU.
const LANES: usize = 16;

/// Instruction sets the tile is compiled for (see [`Shared::tile`]).
const PORTABLE: u8 = 0;
const AVX2: u8 = 1;
const AVX512: u8 = 2;

/// [`row_moments`] for instruction set `ISA`, not inlined: inlined into the
/// tile, its lanes stay in memory, stored and reloaded at every step (1.4
/// cycles per value instead of 1). Called through an opaque pointer,
/// because a release build inlines it even when marked `inline(never)`;
/// the indirect call costs nothing next to a row of hundreds of values.
#[inline(always)]
fn row_moments_on<const ISA: u8, const COLS: bool>(v: &[f64], col_sums: &mut [f64]) -> (Moments, f64) {
    type Kernel = unsafe fn(&[f64], &mut [f64]) -> (Moments, f64);
    let kernel: Kernel = match ISA {
        #[cfg(target_arch = "x86_64")]
        AVX512 => row_moments_avx512::<COLS>,
        #[cfg(target_arch = "x86_64")]
        AVX2 => row_moments_avx2::<COLS>,
        _ => row_moments_portable::<COLS>,
    };
    // SAFETY: only tile_avx512 passes AVX512 and only tile_avx2 AVX2, and
    // each runs only on CPUs with that instruction set.
    unsafe { std::hint::black_box(kernel)(v, col_sums) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline(never)]
unsafe fn row_moments_avx512<const COLS: bool>(v: &[f64], col_sums: &mut [f64]) -> (Moments, f64) {
    row_moments::<COLS>(v, col_sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline(never)]
unsafe fn row_moments_avx2<const COLS: bool>(v: &[f64], col_sums: &mut [f64]) -> (Moments, f64) {
    row_moments::<COLS>(v, col_sums)
}

#[inline(never)]
fn row_moments_portable<const COLS: bool>(v: &[f64], col_sums: &mut [f64]) -> (Moments, f64) {
    row_moments::<COLS>(v, col_sums)
}

/// Moments of the defined (non-NaN) entries of one tile row (not empty) in
/// one pass, and their sum; with `COLS`, each entry is also added into
/// `col_sums` (the column classes' row sums; NaN as 0).
///
/// The sums are shifted by the row's first defined value x0: M2 = S2 -
/// S1^2 / n with S_p = sum (x - x0)^p. Its rounding error, relative to M2,
/// is about eps (1 + n (mean - x0)^2 / M2), and since x0 is one of the
/// values, (mean - x0)^2 <= M2: at most (n + 1) eps, 1e-13 for a row of
/// 512 in f64. Two passes (mean, then squares about it) cost a fifth of
/// the per-pair work.
///
/// Most rows have no undefined value, so the first pass assumes none; a
/// NaN then shows in its sum, and only such a row is summed again with
/// every value tested. Both give the same result where there is no NaN.
#[inline(always)]
fn row_moments<const COLS: bool>(v: &[f64], col_sums: &mut [f64]) -> (Moments, f64) {
    let all = lane_moments::<COLS, false>(v, col_sums, v[0]);
    if !all.1.is_nan() {
        return all;
    }
    // The column sums skipped the NaN and are complete.
    let x0 = v.iter().copied().find(|x| !x.is_nan()).unwrap_or(0.0);
    lane_moments::<false, true>(v, &mut [], x0)
}

/// The pass of [`row_moments`] with shift `x0`, testing each value for
/// NaN when `TESTED` (else a NaN makes the sum NaN).
#[inline(always)]
fn lane_moments<const COLS: bool, const TESTED: bool>(
    v: &[f64],
    col_sums: &mut [f64],
    x0: f64,
) -> (Moments, f64) {
    let mut s1 = [0.0f64; LANES];
    let mut s2 = [0.0f64; LANES];
    let mut cnt = [0u64; LANES];
    let mut mn = [f64::INFINITY; LANES];
    let mut mx = [f64::NEG_INFINITY; LANES];
    // A macro, not a closure: through a closure's captures the lanes stay
    // in memory.
    macro_rules! lane {
        ($l:expr, $x:expr) => {{
            let (l, x) = ($l, $x);
            let ok = !TESTED || x == x;
            let e = if ok { x - x0 } else { 0.0 };
            s1[l] += e;
            s2[l] += e * e;
            cnt[l] += ok as u64;
            mn[l] = if x < mn[l] { x } else { mn[l] };
            mx[l] = if x > mx[l] { x } else { mx[l] };
        }};
    }
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    if COLS {
        for (ch, cs) in chunks.zip(col_sums.chunks_exact_mut(LANES)) {
            for l in 0..LANES {
                lane!(l, ch[l]);
                cs[l] += if !ch[l].is_nan() { ch[l] } else { 0.0 };
            }
        }
        let tail = v.len() - rest.len();
        for (x, c) in rest.iter().zip(&mut col_sums[tail..]) {
            *c += if !x.is_nan() { *x } else { 0.0 };
        }
    } else {
        for ch in chunks {
            // Lane l's registers are indexed by l, as in the loop above.
            #[allow(clippy::needless_range_loop)]
            for l in 0..LANES {
                lane!(l, ch[l]);
            }
        }
    }
    // The rest as one more chunk, padded with x0 (which moves no sum, no
    // extreme, and is not counted): a loop over it with a variable lane
    // index would keep the lanes in memory.
    let mut last = [x0; LANES];
    last[..rest.len()].copy_from_slice(rest);
    for l in 0..LANES {
        let counted = l < rest.len();
        let e = last[l] - x0;
        let ok = counted & (!TESTED || !e.is_nan());
        let e = if ok { e } else { 0.0 };
        s1[l] += e;
        s2[l] += e * e;
        cnt[l] += ok as u64;
        mn[l] = if ok & (last[l] < mn[l]) { last[l] } else { mn[l] };
        mx[l] = if ok & (last[l] > mx[l]) { last[l] } else { mx[l] };
    }
    let n: u64 = cnt.iter().sum();
    let (s1, s2): (f64, f64) = (s1.iter().sum(), s2.iter().sum());
    let moments = if n == 0 {
        Moments {
            excluded: v.len() as u64,
            ..Moments::default()
        }
    } else {
        Moments {
            n,
            mean: x0 + s1 / n as f64,
            m2: (s2 - s1 * s1 / n as f64).max(0.0),
            min: mn.iter().fold(f64::INFINITY, |a, &b| if b < a { b } else { a }),
            max: mx
                .iter()
                .fold(f64::NEG_INFINITY, |a, &b| if b > a { b } else { a }),
            excluded: v.len() as u64 - n,
        }
    };
    (moments, x0 * n as f64 + s1)
}

/// ln(x) in f32 arithmetic (precision=f32), for x in f32's positive normal
/// range: the reduction of [`ln_fast`] with the series through s^9
/// (truncation below 1e-8 relative), in sixteen lanes per vector instead of
/// eight. Within 2 f32 ulp (1.5 measured), below the error the f32 Gram products
/// already carry into ||u_a - u_b||^2.
#[inline(always)]
pub fn ln_fast_f32(x: f64) -> f64 {
    // ln 2 in two parts; e * LN2_HI is exact for |e| < 2^15.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const TWO23: f32 = 8_388_608.0;
    let x = x as f32;
    let bits = x.to_bits();
    let e_biased = f32::from_bits((bits >> 23) | 0x4b00_0000) - TWO23;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let big = m > std::f32::consts::SQRT_2;
    let m = if big { m * 0.5 } else { m };
    let e = e_biased - 127.0 + if big { 1.0 } else { 0.0 };
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let p = 1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0)));
    let ln_m = 2.0 * s + 2.0 * s * s2 * p;
    (e * LN2_HI + (ln_m + e * LN2_LO)) as f64
}

/// ln(x) for positive normal finite x: x = 2^e m with m in [sqrt(1/2),
/// sqrt(2)), ln m = 2 atanh(s), s = (m-1)/(m+1), |s| <= 0.1716, by its
/// series through s^23 (truncation below 1e-18 relative), and e ln 2 in two
/// parts. Branch-free, so loops over it vectorise.
#[inline(always)]
pub fn ln_fast(x: f64) -> f64 {
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // 2^52 + biased exponent, as a float: the exponent without an
    // integer-to-float conversion (which AVX2 lacks for 64-bit lanes).
    const TWO52: f64 = 4_503_599_627_370_496.0;
    let bits = x.to_bits();
    let e_biased = f64::from_bits((bits >> 52) | 0x4330_0000_0000_0000) - TWO52;
    let m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    let big = m > std::f64::consts::SQRT_2;
    let m = if big { m * 0.5 } else { m };
    let e = e_biased - 1023.0 + if big { 1.0 } else { 0.0 };
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let p = 1.0 / 3.0
        + s2 * (1.0 / 5.0
            + s2 * (1.0 / 7.0
                + s2 * (1.0 / 9.0
                    + s2 * (1.0 / 11.0
                        + s2 * (1.0 / 13.0
                            + s2 * (1.0 / 15.0
                                + s2 * (1.0 / 17.0
                                    + s2 * (1.0 / 19.0 + s2 * (1.0 / 21.0 + s2 * (1.0 / 23.0))))))))));
    let ln_m = 2.0 * s + 2.0 * s * s2 * p;
    e * LN2_HI + (ln_m + e * LN2_LO)
}

/// The centred means laid out for the f32 Gram GEMM: the classes of tile
/// `t` (`edge` of them, fewer in the last) as one d x w block, class i's
/// coordinate k at `k * stride + i`.
///
/// From row-major f32 means the GEMM gathers both operands element by
/// element while packing them: a fifth of its time at d = 1024. From these
/// blocks it reads the left operand in place (column-major) and packs the
/// right one with contiguous copies (measured at C = 2048, d = 1024, one
/// core: 100 vs 78 GFLOP/s; the stage's f32 floor 13 % lower).
struct GramBlocks<T> {
    data: Vec<T>,
    edge: usize,
    c: usize,
    d: usize,
}

/// Block strides are whole AVX-512 vectors, so full blocks need no packing.
const BLOCK_ALIGN: usize = 16;

impl<T: GramFloat> GramBlocks<T> {
    /// Re-lay the row-major `c x d` matrix `rows`, the blocks in parallel.
    fn new(rows: &[f64], c: usize, d: usize, edge: usize) -> Self {
        let edge = edge.max(1);
        let full = edge.next_multiple_of(BLOCK_ALIGN) * d;
        let len = c.div_ceil(edge) * full;
        // Every element is written below, padding included: a zeroed
        // allocation of recycled memory is a serial memset of it first
        // (0.15 s of the stage at full scale).
        let mut data: Vec<T> = Vec::with_capacity(len);
        data.spare_capacity_mut()[..len]
            .par_chunks_mut(full)
            .enumerate()
            .for_each(|(t, out)| {
                let first = t * edge;
                let w = edge.min(c - first);
                let stride = w.next_multiple_of(BLOCK_ALIGN);
                // Sixteen classes at a time: sixteen rows read in step, each
                // block row written in runs of sixteen.
                for i0 in (0..stride).step_by(BLOCK_ALIGN) {
                    for k in 0..d {
                        for i in i0..i0 + BLOCK_ALIGN {
                            let x = if i < w {
                                T::from_f64(rows[(first + i) * d + k])
                            } else {
                                T::default()
                            };
                            out[k * stride + i].write(x);
                        }
                    }
                }
                for x in &mut out[stride * d..] {
                    x.write(T::default());
                }
            });
        // SAFETY: the chunks cover all `len` elements and each was written.
        unsafe { data.set_len(len) };
        GramBlocks { data, edge, c, d }
    }

    /// Block `t`: its start, width (classes) and stride.
    fn block(&self, t: usize) -> (*const T, usize, usize) {
        let first = t * self.edge;
        let w = self.edge.min(self.c - first);
        let full = self.edge.next_multiple_of(BLOCK_ALIGN) * self.d;
        (self.data[t * full..].as_ptr(), w, w.next_multiple_of(BLOCK_ALIGN))
    }

    /// G = M_ti M_tj^T (rows: the classes of tile `ti`, columns: those of
    /// `tj`), row-major into `out`, every element written.
    fn gram(&self, ti: usize, tj: usize, out: &mut Vec<T>) {
        let (lhs, m, lhs_stride) = self.block(ti);
        let (rhs, n, rhs_stride) = self.block(tj);
        out.resize(m * n, T::default());
        // SAFETY: block ti holds d columns of m classes `lhs_stride` apart
        // (left operand: m x d, column-major), block tj likewise (right
        // operand: d x n, row-major), and `out` holds m x n elements; beta =
        // 1 with read_dst = false writes every element without reading it.
        unsafe {
            gemm::gemm(
                m,
                n,
                self.d,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                lhs,
                lhs_stride as isize,
                1,
                rhs,
                1,
                rhs_stride as isize,
                T::default(),
                T::ONE,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

/// The Gram GEMM's operand in the precision asked for. In f64 the GEMM
/// reads the centred means as they are: its packing costs relatively less
/// there (measured the same GFLOP/s from either layout), and a re-laid
/// copy would add C x d x 8 bytes.
enum Operand<'a> {
    Single(GramBlocks<f32>),
    Double(&'a Classes<'a>, usize),
}

impl<'a> Operand<'a> {
    fn new(cls: &'a Classes<'a>, edge: usize, f32_gemm: bool) -> Self {
        if f32_gemm {
            Operand::Single(GramBlocks::new(cls.centred, cls.var.len(), cls.d, edge))
        } else {
            Operand::Double(cls, edge)
        }
    }

    /// The Gram block of tiles (ti, tj) into `g` (f64) or `g32` (f32).
    fn gram(&self, ti: usize, tj: usize, g: &mut Vec<f64>, g32: &mut Vec<f32>) {
        match self {
            Operand::Single(b) => b.gram(ti, tj, g32),
            Operand::Double(cls, edge) => {
                let (c, d) = (cls.var.len(), cls.d);
                let (r0, s0) = (ti * edge, tj * edge);
                let (m, n) = ((*edge).min(c - r0), (*edge).min(c - s0));
                g.resize(m * n, 0.0);
                // SAFETY: rows r0.. and s0.. of the row-major C x d means
                // hold m x d and n x d elements (the right operand read
                // transposed), and `g` m x n; beta = 1 with read_dst =
                // false writes every element without reading it.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        d,
                        g.as_mut_ptr(),
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
    }
}

/// The GEMM's element type: f64, or f32 in precision=f32.
trait GramFloat: Copy + Default + Send + Sync + 'static {
    const ONE: Self;
    fn from_f64(x: f64) -> Self;
}

impl GramFloat for f32 {
    const ONE: f32 = 1.0;
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
}

impl GramFloat for f64 {
    const ONE: f64 = 1.0;
    fn from_f64(x: f64) -> f64 {
        x
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
pub const METRIC_LOGKERNEL_UNCENTRED: usize = LOGK_UNC;
pub const METRIC_RIESZ_UNCENTRED: usize = RIESZ_UNC;

/// Whether metric `k` was computed, given whether Riesz kernels were asked for.
pub fn metric_active(k: usize, riesz: bool) -> bool {
    active(k, riesz)
}

/// The GEMM floor of [`pairs`]: only the upper-triangle Gram products of
/// `c` classes in `d` dims, in the same tiles, order and precision, on the
/// same thread pool, with random data. Seconds. `pipeline bench analyze`
/// quotes the stage's time as a ratio to this anchor.
pub fn gram_floor(c: usize, d: usize, edge: usize, f32_gemm: bool) -> f64 {
    let mut s = 7u64;
    let centred: Vec<f64> = (0..c * d)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        })
        .collect();
    let zeros = vec![0f64; c.max(d)];
    let cls = Classes {
        centred: &centred,
        d,
        var: &zeros[..c],
        mean_bar: &zeros[..d],
    };
    let edge = edge.max(1);
    let blocks = Operand::new(&cls, edge, f32_gemm);
    let nt = c.div_ceil(edge);
    let tiles: Vec<(usize, usize)> = (0..nt).flat_map(|i| (i..nt).map(move |j| (i, j))).collect();
    let t = std::time::Instant::now();
    let (_, _, checksum) = per_worker(
        &tiles,
        <(Vec<f64>, Vec<f32>, f64)>::default,
        |(g, g32, sum), ti, tj| {
            blocks.gram(ti, tj, g, g32);
            *sum += if f32_gemm { g32[0] as f64 } else { g[0] };
        },
        |(g, g32, x), (_, _, y)| (g, g32, x + y),
    );
    std::hint::black_box(checksum);
    t.elapsed().as_secs_f64()
}

#[cfg(test)]
mod ln_tests {
    use super::{Classes, METRIC_LOGKERNEL, Options, combine, ln_fast, ln_fast_f32, pairs};

    /// Two directions 1e-20 apart: ||u_a - u_b||^2 = 1e-40 is recomputed
    /// from the vectors, and is below f32's normal range, so precision=f32
    /// must take the library's logarithm for it: the log kernel's maximum
    /// is -ln(1e-40)/2 = 20 ln 10 in both precisions (1e-12).
    #[test]
    fn tiny_direction_differences_take_the_exact_logarithm() {
        let centred = [1.0, 0.0, 1.0, 1e-20, -1.0, 0.5];
        let cls = Classes {
            centred: &centred,
            d: 2,
            var: &[1.0, 2.0, 3.0],
            mean_bar: &[0.0, 0.0],
        };
        for f32_gemm in [false, true] {
            let opt = Options {
                edge: 2,
                cdnv_k: 2.0,
                riesz_s: None,
                f32_gemm,
                top_k: 0,
            };
            let report = pairs(&cls, &opt);
            let logk = combine(&report.tiles, METRIC_LOGKERNEL);
            let want = 20.0 * std::f64::consts::LN_10;
            assert_eq!(logk.n, 3, "f32={f32_gemm}");
            assert!(
                (logk.max - want).abs() <= 1e-12 * want,
                "f32={f32_gemm}: {} vs {want}",
                logk.max
            );
        }
    }

    /// The worst error of `ln` against the library's f64 logarithm over
    /// `xs`, in units of `eps` relative to the result (at least `tiny`).
    fn worst_ulp(xs: impl Iterator<Item = f64>, ln: impl Fn(f64) -> f64, eps: f64, tiny: f64) -> f64 {
        xs.map(|x| {
            let (a, b) = (ln(x), x.ln());
            (a - b).abs() / (eps * b.abs().max(tiny))
        })
        .fold(0.0, f64::max)
    }

    /// ln_fast against the library's ln over the whole normal range and
    /// densely near 1 (where ln is small and relative error is hardest):
    /// within 4 ulp of the result (the library's is itself within 1).
    #[test]
    fn fast_log_is_within_a_few_ulp() {
        let sweep = std::iter::successors(Some(f64::MIN_POSITIVE), |x| Some(x * 1.000_173_1))
            .take_while(|&x| x < 1e300);
        let dense = (1..200_000).flat_map(|i| {
            let i = i as f64;
            [
                1.0 + i * 1e-9,
                1.0 - i * 1e-9,
                std::f64::consts::SQRT_2 * (1.0 + (i - 1e5) * 1e-12),
            ]
        });
        let edges = [0.5, 1.0, 2.0, 3.999, 4.0, 1e-300, 7.0e-4];
        let worst = worst_ulp(
            sweep.chain(dense).chain(edges),
            ln_fast,
            f64::EPSILON,
            f64::MIN_POSITIVE,
        );
        assert!(worst <= 4.0, "worst error {worst} ulp");
    }

    /// ln_fast_f32 against the library's f64 ln over f32's normal range and
    /// densely near 1 and sqrt(2) (the reduction's seams): within 2 f32 ulp
    /// of the exact result, counting the rounding of the argument to f32.
    #[test]
    fn f32_log_is_within_a_few_f32_ulp() {
        let sweep =
            std::iter::successors(Some(f32::MIN_POSITIVE), |x| Some(x * 1.000_37)).take_while(|&x| x < 1e38);
        let dense = (1..200_000).flat_map(|i| {
            let i = i as f32;
            [
                1.0 + i * 1e-7,
                1.0 - i * 5e-8,
                std::f32::consts::SQRT_2 * (1.0 + (i - 1e5) * 1e-9),
            ]
        });
        let edges = [0.5, 1.0, 2.0, 3.999, 4.0, 2.2e-16, 7.0e-4];
        let xs = sweep.chain(dense).chain(edges).map(f64::from);
        let worst = worst_ulp(xs, ln_fast_f32, f32::EPSILON as f64, f32::MIN_POSITIVE as f64);
        assert!(worst <= 2.0, "worst error {worst} f32 ulp");
    }
}

#[cfg(test)]
mod reduction_tests {
    use super::{GramBlocks, Moments, row_moments};

    fn lcg(s: &mut u64) -> f64 {
        *s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }

    /// Every block product equals the dot products of the rows, for tile
    /// edges that are and are not a multiple of the block alignment and a
    /// last tile narrower than the rest. f64 GEMM against a plain sum: the
    /// orders of addition differ, so 1e-13 relative to sum |x y|.
    #[test]
    fn block_products_equal_the_dot_products() {
        let (c, d) = (37, 7);
        let mut s = 3;
        let rows: Vec<f64> = (0..c * d).map(|_| lcg(&mut s)).collect();
        for edge in [16, 10, 64] {
            let blocks = GramBlocks::<f64>::new(&rows, c, d, edge);
            let mut out = Vec::new();
            for ti in 0..c.div_ceil(edge) {
                for tj in ti..c.div_ceil(edge) {
                    blocks.gram(ti, tj, &mut out);
                    let (r, q) = (
                        ti * edge..((ti + 1) * edge).min(c),
                        tj * edge..((tj + 1) * edge).min(c),
                    );
                    assert_eq!(out.len(), r.len() * q.len());
                    for (i, a) in r.clone().enumerate() {
                        for (j, b) in q.clone().enumerate() {
                            let (x, y) = (&rows[a * d..][..d], &rows[b * d..][..d]);
                            let want: f64 = x.iter().zip(y).map(|(p, q)| p * q).sum();
                            let scale: f64 = x.iter().zip(y).map(|(p, q)| (p * q).abs()).sum();
                            let got = out[i * q.len() + j];
                            assert!(
                                (got - want).abs() <= 1e-13 * scale,
                                "edge {edge} ({a}, {b}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Two-pass moments of the non-NaN values, in f64.
    fn brute(v: &[f64]) -> Moments {
        let ok: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
        let n = ok.len();
        if n == 0 {
            return Moments {
                excluded: v.len() as u64,
                ..Moments::default()
            };
        }
        let mean = ok.iter().sum::<f64>() / n as f64;
        Moments {
            n: n as u64,
            mean,
            m2: ok.iter().map(|x| (x - mean) * (x - mean)).sum(),
            min: ok.iter().copied().fold(f64::INFINITY, f64::min),
            max: ok.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            excluded: (v.len() - n) as u64,
        }
    }

    /// One-pass shifted moments against two passes, on rows of every tail
    /// length around the lane count, with and without NaN (first, inside,
    /// all), far from zero (1e8 + noise of 1: unshifted sums would lose all
    /// of M2) and with one outlier as the shift. Tolerance: the bound in
    /// row_moments' doc, (n + 1) eps relative, with a factor 4 for the
    /// two-pass reference's own rounding; the column sums take each value
    /// once (NaN as 0), so they are exact.
    #[test]
    fn one_pass_row_moments_equal_two_passes() {
        let mut s = 11;
        for len in [1, 2, 15, 16, 17, 31, 33, 100, 512] {
            for case in 0..6 {
                let mut v: Vec<f64> = (0..len).map(|_| lcg(&mut s)).collect();
                match case {
                    1 => v.iter_mut().for_each(|x| *x += 1e8),
                    2 => v[0] = f64::NAN,
                    3 => v[len / 2] = f64::NAN,
                    4 => v.iter_mut().for_each(|x| *x = f64::NAN),
                    5 => v[0] = 1e6,
                    _ => {}
                }
                let mut cols = vec![0.25; len];
                let (got, sum) = row_moments::<true>(&v, &mut cols);
                let want = brute(&v);
                let tag = format!("len {len} case {case}");
                assert_eq!((got.n, got.excluded), (want.n, want.excluded), "{tag}");
                for (c, x) in cols.iter().zip(&v) {
                    assert_eq!(*c, 0.25 + if x.is_nan() { 0.0 } else { *x }, "{tag}");
                }
                if want.n == 0 {
                    continue;
                }
                assert_eq!((got.min, got.max), (want.min, want.max), "{tag}");
                let tol = 4.0 * (len as f64 + 1.0) * f64::EPSILON;
                assert!(
                    (got.mean - want.mean).abs() <= tol * want.mean.abs(),
                    "{tag}: mean {} vs {}",
                    got.mean,
                    want.mean
                );
                assert!(
                    (got.m2 - want.m2).abs() <= tol * want.m2 + 1e-300,
                    "{tag}: m2 {} vs {}",
                    got.m2,
                    want.m2
                );
                let direct: f64 = v.iter().filter(|x| !x.is_nan()).sum();
                assert!(
                    (sum - direct).abs()
                        <= tol * v.iter().filter(|x| !x.is_nan()).map(|x| x.abs()).sum::<f64>(),
                    "{tag}: sum"
                );
            }
        }
    }
}
