//! Cross-entropy over the full vocabulary.
//!
//! The vocabulary-sized logits dominate a small model's cost, so on the CPU
//! the loss is one fused, rayon-parallel pass per row (max, log-sum-exp, pick
//! the label) with a matching fused backward (softmax minus one-hot), instead
//! of the half-dozen vocabulary-sized temporaries the primitive formulation
//! allocates. Elsewhere (CUDA) the primitive formulation is used; both give
//! the same numbers and the tests check the fused one against it.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{Context, Result};
use lc_kernels::fast_exp::exp_f32;

struct RowLoss {
    labels: Arc<Vec<u32>>,
}

/// Gradient of the row losses: inputs (logits, row losses, upstream grads).
struct RowLossGrad {
    labels: Arc<Vec<u32>>,
}

fn rows<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<(&'a [T], usize, usize)> {
    let (o1, o2) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("cross-entropy input must be contiguous".into()))?;
    let dims = l.shape().dims();
    if dims.len() != 2 {
        candle_core::bail!("cross-entropy expects [rows, vocab] logits, got {dims:?}");
    }
    Ok((&s[o1..o2], dims[0], dims[1]))
}

fn vector<'a, T>(s: &'a [T], l: &Layout, n: usize) -> &'a [T] {
    &s[l.start_offset()..l.start_offset() + n]
}

trait Logit: Copy + Send + Sync + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
    /// logsumexp of a row.
    fn lse(z: &[Self]) -> f64;
    /// out_j = g * exp(z_j - lse).
    fn scaled_softmax(z: &[Self], lse: f64, g: f64, out: &mut [Self]);
}

impl Logit for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn lse(z: &[f32]) -> f64 {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked above).
                return unsafe { lse_avx512(z) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                return unsafe { lse_avx2(z) };
            }
        }
        lse_lanes::<8>(z)
    }
    fn scaled_softmax(z: &[f32], lse: f64, g: f64, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: as in lse.
                return unsafe { scaled_softmax_avx512(z, lse, g, out) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: as in lse.
                return unsafe { scaled_softmax_avx2(z, lse, g, out) };
            }
        }
        scaled_softmax_f32(z, lse, g, out)
    }
}

