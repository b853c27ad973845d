"""`lc.collect` on a transformers model against three anchors measured in
the same run, on the CPU: transformers' own forward over the same chunks
(the floor: collect's overhead is what it adds), the CLI's collect (candle)
on the same checkpoint, and a TransformerLens-style run that caches every
hidden state and computes the statistics with numpy afterwards. Each runs in
its own process, so its peak RSS is its own; lc.collect runs again on ten
times the tokens to show its memory is flat.

    python pipeline/python/bench/hf_collect.py [--layers 2] [--width 256] [--T 512] [--batch 4]

Needs torch and transformers; builds its lake (the shipped TinyStories
sample, and the same text ten times) and a random GPT-Neo-shaped model in a
temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "data"


def build(work: Path, args) -> None:
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    import linguistic_collapse as lc

    text = (DATA / "tinystories_train_sample.txt").read_text()
    (work / "x1.txt").write_text(text)
    (work / "x10.txt").write_text(text * 10)
    lake = lc.Lake(str(work / "lake"))
    for name in ("x1", "x10"):
        lake.run("ingest", quiet=True, dataset=name, train=str(work / f"{name}.txt"))
        lake.run("tokenize", quiet=True, dataset=name, tokenizer=str(DATA / "tokenizer.json"))
        lake.run("pack", quiet=True, dataset=name, T=args.T)
    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=50257,
        hidden_size=args.width,
        num_layers=args.layers,
        num_heads=max(1, args.width // 64),
        attention_types=[[["global"], args.layers]],
        max_position_embeddings=args.T,
        intermediate_size=4 * args.width,
    )
    GPTNeoForCausalLM(config).save_pretrained(work / "neo")
    # The CLI checks the dataset's tokenizer against the model directory's.
    shutil.copy(DATA / "tokenizer.json", work / "neo" / "tokenizer.json")


def measure(work: Path, mode: str, dataset: str, batch: int) -> dict:
    """One mode in this process: seconds and tokens."""
    import numpy as np
    import torch
    from transformers import GPTNeoForCausalLM

    import linguistic_collapse as lc

    torch.set_num_threads(os.cpu_count() or 1)
    lake = lc.Lake(str(work / "lake"))
    model = GPTNeoForCausalLM.from_pretrained(work / "neo").eval()
    chunks = lake.table("chunks", dataset=dataset, split="train").sort_by("chunk_id")
    ids = np.asarray(chunks["tokens"].combine_chunks().flatten(), dtype=np.int64).reshape(chunks.num_rows, -1)
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    started = time.perf_counter()
    if mode == "forward":
        with torch.inference_mode():
            for s in range(0, len(ids), batch):
                model.transformer(input_ids=torch.from_numpy(ids[s : s + batch]))
    elif mode == "collect":
        lc.collect(model, lake, f"bench-{dataset}", dataset, batch=batch, force=True, quiet=True)
    elif mode == "cache":
        cached, labels = [], []
        with torch.inference_mode():
            for s in range(0, len(ids), batch):
                x = torch.from_numpy(ids[s : s + batch])
                h = model.transformer(input_ids=x).last_hidden_state
                cached.append(h[:, :-1].reshape(-1, h.shape[-1]).numpy().copy())
                labels.append(ids[s : s + batch, 1:].reshape(-1))
        hidden, y = np.concatenate(cached), np.concatenate(labels)
        order = np.argsort(y, kind="stable")
        hs, ys = hidden[order].astype(np.float64), y[order]
        starts = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
        counts = np.diff(np.r_[starts, len(ys)])
        means = np.add.reduceat(hs, starts, axis=0) / counts[:, None]
        np.add.reduceat(((hs - np.repeat(means, counts, axis=0)) ** 2).sum(axis=1), starts)
    else:
        raise ValueError(mode)
    secs = time.perf_counter() - started
    return {"secs": secs, "tokens": tokens}


def child(work: Path, mode: str, dataset: str, batch: int) -> dict:
    if mode == "cli":
        pipeline = str(Path(sys.executable).parent / "pipeline")
        started = time.perf_counter()
        out = subprocess.run(
            [pipeline, "run", "stage=collect", f"model={work / 'neo'}", f"dataset={dataset}", f"batch={batch}", "force=true"],
            env={**os.environ, "PIPELINE_LAKE": str(work / "lake")},
            capture_output=True,
            text=True,
            check=True,
        )
        result = {"secs": time.perf_counter() - started, "summary": out.stdout.strip().splitlines()[-1]}
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    else:
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--work", str(work), "--dataset", dataset, "--batch", str(batch)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["peak_rss_mb"] = rss / 1024  # the largest child so far: run in rising order
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--child")
    ap.add_argument("--work")
    ap.add_argument("--dataset", default="x1")
    args = ap.parse_args()
    if args.child:
        result = measure(Path(args.work), args.child, args.dataset, args.batch)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build(work, args)
        runs = {}
        plan = [(m, d) for d in ("x1", "x10") for m in ("forward", "collect", "cli", "cache")]
        for mode, dataset in plan:
            # Peak RSS of separate children: measure each in a fresh helper.
            out = subprocess.run(
                [sys.executable, "-c", _ONE, str(work), mode, dataset, str(args.batch), __file__],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[(mode, dataset)] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"GPT-Neo {args.layers}x{args.width}, T = {args.T}, batch {args.batch}, CPU threads {os.cpu_count()}")
        for (mode, dataset), r in runs.items():
            fwd = runs[("forward", dataset)]
            tokens = fwd["tokens"]
            rate = tokens / r["secs"]
            ratio = fwd["secs"] / r["secs"]
            # The CLI's time includes its start and loading the model; its
            # own line gives the in-stage rate.
            extra = f"  [{r['summary']}]" if "summary" in r else ""
            print(
                f"{mode:8s} {dataset:4s} {rate:10.0f} tokens/s  {ratio:5.2f}x transformers' forward  "
                f"peak RSS {r['peak_rss_mb']:7.0f} MB{extra}"
            )


# Runs one measurement in a process of its own and prints it: the peak RSS
# of its only child is then that measurement's.
_ONE = """
import importlib.util, json, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("bench", sys.argv[5])
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
print(json.dumps(bench.child(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))))
"""


if __name__ == "__main__":
    main()
