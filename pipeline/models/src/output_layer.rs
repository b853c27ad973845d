//! The output layer without its logits, for eval and decide.
//!
//! - [`loss_and_argmax`] (eval): per row of hidden states h, the
//!   cross-entropy of its label under the logits h Wᵀ and their first
//!   argmax;
//! - [`affine_argmax`] (decide): per row, the first argmax over classes j
//!   of `scale <h, c_j> - offset_j` (the classifier rows, or the class
//!   centres with offset ‖μ_j‖²).
//!
//! On the CPU the class rows are walked in chunks whose [N, chunk] scores
//! stay in cache, as the training loss walks them
//! ([`crate::loss::linear_cross_entropy`]): each chunk is one GEMM into a
//! reused buffer, folded at once into a running logsumexp and maximum per
//! row, so no [N, V] buffer is ever written to memory and memory stays
//! O(N·chunk) whatever the vocabulary (152k included). Runs of consecutive
//! chunks go to rayon and are combined in order, so results do not depend
//! on the schedule. Elsewhere (CUDA) the scores are formed through candle
//! in row blocks of at most 256 MiB.
//!
//! Ties go to the lowest class index (the first maximum), as candle's
//! argmax does; a NaN score never becomes the maximum.

use candle_core::{CpuStorage, D, DType, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{Context, Error, Result};
use crate::loss::{first_max_lanes, gemm_into, label_logits, lse_argmax, lse_merge, row_losses};

/// Scores per chunk: 2^20 (4 MiB in f32). Larger chunks amortise the
/// packing of the hidden states that each GEMM call repeats: on two cores
/// (1 MiB L2 each) 2^20 ran the eval output layer 40 % faster than 2^17,
/// which fits in L2 (`pipeline bench eval`).
const CHUNK_SCORES: usize = 1 << 20;

/// At most this many runs of consecutive chunks go to rayon.
const RUNS: usize = 32;

/// Bytes of scores a non-CPU row block may hold.
const BLOCK_BYTES: usize = 256 << 20;

/// An element type of the fused path.
trait Element: Copy + Send + Sync + PartialOrd + 'static {
    const ZERO: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
}

impl Element for f32 {
    const ZERO: Self = 0.0;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn slice(s: &CpuStorage) -> Option<&[f32]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Element for f64 {
    const ZERO: Self = 0.0;
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn slice(s: &CpuStorage) -> Option<&[f64]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// A row's running state over the chunks seen so far.
#[derive(Debug, Clone, Copy)]
struct Running {
    lse: f64,
    max: f64,
    arg: u32,
}

impl Running {
    const START: Running = Running {
        lse: f64::NEG_INFINITY,
        max: f64::NEG_INFINITY,
        arg: 0,
    };

    /// Fold in the state of later columns: a tie keeps the earlier maximum.
    fn merge(&mut self, later: Running) {
        self.lse = lse_merge(self.lse, later.lse);
        if later.max > self.max {
            self.max = later.max;
            self.arg = later.arg;
        }
    }
}

/// The first maximum of a row and its index; (-inf, 0) for a row of NaN.
fn first_max<T: Element>(z: &[T]) -> (f64, u32) {
    let (best, arg) = first_max_lanes::<T, 8>(z, T::from_f64(f64::NEG_INFINITY));
    (best.to_f64(), arg)
}

/// Per row of h [n, d]: the running state over all K class rows of c
/// [K, d] of the scores `scale <h, c_j> - offset_j`, each chunk's rows
/// folded by `fold(scores of one row, first class of the chunk)`.
fn walk<T: Element>(
    h: &[T],
    c: &[T],
    (n, d, k): (usize, usize, usize),
    scale: T,
    offset: Option<&[T]>,
    fold: &(dyn Fn(&[T], u32) -> Running + Sync),
) -> Vec<Running> {
    let chunk = (CHUNK_SCORES / n.max(1)).clamp(16, 4096);
    let starts: Vec<usize> = (0..k).step_by(chunk).collect();
    let per_run = starts.len().div_ceil(RUNS).max(1);
    let runs: Vec<Vec<Running>> = starts
        .par_chunks(per_run)
        .map(|run| {
            let (mut acc, mut z) = (vec![Running::START; n], Vec::new());
            for &j0 in run {
                let len = chunk.min(k - j0);
                // Every element is written by the product before it is read.
                z.resize(n * len, T::ZERO);
                gemm_into(
                    (n, len, d),
                    (&mut z, (len, 1)),
                    false,
                    h,
                    (d, 1),
                    &c[j0 * d..(j0 + len) * d],
                    (1, d),
                    (T::ZERO, scale),
                );
                for (a, zr) in acc.iter_mut().zip(z.chunks_exact_mut(len)) {
                    if let Some(off) = offset {
                        for (x, &o) in zr.iter_mut().zip(&off[j0..j0 + len]) {
                            *x = T::from_f64(x.to_f64() - o.to_f64());
                        }
                    }
                    a.merge(fold(zr, j0 as u32));
                }
            }
            acc
        })
        .collect();
    let mut total = vec![Running::START; n];
    for run in runs {
        for (t, r) in total.iter_mut().zip(run) {
            t.merge(r);
        }
    }
    total
}

/// A contiguous CPU tensor's elements as `T`, or `None` (another device or
/// dtype, or not contiguous).
fn with_cpu_slice<T: Element, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let (o1, o2) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(s) => T::slice(s).map(|v| f(&v[o1..o2])),
        _ => None,
    }
}