// The vocabulary-wide loops are a large share of a small model's training
// step; the portable build only has SSE2, so they are compiled again for
// AVX2 and AVX-512 and chosen at run time (the same arithmetic: the lane
// count only changes the summation order of the f32 partial sums).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lse_avx512(z: &[f32]) -> f64 {
    lse_lanes::<16>(z)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lse_avx2(z: &[f32]) -> f64 {
    lse_lanes::<8>(z)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scaled_softmax_avx512(z: &[f32], lse: f64, g: f64, out: &mut [f32]) {
    scaled_softmax_f32(z, lse, g, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scaled_softmax_avx2(z: &[f32], lse: f64, g: f64, out: &mut [f32]) {
    scaled_softmax_f32(z, lse, g, out)
}

/// logsumexp of a row with `L` independent f32 lanes (vectorised),
/// combined in f64.
#[inline(always)]
fn lse_lanes<const L: usize>(z: &[f32]) -> f64 {
    let mut m = [f32::NEG_INFINITY; L];
    let chunks = z.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let mut mx = tail
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for v in m {
        mx = if v > mx { v } else { mx };
    }
    let mut s = [0f32; L];
    for c in z.chunks_exact(L) {
        for i in 0..L {
            s[i] += exp_f32(c[i] - mx);
        }
    }
    let total: f64 =
        s.iter().map(|&x| x as f64).sum::<f64>() + tail.iter().map(|&x| exp_f32(x - mx) as f64).sum::<f64>();
    mx as f64 + total.ln()
}

/// logsumexp, maximum and the index of its first occurrence of a row of
/// f32 logits, in one pass for the maximum and one for the sum: the
/// output layer's epilogue in eval (see `output_layer`).
pub(super) fn lse_argmax(z: &[f32]) -> (f64, f32, u32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { lse_argmax_avx512(z) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { lse_argmax_avx2(z) };
        }
    }
    lse_argmax_lanes::<8>(z)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lse_argmax_avx512(z: &[f32]) -> (f64, f32, u32) {
    lse_argmax_lanes::<16>(z)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lse_argmax_avx2(z: &[f32]) -> (f64, f32, u32) {
    lse_argmax_lanes::<8>(z)
}

/// The first maximum of a row and its index, with `L` independent lanes
/// (vectorised) that each keep the block where their maximum first
/// appeared: the lowest index holding the maximum wins, a NaN never
/// replaces a maximum, and a row of NaN or `lowest` gives (`lowest`, 0).
/// The max pass of [`lse_argmax`] and decide's argmax (`output_layer`).
#[inline(always)]
pub(super) fn first_max_lanes<T: Copy + PartialOrd, const L: usize>(z: &[T], lowest: T) -> (T, u32) {
    let mut m = [lowest; L];
    let mut at = [0u32; L];
    let blocks = z.chunks_exact(L);
    let tail = blocks.remainder();
    for (j, c) in blocks.enumerate() {
        for i in 0..L {
            let more = c[i] > m[i];
            m[i] = if more { c[i] } else { m[i] };
            at[i] = if more { j as u32 } else { at[i] };
        }
    }
    let (mut best, mut arg) = (lowest, 0u32);
    for i in 0..L {
        let idx = at[i] * L as u32 + i as u32;
        if m[i] > best || (m[i] == best && idx < arg) {
            (best, arg) = (m[i], idx);
        }
    }
    let full = (z.len() - tail.len()) as u32;
    for (k, &x) in tail.iter().enumerate() {
        if x > best {
            (best, arg) = (x, full + k as u32);
        }
    }
    (best, arg)
}

/// [`lse_lanes`] whose max pass also finds the argmax ([`first_max_lanes`]).
#[inline(always)]
fn lse_argmax_lanes<const L: usize>(z: &[f32]) -> (f64, f32, u32) {
    let (mx, arg) = first_max_lanes::<f32, L>(z, f32::NEG_INFINITY);
    let tail = z.chunks_exact(L).remainder();
    let mut s = [0f32; L];
    for c in z.chunks_exact(L) {
        for i in 0..L {
            s[i] += exp_f32(c[i] - mx);
        }
    }
    let total: f64 =
        s.iter().map(|&x| x as f64).sum::<f64>() + tail.iter().map(|&x| exp_f32(x - mx) as f64).sum::<f64>();
    (mx as f64 + total.ln(), mx, arg)
}

#[inline(always)]
fn scaled_softmax_f32(z: &[f32], lse: f64, g: f64, out: &mut [f32]) {
    let (lse, g) = (lse as f32, g as f32);
    for (o, &x) in out.iter_mut().zip(z) {
        *o = g * exp_f32(x - lse);
    }
}

impl Logit for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> Self {
        x
    }
    fn lse(z: &[f64]) -> f64 {
        let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        m + z.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
    }
    fn scaled_softmax(z: &[f64], lse: f64, g: f64, out: &mut [f64]) {
        for (o, &x) in out.iter_mut().zip(z) {
            *o = g * (x - lse).exp();
        }
    }
}

/// Row losses logsumexp(z) - z_y.
fn row_loss<T: Logit>(src: &[T], labels: &[u32], v: usize) -> Vec<T> {
    src.par_chunks(v)
        .zip(labels.par_iter())
        .map(|(z, &y)| T::from_f64(T::lse(z) - z[y as usize].to_f64()))
        .collect()
}

/// d loss_r / d z_rj = g_r (softmax_j - [j = y_r]), with logsumexp_r taken
/// from the forward's result (loss_r + z_{r y_r}), so one exp per element.
fn row_loss_grad<T: Logit>(src: &[T], loss: &[T], g: &[T], labels: &[u32], v: usize) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); src.len()];
    out.par_chunks_mut(v)
        .zip(src.par_chunks(v))
        .zip(loss.par_iter().zip(g.par_iter().zip(labels.par_iter())))
        .for_each(|((o, z), (&l, (&g, &y)))| {
            let lse = l.to_f64() + z[y as usize].to_f64();
            T::scaled_softmax(z, lse, g.to_f64(), o);
            o[y as usize] = T::from_f64(o[y as usize].to_f64() - g.to_f64());
        });
    out
}

