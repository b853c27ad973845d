//! The causal (optionally windowed) softmax of one block of attention
//! scores, scaled, masked and normalised in one pass, with the result in
//! the dtype the next product wants.
//!
//! [`crate::attention::blocked_attention`] scores a block of queries
//! i0 .. i0 + m against keys lo .. lo + nk. Done with primitives, the mask is
//! a broadcast add, the scale a multiply and the cast to bf16 another pass:
//! on an H100 the broadcast add alone was a third of a 12x1024 model's
//! collection (candle's strided binary kernel), more than all its matrix
//! products. Here one warp takes one row: the maximum and the sum of
//! exponentials over the visible keys (warp shuffles), then the
//! probabilities, zero for masked keys, written once as f32 or bf16. The
//! kernel is compiled by NVRTC the first time it is used (no build-time
//! nvcc step). The CPU version does the same arithmetic in f64 and is what
//! the tests check against brute force.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::mask::visible;

/// Which block of queries and keys the scores [.., m, nk] belong to.
#[derive(Clone, Copy, Debug)]
pub struct BlockSoftmax {
    /// First query of the block; row r of a [.., m, nk] slab is query i0 + r.
    pub i0: usize,
    /// First key of the block; column j is key lo + j.
    pub lo: usize,
    pub window: Option<usize>,
    pub scale: f64,
    /// F32, or BF16 for a bf16 product with V.
    pub out: DType,
}

impl BlockSoftmax {
    /// Visible columns [a, e) of row r (query i0 + r % m).
    fn columns(&self, r: usize, m: usize) -> (usize, usize) {
        let (a, e) = visible(self.i0 + r % m, self.window);
        (a.max(self.lo) - self.lo, e - self.lo)
    }

    fn dims(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (o1, o2) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("block softmax needs contiguous scores".into()))?;
        let d = l.shape().dims();
        if d.len() < 2 {
            candle_core::bail!("block softmax expects [.., m, nk] scores, got {d:?}");
        }
        let (m, nk) = (d[d.len() - 2], d[d.len() - 1]);
        if m > 0 && self.i0 + m > self.lo + nk {
            candle_core::bail!(
                "block softmax: queries {}..{} see keys past the block's {}..{}",
                self.i0,
                self.i0 + m,
                self.lo,
                self.lo + nk
            );
        }
        let first_visible = visible(self.i0, self.window).0;
        if m > 0 && first_visible < self.lo {
            candle_core::bail!(
                "block softmax: query {} sees key {first_visible}, before the block's first key {}",
                self.i0,
                self.lo
            );
        }
        Ok((o1, o2, m, nk))
    }
}

impl CustomOp1 for BlockSoftmax {
    fn name(&self) -> &'static str {
        "block-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (o1, o2, m, nk) = self.dims(l)?;
        let src: Vec<f64> = match s {
            CpuStorage::F32(v) => v[o1..o2].iter().map(|&x| x as f64).collect(),
            CpuStorage::F64(v) => v[o1..o2].to_vec(),
            other => candle_core::bail!("block softmax: unsupported dtype {:?}", other.dtype()),
        };
        let mut p = vec![0f64; src.len()];
        for (r, (row, out)) in src.chunks(nk.max(1)).zip(p.chunks_mut(nk.max(1))).enumerate() {
            let (a, e) = self.columns(r, m);
            let mx = row[a..e]
                .iter()
                .map(|&x| x * self.scale)
                .fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row[a..e].iter().map(|&x| (x * self.scale - mx).exp()).sum();
            for (o, &x) in out[a..e].iter_mut().zip(&row[a..e]) {
                *o = (x * self.scale - mx).exp() / sum;
            }
        }
        let out = match self.out {
            DType::F32 => CpuStorage::F32(p.into_iter().map(|x| x as f32).collect()),
            DType::F64 => CpuStorage::F64(p),
            DType::BF16 => CpuStorage::BF16(p.into_iter().map(half::bf16::from_f64).collect()),
            other => candle_core::bail!("block softmax: unsupported output dtype {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, s, l)
    }
}

/// Softmax over the last axis of block scores [.., m, nk] (see the module
/// documentation); f32 scores on the CPU or a CUDA device.
pub fn block_softmax(scores: &Tensor, op: BlockSoftmax) -> candle_core::Result<Tensor> {
    scores.contiguous()?.apply_op1_no_bwd(&op)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::BlockSoftmax;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape};

