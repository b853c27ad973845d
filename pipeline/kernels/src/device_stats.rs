//! Running per-class statistics that stay on the model's device.
//!
//! `collect` on a GPU used to move every batch's class means to the host
//! and merge them there: on an H100, 12 % of a 12x1024 model's collection
//! (a third at 2x768) went to those transfers. Here each layer keeps one
//! table [rows, d + 1] f64 on the device, a row per class id (the mean, then
//! M2); a batch is reduced by `class_moments` and Chan-merged into the table
//! by one kernel (`cuda/class_stats_merge.cu`), so nothing crosses to the
//! host but the batch's labels. The host keeps the counts (it has the
//! labels), and the tables come back only for a checkpoint or the result.
//!
//! Invariants: counts are the same for every layer (every layer sees the
//! same labels); a row whose count is 0 is all zeros; the merge is the
//! host's `ClassStats::merge_one`, so means are bit for bit the host's and
//! M2 differs only in the order its sum runs (the kernel's reduction).
//! Batches merge in order on one stream, so a resumed collection ends with
//! the statistics of an uninterrupted one on the same device.

use candle_core::{CpuStorage, Device, InplaceOp3, Layout, Tensor};
use lc_metrics::{ClassStats, LabelGroups};

use crate::class_moments::ClassRuns;
use crate::error::{Context, Error, Result};

/// Per-class tables of several layers on one device.
pub struct DeviceStats {
    d: usize,
    rows: usize,
    /// Per layer, [rows, d + 1] f64: the running mean, then M2.
    tables: Vec<Tensor>,
    /// Samples per class id so far, the same for every layer.
    count: Vec<u64>,
}

impl DeviceStats {
    /// Bytes of device memory the tables take.
    pub fn bytes(rows: usize, d: usize, layers: usize) -> u64 {
        rows as u64 * (d as u64 + 1) * 8 * layers as u64
    }

    /// Tables for class ids 0..rows on `device`, starting from `stats` (one
    /// per layer; empty ones for a fresh collection).
    pub fn new(stats: &[ClassStats], rows: usize, device: &Device) -> Result<Self> {
        let d = stats
            .first()
            .map(|s| s.d)
            .ok_or_else(|| Error::invalid("device statistics need at least one layer"))?;
        let mut count = vec![0u64; rows];
        for (r, &c) in stats[0].classes.iter().enumerate() {
            let slot = count.get_mut(c as usize).ok_or_else(|| {
                Error::invalid(format!("class {c} lies outside the model's {rows} classes"))
            })?;
            *slot = stats[0].count[r];
        }
        let mut tables = Vec::with_capacity(stats.len());
        for (l, s) in stats.iter().enumerate() {
            let mut host = vec![0f64; rows * (d + 1)];
            for (r, &c) in s.classes.iter().enumerate() {
                if s.d != d || count.get(c as usize) != Some(&s.count[r]) || s.len() != stats[0].len() {
                    return Err(Error::invalid(format!(
                        "the statistics of layer position {l} do not match the first layer's (width or class counts)"
                    )));
                }
                let row = &mut host[c as usize * (d + 1)..(c as usize + 1) * (d + 1)];
                row[..d].copy_from_slice(s.mean_of(r));
                row[d] = s.m2[r];
            }
            tables.push(Tensor::from_vec(host, (rows, d + 1), device).ctx("class statistics table")?);
        }
        Ok(DeviceStats {
            d,
            rows,
            tables,
            count,
        })
    }

