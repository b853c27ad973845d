//! `pipeline bench model`: forward and training-step throughput of a
//! randomly initialised GPT-Neo, against the GEMM peak measured in the
//! same run.

use candle_core::{Device, Tensor};

use super::{forward_flops_per_token, peak_gemm_gflops, timed};
use crate::error::{Context, Result};
use lc_models::{CausalLm, GptNeo, GptNeoConfig, loss};

/// Forward (with logits) and training tokens/s of a randomly initialised
/// model on random token ids.
pub fn model(depth: usize, width: usize, t: usize, batch: usize, steps: usize) -> Result<String> {
    let dev = Device::Cpu;
    let config = GptNeoConfig::grid(depth, width, 16, 50257, t.max(2048));
    let (net, vars) = GptNeo::trainable(config.clone(), 0, &dev, "bench")?;
    let mut opt = lc_models::optim::AdamW::new(
        vars,
        lc_models::optim::AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let mut s = 7u64;
    let ids: Vec<u32> = (0..batch * t)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % 50257) as u32
        })
        .collect();
    let labels: Vec<u32> = ids.chunks(t).flat_map(|r| r[1..].to_vec()).collect();
    let x = Tensor::from_vec(ids, (batch, t), &dev).ctx("batch")?;
    let forward = |train: bool| -> Result<Tensor> {
        let h = net.forward(&x, &[depth], train)?.remove(0);
        let h = h
            .narrow(1, 0, t - 1)
            .and_then(|h| h.reshape((batch * (t - 1), width)))
            .ctx("positions")?;
        Ok(net.logits(&h)?)
    };
    forward(false)?;
    let (_, tf) = timed(|| {
        for _ in 0..steps {
            forward(false)?;
        }
        Ok(())
    })?;
    let (_, tt) = timed(|| {
        for _ in 0..steps {
            // As the train stage computes it: output layer fused into the loss.
            let h = net.forward(&x, &[depth], true)?.remove(0);
            let h = h
                .narrow(1, 0, t - 1)
                .and_then(|h| h.reshape((batch * (t - 1), width)))
                .ctx("positions")?;
            let l = loss::linear_cross_entropy(&h, net.classifier(), &labels)?;
            let g = l.backward().ctx("backward")?;
            opt.step(&g, 1e-4, 1.0)?;
        }
        Ok(())
    })?;
    let tokens = (steps * batch * t) as f64;
    let peak = peak_gemm_gflops();
    let fwd = forward_flops_per_token(&config, t, true);
    // A training step is a forward and a backward of twice its cost.
    let (gf, gt) = (fwd * tokens / tf / 1e9, 3.0 * fwd * tokens / tt / 1e9);
    Ok(format!(
        "model {depth}x{width} (T = {t}, batch {batch}, {} params), as a share of the in-process peak GEMM ({peak:.0} GFLOP/s):\n  \
         forward with logits {:.1}% ({gf:.1} GFLOP/s, {:.0} tokens/s on this machine)\n  \
         training step {:.1}% ({gt:.1} GFLOP/s, {:.0} tokens/s on this machine)",
        net.n_params(),
        100.0 * gf / peak,
        tokens / tf,
        100.0 * gt / peak,
        tokens / tt
    ))
}
