//! Causal attention for small heads on the CPU, one query per SIMD lane.
//!
//! With heads of 4 to 16 dimensions (GPT-Neo grid models of width 64 to
//! 256 have 16 heads of 4 to 16) the two products of [`block_attention`]
//! have an inner or outer size of dh: the GEMM crate runs them far below its
//! peak, and the softmax between them makes three passes over a block of
//! scores in memory. Here a tile of `L` consecutive queries of one head
//! (`L` the SIMD width in f32) keeps its queries transposed in registers,
//! `qt[c][l]`, and walks the keys it sees twice:
//!
//! 1. score: `s[l] = sum_c qt[c][l] k[j][c]`, dh broadcast FMAs per key for
//!    `L` queries at once; the running maximum per lane; the scores go to a
//!    per-thread buffer of `L` x keys (128 KiB at T = 2048), which stays in
//!    the L2 cache;
//! 2. accumulate: `p = exp(s - max)`, the sum of `p` and `acc[c][l] += p[l]
//!    v[j][c]`, dh FMAs per key, again all in registers;
//!
//! and writes `acc / sum` (the normalisation moves after the product, which
//! is exact in real arithmetic). Masked keys (at the causal diagonal and a
//! window's start) get exactly zero weight, as in [`block_attention`].
//! f32 only, without gradients; [`block_attention::attend`] chooses this
//! kernel where it applies ([`supports`]).
//!
//! [`block_attention`]: crate::block_attention
//! [`block_attention::attend`]: crate::block_attention::attend

use rayon::prelude::*;

use crate::mask::{Dims, visible};

/// Whether this kernel takes heads of `dh` dimensions on this CPU: the
/// sizes it is compiled for, with the vectors to run them (x86-64 with
/// AVX-512 or AVX2 and FMA; elsewhere the GEMM blocks run).
pub fn supports(dh: usize) -> bool {
    matches!(dh, 4 | 8 | 16) && simd().is_some()
}

/// The vector width a tile runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Simd {
    Avx512,
    Avx2,
}

fn simd() -> Option<Simd> {
    available().into_iter().next()
}

/// The widths this CPU runs, widest first.
fn available() -> Vec<Simd> {
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
            found.push(Simd::Avx512);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            found.push(Simd::Avx2);
        }
    }
    found
}

/// out [B, H, T, dh] = softmax(scale q k^T, causal/window mask) v, for q
/// [B, H, T, dh] and k, v [B, Hkv, T, dh], all contiguous. `None` where
/// [`supports`] says no.
pub(crate) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: Dims,
    scale: f32,
    window: Option<usize>,
) -> Option<Vec<f32>> {
    attention_with(simd()?, q, k, v, d, scale, window)
}

fn attention_with(
    simd: Simd,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: Dims,
    scale: f32,
    window: Option<usize>,
) -> Option<Vec<f32>> {
    Some(match d.dh {
        4 => run::<4>(simd, q, k, v, d, scale, window),
        8 => run::<8>(simd, q, k, v, d, scale, window),
        16 => run::<16>(simd, q, k, v, d, scale, window),
        _ => return None,
    })
}

fn run<const DH: usize>(
    simd: Simd,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: Dims,
    scale: f32,
    window: Option<usize>,
) -> Vec<f32> {
    let Dims { h, hkv, t, .. } = d;
    let rep = h / hkv;
    let lanes = match simd {
        Simd::Avx512 => 16,
        Simd::Avx2 => 8,
    };
    let mut out = vec![0f32; d.b * h * t * DH];
    out.par_chunks_mut(t * DH).enumerate().for_each(|(bh, slab)| {
        let (bi, hi) = (bh / h, bh % h);
        let kv = (bi * hkv + hi / rep) * t * DH;
        let head = Head {
            q: &q[bh * t * DH..(bh + 1) * t * DH],
            k: &k[kv..kv + t * DH],
            v: &v[kv..kv + t * DH],
            scale,
            window,
        };
        slab.par_chunks_mut(lanes * DH)
            .enumerate()
            .for_each_init(Vec::new, |scores, (n, o)| {
                let i0 = n * lanes;
                // SAFETY: `simd` was detected on this CPU (`available`).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match simd {
                        Simd::Avx512 => x86::tile_avx512::<DH>(&head, i0, o, scores),
                        Simd::Avx2 => x86::tile_avx2::<DH>(&head, i0, o, scores),
                    }
                }
            });
    });
    out
}

/// One head's rows [T, DH] of queries, keys and values.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    scale: f32,
    window: Option<usize>,
}

