#!/usr/bin/env bash
# The Python package's tests (README's test command runs this after cargo's):
# build the wheel with the workspace's dev profile into the same target
# directory as cargo (only pyo3 and the module itself compile anew), install
# it into a virtual environment outside the repository, run pytest on it.
#
#   LC_VENV   the environment (default ~/.cache/lc-venv; made when missing)
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${LC_VENV:-$HOME/.cache/lc-venv}"
if [ ! -x "$venv/bin/python" ]; then
    echo "making the test environment $venv"
    python3 -m venv "$venv"
fi
# What the tests need; pip leaves satisfied requirements alone. torch (the
# tensors ClassStats takes; PyPI's build brings a few GB of CUDA libraries,
# installed once), transformers and polars (an independent Parquet reader
# of the lake's tables) are for the tests only: the package needs none.
if ! "$venv/bin/python" -c "import maturin, pytest, pyarrow, numpy, pandas, polars, tqdm, torch, transformers" 2>/dev/null; then
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q "maturin>=1.9,<2" pytest "pyarrow>=14" numpy pandas polars tqdm torch transformers
fi

wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
"$venv/bin/maturin" build --profile dev -m pipeline/python/Cargo.toml -o "$wheels" --quiet
wheel="$(ls "$wheels"/*.whl)"
echo "wheel: $(basename "$wheel") ($(du -m "$wheel" | cut -f1) MB)"
"$venv/bin/pip" install -q --force-reinstall --no-deps "$wheel"

# pytest exits 5 when it collected no tests: that fails here too.
LC_WHEEL="$wheel" "$venv/bin/python" -m pytest -q pipeline/python/tests
