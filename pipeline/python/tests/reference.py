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


def expected_metrics(hidden, labels, classifier):
    """DESIGN.md's model-level metrics of samples `hidden` [N, d] with
    `labels` [N] and classifier rows [V, d], directly in f64: every class
    seen, pairs c < c', population std over pairs, ddof 1 over classes."""
    classes = np.unique(labels)
    mu = np.stack([hidden[labels == c].mean(axis=0) for c in classes])
    var = np.array([((hidden[labels == c] - mu[i]) ** 2).sum(axis=1).mean() for i, c in enumerate(classes)])
    k = len(classes)
    upper = np.triu_indices(k, 1)
    m = mu - mu.mean(axis=0)
    norms = np.linalg.norm(m, axis=1)
    u = m / norms[:, None]
    un = mu / np.linalg.norm(mu, axis=1)[:, None]
    dist = np.linalg.norm(mu[:, None, :] - mu[None, :, :], axis=2)[upper]
    cdnv = (var[:, None] + var[None, :])[upper] / (2 * dist**4)
    interference = (u @ u.T)[upper]
    logk = -np.log(np.linalg.norm(u[:, None, :] - u[None, :, :], axis=2)[upper])
    logk_uncentred = -np.log(np.linalg.norm(un[:, None, :] - un[None, :, :], axis=2)[upper])
    lognorm = np.log(norms)
    w = classifier[classes]
    # A zero classifier row (e.g. a padding token's) has no direction: its
    # class has no NC3 value and is left out of the aggregates (DESIGN.md:
    # degenerate inputs are reported, never NaN).
    w_norms = np.linalg.norm(w, axis=1)
    defined = w_norms > 0
    duality = np.sum(w * m, axis=1)[defined] / (w_norms * norms)[defined]
    g = m @ m.T
    etf = (k * np.eye(k) - np.ones((k, k))) / (k * np.sqrt(k - 1))
    return {
        "n_classes": k,
        "n_pairs": len(cdnv),
        "nc1_cdnv": cdnv.mean(),
        "nc2_equinorm_mean": lognorm.mean(),
        "nc2_equinorm_std": lognorm.std(ddof=1),
        "nc2_equinorm_cov": lognorm.std(ddof=1) / lognorm.mean(),
        "nc2_interference_mean": interference.mean(),
        "nc2_interference_std": interference.std(),
        "nc2_equiangular_cov": interference.std() / interference.mean(),
        "nc2_etf_error": np.linalg.norm(g / np.linalg.norm(g) - etf),
        "gnc2_logkernel_mean": logk.mean(),
        "gnc2_logkernel_std": logk.std(),
        "gnc2_uniformity_cov": logk.std() / logk.mean(),
        "gnc2_uncentred_logkernel_mean": logk_uncentred.mean(),
        "nc3_duality_mean": duality.mean(),
        "nc3_duality_std": duality.std(ddof=1),
        "unc3_duality_cov": duality.std(ddof=1) / duality.mean(),
    }