/// A vector of `L` f32 lanes: the operations a tile needs. The methods are
/// unsafe because they assume the CPU features of their type, which the
/// caller's `target_feature` wrapper provides (and inlines them into).
trait Lanes: Copy {
    const L: usize;
    unsafe fn splat(x: f32) -> Self;
    /// `L` values from `p`.
    unsafe fn load(p: *const f32) -> Self;
    /// `L` values to `p`.
    unsafe fn store(self, p: *mut f32);
    /// self * b + c, rounded once.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    unsafe fn max(self, b: Self) -> Self;
    unsafe fn min(self, b: Self) -> Self;
    /// 2^(bits(t) - bits(1.5 * 2^23)) for `t` = k + 1.5 * 2^23 with k an
    /// integer in the exponent's range: the scale step of `exp_f32`.
    unsafe fn pow2_of_shifted(t: Self) -> Self;
}

/// [`exp_f32`] on `L` lanes: its range reduction and polynomial, with the
/// multiply-adds fused (so within its error bound, not bit for bit).
///
/// [`exp_f32`]: crate::fast_exp::exp_f32
#[inline(always)]
unsafe fn exp_lanes<V: Lanes>(x: V) -> V {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const SHIFT: f32 = 12_582_912.0;
    unsafe {
        let x = x.max(V::splat(-87.3)).min(V::splat(88.7));
        let t = x.mul_add(V::splat(LOG2E), V::splat(SHIFT));
        let k = t.sub(V::splat(SHIFT));
        let r = k.mul(V::splat(-LN2_HI)).add(x);
        let r = k.mul_add(V::splat(-LN2_LO), r);
        let mut p = V::splat(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = p.mul_add(r, V::splat(c));
        }
        V::pow2_of_shifted(t).mul(p)
    }
}

/// Keys scored at once where no mask applies (see `tile`).
const UNROLL: usize = 4;

