//! Per-class embedding statistics: count, mean and M2 = sum ||h - mu||^2, in
//! f64, mergeable.
//!
//! Partial statistics (a batch, a shard, a checkpoint) combine with Chan's
//! formula, which is exact in real arithmetic and associative, so one pass
//! over the data in any order, split across any number of workers, gives the
//! statistics of the whole:
//!
//! ```text
//! n = n_a + n_b,  delta = mu_b - mu_a
//! mu = mu_a + delta * n_b / n
//! M2 = M2_a + M2_b + ||delta||^2 * n_a * n_b / n
//! ```
//!
//! A batch's own partial is computed with two passes over each class's rows
//! (mean, then squared distances to it) by one op on the device that ran
//! the model ([`crate::class_moments`]), so the data never leaves the GPU
//! until it is reduced to one row per class.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Float64Array, ListArray, UInt32Array, UInt64Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Float64Type, UInt32Type, UInt64Type};
use arrow::record_batch::RecordBatch;
use candle_core::{DType, Tensor};

use crate::artifact::file_schema;
use crate::class_moments::{class_moments, one_class_moments};
use crate::error::{Context, Error, Result};

/// Statistics of the classes seen so far, rows in first-seen order.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassStats {
    pub d: usize,
    /// class id -> row.
    index: HashMap<u32, usize>,
    pub classes: Vec<u32>,
    pub count: Vec<u64>,
    /// rows x d, row-major.
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

/// The classes, counts and M2 of one part of a `class_stats` table; its
/// means are written in place.
struct DecodedPart {
    classes: Vec<u32>,
    count: Vec<u64>,
    m2: Vec<f64>,
}

/// Decode consecutive `class_stats` rows, their means into `means` (room for
/// exactly the rows the part declared), skipping classes counted zero times.
fn decode_part(
    batches: impl Iterator<Item = Result<RecordBatch>>,
    d: usize,
    means: &mut [f64],
) -> Result<DecodedPart> {
    let room = means.len() / d.max(1);
    let mut out = DecodedPart {
        classes: Vec::with_capacity(room),
        count: Vec::with_capacity(room),
        m2: Vec::with_capacity(room),
    };
    for b in batches {
        let b = b?;
        let ids = b.column(0).as_primitive::<UInt32Type>();
        let counts = b.column(1).as_primitive::<UInt64Type>();
        let mean_col = b.column(2).as_list::<i32>();
        let m2 = b.column(3).as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            let mv = mean_col.value(i);
            let mv = mv.as_primitive::<Float64Type>();
            if mv.len() != d {
                return Err(Error::invalid(format!(
                    "class {} has a mean of length {}, not {d}",
                    ids.value(i),
                    mv.len()
                )));
            }
            if counts.value(i) == 0 {
                continue;
            }
            let r = out.classes.len();
            let dst = means
                .get_mut(r * d..(r + 1) * d)
                .ok_or_else(|| Error::invalid(format!("more rows than the {room} its row groups declare")))?;
            dst.copy_from_slice(mv.values());
            out.classes.push(ids.value(i));
            out.count.push(counts.value(i));
            out.m2.push(m2.value(i));
        }
    }
    Ok(out)
}

