//! Per-class statistics ([`lc_metrics::ClassStats`]: count, mean and M2 in
//! f64, merged with Chan's formula) where they meet storage and devices:
//! `class_stats` record batches and parts of them, safetensors objects for
//! shard partials and checkpoints, and a batch's partial computed by one op
//! on the device that ran the model ([`lc_kernels::class_moments`]), so the data
//! never leaves the GPU until it is reduced to one row per class.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Float64Array, ListArray, UInt32Array, UInt64Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Float64Type, UInt32Type, UInt64Type};
use arrow::record_batch::RecordBatch;

use lc_lake::artifact::file_schema;
use lc_metrics::ClassStats;
use rayon::prelude::*;

use crate::error::{Context, Error, Result};

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
    batches: impl Iterator<Item = lc_lake::Result<RecordBatch>>,
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

/// Rows sorted by class id, as a `class_stats` batch.
pub fn to_batch(st: &ClassStats) -> Result<RecordBatch> {
    let mut order: Vec<usize> = (0..st.len()).collect();
    order.sort_by_key(|&r| st.classes[r]);
    let d = st.d;
    let mut means = Vec::with_capacity(st.mean.len());
    for &r in &order {
        means.extend_from_slice(st.mean_of(r));
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
            order.iter().map(|&r| st.classes[r]),
        )),
        Arc::new(UInt64Array::from_iter_values(order.iter().map(|&r| st.count[r]))),
        Arc::new(list),
        Arc::new(Float64Array::from_iter_values(order.iter().map(|&r| st.m2[r]))),
        Arc::new(Float64Array::from_iter_values(
            order.iter().map(|&r| st.m2[r] / st.count[r] as f64),
        )),
    ];
    RecordBatch::try_new(file_schema("class_stats")?, cols).ctx("building class_stats")
}

/// Read `class_stats` batches back.
pub fn from_batches(batches: &[RecordBatch]) -> Result<ClassStats> {
    let rows = batches.iter().map(|b| b.num_rows()).sum();
    from_parts(vec![(batches.iter().cloned().map(Ok), rows)])
}

/// As [`from_batches`], from a table read in parts: each is
/// a stream of consecutive rows with its row count, in table order. The
/// parts are decoded in parallel, straight into their place in the means
/// buffer, whose fresh pages are faulted in on every thread first: at
/// full scale the means are a quarter gigabyte, and decoding them and
/// zeroing their pages on one thread was most of `analyze`'s serial time.
pub fn from_parts<I>(mut parts: Vec<(I, usize)>) -> Result<ClassStats>
where
    I: Iterator<Item = lc_lake::Result<RecordBatch>> + Send,
{
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
    let (mut classes, mut count, mut m2) = (Vec::new(), Vec::new(), Vec::new());
    let mut part_start = 0;
    for (part, rows) in decoded.into_iter().zip(sizes) {
        let part = part?;
        // Rows with a zero count are skipped, so a part may fill less
        // than its share; later parts move down over the gap.
        let kept = part.classes.len();
        let to = classes.len() * d;
        if to != part_start * d {
            mean.copy_within(part_start * d..(part_start + kept) * d, to);
        }
        classes.extend(part.classes);
        count.extend(part.count);
        m2.extend(part.m2);
        part_start += rows;
    }
    mean.truncate(classes.len() * d);
    Ok(ClassStats::from_rows(d, classes, count, mean, m2)?)
}

/// Serialise (for shard partials and resumable checkpoints).
pub fn to_tensors(st: &ClassStats, prefix: &str) -> Vec<(String, Vec<u8>, safetensors::Dtype, Vec<usize>)> {
    let le32: Vec<u8> = st.classes.iter().flat_map(|x| x.to_le_bytes()).collect();
    let le64: Vec<u8> = st.count.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mean: Vec<u8> = st.mean.iter().flat_map(|x| x.to_le_bytes()).collect();
    let m2: Vec<u8> = st.m2.iter().flat_map(|x| x.to_le_bytes()).collect();
    let n = st.len();
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
            vec![n, st.d],
        ),
        (format!("{prefix}.m2"), m2, safetensors::Dtype::F64, vec![n]),
    ]
}

pub fn from_tensors(st: &safetensors::SafeTensors, prefix: &str, d: usize) -> Result<ClassStats> {
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
    ClassStats::from_rows(d, classes, count, mean, m2).map_err(|e| Error::invalid(format!("{prefix}: {e}")))
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use lc_kernels::class_moments::batch_partial;

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
        let b = to_batch(&st).unwrap();
        // Class 6 (the third row) counted zero times: skipped by both readers.
        let mut counts: Vec<u64> = b.column(1).as_primitive::<UInt64Type>().values().to_vec();
        counts[2] = 0;
        let mut cols = b.columns().to_vec();
        cols[1] = Arc::new(UInt64Array::from(counts));
        let b = RecordBatch::try_new(b.schema(), cols).unwrap();
        let whole = from_batches(std::slice::from_ref(&b)).unwrap();
        assert_eq!(whole.len(), c - 1);
        assert!(whole.row_of(6).is_none());
        let part = |r: std::ops::Range<usize>| (vec![Ok(b.slice(r.start, r.len()))].into_iter(), r.len());
        let parts = from_parts(vec![part(0..2), part(2..5), part(5..7)]).unwrap();
        assert_eq!(parts, whole);
        for class in [0u32, 3, 9, 18] {
            let (w, p) = (whole.row_of(class).unwrap(), parts.row_of(class).unwrap());
            assert_eq!(whole.mean_of(w), parts.mean_of(p));
            assert_eq!(st.mean_of(st.row_of(class).unwrap()), parts.mean_of(p));
        }
        let twice = from_parts(vec![part(0..4), part(3..7)]);
        assert!(twice.unwrap_err().to_string().contains("appears twice"));
    }

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    #[test]
    fn tensors_and_batches_round_trip() {
        let mut s = ClassStats::new(3);
        s.merge_one(9, 2, &[1.0, 2.0, 3.0], 0.5);
        s.merge_one(4, 1, &[0.0, -1.0, 1e-300], 0.0);
        let t = to_tensors(&s, "L0");
        let bytes = pack_safetensors(&t, HashMap::new()).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(from_tensors(&st, "L0", 3).unwrap(), s);
        let back = from_batches(&[to_batch(&s).unwrap()]).unwrap();
        assert_eq!(back.classes, vec![4, 9]);
        assert_eq!(back.mean_of(1), &[1.0, 2.0, 3.0]);
    }
}
