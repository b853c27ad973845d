//! Per-class mean and M2 of one batch of embeddings, in f64, in one op on
//! the device that holds them.
//!
//! The rows of h [n, d] are grouped by class beforehand (`order` lists the
//! rows of class s at `starts[s]..starts[s + 1]`), so each class is a
//! contiguous run of row ids and its two passes (the mean, then the squared
//! distances to it) read only its own rows. Built from tensor primitives,
//! the same reduction took a conversion of the whole batch to f64, two
//! `index_add`s (candle's CUDA kernel walks all n rows in each of only d
//! threads) and a gather: a quarter of a 12x1024 model's GPU collection.
//! Here a CUDA block takes one class, its threads the columns; on the CPU
//! classes run in parallel. Output [u, d + 1]: the mean, then M2.
//!
//! [`batch_partial`] turns a labelled batch into the metrics crate's
//! per-class [`Partial`] with it; [`batch_m2_to`] is the second pass of the
//! two-pass mode (squared distances to fixed means).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use lc_metrics::class_stats::cpu_moments;
use lc_metrics::{ClassStats, LabelGroups, Partial};

use crate::error::{Context, Error, Result};

struct ClassMoments;

/// (h range, n, d, order range, starts range, classes) of contiguous inputs.
type Dims = (
    (usize, usize),
    usize,
    usize,
    (usize, usize),
    (usize, usize),
    usize,
);

fn dims(h: &Layout, order: &Layout, starts: &Layout) -> candle_core::Result<Dims> {
    let contiguous = |l: &Layout, what: &str| {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("class moments need contiguous {what}")))
    };
    let (n, d) = h.shape().dims2()?;
    let u1 = starts.shape().dims1()?;
    if order.shape().elem_count() != n || u1 == 0 {
        candle_core::bail!(
            "class moments: {} row ids and {u1} class starts for {n} rows",
            order.shape().elem_count()
        );
    }
    Ok((
        contiguous(h, "embeddings")?,
        n,
        d,
        contiguous(order, "row ids")?,
        contiguous(starts, "class starts")?,
        u1 - 1,
    ))
}

/// The class runs must tile 0..n in order, and row ids lie in 0..n (the
/// kernels index with them unchecked).
fn check_groups(order: &[u32], starts: &[u32], n: usize) -> candle_core::Result<()> {
    let ordered = starts.windows(2).all(|w| w[0] < w[1]);
    if starts.first() != Some(&0) || starts.last().map(|&e| e as usize) != Some(n) || !ordered {
        candle_core::bail!("class moments: class starts must rise strictly from 0 to {n}");
    }
    if order.len() != n || order.iter().any(|&r| r as usize >= n) {
        candle_core::bail!(
            "class moments: {} row ids for {n} rows, or one past them",
            order.len()
        );
    }
    Ok(())
}

impl CustomOp3 for ClassMoments {
    fn name(&self) -> &'static str {
        "class-moments"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        hl: &Layout,
        order: &CpuStorage,
        ol: &Layout,
        starts: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((h0, h1), _, d, (o0, o1), (s0, s1), u) = dims(hl, ol, sl)?;
        let (CpuStorage::U32(order), CpuStorage::U32(starts)) = (order, starts) else {
            candle_core::bail!("class moments: row ids and class starts must be u32");
        };
        let (order, starts) = (&order[o0..o1], &starts[s0..s1]);
        let out = match h {
            CpuStorage::F32(v) => cpu_moments(&v[h0..h1], |x| x as f64, order, starts, d),
            CpuStorage::F64(v) => cpu_moments(&v[h0..h1], |x| x, order, starts, d),
            CpuStorage::BF16(v) => cpu_moments(&v[h0..h1], |x| x.to_f64(), order, starts, d),
            other => candle_core::bail!("class moments: unsupported dtype {:?}", other.dtype()),
        };
        Ok((CpuStorage::F64(out), Shape::from((u, d + 1))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        h: &candle_core::CudaStorage,
        hl: &Layout,
        order: &candle_core::CudaStorage,
        ol: &Layout,
        starts: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(h, hl, order, ol, starts, sl)
    }
}

/// Per-class mean and M2 of the rows of `h` [n, d] (f32, bf16 or f64), the
/// rows of class s being `order[starts[s]..starts[s + 1]]`: [u, d + 1] f64
/// on h's device. `starts` must rise strictly from 0 to n.
pub fn class_moments(h: &Tensor, order: &[u32], starts: &[u32]) -> candle_core::Result<Tensor> {
    ClassRuns::new(order, starts, h.device())?.moments(h)
}

/// A batch's class runs, checked and on the device once, for the moments of
/// several layers' rows (`collect layers=...` reduces every layer of a
/// batch with the same runs).
pub struct ClassRuns {
    order: Tensor,
    starts: Tensor,
}

impl ClassRuns {
    /// `starts` must rise strictly from 0 to `order.len()`, and the row ids
    /// in `order` lie below it.
    pub fn new(order: &[u32], starts: &[u32], dev: &candle_core::Device) -> candle_core::Result<Self> {
        check_groups(order, starts, order.len())?;
        Ok(ClassRuns {
            order: Tensor::from_slice(order, order.len(), dev)?,
            starts: Tensor::from_slice(starts, starts.len(), dev)?,
        })
    }