/// One batch reduced to its classes.
#[derive(Debug, Clone)]
pub struct Partial {
    pub classes: Vec<u32>,
    pub count: Vec<u64>,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

/// Chan's merge of a batch's (nb, mean mb, M2 m2b) into running
/// (count, mean, M2); an empty running row takes the batch's as they are.
fn chan_merge(mean: &mut [f64], m2: &mut f64, count: &mut u64, nb: u64, mb: &[f64], m2b: f64) {
    let na = *count;
    if na == 0 {
        mean.copy_from_slice(mb);
        *m2 = m2b;
        *count = nb;
        return;
    }
    let n = na + nb;
    let (fa, fb) = (na as f64, nb as f64);
    let w = fb / n as f64;
    let mut dd = 0.0;
    for (a, &b) in mean.iter_mut().zip(mb) {
        let delta = b - *a;
        dd += delta * delta;
        *a += delta * w;
    }
    *m2 += m2b + dd * fa * fb / n as f64;
    *count = n;
}

/// Every chosen row of a host batch lies within it, and has a label.
fn check_host_rows<T>(h: &[T], d: usize, rows: &[u32], labels: &[u32]) -> Result<()> {
    if rows.len() != labels.len() || rows.iter().any(|&r| (r as usize + 1) * d > h.len()) {
        return Err(Error::invalid(format!(
            "{} rows for {} labels, or a row past the {} values given",
            rows.len(),
            labels.len(),
            h.len()
        )));
    }
    Ok(())
}

impl ClassStats {
    pub fn new(d: usize) -> Self {
        ClassStats {
            d,
            index: HashMap::new(),
            classes: Vec::new(),
            count: Vec::new(),
            mean: Vec::new(),
            m2: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.classes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    pub fn samples(&self) -> u64 {
        self.count.iter().sum()
    }

    /// Rows of the analysed classes V' (min <= N_c, and N_c <= max unless
    /// max is 0), in ascending class id.
    pub fn analysed(&self, min: u64, max: u64) -> Vec<usize> {
        let mut rows: Vec<usize> = (0..self.len())
            .filter(|&r| self.count[r] >= min && (max == 0 || self.count[r] <= max))
            .collect();
        rows.sort_by_key(|&r| self.classes[r]);
        rows
    }

    pub fn row_of(&self, class: u32) -> Option<usize> {
        self.index.get(&class).copied()
    }

    pub fn mean_of(&self, row: usize) -> &[f64] {
        &self.mean[row * self.d..(row + 1) * self.d]
    }

    /// Chan-merge one class's partial (n_b, mu_b, M2_b).
    pub fn merge_one(&mut self, class: u32, nb: u64, mb: &[f64], m2b: f64) {
        if nb == 0 {
            return;
        }
        let d = self.d;
        match self.index.get(&class) {
            None => {
                self.index.insert(class, self.classes.len());
                self.classes.push(class);
                self.count.push(nb);
                self.mean.extend_from_slice(mb);
                self.m2.push(m2b);
            }
            Some(&r) => chan_merge(
                &mut self.mean[r * d..(r + 1) * d],
                &mut self.m2[r],
                &mut self.count[r],
                nb,
                mb,
                m2b,
            ),
        }
    }

    /// Merge one batch held in host memory: `h` holds rows of `d` values
    /// (row-major, read in place, converted by `to_f64`), and `labels[i]` is
    /// the class of row `rows[i]` (rows the caller skips are absent). The
    /// result equals collect's path (`batch_partial` + `merge_partial`) bit
    /// for bit, in one pass on all cores: each class of the batch is reduced
    /// (`one_class_moments`) and Chan-merged straight into its row, so no
    /// per-class partial of the batch is built, copied or merged on one
    /// thread.
    pub fn merge_host_batch<T: Copy + Sync>(
        &mut self,
        h: &[T],
        to_f64: impl Fn(T) -> f64 + Sync,
        rows: &[u32],
        labels: &[u32],
    ) -> Result<()> {
        use rayon::prelude::*;
        let d = self.d;
        check_host_rows(h, d, rows, labels)?;
        let groups = LabelGroups::new(labels);
        // Each statistics row's group in the batch; new classes get rows.
        let mut group_of = vec![u32::MAX; self.len() + groups.classes.len()];
        for (g, &c) in groups.classes.iter().enumerate() {
            let r = match self.index.get(&c) {
                Some(&r) => r,
                None => {
                    self.index.insert(c, self.classes.len());
                    self.classes.push(c);
                    self.count.push(0);
                    self.m2.push(0.0);
                    self.classes.len() - 1
                }
            };
            group_of[r] = g as u32;
        }
        group_of.truncate(self.len());
        // New rows' pages are first touched on every core.
        let new_values = self.len() * d - self.mean.len();
        self.mean.par_extend(rayon::iter::repeat_n(0.0, new_values));
        // The batch's row ids, class by class.
        let order: Vec<u32> = groups.order.iter().map(|&i| rows[i as usize]).collect();
        let starts = &groups.starts;
        self.mean
            .par_chunks_mut(d)
            .zip(self.m2.par_iter_mut())
            .zip(self.count.par_iter_mut())
            .zip(group_of.par_iter())
            .for_each_init(
                || vec![0f64; 2 * d],
                |buf, (((mean, m2), count), &g)| {
                    if g == u32::MAX {
                        return;
                    }
                    let members = &order[starts[g as usize] as usize..starts[g as usize + 1] as usize];
                    let (mb, acc) = buf.split_at_mut(d);
                    let m2b = one_class_moments(h, &to_f64, members, mb, acc);
                    chan_merge(mean, m2, count, members.len() as u64, mb, m2b);
                },
            );
        Ok(())
    }

    pub fn merge_partial(&mut self, p: &Partial) {
        for (i, &c) in p.classes.iter().enumerate() {
            self.merge_one(c, p.count[i], &p.mean[i * self.d..(i + 1) * self.d], p.m2[i]);
        }
    }

    /// Merge another accumulator into this one.
    pub fn merge(&mut self, other: &ClassStats) -> Result<()> {
        if other.d != self.d {
            return Err(Error::invalid(format!(
                "cannot merge statistics of width {} into {}",
                other.d, self.d
            )));
        }
        for (r, &c) in other.classes.iter().enumerate() {
            self.merge_one(c, other.count[r], other.mean_of(r), other.m2[r]);
        }
        Ok(())
    }

    /// Add squared distances to *fixed* means (second pass of two-pass mode).
    pub fn add_m2(&mut self, p: &Partial) {
        for (i, &c) in p.classes.iter().enumerate() {
            if let Some(&r) = self.index.get(&c) {
                self.m2[r] += p.m2[i];
            }
        }
    }

    /// Rows sorted by class id, as a `class_stats` batch.
    pub fn to_batch(&self) -> Result<RecordBatch> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_by_key(|&r| self.classes[r]);
        let d = self.d;
        let mut means = Vec::with_capacity(self.mean.len());
        for &r in &order {
            means.extend_from_slice(self.mean_of(r));
        }
        let list = ListArray::try_new(
            Arc::new(Field::new("item", DataType::Float64, true)),
            OffsetBuffer::<i32>::from_lengths(std::iter::repeat_n(d, order.len())),
            Arc::new(Float64Array::from(means)),
            None,
        )
        .ctx("building means")?;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(UInt32Array::from_iter_values(
                order.iter().map(|&r| self.classes[r]),
            )),
            Arc::new(UInt64Array::from_iter_values(
                order.iter().map(|&r| self.count[r]),
            )),
            Arc::new(list),
            Arc::new(Float64Array::from_iter_values(order.iter().map(|&r| self.m2[r]))),
            Arc::new(Float64Array::from_iter_values(
                order.iter().map(|&r| self.m2[r] / self.count[r] as f64),
            )),
        ];
        RecordBatch::try_new(file_schema("class_stats")?, cols).ctx("building class_stats")
    }

