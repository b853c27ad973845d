"""`ClassStats` from numpy arrays against a single f64 numpy pass over the
same samples (tolerances: `reference.py`)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import linguistic_collapse as lc

from reference import C, D, assert_matches, reference, samples


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
        (TypeError, "hidden: expected float16, bfloat16, float32 or float64", hidden.astype(np.int32), labels),
        (TypeError, "hidden: expected a numpy array or a torch tensor", hidden.tolist(), labels),
        (ValueError, "C-contiguous", np.asfortranarray(hidden), labels),
        (ValueError, "C-contiguous", hidden[::2], labels[::2]),
        (TypeError, "labels: expected a numpy array or a torch tensor", hidden, "abc"),
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