fn check_labels(labels: &[u32], n: usize, v: usize) -> candle_core::Result<()> {
    if labels.len() != n {
        candle_core::bail!("{} labels for {n} rows", labels.len());
    }
    if let Some(&bad) = labels.iter().find(|&&y| y as usize >= v) {
        candle_core::bail!("label {bad} is outside the vocabulary of {v}");
    }
    Ok(())
}

impl CustomOp1 for RowLoss {
    fn name(&self) -> &'static str {
        "row-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match storage {
            CpuStorage::F32(s) => {
                let (src, n, v) = rows(s, layout)?;
                check_labels(&self.labels, n, v)?;
                CpuStorage::F32(row_loss(src, &self.labels, v))
            }
            CpuStorage::F64(s) => {
                let (src, n, v) = rows(s, layout)?;
                check_labels(&self.labels, n, v)?;
                CpuStorage::F64(row_loss(src, &self.labels, v))
            }
            other => candle_core::bail!("cross-entropy: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from(self.labels.len())))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = arg.apply_op3_no_bwd(
            &res.contiguous()?,
            &grad_res.contiguous()?,
            &RowLossGrad {
                labels: self.labels.clone(),
            },
        )?;
        Ok(Some(g))
    }
}

impl CustomOp3 for RowLossGrad {
    fn name(&self) -> &'static str {
        "row-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = self.labels.len();
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(z), CpuStorage::F32(l), CpuStorage::F32(g)) => {
                let (src, _, v) = rows(z, l1)?;
                CpuStorage::F32(row_loss_grad(
                    src,
                    vector(l, l2, n),
                    vector(g, l3, n),
                    &self.labels,
                    v,
                ))
            }
            (CpuStorage::F64(z), CpuStorage::F64(l), CpuStorage::F64(g)) => {
                let (src, _, v) = rows(z, l1)?;
                CpuStorage::F64(row_loss_grad(
                    src,
                    vector(l, l2, n),
                    vector(g, l3, n),
                    &self.labels,
                    v,
                ))
            }
            _ => candle_core::bail!("cross-entropy grad: unsupported dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Per-row cross-entropy `logsumexp(z) - z_y` of logits [N, V] (differentiable).
pub fn row_losses(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let fused = logits.device().is_cpu() && matches!(logits.dtype(), DType::F32 | DType::F64);
    if fused {
        let z = logits.contiguous().ctx("cross-entropy")?;
        return z
            .apply_op1(RowLoss {
                labels: Arc::new(labels.to_vec()),
            })
            .ctx("cross-entropy");
    }
    row_losses_primitive(logits, labels)
}

/// The same loss from primitive operations (any device, autograd built in).
pub fn row_losses_primitive(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let run = || -> candle_core::Result<Tensor> {
        let z = logits.to_dtype(DType::F32)?;
        let m = z.max_keepdim(D::Minus1)?;
        let lse = (z.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &m)?;
        let y = Tensor::from_slice(labels, (labels.len(), 1), logits.device())?;
        let zy = z.gather(&y, 1)?;
        (lse - zy)?.squeeze(1)
    };
    run().ctx("cross-entropy")
}

/// Mean cross-entropy (the training loss).
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    row_losses(logits, labels)?.mean_all().ctx("cross-entropy mean")
}

