//! Which keys a query sees under the causal (optionally windowed) mask, the
//! shapes of the heads, and (in tests) the brute-force attention: shared by
//! every attention kernel, so they agree on them.

/// Visible key range [lo, hi) of query row `i`.
#[inline]
pub fn visible(i: usize, window: Option<usize>) -> (usize, usize) {
    let lo = match window {
        Some(w) => (i + 1).saturating_sub(w),
        None => 0,
    };
    (lo, i + 1)
}

/// Heads of an attention call: q [B, H, T, dh], k and v [B, Hkv, T, dh].
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) b: usize,
    pub(crate) h: usize,
    pub(crate) hkv: usize,
    pub(crate) t: usize,
    pub(crate) dh: usize,
}

/// The reference every attention kernel is tested against.
#[cfg(test)]
pub(crate) mod brute_force {
    use super::{Dims, visible};

    /// Uniform in [-2, 2), from a seeded LCG.
    pub(crate) fn random(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
            })
            .collect()
    }

    /// Brute force in f64: every score, the masked softmax, the product;
    /// q [B, H, T, dh], k and v [B, Hkv, T, dh] in, [B, H, T, dh] out.
    pub(crate) fn reference(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        d: Dims,
        scale: f64,
        window: Option<usize>,
    ) -> Vec<f64> {
        let Dims { b, h, hkv, t, dh } = d;
        let mut out = vec![0.0; b * h * t * dh];
        for bi in 0..b {
            for hi in 0..h {
                let qo = (bi * h + hi) * t * dh;
                let ko = (bi * hkv + hi / (h / hkv)) * t * dh;
                for i in 0..t {
                    let (lo, hi_) = visible(i, window);
                    let s: Vec<f64> = (lo..hi_)
                        .map(|j| {
                            scale
                                * (0..dh)
                                    .map(|c| q[qo + i * dh + c] * k[ko + j * dh + c])
                                    .sum::<f64>()
                        })
                        .collect();
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for (j, x) in (lo..hi_).zip(&s) {
                        let p = (x - m).exp() / z;
                        for c in 0..dh {
                            out[qo + i * dh + c] += p * v[ko + j * dh + c];
                        }
                    }
                }
            }
        }
        out
    }
}