    /// Read `class_stats` batches back.
    pub fn from_batches(batches: &[RecordBatch]) -> Result<Self> {
        let rows = batches.iter().map(|b| b.num_rows()).sum();
        Self::from_parts(vec![(batches.iter().cloned().map(Ok), rows)])
    }

    /// As [`ClassStats::from_batches`], from a table read in parts: each is
    /// a stream of consecutive rows with its row count, in table order. The
    /// parts are decoded in parallel, straight into their place in the means
    /// buffer, whose fresh pages are faulted in on every thread first: at
    /// full scale the means are a quarter gigabyte, and decoding them and
    /// zeroing their pages on one thread was most of `analyze`'s serial time.
    pub fn from_parts<I>(mut parts: Vec<(I, usize)>) -> Result<Self>
    where
        I: Iterator<Item = Result<RecordBatch>> + Send,
    {
        use rayon::prelude::*;
        // The width, from the first row; batches looked at stay with their part.
        let mut firsts: Vec<Option<RecordBatch>> = vec![None; parts.len()];
        let mut d = None;
        'find: for (first, (it, _)) in firsts.iter_mut().zip(parts.iter_mut()) {
            for b in it.by_ref() {
                let b = b?;
                if b.num_rows() > 0 {
                    d = Some(b.column(2).as_list::<i32>().value_length(0) as usize);
                    *first = Some(b);
                    break 'find;
                }
            }
        }
        let d = d.ok_or_else(|| Error::invalid("no class statistics"))?;
        let sizes: Vec<usize> = parts.iter().map(|p| p.1).collect();
        let too_many = || Error::invalid(format!("{sizes:?} classes of width {d} do not fit in memory"));
        let total = sizes
            .iter()
            .try_fold(0usize, |t, &n| t.checked_add(n))
            .ok_or_else(too_many)?;
        let len = total.checked_mul(d).ok_or_else(too_many)?;
        let mut mean = Vec::new();
        mean.par_extend(rayon::iter::repeat_n(0.0, len));
        let mut slices = Vec::with_capacity(parts.len());
        let mut rest = &mut mean[..];
        for &rows in &sizes {
            let (part, tail) = rest.split_at_mut(rows * d);
            slices.push(part);
            rest = tail;
        }
        let decoded: Vec<Result<DecodedPart>> = parts
            .into_par_iter()
            .zip(firsts)
            .zip(slices)
            .map(|(((it, _), first), means)| decode_part(first.into_iter().map(Ok).chain(it), d, means))
            .collect();
        let mut st = ClassStats::new(d);
        let mut part_start = 0;
        for (part, rows) in decoded.into_iter().zip(sizes) {
            let part = part?;
            // Rows with a zero count are skipped, so a part may fill less
            // than its share; later parts move down over the gap.
            let kept = part.classes.len();
            let to = st.classes.len() * d;
            if to != part_start * d {
                mean.copy_within(part_start * d..(part_start + kept) * d, to);
            }
            for (i, &class) in part.classes.iter().enumerate() {
                if st.index.insert(class, st.classes.len()).is_some() {
                    return Err(Error::invalid(format!("class {class} appears twice")));
                }
                st.classes.push(class);
                st.count.push(part.count[i]);
                st.m2.push(part.m2[i]);
            }
            part_start += rows;
        }
        mean.truncate(st.classes.len() * d);
        st.mean = mean;
        Ok(st)
    }