/// (N, d) of hidden and (K, d) of classes, checked to agree.
fn dims(hidden: &Tensor, classes: &Tensor) -> Result<(usize, usize, usize)> {
    match (hidden.dims(), classes.dims()) {
        ([n, d], [k, dk]) if d == dk => Ok((*n, *d, *k)),
        (a, b) => Err(Error::invalid(format!(
            "output layer: hidden states [N, d] and class rows [K, d] expected, got {a:?} and {b:?}"
        ))),
    }
}

/// Per row of `hidden` [N, d]: the cross-entropy of `labels` under the
/// logits `hidden @ weight^T` (weight [V, d]), in f64 (logsumexp merged
/// in f64 from f32 partial sums, the label's logit an f64 dot product of
/// the f32 operands), and the first argmax of the logits.
pub fn loss_and_argmax(hidden: &Tensor, weight: &Tensor, labels: &[u32]) -> Result<(Vec<f64>, Vec<u32>)> {
    let (n, d, v) = dims(hidden, weight)?;
    if labels.len() != n {
        return Err(Error::invalid(format!("{} labels for {n} rows", labels.len())));
    }
    if let Some(&bad) = labels.iter().find(|&&y| y as usize >= v) {
        return Err(Error::invalid(format!(
            "label {bad} is outside the vocabulary of {v}"
        )));
    }
    let (h, w) = (
        hidden.contiguous().ctx("hidden states")?,
        weight.contiguous().ctx("classifier")?,
    );
    let fused = with_cpu_slice::<f32, _>(&h, |h| {
        with_cpu_slice::<f32, _>(&w, |w| {
            let fold = |z: &[f32], j0: u32| {
                let (lse, max, arg) = lse_argmax(z);
                Running {
                    lse,
                    max: f64::from(max),
                    arg: j0 + arg,
                }
            };
            let rows = walk(h, w, (n, d, v), 1.0, None, &fold);
            let zy = label_logits(h, w, labels, d);
            rows.iter().zip(zy).map(|(r, z)| (r.lse - z, r.arg)).unzip()
        })
    })
    .flatten();
    if let Some(out) = fused {
        return Ok(out);
    }
    // Elsewhere: the logits in row blocks.
    let block = (BLOCK_BYTES / (4 * v.max(1))).clamp(1, 1024);
    let (mut losses, mut argmax) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for r0 in (0..n).step_by(block) {
        let len = block.min(n - r0);
        let logits = h
            .narrow(0, r0, len)
            .and_then(|hb| hb.matmul(&w.t()?))
            .and_then(|z| z.to_dtype(DType::F32))
            .ctx("output layer")?;
        let ls: Vec<f32> = row_losses(&logits, &labels[r0..r0 + len])?
            .to_vec1()
            .ctx("losses")?;
        losses.extend(ls.into_iter().map(f64::from));
        argmax.extend(
            logits
                .argmax(D::Minus1)
                .and_then(|a| a.to_vec1::<u32>())
                .ctx("argmax")?,
        );
    }
    Ok((losses, argmax))
}

