//! Causal attention for inference on the CPU, one block of queries at a time.
//!
//! The primitive formulation materialises [B, H, T, T] scores and
//! probabilities. At T = 2048 with 16 heads and batch 2 that is 512 MiB per
//! tensor per layer, half of it masked (in a local layer all but 256 keys per
//! row), and all of it fresh memory the kernel has to zero first. Here each
//! task takes [`QUERY_BLOCK`] queries of one head, scores them against the
//! keys they can see (the causal prefix, or the window), takes the softmax in
//! place and multiplies by V. The scratch is one block of scores, reused by
//! the thread, so it stays in cache and nothing of size T x T is allocated.
//!
//! There is no backward: the models' attention uses this only when no
//! input tracks a gradient (collect, decide, eval), and the training path
//! keeps the differentiable formulation.
//!
//! Grouped queries read their shared key/value head in place (no expanded
//! copy). Scores are scaled inside the product, and masked keys get exactly
//! zero weight, as with the additive f32::MIN mask of the reference models.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::fast_exp::exp_f32;
use crate::lane_attention;
use crate::mask::{Dims, visible};

/// Queries per task: 64 rows of at most T keys is 512 KiB of f32 scores at
/// T = 2048, which fits the L2 cache of current cores.
pub const QUERY_BLOCK: usize = 64;

struct BlockAttention {
    scale: f64,
    window: Option<usize>,
    /// Whether f32 heads the [`lane_attention`] kernel takes go there.
    lanes: bool,
}

/// The element types: a softmax over one row of visible scores, in place.
trait Elem: Copy + Send + Sync + Default + 'static {
    fn from_f64(x: f64) -> Self;
    fn softmax(z: &mut [Self]);
}

impl Elem for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }

    fn softmax(z: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: the features are checked at run time just before.
            if std::arch::is_x86_feature_detected!("avx512f") {
                return unsafe { softmax_avx512(z) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return unsafe { softmax_avx2(z) };
            }
        }
        softmax_lanes::<8>(z)
    }
}