    /// Per-class mean and M2 of the rows of `h` [n, d] (n the runs' row
    /// count): [u, d + 1] f64 on h's device.
    pub fn moments(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        h.contiguous()?
            .apply_op3_no_bwd(&self.order, &self.starts, &ClassMoments)
    }
}

/// Reduce one batch of samples `h` [N, d] with labels to per-class partials,
/// on the device holding `h` (f64 arithmetic).
pub fn batch_partial(h: &Tensor, labels: &[u32]) -> Result<Partial> {
    let (n, d) = h.dims2().ctx("batch embeddings")?;
    if n != labels.len() {
        return Err(Error::invalid(format!(
            "{n} embeddings for {} labels",
            labels.len()
        )));
    }
    let LabelGroups {
        classes,
        count,
        order,
        starts,
    } = LabelGroups::new(labels);
    let run = || -> candle_core::Result<(Vec<f64>, Vec<f64>)> {
        // Split on the device: the host receives each part in place.
        let both = class_moments(h, &order, &starts)?;
        let mean = both.narrow(1, 0, d)?.flatten_all()?.to_vec1::<f64>()?;
        let m2 = both.narrow(1, d, 1)?.flatten_all()?.to_vec1::<f64>()?;
        Ok((mean, m2))
    };
    let (mean, m2) = run().ctx("per-class reduction")?;
    Ok(Partial {
        classes,
        count,
        mean,
        m2,
    })
}

/// Squared distances of a batch to fixed class means (second pass of the
/// two-pass mode), summed per class. `means` holds the rows of `stats`.
pub fn batch_m2_to(h: &Tensor, labels: &[u32], stats: &ClassStats, means: &Tensor) -> Result<Partial> {
    let (n, _) = h.dims2().ctx("batch embeddings")?;
    let mut rows = Vec::with_capacity(n);
    for &y in labels {
        rows.push(
            stats
                .row_of(y)
                .ok_or_else(|| Error::invalid(format!("class {y} was not seen in the first pass")))?
                as u32,
        );
    }
    let dev = h.device();
    let run = || -> candle_core::Result<Vec<f64>> {
        let idx = Tensor::from_vec(rows.clone(), n, dev)?;
        let h64 = h.to_dtype(DType::F64)?;
        let sq = (h64 - means.index_select(&idx, 0)?)?.sqr()?.sum(1)?;
        Tensor::zeros(stats.len(), DType::F64, dev)?
            .index_add(&idx, &sq, 0)?
            .to_vec1()
    };
    let per_row = run().ctx("second-pass distances")?;
    Ok(Partial {
        classes: stats.classes.clone(),
        count: vec![0; stats.len()],
        mean: Vec::new(),
        m2: per_row,
    })
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Shape};

