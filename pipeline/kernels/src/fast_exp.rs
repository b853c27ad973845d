//! exp for f32 that the compiler vectorises, for softmax-shaped sums
//! (attention's softmax, the loss's logsumexp), and GPT-2's GELU built on
//! it for the CPU's inference passes.

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

/// GPT-2's `gelu_new`, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x +
/// 0.044715 x^3), written as x sigmoid(2u) = x / (1 + exp(-2u)) so that it
/// vectorises through [`exp_f32`] instead of a libm tanh per element (a
/// fifth of a CPU collection's time), and has no cancellation in 1 +
/// tanh(u) for negative x. Error: relative ~3e-7 from the exp, plus f32's
/// rounding of u amplified by |2u| where the result is tiny (see the test).
#[inline(always)]
pub fn gelu_tanh_f32(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    x / (1.0 + exp_f32(-2.0 * u))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPT-2's `gelu_new` in f64: its definition, 0.5 x (1 + tanh(u)),
    /// where that has no cancellation, else the identity 0.5 (1 + tanh u) =
    /// 1 / (1 + exp(-2u)) (the definition rounds to 0 below x = -7 in f64).
    fn gelu_reference(x: f64) -> f64 {
        let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3));
        if x > -3.0 {
            0.5 * x * (1.0 + u.tanh())
        } else {
            x / (1.0 + (-2.0 * u).exp())
        }
    }

    /// The fast GELU against f64 from the same f32 input, over the range
    /// activations take and beyond. The bound: 1e-6 relative (the exp's
    /// 3e-7 and a few roundings), plus 2e-7 |2u| relative where the
    /// sigmoid is in its tail (f32's rounding of u, amplified by the
    /// exp's slope), plus 1e-30 absolute for results below f32's normal
    /// range.
    #[test]
    fn fast_gelu_is_accurate() {
        let mut x = -60.0f32;
        while x < 60.0 {
            let (got, want) = (gelu_tanh_f32(x) as f64, gelu_reference(x as f64));
            let u = 0.7978845608028654 * (x as f64 + 0.044715 * (x as f64).powi(3));
            let bound = (1e-6 + 2e-7 * (2.0 * u).abs()) * want.abs() + 1e-30;
            assert!((got - want).abs() <= bound, "x = {x}: {got} vs {want}");
            x += 0.000_731;
        }
        // The two f64 forms agree where both are exact enough.
        for x in [-3.0, -2.0, -0.5, 0.25, 1.0, 3.0] {
            let u = 0.7978845608028654 * (x + 0.044715 * f64::powi(x, 3));
            let (tanh_form, sigmoid_form) = (0.5 * x * (1.0 + f64::tanh(u)), x / (1.0 + (-2.0 * u).exp()));
            assert!(
                (tanh_form - sigmoid_form).abs() <= 1e-12 * sigmoid_form.abs(),
                "{x}"
            );
        }
        assert_eq!(gelu_tanh_f32(0.0), 0.0);
        assert_eq!(gelu_tanh_f32(1e4), 1e4);
        assert!(gelu_tanh_f32(-1e4) == 0.0 && gelu_tanh_f32(-1e4).is_sign_negative());
    }

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
