"""The lake: SQL over its tables, and the stages that write them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

from . import _native
from ._progress import Bars

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["Lake", "RunResult", "Stage", "VerifyReport", "stages"]


def _pa():
    """pyarrow, imported on first use: the `pipeline` command and a plain
    `import linguistic_collapse` do not pay for it."""
    import pyarrow

    return pyarrow

def _param_text(key: str, value: Any) -> str:
    """A parameter as the command line spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return ",".join(_param_text(key, v) for v in value)
    raise ValueError(
        f"parameter {key}={value!r}: expected a string, number, bool, path or list of them"
    )


def _sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_literal(column: str, value: Any, typ: pa.DataType) -> str:
    """`value` as an SQL literal comparable with a column of type `typ`."""
    pa = _pa()
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ):
        return "'" + str(value).replace("'", "''") + "'"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise ValueError(f"{column}={value!r}: expected a string, number or bool")


@dataclass(frozen=True)
class Stage:
    """A stage as ``pipeline stages`` lists it."""

    name: str
    about: str
    reads: str
    writes: str
    #: key -> (default, or None when required; doc)
    params: Dict[str, Tuple[Optional[str], str]]


def stages() -> List[Stage]:
    """Every stage, in pipeline order, with its parameters and defaults."""
    return [
        Stage(name, about, reads, writes, {k: (d, doc) for k, d, doc in params})
        for name, about, reads, writes, params in _native.stages()
    ]


@dataclass
class RunResult:
    """What one stage run did: its summary and the artifacts it committed."""

    stage: str
    summary: str
    #: One row per committed artifact: table, partition, rows, bytes, artifact.
    written: pa.Table
    #: The committed artifacts' manifests (inputs, parameters, hashes).
    manifests: List[Dict[str, Any]] = field(repr=False)

    def __str__(self) -> str:
        return self.summary


@dataclass
class VerifyReport:
    """The result of :meth:`Lake.verify`; ``str()`` is what ``pipeline verify`` prints."""

    checked: int
    bytes: int
    #: kind (damaged | orphaned | incomplete | upload), path, detail.
    findings: pa.Table
    text: str = field(repr=False)

    @property
    def damaged(self) -> int:
        return sum(1 for k in self.findings.column("kind").to_pylist() if k == "damaged")

    @property
    def ok(self) -> bool:
        """No artifact is damaged."""
        return self.damaged == 0

    def __str__(self) -> str:
        return self.text