/// Queries `i0 .. i0 + m` (m = o.len() / DH <= L) of one head into `o`.
///
/// # Safety
/// The CPU has the features of `V`.
#[inline(always)]
unsafe fn tile<V: Lanes, const DH: usize>(head: &Head, i0: usize, o: &mut [f32], scores: &mut Vec<f32>) {
    let l_n = V::L;
    let m = o.len() / DH;
    debug_assert!(m >= 1 && m <= l_n && l_n <= 16);
    let window = head.window;
    // Keys seen by some query of the tile, and those every query sees
    // (none when a window is shorter than the tile).
    let (lo, hi) = (visible(i0, window).0, i0 + m);
    let (full_lo, full_hi) = (visible(i0 + m - 1, window).0.min(i0 + 1), i0 + 1);
    let edge = |j: usize| j < full_lo || j >= full_hi;
    let seen = |j: usize, l: usize| l < m && j >= visible(i0 + l, window).0 && j <= i0 + l;
    scores.resize((hi - lo) * l_n, 0.0);
    let mut lane = [0f32; 16];
    unsafe {
        // Queries transposed, scaled: qt[c] holds dimension c of every query.
        let qt: [V; DH] = std::array::from_fn(|c| {
            for (l, x) in lane.iter_mut().enumerate().take(l_n) {
                *x = if l < m {
                    head.q[(i0 + l) * DH + c] * head.scale
                } else {
                    0.0
                };
            }
            V::load(lane.as_ptr())
        });

        let mut mx = V::splat(f32::NEG_INFINITY);
        let mut j = lo;
        while j < hi {
            let s = &mut scores[(j - lo) * l_n..];
            if j >= full_lo && j + UNROLL <= full_hi {
                // Keys every query sees, UNROLL at a time: independent
                // chains of DH multiply-adds instead of one chain's latency.
                let mut acc = [V::splat(0.0); UNROLL];
                for (c, q) in qt.iter().enumerate() {
                    for (u, a) in acc.iter_mut().enumerate() {
                        *a = q.mul_add(V::splat(head.k[(j + u) * DH + c]), *a);
                    }
                }
                for (u, a) in acc.into_iter().enumerate() {
                    a.store(s[u * l_n..].as_mut_ptr());
                    mx = mx.max(a);
                }
                j += UNROLL;
                continue;
            }
            let key = &head.k[j * DH..(j + 1) * DH];
            let mut acc = V::splat(0.0);
            for c in 0..DH {
                acc = qt[c].mul_add(V::splat(key[c]), acc);
            }
            acc.store(s.as_mut_ptr());
            if edge(j) {
                for (l, x) in s[..l_n].iter_mut().enumerate() {
                    if !seen(j, l) {
                        *x = f32::NEG_INFINITY;
                    }
                }
                acc = V::load(s.as_ptr());
            }
            mx = mx.max(acc);
            j += 1;
        }

        let mut sum = V::splat(0.0);
        let mut out = [V::splat(0.0); DH];
        for (j, s) in (lo..hi).zip(scores.chunks_exact(l_n)) {
            let val = &head.v[j * DH..(j + 1) * DH];
            let mut p = exp_lanes(V::load(s.as_ptr()).sub(mx));
            if edge(j) {
                // Masked keys weigh exactly zero.
                p.store(lane.as_mut_ptr());
                for (l, x) in lane.iter_mut().enumerate().take(l_n) {
                    if !seen(j, l) {
                        *x = 0.0;
                    }
                }
                p = V::load(lane.as_ptr());
            }
            sum = sum.add(p);
            for c in 0..DH {
                out[c] = p.mul_add(V::splat(val[c]), out[c]);
            }
        }
        let mut total = [0f32; 16];
        sum.store(total.as_mut_ptr());
        for c in 0..DH {
            out[c].store(lane.as_mut_ptr());
            for l in 0..m {
                o[l * DH + c] = lane[l] / total[l];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Head, Lanes, tile};

    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn tile_avx512<const DH: usize>(
        head: &Head,
        i0: usize,
        o: &mut [f32],
        scores: &mut Vec<f32>,
    ) {
        unsafe { tile::<F32x16, DH>(head, i0, o, scores) }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2<const DH: usize>(
        head: &Head,
        i0: usize,
        o: &mut [f32],
        scores: &mut Vec<f32>,
    ) {
        unsafe { tile::<F32x8, DH>(head, i0, o, scores) }
    }

    /// The bits of 1.5 * 2^23 less the exponent bias, for `pow2_of_shifted`.
    const POW2_OFFSET: i32 = 127 - 0x4B40_0000;

    #[derive(Clone, Copy)]
    struct F32x16(__m512);

    impl Lanes for F32x16 {
        const L: usize = 16;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { Self(_mm512_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Self(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            unsafe { Self(_mm512_fmadd_ps(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            unsafe { Self(_mm512_add_ps(self.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            unsafe { Self(_mm512_sub_ps(self.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            unsafe { Self(_mm512_mul_ps(self.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            unsafe { Self(_mm512_max_ps(self.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn min(self, b: Self) -> Self {
            unsafe { Self(_mm512_min_ps(self.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn pow2_of_shifted(t: Self) -> Self {
            unsafe {
                let bits = _mm512_add_epi32(_mm512_castps_si512(t.0), _mm512_set1_epi32(POW2_OFFSET));
                Self(_mm512_castsi512_ps(_mm512_slli_epi32::<23>(bits)))
            }
        }
    }

    #[derive(Clone, Copy)]
    struct F32x8(__m256);

    impl Lanes for F32x8 {
        const L: usize = 8;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { Self(_mm256_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Self(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            unsafe { Self(_mm256_fmadd_ps(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            unsafe { Self(_mm256_add_ps(self.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            unsafe { Self(_mm256_sub_ps(self.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            unsafe { Self(_mm256_mul_ps(self.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            unsafe { Self(_mm256_max_ps(self.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn min(self, b: Self) -> Self {
            unsafe { Self(_mm256_min_ps(self.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn pow2_of_shifted(t: Self) -> Self {
            unsafe {
                let bits = _mm256_add_epi32(_mm256_castps_si256(t.0), _mm256_set1_epi32(POW2_OFFSET));
                Self(_mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::brute_force::{random, reference};

    /// Every vector width this CPU runs (AVX-512 and AVX2 on current x86
    /// servers), against the f64 brute force: within 2e-5 absolute, the
    /// bound of the GEMM blocks' f32 test (values O(1), f32 roundings of
    /// dh-term scores and of sums over up to T keys). Tiles cut by T, a
    /// window shorter than a tile, grouped queries, every head size.
    #[test]
    fn every_width_matches_brute_force() {
        let cases = [
            (2, 4, 4, 150, 8, 1.0, None),
            (1, 4, 2, 131, 16, 0.25, Some(40)),
            (1, 2, 1, 37, 4, 0.5, Some(3)),
            (1, 2, 2, 1, 8, 1.0, None),
            (1, 2, 2, 300, 16, 0.35, Some(1)),
        ];
        let widths = available();
        for simd in widths {
            for (n, (b, h, hkv, t, dh, scale, window)) in cases.into_iter().enumerate() {
                let d = Dims { b, h, hkv, t, dh };
                let q = random(b * h * t * dh, 5 * n as u64 + 1);
                let k = random(b * hkv * t * dh, 5 * n as u64 + 2);
                let v = random(b * hkv * t * dh, 5 * n as u64 + 3);
                let want = reference(&q, &k, &v, d, scale, window);
                let f32s = |x: &[f64]| x.iter().map(|&a| a as f32).collect::<Vec<_>>();
                let got = attention_with(simd, &f32s(&q), &f32s(&k), &f32s(&v), d, scale as f32, window)
                    .expect("a supported head size");
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(&a, b)| (a as f64 - b).abs())
                    .fold(0.0, f64::max);
                assert!(worst < 2e-5, "{simd:?}, case {n}: max |diff| {worst:e}");
            }
        }
    }

    #[test]
    fn other_head_sizes_are_left_to_the_gemm_blocks() {
        let d = Dims {
            b: 1,
            h: 1,
            hkv: 1,
            t: 4,
            dh: 5,
        };
        let x = vec![0f32; 20];
        assert!(attention(&x, &x, &x, d, 1.0, None).is_none());
        assert!(!supports(5) && !supports(32));
    }
}
