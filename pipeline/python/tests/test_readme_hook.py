"""README's forward-hook example runs as written, on a tiny random GPT-2
that transformers makes here (in place of the downloaded "gpt2"), and the
statistics it writes equal an f64 numpy pass over the same model's
`output_hidden_states` (the last is ln_f's output, what the hook reads).
Tolerance: the hook's and the reference's hidden states are the same
float32 values, so only f64 rounding separates the means (relative 1e-12,
absolute 1e-12)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

README = Path(__file__).resolve().parents[3] / "README.md"


def hook_example() -> str:
    text = README.read_text()
    marker = text.index("<!-- readme-hook-example")
    block = re.search(r"```python\n(.*?)```", text[marker:], re.S)
    assert block, "README: the block after the readme-hook-example marker"
    return block.group(1)


def test_the_readme_hook_example_writes_what_transformers_computes(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_positions=64, n_embd=16, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "tiny-gpt2")
    code = hook_example()
    assert code.count('from_pretrained("gpt2")') == 1
    code = code.replace('from_pretrained("gpt2")', f'from_pretrained({str(tmp_path / "tiny-gpt2")!r})')
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)

    model, batches = scope["model"], scope["batches"]
    with torch.no_grad():
        hidden = [model(ids, output_hidden_states=True).hidden_states[-1] for ids in batches]
    h = torch.cat([x[:, :-1].reshape(-1, 16) for x in hidden]).double().numpy()
    y = torch.cat([ids[:, 1:].reshape(-1) for ids in batches]).numpy()

    import linguistic_collapse as lc

    lake = lc.Lake(str(tmp_path / "lake"))
    table = lake.table("class_stats", model="gpt2", split="train", layer=2).sort_by("class_id")
    classes = table["class_id"].to_numpy()
    np.testing.assert_array_equal(classes, np.unique(y))
    np.testing.assert_array_equal(table["count"].to_numpy(), [np.sum(y == c) for c in classes])
    means = np.stack(table["mean"].to_numpy(zero_copy_only=False))
    want = np.stack([h[y == c].mean(axis=0) for c in classes])
    np.testing.assert_allclose(means, want, rtol=1e-12, atol=1e-12)
    row = lake.sql("SELECT n_classes, nc1_cdnv, nc3_duality_mean FROM model_metrics WHERE model = 'gpt2'").to_pylist()
    assert row[0]["n_classes"] == len(classes)
    assert row[0]["nc3_duality_mean"] is not None and -1 <= row[0]["nc3_duality_mean"] <= 1