    /// Serialise (for shard partials and resumable checkpoints).
    pub fn to_tensors(&self, prefix: &str) -> Vec<(String, Vec<u8>, safetensors::Dtype, Vec<usize>)> {
        let le32: Vec<u8> = self.classes.iter().flat_map(|x| x.to_le_bytes()).collect();
        let le64: Vec<u8> = self.count.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mean: Vec<u8> = self.mean.iter().flat_map(|x| x.to_le_bytes()).collect();
        let m2: Vec<u8> = self.m2.iter().flat_map(|x| x.to_le_bytes()).collect();
        let n = self.len();
        vec![
            (
                format!("{prefix}.classes"),
                le32,
                safetensors::Dtype::U32,
                vec![n],
            ),
            (format!("{prefix}.count"), le64, safetensors::Dtype::U64, vec![n]),
            (
                format!("{prefix}.mean"),
                mean,
                safetensors::Dtype::F64,
                vec![n, self.d],
            ),
            (format!("{prefix}.m2"), m2, safetensors::Dtype::F64, vec![n]),
        ]
    }

    pub fn from_tensors(st: &safetensors::SafeTensors, prefix: &str, d: usize) -> Result<Self> {
        let get = |name: &str, dt: safetensors::Dtype| -> Result<Vec<u8>> {
            let t = st
                .tensor(&format!("{prefix}.{name}"))
                .map_err(|e| Error::invalid(format!("{prefix}.{name}: {e}")))?;
            if t.dtype() != dt {
                return Err(Error::invalid(format!(
                    "{prefix}.{name} has dtype {:?}",
                    t.dtype()
                )));
            }
            Ok(t.data().to_vec())
        };
        let classes: Vec<u32> = get("classes", safetensors::Dtype::U32)?
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        let count: Vec<u64> = get("count", safetensors::Dtype::U64)?
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        let f64s = |name: &str| -> Result<Vec<f64>> {
            Ok(get(name, safetensors::Dtype::F64)?
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect())
        };
        let mean = f64s("mean")?;
        let m2 = f64s("m2")?;
        let n = classes.len();
        if count.len() != n || m2.len() != n || mean.len() != n * d {
            return Err(Error::invalid(format!("{prefix}: inconsistent tensor sizes")));
        }
        let index = classes.iter().enumerate().map(|(r, &c)| (c, r)).collect();
        Ok(ClassStats {
            d,
            index,
            classes,
            count,
            mean,
            m2,
        })
    }
}

