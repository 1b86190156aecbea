"""The predict entry point: folders, lists and model URIs in, one labelled row per file out."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from ser import checks
from ser.config import EMOTIONS_4, PredictConfig
from ser.errors import SerInputError
from ser.models import finetuned
from ser.models.backbones import write_model_json
from ser.predict import errors_path, predict, windows
from ser.stages.finetune import FinetuneModule

ROOT = Path(__file__).resolve().parents[1]
PROBS = [f"prob_{c}" for c in EMOTIONS_4]
WINDOW, HOP = 1.0, 0.5  # seconds: short, so that a 3 s file has 5 windows and tests stay quick


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny exported model (untrained weights: only the plumbing is under test)."""
    root = tmp_path_factory.mktemp("predict_model")
    torch.manual_seed(0)
    module = FinetuneModule("tiny", EMOTIONS_4, [1.0] * 4)
    checkpoint = root / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir()
    torch.save({"state_dict": module.state_dict()}, checkpoint)
    write_model_json(checkpoint.parent, module.model.backbone.config)
    return finetuned.export_model(checkpoint, EMOTIONS_4, root / "model", {"test": True})


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 220 * t)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mixed rates, channels, formats and lengths, one broken file, one file not audio."""
    root = tmp_path_factory.mktemp("predict_audio")
    (root / "sub").mkdir()
    sf.write(root / "a_8k.wav", _tone(0.8, 8_000), 8_000)
    sf.write(root / "b_44k_stereo.flac", _tone(0.8, 44_100, channels=2), 44_100)
    sf.write(root / "sub" / "c_long.ogg", _tone(3.0, 16_000), 16_000)
    (root / "sub" / "broken.wav").write_bytes(b"RIFF\x00\x00not audio at all")
    (root / "notes.txt").write_text("not listed: not audio")
    return root


def _config(model: str, source: Path, output: Path, **changes: object) -> PredictConfig:
    values = {"window": WINDOW, "hop": HOP, **changes}
    return PredictConfig(model=model, input=str(source), output=str(output),
                         **values)  # type: ignore[arg-type]


def _file_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["start"].isna()] if "start" in frame else frame


def test_windows_cover_every_sample() -> None:
    assert windows(48_000, 1.0, 0.5) == [(s, s + 16_000) for s in range(0, 32_001, 8_000)]
    assert windows(40_000, 1.0, 1.0) == [(0, 16_000), (16_000, 32_000), (24_000, 40_000)]
    assert windows(10_000, 1.0, 0.5) == [(0, 10_000)]
    assert windows(480_000, 0.0, 5.0) == [(0, 480_000)]


def test_folder_of_mixed_audio_with_window_rows(
    model_dir: Path, audio_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output = tmp_path / "out" / "labels.csv"
    with caplog.at_level(logging.INFO, logger="ser.predict"):
        predict(_config(str(model_dir), audio_dir, output, per_window=True))
    frame = pd.read_csv(output)
    assert list(frame.columns) == ["path", "label", *PROBS, "start", "end"]
    files = _file_rows(frame)
    names = sorted(Path(p).name for p in files["path"])
    assert names == ["a_8k.wav", "b_44k_stereo.flac", "c_long.ogg"]
    assert set(frame["label"]) <= set(EMOTIONS_4)
    np.testing.assert_allclose(frame[PROBS].sum(axis=1), 1.0, atol=1e-5)
    long_rows = frame[frame["path"].str.endswith("c_long.ogg")]
    window_rows = long_rows[long_rows["start"].notna()]
    assert list(window_rows["start"]) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert list(window_rows["end"]) == [1.0, 1.5, 2.0, 2.5, 3.0]
    file_row = long_rows[long_rows["start"].isna()].iloc[0]
    np.testing.assert_allclose(file_row[PROBS].to_numpy(float),
                               window_rows[PROBS].mean().to_numpy(float), atol=1e-6)
    assert file_row["label"] == EMOTIONS_4[int(np.argmax(file_row[PROBS].to_numpy(float)))]
    assert len(frame) == 3 + 5 + 2  # short files: one window each, written as a window row too
    errors = errors_path(output).read_text().splitlines()
    assert len(errors) == 1 and errors[0].startswith(str(audio_dir / "sub" / "broken.wav"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 file(s)" in warnings[0] and "broken.wav" in warnings[0]
    assert caplog.records[-1].getMessage() == f"predict: scored 3 of 4 file(s) into {output}"
    assert sorted(p.name for p in output.parent.iterdir()) == ["labels.csv",
                                                              "labels.csv.errors.txt"]


def test_whole_files_and_a_rerun_without_errors_drops_the_old_list(
    model_dir: Path, audio_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "labels.jsonl"
    predict(_config(str(model_dir), audio_dir, output, window=0.0))
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"path", "label", *PROBS}
    good = tmp_path / "good.csv"
    good.write_text("path\n" + "\n".join(str(audio_dir / n) for n in ("a_8k.wav",)) + "\n")
    predict(_config(str(model_dir), good, output))
    assert not errors_path(output).exists()


def test_csv_and_wav_scp_inputs(model_dir: Path, audio_dir: Path, tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    listed = pd.DataFrame({"path": [os.path.relpath(audio_dir / "a_8k.wav", lists),
                                    str(audio_dir / "sub" / "c_long.ogg"), "missing.wav"],
                           "speaker": ["s1", "s2", "s3"]})
    listed.to_csv(lists / "files.csv", index=False)
    predict(_config(str(model_dir), lists / "files.csv", tmp_path / "from_csv.csv"))
    frame = pd.read_csv(tmp_path / "from_csv.csv")
    assert list(frame["path"]) == list(listed["path"][:2])
    assert errors_path(tmp_path / "from_csv.csv").read_text().startswith("missing.wav\t")

    scp = lists / "wav.scp"
    scp.write_text(f"utt1 {audio_dir / 'b_44k_stereo.flac'}\n\nutt2 ../{audio_dir.name}/x.wav\n")
    predict(_config(str(model_dir), scp, tmp_path / "from_scp.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "from_scp.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["utt1"]
    assert math.isclose(sum(rows[0][p] for p in PROBS), 1.0, abs_tol=1e-5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"output": "labels.txt"}, "output='labels.txt' must end in .csv or .jsonl"),
        ({"input": "nowhere"}, "input=nowhere: no such file or folder"),
        ({"model": "nowhere"}, "model=nowhere: no such directory"),
        ({"hop": 20.0}, "hop=20.0 must be in (0.0, 10.0]"),
        ({"input": "piped.scp"}, "input=piped.scp line 1: piped commands are not run"),
        ({"model": "runs:/0123456789abcdef/model"}, "model=runs:/0123456789abcdef/model: cannot"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_before_any_work(
    changes: dict[str, object], message: str, model_dir: Path, audio_dir: Path,
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("piped.scp").write_text("utt1 sox in.wav -t wav - |\n")
    fields = {"model": str(model_dir), "input": str(audio_dir), "output": "labels.csv", **changes}
    with pytest.raises(SerInputError) as caught:
        predict(PredictConfig(**fields))  # type: ignore[arg-type]
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert not Path("labels.csv").exists()
    assert isinstance(caught.value, checks.ConfigError) == (changes.keys() <= {"output", "hop"})


def test_entry_point_exits_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "entrypoints" / "predict.py"), "--model", "x/1",
         "--input", str(tmp_path / "none"), "--output", str(tmp_path / "out.csv")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: predict: input={tmp_path / 'none'}: no such file or folder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_logged_and_registered_model_uris(
    model_dir: Path, audio_dir: Path, tmp_path: Path, tracking_uri: str
) -> None:
    import mlflow

    from ser.serving import log_model

    with mlflow.start_run() as run:
        model_uri = log_model(model_dir, list(EMOTIONS_4), register_as="ser-predict-test")
    mlflow.MlflowClient().set_registered_model_alias("ser-predict-test", "best", "1")
    local = pd.read_csv(predict(_config(str(model_dir), audio_dir, tmp_path / "local.csv")))
    for uri in (model_uri, f"runs:/{run.info.run_id}/model", "ser-predict-test/1",
                "models:/ser-predict-test@best"):
        output = tmp_path / f"{uri.replace('/', '_').replace(':', '_')}.csv"
        frame = pd.read_csv(predict(_config(uri, audio_dir, output)))
        pd.testing.assert_frame_equal(frame, local, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