    /// Merge one batch: `hs` [n, d] per layer, with the samples' labels.
    pub fn add_batch(&mut self, hs: &[Tensor], labels: &[u32]) -> Result<()> {
        if hs.len() != self.tables.len() {
            return Err(Error::invalid(format!(
                "{} layers of embeddings for {} tables",
                hs.len(),
                self.tables.len()
            )));
        }
        if labels.is_empty() {
            return Ok(());
        }
        let g = LabelGroups::new(labels);
        let mut plan = Vec::with_capacity(3 * g.classes.len());
        for (&c, &nb) in g.classes.iter().zip(&g.count) {
            let na = *self.count.get(c as usize).ok_or_else(|| {
                Error::invalid(format!(
                    "label {c} lies outside the model's {} classes",
                    self.rows
                ))
            })?;
            // Exact: counts and class ids stay far below 2^53.
            plan.extend([c as f64, na as f64, nb as f64]);
        }
        // The CUDA kernel trusts the plan's rows: checked here, on the host.
        check_plan(&plan, self.rows).map_err(|e| Error::invalid(e.to_string()))?;
        let device = self.tables[0].device().clone();
        let plan = Tensor::from_vec(plan, (g.classes.len(), 3), &device).ctx("merge plan")?;
        let runs = ClassRuns::new(&g.order, &g.starts, &device).ctx("class runs")?;
        for (h, table) in hs.iter().zip(&self.tables) {
            let (n, d) = h.dims2().ctx("batch embeddings")?;
            if n != labels.len() || d != self.d {
                return Err(Error::invalid(format!(
                    "embeddings [{n}, {d}] for {} labels of width {}",
                    labels.len(),
                    self.d
                )));
            }
            let moments = runs.moments(h).ctx("per-class reduction")?;
            table
                .inplace_op3(&moments, &plan, &ClassMerge)
                .ctx("merging into the class statistics")?;
        }
        for (&c, &nb) in g.classes.iter().zip(&g.count) {
            self.count[c as usize] += nb;
        }
        Ok(())
    }

    /// The statistics so far, one per layer, classes in ascending id.
    pub fn to_class_stats(&self) -> Result<Vec<ClassStats>> {
        let seen: Vec<u32> = (0..self.rows as u32)
            .filter(|&c| self.count[c as usize] > 0)
            .collect();
        let d = self.d;
        let mut out = Vec::with_capacity(self.tables.len());
        for table in &self.tables {
            let mut s = ClassStats::new(d);
            if !seen.is_empty() {
                let idx = Tensor::from_slice(&seen, seen.len(), table.device()).ctx("seen classes")?;
                let rows = table
                    .index_select(&idx, 0)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f64>())
                    .ctx("reading the class statistics back")?;
                for (&c, row) in seen.iter().zip(rows.chunks_exact(d + 1)) {
                    s.merge_one(c, self.count[c as usize], &row[..d], row[d]);
                }
            }
            out.push(s);
        }
        Ok(out)
    }
}

/// The in-place Chan merge of a batch's class moments [u, d + 1] into a
/// table [rows, d + 1] along a plan [u, 3] (row, n_a, n_b), all f64.
struct ClassMerge;

/// (table range, rows, d, batch range, plan range, u) of contiguous inputs.
type Dims = (
    (usize, usize),
    usize,
    usize,
    (usize, usize),
    (usize, usize),
    usize,
);

fn dims(table: &Layout, batch: &Layout, plan: &Layout) -> candle_core::Result<Dims> {
    let contiguous = |l: &Layout, what: &str| {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("class merge needs a contiguous {what}")))
    };
    let (rows, w) = table.shape().dims2()?;
    let (u, bw) = batch.shape().dims2()?;
    let (pu, three) = plan.shape().dims2()?;
    if w == 0 || bw != w || pu != u || three != 3 {
        candle_core::bail!(
            "class merge: table {:?}, batch {:?} and plan {:?} do not fit together",
            table.shape(),
            batch.shape(),
            plan.shape()
        );
    }
    Ok((
        contiguous(table, "table")?,
        rows,
        w - 1,
        contiguous(batch, "batch")?,
        contiguous(plan, "plan")?,
        u,
    ))
}

