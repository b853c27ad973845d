//! AdamW as PyTorch (and the Hugging Face Trainer) applies it: decoupled
//! weight decay on weights only (not biases or layer norms), bias-corrected
//! moments, and global-norm gradient clipping before the update.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{Context, Error, Result};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Updates applied so far (the `t` of the bias correction).
    pub step: u64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let m = var.zeros_like().ctx("optimizer state")?;
                let v = var.zeros_like().ctx("optimizer state")?;
                let decay = super::decays(&name);
                Ok(Slot {
                    name,
                    var,
                    m,
                    v,
                    decay,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW { cfg, slots, step: 0 })
    }

    /// Global L2 norm of the gradients (f64).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut total = 0f64;
        for s in &self.slots {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                let sq = g
                    .to_dtype(DType::F64)
                    .and_then(|g| g.sqr())
                    .and_then(|g| g.sum_all())
                    .and_then(|g| g.to_scalar::<f64>())
                    .ctx("gradient norm")?;
                total += sq;
            }
        }
        Ok(total.sqrt())
    }

    /// One update with learning rate `lr`, clipping the global gradient norm to
    /// `max_norm` (as torch's clip_grad_norm_). Returns the norm before clipping.
    pub fn step(&mut self, grads: &GradStore, lr: f64, max_norm: f64) -> Result<f64> {
        let norm = self.grad_norm(grads)?;
        if !norm.is_finite() {
            return Err(Error::invalid(format!(
                "gradient norm is {norm} at step {}: training diverged (lower the learning rate)",
                self.step + 1
            )));
        }
        let scale = if max_norm > 0.0 {
            (max_norm / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let mut update = || -> candle_core::Result<()> {
                let g = (g * scale)?;
                s.m = ((&s.m * b1)? + (&g * (1.0 - b1))?)?;
                s.v = ((&s.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                let mut p = s.var.as_tensor().clone();
                if s.decay && self.cfg.weight_decay != 0.0 {
                    p = (p * (1.0 - lr * self.cfg.weight_decay))?;
                }
                let denom = ((&s.v / bc2)?.sqrt()? + self.cfg.eps)?;
                let p = (p - ((&s.m / bc1)? / denom)? * lr)?;
                s.var.set(&p)
            };
            update().ctx(format!("updating {}", s.name))?;
        }
        Ok(norm)
    }

    /// Moments by name (`m.<param>`, `v.<param>`), for resumable checkpoints.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("m.{}", s.name), s.m.clone());
            out.insert(format!("v.{}", s.name), s.v.clone());
        }
        out
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for s in &mut self.slots {
            for (key, slot) in [
                (format!("m.{}", s.name), &mut s.m),
                (format!("v.{}", s.name), &mut s.v),
            ] {
                let t = state
                    .get(&key)
                    .ok_or_else(|| Error::invalid(format!("optimizer state lacks {key}")))?;
                if t.dims() != slot.dims() {
                    return Err(Error::invalid(format!(
                        "optimizer state {key} has shape {:?}",
                        t.dims()
                    )));
                }
                *slot = t.to_dtype(slot.dtype()).ctx("optimizer state")?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two AdamW steps on f(p) = sum(p^2)/2 (gradient p), checked against the
    /// update written out by hand.
    #[test]
    fn adamw_matches_the_hand_written_update() {
        let dev = Device::Cpu;
        let p0 = [1.0f64, -2.0, 0.5];
        let w = Var::from_tensor(&Tensor::new(&p0, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&p0, &dev).unwrap()).unwrap();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(
            vec![("x.weight".into(), w.clone()), ("x.bias".into(), b.clone())],
            cfg,
        )
        .unwrap();
        let (lr, mut pw, mut pb) = (0.01, p0, p0);
        let (mut mw, mut vw, mut mb, mut vb) = ([0.0; 3], [0.0; 3], [0.0; 3], [0.0; 3]);
        for t in 1..=2 {
            let loss = ((w.as_tensor().sqr().unwrap().sum_all().unwrap()
                + b.as_tensor().sqr().unwrap().sum_all().unwrap())
            .unwrap()
                * 0.5)
                .unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, lr, 0.0).unwrap();
            let (bc1, bc2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.999f64.powi(t));
            for (p, m, v, decay) in [
                (&mut pw, &mut mw, &mut vw, true),
                (&mut pb, &mut mb, &mut vb, false),
            ] {
                for i in 0..3 {
                    let g = p[i];
                    m[i] = 0.9 * m[i] + 0.1 * g;
                    v[i] = 0.999 * v[i] + 0.001 * g * g;
                    if decay {
                        p[i] *= 1.0 - lr * 0.1;
                    }
                    p[i] -= lr * (m[i] / bc1) / ((v[i] / bc2).sqrt() + 1e-8);
                }
            }
        }
        let (gw, gb) = (
            w.as_tensor().to_vec1::<f64>().unwrap(),
            b.as_tensor().to_vec1::<f64>().unwrap(),
        );
        for i in 0..3 {
            assert!(
                (gw[i] - pw[i]).abs() < 1e-14 && (gb[i] - pb[i]).abs() < 1e-14,
                "{gw:?} {pw:?} {gb:?} {pb:?}"
            );
        }
    }
}