class Lake:
    """A results lake: a local directory or ``s3://bucket/prefix``.

    Resolved as the ``pipeline`` command resolves it: ``url``, else the
    ``PIPELINE_LAKE`` environment variable, else ``lake =`` in the
    configuration file (``config``, else ``./pipeline.toml`` when it exists),
    else ``./lake``. S3 credentials and endpoint come from the usual ``AWS_*``
    variables. The configuration's ``[defaults]`` and ``[stages.NAME]``
    tables apply to :meth:`run` as they apply on the command line.
    """

    def __init__(
        self, url: Optional[Union[str, os.PathLike]] = None, config: Optional[Union[str, os.PathLike]] = None
    ) -> None:
        _native.init_logging("warn")
        self._native = _native.Lake(
            None if url is None else os.fspath(url),
            None if config is None else os.fspath(config),
        )

    @property
    def url(self) -> str:
        """The normalised URL (``file:///abs/path`` or ``s3://bucket/prefix``)."""
        return self._native.url

    def __repr__(self) -> str:
        return f"Lake({self.url!r})"

    def sql(
        self,
        query: str,
        memory_limit: Union[int, str, None] = None,
        timeout: Optional[float] = None,
    ) -> pa.Table:
        """Run one read-only SQL statement over the lake's tables and views.

        The same tables, views (``model_metrics``, ...) and aggregate
        functions as ``pipeline sql``. ``memory_limit`` (bytes or ``"2G"``;
        default half the machine's memory) bounds what sorts, joins and
        aggregations hold before spilling or failing with ``MemoryError``;
        ``timeout`` (seconds) stops the query with ``TimeoutError``. A
        malformed query or a write raises ``ValueError`` with DataFusion's
        message. Ctrl-C stops the query.
        """
        if not isinstance(query, str):
            raise TypeError(f"query: expected a string, got {type(query).__name__}")
        # Sizes and the timeout are checked by the engine, as for `pipeline sql`.
        size = None if memory_limit is None else str(memory_limit)
        return self._native.sql(query, size, timeout)

    def tables(self) -> List[str]:
        """The names of every table and view, sorted."""
        t = self.sql(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' ORDER BY table_name"
        )
        return t.column("table_name").to_pylist()

    def table(self, name: str, **filters: Any) -> pa.Table:
        """A table or view, optionally only where columns equal values.

        ``lake.table("class_stats", model="02x0768_01d05@0", layer=3)``
        selects those partitions. A value may be a list (any of them) or
        ``None`` (SQL NULL). Unknown tables and columns raise ``ValueError``
        listing the valid ones.
        """
        names = self.tables()
        if name not in names:
            raise ValueError(f"unknown table '{name}'; tables and views: {', '.join(names)}")
        schema = self.sql(f"SELECT * FROM {_sql_ident(name)} LIMIT 0").schema
        conditions = []
        for column, value in filters.items():
            if column not in schema.names:
                raise ValueError(
                    f"table {name} has no column '{column}'; columns: {', '.join(schema.names)}"
                )
            typ = schema.field(column).type
            ident = _sql_ident(column)
            if value is None:
                conditions.append(f"{ident} IS NULL")
            elif isinstance(value, (list, tuple, set, frozenset)):
                if not value:
                    raise ValueError(f"{column}=[]: give at least one value")
                items = ", ".join(_sql_literal(column, v, typ) for v in value)
                conditions.append(f"{ident} IN ({items})")
            else:
                conditions.append(f"{ident} = {_sql_literal(column, value, typ)}")
        query = f"SELECT * FROM {_sql_ident(name)}"
        if conditions:
            query += " WHERE " + " AND ".join(conditions)
        return self.sql(query)

    def status(self) -> pa.Table:
        """Every committed artifact: table, partition, rows, bytes, stage, created."""
        pa = _pa()
        rows = self._native.status()
        cols = list(zip(*rows)) if rows else [[]] * 6
        return pa.table(
            {
                "table": pa.array(cols[0], pa.string()),
                "partition": pa.array(cols[1], pa.string()),
                "rows": pa.array(cols[2], pa.int64()),
                "bytes": pa.array(cols[3], pa.int64()),
                "stage": pa.array(cols[4], pa.string()),
                "created": pa.array(cols[5], pa.string()),
            }
        )

    def verify(self, table: Optional[str] = None) -> VerifyReport:
        """Check every artifact (or one table's) against its recorded hashes.

        Never raises for damage: the report lists it (``report.ok`` is
        False); ``DamagedArtifactError`` is what reading a damaged artifact
        raises.
        """
        pa = _pa()
        checked, nbytes, findings, text = self._native.verify(table)
        cols = list(zip(*findings)) if findings else [[]] * 3
        found = pa.table(
            {
                "kind": pa.array(cols[0], pa.string()),
                "path": pa.array(cols[1], pa.string()),
                "detail": pa.array(cols[2], pa.string()),
            }
        )
        return VerifyReport(checked, nbytes, found, text)

    def run(self, stage: str, *, quiet: bool = False, **params: Any) -> RunResult:
        """Run one stage in this process, as ``pipeline run stage=NAME key=value ...``.

        The command line's semantics: parameters checked against the stage's
        declared keys (``ValueError`` lists the valid ones) and filled from
        the configuration file and the stage's defaults; finished work is up
        to date and skipped; interrupted work resumes; one worker at a time
        per stage and parameters. Values may be strings, numbers, bools,
        paths or lists (``layers=[0, 3]``).

        Progress shows as bars (tqdm when installed; none with
        ``quiet=True``). The GIL is released while the stage works. Ctrl-C
        (KeyboardInterrupt) stops it at its next checkpoint: nothing half
        written is left, and running it again finishes the work.
        """
        if not isinstance(stage, str):
            raise TypeError(f"stage: expected a string, got {type(stage).__name__}")
        texts = {k: _param_text(k, v) for k, v in params.items()}
        bars = None if quiet else Bars()
        try:
            summary, manifests = self._native.run_stage(stage, texts, bars)
        finally:
            if bars is not None:
                bars.close()
        return RunResult(stage, summary, _written(manifests), manifests)


def as_lake(lake: Union["Lake", str, os.PathLike]) -> "Lake":
    """A ``Lake``, or the lake at a URL or path."""
    if isinstance(lake, Lake):
        return lake
    if isinstance(lake, (str, os.PathLike)):
        return Lake(lake)
    raise TypeError(f"lake: expected a linguistic_collapse.Lake or its URL, got {type(lake).__name__}")


def _written(manifests: Sequence[Dict[str, Any]]) -> pa.Table:
    pa = _pa()
    def partition(m: Dict[str, Any]) -> str:
        return "/".join(f"{k}={v}" for k, v in m.get("partition", {}).items())

    return pa.table(
        {
            "table": pa.array([m["table"] for m in manifests], pa.string()),
            "partition": pa.array([partition(m) for m in manifests], pa.string()),
            "rows": pa.array([m["rows"] for m in manifests], pa.int64()),
            "bytes": pa.array([m["bytes"] for m in manifests], pa.int64()),
            "artifact": pa.array([m["artifact"] for m in manifests], pa.string()),
        }
    )