/// Per row of `hidden` [N, d], the first argmax over the rows c_j of
/// `classes` [K, d] of `scale <h, c_j> - offset_j` (`offset` of K rows, or none),
/// in the dtype of the operands (f32 or f64; both the same).
pub fn affine_argmax(
    hidden: &Tensor,
    classes: &Tensor,
    scale: f64,
    offset: Option<&Tensor>,
) -> Result<Vec<u32>> {
    let (n, d, k) = dims(hidden, classes)?;
    if let Some(o) = offset
        && o.dims() != [k]
    {
        return Err(Error::invalid(format!(
            "output layer: an offset of [{k}] expected, got {:?}",
            o.dims()
        )));
    }
    let h = hidden.contiguous().ctx("hidden states")?;
    let c = classes.contiguous().ctx("class rows")?;
    let o = offset.map(|o| o.contiguous()).transpose().ctx("offsets")?;
    fn fused<T: Element>(
        h: &Tensor,
        c: &Tensor,
        o: Option<&Tensor>,
        dims: (usize, usize, usize),
        scale: f64,
    ) -> Option<Vec<u32>> {
        let fold = |z: &[T], j0: u32| {
            let (max, arg) = first_max(z);
            Running {
                lse: f64::NEG_INFINITY,
                max,
                arg: j0 + arg,
            }
        };
        with_cpu_slice::<T, _>(h, |h| {
            with_cpu_slice::<T, _>(c, |c| {
                let rows = |off: Option<&[T]>| -> Vec<u32> {
                    walk(h, c, dims, T::from_f64(scale), off, &fold)
                        .iter()
                        .map(|r| r.arg)
                        .collect()
                };
                match o {
                    None => Some(rows(None)),
                    Some(o) => with_cpu_slice::<T, _>(o, |o| rows(Some(o))),
                }
            })
        })
        .flatten()
        .flatten()
    }
    let done = match h.dtype() {
        DType::F32 => fused::<f32>(&h, &c, o.as_ref(), (n, d, k), scale),
        DType::F64 => fused::<f64>(&h, &c, o.as_ref(), (n, d, k), scale),
        _ => None,
    };
    if let Some(out) = done {
        return Ok(out);
    }
    // Elsewhere: the scores in row blocks.
    let block = (BLOCK_BYTES / (8 * k.max(1))).clamp(1, 1 << 16);
    let c_t = c.t().ctx("class rows")?;
    let mut out = Vec::with_capacity(n);
    for r0 in (0..n).step_by(block) {
        let len = block.min(n - r0);
        let scores = h
            .narrow(0, r0, len)
            .and_then(|hb| hb.matmul(&c_t))
            .and_then(|s| s * scale)
            .ctx("scores")?;
        let scores = match &o {
            Some(o) => scores.broadcast_sub(o).ctx("scores")?,
            None => scores,
        };
        out.extend(
            scores
                .argmax(D::Minus1)
                .and_then(|a| a.to_vec1::<u32>())
                .ctx("argmax")?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Random [n, d] and [k, d] operands from a seeded generator.
    fn operands(n: usize, d: usize, k: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = lc_metrics::correlation::Rng::new(seed);
        let mut draw = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| (rng.below(1 << 20) as f32 / (1 << 19) as f32 - 1.0) * 2.0)
                .collect()
        };
        (draw(n * d), draw(k * d))
    }

    /// Loss and argmax against an f64 brute force over the whole
    /// vocabulary: the loss to 1e-5 relative (f32 products of d terms), the
    /// argmax exactly except where the two best logits are within f32
    /// rounding of each other (none here: checked). Vocabularies that are
    /// one chunk, many chunks with a short last one, and more chunks than
    /// runs.
    #[test]
    fn loss_and_argmax_match_a_brute_force() {
        for (n, d, v) in [(5, 3, 7), (37, 16, 1000), (300, 8, 50_257)] {
            let (h, w) = operands(n, d, v, v as u64);
            let labels: Vec<u32> = (0..n).map(|r| ((r * 7919) % v) as u32).collect();
            let ht = Tensor::from_slice(&h, (n, d), &Device::Cpu).unwrap();
            let wt = Tensor::from_slice(&w, (v, d), &Device::Cpu).unwrap();
            let (losses, argmax) = loss_and_argmax(&ht, &wt, &labels).unwrap();
            for r in 0..n {
                let z: Vec<f64> = (0..v)
                    .map(|j| (0..d).map(|i| h[r * d + i] as f64 * w[j * d + i] as f64).sum())
                    .collect();
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                let want = lse - z[labels[r] as usize];
                assert!(
                    (losses[r] - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{} vs {want}",
                    losses[r]
                );
                let best = z.iter().position(|&x| x == m).unwrap();
                let mut sorted = z.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                if sorted[0] - sorted[1] > 1e-5 * sorted[0].abs().max(1.0) {
                    assert_eq!(argmax[r] as usize, best, "row {r} of ({n}, {d}, {v})");
                }
            }
        }
    }

    /// The fused scores' argmax equals candle's argmax over the formed
    /// scores, ties included (duplicated class rows: the first wins), in
    /// f64 and f32, with and without an offset.
    #[test]
    fn affine_argmax_matches_formed_scores() {
        let (n, d, k) = (211, 6, 3000);
        let (h, mut c) = operands(n, d, k, 3);
        // Class 2500 duplicates class 17: ties resolve to 17.
        let row17: Vec<f32> = c[17 * d..18 * d].to_vec();
        c[2500 * d..2501 * d].copy_from_slice(&row17);
        let offset: Vec<f32> = (0..k).map(|j| (j % 13) as f32 * 0.01).collect();
        for dt in [DType::F64, DType::F32] {
            let ht = Tensor::from_slice(&h, (n, d), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let ct = Tensor::from_slice(&c, (k, d), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let ot = Tensor::from_slice(&offset, k, &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            for (scale, off) in [(1.0, None), (2.0, Some(&ot))] {
                let got = affine_argmax(&ht, &ct, scale, off).unwrap();
                let mut scores = (ht.matmul(&ct.t().unwrap()).unwrap() * scale).unwrap();
                if let Some(o) = off {
                    scores = scores.broadcast_sub(o).unwrap();
                }
                let want = scores.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
                let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                // f32: the GEMMs may round a near-tie differently.
                let allowed = if dt == DType::F64 { 0 } else { 2 };
                assert!(differ <= allowed, "{dt:?} scale {scale}: {differ} rows differ");
                assert!(!got.contains(&2500), "a tie goes to the first class");
            }
        }
    }

    /// The lane-wise first maximum against a plain scan: ties across lanes
    /// and blocks, a maximum in the tail, NaN and -inf entries.
    #[test]
    fn first_max_is_the_first_maximum() {
        let plain = |z: &[f64]| {
            let mut best = (f64::NEG_INFINITY, 0u32);
            for (j, &x) in z.iter().enumerate() {
                if x > best.0 {
                    best = (x, j as u32);
                }
            }
            best
        };
        let mut rng = lc_metrics::correlation::Rng::new(11);
        for len in [1usize, 5, 8, 9, 16, 23, 64, 1000] {
            for case in 0..4 {
                let mut z: Vec<f64> = (0..len).map(|_| rng.below(7) as f64).collect();
                if case == 1 {
                    z[len - 1] = 99.0;
                }
                if case == 2 {
                    z[rng.below(len as u64) as usize] = f64::NAN;
                }
                if case == 3 {
                    z.iter_mut().for_each(|x| *x = f64::NEG_INFINITY);
                }
                assert_eq!(first_max(&z), plain(&z), "len {len} case {case}: {z:?}");
                let z32: Vec<f32> = z.iter().map(|&x| x as f32).collect();
                assert_eq!(first_max(&z32), plain(&z), "f32 len {len} case {case}");
            }
        }
    }

    /// A shape mismatch is an error naming both shapes, not a panic.
    #[test]
    fn mismatched_shapes_are_errors() {
        let h = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((10, 5), DType::F32, &Device::Cpu).unwrap();
        let e = loss_and_argmax(&h, &w, &[0, 1, 2, 3]).unwrap_err().to_string();
        assert!(e.contains("[4, 3]") && e.contains("[10, 5]"), "{e}");
        let w = Tensor::zeros((10, 3), DType::F32, &Device::Cpu).unwrap();
        let e = loss_and_argmax(&h, &w, &[0, 1, 2, 10]).unwrap_err().to_string();
        assert!(e.contains("label 10"), "{e}");
    }
}
