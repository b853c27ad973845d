//! Causal (optionally windowed) softmax over attention scores, fused.
//!
//! GPT-Neo masks a score by replacing it with the smallest float before the
//! softmax, so masked keys get exactly zero weight. On the CPU this op
//! computes the softmax over the visible keys only (j <= i, and i - j <
//! window for local layers) and writes zeros elsewhere: the same numbers
//! without a T x T mask tensor, and a matching fused backward
//! dx = y * (g - sum(g * y)), so training does not build the half-dozen
//! score-sized temporaries of the primitive formulation. On other devices
//! the primitive formulation (additive mask, softmax) is used, and for
//! inference [`blocked_attention`] applies it to one block of queries at a
//! time, over the keys the block can see.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::ops::{Add, Div, Mul, Sub};

use crate::block_softmax::{BlockSoftmax, block_softmax};
use crate::fast_exp::exp_f32;
use crate::mask::visible;

#[derive(Clone, Copy)]
struct CausalSoftmax {
    window: Option<usize>,
}

struct CausalSoftmaxGrad {
    window: Option<usize>,
}

fn dims(l: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
    let (o1, o2) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("causal softmax needs contiguous scores".into()))?;
    let d = l.shape().dims();
    let t = *d.last().unwrap_or(&0);
    if d.len() < 2 || d[d.len() - 2] != t {
        candle_core::bail!("causal softmax expects [.., T, T] scores, got {d:?}");
    }
    Ok((o1, o2, t, (o2 - o1) / (t * t).max(1)))
}

