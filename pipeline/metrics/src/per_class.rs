//! The class-wise quantities of NC2 and NC3, for one analysed class c with
//! centred mean m_c = mu_c - mu_bar ([`crate::selection`]) and classifier
//! row w_c (DESIGN.md, "Metrics", eqs. 5 and 8):
//!
//! - equinormness: ||m_c|| and log ||m_c|| (whose coefficient of variation
//!   over V' is NC2's);
//! - self-duality: <w_c, m_c>, cos(w_c, m_c) (whose mean over V' is NC3's)
//!   and || w_c/||w_c|| - m_c/||m_c|| ||.

/// ||m||.
pub fn norm(m: &[f64]) -> f64 {
    m.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// log ||m||, undefined for a zero norm.
pub fn log_norm(norm: f64) -> Option<f64> {
    (norm > 0.0).then(|| norm.ln())
}

/// A class's self-duality: its classifier row against its centred mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Duality {
    /// <w, m>.
    pub dot: f64,
    /// cos(w, m); undefined when either is zero.
    pub cos: Option<f64>,
    /// || w/||w|| - m/||m|| ||; undefined when either is zero.
    pub dist: Option<f64>,
}

/// The self-duality of classifier row `w` and centred mean `m`.
pub fn self_duality(w: &[f64], m: &[f64]) -> Duality {
    let (nw, nm) = (norm(w), norm(m));
    let dot: f64 = w.iter().zip(m).map(|(a, b)| a * b).sum();
    if nw > 0.0 && nm > 0.0 {
        let dd: f64 = w.iter().zip(m).map(|(a, b)| (a / nw - b / nm).powi(2)).sum();
        Duality {
            dot,
            cos: Some(dot / (nw * nm)),
            dist: Some(dd.sqrt()),
        }
    } else {
        Duality {
            dot,
            cos: None,
            dist: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_worked_duality() {
        // w = (3, 4), m = (4, 3): <w, m> = 24, norms 5, cos = 24/25; the unit
        // vectors differ by (-1/5, 1/5), of length sqrt(2)/5.
        let d = self_duality(&[3.0, 4.0], &[4.0, 3.0]);
        assert_eq!(d.dot, 24.0);
        assert!((d.cos.unwrap() - 0.96).abs() < 1e-15);
        assert!((d.dist.unwrap() - 2f64.sqrt() / 5.0).abs() < 1e-15);
        // The identity ||u - v||^2 = 2 - 2 cos for unit u, v.
        let (w, m) = ([0.3, -1.2, 2.0], [1.5, 0.1, -0.4]);
        let d = self_duality(&w, &m);
        assert!((d.dist.unwrap().powi(2) - (2.0 - 2.0 * d.cos.unwrap())).abs() < 1e-14);
        let zero = self_duality(&[0.0, 0.0], &[1.0, 2.0]);
        assert_eq!((zero.dot, zero.cos, zero.dist), (0.0, None, None));
        assert_eq!(norm(&[3.0, 4.0]), 5.0);
        assert_eq!(log_norm(0.0), None);
        assert_eq!(log_norm(1.0), Some(0.0));
    }
}