    /// Warps per CUDA block; each warp takes one row.
    const WARPS: u32 = 4;
    /// A warp keeps its row in shared memory up to this many keys (the
    /// block's rows then fit the default 48 KiB); longer rows are read
    /// from global memory three times.
    const ROW_CACHE_KEYS: usize = 3_000;

    /// One warp per row (reductions by shuffles alone, no block barriers);
    /// f32 scores in, f32 or bf16 probabilities out.
    const SOURCE: &str = r#"
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// With `cached`, the row's scaled scores and then their exponentials are kept
// in shared memory, so global memory is read once instead of three times.
template <typename Store>
__device__ void row_softmax(const float* src, unsigned int rows, unsigned int nk, unsigned int m, unsigned int i0,
                            unsigned int lo, unsigned int window, unsigned int cached, float scale, Store store) {
    extern __shared__ float cache[];
    unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    unsigned long long r = (unsigned long long)blockIdx.x * (blockDim.x >> 5) + warp;
    if (r >= rows) return;
    float* row = cache + (unsigned long long)warp * nk;
    const float* x = src + r * nk;
    unsigned int i = i0 + (unsigned int)(r % m);
    unsigned int vis = (window > 0 && i + 1 > window) ? i + 1 - window : 0;
    unsigned int a = (vis > lo ? vis : lo) - lo, e = i + 1 - lo;
    float mx = __int_as_float(0xff800000);
    for (unsigned int j = a + lane; j < e; j += 32) {
        float v = x[j] * scale;
        if (cached) row[j] = v;
        mx = fmaxf(mx, v);
    }
    mx = warp_max(mx);
    float s = 0.0f;
    for (unsigned int j = a + lane; j < e; j += 32) {
        float p = expf((cached ? row[j] : x[j] * scale) - mx);
        if (cached) row[j] = p;
        s += p;
    }
    s = warp_sum(s);
    // Lanes read entries other lanes wrote.
    __syncwarp();
    float inv = 1.0f / s;
    for (unsigned int j = lane; j < nk; j += 32) {
        float p = 0.0f;
        if (j >= a && j < e) p = cached ? row[j] : expf(x[j] * scale - mx);
        store(r * nk + j, p * inv);
    }
}
struct StoreF32 { float* p; __device__ void operator()(unsigned long long k, float v) const { p[k] = v; } };
struct StoreBf16 { unsigned short* p; __device__ void operator()(unsigned long long k, float v) const { p[k] = to_bf16(v); } };
extern "C" __global__ void block_softmax_f32(const float* src, float* dst, unsigned int rows, unsigned int nk,
                                             unsigned int m, unsigned int i0, unsigned int lo, unsigned int window,
                                             unsigned int cached, float scale) {
    row_softmax(src, rows, nk, m, i0, lo, window, cached, scale, StoreF32{dst});
}
extern "C" __global__ void block_softmax_bf16(const float* src, unsigned short* dst, unsigned int rows, unsigned int nk,
                                              unsigned int m, unsigned int i0, unsigned int lo, unsigned int window,
                                              unsigned int cached, float scale) {
    row_softmax(src, rows, nk, m, i0, lo, window, cached, scale, StoreBf16{dst});
}
"#;

