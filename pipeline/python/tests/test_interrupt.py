"""Ctrl-C during a stage: KeyboardInterrupt, a sound lake, and a second run
that finishes the work."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import linguistic_collapse as lc

from conftest import cli

TRAIN = {
    "dataset": "small",
    "name": "slow",
    "depth": "2",
    "width": "32",
    "heads": "2",
    "context": "64",
    "epochs": "8",
    "lr": "0.01",
    "batch": "4",
    "save_every": "5",
}


def prepared_lake(tmp_path, inputs) -> lc.Lake:
    lake = lc.Lake(tmp_path / "lake")
    train, val = inputs
    lake.run("ingest", quiet=True, dataset="small", train=train, validation=val)
    lake.run("tokenize", quiet=True, dataset="small", tokenizer="gpt2")
    lake.run("pack", quiet=True, dataset="small", T=32, mode="hf", shards=2, batch=50)
    return lake


def test_keyboard_interrupt_stops_a_stage_cleanly(tmp_path, inputs):
    lake = prepared_lake(tmp_path, inputs)
    # A real SIGINT from another thread, as a terminal's Ctrl-C or a
    # notebook's interrupt button delivers it.
    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            lake.run("train", quiet=True, **TRAIN)
    finally:
        timer.cancel()
    stopped = time.monotonic() - started
    # Training takes far longer; the stop came at the next batch.
    assert stopped < 10, stopped
    lake_dir = lake.url.removeprefix("file://")
    assert cli(lake_dir, "verify", check=False).returncode == 0
    assert lake.verify().ok
    # Nothing was recorded as a failure, and no model was committed.
    assert "failed" not in cli(lake_dir, "status").stdout
    assert lake.sql("SELECT count(*) AS n FROM train_log WHERE model LIKE 'slow%'").column("n")[0].as_py() == 0

    # The second run resumes from the last saved state and finishes.
    done = lake.run("train", quiet=True, **TRAIN)
    assert "resum" in done.summary.lower() or done.written.num_rows > 0
    logged = lake.sql("SELECT max(epoch) AS e FROM train_log WHERE model LIKE 'slow%'")
    assert logged.column("e")[0].as_py() is not None
    assert lake.verify().ok


def test_the_gil_is_free_while_a_stage_works(tmp_path, inputs):
    lake = prepared_lake(tmp_path, inputs)
    ticks = 0
    done = threading.Event()

    def count():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    started = time.monotonic()
    try:
        lake.run("vocab", quiet=True, dataset="small")
        lake.run("train", quiet=True, **{**TRAIN, "epochs": "1", "name": "quick"})
    finally:
        done.set()
        counter.join()
    elapsed = time.monotonic() - started
    # A thread that holds the GIL for the whole stage would leave ~0 ticks.
    assert elapsed > 0.5 and ticks > 0.3 * elapsed * 1000 / 2, (ticks, elapsed)


def test_progress_reaches_the_python_callback(tmp_path, inputs):
    """The engine's bars arrive about ten times a second as (id, message,
    position, length, unit, finished); positions only grow."""
    lake = prepared_lake(tmp_path, inputs)
    seen = []
    params = {**TRAIN, "epochs": "2", "name": "watched"}
    lake._native.run_stage("train", params, lambda bars: seen.extend(bars))
    train = [s for s in seen if s[4] == "tok" and "watched" in s[1]]
    assert len(train) >= 3, seen
    positions = [s[2] for s in train]
    assert positions == sorted(positions) and positions[-1] > positions[0]
    # The bar counts training tokens: 2 epochs of ceil(chunks / 4) steps of
    # 4 chunks of 32 tokens (the last batch of an epoch may be short).
    chunks = lake.sql(
        "SELECT count(*) AS n FROM chunks WHERE dataset = 'small' AND split = 'train'"
    ).column("n")[0].as_py()
    assert train[-1][3] == 2 * -(-chunks // 4) * 4 * 32