/// Serialise named raw tensors with JSON metadata as one safetensors object.
/// The metadata also carries `blake3`, the hash of every tensor's bytes in
/// order, which [`check_safetensors_hash`] verifies on reading.
pub fn pack_safetensors(
    tensors: &[(String, Vec<u8>, safetensors::Dtype, Vec<usize>)],
    mut meta: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut h = blake3::Hasher::new();
    for (name, b, _, _) in tensors {
        h.update(name.as_bytes());
        h.update(b);
    }
    meta.insert("blake3".into(), h.finalize().to_hex().to_string());
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, b, dt, shape)| {
            let v = safetensors::tensor::TensorView::new(*dt, shape.clone(), b)
                .map_err(|e| Error::invalid(format!("{n}: {e}")))?;
            Ok((n.clone(), v))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, Some(meta)).map_err(|e| Error::invalid(format!("serialising: {e}")))
}

/// Check the `blake3` that [`pack_safetensors`] recorded against the tensors
/// of `st` named `names`, in that order. `Ok(false)` when none was recorded.
pub fn check_safetensors_hash(
    st: &safetensors::SafeTensors,
    names: &[String],
    meta: &HashMap<String, String>,
) -> Result<bool> {
    let Some(want) = meta.get("blake3") else {
        return Ok(false);
    };
    let mut h = blake3::Hasher::new();
    for n in names {
        let t = st.tensor(n).map_err(|e| Error::invalid(format!("{n}: {e}")))?;
        h.update(n.as_bytes());
        h.update(t.data());
    }
    let got = h.finalize().to_hex().to_string();
    if &got != want {
        return Err(Error::invalid(format!(
            "its tensors hash to BLAKE3 {} but it records {}",
            &got[..12],
            &want[..want.len().min(12)]
        )));
    }
    Ok(true)
}

/// A batch's labels grouped by class: class `classes[s]` (in order of first
/// appearance) has `count[s]` rows, `order[starts[s]..starts[s + 1]]`.
pub struct LabelGroups {
    pub classes: Vec<u32>,
    pub count: Vec<u64>,
    pub order: Vec<u32>,
    pub starts: Vec<u32>,
}

