"""Each mistake raises the exception a researcher would catch, naming what
was wrong; none aborts the interpreter."""

from __future__ import annotations

import shutil

import pytest

import linguistic_collapse as lc

from conftest import cli


def test_bad_query_is_a_value_error_with_datafusion_message(cli_lake):
    lake = lc.Lake(cli_lake)
    with pytest.raises(ValueError, match="(?i)no_such_table.*not found|table.*no_such_table"):
        lake.sql("SELECT * FROM no_such_table")
    with pytest.raises(ValueError, match="(?i)sql parser error|expected"):
        lake.sql("SELEC 1")


def test_writes_are_refused(cli_lake):
    with pytest.raises(ValueError, match="read-only"):
        lc.Lake(cli_lake).sql("CREATE TABLE t AS SELECT 1")


def test_query_limits(cli_lake):
    lake = lc.Lake(cli_lake)
    with pytest.raises(ValueError, match="memory_limit"):
        lake.sql("SELECT 1", memory_limit="lots")
    with pytest.raises(ValueError, match="timeout"):
        lake.sql("SELECT 1", timeout=-1)
    # A sort of the whole tokens table cannot fit in 64 KiB.
    with pytest.raises(MemoryError, match="memory limit"):
        lake.sql(
            "SELECT * FROM class_stats ORDER BY class_id, model, layer",
            memory_limit=64 << 10,
        )


def test_unknown_stage_and_parameter_list_the_valid_ones(tmp_path):
    lake = lc.Lake(tmp_path / "lake")
    with pytest.raises(ValueError, match="unknown stage 'injest'; stages: ingest, tokenize"):
        lake.run("injest")
    with pytest.raises(ValueError, match="parameter shuffle: unknown; valid keys: .*dataset"):
        lake.run("pack", shuffle=True)
    with pytest.raises(ValueError, match="T"):
        lake.run("pack", T="many")


def test_missing_lake_and_input_files(tmp_path):
    missing = lc.Lake(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        missing.sql("SELECT 1")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        missing.status()
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        missing.run("ingest", train=tmp_path / "absent.txt", validation=tmp_path / "absent.txt")
    with pytest.raises(FileNotFoundError, match="no-config.toml"):
        lc.Lake(config=tmp_path / "no-config.toml")
    # A stage whose input artifact is missing names it and the stage that makes it.
    lake = lc.Lake(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="documents"):
        lake.run("tokenize", dataset="none", tokenizer="gpt2")


def test_damaged_artifact_names_the_file(cli_lake, tmp_path):
    copy = tmp_path / "lake"
    shutil.copytree(cli_lake, copy)
    part = next((copy / "class_metrics").rglob("*.parquet"))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x40
    part.write_bytes(bytes(data))
    lake = lc.Lake(copy)
    with pytest.raises(lc.DamagedArtifactError) as err:
        lake.sql("SELECT sum(norm) FROM class_metrics")
    assert part.name in str(err.value) and "damaged" in str(err.value)
    assert isinstance(err.value, lc.PipelineError)
    report = lake.verify()
    assert not report.ok and report.damaged == 1
    assert part.name in report.findings.column("path")[0].as_py()
    # The command agrees, and says so with its exit status.
    assert cli(str(copy), "verify", check=False).returncode == 1


def test_non_string_arguments_are_type_errors(tmp_path):
    lake = lc.Lake(tmp_path / "lake")
    with pytest.raises(TypeError):
        lake.sql(42)
    with pytest.raises(ValueError, match="expected a string, number"):
        lake.run("ingest", train={"a": 1})
