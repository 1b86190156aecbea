"""Methods and stages as tracked MLflow runs: chaining by URI, reuse, the servable model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from ser import pipelines
from ser.config import (
    ClusterConfig,
    FinetuneConfig,
    MethodConfig,
    Phase1Config,
    PtaptMethodConfig,
)
from ser.data.synthetic import DemoCorpus
from ser.errors import SerInputError
from ser.models import finetuned
from ser.stages import finetune as finetune_stage

FAST = {"max_epochs": 1, "batch_size": 4}


def _data(corpus: DemoCorpus, tmp_path: Path) -> dict[str, str]:
    return {"datadir": str(corpus.audio_dir), "labeldir": str(corpus.label_dir)}


def _runs(stage: str) -> list[mlflow.entities.Run]:
    return mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.`ser.stage` = '{stage}'",
        output_format="list",
    )  # fmt: skip


def test_vft_logs_headline_metrics_and_reuses_identical_work(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    config = MethodConfig(**_data(corpus, tmp_path), output_root=str(tmp_path / "out"), **FAST)
    first = pipelines.run_method(config)
    assert set(first) >= {f"test_{m}_{s}" for m in ("UA", "WA", "F1") for s in ("mean", "std")}
    parent = _runs("vft")[0]
    assert parent.data.tags["ser.method"] == "vft"
    assert parent.data.metrics["test_UA_mean"] == pytest.approx(first["test_UA_mean"])
    child = _runs("finetune")[0]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.params["lr"] == str(config.lr)
    assert len(child.data.tags["ser.data_fingerprint"]) == 64

    second = pipelines.run_method(config)
    assert second == first
    assert len(_runs("finetune")) == 1  # reused, not run again
    newest = max(_runs("vft"), key=lambda r: r.info.start_time)
    assert newest.data.tags["ser.reused.finetune"] == child.info.run_id

    pipelines.run_method(dataclasses.replace(config, force=True))
    assert len(_runs("finetune")) == 2


def test_a_changed_label_file_is_recomputed(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    labels = tmp_path / "labels"
    labels.mkdir()
    source = json.loads((corpus.label_dir / "fold_1.json").read_text())
    (labels / "fold_1.json").write_text(json.dumps(source))
    stage = FinetuneConfig(datadir=str(corpus.audio_dir), labeldir=str(labels), **FAST)
    first = pipelines.execute_stage("finetune", stage, output_root=str(tmp_path / "o"))
    again = pipelines.execute_stage("finetune", stage, output_root=str(tmp_path / "o"))
    assert again.reused and again.run_id == first.run_id
    moved = next(iter(source["Test"]))
    source["Train"][moved] = source["Test"].pop(moved)
    (labels / "fold_1.json").write_text(json.dumps(source))
    changed = pipelines.execute_stage("finetune", stage, output_root=str(tmp_path / "o"))
    assert not changed.reused and changed.run_id != first.run_id
    assert changed.output_dir != first.output_dir


def test_a_failed_stage_is_not_reused_and_resumes_in_place(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = FinetuneConfig(**_data(corpus, tmp_path), **FAST)
    def dies(config: FinetuneConfig, context: object) -> None:
        raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        dying = dataclasses.replace(finetune_stage.SPEC, run=dies)
        patch.setitem(pipelines.STAGES, "finetune", dying)
        with pytest.raises(RuntimeError, match="killed"):
            pipelines.execute_stage("finetune", stage, output_root=str(tmp_path / "o"))
    failed = _runs("finetune")[0]
    assert failed.info.status == "FAILED" and "ser.complete" not in failed.data.tags
    outcome = pipelines.execute_stage("finetune", stage, output_root=str(tmp_path / "o"))
    assert not outcome.reused and outcome.run_id != failed.info.run_id
    assert str(outcome.output_dir) == failed.data.tags["ser.output_dir"]


def test_stages_chain_across_separate_runs_by_uri(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    data = _data(corpus, tmp_path)
    phase1 = pipelines.execute_stage(
        "pretrain_w2v1", Phase1Config(**data, training_step=2, batch_size=4),
        output_root=str(tmp_path / "o"),
    )  # fmt: skip
    uri = phase1.uri("w2v1")
    clusters = pipelines.execute_stage(
        "cluster", ClusterConfig(**data, pretrained_path=uri, num_clusters=(2, 3)),
        output_root=str(tmp_path / "o"),
    )  # fmt: skip
    run = mlflow.get_run(clusters.run_id)
    assert run.data.params["pretrained_path"] == uri
    artifacts = mlflow.artifacts.list_artifacts(run_id=clusters.run_id, artifact_path="clusters")
    assert sorted(Path(a.path).name for a in artifacts) == ["fold_1", "fold_2", "fold_3"]


def test_bad_parameters_fail_before_any_run(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    data = _data(corpus, tmp_path)
    cases = [
        ("finetune", FinetuneConfig(datadir=str(tmp_path / "nope"), labeldir=data["labeldir"]),
         "nope"),
        ("finetune", FinetuneConfig(**data, backbone="no-such-model"), "no-such-model"),
        ("cluster", ClusterConfig(**data, pretrained_path=str(tmp_path), num_clusters=(1, 8)),
         "num_clusters"),
        ("finetune", FinetuneConfig(**data, pretrained_path="runs:/0123456789abcdef/backbone"),
         "pretrained_path=runs:/0123456789abcdef"),
    ]  # fmt: skip
    for stage, config, message in cases:
        with pytest.raises(SerInputError, match=message):
            pipelines.execute_stage(stage, config, output_root=str(tmp_path / "o"))
    assert all(r.info.status != "FINISHED" for r in _runs("finetune") + _runs("cluster"))


@pytest.mark.slow
def test_ptapt_end_to_end_and_its_servable_model(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    config = PtaptMethodConfig(
        **_data(corpus, tmp_path), output_root=str(tmp_path / "out"), **FAST,
        phase1_training_step=2, num_clusters=(2, 3), phase2_training_step=2,
        phase2_warmup_step=1,
        register_as="ser-test-model",
    )  # fmt: skip
    headline = pipelines.run_method(config)
    parent = _runs("ptapt")[0]
    children = {r.data.tags["ser.stage"]: r for r in
                mlflow.search_runs(search_all_experiments=True, output_format="list",
                                   filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}  # fmt: skip  # noqa: E501
    assert set(children) == {"pretrain_w2v1", "cluster", "pretrain_w2v2", "finetune"}
    assert all(r.data.tags["ser.method"] == "ptapt" for r in children.values())
    phase2 = children["pretrain_w2v2"]
    assert phase2.data.params["clusterpath"] == f"runs:/{children['cluster'].info.run_id}/clusters"
    assert children["finetune"].data.params["pretrained_path"] == (
        f"runs:/{phase2.info.run_id}/backbone"
    )
    assert parent.data.metrics["test_UA_mean"] == pytest.approx(headline["test_UA_mean"])

    model_uri = parent.data.tags["ser.model_uri"]
    served = mlflow.pyfunc.load_model(model_uri)
    wavs = sorted(corpus.audio_dir.glob("*.wav"))[:3]
    table = served.predict(pd.DataFrame({"path": [str(w) for w in wavs]}))
    out_dir = Path(children["finetune"].data.tags["ser.output_dir"])
    model, classes = finetuned.load_finetuned(out_dir / "model")
    from ser.audio import read_audio

    indices, probs = finetuned.predict(model, [read_audio(w) for w in wavs])
    assert list(table["label"]) == [classes[i] for i in indices]
    np.testing.assert_allclose(table[[f"prob_{c}" for c in classes]].to_numpy(), probs, atol=1e-6)
    versions = mlflow.MlflowClient().search_model_versions("name = 'ser-test-model'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].run_id == children["finetune"].info.run_id
