"""Throughput of `ClassStats.update` in GB/s of f32 hidden states, beside
two anchors measured in the same run: a copy of the same buffer (the memory
bandwidth floor) and the best numpy pass (sort by label, then
`np.add.reduceat` in f64, two passes for M2). The headline is an update
into statistics that already hold the batch's classes (a loop's steady
state); the first update, which also lays out a row per new class, is
shown beside it.

    python pipeline/python/bench/class_stats.py [--dims 768,4096] [--mb 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import linguistic_collapse as lc

C = 50_257


def best_of(f, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def numpy_moments(hidden, labels):
    order = np.argsort(labels, kind="stable")
    ys = labels[order]
    hs = hidden[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
    counts = np.diff(np.r_[starts, len(ys)])
    means = np.add.reduceat(hs, starts, axis=0) / counts[:, None]
    m2 = np.add.reduceat(((hs - np.repeat(means, counts, axis=0)) ** 2).sum(axis=1), starts)
    return ys[starts], counts, means, m2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="768,4096")
    ap.add_argument("--mb", type=int, default=256, help="f32 hidden states per batch, MB")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for d in (int(x) for x in args.dims.split(",")):
        n = args.mb * 2**20 // (4 * d)
        hidden = rng.standard_normal((n, d), dtype=np.float32)
        # Zipf-like labels, as tokens are: a few frequent classes, a long tail.
        labels = np.minimum(rng.zipf(1.2, size=n) - 1, C - 1).astype(np.int64)
        gb = hidden.nbytes / 1e9
        out = np.empty_like(hidden)
        t_copy = best_of(lambda: np.copyto(out, hidden))
        t_numpy = best_of(lambda: numpy_moments(hidden, labels), repeat=1)

        def first():
            s = lc.ClassStats(C, d)
            s.update(hidden, labels)

        # A running loop's batches mostly meet classes already held: time an
        # update into statistics that hold every class of the batch.
        warm = lc.ClassStats(C, d)
        warm.update(hidden, labels)
        t_ours = best_of(lambda: warm.update(hidden, labels))
        t_first = best_of(first)
        torch_line = ""
        try:
            import torch
        except ImportError:
            pass
        else:
            # A CPU tensor over the same memory takes the same path.
            th, tl = torch.from_numpy(hidden), torch.from_numpy(labels)
            t_torch = best_of(lambda: warm.update(th, tl))
            torch_line = f"; from a torch CPU tensor {gb / t_torch:.2f} GB/s"
        # The two agree (the classes numpy saw).
        s = lc.ClassStats(C, d)
        s.update(hidden, labels)
        classes, counts, means, m2 = numpy_moments(hidden, labels)
        assert np.array_equal(s.counts[classes], counts)
        np.testing.assert_allclose(s.means[classes], means, rtol=1e-9, atol=1e-12)
        print(
            f"d={d} N={n} ({gb:.2f} GB f32, {len(classes)} classes): "
            f"ClassStats.update {gb / t_ours:.2f} GB/s = {t_copy / t_ours:.2f}x the copy "
            f"({gb / t_copy:.2f} GB/s), {t_numpy / t_ours:.1f}x numpy ({gb / t_numpy:.3f} GB/s); "
            f"into empty statistics {gb / t_first:.2f} GB/s = {t_copy / t_first:.2f}x the copy{torch_line}"
        )


if __name__ == "__main__":
    main()