/// The element types of the CPU kernels; only the exponential differs
/// (f32 uses the fast `exp_f32` of the loss).
trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
{
    const ZERO: Self;
    fn exp_shift(self, m: Self) -> Self;
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn exp_shift(self, m: Self) -> Self {
        exp_f32(self - m)
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn exp_shift(self, m: Self) -> Self {
        (self - m).exp()
    }
}

fn forward<T: Float>(src: &[T], t: usize, window: Option<usize>) -> Vec<T> {
    let mut out = vec![T::ZERO; src.len()];
    out.par_chunks_mut(t)
        .zip(src.par_chunks(t))
        .enumerate()
        .for_each(|(row, (o, z))| {
            let i = row % t;
            let (lo, hi) = visible(i, window);
            let zs = &z[lo..hi];
            let mut m = zs[0];
            for &x in zs {
                if x > m {
                    m = x;
                }
            }
            let os = &mut o[lo..hi];
            let mut sum = T::ZERO;
            for (oj, &x) in os.iter_mut().zip(zs) {
                let e = x.exp_shift(m);
                *oj = e;
                sum = sum + e;
            }
            for oj in os.iter_mut() {
                *oj = *oj / sum;
            }
        });
    out
}

fn backward<T: Float>(y: &[T], g: &[T], t: usize, window: Option<usize>) -> Vec<T> {
    let mut out = vec![T::ZERO; y.len()];
    out.par_chunks_mut(t)
        .zip(y.par_chunks(t).zip(g.par_chunks(t)))
        .enumerate()
        .for_each(|(row, (o, (y, g)))| {
            let i = row % t;
            let (lo, hi) = visible(i, window);
            let mut dot = T::ZERO;
            for (&a, &b) in y[lo..hi].iter().zip(&g[lo..hi]) {
                dot = dot + a * b;
            }
            for ((oj, &a), &b) in o[lo..hi].iter_mut().zip(&y[lo..hi]).zip(&g[lo..hi]) {
                *oj = a * (b - dot);
            }
        });
    out
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (o1, o2, t, _) = dims(l)?;
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(forward(&v[o1..o2], t, self.window)),
            CpuStorage::F64(v) => CpuStorage::F64(forward(&v[o1..o2], t, self.window)),
            other => candle_core::bail!("causal softmax: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = res.apply_op2_no_bwd(&grad.contiguous()?, &CausalSoftmaxGrad { window: self.window })?;
        Ok(Some(g))
    }
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "causal-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a1, b1, t, _) = dims(l1)?;
        let (a2, b2, _, _) = dims(l2)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => {
                CpuStorage::F32(backward(&y[a1..b1], &g[a2..b2], t, self.window))
            }
            (CpuStorage::F64(y), CpuStorage::F64(g)) => {
                CpuStorage::F64(backward(&y[a1..b1], &g[a2..b2], t, self.window))
            }
            _ => candle_core::bail!("causal softmax grad: unsupported dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Softmax over the last axis of scores [.., T, T] where key j is visible to
/// query i iff j <= i and, with a window, i - j < window.
///
/// On the CPU a fused op; elsewhere (GPUs) an additive mask, made once per
/// (T, window, device, dtype) and kept, and the device's fused last-axis
/// softmax kernel.
pub fn causal_softmax(scores: &Tensor, window: Option<usize>) -> candle_core::Result<Tensor> {
    let t = scores.dim(candle_core::D::Minus1)?;
    if scores.device().is_cpu() && matches!(scores.dtype(), DType::F32 | DType::F64) {
        return scores.contiguous()?.apply_op1(CausalSoftmax { window });
    }
    let mask = causal_mask(t, window, scores.device(), scores.dtype())?;
    candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?.contiguous()?)
}

type MaskKey = (usize, usize, usize, usize, Option<usize>, String, DType);

/// The additive causal mask (0 where visible, the dtype's minimum elsewhere).
fn causal_mask(
    t: usize,
    window: Option<usize>,
    device: &candle_core::Device,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    block_mask(0..t, 0..t, window, device, dtype)
}

/// The additive mask [rows, keys] of queries `rows` over keys `keys`, made
/// once per (ranges, window, device, dtype) and kept.
fn block_mask(
    rows: std::ops::Range<usize>,
    keys: std::ops::Range<usize>,
    window: Option<usize>,
    device: &candle_core::Device,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static MASKS: OnceLock<Mutex<HashMap<MaskKey, Tensor>>> = OnceLock::new();
    let key = (
        rows.start,
        rows.end,
        keys.start,
        keys.end,
        window,
        format!("{:?}", device.location()),
        dtype,
    );
    let cache = MASKS.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(m) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(m.clone());
    }
    let (m, n) = (rows.len(), keys.len());
    let vals: Vec<f32> = rows
        .flat_map(|i| {
            let keys = keys.clone();
            keys.map(move |j| {
                let (lo, hi) = visible(i, window);
                if (lo..hi).contains(&j) { 0.0 } else { f32::MIN }
            })
        })
        .collect();
    let mask = Tensor::from_vec(vals, (m, n), device)?.to_dtype(dtype)?;
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, mask.clone());
    Ok(mask)
}

/// Allows TF32 for f32 matrix products while alive (candle's switch is
/// process-wide, read when a product is issued); restores the previous
/// setting when dropped. A process runs one forward at a time.
struct Tf32Scores(Option<bool>);

impl Tf32Scores {
    fn allow(exact: bool) -> Self {
        if !exact {
            return Tf32Scores(None);
        }
        let before = candle_core::cuda::gemm_reduced_precision_f32();
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
        Tf32Scores(Some(before))
    }
}

impl Drop for Tf32Scores {
    fn drop(&mut self) {
        if let Some(before) = self.0 {
            candle_core::cuda::set_gemm_reduced_precision_f32(before);
        }
    }
}

/// Queries per block of [`blocked_attention`]: at T = 2048 and 16 heads,
/// batch 8, one block's f32 scores are 128 MiB instead of 2 GiB.
pub const DEVICE_QUERY_BLOCK: usize = 256;

