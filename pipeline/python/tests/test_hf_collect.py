"""`lc.collect`: a `transformers` causal LM over the lake's chunks, written
as the CLI's collect writes its statistics.

- GPT-Neo, which the CLI runs with candle: the same checkpoint collected by
  both gives the same class_stats and model_metrics. The two forwards are
  f32 in different kernels (candle's and torch's), so hidden states differ
  in their last bits; means agree within relative 1e-4 (absolute 1e-5 for
  values near zero), M2 within 1e-4, metrics within 1e-3.
- OPT, which the candle code does not implement: a tiny random model goes
  through collect, decide, evaluate and analyze, and its model_metrics equal
  DESIGN.md's metrics computed with numpy from its own
  `output_hidden_states` (f64 on both sides over the same f32 values;
  `reference.py`'s tolerance for the metrics, 1e-9; NC4 within 2 samples)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPTNeoForCausalLM, OPTConfig, OPTForCausalLM

import linguistic_collapse as lc

from conftest import model_name
from reference import expected_metrics

COMPARED = [
    "n_classes",
    "n_pairs",
    "nc1_cdnv",
    "nc2_equinorm_cov",
    "nc2_interference_mean",
    "nc2_etf_error",
    "gnc2_logkernel_mean",
    "nc3_duality_mean",
]


@pytest.fixture()
def lake_copy(py_lake, tmp_path):
    lake, _ = py_lake
    copy = tmp_path / "lake"
    shutil.copytree(Path(lake.url.removeprefix("file://")), copy)
    return lc.Lake(str(copy))


def cli_checkpoint(lake):
    """The first model the CLI trained (01x0008_01d00@0: its first, only,
    checkpoint), loaded by transformers."""
    cli_id = model_name(0)
    weights = Path(lake.url.removeprefix("file://")) / "weights" / cli_id.split("@")[0]
    checkpoint = sorted(weights.glob("checkpoint-*"))[0]
    return cli_id, GPTNeoForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)


def stats_table(lake, model, layer):
    t = lake.table("class_stats", model=model, split="train", layer=layer).sort_by("class_id")
    return (
        t["class_id"].to_numpy(),
        t["count"].to_numpy(),
        np.stack(t["mean"].to_numpy(zero_copy_only=False)),
        t["m2"].to_numpy(),
    )


def test_gpt_neo_by_transformers_equals_the_cli(lake_copy):
    lake = lake_copy
    cli_id, model = cli_checkpoint(lake)
    result = lc.collect(model, lake, "hf-neo", "small", layers="last", batch=3, quiet=True)
    assert result["layers"] == [1]
    assert {m["table"] for m in result["manifests"]} == {"class_stats", "classifiers"}

    mine, theirs = stats_table(lake, "hf-neo", 1), stats_table(lake, cli_id, 1)
    np.testing.assert_array_equal(mine[0], theirs[0])
    np.testing.assert_array_equal(mine[1], theirs[1])
    np.testing.assert_allclose(mine[2], theirs[2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mine[3], theirs[3], rtol=1e-4, atol=1e-5)

    lake.run("analyze", quiet=True, model="hf-neo", layer=1)
    rows = {
        r["model"]: r
        for r in lake.sql(
            f"SELECT * FROM model_metrics WHERE model IN ('hf-neo', '{cli_id}') AND layer = 1"
        ).to_pylist()
    }
    for name in COMPARED:
        assert rows["hf-neo"][name] == pytest.approx(rows[cli_id][name], rel=1e-3, abs=1e-6), name


def tiny_opt(vocab=50257):
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=vocab,
        hidden_size=16,
        word_embed_proj_dim=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    return OPTForCausalLM(config).eval()


def test_an_architecture_candle_lacks_analyses_to_the_numpy_metrics(lake_copy):
    lake = lake_copy
    model = tiny_opt()
    result = lc.collect(model, lake, "tiny-opt", "small", layers="all", batch=4, quiet=True)
    assert result["layers"] == [0, 1, 2]
    lake.run("analyze", quiet=True, model="tiny-opt", layer=2)

    chunks = lake.table("chunks", dataset="small", split="train").sort_by("chunk_id")
    ids = torch.tensor(chunks["tokens"].to_pylist(), dtype=torch.int64)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, output_hidden_states=True).last_hidden_state
    h = hidden[:, :-1].reshape(-1, 16).double().numpy()
    y = ids[:, 1:].reshape(-1).numpy()
    classifier = model.get_output_embeddings().weight.detach().double().numpy()
    want = expected_metrics(h, y, classifier)
    row = lake.sql("SELECT * FROM model_metrics WHERE model = 'tiny-opt' AND layer = 2").to_pylist()[0]
    for name, value in want.items():
        assert row[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    counts = stats_table(lake, "tiny-opt", 0)[1]
    assert counts.sum() == len(y) and result["samples"] == len(y)

    # NC4 by brute force on the validation split's own hidden states: the
    # decisions over V' (every class of the train statistics), in f64.
    lc.decide(model, lake, "tiny-opt", "small", layer=2, quiet=True)
    lake.run("analyze", quiet=True, model="tiny-opt", layer=2, force=True)
    val = lake.table("chunks", dataset="small", split="validation").sort_by("chunk_id")
    val_ids = torch.tensor(val["tokens"].to_pylist(), dtype=torch.int64)
    with torch.no_grad():
        hv = model.model(input_ids=val_ids, output_hidden_states=True).last_hidden_state
    hv = hv[:, :-1].reshape(-1, 16).double().numpy()
    v_prime = np.unique(y)
    mu = np.stack([h[y == c].mean(axis=0) for c in v_prime])
    linear = v_prime[np.argmax(hv @ classifier[v_prime].T, axis=1)]
    ncc = v_prime[np.argmin(((hv[:, None, :] - mu[None, :, :]) ** 2).sum(axis=2), axis=1)]
    row = lake.sql("SELECT nc4_agreement, nc4_samples FROM model_metrics WHERE model = 'tiny-opt' AND layer = 2").to_pylist()[0]
    assert row["nc4_samples"] == len(hv)
    # One forward of every chunk here, batches of 8 there: f32 sums in
    # another order may flip a near tie.
    assert row["nc4_agreement"] == pytest.approx(np.mean(linear == ncc), abs=2 / len(hv))

    # Beside the lake's own models (three trained here): correlate and report.
    lc.evaluate(model, lake, "tiny-opt", "small", quiet=True)
    lake.run("correlate", quiet=True, permutations="200", bootstrap="50")
    n = lake.sql("SELECT max(n_models) AS n FROM correlations WHERE metric = 'nc1_cdnv'").to_pylist()[0]["n"]
    assert n == 4
    assert "report of 4 model(s)" in lake.run("report", quiet=True).summary


def test_bad_calls_name_what_was_expected(lake_copy):
    lake = lake_copy
    with pytest.raises(ValueError, match="token id .* another vocabulary"):
        lc.collect(tiny_opt(vocab=100), lake, "small-vocab", "small", quiet=True)
    model = tiny_opt()
    with pytest.raises(ValueError, match=r"layers: expected .* 0\.\.2"):
        lc.collect(model, lake, "x", "small", layers=[3], quiet=True)
    with pytest.raises(ValueError, match="no chunks for dataset='nope'"):
        lc.collect(model, lake, "x", "nope", quiet=True)
    with pytest.raises(ValueError, match="batch: expected a positive integer"):
        lc.collect(model, lake, "x", "small", batch=0, quiet=True)
    written = [set(p.split("/")) for p in lake.status().column("partition").to_pylist()]
    assert not any({"model=x", "model=small-vocab"} & parts for parts in written)


def test_an_interrupted_collect_resumes_to_the_same_statistics(lake_copy):
    lake = lake_copy
    model = tiny_opt()
    whole = lc.collect(model, lake, "opt-whole", "small", layers=[0, 2], batch=4, checkpoint_every=8, quiet=True)
    assert whole["resumed_from"] == 0

    # The backbone's third forward is interrupted, as Ctrl-C would: after
    # the checkpoint at chunk 8, before anything is written.
    forward, calls = model.model.forward, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    model.model.forward = interrupted
    with pytest.raises(KeyboardInterrupt):
        lc.collect(model, lake, "opt-resumed", "small", layers=[0, 2], batch=4, checkpoint_every=8, quiet=True)
    written = [set(p.split("/")) for p in lake.status().column("partition").to_pylist()]
    assert not any("model=opt-resumed" in parts for parts in written)
    assert lake.verify().ok

    model.model.forward = forward
    resumed = lc.collect(model, lake, "opt-resumed", "small", layers=[0, 2], batch=4, checkpoint_every=8, quiet=True)
    assert resumed["resumed_from"] == 8 and resumed["samples"] == whole["samples"]
    for layer in (0, 2):
        for got, want in zip(stats_table(lake, "opt-resumed", layer), stats_table(lake, "opt-whole", layer)):
            np.testing.assert_array_equal(got, want)
    # Finished: the checkpoint is gone, and a new call starts afresh.
    again = lc.collect(model, lake, "opt-resumed", "small", layers=[0, 2], batch=4, checkpoint_every=8, quiet=True)
    assert again["resumed_from"] == 0
    assert all(m["up_to_date"] for m in again["manifests"])


def test_evaluate_equals_the_cli_and_transformers_own_loss(lake_copy):
    lake = lake_copy
    cli_id, neo = cli_checkpoint(lake)
    mine = lc.evaluate(neo, lake, "hf-neo", "small", batch=5, quiet=True)["row"]
    theirs = lake.table("models", model=cli_id).to_pylist()[0]
    for key in ("val_samples", "depth", "width", "heads", "vocab_size", "n_params"):
        assert mine[key] == theirs[key], key
    # f32 logits from two implementations: the mean loss agrees to 1e-5; a
    # top-1 decision can flip only on a near tie.
    assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-5)
    assert mine["val_acc"] == pytest.approx(theirs["val_acc"], abs=2 / mine["val_samples"])

    # A model outside the candle code: transformers' own loss over the same
    # chunks (one call, labels = inputs) is the mean that evaluate writes.
    opt = tiny_opt()
    lc.collect(opt, lake, "tiny-opt", "small", quiet=True)
    result = lc.evaluate(opt, lake, "tiny-opt", "small", batch=3, quiet=True)
    chunks = lake.table("chunks", dataset="small", split="validation").sort_by("chunk_id")
    ids = torch.tensor(chunks["tokens"].to_pylist(), dtype=torch.int64)
    with torch.no_grad():
        want = float(opt(input_ids=ids, labels=ids).loss)
    assert result["row"]["val_loss"] == pytest.approx(want, rel=1e-5)
    assert result["row"]["perplexity"] == pytest.approx(np.exp(want), rel=1e-5)
    lake.run("analyze", quiet=True, model="tiny-opt", layer=2)
    row = lake.sql("SELECT val_loss, depth, final_layer FROM model_metrics WHERE model = 'tiny-opt'").to_pylist()
    assert row == [{"val_loss": result["row"]["val_loss"], "depth": 2, "final_layer": True}]
    assert lc.evaluate(opt, lake, "tiny-opt", "small", batch=3, quiet=True)["manifest"]["up_to_date"]


def test_decide_equals_the_cli_and_completes_the_metrics(lake_copy):
    lake = lake_copy
    cli_id, neo = cli_checkpoint(lake)
    lc.collect(neo, lake, "hf-neo", "small", quiet=True)
    manifest = lc.decide(neo, lake, "hf-neo", "small", batch=3, quiet=True)
    assert manifest["artifact"] == "decisions/model=hf-neo/split=validation/layer=1"
    mine = lake.table("decisions", model="hf-neo").sort_by("class_id").drop_columns(["model", "split", "layer"])
    theirs = lake.table("decisions", model=cli_id).sort_by("class_id").drop_columns(["model", "split", "layer"])
    assert mine.column_names == theirs.column_names
    for name in ("class_id", "samples", "analysed"):
        assert mine[name].to_pylist() == theirs[name].to_pylist(), name
    # Decisions from two f32 forwards can flip only at near ties: a sample
    # or two of the whole split at most.
    for name in ("agree", "linear_correct", "ncc_correct"):
        diff = np.abs(mine[name].to_numpy().astype(np.int64) - theirs[name].to_numpy().astype(np.int64)).sum()
        assert diff <= 2, (name, diff)

    lake.run("analyze", quiet=True, model="hf-neo", layer=1)
    rows = {
        r["model"]: r
        for r in lake.sql(
            f"SELECT model, nc4_agreement, nc4_samples FROM model_metrics WHERE model IN ('hf-neo', '{cli_id}')"
        ).to_pylist()
    }
    assert rows["hf-neo"]["nc4_samples"] == rows[cli_id]["nc4_samples"]
    assert rows["hf-neo"]["nc4_agreement"] == pytest.approx(rows[cli_id]["nc4_agreement"], abs=2 / rows[cli_id]["nc4_samples"])
    with pytest.raises(ValueError, match="no class_stats for 'nobody'"):
        lc.decide(neo, lake, "nobody", "small", quiet=True)
