"""`ClassStats.write` and `write_classifier`: statistics made in Python
become `class_stats` as `collect` writes them, and `analyze` computes every
metric of them.

The metrics are checked against an f64 numpy computation written here from
DESIGN.md's definitions (pairs c < c', population std over pairs, ddof 1
over classes). Both sides are f64 over the same statistics; the engine's
Gram form and tiled Chan merges of pair values differ from the direct forms
here by rounding only: relative 1e-9 (absolute 1e-12 for values near zero)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import linguistic_collapse as lc

from conftest import model_name
from reference import expected_metrics

C, D, N = 30, 12, 4000


def planted(seed=11):
    """Samples around well-separated planted class means, Zipf-like counts."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, C + 1)
    labels = rng.choice(C, size=N, p=weights / weights.sum())
    means = rng.normal(size=(C, D)) * 4
    spread = rng.uniform(0.5, 2.0, size=C)
    hidden = means[labels] + rng.normal(size=(N, D)) * spread[labels, None]
    classifier = means + rng.normal(size=(C, D))  # NC3: rows near the means
    return hidden, labels, classifier


def test_written_statistics_analyse_to_the_f64_metrics(tmp_path):
    hidden, labels, classifier = planted()
    stats = lc.ClassStats(C, D)
    # A forward pass's shapes and dtype: [B, T, d] float32 torch batches.
    h32 = torch.from_numpy(hidden).float()
    for s in range(0, N, 500):
        stats.update(h32[s : s + 500].reshape(5, 100, D), torch.from_numpy(labels[s : s + 500]).reshape(5, 100))
    lake = lc.Lake(str(tmp_path / "lake"))
    manifest = stats.write(lake, "hooked-model", None, "train", 6)
    assert manifest["artifact"] == "class_stats/model=hooked-model/split=train/layer=6"
    assert not manifest["up_to_date"] and manifest["rows"] == C
    assert lc.write_classifier(lake, "hooked-model", torch.from_numpy(classifier))["rows"] == C

    result = lake.run("analyze", quiet=True, model="hooked-model", layer=6)
    assert {m["table"] for m in result.manifests} == {"pair_tiles", "class_metrics"}
    row = lake.sql("SELECT * FROM model_metrics WHERE model = 'hooked-model' AND layer = 6").to_pylist()
    assert len(row) == 1
    want = expected_metrics(h32.double().numpy(), labels, classifier.astype(np.float32).astype(np.float64))
    for name, value in want.items():
        assert row[0][name] == pytest.approx(value, rel=1e-9, abs=1e-12), name

    # The lake knows it as it knows collect's: status, verify, the table.
    status = lake.status().to_pylist()
    mine = {"model=hooked-model", "split=train", "layer=6"}
    assert any(r["table"] == "class_stats" and set(r["partition"].split("/")) == mine for r in status), status
    assert lake.verify().ok
    table = lake.table("class_stats", model="hooked-model", layer=6)
    np.testing.assert_array_equal(np.stack(table.sort_by("class_id")["mean"].to_numpy(zero_copy_only=False)), stats.means)


def test_rewrites_are_up_to_date_and_other_content_needs_force(tmp_path):
    hidden, labels, classifier = planted(3)
    lake = lc.Lake(str(tmp_path / "lake"))
    stats = lc.ClassStats(C, D)
    stats.update(hidden, labels)
    first = stats.write(lake, "m", "some-dataset", "validation", 2)
    again = stats.write(str(tmp_path / "lake"), "m", "some-dataset", "validation", 2)
    assert again["up_to_date"] and again["content_hash"] == first["content_hash"]
    assert first["extra"]["dataset"] == "some-dataset" and first["stage"] == "python"
    stats.update(hidden[:10], labels[:10])
    with pytest.raises(lc.PipelineError, match="force=True"):
        stats.write(lake, "m", "some-dataset", "validation", 2)
    assert lake.table("class_stats", model="m")["count"].to_numpy().sum() == N  # kept
    replaced = stats.write(lake, "m", "some-dataset", "validation", 2, force=True)
    assert not replaced["up_to_date"] and replaced["content_hash"] != first["content_hash"]
    assert lake.table("class_stats", model="m")["count"].to_numpy().sum() == N + 10

    lc.write_classifier(lake, "m", classifier)
    assert lc.write_classifier(lake, "m", classifier.astype(np.float32))["up_to_date"]
    with pytest.raises(lc.PipelineError, match="force=True"):
        lc.write_classifier(lake, "m", classifier + 1)


def test_bad_writes_name_what_was_wrong(tmp_path):
    lake = lc.Lake(str(tmp_path / "lake"))
    empty = lc.ClassStats(C, D)
    with pytest.raises(ValueError, match="no samples to write"):
        empty.write(lake, "m", None, "train", 1)
    stats = lc.ClassStats(C, D)
    stats.update(np.ones((3, D)), np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="layer: expected a non-negative integer"):
        stats.write(lake, "m", None, "train", "last")
    with pytest.raises(TypeError, match="lake: expected"):
        stats.write(42, "m", None, "train", 1)
    with pytest.raises(ValueError, match=r"weight: expected \[num_classes, dim\]"):
        lc.write_classifier(lake, "m", np.ones(D))
    with pytest.raises(TypeError, match="weight: expected floats"):
        lc.write_classifier(lake, "m", torch.ones(C, D, dtype=torch.int64))
    bad = np.ones((C, D), np.float32)
    bad[4, 5] = np.inf
    with pytest.raises(ValueError, match="row 4 column 5"):
        lc.write_classifier(lake, "m", bad)
    assert not (tmp_path / "lake").exists()  # nothing of the rejected calls was written


def test_collected_models_are_not_mixed_with_python_statistics(py_lake, tmp_path):
    lake, _ = py_lake
    copy = tmp_path / "lake"
    shutil.copytree(Path(lake.url.removeprefix("file://")), copy)
    lake = lc.Lake(str(copy))
    model = model_name(0)
    width = lake.table("class_stats", model=model)["mean"][0].as_py().__len__()
    stats = lc.ClassStats(500, width)
    stats.update(np.ones((2, width), np.float32), np.array([1, 2]))
    with pytest.raises(lc.PipelineError, match="refusing to mix"):
        stats.write(lake, model, "small", "train", 0)
    with pytest.raises(lc.PipelineError, match="weights are in the lake"):
        lc.write_classifier(lake, model, np.ones((500, width), np.float32))