/// Mean cross-entropy of the logits `hidden @ weight^T` (hidden [N, d],
/// weight [V, d]): the training loss with the output layer inside it.
///
/// On the CPU in f32 this is one op whose backward returns the gradients of
/// `hidden` and `weight` directly, so the [N, V] logits and their gradient
/// never enter the autograd graph: candle would otherwise allocate a zeroed
/// [N, V] accumulator and add the logits' gradient into it, a third of a
/// small model's training step. The op works through the vocabulary in
/// chunks whose [N, chunk] logits stay in cache, in the forward (a running
/// logsumexp per row) and again in the backward (logits recomputed, turned
/// into their gradient, and multiplied out at once), so no [N, V] buffer is
/// ever written to memory.
pub fn linear_cross_entropy(hidden: &Tensor, weight: &Tensor, labels: &[u32]) -> Result<Tensor> {
    linear_cross_entropy_chunked(hidden, weight, labels, None)
}

/// [`linear_cross_entropy`] with the vocabulary chunk given (tests), or
/// chosen for the cache when `None`.
fn linear_cross_entropy_chunked(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &[u32],
    chunk: Option<usize>,
) -> Result<Tensor> {
    let fused = hidden.device().is_cpu() && hidden.dtype() == DType::F32 && weight.dtype() == DType::F32;
    if !fused {
        let logits = hidden
            .matmul(&weight.t().ctx("output layer")?)
            .ctx("output layer")?;
        return cross_entropy(&logits, labels);
    }
    let h = hidden.contiguous().ctx("cross-entropy")?;
    let w = weight.contiguous().ctx("cross-entropy")?;
    let n = h.dim(0).ctx("cross-entropy")?;
    h.apply_op2(
        &w,
        LinearLoss {
            labels: Arc::new(labels.to_vec()),
            // 2^17 logits (512 KiB) per chunk: inside L2 beside its operands.
            chunk: chunk
                .unwrap_or_else(|| ((1 << 17) / n.max(1)).clamp(16, 4096))
                .max(1),
        },
    )
    .and_then(|l| l.mean_all())
    .ctx("cross-entropy")
}

struct LinearLoss {
    labels: Arc<Vec<u32>>,
    /// Vocabulary rows per task.
    chunk: usize,
}

/// C[m, n] (+)= A[m, k] B[k, n] for row-major C and operands given by their
/// element strides (row stride, column stride), on the calling thread.
pub(super) fn gemm_f32(
    dims: (usize, usize, usize),
    c: &mut [f32],
    accumulate: bool,
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
) {
    let c_factor = if accumulate { 1.0 } else { 0.0 };
    let c_strides = (dims.1, 1);
    gemm_into(
        dims,
        (c, c_strides),
        accumulate,
        a,
        a_strides,
        b,
        b_strides,
        (c_factor, 1.0),
    );
}

