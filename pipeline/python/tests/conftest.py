"""Shared fixtures: the repository's sample data, the `pipeline` command of
the installed wheel, and a small study run twice, once by the command line
and once by `Lake.run`, on the same inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "data"
TOKENIZER = str(DATA / "tokenizer.json")

# The console script installed beside this interpreter (the wheel's).
PIPELINE = str(Path(sys.executable).parent / "pipeline")


def cli(lake: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the `pipeline` command on `lake`."""
    out = subprocess.run(
        [PIPELINE, "--lake", lake, "-q", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
    return out


def first_stories(path: Path, n: int) -> str:
    sep = "\n<|endoftext|>\n"
    return sep.join(path.read_text().split(sep)[:n]) + sep


SEEDS = (0, 1, 2)


def model_name(seed: int) -> str:
    # LLxDDDD_EEcS@K: 1 layer, width 8, 1 epoch, decay code for 0.0005, seed.
    return f"01x0008_01d{seed:02d}@0"


def study(train: str, val: str) -> List[Tuple[str, Dict[str, str]]]:
    """Every stage from text to correlations on a few dozen stories: three
    tiny models (seconds of training each)."""
    steps: List[Tuple[str, Dict[str, str]]] = [
        ("ingest", {"dataset": "small", "train": train, "validation": val}),
        ("tokenize", {"dataset": "small", "tokenizer": TOKENIZER}),
        ("pack", {"dataset": "small", "T": "32", "mode": "hf", "shards": "2", "batch": "50"}),
        ("vocab", {"dataset": "small"}),
    ]
    for seed in SEEDS:
        steps.append(
            (
                "train",
                {
                    "dataset": "small",
                    "depth": "1",
                    "width": "8",
                    "heads": "2",
                    "context": "64",
                    "epochs": "1",
                    "lr": "0.01",
                    "batch": "8",
                    "weight_decay": "0.0005",
                    "seed": str(seed),
                },
            )
        )
    names = ",".join(model_name(s) for s in SEEDS)
    steps.append(("eval", {"model": names}))
    for seed in SEEDS:
        m = model_name(seed)
        steps.append(("collect", {"model": m, "dataset": "small"}))
        steps.append(("decide", {"model": m, "dataset": "small"}))
        steps.append(("analyze", {"model": m, "dump_pairs": "topk:5"}))
    steps.append(("correlate", {"permutations": "200", "bootstrap": "50"}))
    return steps


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> Tuple[str, str]:
    d = tmp_path_factory.mktemp("inputs")
    train, val = d / "train.txt", d / "val.txt"
    train.write_text(first_stories(DATA / "tinystories_train_sample.txt", 80))
    val.write_text(first_stories(DATA / "tinystories_val_sample.txt", 30))
    return str(train), str(val)


@pytest.fixture(scope="session")
def cli_lake(tmp_path_factory, inputs) -> str:
    """The study run by the `pipeline` command, one process per stage."""
    lake = str(tmp_path_factory.mktemp("cli") / "lake")
    for stage, params in study(*inputs):
        cli(lake, "run", f"stage={stage}", *(f"{k}={v}" for k, v in params.items()))
    return lake


@pytest.fixture(scope="session")
def py_lake(tmp_path_factory, inputs):
    """The same study run in this process by `Lake.run`."""
    import linguistic_collapse as lc

    lake = lc.Lake(str(tmp_path_factory.mktemp("py") / "lake"))
    results = [lake.run(stage, quiet=True, **params) for stage, params in study(*inputs)]
    return lake, results


@pytest.fixture()
def clean_env(monkeypatch):
    """No lake or configuration from the environment or the working directory."""
    monkeypatch.delenv("PIPELINE_LAKE", raising=False)
    return monkeypatch


def env_without(*names: str) -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}
