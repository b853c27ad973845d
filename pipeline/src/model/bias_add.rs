//! `y + b` for a bias b [n] added to every row of y [.., n], in one pass
//! over contiguous rows.
//!
//! candle's CUDA broadcast add finds each element's bias through the
//! strides of a broadcast layout (an integer division and remainder per
//! dimension per element); on an H100 the three bias adds of every
//! GPT-Neo block were a fifth of a 12x1024 model's collection. Here one
//! CUDA block walks one row. Used without gradients only: training keeps
//! the differentiable broadcast add. The CPU version is the one the tests
//! check against candle's broadcast add.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

struct BiasAdd;

/// The (start, end) element offsets of a contiguous layout.
type Offsets = (usize, usize);

/// Offsets of y and b, and the bias length, for contiguous y [.., n] and b [n].
fn dims(y: &Layout, b: &Layout) -> candle_core::Result<(Offsets, Offsets, usize)> {
    let contiguous = |l: &Layout, what: &str| {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("bias add needs a contiguous {what}")))
    };
    let (yo, bo) = (contiguous(y, "input")?, contiguous(b, "bias")?);
    let n = b.shape().elem_count();
    if b.shape().rank() != 1 || y.shape().dims().last() != Some(&n) {
        candle_core::bail!(
            "bias add: bias {:?} does not match rows of {:?}",
            b.shape(),
            y.shape()
        );
    }
    Ok((yo, bo, n))
}

/// out[r, j] = y[r, j] + b[j].
fn add_rows<T: Copy>(y: &[T], b: &[T], add: impl Fn(T, T) -> T) -> Vec<T> {
    if b.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(y.len());
    for row in y.chunks(b.len()) {
        out.extend(row.iter().zip(b).map(|(&x, &c)| add(x, c)));
    }
    out
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        yl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((y0, y1), (b0, b1), _) = dims(yl, bl)?;
        let out = match (y, b) {
            (CpuStorage::F32(y), CpuStorage::F32(b)) => {
                CpuStorage::F32(add_rows(&y[y0..y1], &b[b0..b1], |x, c| x + c))
            }
            (CpuStorage::F64(y), CpuStorage::F64(b)) => {
                CpuStorage::F64(add_rows(&y[y0..y1], &b[b0..b1], |x, c| x + c))
            }
            (CpuStorage::BF16(y), CpuStorage::BF16(b)) => {
                CpuStorage::BF16(add_rows(&y[y0..y1], &b[b0..b1], |x, c| x + c))
            }
            _ => candle_core::bail!("bias add: unsupported dtypes {:?} and {:?}", y.dtype(), b.dtype()),
        };
        Ok((out, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(y, yl, b, bl)
    }
}

/// `y + b` broadcast over the rows of y (see the module documentation).
pub fn bias_add(y: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let fits = matches!(y.dtype(), DType::F32 | DType::F64 | DType::BF16)
        && b.dtype() == y.dtype()
        && b.rank() == 1
        && y.dims().last() == Some(&b.elem_count());
    if y.track_op() || b.track_op() || !fits {
        return y.broadcast_add(b);
    }
    y.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &BiasAdd)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Shape};

    /// One block per row; bf16 is added in f32 and rounded once, as
    /// candle's bf16 add does.
    const SOURCE: &str = r#"
extern "C" __global__ void bias_add_f32(const float* y, const float* b, float* out, unsigned int n) {
    unsigned long long r = blockIdx.x;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) out[r * n + j] = y[r * n + j] + b[j];
}
extern "C" __global__ void bias_add_f64(const double* y, const double* b, double* out, unsigned int n) {
    unsigned long long r = blockIdx.x;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) out[r * n + j] = y[r * n + j] + b[j];
}
extern "C" __global__ void bias_add_bf16(const unsigned short* y, const unsigned short* b, unsigned short* out,
                                         unsigned int n) {
    unsigned long long r = blockIdx.x;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x)
        out[r * n + j] = to_bf16(from_bf16(y[r * n + j]) + from_bf16(b[j]));
}
"#;

    pub(super) fn forward(
        y: &CudaStorage,
        yl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (ys, bs, n) = super::dims(yl, bl)?;
        let rows = if n == 0 { 0 } else { (ys.1 - ys.0) / n };
        let too_big = |x: usize| candle_core::Error::Msg(format!("bias add: {x} exceeds u32"));
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(rows).map_err(|_| too_big(rows))?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let n = u32::try_from(n).map_err(|_| too_big(n))?;
        let out = match y.dtype() {
            DType::F32 => launch::<f32>(y, ys, b, bs, "bias_add_f32", cfg, n)?,
            DType::F64 => launch::<f64>(y, ys, b, bs, "bias_add_f64", cfg, n)?,
            DType::BF16 => launch::<half::bf16>(y, ys, b, bs, "bias_add_bf16", cfg, n)?,
            other => candle_core::bail!("bias add: unsupported dtype {other:?}"),
        };
        Ok((out, yl.shape().clone()))
    }

    fn launch<T: CudaDType + DeviceRepr>(
        y: &CudaStorage,
        (y0, y1): (usize, usize),
        b: &CudaStorage,
        (b0, b1): (usize, usize),
        name: &str,
        cfg: LaunchConfig,
        n: u32,
    ) -> candle_core::Result<CudaStorage> {
        let dev = y.device.clone();
        let (ys, bs) = (
            y.as_cuda_slice::<T>()?.slice(y0..y1),
            b.as_cuda_slice::<T>()?.slice(b0..b1),
        );
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(y1 - y0)? };
        if cfg.grid_dim.0 > 0 && n > 0 {
            const MODULE: &str = "pipeline_bias_add";
            let func = dev.get_or_load_custom_func(name, MODULE, &crate::nvrtc::ptx(MODULE, SOURCE)?)?;
            let mut builder = func.builder();
            builder.arg(&ys);
            builder.arg(&bs);
            builder.arg(&out);
            builder.arg(&n);
            // SAFETY: the arguments (y, b, out, n) match the kernel's signature.
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Equal to candle's broadcast add, bit for bit, in every dtype it
    /// takes; with gradients it is the broadcast add itself.
    #[test]
    fn bias_add_equals_the_broadcast_add() {
        let dev = Device::Cpu;
        let y = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        for dt in [DType::F32, DType::F64, DType::BF16] {
            let (y, b) = (y.to_dtype(dt).unwrap(), b.to_dtype(dt).unwrap());
            let got = bias_add(&y, &b).unwrap().to_dtype(DType::F64).unwrap();
            let want = y.broadcast_add(&b).unwrap().to_dtype(DType::F64).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(diff, 0.0, "{dt:?}");
        }
        // A transposed (non-contiguous) input is made contiguous first.
        let yt = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap().t().unwrap();
        let bt = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        let diff = (bias_add(&yt, &bt).unwrap() - yt.broadcast_add(&bt).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        // With gradients: the gradient reaches the bias.
        let bv = Var::from_tensor(&b).unwrap();
        let grads = bias_add(&y, bv.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = grads.get(bv.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g, vec![6.0; 5]);
        assert!(bias_add(&y, &Tensor::zeros(4, DType::F32, &dev).unwrap()).is_err());
    }
}