/// C[m, n] = c_factor C + product_factor A B for f32 or f64, every matrix
/// given by its element strides (row stride, column stride), on the
/// calling thread. The gemm crate's microkernel runs along the destination's
/// unit-stride dimension, so a narrow output (a few dozen columns) is best
/// written column-major (strides (1, m)).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_into<T: Copy + 'static>(
    (m, n, k): (usize, usize, usize),
    (c, (c_rs, c_cs)): (&mut [T], (usize, usize)),
    accumulate: bool,
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
    (c_factor, product_factor): (T, T),
) {
    assert!(m == 0 || n == 0 || c.len() > (m - 1) * c_rs + (n - 1) * c_cs);
    assert!(m == 0 || k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    assert!(k == 0 || n == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the asserts above bound every index the strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_cs as isize,
            c_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            c_factor,
            product_factor,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// (N, d, V) of hidden [N, d] and weight [V, d].
fn linear_dims(l1: &Layout, l2: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (a, b) = (l1.shape().dims(), l2.shape().dims());
    if a.len() != 2 || b.len() != 2 || a[1] != b[1] {
        candle_core::bail!(
            "linear cross-entropy expects hidden [N, d] and weight [V, d], got {a:?} and {b:?}"
        );
    }
    Ok((a[0], a[1], b[0]))
}

/// z [N, len] = h [N, d] w[v0 .. v0 + len]^T, into a reused buffer.
fn chunk_logits(h: &[f32], w: &[f32], (n, d): (usize, usize), v0: usize, len: usize, z: &mut Vec<f32>) {
    // Every element is written by the product before it is read.
    z.resize(n * len, 0.0);
    gemm_f32(
        (n, len, d),
        z,
        false,
        h,
        (d, 1),
        &w[v0 * d..(v0 + len) * d],
        (1, d),
    );
}

/// The logit of each row's label, in f64 from the f32 operands.
pub(super) fn label_logits(h: &[f32], w: &[f32], labels: &[u32], d: usize) -> Vec<f64> {
    h.chunks_exact(d)
        .zip(labels)
        .map(|(hr, &y)| {
            let wy = &w[y as usize * d..(y as usize + 1) * d];
            hr.iter().zip(wy).map(|(&a, &b)| a as f64 * b as f64).sum()
        })
        .collect()
}

/// log(e^a + e^b) without overflow (a or b may be -inf).
pub(super) fn lse_merge(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + ((a - m).exp() + (b - m).exp()).ln()
}

pub(super) fn cpu_f32_of<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let (o1, o2) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("linear cross-entropy input must be contiguous".into()))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[o1..o2]),
        other => candle_core::bail!("linear cross-entropy: unsupported dtype {:?}", other.dtype()),
    }
}

/// At most this many runs of consecutive vocabulary chunks are processed in
/// parallel. Each run is summed in order on one thread and the runs are
/// combined in order, so the loss and gradients do not depend on how rayon
/// schedules the work (a resumed training run reproduces the weights).
const CHUNK_RUNS: usize = 32;

impl LinearLoss {
    /// Vocabulary chunks per run, for V columns.
    fn per_run(&self, v: usize) -> usize {
        v.div_ceil(self.chunk).div_ceil(CHUNK_RUNS).max(1)
    }

    /// Per-row logsumexp over the whole vocabulary, chunk by chunk.
    fn row_lse(&self, h: &[f32], w: &[f32], (n, d, v): (usize, usize, usize)) -> Vec<f64> {
        let starts: Vec<usize> = (0..v).step_by(self.chunk).collect();
        let runs: Vec<Vec<f64>> = starts
            .par_chunks(self.per_run(v))
            .map(|run| {
                let (mut acc, mut z) = (vec![f64::NEG_INFINITY; n], Vec::new());
                for &v0 in run {
                    let len = self.chunk.min(v - v0);
                    chunk_logits(h, w, (n, d), v0, len, &mut z);
                    for (a, zr) in acc.iter_mut().zip(z.chunks_exact(len)) {
                        *a = lse_merge(*a, f32::lse(zr));
                    }
                }
                acc
            })
            .collect();
        let mut lse = vec![f64::NEG_INFINITY; n];
        for run in runs {
            for (x, y) in lse.iter_mut().zip(run) {
                *x = lse_merge(*x, y);
            }
        }
        lse
    }
}

