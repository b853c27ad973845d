//! `ClassStats`: one-pass per-class statistics of hidden states handed over
//! from Python, with the engine's arithmetic (`pipeline::stats`): each batch
//! is reduced per class in f64 (mean, then squared distances to it) and
//! Chan-merged into the running counts, means and M2, as `collect` does.
//!
//! Host arrays are read in place through numpy's buffer (never copied
//! whole) with the GIL released, on all cores; bfloat16 arrives as its bits
//! (an int16 view of a torch tensor). Batches reduced elsewhere (a CUDA
//! device, see `linguistic_collapse._torch`) arrive as per-class moments and
//! take the same Chan merges. A rejected batch leaves the statistics
//! untouched: every check runs before anything is merged.
//!
//! The Python class `linguistic_collapse.ClassStats` subclasses this one and
//! chooses the path for each input (numpy, torch on the CPU, torch on a
//! device).

use numpy::{
    Element, PyArray1, PyArray2, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use lc_metrics::{ClassStats, Partial};
use pipeline::external::{StatsTarget, commit_class_stats_from};

use crate::{PyLake, manifest_to_py, to_py};

/// Running per-class count, mean and M2 (= sum of squared distances to the
/// mean) of `dim`-dimensional samples of classes `0..num_classes`, in f64.
#[pyclass(module = "linguistic_collapse._native", name = "ClassStats", subclass)]
pub struct PyClassStats {
    num_classes: usize,
    stats: ClassStats,
}

/// The samples of one batch: their row ids (after `ignore_index`) and labels.
struct Kept {
    rows: Vec<u32>,
    labels: Vec<u32>,
}

impl PyClassStats {
    /// Labels flattened to one per row, checked against the class range.
    fn labels(&self, labels: &Bound<'_, PyAny>, n: usize, ignore_index: i64) -> PyResult<Kept> {
        let arr = labels
            .cast::<numpy::PyUntypedArray>()
            .map_err(|_| PyTypeError::new_err("labels: expected a numpy array of integers"))?;
        let kind = arr.dtype().kind();
        if kind != b'i' && kind != b'u' {
            return Err(PyTypeError::new_err(format!(
                "labels: expected integers, got dtype {}",
                arr.dtype()
            )));
        }
        if arr.len() != n {
            return Err(PyValueError::new_err(format!(
                "labels: {} labels for {n} hidden states (shape {:?})",
                arr.len(),
                arr.shape()
            )));
        }
        // One int64 per row, contiguous (a small copy beside the hidden states).
        let flat = labels.call_method1("astype", ("int64",))?.call_method0("ravel")?;
        let flat = flat
            .cast::<numpy::PyArray1<i64>>()
            .map_err(|_| PyTypeError::new_err("labels: expected a numpy array of integers"))?
            .readonly();
        let values = flat
            .as_slice()
            .map_err(|_| PyValueError::new_err("labels: could not be read as one row of int64"))?;
        let mut kept = Kept {
            rows: Vec::with_capacity(n),
            labels: Vec::with_capacity(n),
        };
        for (i, &y) in values.iter().enumerate() {
            if y == ignore_index {
                continue;
            }
            if y < 0 || y as u64 >= self.num_classes as u64 {
                return Err(PyValueError::new_err(format!(
                    "labels: label {y} at position {i} is outside 0..{} (and not ignore_index={ignore_index})",
                    self.num_classes
                )));
            }
            kept.rows.push(i as u32);
            kept.labels.push(y as u32);
        }
        Ok(kept)
    }

    /// Reduce the batch from `hidden` in place and merge it (all cores,
    /// the GIL released); nothing is merged when a check fails.
    fn merge_host<T: Element + Copy + Sync>(
        &mut self,
        py: Python<'_>,
        hidden: &Bound<'_, PyArrayDyn<T>>,
        labels: &Bound<'_, PyAny>,
        ignore_index: i64,
        // A closure, not a fn pointer: each dtype's conversion is inlined
        // into the reduction's loops (a pointer call per value ran 7x slower).
        to_f64: impl Fn(T) -> f64 + Sync + Send,
    ) -> PyResult<()> {
        let view: PyReadonlyArrayDyn<T> = hidden.readonly();
        let shape = view.shape().to_vec();
        let d = self.stats.d;
        if !(2..=3).contains(&shape.len()) || shape[shape.len() - 1] != d {
            return Err(PyValueError::new_err(format!(
                "hidden: expected shape [N, {d}] or [B, T, {d}], got {shape:?}"
            )));
        }
        let n: usize = shape[..shape.len() - 1].iter().product();
        if n > u32::MAX as usize {
            return Err(PyValueError::new_err(format!(
                "hidden: {n} rows in one batch; split it below 2^32"
            )));
        }
        let kept = self.labels(labels, n, ignore_index)?;
        // (`as_slice` also accepts Fortran order, whose rows are not rows.)
        let c_order = view.is_c_contiguous();
        let values = view.as_slice().ok().filter(|_| c_order).ok_or_else(|| {
            PyValueError::new_err(
                "hidden: expected a C-contiguous array (numpy.ascontiguousarray copies a strided view)",
            )
        })?;
        let stats = &mut self.stats;
        py.detach(|| stats.merge_host_batch(values, to_f64, &kept.rows, &kept.labels))
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }
}

#[pymethods]
impl PyClassStats {
    #[new]
    fn new(num_classes: usize, dim: usize) -> PyResult<Self> {
        if num_classes == 0 || num_classes > u32::MAX as usize {
            return Err(PyValueError::new_err(format!(
                "num_classes: expected 1..2^32, got {num_classes}"
            )));
        }
        if dim == 0 {
            return Err(PyValueError::new_err("dim: expected a positive width"));
        }
        Ok(PyClassStats {
            num_classes,
            stats: ClassStats::new(dim),
        })
    }

    #[getter]
    fn num_classes(&self) -> usize {
        self.num_classes
    }

    #[getter]
    fn dim(&self) -> usize {
        self.stats.d
    }

    /// Samples accumulated so far.
    #[getter]
    fn samples(&self) -> u64 {
        self.stats.samples()
    }

    /// Accumulate one host batch: `hidden` a numpy array [N, d] or [B, T, d]
    /// (float16, float32 or float64, C-contiguous; with `bfloat16` the int16
    /// or uint16 bits of bfloat16 values), `labels` [N] or [B, T] integers;
    /// labels equal to `ignore_index` are skipped.
    #[pyo3(signature = (hidden, labels, ignore_index=-100, bfloat16=false))]
    fn _update_host(
        &mut self,
        py: Python<'_>,
        hidden: &Bound<'_, PyAny>,
        labels: &Bound<'_, PyAny>,
        ignore_index: i64,
        bfloat16: bool,
    ) -> PyResult<()> {
        if bfloat16 {
            if let Ok(a) = hidden.cast::<PyArrayDyn<i16>>() {
                self.merge_host(py, a, labels, ignore_index, |x| {
                    half::bf16::from_bits(x as u16).to_f64()
                })?
            } else if let Ok(a) = hidden.cast::<PyArrayDyn<u16>>() {
                self.merge_host(py, a, labels, ignore_index, |x| half::bf16::from_bits(x).to_f64())?
            } else {
                return Err(PyTypeError::new_err(
                    "hidden: bfloat16 values are expected as an int16 or uint16 array of their bits",
                ));
            }
        } else if let Ok(a) = hidden.cast::<PyArrayDyn<f32>>() {
            self.merge_host(py, a, labels, ignore_index, |x| x as f64)?
        } else if let Ok(a) = hidden.cast::<PyArrayDyn<f64>>() {
            self.merge_host(py, a, labels, ignore_index, |x| x)?
        } else if let Ok(a) = hidden.cast::<PyArrayDyn<half::f16>>() {
            self.merge_host(py, a, labels, ignore_index, |x| x.to_f64())?
        } else if let Ok(a) = hidden.cast::<numpy::PyUntypedArray>() {
            return Err(PyTypeError::new_err(format!(
                "hidden: expected float16, bfloat16, float32 or float64, got dtype {}",
                a.dtype()
            )));
        } else {
            return Err(PyTypeError::new_err(format!(
                "hidden: expected a numpy array or a torch tensor, got {}",
                hidden.get_type().name()?
            )));
        }
        Ok(())
    }

    /// Merge one batch already reduced per class (on a device): its
    /// distinct `classes` [K] int64, `counts` [K] int64 (positive), `means`
    /// [K, dim] float64 and `m2` [K] float64 (squared distances to those
    /// means). All are checked before anything is merged.
    fn _merge_moments(
        &mut self,
        classes: numpy::PyReadonlyArray1<'_, i64>,
        counts: numpy::PyReadonlyArray1<'_, i64>,
        means: numpy::PyReadonlyArray2<'_, f64>,
        m2: numpy::PyReadonlyArray1<'_, f64>,
    ) -> PyResult<()> {
        let d = self.stats.d;
        let k = classes.len();
        if counts.len() != k || m2.len() != k || means.shape() != [k, d] {
            return Err(PyValueError::new_err(format!(
                "moments: {k} classes with {} counts, {} M2 and means of shape {:?} (expected [{k}, {d}])",
                counts.len(),
                m2.len(),
                means.shape()
            )));
        }
        let bad = |what: &str| PyValueError::new_err(format!("moments: {what}"));
        let (classes, counts) = (classes.as_array(), counts.as_array());
        let (means, m2) = (means.as_array(), m2.as_array());
        let mut partial = Partial {
            classes: Vec::with_capacity(k),
            count: Vec::with_capacity(k),
            mean: Vec::with_capacity(k * d),
            m2: Vec::with_capacity(k),
        };
        let mut seen = std::collections::HashSet::with_capacity(k);
        for i in 0..k {
            let c = classes[i];
            if c < 0 || c as u64 >= self.num_classes as u64 {
                return Err(bad(&format!("class {c} is outside 0..{}", self.num_classes)));
            }
            if !seen.insert(c) {
                return Err(bad(&format!("class {c} appears twice in one batch")));
            }
            if counts[i] <= 0 {
                return Err(bad(&format!("class {c} has count {}", counts[i])));
            }
            let row = means.row(i);
            if !m2[i].is_finite() || m2[i] < 0.0 || row.iter().any(|x| !x.is_finite()) {
                return Err(bad(&format!(
                    "class {c} has a non-finite mean or a negative or non-finite M2 (overflow in the batch?)"
                )));
            }
            partial.classes.push(c as u32);
            partial.count.push(counts[i] as u64);
            partial.mean.extend(row.iter());
            partial.m2.push(m2[i]);
        }
        self.stats.merge_partial(&partial);
        Ok(())
    }

    /// Commit the statistics as `class_stats/model=.../split=.../layer=...`
    /// in `lake`, as collect commits its own; returns (up_to_date, manifest).
    #[pyo3(signature = (lake, model, dataset, split, layer, force=false))]
    #[allow(clippy::too_many_arguments)] // the Python method's arguments
    fn _write(
        &self,
        py: Python<'_>,
        lake: PyRef<'_, PyLake>,
        model: &str,
        dataset: Option<&str>,
        split: &str,
        layer: usize,
        force: bool,
    ) -> PyResult<(bool, Py<PyAny>)> {
        let target = StatsTarget {
            model,
            dataset,
            split,
            layer,
        };
        let store = &lake.lake;
        let committed = py
            .detach(|| commit_class_stats_from(store, &target, &self.stats, force))
            .map_err(to_py)?;
        Ok((committed.up_to_date, manifest_to_py(py, &committed.manifest)?))
    }

    /// Merge another accumulator (same num_classes and dim) into this one.
    fn merge(&mut self, other: PyRef<'_, PyClassStats>) -> PyResult<()> {
        if other.num_classes != self.num_classes || other.stats.d != self.stats.d {
            return Err(PyValueError::new_err(format!(
                "other: statistics of {} classes x {} cannot merge into {} x {}",
                other.num_classes, other.stats.d, self.num_classes, self.stats.d
            )));
        }
        let theirs = other.stats.clone();
        self.stats
            .merge(&theirs)
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Samples per class, [num_classes] uint64.
    #[getter]
    fn counts<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        let mut out = vec![0u64; self.num_classes];
        for (r, &c) in self.stats.classes.iter().enumerate() {
            out[c as usize] = self.stats.count[r];
        }
        PyArray1::from_vec(py, out)
    }

    /// Class means, [num_classes, dim] float64 (zero rows for unseen classes).
    #[getter]
    fn means<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let d = self.stats.d;
        let mut out = vec![0f64; self.num_classes * d];
        for (r, &c) in self.stats.classes.iter().enumerate() {
            out[c as usize * d..(c as usize + 1) * d].copy_from_slice(self.stats.mean_of(r));
        }
        PyArray1::from_vec(py, out).reshape([self.num_classes, d])
    }

    /// Per-class M2 = sum of squared distances to the class mean, [num_classes] float64.
    #[getter]
    fn m2<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        let mut out = vec![0f64; self.num_classes];
        for (r, &c) in self.stats.classes.iter().enumerate() {
            out[c as usize] = self.stats.m2[r];
        }
        PyArray1::from_vec(py, out)
    }

    fn __repr__(&self) -> String {
        format!(
            "ClassStats(num_classes={}, dim={}, samples={}, classes_seen={})",
            self.num_classes,
            self.stats.d,
            self.stats.samples(),
            self.stats.len()
        )
    }

    fn __getnewargs__(&self) -> (usize, usize) {
        (self.num_classes, self.stats.d)
    }

    /// Exact state for pickle: class ids, counts, means and M2 as
    /// little-endian bytes, in the accumulator's own row order.
    fn __getstate__<'py>(&self, py: Python<'py>) -> StateBytes<'py> {
        state_bytes(py, &self.stats)
    }

    fn __setstate__(&mut self, state: Vec<Vec<u8>>) -> PyResult<()> {
        let bad = || PyValueError::new_err("ClassStats: a damaged pickled state");
        let [classes, count, mean, m2] = <[Vec<u8>; 4]>::try_from(state).map_err(|_| bad())?;
        let u32s: Vec<u32> = classes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        let u64s: Vec<u64> = count
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        let f64s = |b: &[u8]| -> Vec<f64> {
            b.chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect()
        };
        let (mean, m2) = (f64s(&mean), f64s(&m2));
        let d = self.stats.d;
        let k = u32s.len();
        if u64s.len() != k || m2.len() != k || mean.len() != k * d {
            return Err(bad());
        }
        let mut stats = ClassStats::new(d);
        for r in 0..k {
            stats.merge_one(u32s[r], u64s[r], &mean[r * d..(r + 1) * d], m2[r]);
        }
        self.stats = stats;
        Ok(())
    }
}