impl LabelGroups {
    pub fn new(labels: &[u32]) -> Self {
        let mut slot: HashMap<u32, u32> = HashMap::new();
        let mut classes = Vec::new();
        let mut count: Vec<u64> = Vec::new();
        let idx: Vec<u32> = labels
            .iter()
            .map(|&y| {
                let s = *slot.entry(y).or_insert_with(|| {
                    classes.push(y);
                    count.push(0);
                    (classes.len() - 1) as u32
                });
                count[s as usize] += 1;
                s
            })
            .collect();
        let u = classes.len();
        let mut starts = vec![0u32; u + 1];
        for (s, &c) in count.iter().enumerate() {
            starts[s + 1] = starts[s] + c as u32;
        }
        let mut fill = starts[..u].to_vec();
        let mut order = vec![0u32; labels.len()];
        for (row, &s) in idx.iter().enumerate() {
            order[fill[s as usize] as usize] = row as u32;
            fill[s as usize] += 1;
        }
        LabelGroups {
            classes,
            count,
            order,
            starts,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The rows `rows` of `h` (width `d`) as an f32 tensor, gathered.
    fn gathered(h: &[f32], d: usize, rows: &[u32]) -> Tensor {
        let kept: Vec<f32> = rows
            .iter()
            .flat_map(|&r| h[r as usize * d..(r as usize + 1) * d].to_vec())
            .collect();
        Tensor::from_vec(kept, (rows.len(), d), &Device::Cpu).unwrap()
    }

    #[test]
    fn host_batches_merge_as_the_tensor_path_bit_for_bit() {
        // Rows 0..6 of width 3; rows 2 and 5 are skipped by the caller.
        let h: Vec<f32> = (0..18).map(|i| (i * i % 7) as f32 - 2.5).collect();
        let (rows, labels) = ([0u32, 1, 3, 4], [4u32, 9, 4, 4]);
        let mut host = ClassStats::new(3);
        host.merge_host_batch(&h, |x| x as f64, &rows, &labels).unwrap();
        let tensor = batch_partial(&gathered(&h, 3, &rows), &labels).unwrap();
        assert_eq!(host.classes, tensor.classes);
        assert_eq!(host.count, tensor.count);
        assert_eq!(host.mean, tensor.mean);
        assert_eq!(host.m2, tensor.m2);
        // Class 4 by hand: rows 0, 3, 4.
        let mean0: f64 = [0, 3, 4].iter().map(|&r| h[r * 3] as f64).sum::<f64>() / 3.0;
        assert_eq!(host.mean[0], mean0);
        assert!(host.merge_host_batch(&h, |x| x as f64, &[6], &[1]).is_err());
    }

    #[test]
    fn fused_host_merges_equal_partials_merged_bit_for_bit() {
        // Zipf-like labels over batches of uneven size, into statistics that
        // already hold some classes: the fused pass and collect's path
        // (batch_partial + merge_partial) agree exactly, and both match the
        // brute force.
        let d = 5;
        let n = 700;
        let h: Vec<f32> = (0..n * d)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0)
            .collect();
        let labels: Vec<u32> = (0..n as u32).map(|i| (i * i) % 61 % (1 + i % 13)).collect();
        let (mut fused, mut split) = (ClassStats::new(d), ClassStats::new(d));
        let mut samples = Vec::new();
        let mut start = 0usize;
        for size in [1usize, 40, 3, 250, 6, 400] {
            let end = (start + size).min(n);
            // Every third row is skipped, as ignore_index rows are.
            let rows: Vec<u32> = (start as u32..end as u32).filter(|r| r % 3 != 1).collect();
            let ls: Vec<u32> = rows.iter().map(|&r| labels[r as usize]).collect();
            fused.merge_host_batch(&h, |x| x as f64, &rows, &ls).unwrap();
            split.merge_partial(&batch_partial(&gathered(&h, d, &rows), &ls).unwrap());
            for (&r, &c) in rows.iter().zip(&ls) {
                let x = h[r as usize * d..(r as usize + 1) * d]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                samples.push((c, x));
            }
            start = end;
        }
        assert_eq!(fused.classes, split.classes);
        assert_eq!(fused.count, split.count);
        assert_eq!(fused.mean, split.mean);
        assert_eq!(fused.m2, split.m2);
        for (c, (count, mu, m2)) in brute(&samples) {
            let r = fused.classes.iter().position(|&x| x == c).unwrap();
            assert_eq!(fused.count[r], count);
            for (a, b) in fused.mean_of(r).iter().zip(&mu) {
                assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "class {c}: {a} vs {b}");
            }
            assert!(
                (fused.m2[r] - m2).abs() <= 1e-10 * (1.0 + m2),
                "class {c}: {} vs {m2}",
                fused.m2[r]
            );
        }
        assert!(
            fused
                .merge_host_batch(&h, |x| x as f64, &[n as u32], &[0])
                .is_err()
        );
    }

    fn brute(samples: &[(u32, Vec<f64>)]) -> HashMap<u32, (u64, Vec<f64>, f64)> {
        let mut by: HashMap<u32, Vec<&Vec<f64>>> = HashMap::new();
        for (c, h) in samples {
            by.entry(*c).or_default().push(h);
        }
        by.into_iter()
            .map(|(c, hs)| {
                let d = hs[0].len();
                let n = hs.len() as f64;
                let mu: Vec<f64> = (0..d).map(|j| hs.iter().map(|h| h[j]).sum::<f64>() / n).collect();
                let m2: f64 = hs
                    .iter()
                    .map(|h| h.iter().zip(&mu).map(|(a, b)| (a - b).powi(2)).sum::<f64>())
                    .sum();
                (c, (hs.len() as u64, mu, m2))
            })
            .collect()
    }

