"""`ClassStats` against a single f64 numpy pass over the same samples.

Tolerances: every input value converts to f64 exactly, so the only error is
f64 rounding in the per-batch sums and Chan merges: relative 1e-12 on means
(and absolute 1e-12 times the data's scale for means near zero), relative
1e-10 on M2, whatever the input dtype. Counts are exact."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import linguistic_collapse as lc

C, D = 37, 24


def reference(hidden: np.ndarray, labels: np.ndarray, ignore_index=-100):
    h = hidden.reshape(-1, D).astype(np.float64)
    y = labels.reshape(-1)
    counts = np.zeros(C, np.uint64)
    means = np.zeros((C, D))
    m2 = np.zeros(C)
    for c in range(C):
        x = h[y == c]
        counts[c] = len(x)
        if len(x):
            means[c] = x.mean(axis=0)
            m2[c] = ((x - means[c]) ** 2).sum()
    return counts, means, m2


def assert_matches(stats, counts, means, m2, scale=1.0):
    np.testing.assert_array_equal(stats.counts, counts)
    np.testing.assert_allclose(stats.means, means, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(stats.m2, m2, rtol=1e-10, atol=1e-10 * scale**2)


def samples(rng, n, dtype, planted=True):
    labels = rng.integers(0, C, size=n)
    centres = rng.normal(size=(C, D)) * 3 if planted else np.zeros((C, D))
    hidden = (centres[labels] + rng.normal(size=(n, D))).astype(dtype)
    return hidden, labels


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", ["rows", "batch_time"])
def test_uneven_batches_equal_one_f64_pass(dtype, shape):
    rng = np.random.default_rng(7)
    hidden, labels = samples(rng, 1000, dtype)
    labels[::13] = -100  # Hugging Face's masked labels are skipped
    stats = lc.ClassStats(C, D)
    start = 0
    for size in (1, 7, 250, 2, 500, 240):
        h, y = hidden[start : start + size], labels[start : start + size]
        if shape == "batch_time" and size % 2 == 0:
            h, y = h.reshape(2, size // 2, D), y.reshape(2, size // 2)
        stats.update(h, y)
        start += size
    assert start == 1000
    assert stats.samples == int((labels != -100).sum())
    assert_matches(stats, *reference(hidden, labels), scale=10.0)


def test_merge_of_halves_equals_the_whole_and_pickle_is_exact():
    rng = np.random.default_rng(1)
    hidden, labels = samples(rng, 800, np.float32)
    whole, a, b = lc.ClassStats(C, D), lc.ClassStats(C, D), lc.ClassStats(C, D)
    whole.update(hidden, labels)
    a.update(hidden[:300], labels[:300])
    b.update(hidden[300:], labels[300:])
    a.merge(b)
    assert_matches(a, whole.counts, whole.means, whole.m2, scale=10.0)
    copy = pickle.loads(pickle.dumps(a))
    assert copy.num_classes == C and copy.dim == D
    np.testing.assert_array_equal(copy.counts, a.counts)
    np.testing.assert_array_equal(copy.means, a.means)
    np.testing.assert_array_equal(copy.m2, a.m2)


def test_bad_inputs_name_the_argument_and_change_nothing():
    rng = np.random.default_rng(2)
    hidden, labels = samples(rng, 50, np.float32)
    stats = lc.ClassStats(C, D)
    stats.update(hidden, labels)
    before = (stats.counts.copy(), stats.means.copy(), stats.m2.copy())
    cases = [
        (ValueError, "hidden: expected shape", hidden[:, :-1], labels),
        (ValueError, "labels: 49 labels for 50", hidden, labels[:-1]),
        (ValueError, "outside 0..37", hidden, np.where(labels == 3, C, labels)),
        (ValueError, "outside 0..37", hidden, np.where(labels == 3, -5, labels)),
        (TypeError, "labels: expected integers", hidden, labels.astype(np.float32)),
        (TypeError, "hidden: expected float16, float32 or float64", hidden.astype(np.int32), labels),
        (TypeError, "hidden: expected a numpy array", hidden.tolist(), labels),
        (ValueError, "C-contiguous", np.asfortranarray(hidden), labels),
        (ValueError, "C-contiguous", hidden[::2], labels[::2]),
    ]
    for exc, msg, h, y in cases:
        with pytest.raises(exc, match=msg):
            stats.update(h, y)
    after = (stats.counts, stats.means, stats.m2)
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="cannot merge"):
        stats.merge(lc.ClassStats(C, D + 1))
    with pytest.raises(ValueError, match="num_classes"):
        lc.ClassStats(0, D)
