"""Independent f64 numpy references for the statistics tests.

Tolerances (``assert_matches``): every input value, float16, bfloat16,
float32 or float64, converts to f64 exactly, so the reference over the same
values differs from the engine only by f64 rounding in the per-batch sums
and the Chan merges: relative 1e-12 on means (absolute 1e-12 times the
data's scale for means near zero), relative 1e-10 on M2. Counts are exact."""

from __future__ import annotations

import numpy as np

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
