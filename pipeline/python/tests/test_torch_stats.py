"""`ClassStats` from torch tensors, on both paths, against a single f64
numpy pass over the same values (tolerances: `reference.py`; the
bfloat16 and float16 values, too, convert to f64 exactly).

The device path (`reduce="device"`, what CUDA tensors take) runs here on CPU
tensors: it is the same torch code on every device (`_torch.device_moments`),
and a CUDA tensor differs only in where those operations run. Its per-class
sums are float64 on the device, so it meets the same tolerances."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest
import torch

import linguistic_collapse as lc

from reference import C, D, assert_matches, reference, samples

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SIZES = (1, 7, 250, 2, 500, 240)


def torch_samples(seed, n, dtype):
    hidden, labels = samples(np.random.default_rng(seed), n, np.float64)
    labels[::13] = -100
    return torch.from_numpy(hidden).to(dtype), torch.from_numpy(labels)


def feed(stats, hidden, labels, shape, reduce):
    start = 0
    for size in SIZES:
        h, y = hidden[start : start + size], labels[start : start + size]
        if shape == "batch_time" and size % 2 == 0:
            h, y = h.reshape(2, size // 2, D), y.reshape(2, size // 2)
        stats.update(h, y, reduce=reduce)
        start += size
    assert start == len(hidden)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ["rows", "batch_time"])
@pytest.mark.parametrize("reduce", ["host", "device"])
def test_uneven_batches_equal_one_f64_pass(dtype, shape, reduce):
    hidden, labels = torch_samples(7, sum(SIZES), dtype)
    stats = lc.ClassStats(C, D)
    feed(stats, hidden, labels, shape, reduce)
    values = hidden.to(torch.float64).numpy()  # the dtype's values, exactly
    assert stats.samples == int((labels != -100).sum())
    assert_matches(stats, *reference(values, labels.numpy()), scale=10.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_device_path_equals_the_host_path(dtype):
    hidden, labels = torch_samples(3, sum(SIZES), dtype)
    host, device = lc.ClassStats(C, D), lc.ClassStats(C, D)
    feed(host, hidden, labels, "rows", "host")
    feed(device, hidden, labels, "rows", "device")
    np.testing.assert_array_equal(device.counts, host.counts)
    np.testing.assert_allclose(device.means, host.means, rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(device.m2, host.m2, rtol=1e-10, atol=1e-9)


def test_cpu_tensors_are_read_in_place():
    # The host path views the tensor's memory: a tensor far larger than what
    # the process could copy many times over would fail slowly otherwise, so
    # check the view directly.
    from linguistic_collapse import _torch

    for dtype in DTYPES:
        t = torch.zeros(4, D, dtype=dtype)
        array, bf16 = _torch.host_view(t, D)
        assert array.__array_interface__["data"][0] == t.data_ptr()
        assert bf16 == (dtype == torch.bfloat16)


def test_merge_of_halves_and_pickle_round_trip():
    hidden, labels = torch_samples(1, 800, torch.bfloat16)
    whole, a, b = lc.ClassStats(C, D), lc.ClassStats(C, D), lc.ClassStats(C, D)
    whole.update(hidden, labels)
    a.update(hidden[:300], labels[:300], reduce="device")
    b.update(hidden[300:], labels[300:])
    a.merge(pickle.loads(pickle.dumps(b)))
    assert_matches(a, whole.counts, whole.means, whole.m2, scale=10.0)
    copy = pickle.loads(pickle.dumps(a))
    assert type(copy) is lc.ClassStats
    for got, want in zip((copy.counts, copy.means, copy.m2), (a.counts, a.means, a.m2)):
        np.testing.assert_array_equal(got, want)


def test_gradients_and_all_ignored_batches():
    hidden, labels = torch_samples(5, 40, torch.float32)
    hidden.requires_grad_(True)
    for reduce in ("host", "device"):
        stats = lc.ClassStats(C, D)
        stats.update(hidden * 2, labels, reduce=reduce)  # a tensor that requires grad
        stats.update(hidden, torch.full_like(labels, -100), reduce=reduce)
        assert stats.samples == int((labels != -100).sum())


@pytest.mark.parametrize("reduce", ["host", "device"])
def test_bad_tensors_name_the_argument_and_change_nothing(reduce):
    hidden, labels = torch_samples(2, 50, torch.float32)
    stats = lc.ClassStats(C, D)
    stats.update(hidden, labels)
    before = (stats.counts.copy(), stats.means.copy(), stats.m2.copy())
    cases = [
        (ValueError, r"hidden: expected shape \[N, 24\]", hidden[:, :-1], labels),
        (ValueError, "labels: 49 labels for 50", hidden, labels[:-1]),
        (ValueError, "outside 0..37", hidden, torch.where(labels == 3, C, labels)),
        (ValueError, "outside 0..37", hidden, torch.where(labels == 3, -5, labels)),
        (TypeError, "labels: expected integers", hidden, labels.float()),
        (TypeError, "hidden: expected float16, bfloat16, float32 or float64", hidden.int(), labels),
    ]
    if reduce == "host":
        # The host path reads memory in place, so it needs rows laid end to end.
        cases.append((ValueError, "C-contiguous", hidden.t().contiguous().t(), labels))
    for exc, msg, h, y in cases:
        with pytest.raises(exc, match=msg):
            stats.update(h, y, reduce=reduce)
    for x, y in zip(before, (stats.counts, stats.means, stats.m2)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="reduce: expected"):
        stats.update(hidden, labels, reduce="gpu")
    with pytest.raises(ValueError, match="reduce='device' needs a torch tensor"):
        stats.update(hidden.numpy(), labels.numpy(), reduce="device")


def test_the_device_path_accepts_strided_views():
    hidden, labels = torch_samples(4, 60, torch.float64)
    strided = hidden.t().contiguous().t()
    a, b = lc.ClassStats(C, D), lc.ClassStats(C, D)
    a.update(strided, labels, reduce="device")
    b.update(hidden, labels)
    assert_matches(a, b.counts, b.means, b.m2, scale=10.0)


def test_the_package_does_not_import_torch_itself():
    import subprocess

    code = "import linguistic_collapse as lc, numpy as np, sys; s = lc.ClassStats(3, 2); s.update(np.zeros((2, 2)), np.array([0, 1])); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
