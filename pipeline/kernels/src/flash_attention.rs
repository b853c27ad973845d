//! Causal attention of bf16 models on CUDA GPUs in one kernel
//! (`cuda/flash_attention.cu`, compiled by NVRTC for compute_80 and newer).
//!
//! [`crate::attention::blocked_attention`] builds attention from device
//! primitives: per block of queries a score product, the block softmax and
//! a product with V, with q and k cast to f32 first and the heads copied
//! contiguous around them. On an H100 those passes were about half of a
//! 12x1024 bf16 collection (the softmax 15 %, the casts 10 %, the head
//! copies 11 %, and the products' share). This kernel reads q, k and v where
//! they lie (heads as strided views of the projections, grouped queries
//! sharing their key/value head), keeps scores and the running softmax in
//! registers, and writes the output once as [B, T, H * D]: the layout the
//! output projection reads.
//!
//! The same source runs on the CPU in the tests through an emulator of the
//! CUDA execution model (`cuda/emulator.hpp`: threads as fibers in seeded
//! random order, barriers and warp collectives checked, the tensor-core
//! instruction computed from the PTX ISA's fragment layouts), against the
//! f64 brute force. On an H200 (`scripts/gpu-check.sh`) it agreed with the
//! CPU as block attention does and took 0.11-0.24x its time, so `collect`
//! takes it for bf16 on CUDA by default (`attention=auto`; see
//! the models crate's `AttentionKernel`).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

/// Queries per CUDA block (`FA_BQ` in the kernel): four warps of 16 rows.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const QUERY_BLOCK: usize = 64;

/// Head dimensions the kernel is instantiated for (multiples of the 16-wide
/// tensor-core steps; at most 128, so a warp's output rows stay in registers).
const HEAD_DIMS: [usize; 8] = [16, 32, 48, 64, 80, 96, 112, 128];

/// The kernel's arguments: `FlashArgs` of `cuda/flash_attention.cu`, field
/// for field (strides in elements; the head dimension's stride is 1).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct FlashArgs {
    /// Batch, head and token strides of q.
    q_stride: [i64; 3],
    k_stride: [i64; 3],
    v_stride: [i64; 3],
    t: u32,
    h: u32,
    hkv: u32,
    /// 0: causal; else query i sees keys i - window + 1 ..= i.
    window: u32,
    d: u32,
    /// The score scale times log2(e): the kernel's exponentials are exp2.
    scale_log2: f32,
}

// The kernel's struct: 9 strides of 8 bytes, 5 counts and a scale of 4.
const _: () = assert!(std::mem::size_of::<FlashArgs>() == 96);