    pub(super) fn forward(
        op: &BlockSoftmax,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (o1, o2, m, nk) = op.dims(l)?;
        let rows = if nk == 0 { 0 } else { (o2 - o1) / nk };
        let dev = s.device.clone();
        let src = s.as_cuda_slice::<f32>()?.slice(o1..o2);
        let u32_of = |x: usize, what: &str| {
            u32::try_from(x)
                .map_err(|_| candle_core::Error::Msg(format!("block softmax: {what} {x} exceeds u32")))
        };
        let (nk32, m32, i032, lo32) = (
            u32_of(nk, "nk")?,
            u32_of(m, "m")?,
            u32_of(op.i0, "i0")?,
            u32_of(op.lo, "lo")?,
        );
        let window = u32_of(op.window.unwrap_or(0), "window")?;
        let scale = op.scale as f32;
        let cached = nk <= ROW_CACHE_KEYS;
        let rows32 = u32_of(rows, "rows")?;
        let cfg = LaunchConfig {
            grid_dim: (rows32.div_ceil(WARPS), 1, 1),
            block_dim: (32 * WARPS, 1, 1),
            shared_mem_bytes: if cached {
                u32_of(4 * nk * WARPS as usize, "row bytes")?
            } else {
                0
            },
        };
        let name = match op.out {
            DType::F32 => "block_softmax_f32",
            DType::BF16 => "block_softmax_bf16",
            other => candle_core::bail!("block softmax: unsupported output dtype {other:?}"),
        };
        let args = [rows32, nk32, m32, i032, lo32, window, cached as u32];
        let storage = if op.out == DType::F32 {
            launch::<f32>(&dev, name, cfg, &src, rows * nk, args, scale)?
        } else {
            launch::<half::bf16>(&dev, name, cfg, &src, rows * nk, args, scale)?
        };
        Ok((storage, l.shape().clone()))
    }

    /// Runs kernel `name` into a fresh output of `len` elements of `T`.
    fn launch<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        cfg: LaunchConfig,
        src: &CudaView<'_, f32>,
        len: usize,
        args: [u32; 7],
        scale: f32,
    ) -> candle_core::Result<CudaStorage> {
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(len)? };
        if len > 0 {
            const MODULE: &str = "pipeline_block_softmax";
            let func = dev.get_or_load_custom_func(name, MODULE, &crate::nvrtc::ptx(MODULE, SOURCE)?)?;
            let mut b = func.builder();
            b.arg(src);
            b.arg(&out);
            for a in &args {
                b.arg(a);
            }
            b.arg(&scale);
            // SAFETY: the arguments (src, dst, rows, nk, m, i0, lo, window,
            // cached, scale) match the kernel's signature; with `cached` the
            // launch gives each warp its row's 4 * nk bytes of shared memory.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against a hand-built masked softmax in f64: rows of two heads, a
    /// window that cuts into the block, bf16 output within bf16 rounding.
    #[test]
    fn block_softmax_matches_the_masked_softmax() {
        let dev = Device::Cpu;
        let (m, nk) = (5, 9);
        let op = BlockSoftmax {
            i0: 6,
            lo: 2,
            window: Some(5),
            scale: 0.7,
            out: DType::F32,
        };
        let x = Tensor::randn(0f32, 2.0, (2, m, nk), &dev).unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = block_softmax(&x, op)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let bf = block_softmax(
            &x,
            BlockSoftmax {
                out: DType::BF16,
                ..op
            },
        )
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        for h in 0..2 {
            for r in 0..m {
                let i = 6 + r;
                let keys: Vec<usize> = (2..2 + nk).filter(|&k| k <= i && i - k < 5).collect();
                let z: Vec<f64> = keys
                    .iter()
                    .map(|&k| 0.7 * xs[(h * m + r) * nk + k - 2] as f64)
                    .collect();
                let mx = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = z.iter().map(|v| (v - mx).exp()).sum();
                for j in 0..nk {
                    let want = keys
                        .iter()
                        .position(|&k| k == j + 2)
                        .map_or(0.0, |p| (z[p] - mx).exp() / sum);
                    let (g, b) = (got[(h * m + r) * nk + j] as f64, bf[(h * m + r) * nk + j] as f64);
                    assert!((g - want).abs() < 1e-6, "row {r} key {}: {g} vs {want}", j + 2);
                    assert!(
                        (b - want).abs() <= want * 2f64.powi(-8) + 1e-30,
                        "bf16 {b} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn blocks_that_miss_visible_keys_are_refused() {
        let x = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
        let op = BlockSoftmax {
            i0: 0,
            lo: 0,
            window: None,
            scale: 1.0,
            out: DType::F32,
        };
        assert!(
            block_softmax(&x, op)
                .unwrap_err()
                .to_string()
                .contains("past the block")
        );
        let op = BlockSoftmax {
            i0: 4,
            lo: 2,
            window: None,
            scale: 1.0,
            out: DType::F32,
        };
        let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(
            block_softmax(&x, op)
                .unwrap_err()
                .to_string()
                .contains("before the block")
        );
    }
}