impl Elem for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }

    fn softmax(z: &mut [f64]) {
        let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        for x in z.iter_mut() {
            *x = (*x - m).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in z.iter_mut() {
            *x *= inv;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(z: &mut [f32]) {
    softmax_lanes::<16>(z)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(z: &mut [f32]) {
    softmax_lanes::<8>(z)
}

/// Softmax of a row in L independent lanes, so the compiler can keep the
/// max and the sum in vector registers.
#[inline(always)]
fn softmax_lanes<const L: usize>(z: &mut [f32]) {
    let mut mx = [f32::NEG_INFINITY; L];
    let mut chunks = z.chunks_exact(L);
    for c in &mut chunks {
        for i in 0..L {
            mx[i] = mx[i].max(c[i]);
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .chain(mx.iter())
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mut s = [0f32; L];
    let mut chunks = z.chunks_exact_mut(L);
    for c in &mut chunks {
        for i in 0..L {
            let e = exp_f32(c[i] - m);
            c[i] = e;
            s[i] += e;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp_f32(*x - m);
        sum += *x;
    }
    let inv = 1.0 / (sum + s.iter().sum::<f32>());
    for x in z.iter_mut() {
        *x *= inv;
    }
}

/// out [B, H, T, dh] = softmax(scale * q k^T, causal/window mask) v.
fn attention<T: Elem>(q: &[T], k: &[T], v: &[T], d: Dims, scale: T, window: Option<usize>) -> Vec<T> {
    let Dims { h, hkv, t, dh, .. } = d;
    let rep = h / hkv;
    let mut out = vec![T::default(); d.b * h * t * dh];
    out.par_chunks_mut(t * dh).enumerate().for_each(|(bh, slab)| {
        let (bi, hi) = (bh / h, bh % h);
        let kv = (bi * hkv + hi / rep) * t * dh;
        let (ks, vs) = (&k[kv..kv + t * dh], &v[kv..kv + t * dh]);
        let qs = &q[bh * t * dh..(bh + 1) * t * dh];
        slab.par_chunks_mut(QUERY_BLOCK * dh)
            .enumerate()
            .for_each_init(Vec::new, |scores, (blk, o)| {
                query_block(qs, ks, vs, o, blk * QUERY_BLOCK, dh, scale, window, scores)
            });
    });
    out
}

/// One block of queries starting at `i0` of one head: `o` receives its rows.
#[allow(clippy::too_many_arguments)]
fn query_block<T: Elem>(
    qs: &[T],
    ks: &[T],
    vs: &[T],
    o: &mut [T],
    i0: usize,
    dh: usize,
    scale: T,
    window: Option<usize>,
    scores: &mut Vec<T>,
) {
    let m = o.len() / dh;
    let i1 = i0 + m;
    let lo = visible(i0, window).0;
    let nk = i1 - lo;
    // Every element is written by the product below before it is read.
    scores.resize(m * nk, T::default());
    // SAFETY: q rows i0..i1 (m x dh, row-major), k rows lo..i1 read as the
    // transposed (dh x nk) operand, and scores (m x nk) lie inside their
    // slices, with the strides given.
    unsafe {
        gemm::gemm(
            m,
            nk,
            dh,
            scores.as_mut_ptr(),
            1,
            nk as isize,
            false,
            qs.as_ptr().add(i0 * dh),
            1,
            dh as isize,
            ks.as_ptr().add(lo * dh),
            dh as isize,
            1,
            T::default(),
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    for (r, row) in scores.chunks_exact_mut(nk).enumerate() {
        let (a, e) = visible(i0 + r, window);
        let (a, e) = (a - lo, e - lo);
        row[..a].fill(T::default());
        row[e..].fill(T::default());
        T::softmax(&mut row[a..e]);
    }
    // SAFETY: probabilities (m x nk), v rows lo..i1 (nk x dh) and o (m x dh)
    // lie inside their slices, all row-major.
    unsafe {
        gemm::gemm(
            m,
            dh,
            nk,
            o.as_mut_ptr(),
            1,
            dh as isize,
            false,
            scores.as_ptr(),
            1,
            nk as isize,
            vs.as_ptr().add(lo * dh),
            1,
            dh as isize,
            T::default(),
            T::from_f64(1.0),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

fn contiguous<'a, T>(v: &'a [T], l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("block attention needs a contiguous {what}")))?;
    Ok(&v[a..b])
}

impl CustomOp3 for BlockAttention {
    fn name(&self) -> &'static str {
        "block-causal-attention"
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
        let (b, h, t, dh) = l1.shape().dims4()?;
        let (bk, hkv, tk, dk) = l2.shape().dims4()?;
        if (bk, tk, dk) != (b, t, dh) || l3.shape() != l2.shape() || hkv == 0 || h % hkv != 0 {
            candle_core::bail!(
                "block attention: q {:?}, k {:?}, v {:?} do not fit [B, H, T, dh] / [B, Hkv, T, dh]",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let d = Dims { b, h, hkv, t, dh };
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let (q, k, v) = (
                    contiguous(q, l1, "q")?,
                    contiguous(k, l2, "k")?,
                    contiguous(v, l3, "v")?,
                );
                let scale = self.scale as f32;
                let lanes = self
                    .lanes
                    .then(|| lane_attention::attention(q, k, v, d, scale, self.window))
                    .flatten();
                CpuStorage::F32(lanes.unwrap_or_else(|| attention(q, k, v, d, scale, self.window)))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => CpuStorage::F64(attention(
                contiguous(q, l1, "q")?,
                contiguous(k, l2, "k")?,
                contiguous(v, l3, "v")?,
                d,
                self.scale,
                self.window,
            )),
            _ => candle_core::bail!("block attention: q, k, v must all be f32 or all f64"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Causal attention of q [B, H, T, dh] over k, v [B, Hkv, T, dh] on the CPU,
/// without gradients: [B, H, T, dh]. Scores are `scale` * q k^T; with a
/// window, query i sees keys i - window + 1 ..= i. Small f32 heads go to
/// [`lane_attention`] where it [`supports`](lane_attention::supports) them,
/// the rest to the GEMM blocks of this module.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> candle_core::Result<Tensor> {
    apply(
        q,
        k,
        v,
        BlockAttention {
            scale,
            window,
            lanes: true,
        },
    )
}

/// [`attend`] through the GEMM blocks whatever the head size: the
/// reference [`lane_attention`] is measured and tested against.
pub fn attend_gemm(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> candle_core::Result<Tensor> {
    apply(
        q,
        k,
        v,
        BlockAttention {
            scale,
            window,
            lanes: false,
        },
    )
}

fn apply(q: &Tensor, k: &Tensor, v: &Tensor, op: BlockAttention) -> candle_core::Result<Tensor> {
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::brute_force::{random, reference};
    use candle_core::{DType, Device};

    /// f32 agrees with the f64 brute force within 2e-5 absolute (values are
    /// O(1): f32 rounding of dh-term scores and a sum of up to T products);
    /// the same for the device-primitive blocks of `attention`;
    /// f64 within 1e-12. Covers T not a multiple of the block, grouped
    /// queries, windows shorter and longer than T, and head sizes that are
    /// not a multiple of the vector width; f32 heads of 4, 8 and 16 run
    /// through both lane_attention and the GEMM blocks.
    #[test]
    fn block_attention_matches_brute_force() {
        let cases = [
            (2, 4, 4, 150, 8, 1.0, None),
            (1, 4, 2, 150, 5, 0.35, None),
            (2, 2, 1, 131, 16, 0.25, Some(40)),
            (1, 3, 3, 70, 4, 1.0, Some(500)),
            (1, 2, 2, 1, 3, 1.0, None),
            (1, 2, 2, 600, 4, 0.5, None),
            (1, 2, 2, 600, 4, 1.0, Some(100)),
            // Windows shorter than a tile of lane_attention (no key seen
            // by every query of the tile), down to a query seeing itself.
            (1, 2, 2, 40, 8, 0.5, Some(5)),
            (1, 2, 1, 37, 16, 1.0, Some(1)),
            (1, 4, 2, 33, 4, 1.0, Some(16)),
            (2, 2, 2, 17, 16, 0.25, None),
        ];
        for (n, (b, h, hkv, t, dh, scale, window)) in cases.into_iter().enumerate() {
            let d = Dims { b, h, hkv, t, dh };
            let q = random(b * h * t * dh, 3 * n as u64 + 1);
            let k = random(b * hkv * t * dh, 3 * n as u64 + 2);
            let v = random(b * hkv * t * dh, 3 * n as u64 + 3);
            let want = reference(&q, &k, &v, d, scale, window);
            let dev = Device::Cpu;
            let qt = Tensor::from_vec(q, (b, h, t, dh), &dev).unwrap();
            let kt = Tensor::from_vec(k, (b, hkv, t, dh), &dev).unwrap();
            let vt = Tensor::from_vec(v, (b, hkv, t, dh), &dev).unwrap();
            for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
                let (q, k, v) = (
                    qt.to_dtype(dtype).unwrap(),
                    kt.to_dtype(dtype).unwrap(),
                    vt.to_dtype(dtype).unwrap(),
                );
                let worst = |got: Tensor| {
                    let got = got
                        .to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap();
                    got.iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f64::max)
                };
                let diff = worst(attend(&q, &k, &v, scale, window).unwrap());
                assert!(diff < tol, "case {n} {dtype:?}: max |diff| {diff:e} >= {tol:e}");
                // The GEMM blocks where attend took the lane kernel.
                let diff = worst(attend_gemm(&q, &k, &v, scale, window).unwrap());
                assert!(
                    diff < tol,
                    "gemm, case {n} {dtype:?}: max |diff| {diff:e} >= {tol:e}"
                );
                // The device-primitive blocks GPUs use (run here on the
                // CPU), for ungrouped heads; T = 600 spans three blocks.
                if h == hkv {
                    let scale = (scale != 1.0).then_some(scale);
                    let blocks = crate::attention::blocked_attention(&q, &k, &v, scale, window, dtype);
                    let diff = worst(blocks.unwrap());
                    assert!(
                        diff < tol,
                        "blocks, case {n} {dtype:?}: max |diff| {diff:e} >= {tol:e}"
                    );
                }
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 3, 4, 2), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 4, 2), DType::F32, &dev).unwrap();
        let err = attend(&q, &k, &k, 1.0, None).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{err}");
    }
}