/// One launch: its arguments, the batch size and where q, k and v start in
/// their storage (elements).
#[derive(Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct Launch {
    args: FlashArgs,
    batch: usize,
    starts: [usize; 3],
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl Launch {
    /// Grid: query blocks x heads x batch.
    fn grid(&self) -> (u32, u32, u32) {
        (
            (self.args.t as usize).div_ceil(QUERY_BLOCK) as u32,
            self.args.h,
            self.batch as u32,
        )
    }

    /// The launch for q [B, H, T, D] and k, v [B, Hkv, T, D] with these
    /// layouts, or why the kernel cannot take them: head dimension not one
    /// of [`HEAD_DIMS`], not contiguous within a head, or offsets and
    /// strides that break its vector loads (q is read 4 bytes at a time, so
    /// its offsets must be even; k and v 16 bytes at a time, so theirs must
    /// be multiples of 8 elements).
    pub(crate) fn new(
        q: &Layout,
        k: &Layout,
        v: &Layout,
        scale: f64,
        window: Option<usize>,
    ) -> Result<Launch, String> {
        let dims4 = |l: &Layout, what: &str| -> Result<(usize, usize, usize, usize), String> {
            l.shape()
                .dims4()
                .map_err(|_| format!("{what} is {:?}, not [B, H, T, D]", l.shape()))
        };
        let (b, h, t, d) = dims4(q, "q")?;
        let (bk, hkv, tk, dk) = dims4(k, "k")?;
        if (bk, tk, dk) != (b, t, d) || v.shape() != k.shape() || hkv == 0 || h % hkv != 0 {
            return Err(format!(
                "q {:?}, k {:?}, v {:?} do not fit [B, H, T, D] / [B, Hkv, T, D]",
                q.shape(),
                k.shape(),
                v.shape()
            ));
        }
        if !HEAD_DIMS.contains(&d) {
            return Err(format!("head dimension {d} is not one of {HEAD_DIMS:?}"));
        }
        if t == 0 || b == 0 {
            return Err("no tokens".into());
        }
        if window == Some(0) {
            return Err("a window of 0 keys".into());
        }
        let u32_of = |x: usize, what: &str| u32::try_from(x).map_err(|_| format!("{what} {x} exceeds u32"));
        if b > 65_535 || h > 65_535 {
            return Err(format!("a grid of {b} x {h} blocks exceeds CUDA's 65,535"));
        }
        let strides = |l: &Layout, align: usize, what: &str| -> Result<[i64; 3], String> {
            let s = l.stride();
            if s[3] != 1 {
                return Err(format!(
                    "{what}'s head dimension is not contiguous (stride {})",
                    s[3]
                ));
            }
            if !l.start_offset().is_multiple_of(align) || s[..3].iter().any(|x| !x.is_multiple_of(align)) {
                return Err(format!(
                    "{what}'s offset {} or strides {s:?} are not multiples of {align} elements",
                    l.start_offset()
                ));
            }
            let mut out = [0i64; 3];
            for (o, &x) in out.iter_mut().zip(&s[..3]) {
                *o = i64::try_from(x).map_err(|_| format!("{what}'s stride {x} exceeds i64"))?;
            }
            Ok(out)
        };
        Ok(Launch {
            args: FlashArgs {
                q_stride: strides(q, 2, "q")?,
                k_stride: strides(k, 8, "k")?,
                v_stride: strides(v, 8, "v")?,
                t: u32_of(t, "T")?,
                h: h as u32,
                hkv: hkv as u32,
                window: u32_of(window.unwrap_or(0), "window")?,
                d: d as u32,
                scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
            },
            batch: b,
            starts: [q.start_offset(), k.start_offset(), v.start_offset()],
        })
    }

    fn out_shape(&self) -> Shape {
        let a = &self.args;
        Shape::from((self.batch, a.t as usize, (a.h * a.d) as usize))
    }
}

/// The op; its launch comes from the layouts candle hands it.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct FlashAttention {
    scale: f64,
    window: Option<usize>,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("flash attention runs on CUDA devices only (the CPU has block attention)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let launch = Launch::new(l1, l2, l3, self.scale, self.window)
            .map_err(|e| candle_core::Error::Msg(format!("flash attention: {e}")))?;
        cuda::forward(&launch, s1, s2, s3)
    }
}

/// Causal attention of bf16 q [B, H, T, D] over k, v [B, Hkv, T, D] on a
/// CUDA device of compute capability 8.0 or newer, without gradients, as
/// [B, T, H * D]; scores scaled by `scale`, keys limited to the last
/// `window` positions when given. `None` when the kernel cannot take these
/// tensors (another device or dtype, see `Launch::new`): the caller
/// falls back to block attention.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> candle_core::Result<Option<Tensor>> {
    let bf16 = [q, k, v].iter().all(|x| x.dtype() == candle_core::DType::BF16);
    if !bf16 || !supported_device(q.device()) {
        return Ok(None);
    }
    // The op works its launch out again from the layouts candle hands it.
    match Launch::new(q.layout(), k.layout(), v.layout(), scale, window) {
        Ok(_) => q
            .apply_op3_no_bwd(k, v, &FlashAttention { scale, window })
            .map(Some),
        Err(why) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!("flash attention cannot take these heads ({why}); using block attention")
            });
            Ok(None)
        }
    }
}