/// Each plan row names a distinct table row within bounds, and counts are
/// whole numbers (the kernel indexes with them unchecked).
fn check_plan(plan: &[f64], rows: usize) -> candle_core::Result<()> {
    let mut seen = vec![false; rows];
    for p in plan.chunks_exact(3) {
        let whole = |x: f64| x >= 0.0 && x.fract() == 0.0;
        let r = p[0] as usize;
        if !(whole(p[0]) && whole(p[1]) && whole(p[2])) || r >= rows || std::mem::replace(&mut seen[r], true)
        {
            candle_core::bail!(
                "class merge: plan row {p:?} is not a distinct row of {rows} with whole counts"
            );
        }
    }
    Ok(())
}

/// The host's arithmetic (`ClassStats::merge_one`) on one table row.
fn merge_row(a: &mut [f64], b: &[f64], na: f64, nb: f64) {
    let d = a.len() - 1;
    if nb == 0.0 {
        return;
    }
    if na == 0.0 {
        a.copy_from_slice(b);
        return;
    }
    let n = na + nb;
    let w = nb / n;
    let mut dd = 0.0;
    for (x, &y) in a[..d].iter_mut().zip(&b[..d]) {
        let delta = y - *x;
        dd += delta * delta;
        *x += delta * w;
    }
    a[d] += b[d] + dd * na * nb / n;
}

