"""The wheel in a fresh virtual environment with no Rust toolchain on PATH:
the `pipeline` command and the import work from the wheel alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

WHEEL = os.environ.get("LC_WHEEL")


@pytest.mark.skipif(not WHEEL, reason="LC_WHEEL (the built wheel) is set by scripts/python-tests.sh")
def test_wheel_works_without_cargo(tmp_path):
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True, symlinks=True).create(env_dir)
    bin_dir = env_dir / "bin"
    # No cargo or rustc on PATH: only the new environment and the system's.
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    for tool in ("cargo", "rustc"):
        assert shutil.which(tool, path=path) is None, f"{tool} is on {path}"
    env = {"PATH": path, "HOME": str(tmp_path), "PIP_NO_INDEX": "1"}
    # Its dependencies (pyarrow, numpy) are left out: neither the import nor
    # the command needs them until a table is returned.
    subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", WHEEL],
        check=True, env=env,
    )
    help_text = subprocess.run(
        ["pipeline", "--help"], check=True, env=env, capture_output=True, text=True
    ).stdout
    assert "Measure neural collapse" in help_text and "run" in help_text
    version = subprocess.run(
        ["python", "-c", "import linguistic_collapse as lc; print(lc.__version__, lc.Lake)"],
        check=True, env=env, capture_output=True, text=True,
    ).stdout
    assert version.startswith("0.")
    # The command does real work there: ingest the shipped sample.
    repo = Path(__file__).resolve().parents[3]
    lake = tmp_path / "lake"
    subprocess.run(
        ["pipeline", "--lake", str(lake), "-q", "run", "stage=ingest", "dataset=s",
         f"train={repo / 'data/tinystories_train_sample.txt'}",
         f"validation={repo / 'data/tinystories_val_sample.txt'}"],
        check=True, env=env,
    )
    assert any(lake.glob("documents/dataset=s/split=train/*.parquet"))
    # Bad usage exits 2, as clap's errors do, without a traceback.
    bad = subprocess.run(["pipeline", "frobnicate"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