    /// A table decoded in parts equals it decoded whole: classes in table
    /// order, means in place even where a part skips a class counted zero
    /// times; a class in two parts is refused.
    #[test]
    fn parts_decode_like_the_whole_table() {
        let (d, c) = (3, 7);
        let mut seed = 5u64;
        let mut st = ClassStats::new(d);
        for class in 0..c as u32 {
            let mean: Vec<f64> = (0..d).map(|_| lcg(&mut seed)).collect();
            st.merge_one(class * 3, 1 + class as u64, &mean, 0.5 + class as f64);
        }
        let b = st.to_batch().unwrap();
        // Class 6 (the third row) counted zero times: skipped by both readers.
        let mut counts: Vec<u64> = b.column(1).as_primitive::<UInt64Type>().values().to_vec();
        counts[2] = 0;
        let mut cols = b.columns().to_vec();
        cols[1] = Arc::new(UInt64Array::from(counts));
        let b = RecordBatch::try_new(b.schema(), cols).unwrap();
        let whole = ClassStats::from_batches(std::slice::from_ref(&b)).unwrap();
        assert_eq!(whole.len(), c - 1);
        assert!(whole.row_of(6).is_none());
        let part = |r: std::ops::Range<usize>| (vec![Ok(b.slice(r.start, r.len()))].into_iter(), r.len());
        let parts = ClassStats::from_parts(vec![part(0..2), part(2..5), part(5..7)]).unwrap();
        assert_eq!(parts, whole);
        for class in [0u32, 3, 9, 18] {
            let (w, p) = (whole.row_of(class).unwrap(), parts.row_of(class).unwrap());
            assert_eq!(whole.mean_of(w), parts.mean_of(p));
            assert_eq!(st.mean_of(st.row_of(class).unwrap()), parts.mean_of(p));
        }
        let twice = ClassStats::from_parts(vec![part(0..4), part(3..7)]);
        assert!(twice.unwrap_err().to_string().contains("appears twice"));
    }

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    /// Batches merged with Chan's formula equal the brute-force statistics
    /// of all samples (tolerance 1e-12 relative: a few f64 roundings).
    #[test]
    fn batched_chan_merge_equals_brute_force() {
        let d = 5;
        let mut seed = 7u64;
        let samples: Vec<(u32, Vec<f64>)> = (0..997)
            .map(|i| {
                (
                    (i * 31 % 13) as u32,
                    (0..d).map(|_| 10.0 + lcg(&mut seed)).collect(),
                )
            })
            .collect();
        let mut acc = ClassStats::new(d);
        for batch in samples.chunks(100) {
            let flat: Vec<f64> = batch.iter().flat_map(|s| s.1.clone()).collect();
            let h = Tensor::from_vec(flat, (batch.len(), d), &Device::Cpu).unwrap();
            let labels: Vec<u32> = batch.iter().map(|s| s.0).collect();
            acc.merge_partial(&batch_partial(&h, &labels).unwrap());
        }
        let want = brute(&samples);
        assert_eq!(acc.len(), want.len());
        for (c, (n, mu, m2)) in want {
            let r = acc.row_of(c).unwrap();
            assert_eq!(acc.count[r], n);
            for (a, b) in acc.mean_of(r).iter().zip(&mu) {
                assert!((a - b).abs() <= 1e-12 * b.abs(), "{a} {b}");
            }
            assert!((acc.m2[r] - m2).abs() <= 1e-12 * m2, "{} {m2}", acc.m2[r]);
        }
        // Merging in another grouping and order gives the same numbers.
        let mut halves = [ClassStats::new(d), ClassStats::new(d)];
        for (i, s) in samples.iter().enumerate().rev() {
            halves[i % 2].merge_one(s.0, 1, &s.1, 0.0);
        }
        let [mut a, b] = halves;
        a.merge(&b).unwrap();
        for (r, &c) in acc.classes.iter().enumerate() {
            let r2 = a.row_of(c).unwrap();
            assert_eq!(a.count[r2], acc.count[r]);
            assert!((a.m2[r2] - acc.m2[r]).abs() <= 1e-11 * acc.m2[r]);
        }
    }

    #[test]
    fn tensors_and_batches_round_trip() {
        let mut s = ClassStats::new(3);
        s.merge_one(9, 2, &[1.0, 2.0, 3.0], 0.5);
        s.merge_one(4, 1, &[0.0, -1.0, 1e-300], 0.0);
        let t = s.to_tensors("L0");
        let bytes = pack_safetensors(&t, HashMap::new()).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(ClassStats::from_tensors(&st, "L0", 3).unwrap(), s);
        let back = ClassStats::from_batches(&[s.to_batch().unwrap()]).unwrap();
        assert_eq!(back.classes, vec![4, 9]);
        assert_eq!(back.mean_of(1), &[1.0, 2.0, 3.0]);
    }
}