impl InplaceOp3 for ClassMerge {
    fn name(&self) -> &'static str {
        "class-merge"
    }

    fn cpu_fwd(
        &self,
        table: &mut CpuStorage,
        tl: &Layout,
        batch: &CpuStorage,
        bl: &Layout,
        plan: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<()> {
        let ((t0, t1), rows, d, (b0, b1), (p0, p1), _) = dims(tl, bl, pl)?;
        let (CpuStorage::F64(table), CpuStorage::F64(batch), CpuStorage::F64(plan)) = (table, batch, plan)
        else {
            candle_core::bail!("class merge: table, batch and plan must be f64");
        };
        let (table, batch, plan) = (&mut table[t0..t1], &batch[b0..b1], &plan[p0..p1]);
        check_plan(plan, rows)?;
        for (p, b) in plan.chunks_exact(3).zip(batch.chunks_exact(d + 1)) {
            let r = p[0] as usize;
            merge_row(&mut table[r * (d + 1)..(r + 1) * (d + 1)], b, p[1], p[2]);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        table: &mut candle_core::CudaStorage,
        tl: &Layout,
        batch: &candle_core::CudaStorage,
        bl: &Layout,
        plan: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> candle_core::Result<()> {
        cuda::merge(table, tl, batch, bl, plan, pl)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::WrapErr;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, Layout};

    const SOURCE: &str = include_str!("../cuda/class_stats_merge.cu");
    /// The kernel's block size (`CSM_THREADS` in its source).
    const THREADS: u32 = 256;

    pub(super) fn merge(
        table: &mut CudaStorage,
        tl: &Layout,
        batch: &CudaStorage,
        bl: &Layout,
        plan: &CudaStorage,
        pl: &Layout,
    ) -> candle_core::Result<()> {
        let ((t0, t1), _, d, (b0, b1), (p0, p1), u) = super::dims(tl, bl, pl)?;
        if u == 0 {
            return Ok(());
        }
        let dev = table.device.clone();
        let too_big = |x: usize| candle_core::Error::Msg(format!("class merge: {x} exceeds u32"));
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(u).map_err(|_| too_big(u))?, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let d32 = u32::try_from(d).map_err(|_| too_big(d))?;
        const MODULE: &str = "pipeline_class_stats_merge";
        let func =
            dev.get_or_load_custom_func("class_stats_merge", MODULE, &crate::nvrtc::ptx(MODULE, SOURCE)?)?;
        let bs = batch.as_cuda_slice::<f64>()?.slice(b0..b1);
        let ps = plan.as_cuda_slice::<f64>()?.slice(p0..p1);
        let mut ts = table.as_cuda_slice_mut::<f64>()?.slice_mut(t0..t1);
        let mut builder = func.builder();
        builder.arg(&mut ts);
        builder.arg(&bs);
        builder.arg(&ps);
        builder.arg(&d32);
        // SAFETY: the arguments (table, batch, plan, d) match the kernel's
        // signature and `dims` checked their shapes. The plan's rows are
        // distinct and inside the table: `ClassMerge` is private and its one
        // user, `DeviceStats::add_batch`, runs `check_plan` on the host copy
        // before uploading it (reading it back here would stall the stream).
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::class_moments::batch_partial;
    use crate::class_moments::class_moments;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Batches of labelled rows: a few frequent classes, many rare ones.
    fn batches(d: usize, classes: u32, seed: u64) -> Vec<(Tensor, Vec<u32>)> {
        let mut s = seed;
        (0..5)
            .map(|k| {
                let n = 40 + 7 * k;
                let vals: Vec<f64> = (0..n * d).map(|_| 4.0 * lcg(&mut s) - 1.0).collect();
                let labels = (0..n)
                    .map(|_| {
                        let x = lcg(&mut s);
                        (x * x * classes as f64) as u32
                    })
                    .collect();
                (Tensor::from_vec(vals, (n, d), &Device::Cpu).unwrap(), labels)
            })
            .collect()
    }

    /// Host merges (`ClassStats::merge_partial`) of the same batches.
    fn host_stats(batches: &[(Tensor, Vec<u32>)], d: usize, scales: &[f64]) -> Vec<ClassStats> {
        scales
            .iter()
            .map(|&k| {
                let mut s = ClassStats::new(d);
                for (h, labels) in batches {
                    s.merge_partial(&batch_partial(&(h * k).unwrap(), labels).unwrap());
                }
                s
            })
            .collect()
    }

    /// `a` and `b` hold the same classes and counts, means equal bit for bit
    /// and M2 within `m2_tol` relative.
    fn assert_same(a: &ClassStats, b: &ClassStats, m2_tol: f64) {
        assert_eq!(a.len(), b.len());
        for (r, &c) in a.classes.iter().enumerate() {
            let q = b.row_of(c).expect("class in both");
            assert_eq!(a.count[r], b.count[q], "class {c}");
            assert_eq!(a.mean_of(r), b.mean_of(q), "class {c}");
            let (x, y) = (a.m2[r], b.m2[q]);
            assert!(
                (x - y).abs() <= m2_tol * x.abs().max(1.0),
                "class {c}: M2 {x} vs {y}"
            );
        }
    }

    /// Table merges on the CPU equal the host's merges: means bit for bit,
    /// M2 too (the CPU op sums |delta|^2 in the host's order), for two layers.
    /// A checkpoint round trip (tables -> ClassStats -> tables) continues to
    /// the same numbers.
    #[test]
    fn table_merges_equal_host_merges() {
        let (d, classes) = (5, 30);
        let data = batches(d, classes, 11);
        let want = host_stats(&data, d, &[1.0, 3.0]);
        let empty = [ClassStats::new(d), ClassStats::new(d)];
        let mut dev = DeviceStats::new(&empty, classes as usize, &Device::Cpu).unwrap();
        for (i, (h, labels)) in data.iter().enumerate() {
            dev.add_batch(&[h.clone(), (h * 3.0).unwrap()], labels).unwrap();
            if i == 2 {
                // Resume from what a checkpoint would hold.
                let saved = dev.to_class_stats().unwrap();
                dev = DeviceStats::new(&saved, classes as usize, &Device::Cpu).unwrap();
            }
        }
        let got = dev.to_class_stats().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_same(g, w, 0.0);
        }
        // Ascending class ids, and the table's unseen rows stay out.
        assert!(got[0].classes.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            got[0].samples(),
            data.iter().map(|(_, l)| l.len() as u64).sum::<u64>()
        );

        let bad = dev.add_batch(
            &[data[0].0.clone(), data[0].0.clone()],
            &[0, (classes + 2)].repeat(20),
        );
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("outside the model's 30 classes")
        );
        let mut other = want.clone();
        other[1].merge_one(0, 1, &[0.0; 5], 0.0);
        let e = DeviceStats::new(&other, classes as usize, &Device::Cpu)
            .err()
            .unwrap();
        assert!(e.to_string().contains("do not match"), "{e}");
    }

    #[cfg(cuda_emulator)]
    unsafe extern "C" {
        /// `cuda/class_stats_merge_emulated.cpp`: the kernel on the emulator.
        fn pipeline_class_stats_merge_emulated(
            table: *mut f64,
            batch: *const f64,
            plan: *const f64,
            u: u32,
            d: u32,
            seed: u64,
            err: *mut std::ffi::c_char,
            err_len: usize,
        ) -> std::ffi::c_int;
    }

    /// The kernel merges `batch` into `table` along `plan` on the emulator.
    #[cfg(cuda_emulator)]
    fn emulated_merge(
        table: &mut [f64],
        batch: &[f64],
        plan: &[f64],
        d: usize,
        seed: u64,
    ) -> Result<(), String> {
        let u = plan.len() / 3;
        assert_eq!(batch.len(), u * (d + 1));
        let mut err: crate::emulator::Message = [0; 256];
        check_plan(plan, table.len() / (d + 1)).map_err(|e| e.to_string())?;
        // SAFETY: batch and plan hold u rows; check_plan kept every plan
        // row inside table, which has (d + 1) columns.
        let rc = unsafe {
            pipeline_class_stats_merge_emulated(
                table.as_mut_ptr(),
                batch.as_ptr(),
                plan.as_ptr(),
                u as u32,
                d as u32,
                seed,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        crate::emulator::outcome(rc, &err)
    }

    #[cfg(not(cuda_emulator))]
    fn emulated_merge(_: &mut [f64], _: &[f64], _: &[f64], _: usize, _: u64) -> Result<(), String> {
        Err(crate::emulator::NOT_BUILT.into())
    }

    /// The CUDA kernel, run on the emulator, against the host's merges of
    /// the same batches: means bit for bit (no fused multiply-adds), M2
    /// within 1e-13 relative (its |delta|^2 is summed in another order).
    /// Widths below, at and above the block's 256 threads, so some threads
    /// own several columns and some none.
    #[test]
    fn the_merge_kernel_matches_host_merges_on_the_emulator() {
        for (d, classes, seed) in [(3, 12, 1u64), (256, 40, 2), (300, 25, 3)] {
            let data = batches(d, classes, seed);
            let want = &host_stats(&data, d, &[1.0])[0];
            let rows = classes as usize;
            let mut table = vec![0f64; rows * (d + 1)];
            let mut count = vec![0u64; rows];
            for (i, (h, labels)) in data.iter().enumerate() {
                let g = LabelGroups::new(labels);
                let moments = class_moments(h, &g.order, &g.starts)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                let plan: Vec<f64> = g
                    .classes
                    .iter()
                    .zip(&g.count)
                    .flat_map(|(&c, &nb)| [c as f64, count[c as usize] as f64, nb as f64])
                    .collect();
                emulated_merge(&mut table, &moments, &plan, d, seed * 10 + i as u64).unwrap();
                for (&c, &nb) in g.classes.iter().zip(&g.count) {
                    count[c as usize] += nb;
                }
            }
            let mut got = ClassStats::new(d);
            for (c, row) in table.chunks_exact(d + 1).enumerate() {
                if count[c] > 0 {
                    got.merge_one(c as u32, count[c], &row[..d], row[d]);
                } else {
                    assert!(row.iter().all(|&x| x == 0.0), "unseen class {c} was written");
                }
            }
            assert_same(&got, want, 1e-13);
        }
        // A plan row outside the table is refused before the kernel runs.
        let mut t = vec![0f64; 2 * 4];
        let e = emulated_merge(&mut t, &[0.0; 4], &[2.0, 0.0, 1.0], 3, 0).unwrap_err();
        assert!(e.contains("not a distinct row"), "{e}");
    }
}
