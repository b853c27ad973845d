//! exp for f32 that the compiler vectorises, for softmax-shaped sums
//! (attention's softmax, the loss's logsumexp).

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
