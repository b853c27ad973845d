//! `y + b` for a bias b \[n\] added to every row of y [.., n], in one pass
//! over contiguous rows.
//!
//! candle's CUDA broadcast add finds each element's bias through the
//! strides of a broadcast layout (an integer division and remainder per
//! dimension per element); on an H100 the three bias adds of every
//! GPT-Neo block were a fifth of a 12x1024 model's collection. Here one
//! CUDA block walks one row. Used without gradients only: training keeps
//! the differentiable broadcast add. The CPU version is the one the tests
//! check against candle's broadcast add.
//!
//! On a GPU, what follows the bias in a GPT-2/GPT-Neo block is fused with
//! it (`cuda/bias_epilogues.cu`): `bias_gelu` (the MLP's first layer) and
//! `bias_residual` (the attention's and the MLP's output joining the
//! residual stream) each make one pass of 16-byte accesses instead of two
//! passes of 2-byte ones. On the CPU, `bias_gelu` of f32 without gradients
//! (the inference passes) is one pass too, through the vectorised
//! [`gelu_tanh_f32`]: candle's GELU calls libm's tanh per element, a fifth
//! of a CPU collection's time. Elsewhere (training, other dtypes, shapes the
//! kernels do not take) they are the unfused operations, bit for bit as
//! before.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::fast_exp::gelu_tanh_f32;

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

/// Whether b is a bias over the rows of y that this module's one-pass ops
/// take: b [n] of y's dtype, y [.., n], neither needing gradients.
fn row_bias(y: &Tensor, b: &Tensor) -> bool {
    b.dtype() == y.dtype()
        && b.rank() == 1
        && y.dims().last() == Some(&b.elem_count())
        && !y.track_op()
        && !b.track_op()
}

/// `y + b` broadcast over the rows of y (see the module documentation).
pub fn bias_add(y: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if !(matches!(y.dtype(), DType::F32 | DType::F64 | DType::BF16) && row_bias(y, b)) {
        return y.broadcast_add(b);
    }
    y.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &BiasAdd)
}

/// `gelu_tanh(y + b)` (GPT-2's `gelu_new`) for a bias b \[n\] on the rows of
/// y [.., n]: one pass on a GPU, and on the CPU for f32 without gradients;
/// else `bias_add` then candle's GELU.
pub fn bias_gelu(y: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if let Some((y, b)) = fused_operands(y, b, None)? {
        return y.apply_op2_no_bwd(&b, &BiasGelu);
    }
    if y.device().is_cpu() && y.dtype() == DType::F32 && row_bias(y, b) {
        return y.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &BiasGeluCpu);
    }
    bias_add(y, b)?.gelu()
}

/// `gelu_tanh(y + b)` for f32 on the CPU, through [`gelu_tanh_f32`], rows
/// in parallel.
struct BiasGeluCpu;

impl CustomOp2 for BiasGeluCpu {
    fn name(&self) -> &'static str {
        "bias-gelu-cpu"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        yl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((y0, y1), (b0, b1), n) = dims(yl, bl)?;
        let (y, b) = (&y.as_slice::<f32>()?[y0..y1], &b.as_slice::<f32>()?[b0..b1]);
        let mut out = vec![0f32; y.len()];
        // About 64k elements per task: enough to amortise the split.
        if let Some(per_task) = 65_536usize.checked_div(n) {
            let rows = per_task.max(1) * n;
            out.par_chunks_mut(rows)
                .zip(y.par_chunks(rows))
                .for_each(|(out, y)| gelu_rows(out, y, b));
        }
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }
}

