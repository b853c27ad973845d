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
    let single: Vec<f32> = if opt.f32_gemm {
        cls.centred.par_iter().map(|&x| x as f32).collect()
    } else {
        Vec::new()
    };
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
        single: &single,
        f32_gemm: opt.f32_gemm,
        threshold,
        ln_min: if opt.f32_gemm { f32::MIN_POSITIVE as f64 } else { f64::MIN_POSITIVE },
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
    let (mut results, mut rows, extremes, recomputed) = tiles
        .par_iter()
        .fold(init, |mut acc, &(ti, tj)| {
            let r = (ti * edge)..((ti + 1) * edge).min(c);
            let s = (tj * edge)..((tj + 1) * edge).min(c);
            let metrics = SCRATCH.with_borrow_mut(|scratch| {
                shared.tile(r, s, ti == tj, &mut acc.1, &mut acc.2, &mut acc.3, scratch)
            });
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

/// Buffers a worker thread reuses from tile to tile: fresh multi-megabyte
/// allocations per tile cost page faults, a fifth of the stage's time.
/// Thread-local because rayon's fold makes a new accumulator per split.
#[derive(Default)]
struct Scratch {
    gram: Vec<f64>,
    /// The f32 products before widening (f32 mode).
    gram32: Vec<f32>,
    columns: [Vec<f64>; N_METRICS],
    u2: Vec<f64>,
    u2_raw: Vec<f64>,
    excluded: Vec<bool>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Where [`Shared::row_geometry`] writes one tile row.
struct Geometry<'r> {
    gram: &'r mut [f64],
    dist2: &'r mut [f64],
    cos: &'r mut [f64],
    u2: &'r mut [f64],
    u2r: &'r mut [f64],
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
    single: &'a [f32],
    f32_gemm: bool,
    threshold: f64,
    /// Smallest value the fast logarithm takes (f32's or f64's smallest
    /// normal number).
    ln_min: f64,
    half_power: f64,
    riesz_s: Option<f64>,
    k_top: usize,
}

impl Shared<'_> {
    /// One tile row's Gram products `grow` (class `a` against `cols`) into
    /// the Gram metric, squared distances ||mu_a - mu_b||^2, interferences
    /// <u_a, u_b>, and ||u_a - u_b||^2 centred and uncentred, in one pass.
    /// f32 products are widened here, where they are read, rather than in
    /// a pass of their own. Returns whether any value cancelled (is small
    /// against its terms) and must be recomputed from the vectors.
    #[inline(always)]
    fn row_geometry<T: Copy + Into<f64>>(
        &self,
        grow: &[T],
        a: usize,
        cols: std::ops::Range<usize>,
        out: Geometry,
    ) -> bool {
        let (n2a, inva, ira) = (self.norm2[a], self.inv_norm[a], self.inv_raw[a]);
        let (n2b, invb) = (&self.norm2[cols.clone()], &self.inv_norm[cols.clone()]);
        let (dbb, irb) = (&self.dot_bar[cols.clone()], &self.inv_raw[cols]);
        let Geometry {
            gram,
            dist2: dist2s,
            cos: coss,
            u2,
            u2r,
        } = out;
        let thr = self.threshold;
        let base = self.dot_bar[a] + self.bar2;
        let mut suspect = 0u32;
        for j in 0..grow.len() {
            let gj: f64 = grow[j].into();
            gram[j] = gj;
            let dist2 = n2a + n2b[j] - 2.0 * gj;
            dist2s[j] = dist2;
            let cos = (gj * inva * invb[j]).clamp(-1.0, 1.0);
            coss[j] = cos;
            u2[j] = 2.0 - 2.0 * cos;
            let cos_raw = ((gj + base + dbb[j]) * ira * irb[j]).clamp(-1.0, 1.0);
            u2r[j] = 2.0 - 2.0 * cos_raw;
            let cancelled = (dist2 < thr * (n2a + n2b[j])) | (u2[j] < thr) | (u2r[j] < thr);
            suspect |= cancelled as u32;
        }
        suspect != 0
    }

    /// Reduce the tile rows `r` x columns `s` (upper triangle only when
    /// `diag`): per-metric moments, and the row/column sums into `rows`.
    ///
    /// The portable build targets SSE2 only, so the tile is compiled again
    /// for AVX2 and AVX-512 and the widest the CPU has is chosen at run time.
    /// The arithmetic is the same in every version (Rust never contracts
    /// a multiply and an add into an FMA on its own), so results are too.
    #[allow(clippy::too_many_arguments)]
    fn tile(
        &self,
        r: std::ops::Range<usize>,
        s: std::ops::Range<usize>,
        diag: bool,
        rows: &mut RowSums,
        extremes: &mut [(Vec<PairValue>, Vec<PairValue>)],
        recomputed: &mut u64,
        scratch: &mut Scratch,
    ) -> [Moments; N_METRICS] {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked above).
                return unsafe { self.tile_avx512(r, s, diag, rows, extremes, recomputed, scratch) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked above).
                return unsafe { self.tile_avx2(r, s, diag, rows, extremes, recomputed, scratch) };
            }
        }
        self.tile_body(r, s, diag, rows, extremes, recomputed, scratch)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_avx512(
        &self,
        r: std::ops::Range<usize>,
        s: std::ops::Range<usize>,
        diag: bool,
        rows: &mut RowSums,
        extremes: &mut [(Vec<PairValue>, Vec<PairValue>)],
        recomputed: &mut u64,
        scratch: &mut Scratch,
    ) -> [Moments; N_METRICS] {
        self.tile_body(r, s, diag, rows, extremes, recomputed, scratch)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_avx2(
        &self,
        r: std::ops::Range<usize>,
        s: std::ops::Range<usize>,
        diag: bool,
        rows: &mut RowSums,
        extremes: &mut [(Vec<PairValue>, Vec<PairValue>)],
        recomputed: &mut u64,
        scratch: &mut Scratch,
    ) -> [Moments; N_METRICS] {
        self.tile_body(r, s, diag, rows, extremes, recomputed, scratch)
    }

    /// Each row of the tile is evaluated column-wise into small buffers with
    /// branch-free loops (NaN marks an undefined value), which the compiler
    /// vectorises; only the rare cancelled pairs take a scalar path.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn tile_body(
        &self,
        r: std::ops::Range<usize>,
        s: std::ops::Range<usize>,
        diag: bool,
        rows: &mut RowSums,
        extremes: &mut [(Vec<PairValue>, Vec<PairValue>)],
        recomputed: &mut u64,
        scratch: &mut Scratch,
    ) -> [Moments; N_METRICS] {
        let cls = self.cls;
        let d = cls.d;
        let (m, n) = (r.len(), s.len());
        let Scratch {
            gram: g,
            gram32,
            columns: buf,
            u2: u2buf,
            u2_raw: u2raw_buf,
            excluded: excl_buf,
        } = scratch;
        gram_block(cls, self.single, self.f32_gemm, r.start, m, s.start, n, g, gram32);
        let riesz_on = self.riesz_s.is_some();
        // Per metric: the tile's moments, each row's merged in by Chan's
        // formula after two passes over the row (mean, then M2 about it)
        // while it is in cache.
        let mut tile = [Moments::default(); N_METRICS];
        for b in buf.iter_mut() {
            b.resize(n, 0.0);
        }
        u2buf.resize(n, 0.0);
        u2raw_buf.resize(n, 0.0);
        excl_buf.resize(n, false);
        let (n2, inv, var) = (self.norm2, self.inv_norm, cls.var);
        for (ia, a) in r.clone().enumerate() {
            let j0 = if diag { ia + 1 } else { 0 };
            if j0 >= n {
                continue;
            }
            let cols = s.start + j0..s.end;
            let len = cols.len();
            let row_span = ia * n + j0..(ia + 1) * n;
            let (n2b, invb, varb) = (&n2[cols.clone()], &inv[cols.clone()], &var[cols.clone()]);
            let (n2a, inva, vara) = (n2[a], inv[a], var[a]);
            let (irb, ira) = (&self.inv_raw[cols.clone()], self.inv_raw[a]);
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
            let u2 = &mut u2buf[..len];
            let u2r = &mut u2raw_buf[..len];
            let geometry = Geometry {
                gram,
                dist2: cdnv,
                cos: intf,
                u2,
                u2r,
            };
            let suspect = if self.f32_gemm {
                self.row_geometry(&gram32[row_span], a, cols.clone(), geometry)
            } else {
                self.row_geometry(&g[row_span], a, cols.clone(), geometry)
            };
            let thr = self.threshold;
            // Pairs whose subtraction cancelled (rare): recompute from the
            // vectors. An exact value can be too small for the fast
            // logarithm below, which then gives way to the library's.
            let mut unusual = false;
            let ma = &cls.centred[a * d..(a + 1) * d];
            for j in (0..len).filter(|_| suspect) {
                let b = cols.start + j;
                if cdnv[j] < thr * (n2a + n2b[j]) {
                    let mb = &cls.centred[b * d..(b + 1) * d];
                    cdnv[j] = ma.iter().zip(mb).map(|(x, y)| (x - y) * (x - y)).sum();
                    *recomputed += 1;
                }
                if u2[j] < thr && n2a > 0.0 && n2b[j] > 0.0 {
                    let mb = &cls.centred[b * d..(b + 1) * d];
                    u2[j] = ma
                        .iter()
                        .zip(mb)
                        .map(|(x, y)| {
                            let e = x * inva - y * invb[j];
                            e * e
                        })
                        .sum();
                    intf[j] = 1.0 - u2[j] / 2.0;
                    unusual |= u2[j] > 0.0 && u2[j] < self.ln_min;
                    *recomputed += 1;
                }
                if u2r[j] < thr && ira > 0.0 && irb[j] > 0.0 {
                    let mb = &cls.centred[b * d..(b + 1) * d];
                    u2r[j] = ma
                        .iter()
                        .zip(mb)
                        .zip(cls.mean_bar)
                        .map(|((x, y), z)| {
                            let e = (x + z) * ira - (y + z) * irb[j];
                            e * e
                        })
                        .sum();
                    unusual |= u2r[j] > 0.0 && u2r[j] < self.ln_min;
                    *recomputed += 1;
                }
            }
            // Metric values; NaN where undefined.
            // The exponent is chosen outside the loops: inside, a vectorised
            // loop would call pow for every lane.
            let hp = self.half_power;
            let cdnv_of = |dist2: f64, denom: f64, vb: f64| {
                let v = (vara + vb) / (2.0 * denom);
                if dist2 > 0.0 { v } else { f64::NAN }
            };
            if hp == 2.0 {
                for (c, &vb) in cdnv.iter_mut().zip(varb.iter()) {
                    *c = cdnv_of(*c, *c * *c, vb);
                }
            } else if hp == 1.0 {
                for (c, &vb) in cdnv.iter_mut().zip(varb.iter()) {
                    *c = cdnv_of(*c, *c, vb);
                }
            } else {
                for (c, &vb) in cdnv.iter_mut().zip(varb.iter()) {
                    *c = cdnv_of(*c, c.powf(hp), vb);
                }
            }
            let directions = Directions {
                directed_a: n2a > 0.0,
                n2b,
                directed_raw_a: ira > 0.0,
                irb,
                u2,
                u2r,
            };
            if unusual {
                directions.kernels(intf, logk, logku, f64::ln);
            } else if self.f32_gemm {
                directions.kernels(intf, logk, logku, ln_fast_f32);
            } else {
                directions.kernels(intf, logk, logku, ln_fast);
            }
            if let Some(rs) = self.riesz_s {
                for (x, &l) in riesz
                    .iter_mut()
                    .zip(logk.iter())
                    .chain(rieszu.iter_mut().zip(logku.iter()))
                {
                    // ||u - u'||^-s = exp(s * log(1/||u - u'||)).
                    *x = if l == l { (rs * l).exp() } else { f64::NAN };
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
                let (sum, cnt, mn, mx) = defined_moments(v);
                let mean = if cnt > 0 { sum / cnt as f64 } else { 0.0 };
                let m2 = squares_about(v, mean);
                tile[k] = tile[k].combine(&Moments {
                    n: cnt,
                    mean,
                    m2,
                    min: mn,
                    max: mx,
                    excluded: len as u64 - cnt,
                });
                if k < ROW_METRICS {
                    rows.sum[k][a] += sum;
                    rows.undefined[k][a] += len as u64 - cnt;
                    for (s_, &x) in rows.sum[k][cols.clone()].iter_mut().zip(v) {
                        *s_ += if x == x { x } else { 0.0 };
                    }
                    if cnt < len as u64 {
                        any_undefined = true;
                        let undefined = &mut rows.undefined[k][cols.clone()];
                        for ((u, e), &x) in undefined.iter_mut().zip(excl.iter_mut()).zip(v) {
                            let nan = x != x;
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
                        if x == x {
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
    let tail = len - rest.len();
    for (l, &x) in rest.iter().enumerate() {
        if x > best[l] {
            best[l] = x;
            at[l] = tail + l;
        }
    }
    let mut top = rows.top(a);
    for l in 0..LANES {
        if at[l] != usize::MAX && better((best[l], b0 + at[l]), top) {
            top = (best[l], b0 + at[l]);
        }
    }
    (rows.top_value[a], rows.top_index[a]) = top;
}

/// Lanes of the row reductions below: independent partial sums, so the
/// loops vectorise (one running sum would chain every addition), added up
/// in a fixed order, so results do not depend on the CPU.
const LANES: usize = 16;

/// Sum, count, minimum and maximum of the defined (non-NaN) entries.
#[inline(always)]
fn defined_moments(v: &[f64]) -> (f64, u64, f64, f64) {
    let mut sum = [0.0f64; LANES];
    let mut cnt = [0u64; LANES];
    let mut mn = [f64::INFINITY; LANES];
    let mut mx = [f64::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for ch in chunks {
        for l in 0..LANES {
            let x = ch[l];
            let ok = x == x;
            sum[l] += if ok { x } else { 0.0 };
            cnt[l] += ok as u64;
            mn[l] = if x < mn[l] { x } else { mn[l] };
            mx[l] = if x > mx[l] { x } else { mx[l] };
        }
    }
    for (l, &x) in rest.iter().enumerate() {
        let ok = x == x;
        sum[l] += if ok { x } else { 0.0 };
        cnt[l] += ok as u64;
        mn[l] = if x < mn[l] { x } else { mn[l] };
        mx[l] = if x > mx[l] { x } else { mx[l] };
    }
    (
        sum.iter().sum(),
        cnt.iter().sum(),
        mn.iter().fold(f64::INFINITY, |a, &b| if b < a { b } else { a }),
        mx.iter().fold(f64::NEG_INFINITY, |a, &b| if b > a { b } else { a }),
    )
}

/// Sum of (x - mean)^2 over the defined entries.
#[inline(always)]
fn squares_about(v: &[f64], mean: f64) -> f64 {
    let mut m2 = [0.0f64; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for ch in chunks {
        for l in 0..LANES {
            let e = ch[l] - mean;
            m2[l] += if e == e { e * e } else { 0.0 };
        }
    }
    for (l, &x) in rest.iter().enumerate() {
        let e = x - mean;
        m2[l] += if e == e { e * e } else { 0.0 };
    }
    m2.iter().sum()
}

/// One tile row's squared direction differences ||u_a - u_b||^2, centred
/// (`u2`) and uncentred (`u2r`), and which classes have a direction.
struct Directions<'r> {
    directed_a: bool,
    n2b: &'r [f64],
    directed_raw_a: bool,
    irb: &'r [f64],
    u2: &'r [f64],
    u2r: &'r [f64],
}

impl Directions<'_> {
    /// Interference (NaN without directions) and both log kernels
    /// -ln(||u_a - u_b||^2)/2 (NaN also for identical directions) in one
    /// branch-free pass with the logarithm `ln`, so it vectorises.
    #[inline(always)]
    fn kernels(&self, intf: &mut [f64], logk: &mut [f64], logku: &mut [f64], ln: impl Fn(f64) -> f64) {
        for j in 0..intf.len() {
            let directed = self.directed_a & (self.n2b[j] > 0.0);
            intf[j] = if directed { intf[j] } else { f64::NAN };
            let l = -0.5 * ln(self.u2[j]);
            logk[j] = if directed & (self.u2[j] > 0.0) { l } else { f64::NAN };
            let directed_raw = self.directed_raw_a & (self.irb[j] > 0.0);
            let l = -0.5 * ln(self.u2r[j]);
            logku[j] = if directed_raw & (self.u2r[j] > 0.0) { l } else { f64::NAN };
        }
    }
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
    const LN2_HI: f64 = 6.931_471_803_691_238_2e-1;
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
                                + s2 * (1.0 / 17.0 + s2 * (1.0 / 19.0 + s2 * (1.0 / 21.0 + s2 * (1.0 / 23.0))))))))));
    let ln_m = 2.0 * s + 2.0 * s * s2 * p;
    e * LN2_HI + (ln_m + e * LN2_LO)
}

/// G[r, s] = <m_{r0+r}, m_{s0+s}> for an m x n block, into `out` (f64) or
/// `g32` (f32 products, widened where they are read).
#[allow(clippy::too_many_arguments)]
fn gram_block(
    cls: &Classes,
    single: &[f32],
    f32_gemm: bool,
    r0: usize,
    m: usize,
    s0: usize,
    n: usize,
    out: &mut Vec<f64>,
    g32: &mut Vec<f32>,
) {
    let d = cls.d;
    if f32_gemm {
        // Every element is written (beta = 1, read_dst = false).
        g32.resize(m * n, 0.0);
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
    } else {
        out.resize(m * n, 0.0);
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
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
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
    let single: Vec<f32> = if f32_gemm {
        centred.iter().map(|&x| x as f32).collect()
    } else {
        Vec::new()
    };
    let edge = edge.max(1);
    let nt = c.div_ceil(edge);
    let tiles: Vec<(usize, usize)> = (0..nt).flat_map(|i| (i..nt).map(move |j| (i, j))).collect();
    let t = std::time::Instant::now();
    let checksum: f64 = tiles
        .par_iter()
        .map_init(<(Vec<f64>, Vec<f32>)>::default, |(g, g32), &(ti, tj)| {
            let r0 = ti * edge;
            let s0 = tj * edge;
            let (m, n) = (edge.min(c - r0), edge.min(c - s0));
            gram_block(&cls, &single, f32_gemm, r0, m, s0, n, g, g32);
            if f32_gemm { g32[0] as f64 } else { g[0] }
        })
        .sum();
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
            assert!((logk.max - want).abs() <= 1e-12 * want, "f32={f32_gemm}: {} vs {want}", logk.max);
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
        let sweep = std::iter::successors(Some(f64::MIN_POSITIVE), |x| Some(x * 1.000_173_1)).take_while(|&x| x < 1e300);
        let dense = (1..200_000).flat_map(|i| {
            let i = i as f64;
            [1.0 + i * 1e-9, 1.0 - i * 1e-9, std::f64::consts::SQRT_2 * (1.0 + (i - 1e5) * 1e-12)]
        });
        let edges = [0.5, 1.0, 2.0, 3.999, 4.0, 1e-300, 7.0e-4];
        let worst = worst_ulp(sweep.chain(dense).chain(edges), ln_fast, f64::EPSILON, f64::MIN_POSITIVE);
        assert!(worst <= 4.0, "worst error {worst} ulp");
    }

    /// ln_fast_f32 against the library's f64 ln over f32's normal range and
    /// densely near 1 and sqrt(2) (the reduction's seams): within 2 f32 ulp
    /// of the exact result, counting the rounding of the argument to f32.
    #[test]
    fn f32_log_is_within_a_few_f32_ulp() {
        let sweep = std::iter::successors(Some(f32::MIN_POSITIVE), |x| Some(x * 1.000_37)).take_while(|&x| x < 1e38);
        let dense = (1..200_000).flat_map(|i| {
            let i = i as f32;
            [1.0 + i * 1e-7, 1.0 - i * 5e-8, std::f32::consts::SQRT_2 * (1.0 + (i - 1e5) * 1e-9)]
        });
        let edges = [0.5, 1.0, 2.0, 3.999, 4.0, 2.2e-16, 7.0e-4];
        let xs = sweep.chain(dense).chain(edges).map(f64::from);
        let worst = worst_ulp(xs, ln_fast_f32, f32::EPSILON as f64, f32::MIN_POSITIVE as f64);
        assert!(worst <= 2.0, "worst error {worst} f32 ulp");
    }
}