    /// One block per class, its threads over the columns: per column the
    /// sum over the class's rows (in row order), the mean, the squared
    /// distances; then the block sums M2 (warp shuffles, one value per
    /// warp in shared memory).
    const SOURCE: &str = r#"
template <typename Load>
__device__ void moments(Load load, const unsigned int* order, const unsigned int* starts, double* out,
                        unsigned int d) {
    __shared__ double sh[32];
    unsigned int c = blockIdx.x, s = starts[c], e = starts[c + 1];
    double n = (double)(e - s);
    double* o = out + (unsigned long long)c * (d + 1);
    double m2 = 0.0;
    for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) {
        double sum = 0.0;
        for (unsigned int r = s; r < e; r++) sum += load((unsigned long long)order[r] * d + j);
        double mean = sum / n;
        double acc = 0.0;
        for (unsigned int r = s; r < e; r++) {
            double x = load((unsigned long long)order[r] * d + j) - mean;
            acc += x * x;
        }
        o[j] = mean;
        m2 += acc;
    }
    for (int k = 16; k > 0; k >>= 1) m2 += __shfl_xor_sync(0xffffffffu, m2, k);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = m2;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (unsigned int w = 0; w < (blockDim.x >> 5); w++) t += sh[w];
        o[d] = t;
    }
}
struct LoadF32 { const float* h; __device__ double operator()(unsigned long long k) const { return (double)h[k]; } };
struct LoadF64 { const double* h; __device__ double operator()(unsigned long long k) const { return h[k]; } };
struct LoadBf16 { const unsigned short* h; __device__ double operator()(unsigned long long k) const { return (double)from_bf16(h[k]); } };
extern "C" __global__ void class_moments_f32(const float* h, const unsigned int* order, const unsigned int* starts,
                                             double* out, unsigned int d) {
    moments(LoadF32{h}, order, starts, out, d);
}
extern "C" __global__ void class_moments_f64(const double* h, const unsigned int* order, const unsigned int* starts,
                                             double* out, unsigned int d) {
    moments(LoadF64{h}, order, starts, out, d);
}
extern "C" __global__ void class_moments_bf16(const unsigned short* h, const unsigned int* order,
                                              const unsigned int* starts, double* out, unsigned int d) {
    moments(LoadBf16{h}, order, starts, out, d);
}
"#;

    pub(super) fn forward(
        h: &CudaStorage,
        hl: &Layout,
        order: &CudaStorage,
        ol: &Layout,
        starts: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (hr, _, d, or, sr, u) = super::dims(hl, ol, sl)?;
        let too_big = |x: usize| candle_core::Error::Msg(format!("class moments: {x} exceeds u32"));
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(u).map_err(|_| too_big(u))?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let d32 = u32::try_from(d).map_err(|_| too_big(d))?;
        let out = match h.dtype() {
            DType::F32 => launch::<f32>(
                h,
                hr,
                order,
                or,
                starts,
                sr,
                "class_moments_f32",
                cfg,
                u * (d + 1),
                d32,
            )?,
            DType::F64 => launch::<f64>(
                h,
                hr,
                order,
                or,
                starts,
                sr,
                "class_moments_f64",
                cfg,
                u * (d + 1),
                d32,
            )?,
            DType::BF16 => launch::<half::bf16>(
                h,
                hr,
                order,
                or,
                starts,
                sr,
                "class_moments_bf16",
                cfg,
                u * (d + 1),
                d32,
            )?,
            other => candle_core::bail!("class moments: unsupported dtype {other:?}"),
        };
        Ok((out, Shape::from((u, d + 1))))
    }

    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr>(
        h: &CudaStorage,
        (h0, h1): (usize, usize),
        order: &CudaStorage,
        (o0, o1): (usize, usize),
        starts: &CudaStorage,
        (s0, s1): (usize, usize),
        name: &str,
        cfg: LaunchConfig,
        len: usize,
        d: u32,
    ) -> candle_core::Result<CudaStorage> {
        let dev = h.device.clone();
        let hs = h.as_cuda_slice::<T>()?.slice(h0..h1);
        let os = order.as_cuda_slice::<u32>()?.slice(o0..o1);
        let ss = starts.as_cuda_slice::<u32>()?.slice(s0..s1);
        // SAFETY: the kernel writes every element (d means and M2 per class).
        let out = unsafe { dev.alloc::<f64>(len)? };
        if cfg.grid_dim.0 > 0 {
            const MODULE: &str = "pipeline_class_moments";
            let func = dev.get_or_load_custom_func(name, MODULE, &crate::nvrtc::ptx(MODULE, SOURCE)?)?;
            let mut builder = func.builder();
            builder.arg(&hs);
            builder.arg(&os);
            builder.arg(&ss);
            builder.arg(&out);
            builder.arg(&d);
            // SAFETY: the arguments (h, order, starts, out, d) match the
            // kernel's signature; row ids and class starts were checked on
            // the host (`super::check_groups`).
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Against the definition in f64 over the same (dtype-rounded) values,
    /// for f32, bf16 and f64 rows: classes of one, two and many rows in
    /// scattered order. Tolerance 1e-12 relative (f64 summation order).
    #[test]
    fn class_moments_match_the_definition() {
        let (n, d) = (11, 3);
        let h = Tensor::randn(0f32, 3.0, (n, d), &Device::Cpu).unwrap();
        let order = [7u32, 2, 9, 0, 4, 10, 1, 3, 5, 6, 8];
        let starts = [0u32, 1, 3, 11];
        for dt in [DType::F32, DType::BF16, DType::F64] {
            let h = h.to_dtype(dt).unwrap();
            let rows = h.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
            let got = class_moments(&h, &order, &starts)
                .unwrap()
                .to_vec2::<f64>()
                .unwrap();
            for (c, w) in starts.windows(2).enumerate() {
                let members = &order[w[0] as usize..w[1] as usize];
                let k = members.len() as f64;
                let mean: Vec<f64> = (0..d)
                    .map(|j| members.iter().map(|&r| rows[r as usize][j]).sum::<f64>() / k)
                    .collect();
                let m2: f64 = members
                    .iter()
                    .map(|&r| {
                        (0..d)
                            .map(|j| (rows[r as usize][j] - mean[j]).powi(2))
                            .sum::<f64>()
                    })
                    .sum();
                for j in 0..d {
                    assert!(
                        (got[c][j] - mean[j]).abs() <= 1e-12 * mean[j].abs().max(1.0),
                        "{dt:?} class {c}"
                    );
                }
                assert!(
                    (got[c][d] - m2).abs() <= 1e-12 * m2.max(1.0),
                    "{dt:?} class {c}: {} vs {m2}",
                    got[c][d]
                );
            }
            assert_eq!(got[0][d], 0.0, "one sample has no spread");
        }
        let bad = |o: &[u32], s: &[u32]| class_moments(&h, o, s).unwrap_err().to_string();
        assert!(bad(&order, &[0, 3, 3, 11]).contains("rise strictly"));
        assert!(bad(&order, &[0, 3, 10]).contains("rise strictly"));
        let mut past = order;
        past[4] = 11;
        assert!(bad(&past, &starts).contains("row ids"));
    }
}