/// A CUDA device with the bf16 tensor-core instruction the kernel uses
/// (compute capability 8.0: A100 and newer).
fn supported_device(device: &candle_core::Device) -> bool {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = device {
        return dev
            .cuda_stream()
            .context()
            .compute_capability()
            .is_ok_and(|cc| cc >= (8, 0));
    }
    let _ = device;
    false
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{FlashArgs, Launch};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, Shape};
    use half::bf16;

    const SOURCE: &str = include_str!("../../cuda/flash_attention.cu");
    const MODULE: &str = "pipeline_flash_attention";
    /// Threads per CUDA block: `FA_WARPS` warps.
    const THREADS: u32 = 128;

    // SAFETY: FlashArgs is repr(C), plain numbers, laid out as the kernel's
    // struct of the same name (the emulator tests pass it the same way).
    unsafe impl DeviceRepr for FlashArgs {}

    pub(super) fn forward(
        launch: &Launch,
        q: &CudaStorage,
        k: &CudaStorage,
        v: &CudaStorage,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = q.device.clone();
        let [qs, ks, vs] = launch.starts;
        let q = q.as_cuda_slice::<bf16>()?.slice(qs..);
        let k = k.as_cuda_slice::<bf16>()?.slice(ks..);
        let v = v.as_cuda_slice::<bf16>()?.slice(vs..);
        let shape = launch.out_shape();
        // SAFETY: the kernel writes every element (each query row of each head).
        let out = unsafe { dev.alloc::<bf16>(shape.elem_count())? };
        let ptx = crate::nvrtc::ptx_for(MODULE, SOURCE, Some("compute_80"))?;
        let func =
            dev.get_or_load_custom_func(&format!("flash_attention_bf16_d{}", launch.args.d), MODULE, &ptx)?;
        let cfg = LaunchConfig {
            grid_dim: launch.grid(),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        b.arg(&q);
        b.arg(&k);
        b.arg(&v);
        b.arg(&out);
        b.arg(&launch.args);
        // SAFETY: the arguments (q, k, v, out, FlashArgs) match the kernel's
        // signature; the kernel reads q, k and v only where their layouts
        // (which candle keeps inside their storages) place elements, with
        // the alignment Launch::new checked, and out holds B x T x H x D.
        unsafe { b.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    #[cfg(cuda_emulator)]
    use std::ffi::{c_char, c_int};

    #[cfg(cuda_emulator)]
    unsafe extern "C" {
        /// `cuda/flash_attention_emulated.cpp`: the kernel on the CPU emulator.
        fn pipeline_flash_attention_emulated(
            q: *const u16,
            k: *const u16,
            v: *const u16,
            out: *mut u16,
            args: *const FlashArgs,
            batch: u32,
            seed: u64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }

    /// The emulated kernel over q, k, v (pointers at their first elements)
    /// into out; what went wrong otherwise.
    #[cfg(cuda_emulator)]
    fn run_emulator(
        q: *const u16,
        k: *const u16,
        v: *const u16,
        out: &mut [u16],
        launch: &Launch,
        seed: u64,
    ) -> Result<(), String> {
        let mut err: crate::emulator::Message = [0; 256];
        // SAFETY: the caller's pointers cover the tensors' storages from
        // their layouts' offsets, and out has B x T x H x D elements.
        let rc = unsafe {
            pipeline_flash_attention_emulated(
                q,
                k,
                v,
                out.as_mut_ptr(),
                &launch.args,
                launch.batch as u32,
                seed,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        crate::emulator::outcome(rc, &err)
    }

    #[cfg(not(cuda_emulator))]
    fn run_emulator(
        _: *const u16,
        _: *const u16,
        _: *const u16,
        _: &mut [u16],
        _: &Launch,
        _: u64,
    ) -> Result<(), String> {
        Err(crate::emulator::NOT_BUILT.into())
    }

    /// u16s that end where an inaccessible page begins, so a read or write
    /// past the end faults (on a GPU it would be an illegal address), and
    /// that start on 16 bytes, as cudaMalloc's memory does.
    struct Guarded {
        map: *mut libc::c_void,
        map_len: usize,
        data: *mut u16,
        len: usize,
    }

    impl Guarded {
        fn new(bits: &[u16]) -> Guarded {
            let bytes = std::mem::size_of_val(bits);
            assert!(
                bytes.is_multiple_of(16),
                "{bytes} bytes would not start on 16 bytes"
            );
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
            let pages = bytes.div_ceil(page);
            let map_len = (pages + 1) * page;
            // SAFETY: a fresh private anonymous mapping; its last page is made
            // inaccessible and the data placed right before it.
            unsafe {
                let map = libc::mmap(
                    std::ptr::null_mut(),
                    map_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert!(map != libc::MAP_FAILED, "mmap failed");
                let guard = (map as *mut u8).add(pages * page);
                assert_eq!(
                    libc::mprotect(guard as *mut libc::c_void, page, libc::PROT_NONE),
                    0
                );
                let data = guard.sub(bytes) as *mut u16;
                std::ptr::copy_nonoverlapping(bits.as_ptr(), data, bits.len());
                Guarded {
                    map,
                    map_len,
                    data,
                    len: bits.len(),
                }
            }
        }

        /// A tensor's whole bf16 storage.
        fn of(x: &Tensor) -> Guarded {
            let (storage, _) = x.storage_and_layout();
            let candle_core::Storage::Cpu(CpuStorage::BF16(v)) = &*storage else {
                panic!("expected a bf16 CPU tensor");
            };
            Guarded::new(&v.iter().map(|h| h.to_bits()).collect::<Vec<_>>())
        }

        fn at(&self, start: usize) -> *const u16 {
            assert!(start < self.len);
            // SAFETY: inside the buffer (checked just above).
            unsafe { self.data.add(start) }
        }

        fn as_mut_slice(&mut self) -> &mut [u16] {
            // SAFETY: data holds len initialised u16s, borrowed mutably with self.
            unsafe { std::slice::from_raw_parts_mut(self.data, self.len) }
        }
    }

    impl Drop for Guarded {
        fn drop(&mut self) {
            // SAFETY: the mapping made in new, unmapped once.
            unsafe { libc::munmap(self.map, self.map_len) };
        }
    }

    /// Runs the emulated kernel on q, k, v as their layouts lie; [B, T, H * D].
    fn emulated(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, window: Option<usize>, seed: u64) -> Tensor {
        let launch = Launch::new(q.layout(), k.layout(), v.layout(), scale, window).unwrap();
        let (qb, kb, vb) = (Guarded::of(q), Guarded::of(k), Guarded::of(v));
        let shape = launch.out_shape();
        let mut out = Guarded::new(&vec![0xffffu16; shape.elem_count()]);
        let [qs, ks, vs] = launch.starts;
        if let Err(e) = run_emulator(qb.at(qs), kb.at(ks), vb.at(vs), out.as_mut_slice(), &launch, seed) {
            panic!("emulated kernel: {e}");
        }
        let out: Vec<half::bf16> = out
            .as_mut_slice()
            .iter()
            .map(|&b| half::bf16::from_bits(b))
            .collect();
        Tensor::from_vec(out, shape, &Device::Cpu).unwrap()
    }

    /// The kernel, run by the emulator, against the f64 brute force on the
    /// same bf16 inputs. Bound: the probabilities and the output are each
    /// rounded to bf16 once (relative 2^-9), and the probabilities sum to 1,
    /// so |error| <= 2^-8 max|v| (+ f32 sums, far below); observed 5-6e-3
    /// for |v| <= 2 against the bound 7.8e-3, while a missing barrier, a
    /// fragment out of place or a key lost at a tile edge gives 0.1-4.
    /// Every buffer ends at an inaccessible page, so a read or write past
    /// its end (an illegal address on a GPU) crashes the test. Cases:
    /// grouped queries, T not a multiple of the 64-query block,
    /// windows shorter and longer than T, windows of every offset between
    /// key tiles and a warp's rows (W mod 16 = 0..15), every head
    /// dimension, GPT-Neo's unscaled scores with a 256-key window over ten
    /// blocks, and q, k, v as views of one fused projection (GPT-2's
    /// c_attn: offsets and a 3 H D token stride).
    #[test]
    fn flash_attention_matches_brute_force_on_the_emulator() {
        use crate::mask::brute_force::{random, reference};
        // In a windowed layer a key tile starts (1 - W) mod 16 rows off a
        // warp's first row: the sweep of W = 1..=16 (and a few past the
        // 64-key tile) meets every such offset at the tile and warp edges.
        // (batch, heads, key/value heads, T, head dimension, scale, window)
        type Case = (usize, usize, usize, usize, usize, f64, Option<usize>);
        let sweep = (1..=16)
            .chain([31, 63, 65, 127])
            .map(|w| (1, 1, 1, 150, 16, 0.3, Some(w)));
        let cases: Vec<Case> = [
            (2, 4, 4, 150, 64, 0.125, None),
            (1, 4, 2, 150, 32, 0.35, None),
            (2, 2, 1, 131, 16, 0.25, Some(40)),
            (1, 3, 3, 70, 48, 0.2, Some(500)),
            (1, 2, 2, 1, 64, 1.0, None),
            (1, 2, 2, 300, 128, 0.09, None),
            (1, 2, 2, 200, 64, 0.1, Some(18)),
            (1, 2, 1, 200, 32, 0.2, Some(2)),
            (1, 1, 1, 333, 80, 0.1, Some(50)),
            (1, 2, 2, 97, 96, 0.1, None),
            (1, 2, 2, 129, 112, 0.1, Some(64)),
            (1, 2, 2, 600, 64, 1.0, Some(256)),
        ]
        .into_iter()
        .chain(sweep)
        .collect();
        let dev = Device::Cpu;
        for (n, &(b, h, hkv, t, d, scale, window)) in cases.iter().enumerate() {
            // GPT-Neo's scores are unscaled: smaller inputs keep its softmax
            // from being one-hot, so dropped keys would show.
            let amp = if scale == 1.0 && t > 1 { 0.25 } else { 1.0 };
            let bf = |x: Vec<f64>| {
                x.into_iter()
                    .map(|v| half::bf16::from_f64(v * amp))
                    .collect::<Vec<_>>()
            };
            // q as the heads of a [B, T, H * D] projection (strided view).
            let q = Tensor::from_vec(bf(random(b * t * h * d, 5 * n as u64 + 1)), (b, t, h, d), &dev)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let k = Tensor::from_vec(
                bf(random(b * hkv * t * d, 5 * n as u64 + 2)),
                (b, hkv, t, d),
                &dev,
            )
            .unwrap();
            let v = Tensor::from_vec(
                bf(random(b * hkv * t * d, 5 * n as u64 + 3)),
                (b, hkv, t, d),
                &dev,
            )
            .unwrap();
            let check = |q: &Tensor, k: &Tensor, v: &Tensor, what: &str| {
                let f64s = |x: &Tensor| {
                    x.to_dtype(DType::F64)
                        .unwrap()
                        .contiguous()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap()
                };
                let dims = crate::mask::Dims { b, h, hkv, t, dh: d };
                let vs = f64s(v);
                // reference: [B, H, T, D]; the kernel writes [B, T, H * D].
                let want = Tensor::from_vec(
                    reference(&f64s(q), &f64s(k), &vs, dims, scale, window),
                    (b, h, t, d),
                    &dev,
                )
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, h * d))
                .unwrap();
                let got = emulated(q, k, v, scale, window, n as u64)
                    .to_dtype(DType::F64)
                    .unwrap();
                let diff = crate::attention::tests::max_abs_diff(&got, &want);
                let max_v = vs.iter().fold(0f64, |m, x| m.max(x.abs()));
                let bound = max_v / 256.0 * 1.001;
                assert!(
                    diff <= bound,
                    "case {n} ({what}: b {b} h {h}/{hkv} t {t} d {d} scale {scale} window {window:?}): max |diff| {diff:e} > {bound:e}"
                );
            };
            check(&q, &k, &v, "heads");
            if h == hkv {
                // One fused [B, T, 3 H D] projection, split by narrowing.
                let qkv = Tensor::cat(
                    &[
                        &q.transpose(1, 2).unwrap(),
                        &k.transpose(1, 2).unwrap(),
                        &v.transpose(1, 2).unwrap(),
                    ],
                    2,
                )
                .unwrap()
                .contiguous()
                .unwrap();
                let part = |i: usize| qkv.narrow(2, i * h, h).unwrap().transpose(1, 2).unwrap();
                let (qf, kf, vf) = (part(0), part(1), part(2));
                assert_eq!(kf.layout().start_offset(), h * d);
                check(&qf, &kf, &vf, "fused projection");
            }
        }
    }

    #[test]
    fn layouts_the_kernel_cannot_take_are_refused() {
        let dev = Device::Cpu;
        let z = |s: (usize, usize, usize, usize)| Tensor::zeros(s, DType::BF16, &dev).unwrap();
        let (q, k) = (z((1, 4, 8, 64)), z((1, 2, 8, 64)));
        assert!(Launch::new(q.layout(), k.layout(), k.layout(), 1.0, None).is_ok());
        let why =
            |q: &Tensor, k: &Tensor| Launch::new(q.layout(), k.layout(), k.layout(), 1.0, None).unwrap_err();
        assert!(why(&z((1, 4, 8, 72)), &z((1, 4, 8, 72))).contains("head dimension 72"));
        assert!(why(&q, &z((1, 3, 8, 64))).contains("do not fit"));
        // A head dimension that is not contiguous.
        let qt = z((1, 4, 64, 8)).transpose(2, 3).unwrap();
        assert!(why(&qt, &z((1, 4, 8, 64))).contains("not contiguous"));
        // k starting at element 2, rows 68 apart.
        let kk = z((1, 2, 8, 68)).narrow(3, 2, 64).unwrap();
        assert!(why(&q, &kk).contains("multiples of 8"));
        // CPU tensors never reach the kernel.
        assert!(attend(&q, &k, &k, 1.0, None).unwrap().is_none());
    }
}
