"""P-TAPT phase 2 stage: cluster labels read and checked before training, per-fold inputs, the
frozen feature encoder, outputs that fine-tuning loads, resuming."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pytorch_lightning.loggers import CSVLogger
from stage_callbacks import KILL_MESSAGE, CountSteps, KillAt, add_callback
from transformers import Wav2Vec2Model

from ser import artifacts, training
from ser.audio import check_audio_files
from ser.checkpoints import safe_torch_load
from ser.config import Phase2Config
from ser.data.datasets import FrameLabelDataset
from ser.data.frames import label_frame_count
from ser.data.labels import read_label_file
from ser.data.synthetic import DemoCorpus
from ser.errors import SerInputError
from ser.models.backbones import load_backbone, preset_config, save_backbone
from ser.stages import ptapt_phase2 as phase2
from ser.stages.contract import StageContext
from ser.training import last_checkpoint

STEPS = 4
KS = (4, 8)


@pytest.fixture(scope="module")
def labels(corpus: DemoCorpus) -> dict[str, list[list[int]]]:
    """Hand-made cluster labels for every file of the corpus: one list per k, as many labels as
    the phase-1 model yields for the file."""
    samples = check_audio_files(sorted(corpus.audio_dir.glob("*.wav")))
    rng = np.random.default_rng(0)
    return {
        Path(path).name: [rng.integers(0, k, label_frame_count(n)).tolist() for k in KS]
        for path, n in samples.items()
    }


@pytest.fixture(scope="module")
def initial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_backbone(Wav2Vec2Model(preset_config("tiny")),
                         tmp_path_factory.mktemp("initial") / "w2v2")


def _write_clusters(directory: Path, labels: dict[str, Any], num_clusters: Any = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / phase2.CLUSTERS_JSON).write_text(json.dumps(labels))
    if num_clusters is not None:
        (directory / phase2.STATS_JSON).write_text(json.dumps({"num_clusters": num_clusters}))
    return directory / phase2.CLUSTERS_JSON


def _config(corpus: DemoCorpus, out: Path, clusterpath: Path | str, **overrides: Any
            ) -> Phase2Config:
    values: dict[str, Any] = {
        "datadir": str(corpus.audio_dir), "labelpath": str(corpus.label_files[0]),
        "output_dir": str(out), "clusterpath": str(clusterpath), "backbone": "tiny",
        "training_step": STEPS, "warmup_step": 1, "checkpoint_every": 2, "batch_size": 1,
        "keep_checkpoints": True,  # these tests read the resume points
    }
    return Phase2Config(**{**values, **overrides})


class _SpyDataset(FrameLabelDataset):
    built: list[tuple[list[str], list[int]]] = []

    def __init__(self, audio_dir: Any, frame_labels: Any, **kwargs: Any) -> None:
        super().__init__(audio_dir, frame_labels, **kwargs)
        _SpyDataset.built.append((list(self.names), [len(labels[0]) for labels in
                                                     self.frame_labels]))


def test_runs_every_fold_from_the_clustering_layout(
    corpus: DemoCorpus, labels: dict[str, Any], initial: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folds = [read_label_file(path) for path in corpus.label_files]
    # The clustering stage's layout: <fold>/clusters.json with the counts in cluster_stats.json.
    # Each fold's file labels all files; only its Train files may be used.
    for fold in folds:
        _write_clusters(tmp_path / "clusters" / fold.name, labels, num_clusters=[5, 9])
    monkeypatch.setattr(phase2, "FrameLabelDataset", _SpyDataset)
    monkeypatch.setattr(_SpyDataset, "built", [])
    config = _config(corpus, tmp_path / "out", tmp_path / "clusters", labelpath="",
                     labeldir=str(corpus.label_dir), backbone=str(initial))
    logs = StageContext(logger_factory=lambda fold: CSVLogger(tmp_path / "logs", fold))
    result = phase2.run(config, logs)
    assert sorted(result.backbones) == [fold.name for fold in folds]
    # cluster_stats.json decides the heads, not the largest labels (3 and 7 here)
    assert result.num_clusters == {fold.name: [5, 9] for fold in folds}
    for fold, (names, label_counts) in zip(folds, _SpyDataset.built, strict=True):
        assert sorted(names) == sorted(fold.train)
        assert label_counts == [len(labels[name][0]) for name in names]
    start = load_backbone(str(initial)).state_dict()
    for fold in folds:
        trained = load_backbone(str(result.backbones[fold.name])).state_dict()
        assert trained.keys() == start.keys()
        changed = {key for key in start if not torch.equal(trained[key], start[key])}
        # The transformer trained; the conv encoder and feature projection stayed frozen.
        assert any(key.startswith("encoder.layers.") for key in changed)
        assert "masked_spec_embed" not in changed  # as the original: not given to Adam
        assert not any(key.startswith(("feature_extractor.", "feature_projection."))
                       for key in changed)
    with open(tmp_path / "logs" / folds[0].name / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"loss", "loss_k5", "accuracy_k5", "accuracy_k9", "masked_frames", "lr"} <= logged
    assert len([row for row in rows if row.get("loss")]) == STEPS


def test_a_single_label_file_without_stats_infers_the_cluster_counts(
    corpus: DemoCorpus, labels: dict[str, Any], tmp_path: Path
) -> None:
    path = _write_clusters(tmp_path / "clusters", labels)
    result = phase2.run(_config(corpus, tmp_path / "out", path))
    assert list(result.num_clusters.values()) == [list(KS)]
    backbone = next(iter(result.backbones.values()))
    assert isinstance(load_backbone(str(backbone)), Wav2Vec2Model)
    checkpoint = last_checkpoint(backbone.parent)
    assert checkpoint is not None
    # The resume point is itself a backbone (model.json beside it) equal to the output.
    saved = load_backbone(str(checkpoint)).state_dict()
    output = load_backbone(str(backbone)).state_dict()
    assert all(torch.equal(saved[key], output[key]) for key in output)


def test_a_train_file_without_labels_is_an_error_naming_it(
    corpus: DemoCorpus, labels: dict[str, Any], tmp_path: Path
) -> None:
    fold = read_label_file(corpus.label_files[0])
    dropped = sorted(fold.train)[:2]
    # Test and Val files without labels are fine; Train files are not.
    partial = {name: value for name, value in labels.items()
               if name not in dropped and name not in fold.test}
    path = _write_clusters(tmp_path / "clusters", partial)
    with pytest.raises(SerInputError, match="2 of the 8 Train files") as error:
        phase2.run(_config(corpus, tmp_path / "out", path))
    assert all(name in str(error.value) for name in dropped)
    assert str(path) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_every_folds_labels_are_checked_before_the_first_fold_trains(
    corpus: DemoCorpus, labels: dict[str, Any], tmp_path: Path
) -> None:
    folds = [read_label_file(path) for path in corpus.label_files]
    for fold in folds[:-1]:
        _write_clusters(tmp_path / "clusters" / fold.name, labels)
    last = folds[-1]
    _write_clusters(tmp_path / "clusters" / last.name,
                    {k: v for k, v in labels.items() if k not in last.train})
    config = _config(corpus, tmp_path / "out", tmp_path / "clusters", labelpath="",
                     labeldir=str(corpus.label_dir))
    with pytest.raises(SerInputError, match=last.name):
        phase2.run(config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "do not exist"),
    ("not_json", "not readable JSON"),
    ("not_an_object", "non-empty JSON object"),
    ("ragged", "equally long integer lists"),
    ("strings", "equally long integer lists"),
    ("head_counts_differ", "different numbers of label lists"),
    ("label_out_of_range", "outside"),
    ("stats_mismatch", "num_clusters must list 2"),
    ("one_cluster", "fewer than 2 clusters"),
])
def test_bad_cluster_files_fail_before_any_output(
    corpus: DemoCorpus, labels: dict[str, Any], tmp_path: Path, case: str, message: str
) -> None:
    directory = tmp_path / "clusters"
    first = sorted(read_label_file(corpus.label_files[0]).train)[0]  # only Train is checked
    bad = json.loads(json.dumps(labels))
    stats: Any = None
    if case == "ragged":
        bad[first][1] = bad[first][1][:-1]
    elif case == "strings":
        bad[first][0][0] = "3"
    elif case == "head_counts_differ":
        bad = {name: sets[:1] if name == first else sets for name, sets in bad.items()}
    elif case == "label_out_of_range":
        stats = list(KS)
        bad = {name: [sets[0], [k + 8 for k in sets[1]]] for name, sets in bad.items()}
    elif case == "stats_mismatch":
        stats = [4]
    elif case == "one_cluster":
        bad = {name: [[0] * len(sets[0]), sets[1]] for name, sets in bad.items()}
    path = _write_clusters(directory, bad, stats)
    if case == "missing":
        path.unlink()
    elif case == "not_json":
        path.write_text("{not json")
    elif case == "not_an_object":
        path.write_text("[1, 2]")
    with pytest.raises(SerInputError, match=message):
        phase2.run(_config(corpus, tmp_path / "out", path))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"clusterpath": ""}, "clusterpath='' is empty"),
    ({"mask_time_prob": 0.0}, "mask_time_prob=0.0"),
    ({"training_step": 0}, "training_step=0"),
    ({"warmup_step": -1}, "warmup_step=-1"),
    ({"backbone": "no-such-model"}, "no-such-model"),
])
def test_bad_parameters_fail_before_any_output(
    corpus: DemoCorpus, labels: dict[str, Any], tmp_path: Path, overrides: dict[str, Any],
    message: str,
) -> None:
    values = {"clusterpath": _write_clusters(tmp_path / "clusters", labels), **overrides}
    with pytest.raises(SerInputError, match=message):
        phase2.run(_config(corpus, tmp_path / "out", **values))
    assert not (tmp_path / "out").exists()


def test_a_killed_run_resumes_and_runs_only_the_remaining_steps(
    corpus: DemoCorpus, labels: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write_clusters(tmp_path / "clusters", labels)
    config = _config(corpus, tmp_path / "out", path, training_step=5, checkpoint_every=2)
    fold_dir = tmp_path / "out" / Path(corpus.label_files[0]).stem
    add_callback(monkeypatch, training, KillAt(at_step=3))
    with pytest.raises(RuntimeError, match=KILL_MESSAGE):
        phase2.run(config)
    checkpoint = last_checkpoint(fold_dir)
    assert checkpoint is not None and safe_torch_load(checkpoint)["global_step"] == 2
    assert not (fold_dir / artifacts.BACKBONE).exists()
    count = CountSteps()
    add_callback(monkeypatch, training, count)
    phase2.run(config)
    assert count.final_step == 5 and count.steps == 3
    again = CountSteps()
    add_callback(monkeypatch, training, again)
    result = phase2.run(config)
    assert again.steps == 0 and result.final_loss == {}
    assert (result.backbones[fold_dir.name] / "config.json").is_file()
