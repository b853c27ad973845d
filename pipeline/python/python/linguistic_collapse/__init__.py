"""Neural collapse in causal language models, from Python.

The pipeline's engine (written in Rust) in process: a results lake of
Parquet tables, DataFusion SQL over it, and every stage of the study::

    import linguistic_collapse as lc

    lake = lc.Lake("lake")                      # or s3://bucket/prefix
    lake.run("all")                             # the study in experiments/quickstart.toml
    metrics = lake.sql("SELECT * FROM model_metrics").to_pandas()

Results are ``pyarrow.Table`` objects that cross from Rust through the Arrow
C stream interface (``__arrow_c_stream__``) without copying; pandas
(``.to_pandas()``), polars (``polars.from_arrow``) and duckdb (a query over
the variable) read them directly.

Hidden states computed elsewhere (a forward hook, a training loop) enter
through ``ClassStats``: numpy arrays or torch tensors on any device, reduced
with the engine's f64 arithmetic and written to the lake as ``collect``
writes them (``ClassStats.write``), with ``write_classifier`` for NC3.
"""

from ._native import DamagedArtifactError, PipelineError, __version__
from ._lake import Lake, RunResult, Stage, VerifyReport, stages
from ._stats import ClassStats, write_classifier
from ._hf import collect, decide, evaluate

__all__ = [
    "ClassStats",
    "collect",
    "decide",
    "evaluate",
    "Lake",
    "RunResult",
    "Stage",
    "VerifyReport",
    "stages",
    "write_classifier",
    "PipelineError",
    "DamagedArtifactError",
    "__version__",
]