/// Causal attention without gradients from device primitives, one block of
/// queries at a time: q [B, H, T, dh] against k, v [B, H, T, dh] (grouped
/// heads already expanded), scores in `score_dtype`, scaled by `scale`.
///
/// Each block scores only the keys some of its queries can see: the causal
/// prefix (about half of the T x T scores over all blocks) or, in a local
/// layer, its window (at T = 2048, window 256: a quarter). f32 scores are
/// scaled, masked and normalised by [`block_softmax`] in one pass (other
/// dtypes: an additive mask and the device's softmax) and multiplied by V at
/// once, so the large temporaries are a block's, not the layer's.
/// Returns [B, H, T, dh].
pub fn blocked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: Option<f64>,
    window: Option<usize>,
    score_dtype: DType,
) -> candle_core::Result<Tensor> {
    let t = q.dim(2)?;
    // bf16/f16 queries and keys are exact in TF32 (8 and 11 significant
    // bits), so their f32 scores may use the tensor cores' TF32 mode: the
    // same products, accumulated in f32.
    let _tf32 = Tf32Scores::allow(matches!(q.dtype(), DType::BF16 | DType::F16) && score_dtype == DType::F32);
    // q and k may be head views of [B, T, H, dh] (see `layers::heads`):
    // the cast makes them contiguous in the same pass.
    let q = q.to_dtype(score_dtype)?.contiguous()?;
    let k = k.to_dtype(score_dtype)?.contiguous()?;
    let v = v.contiguous()?;
    let mut out = Vec::with_capacity(t.div_ceil(DEVICE_QUERY_BLOCK));
    for i0 in (0..t).step_by(DEVICE_QUERY_BLOCK) {
        let i1 = (i0 + DEVICE_QUERY_BLOCK).min(t);
        let lo = visible(i0, window).0;
        // Blocks of q, k and v are strided views: the matrix products read
        // them in place (cuBLAS takes the strides), so no block is copied.
        let mut scores = q
            .narrow(2, i0, i1 - i0)?
            .matmul(&k.narrow(2, lo, i1 - lo)?.t()?)?;
        let probs = if score_dtype == DType::F32 && matches!(v.dtype(), DType::F32 | DType::BF16) {
            // Scale, mask, softmax and the cast for V in one pass.
            let op = BlockSoftmax {
                i0,
                lo,
                window,
                scale: scale.unwrap_or(1.0),
                out: v.dtype(),
            };
            block_softmax(&scores, op)?
        } else {
            if let Some(s) = scale {
                scores = (scores * s)?;
            }
            let mask = block_mask(i0..i1, lo..i1, window, q.device(), score_dtype)?;
            candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?.contiguous()?)?
                .to_dtype(v.dtype())?
        };
        out.push(probs.matmul(&v.narrow(2, lo, i1 - lo)?)?);
    }
    Tensor::cat(&out, 2)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Fused forward and backward against the additive-mask formulation, f64.
    #[test]
    fn fused_causal_softmax_matches_masked_softmax() {
        let dev = Device::Cpu;
        for window in [None, Some(3)] {
            let x = Tensor::randn(0f64, 2.0, (2, 3, 7, 7), &dev).unwrap();
            let w = Tensor::randn(0f64, 1.0, (2, 3, 7, 7), &dev).unwrap();
            let (v1, v2) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&x).unwrap());
            let fused = causal_softmax(v1.as_tensor(), window).unwrap();
            let mask: Vec<f64> = (0..7)
                .flat_map(|i| {
                    (0..7).map(move |j| {
                        if j <= i && window.is_none_or(|w| i - j < w) {
                            0.0
                        } else {
                            f64::MIN
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (7, 7), &dev).unwrap();
            let plain = candle_nn::ops::softmax(
                &v2.as_tensor().broadcast_add(&mask).unwrap(),
                candle_core::D::Minus1,
            )
            .unwrap();
            let d = max_abs_diff(&fused, &plain);
            assert!(d < 1e-15, "forward differs by {d}");
            let g1 = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let d = max_abs_diff(g1.get(v1.as_tensor()).unwrap(), g2.get(v2.as_tensor()).unwrap());
            assert!(d < 1e-14, "backward differs by {d}");
        }
    }
}
