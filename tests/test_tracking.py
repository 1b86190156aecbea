from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from ser import tracking
from ser.errors import SerInputError


def _corpus(tmp_path: Path) -> tuple[Path, Path]:
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "a.wav").write_bytes(b"aaaa")
    (audio / "b.wav").write_bytes(b"bbbb")
    label = tmp_path / "fold_1.json"
    label.write_text(json.dumps({"Train": {"a.wav": "sad"}, "Val": {}, "Test": {"b.wav": "sad"}}))
    return audio, label


def test_data_fingerprint_follows_audio_and_label_contents(tmp_path: Path) -> None:
    audio, label = _corpus(tmp_path)
    first = tracking.data_fingerprint(str(audio), [label])
    assert tracking.data_fingerprint(str(audio), [label]) == first
    (audio / "b.wav").write_bytes(b"bbbc")
    second = tracking.data_fingerprint(str(audio), [label])
    assert second != first
    label.write_text(json.dumps({"Train": {"a.wav": "happy"}, "Test": {"b.wav": "sad"}}))
    assert tracking.data_fingerprint(str(audio), [label]) not in {first, second}


def test_reuse_key_ignores_where_and_how_fast() -> None:
    base = {"lr": 1e-4, "num_clusters": (8, 32), "output_dir": "a", "num_workers": 0}
    moved = {**base, "output_dir": "b", "num_workers": 4}
    assert tracking.reuse_key("cluster", base, "fp") == tracking.reuse_key("cluster", moved, "fp")
    assert tracking.reuse_key("cluster", base, "fp") != tracking.reuse_key("cluster", base, "fp2")
    changed = {**base, "num_clusters": (8, 64)}
    assert tracking.reuse_key("cluster", base, "fp") != tracking.reuse_key("cluster", changed, "fp")
    assert tracking.reuse_key("cluster", base, "fp") != tracking.reuse_key("finetune", base, "fp")


def test_only_complete_finished_runs_are_reused(tracking_uri: str) -> None:
    assert tracking_uri.startswith("sqlite")
    with mlflow.start_run() as failed:
        mlflow.set_tags({"ser.stage": "cluster", "ser.reuse_key": "k1"})
    mlflow.MlflowClient().set_terminated(failed.info.run_id, "FAILED")
    with mlflow.start_run():  # finished, but died before marking itself complete
        mlflow.set_tags({"ser.stage": "cluster", "ser.reuse_key": "k1"})
    assert tracking.find_reusable("cluster", "k1") is None
    with mlflow.start_run() as done:
        mlflow.set_tags({"ser.stage": "cluster", "ser.reuse_key": "k1"})
        tracking.mark_complete(done.info.run_id)
    found = tracking.find_reusable("cluster", "k1")
    assert found is not None and found.info.run_id == done.info.run_id
    assert tracking.find_reusable("cluster", "k2") is None
    assert tracking.find_reusable("finetune", "k1") is None


def test_resolve_input_downloads_run_artifacts_once_into_the_cache(
    tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "made"
    (source / "fold_1").mkdir(parents=True)
    (source / "fold_1" / "clusters.json").write_text("{}")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(source), artifact_path="out")
    local = tracking.resolve_input(f"runs:/{run.info.run_id}/out", "clusterpath")
    assert (Path(local) / "fold_1" / "clusters.json").read_text() == "{}"
    assert tracking.resolve_input("plain/path", "x") == "plain/path"
    with pytest.raises(SerInputError, match="clusterpath=runs:/0123"):
        tracking.resolve_input("runs:/0123/out", "clusterpath")

    cache = tmp_path / "outputs" / ".inputs"
    uri = f"runs:/{run.info.run_id}/out"
    cached = Path(tracking.resolve_input(uri, "clusterpath", cache))
    assert cached == cache / "runs" / run.info.run_id / "out"
    assert (cached / "fold_1" / "clusters.json").read_text() == "{}"
    assert sorted(p.name for p in cached.parent.iterdir()) == ["out"]  # nothing half-written

    def no_download(*args: object) -> str:
        raise AssertionError("downloaded again")

    monkeypatch.setattr(tracking, "_download", no_download)
    assert Path(tracking.resolve_input(uri, "clusterpath", cache)) == cached


def test_stage_logger_never_ends_the_stage_run(tracking_uri: str) -> None:
    with mlflow.start_run() as run:
        logger = tracking.stage_logger(run.info.run_id, "fold_1")
        logger.log_metrics({"loss": 1.5}, step=3)
        logger.finalize("success")
        assert mlflow.get_run(run.info.run_id).info.status == "RUNNING"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "fold_1-loss")
    assert [(m.value, m.step) for m in history] == [(1.5, 3)]


def test_runs_nested_under_an_mlflow_run_entry_point_are_children(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mlflow.start_run() as made_by_mlflow_run:
        pass
    monkeypatch.setenv("MLFLOW_RUN_ID", made_by_mlflow_run.info.run_id)
    with (
        tracking.stage_run("ptapt", {}, nested=False) as parent,
        tracking.stage_run("cluster", {}, nested=True) as child,
    ):
        pass
    assert parent.info.run_id == made_by_mlflow_run.info.run_id
    assert child.info.run_id != parent.info.run_id
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert mlflow.get_run(parent.info.run_id).data.tags["ser.stage"] == "ptapt"


def test_a_value_the_run_used_beside_the_one_mlflow_run_logged_goes_to_a_tag(
    tracking_uri: str,
) -> None:
    with mlflow.start_run() as run:
        mlflow.log_params({"lr": "0.001", "datadir": "'data/x'"})  # as `mlflow run` logs them
        tracking.log_params({"lr": 1e-4, "datadir": "data/x", "num_exps": 5})
    logged = mlflow.get_run(run.info.run_id).data
    assert logged.params == {"lr": "0.001", "datadir": "'data/x'", "num_exps": "5"}
    resolved = {k: v for k, v in logged.tags.items() if k.startswith("ser.resolved.")}
    assert resolved == {"ser.resolved.lr": "0.0001"}  # the quoted datadir is the same value