/// out = gelu_tanh(y + b) row by row, in the widest vectors this CPU has
/// (the same arithmetic at every width: no operation is fused).
fn gelu_rows(out: &mut [f32], y: &[f32], b: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: each feature is checked at run time just before.
        if std::arch::is_x86_feature_detected!("avx512f") {
            return unsafe { gelu_rows_avx512(out, y, b) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return unsafe { gelu_rows_avx2(out, y, b) };
        }
    }
    gelu_rows_lanes(out, y, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_rows_avx512(out: &mut [f32], y: &[f32], b: &[f32]) {
    gelu_rows_lanes(out, y, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gelu_rows_avx2(out: &mut [f32], y: &[f32], b: &[f32]) {
    gelu_rows_lanes(out, y, b)
}

#[inline(always)]
fn gelu_rows_lanes(out: &mut [f32], y: &[f32], b: &[f32]) {
    for (out, y) in out.chunks_exact_mut(b.len()).zip(y.chunks_exact(b.len())) {
        for ((o, &v), &c) in out.iter_mut().zip(y).zip(b) {
            *o = gelu_tanh_f32(v + c);
        }
    }
}

/// `x + (y + b)` for a bias b \[n\] on the rows of y [.., n] and a residual x
/// of y's shape: one pass on a GPU, else `bias_add` then the add.
pub fn bias_residual(x: &Tensor, y: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    match fused_operands(y, b, Some(x))? {
        // `fused_operands` took x only contiguous.
        Some((y, b)) => y.apply_op3_no_bwd(&b, x, &BiasResidual),
        None => x + bias_add(y, b)?,
    }
}

/// y and b made contiguous, when the fused kernels take them: on a GPU,
/// without gradients, one float dtype, rows a multiple of a 16-byte pack,
/// every operand starting on 16 bytes, and 32-bit pack indices.
fn fused_operands(
    y: &Tensor,
    b: &Tensor,
    x: Option<&Tensor>,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    let dt = y.dtype();
    let n = b.elem_count();
    let pack = 16 / dt.size_in_bytes().max(1);
    let takes = y.device().is_cuda()
        && matches!(dt, DType::F32 | DType::F64 | DType::BF16)
        && row_bias(y, b)
        && n > 0
        && n.is_multiple_of(pack)
        && y.elem_count() / pack <= u32::MAX as usize
        && x.is_none_or(|x| x.dtype() == dt && x.dims() == y.dims() && !x.track_op());
    if !takes {
        return Ok(None);
    }
    let aligned = |t: &Tensor| t.layout().start_offset().is_multiple_of(pack);
    let (y, b) = (y.contiguous()?, b.contiguous()?);
    let x_aligned = match x {
        Some(x) => x.is_contiguous() && aligned(x),
        None => true,
    };
    Ok((aligned(&y) && aligned(&b) && x_aligned).then_some((y, b)))
}

/// The fused epilogue the kernels and `cpu_epilogue` compute.
#[derive(Clone, Copy)]
enum Epilogue {
    Gelu,
    Residual,
}

/// GPT-2's `gelu_new` in f32, as `cuda/bias_epilogues.cu` writes it.
fn gelu_f32(v: f32) -> f32 {
    0.5 * v * (1.0 + (0.797_884_6_f32 * (v + 0.044715 * v * v * v)).tanh())
}

fn gelu_f64(v: f64) -> f64 {
    0.5 * v * (1.0 + (0.7978845608028654 * (v + 0.044715 * v * v * v)).tanh())
}

/// The kernels' arithmetic on the CPU: out[r, j] = f(y[r, j] + b[j]) or
/// x[r, j] + (y[r, j] + b[j]), in f32 for bf16 and f32, in f64 for f64.
fn cpu_epilogue(
    ep: Epilogue,
    y: &CpuStorage,
    ys: Offsets,
    b: &CpuStorage,
    bs: Offsets,
    x: Option<(&CpuStorage, Offsets)>,
) -> candle_core::Result<CpuStorage> {
    /// Each operand as a slice of T (`as_slice` refuses another dtype).
    fn run<T: candle_core::WithDType, F: Copy + std::ops::Add<Output = F>>(
        ep: Epilogue,
        (y, (y0, y1)): (&CpuStorage, Offsets),
        (b, (b0, b1)): (&CpuStorage, Offsets),
        x: Option<(&CpuStorage, Offsets)>,
        load: impl Fn(T) -> F,
        store: impl Fn(F) -> T,
        gelu: impl Fn(F) -> F,
    ) -> candle_core::Result<Vec<T>> {
        let (y, b) = (&y.as_slice::<T>()?[y0..y1], &b.as_slice::<T>()?[b0..b1]);
        let x = match x {
            Some((x, (x0, x1))) => Some(&x.as_slice::<T>()?[x0..x1]),
            None => None,
        };
        let n = b.len().max(1);
        Ok((0..y.len())
            .map(|i| {
                let v = load(y[i]) + load(b[i % n]);
                store(match (ep, x) {
                    (Epilogue::Residual, Some(x)) => load(x[i]) + v,
                    _ => gelu(v),
                })
            })
            .collect())
    }
    let (yo, bo) = ((y, ys), (b, bs));
    Ok(match y {
        CpuStorage::BF16(_) => CpuStorage::BF16(run(
            ep,
            yo,
            bo,
            x,
            |v: half::bf16| v.to_f32(),
            half::bf16::from_f32,
            gelu_f32,
        )?),
        CpuStorage::F32(_) => CpuStorage::F32(run(ep, yo, bo, x, |v: f32| v, |v| v, gelu_f32)?),
        CpuStorage::F64(_) => CpuStorage::F64(run(ep, yo, bo, x, |v: f64| v, |v| v, gelu_f64)?),
        _ => candle_core::bail!(
            "bias epilogue: unsupported dtypes {:?} and {:?}",
            y.dtype(),
            b.dtype()
        ),
    })
}

/// `gelu_tanh(y + b)` in one pass.
struct BiasGelu;

/// `x + (y + b)` in one pass.
struct BiasResidual;

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        yl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ys, bs, _) = dims(yl, bl)?;
        Ok((
            cpu_epilogue(Epilogue::Gelu, y, ys, b, bs, None)?,
            yl.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::epilogue(Epilogue::Gelu, y, yl, b, bl, None)
    }
}

/// The residual's offsets, when it has y's shape and is contiguous.
fn residual_offsets(x: &Layout, y: &Layout) -> candle_core::Result<Offsets> {
    match x.contiguous_offsets() {
        Some(o) if x.shape() == y.shape() => Ok(o),
        _ => candle_core::bail!(
            "bias residual: residual {:?} is not a contiguous {:?}",
            x.shape(),
            y.shape()
        ),
    }
}

impl CustomOp3 for BiasResidual {
    fn name(&self) -> &'static str {
        "bias-residual"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        yl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
        x: &CpuStorage,
        xl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ys, bs, _) = dims(yl, bl)?;
        let xs = residual_offsets(xl, yl)?;
        Ok((
            cpu_epilogue(Epilogue::Residual, y, ys, b, bs, Some((x, xs)))?,
            yl.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::epilogue(Epilogue::Residual, y, yl, b, bl, Some((x, xl)))
    }
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

    const EPILOGUES: &str = include_str!("../../cuda/bias_epilogues.cu");
    const EPILOGUE_MODULE: &str = "pipeline_bias_epilogues";
    /// The epilogue kernels' block size (`BE_THREADS` in their source).
    const EPILOGUE_THREADS: u32 = 256;

    pub(super) fn epilogue(
        ep: super::Epilogue,
        y: &CudaStorage,
        yl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        x: Option<(&CudaStorage, &Layout)>,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (ys, bs, n) = super::dims(yl, bl)?;
        let xs = x.map(|(_, xl)| super::residual_offsets(xl, yl)).transpose()?;
        let pack = 16 / y.dtype().size_in_bytes();
        let in_packs = |o: usize| o.is_multiple_of(pack);
        if n == 0 || !in_packs(n) || !in_packs(ys.0) || !in_packs(bs.0) || !xs.is_none_or(|x| in_packs(x.0)) {
            candle_core::bail!("bias epilogue: rows of {n} or offsets not in packs of {pack} elements");
        }
        let len = ys.1 - ys.0;
        let packs = u32::try_from(len / pack).map_err(|_| {
            candle_core::Error::Msg(format!("bias epilogue: {len} elements exceed 32-bit packs"))
        })?;
        let row_packs = (n / pack) as u32;
        let kind = match ep {
            super::Epilogue::Gelu => "gelu",
            super::Epilogue::Residual => "residual",
        };
        let x = x.map(|(x, _)| x).zip(xs);
        let out = match y.dtype() {
            DType::BF16 => launch_epilogue::<half::bf16>(kind, "bf16", y, ys, b, bs, x, packs, row_packs)?,
            DType::F32 => launch_epilogue::<f32>(kind, "f32", y, ys, b, bs, x, packs, row_packs)?,
            DType::F64 => launch_epilogue::<f64>(kind, "f64", y, ys, b, bs, x, packs, row_packs)?,
            other => candle_core::bail!("bias epilogue: unsupported dtype {other:?}"),
        };
        Ok((out, yl.shape().clone()))
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_epilogue<T: CudaDType + DeviceRepr>(
        kind: &str,
        suffix: &str,
        y: &CudaStorage,
        (y0, y1): (usize, usize),
        b: &CudaStorage,
        (b0, b1): (usize, usize),
        x: Option<(&CudaStorage, (usize, usize))>,
        packs: u32,
        row_packs: u32,
    ) -> candle_core::Result<CudaStorage> {
        let dev = y.device.clone();
        let ys = y.as_cuda_slice::<T>()?.slice(y0..y1);
        let bs = b.as_cuda_slice::<T>()?.slice(b0..b1);
        // SAFETY: the kernel writes every element (every pack of every row).
        let out = unsafe { dev.alloc::<T>(y1 - y0)? };
        if packs == 0 {
            return Ok(CudaStorage::wrap_cuda_slice(out, dev));
        }
        let ptx = crate::nvrtc::ptx(EPILOGUE_MODULE, EPILOGUES)?;
        let func = dev.get_or_load_custom_func(&format!("bias_{kind}_{suffix}"), EPILOGUE_MODULE, &ptx)?;
        let cfg = LaunchConfig {
            grid_dim: (packs.div_ceil(EPILOGUE_THREADS), 1, 1),
            block_dim: (EPILOGUE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let xs = match x {
            Some((x, (x0, x1))) => Some(x.as_cuda_slice::<T>()?.slice(x0..x1)),
            None => None,
        };
        let mut builder = func.builder();
        builder.arg(&ys);
        builder.arg(&bs);
        if let Some(xs) = &xs {
            builder.arg(xs);
        }
        builder.arg(&out);
        builder.arg(&packs);
        builder.arg(&row_packs);
        // SAFETY: the arguments (y, b, [x,] out, packs, row_packs) match the
        // kernel's signature for its kind; `epilogue` checked that y, b and
        // x start on 16 bytes (offsets in whole packs; cudaMalloc aligns
        // the storages) and that rows are whole packs, so the kernel's
        // packs lie inside y, x and out (packs * pack = y's length) and b.
        unsafe { builder.launch(cfg) }.w()?;
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

    /// Seeded normal y [rows, n], b [n] and x [rows, n] (sd 2) in `dt`:
    /// the same operands on every run, so a bound is tested, not a draw.
    fn operands(rows: usize, n: usize, dt: DType) -> (Tensor, Tensor, Tensor) {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6a1e);
        let normal = rand_distr::Normal::new(0f32, 2.0).unwrap();
        let mut r = |shape: &[usize]| {
            let len = shape.iter().product();
            let v: Vec<f32> = (0..len).map(|_| normal.sample(&mut rng)).collect();
            Tensor::from_vec(v, shape, &dev).unwrap().to_dtype(dt).unwrap()
        };
        (r(&[rows, n]), r(&[n]), r(&[rows, n]))
    }

    fn as_f64(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// GPT-2's `gelu_new`, written here apart from the module's copies.
    fn gelu_reference(v: f64) -> f64 {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        0.5 * v * (1.0 + (c * (v + 0.044715 * v.powi(3))).tanh())
    }

    /// The fused epilogues' arithmetic (their CPU op) against f64 from the
    /// same operands, and against the unfused operations.
    ///
    /// Against f64: the fused op forms v = y + b and its GELU or residual
    /// in f32 (f64 for f64) and rounds once, so |fused - exact| <=
    /// r |exact| + e (1.2 |v| + 2 |exact|) + a: r the output's rounding
    /// (2^-8 bf16, 0 otherwise), e the working precision's error through
    /// GELU's slope of at most 1.13 (1e-6 f32, 1e-14 f64), a for results
    /// near zero.
    ///
    /// Against the unfused operations, which round v to the dtype first,
    /// |fused - unfused| <= u (1.2 |v| + 2 |out|) + a with u the dtype's unit
    /// (2^-8 bf16, 1e-6 f32, 1e-14 f64). Candle's bf16 GELU is left out of
    /// that comparison: it rounds to bf16 after each of its eight
    /// operations, so its own error reaches 2 units (CI saw 1.109375 where
    /// f64 gives 1.1221 and the fused op 1.125). Off a GPU the public
    /// functions are the unfused operations, bit for bit, but for f32's
    /// `bias_gelu`, which takes the CPU's fast GELU.
    #[test]
    fn fused_epilogues_match_the_unfused_operations() {
        for (dt, r, e, u, abs) in [
            (DType::BF16, 2f64.powi(-8), 1e-6, 2f64.powi(-8), 2f64.powi(-12)),
            (DType::F32, 0.0, 1e-6, 1e-6, 1e-9),
            (DType::F64, 0.0, 1e-14, 1e-14, 1e-15),
        ] {
            let (y, b, x) = operands(64, 96, dt);
            let unfused_gelu = bias_add(&y, &b).unwrap().gelu().unwrap();
            let unfused_residual = (&x + bias_add(&y, &b).unwrap()).unwrap();
            let fused_gelu = y.apply_op2_no_bwd(&b, &BiasGelu).unwrap();
            let fused_residual = y.apply_op3_no_bwd(&b, &x, &BiasResidual).unwrap();
            let (yv, bv, xv) = (as_f64(&y), as_f64(&b), as_f64(&x));
            let v = |i: usize| yv[i] + bv[i % bv.len()];
            for (i, g) in as_f64(&fused_gelu).iter().enumerate() {
                let want = gelu_reference(v(i));
                let bound = r * want.abs() + e * (1.2 * v(i).abs() + 2.0 * want.abs()) + abs;
                assert!(
                    (g - want).abs() <= bound,
                    "{dt:?} gelu: {g} vs f64 {want} (v = {})",
                    v(i)
                );
            }
            for (i, g) in as_f64(&fused_residual).iter().enumerate() {
                let want = xv[i] + v(i);
                let bound = r * want.abs() + e * (1.2 * v(i).abs() + 2.0 * want.abs()) + abs;
                assert!((g - want).abs() <= bound, "{dt:?} residual: {g} vs f64 {want}");
            }
            let mut pairs = vec![(&fused_residual, &unfused_residual, "residual")];
            if dt != DType::BF16 {
                pairs.push((&fused_gelu, &unfused_gelu, "gelu"));
            }
            for (got, want, what) in pairs {
                for (i, (g, w)) in as_f64(got).iter().zip(as_f64(want)).enumerate() {
                    let bound = u * (1.2 * v(i).abs() + 2.0 * w.abs()) + abs;
                    assert!((g - w).abs() <= bound, "{dt:?} {what}: {g} vs {w} (v = {})", v(i));
                }
            }
            // The public function: on the CPU, f32 goes through the fast
            // GELU (bounded against f64 as the fused op is, its own error
            // being 1e-6 relative: fast_exp's test); the rest is unfused.
            let public_gelu = as_f64(&bias_gelu(&y, &b).unwrap());
            if dt == DType::F32 {
                for (i, g) in public_gelu.iter().enumerate() {
                    let want = gelu_reference(v(i));
                    let bound = e * (1.2 * v(i).abs() + 2.0 * want.abs()) + abs;
                    assert!((g - want).abs() <= bound, "f32 bias_gelu: {g} vs f64 {want}");
                }
            } else {
                assert_eq!(public_gelu, as_f64(&unfused_gelu));
            }
            assert_eq!(
                as_f64(&bias_residual(&x, &y, &b).unwrap()),
                as_f64(&unfused_residual)
            );
        }
    }

    #[cfg(cuda_emulator)]
    unsafe extern "C" {
        /// `cuda/bias_epilogues_emulated.cpp`: the kernels on the emulator.
        fn pipeline_bias_epilogue_emulated(
            residual: std::ffi::c_int,
            dtype: std::ffi::c_int,
            y: *const std::ffi::c_void,
            b: *const std::ffi::c_void,
            x: *const std::ffi::c_void,
            out: *mut std::ffi::c_void,
            packs: u32,
            row_packs: u32,
            blocks: u32,
            seed: u64,
            err: *mut std::ffi::c_char,
            err_len: usize,
        ) -> std::ffi::c_int;
    }

    /// The raw bytes of a contiguous CPU tensor.
    fn bytes(t: &Tensor) -> Vec<u8> {
        let (s, l) = t.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*s else {
            panic!("a CPU tensor")
        };
        let (a, z) = l.contiguous_offsets().expect("contiguous");
        match s {
            CpuStorage::BF16(v) => v[a..z].iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            CpuStorage::F32(v) => v[a..z].iter().flat_map(|x| x.to_le_bytes()).collect(),
            CpuStorage::F64(v) => v[a..z].iter().flat_map(|x| x.to_le_bytes()).collect(),
            _ => panic!("a float tensor"),
        }
    }

    /// The kernel of `ep` on the emulator over `blocks` blocks: the output's
    /// bytes.
    #[cfg(cuda_emulator)]
    fn emulated(
        ep: Epilogue,
        y: &Tensor,
        b: &Tensor,
        x: &Tensor,
        blocks: u32,
        seed: u64,
    ) -> Result<Vec<u8>, String> {
        let dt = y.dtype();
        let pack = 16 / dt.size_in_bytes();
        let code = match dt {
            DType::BF16 => 0,
            DType::F32 => 1,
            _ => 2,
        };
        let (yb, bb, xb) = (bytes(y), bytes(b), bytes(x));
        assert!(yb.len() == xb.len() && yb.len() % 16 == 0 && bb.len() % 16 == 0);
        // 16-byte aligned buffers, as cudaMalloc gives.
        let aligned = |v: &[u8]| {
            let mut w = vec![0u128; v.len() / 16];
            // SAFETY: w has exactly v.len() bytes.
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), w.as_mut_ptr().cast::<u8>(), v.len()) };
            w
        };
        let (ya, ba, xa) = (aligned(&yb), aligned(&bb), aligned(&xb));
        let mut out = vec![0u128; ya.len()];
        let mut err: crate::emulator::Message = [0; 256];
        // SAFETY: y, x and out hold `packs` 16-byte packs and b `row_packs`,
        // all 16-byte aligned.
        let rc = unsafe {
            pipeline_bias_epilogue_emulated(
                matches!(ep, Epilogue::Residual) as std::ffi::c_int,
                code,
                ya.as_ptr().cast(),
                ba.as_ptr().cast(),
                xa.as_ptr().cast(),
                out.as_mut_ptr().cast(),
                (y.elem_count() / pack) as u32,
                (b.elem_count() / pack) as u32,
                blocks,
                seed,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        crate::emulator::outcome(rc, &err)?;
        // SAFETY: out's bytes, in order.
        Ok(unsafe { std::slice::from_raw_parts(out.as_ptr().cast::<u8>(), out.len() * 16) }.to_vec())
    }

    #[cfg(not(cuda_emulator))]
    fn emulated(_: Epilogue, _: &Tensor, _: &Tensor, _: &Tensor, _: u32, _: u64) -> Result<Vec<u8>, String> {
        Err(crate::emulator::NOT_BUILT.into())
    }

    /// The CUDA kernels, run on the emulator, equal the CPU op bit for bit
    /// (the same f32 or f64 arithmetic, the same libm tanh), in every dtype,
    /// for a grid that covers the packs once and for one block that strides
    /// over them (rows of 3 packs, so a pack's bias column wraps).
    #[test]
    fn bias_epilogue_kernels_match_the_cpu_op_on_the_emulator() {
        for dt in [DType::BF16, DType::F32, DType::F64] {
            let pack = 16 / dt.size_in_bytes();
            let (y, b, x) = operands(300, 3 * pack, dt);
            let want_gelu = bytes(&y.apply_op2_no_bwd(&b, &BiasGelu).unwrap());
            let want_residual = bytes(&y.apply_op3_no_bwd(&b, &x, &BiasResidual).unwrap());
            let packs = (y.elem_count() / pack) as u32;
            for blocks in [packs.div_ceil(256), 1] {
                let got = emulated(Epilogue::Gelu, &y, &b, &x, blocks, blocks as u64).unwrap();
                assert!(got == want_gelu, "{dt:?} gelu, {blocks} block(s)");
                let got = emulated(Epilogue::Residual, &y, &b, &x, blocks, 7).unwrap();
                assert!(got == want_residual, "{dt:?} residual, {blocks} block(s)");
            }
        }
    }
}