impl CustomOp2 for LinearLoss {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims @ (n, d, v) = linear_dims(l1, l2)?;
        let (h, w) = (cpu_f32_of(s1, l1)?, cpu_f32_of(s2, l2)?);
        check_labels(&self.labels, n, v)?;
        let lse = self.row_lse(h, w, dims);
        let zy = label_logits(h, w, &self.labels, d);
        let loss = lse.iter().zip(zy).map(|(l, z)| (l - z) as f32).collect();
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg1: &Tensor,
        arg2: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, d, v) = linear_dims(arg1.layout(), arg2.layout())?;
        let (res, grad_res) = (res.contiguous()?, grad_res.contiguous()?);
        let (sh, lh) = arg1.storage_and_layout();
        let (sw, lw) = arg2.storage_and_layout();
        let (sl, ll) = res.storage_and_layout();
        let (sg, lg) = grad_res.storage_and_layout();
        let (Storage::Cpu(sh), Storage::Cpu(sw), Storage::Cpu(sl), Storage::Cpu(sg)) =
            (&*sh, &*sw, &*sl, &*sg)
        else {
            candle_core::bail!("linear cross-entropy backward: CPU tensors expected");
        };
        let (h, w) = (cpu_f32_of(sh, lh)?, cpu_f32_of(sw, lw)?);
        let (loss, g) = (cpu_f32_of(sl, ll)?, cpu_f32_of(sg, lg)?);
        let labels = &self.labels;
        // logsumexp_r = loss_r + z_{r y_r}: the forward's, without its pass.
        let lse: Vec<f64> = label_logits(h, w, labels, d)
            .into_iter()
            .zip(loss)
            .map(|(z, &l)| z + l as f64)
            .collect();
        // Per chunk of the vocabulary: G = g_r (softmax(z_r) - onehot(y_r))
        // for its columns, then dW[chunk] = G^T H (its own rows of dW) and
        // dH += G W[chunk] (summed along each run, then the runs in order).
        let mut dw = vec![0f32; v * d];
        let per_run = self.per_run(v);
        let runs: Vec<Vec<f32>> = dw
            .par_chunks_mut(per_run * self.chunk * d)
            .enumerate()
            .map(|(ri, dw_run)| {
                let (mut dh, mut z, mut gz) = (vec![0f32; n * d], Vec::new(), Vec::new());
                for (c, dwc) in dw_run.chunks_mut(self.chunk * d).enumerate() {
                    let (v0, len) = ((ri * per_run + c) * self.chunk, dwc.len() / d);
                    chunk_logits(h, w, (n, d), v0, len, &mut z);
                    gz.resize(n * len, 0.0);
                    for (r, (zr, gr)) in z.chunks_exact(len).zip(gz.chunks_exact_mut(len)).enumerate() {
                        f32::scaled_softmax(zr, lse[r], g[r] as f64, gr);
                        let y = labels[r] as usize;
                        if (v0..v0 + len).contains(&y) {
                            gr[y - v0] -= g[r];
                        }
                    }
                    gemm_f32((len, d, n), dwc, false, &gz, (1, len), h, (d, 1));
                    gemm_f32(
                        (n, d, len),
                        &mut dh,
                        true,
                        &gz,
                        (len, 1),
                        &w[v0 * d..(v0 + len) * d],
                        (d, 1),
                    );
                }
                dh
            })
            .collect();
        let mut dh = vec![0f32; n * d];
        for run in runs {
            for (x, y) in dh.iter_mut().zip(run) {
                *x += y;
            }
        }
        let dev = arg1.device();
        Ok((
            Some(Tensor::from_vec(dh, (n, d), dev)?),
            Some(Tensor::from_vec(dw, (v, d), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The one-pass logsumexp and first argmax against a plain f64 loop,
    /// for lengths around the lane widths and rows with ties (the lowest
    /// index wins) and -inf entries; logsumexp to 1e-6 relative.
    #[test]
    fn lse_argmax_matches_a_plain_loop() {
        let mut rng = lc_metrics::correlation::Rng::new(7);
        for len in [1usize, 7, 8, 9, 16, 17, 33, 100, 1000] {
            for case in 0..4 {
                let mut z: Vec<f32> = (0..len)
                    .map(|_| (rng.below(2000) as f32 - 1000.0) / 97.0)
                    .collect();
                if case == 1 {
                    // Ties: the maximum twice, the later in another lane.
                    let top = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max) + 1.0;
                    let (a, b) = (rng.below(len as u64) as usize, rng.below(len as u64) as usize);
                    z[a] = top;
                    z[b] = top;
                }
                if case == 2 && len > 1 {
                    z[rng.below(len as u64) as usize] = f32::NEG_INFINITY;
                }
                if case == 3 {
                    z.iter_mut().for_each(|x| *x = 0.25);
                }
                let mx = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let first = z.iter().position(|&x| x == mx).unwrap() as u32;
                let lse = mx as f64 + z.iter().map(|&x| (x as f64 - mx as f64).exp()).sum::<f64>().ln();
                for (got_lse, got_max, got_arg) in [
                    lse_argmax(&z),
                    lse_argmax_lanes::<8>(&z),
                    lse_argmax_lanes::<16>(&z),
                ] {
                    assert_eq!((got_max, got_arg), (mx, first), "len {len} case {case}");
                    assert!(
                        (got_lse - lse).abs() <= 1e-6 * lse.abs().max(1.0),
                        "{got_lse} vs {lse}"
                    );
                }
            }
        }
    }

    /// The fused output layer + loss against logits = h W^T through the
    /// primitive path: loss and both gradients, in f32 (tolerance 1e-5
    /// relative to the largest entry: f32 rounding of short sums).
    #[test]
    fn linear_loss_and_gradients_match_the_unfused_ones() {
        let dev = Device::Cpu;
        let h0 = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let w0 = Tensor::randn(0f32, 1.0, (11, 5), &dev).unwrap();
        let labels = vec![0u32, 10, 3, 3, 5, 1, 9];
        // None: unfused; Some(None): the chunk the op picks (one chunk
        // here); Some(Some(3)): chunks of 3 columns, the last one short.
        let run = |chunk: Option<Option<usize>>| {
            let (h, w) = (Var::from_tensor(&h0).unwrap(), Var::from_tensor(&w0).unwrap());
            let l = if let Some(chunk) = chunk {
                linear_cross_entropy_chunked(h.as_tensor(), w.as_tensor(), &labels, chunk).unwrap()
            } else {
                let z = h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
                row_losses_primitive(&z, &labels).unwrap().mean_all().unwrap()
            };
            let g = l.backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                l.to_scalar::<f32>().unwrap(),
                flat(g.get(h.as_tensor()).unwrap()),
                flat(g.get(w.as_tensor()).unwrap()),
            )
        };
        let (lb, ghb, gwb) = run(None);
        for chunk in [None, Some(3)] {
            let (la, gha, gwa) = run(Some(chunk));
            assert!((la - lb).abs() < 1e-5 * lb.abs(), "{la} vs {lb}");
            for (a, b) in [(gha, &ghb), (gwa, &gwb)] {
                let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() <= 1e-5 * scale, "{x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn fused_loss_and_gradient_match_the_primitive_ones() {
        let dev = Device::Cpu;
        let z = Tensor::randn(0f64, 3.0, (7, 11), &dev).unwrap();
        let labels = vec![0u32, 10, 3, 3, 5, 1, 9];
        let v1 = Var::from_tensor(&z).unwrap();
        let v2 = Var::from_tensor(&z).unwrap();
        let l1 = cross_entropy(v1.as_tensor(), &labels).unwrap();
        let l2 = row_losses_primitive(v2.as_tensor(), &labels)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .mean_all()
            .unwrap();
        let (a, b) = (l1.to_scalar::<f64>().unwrap(), l2.to_scalar::<f64>().unwrap());
        // The primitive path computes in f32: agreement to f32 precision.
        assert!((a - b).abs() < 1e-5 * b.abs(), "{a} vs {b}");
        let g1 = l1
            .backward()
            .unwrap()
            .get(v1.as_tensor())
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        // Reference gradient: (softmax - onehot) / N, computed by hand in f64.
        let zz = z.to_vec2::<f64>().unwrap();
        for (r, row) in zz.iter().enumerate() {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = row.iter().map(|x| (x - m).exp()).sum();
            for (j, x) in row.iter().enumerate() {
                let want = ((x - m).exp() / s - f64::from(j == labels[r] as usize)) / 7.0;
                assert!((g1[r][j] - want).abs() < 1e-12, "{r},{j}: {} vs {want}", g1[r][j]);
            }
        }
    }
}
