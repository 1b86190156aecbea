from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import pytest

from ser.compare import compare
from ser.config import CompareConfig
from ser.errors import SerInputError


def _method_run(method: str, ua: float, wa: float, stage: str = "") -> str:
    with mlflow.start_run() as run:
        mlflow.set_tags({"ser.method": method, "ser.stage": stage or method})
        mlflow.log_metrics(
            {"test_UA_mean": ua, "test_UA_std": 1.5, "test_WA_mean": wa, "test_WA_std": 2.0,
             "test_F1_mean": ua - 1, "test_F1_std": 0.5}
        )  # fmt: skip
    return run.info.run_id


def test_newest_run_per_method_in_method_order(tracking_uri: str, tmp_path: Path) -> None:
    _method_run("ptapt", 60.0, 61.0)
    old_vft = _method_run("vft", 40.0, 41.0)
    new_vft = _method_run("vft", 50.0, 52.0)
    _method_run("tapt", 55.0, 56.0)
    _method_run("tapt", 99.0, 99.0, stage="finetune")  # a method's child run: not compared
    result = compare(CompareConfig(output_dir=str(tmp_path / "cmp")))
    assert [r.method for r in result.rows] == ["vft", "tapt", "ptapt"]
    assert result.rows[0].run_id == new_vft != old_vft
    table = result.markdown.read_text()
    assert "| vft | " in table and "50.0 ± 1.5 | 52.0 ± 2.0 | 49.0 ± 0.5" in table
    rows = list(csv.DictReader(result.csv.open()))
    assert [float(r["UA_mean"]) for r in rows] == [50.0, 55.0, 60.0]
    assert result.chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explicit_runs_and_errors(tracking_uri: str, tmp_path: Path) -> None:
    chosen = _method_run("tapt", 70.0, 71.0)
    result = compare(CompareConfig(runs=chosen, output_dir=str(tmp_path / "c")))
    assert [r.run_id for r in result.rows] == [chosen]
    with mlflow.start_run() as stage:
        mlflow.set_tag("ser.stage", "cluster")
    with pytest.raises(SerInputError, match="has no test_UA_mean"):
        compare(CompareConfig(runs=stage.info.run_id, output_dir=str(tmp_path / "c")))
    with pytest.raises(SerInputError, match="no experiment named 'nope'"):
        compare(CompareConfig(experiment_name="nope", output_dir=str(tmp_path / "c")))


def test_no_method_runs_says_what_to_run(tracking_uri: str, tmp_path: Path) -> None:
    with pytest.raises(SerInputError, match="mlflow run . -e vft"):
        compare(CompareConfig(output_dir=str(tmp_path / "c")))
