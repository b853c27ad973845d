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
use candle_core::{CpuStorage, CustomOp1, CustomOp3, D, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::{Context, Result};

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

/// exp for f32 that the compiler vectorises: range reduction to
/// 2^k exp(r), |r| <= ln2/2, and a degree-6 Taylor polynomial for exp(r)
/// (relative error below 3e-7, the scale of f32 rounding). Inputs below
/// -87.3 give about 1e-38 instead of 0, which no softmax sum can see.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to the nearest integer in the low mantissa
    // bits without a (non-vectorisable) call to round or floor.
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let t = x * LOG2E + SHIFT;
    let k = t - SHIFT;
    let ki = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    f32::from_bits((ki.wrapping_add(127) << 23) as u32) * p
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
    /// Eight independent f32 lanes (vectorised), combined in f64.
    fn lse(z: &[f32]) -> f64 {
        let mut m = [f32::NEG_INFINITY; 8];
        let chunks = z.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..8 {
                m[i] = if c[i] > m[i] { c[i] } else { m[i] };
            }
        }
        let mut mx = tail
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        for v in m {
            mx = if v > mx { v } else { mx };
        }
        let mut s = [0f32; 8];
        let chunks = z.chunks_exact(8);
        for c in chunks {
            for i in 0..8 {
                s[i] += exp_f32(c[i] - mx);
            }
        }
        let total: f64 = s.iter().map(|&x| x as f64).sum::<f64>()
            + tail.iter().map(|&x| exp_f32(x - mx) as f64).sum::<f64>();
        mx as f64 + total.ln()
    }
    fn scaled_softmax(z: &[f32], lse: f64, g: f64, out: &mut [f32]) {
        let (lse, g) = (lse as f32, g as f32);
        for (o, &x) in out.iter_mut().zip(z) {
            *o = g * exp_f32(x - lse);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fast f32 exp against std's, over the range softmax uses.
    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.01371;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp_f32(-1000.0) < 1e-37 && exp_f32(-1000.0) >= 0.0);
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
