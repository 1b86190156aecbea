"""The data entry points as users call them: console scripts and `mlflow run`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **env}
    return subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True)


def _demo_corpus(out: Path, layout: Path) -> list[str]:
    return [
        "ser-demo-corpus", "--output_dir", str(out), "--num_speakers", "3",
        "--utterances_per_class", "1", "--iemocap_layout_dir", str(layout),
    ]  # fmt: skip


def _prepare(layout: Path, out: Path) -> list[str]:
    return ["ser-prepare-iemocap", "--iemocap_dir", str(layout), "--output_dir", str(out)]


def test_console_scripts_write_corpus_then_prepare_its_iemocap_layout(tmp_path: Path) -> None:
    layout = tmp_path / "IEMOCAP_full_release"
    result = _run(_demo_corpus(tmp_path / "demo", layout), tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "demo" / "labels").glob("*.json"))) == 3
    result = _run(_prepare(layout, tmp_path / "iem"), tmp_path)
    assert result.returncode == 0, result.stderr
    folds = sorted((tmp_path / "iem" / "labels_sess").glob("label_*.json"))
    assert [f.name for f in folds] == ["label_1.json", "label_2.json"]
    fold = json.loads(folds[0].read_text())
    assert all(name.startswith("Ses01") for name in fold["Test"])
    assert fold["Val"] == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ser-demo-corpus", "--num_speakers", "2"], "num_speakers"),
        (["ser-demo-corpus", "--min_seconds", "5", "--max_seconds", "2"], "min_seconds"),
        (["ser-prepare-iemocap", "--iemocap_dir", "nowhere", "--output_dir", "out"], "nowhere"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path: Path, args: list[str], message: str) -> None:
    result = _run(args, tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_prepare_refuses_a_broken_release_and_keeps_earlier_output(tmp_path: Path) -> None:
    layout = tmp_path / "release"
    assert _run(_demo_corpus(tmp_path / "demo", layout), tmp_path).returncode == 0
    out = tmp_path / "prepared"
    cmd = _prepare(layout, out)
    assert _run(cmd, tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    shutil.rmtree(layout / "Session2" / "dialog")
    result = _run(cmd, tmp_path)
    assert result.returncode == 2 and "EmoEvaluation" in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_mlflow_run_demo_corpus(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = _run(
        [
            "mlflow", "run", str(ROOT), "--env-manager", "local", "-e", "demo_corpus",
            "-P", f"output_dir={out}", "-P", "num_speakers=3", "-P", "utterances_per_class=1",
        ],
        tmp_path,
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((out / "Audio_16k").glob("*.wav"))) == 12
