"""`Lake.sql`, `.table`, `.status` and `.verify` against the `pipeline`
command on the same lake: the command's JSON output is the independent
reference (another process, another output path)."""

from __future__ import annotations

import csv
import io
import math

import pyarrow as pa
import pytest

import linguistic_collapse as lc

from conftest import SEEDS, cli, model_name

# README's queries ("Exploring the lake"), on a model of this study.
MODEL = model_name(SEEDS[1])
README_QUERIES = [
    "SELECT model, val_loss, nc1_cdnv, nc2_equinorm_cov, nc3_duality_mean, nc4_agreement "
    "FROM model_metrics WHERE final_layer ORDER BY val_loss",
    "SELECT metric, r2, p_value, spearman_rho, r2_ci_low, r2_ci_high, note FROM correlations ORDER BY r2 DESC",
    f"SELECT token, count, norm FROM class_metrics WHERE model = '{MODEL}' AND analysed ORDER BY norm LIMIT 20",
    "SELECT a.token, b.token, e.value FROM pair_extremes e "
    "JOIN class_metrics a ON a.class_id = e.class_a AND a.model = e.model "
    "JOIN class_metrics b ON b.class_id = e.class_b AND b.model = e.model "
    "WHERE e.metric = 'interference' AND e.kind = 'max' ORDER BY e.rank, e.model",
    # (README's queries are over one model's results; with three models here,
    # a tie-break, e.model above and nc1_cdnv below, keeps the order fixed.)
    "SELECT layer, nc1_cdnv, nc2_equinorm_cov FROM model_metrics ORDER BY layer, nc1_cdnv",
]


def cli_rows(lake: str, query: str):
    """The command's CSV output: a header and rows of text."""
    out = cli(lake, "sql", "--format", "csv", query)
    rows = list(csv.reader(io.StringIO(out.stdout)))
    return rows[0], rows[1:]


def same_value(py, text: str) -> bool:
    if py is None:
        return text == ""
    if isinstance(py, bool):
        return text == ("true" if py else "false")
    if isinstance(py, float):
        # Both sides print f64 in the shortest form that reads back exactly.
        return (math.isnan(py) and text.lower() == "nan") or py == float(text)
    if isinstance(py, int):
        return py == int(text)
    return str(py) == text


@pytest.mark.parametrize("query", README_QUERIES)
def test_sql_returns_the_rows_of_pipeline_sql(cli_lake, query):
    table = lc.Lake(cli_lake).sql(query)
    assert isinstance(table, pa.Table)
    header, rows = cli_rows(cli_lake, query)
    assert len(header) == table.num_columns
    assert len(rows) == table.num_rows > 0
    columns = [c.to_pylist() for c in table.columns]
    for i, row in enumerate(rows):
        for j, text in enumerate(row):
            assert same_value(columns[j][i], text), (i, header[j], columns[j][i], text)


def test_table_with_partition_filters_equals_the_sql(cli_lake):
    lake = lc.Lake(cli_lake)
    picked = lake.table("class_stats", model=MODEL, layer=1, split="train")
    want = lake.sql(
        f"SELECT * FROM class_stats WHERE model = '{MODEL}' AND layer = '1' AND split = 'train'"
    )
    assert picked.num_rows == want.num_rows > 0
    key = ["class_id"]
    assert picked.sort_by([(k, "ascending") for k in key]).equals(
        want.sort_by([(k, "ascending") for k in key])
    )
    # A list selects several partitions; the whole table is the union.
    both = lake.table("class_stats", model=[model_name(s) for s in SEEDS[:2]], split="train")
    counts = lake.sql(
        "SELECT count(*) AS n FROM class_stats WHERE split = 'train' AND model IN "
        f"('{model_name(SEEDS[0])}', '{model_name(SEEDS[1])}')"
    )
    assert both.num_rows == counts.column("n")[0].as_py() > picked.num_rows


def test_table_names_unknown_tables_and_columns(cli_lake):
    lake = lc.Lake(cli_lake)
    with pytest.raises(ValueError, match="unknown table 'class_statz'.*class_stats"):
        lake.table("class_statz")
    with pytest.raises(ValueError, match="no column 'modle'.*model"):
        lake.table("class_stats", modle=MODEL)


def test_status_lists_what_pipeline_status_lists(cli_lake):
    status = lc.Lake(cli_lake).status()
    assert status.column_names == ["table", "partition", "rows", "bytes", "stage", "created"]
    text = cli(cli_lake, "status").stdout
    assert status.num_rows > 10
    for row in status.to_pylist():
        line = f"{row['table']}  "
        assert any(l.startswith(row["table"]) and row["partition"] in l and str(row["rows"]) in l
                   for l in text.splitlines()), (row, line)
    # Rows of documents equal what SQL counts.
    docs = lc.Lake(cli_lake).sql("SELECT count(*) AS n FROM documents").column("n")[0].as_py()
    listed = sum(r["rows"] for r in status.to_pylist() if r["table"] == "documents")
    assert listed == docs


def test_verify_on_a_sound_lake(cli_lake):
    report = lc.Lake(cli_lake).verify()
    assert report.ok and report.damaged == 0
    assert report.checked > 10
    assert report.findings.num_rows == 0
    assert str(report) == cli(cli_lake, "verify").stdout


def test_pandas_reads_results(cli_lake):
    table = lc.Lake(cli_lake).sql("SELECT class_id, count FROM class_stats")
    df = table.to_pandas()
    assert len(df) == table.num_rows > 0
    assert list(df.columns) == ["class_id", "count"]