/// One layer's statistics as `__getstate__` gives them.
type StateBytes<'py> = Vec<Bound<'py, PyBytes>>;
/// A saved pass: its layers, each layer's state, its metadata.
type SavedState<'py> = (
    Vec<usize>,
    Vec<StateBytes<'py>>,
    std::collections::HashMap<String, String>,
);

/// Save several layers' running statistics and `meta` as one object at
/// `key` in the lake (one atomic write: a reader sees this state or the
/// previous one), for a long Python-driven pass to resume from.
#[pyfunction]
pub(crate) fn save_state(
    py: Python<'_>,
    lake: PyRef<'_, PyLake>,
    key: &str,
    layers: Vec<usize>,
    stats: Vec<PyRef<'_, PyClassStats>>,
    meta: std::collections::HashMap<String, String>,
) -> PyResult<()> {
    if layers.len() != stats.len() {
        return Err(PyValueError::new_err("layers: one per statistics object"));
    }
    let state = pipeline::partials::StateObject {
        layers,
        stats: stats.iter().map(|s| s.stats.clone()).collect(),
        meta,
    };
    let store = &lake.lake;
    py.detach(|| state.save(store, key)).map_err(to_py)
}

/// The object [`save_state`] wrote at `key`: (layers, each layer's state as
/// `__setstate__` takes it, meta), or None.
#[pyfunction]
pub(crate) fn load_state<'py>(
    py: Python<'py>,
    lake: PyRef<'_, PyLake>,
    key: &str,
) -> PyResult<Option<SavedState<'py>>> {
    let store = &lake.lake;
    let Some(state) = py
        .detach(|| pipeline::partials::StateObject::load(store, key))
        .map_err(to_py)?
    else {
        return Ok(None);
    };
    let states = state.stats.iter().map(|s| state_bytes(py, s)).collect();
    Ok(Some((state.layers, states, state.meta)))
}

/// Remove the object at `key` (nothing when it is absent).
#[pyfunction]
pub(crate) fn delete_state(py: Python<'_>, lake: PyRef<'_, PyLake>, key: &str) -> PyResult<()> {
    let store = &lake.lake;
    py.detach(|| store.delete(key)).map_err(to_py)
}

/// Exact state: class ids, counts, means and M2 as little-endian bytes, in
/// the accumulator's own row order.
fn state_bytes<'py>(py: Python<'py>, s: &ClassStats) -> StateBytes<'py> {
    let bytes = |v: Vec<u8>| PyBytes::new(py, &v);
    vec![
        bytes(s.classes.iter().flat_map(|x| x.to_le_bytes()).collect()),
        bytes(s.count.iter().flat_map(|x| x.to_le_bytes()).collect()),
        bytes(s.mean.iter().flat_map(|x| x.to_le_bytes()).collect()),
        bytes(s.m2.iter().flat_map(|x| x.to_le_bytes()).collect()),
    ]
}
