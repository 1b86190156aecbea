"""P-TAPT phase 1: the wav2vec 1.0 emotion model trained per fold on its Train split only."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from stage_callbacks import KILL_MESSAGE, KillAt

from ser.audio import write_wav
from ser.checkpoints import safe_torch_load
from ser.config import Phase1Config
from ser.data import datasets
from ser.data.labels import read_label_file, write_label_file
from ser.data.synthetic import DemoCorpus
from ser.errors import SerInputError
from ser.models.emotion_w2v1 import EmotionWav2Vec1, load_emotion_w2v1, save_emotion_w2v1
from ser.models.wav2vec1 import Wav2Vec1Config, load_wav2vec1
from ser.stages import cluster, ptapt_phase1
from ser.stages.contract import StageContext
from ser.stages.ptapt_phase1 import crop_to_shortest, min_samples, split_train


def _with(callback: pl.Callback) -> StageContext:
    """A stage context that adds ``callback`` to every fold's Trainer."""
    return StageContext(callback_factory=lambda index, name: [callback])


def _config(corpus: DemoCorpus, output_dir: Path, **overrides: Any) -> Phase1Config:
    values: dict[str, Any] = {
        "datadir": str(corpus.audio_dir),
        "labeldir": str(corpus.label_dir),
        "output_dir": str(output_dir),
        "training_step": 6,
        "checkpoint_every": 2,
        "batch_size": 2,
        "lr": 1e-2,  # large enough that the validation loss moves within 6 steps
        "keep_checkpoints": True,  # these tests read the resume points
        **overrides,
    }
    return Phase1Config(**values)


@dataclass
class _Recorder(Callback):
    """Validation losses by step, and the number of training batches run."""

    valid: dict[int, float] = field(default_factory=dict)
    batches: int = 0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.valid[trainer.global_step] = float(trainer.callback_metrics["valid_loss"])

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1


@dataclass
class _Run:
    config: Phase1Config
    result: ptapt_phase1.Phase1Result
    recorders: list[_Recorder]
    audio_read: list[set[str]]  # per fold, in run order


@pytest.fixture(scope="module")
def trained(corpus: DemoCorpus, tmp_path_factory: pytest.TempPathFactory) -> _Run:
    """One run over every fold, recording validation losses and every audio file read."""
    config = _config(corpus, tmp_path_factory.mktemp("phase1"))
    recorders: list[_Recorder] = []
    read: list[set[str]] = []
    original = datasets.read_audio

    def spy(path: Any, **kwargs: Any) -> np.ndarray:
        read[-1].add(Path(path).name)
        return original(path, **kwargs)

    class _PerFold(_Recorder):
        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            recorders.append(_Recorder())
            read.append(set())

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            recorders[-1].on_validation_end(trainer, pl_module)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets, "read_audio", spy)
        result = ptapt_phase1.run(config, _with(_PerFold()))
    return _Run(config, result, recorders, read)


def test_runs_every_fold_and_writes_its_outputs(trained: _Run, corpus: DemoCorpus) -> None:
    out = Path(trained.config.output_dir)
    folds = [path.stem for path in corpus.label_files]
    assert sorted(trained.result.model_dirs) == folds
    assert json.loads((out / "config.json").read_text())["classes"] == list(corpus.classes)
    for fold in folds:
        assert trained.result.model_dirs[fold] == out / fold / "w2v1"
        for name in ("w2v1/config.json", "w2v1/model.pt", "split.json", "checkpoints/last.ckpt"):
            assert (out / fold / name).is_file(), name
        assert trained.result.global_step[fold] == 6
        assert np.isfinite(trained.result.best_valid_loss[fold])
        last = safe_torch_load(out / fold / "checkpoints/last.ckpt")
        assert last["global_step"] == 6  # last.ckpt follows the last validation, not the best


def test_trains_on_the_fold_train_split_only_with_a_disjoint_seeded_split(
    trained: _Run, corpus: DemoCorpus
) -> None:
    out = Path(trained.config.output_dir)
    for path, read in zip(corpus.label_files, trained.audio_read, strict=True):
        fold = read_label_file(path)
        split = json.loads((out / fold.name / "split.json").read_text())
        train, valid = set(split["train"]), set(split["valid"])
        assert not train & valid
        assert train | valid == set(fold.train)
        assert len(valid) == round(0.1 * len(fold.train))
        expected = split_train(fold.train, 0.1, trained.config.seed)
        assert (sorted(expected[0]), sorted(expected[1])) == (split["train"], split["valid"])
        # Training and validation read exactly the fold's Train files: never its Val or Test.
        assert read == set(fold.train)
        assert not read & (set(fold.val) | set(fold.test))


def test_split_is_reproducible_and_depends_on_the_seed() -> None:
    items = {f"f{i:02d}.wav": "a" if i % 2 else "b" for i in range(40)}
    reordered = dict(reversed(list(items.items())))
    first = split_train(items, 0.1, seed=3)
    assert split_train(reordered, 0.1, seed=3) == first  # independent of the file's order
    assert len(first[1]) == 4 and not set(first[0]) & set(first[1])
    assert split_train(items, 0.1, seed=4)[1] != first[1]
    assert len(split_train({"a.wav": "x", "b.wav": "y"}, 0.01, seed=0)[1]) == 1
    with pytest.raises(SerInputError, match="at least 2"):
        split_train({"a.wav": "x"}, 0.1, seed=0)


def test_keeps_the_checkpoint_with_the_lowest_validation_loss(trained: _Run) -> None:
    out = Path(trained.config.output_dir)
    for fold, recorder in zip(sorted(trained.result.model_dirs), trained.recorders, strict=True):
        assert sorted(recorder.valid) == [2, 4, 6]  # every checkpoint_every steps and the last
        best_step = min(recorder.valid, key=recorder.valid.__getitem__)
        summary = json.loads((out / fold / "w2v1/config.json").read_text())["training"]
        assert summary["best_step"] == best_step
        assert summary["best_valid_loss"] == pytest.approx(recorder.valid[best_step])
        best = safe_torch_load(out / fold / "checkpoints" / summary["best_checkpoint"])
        assert best["global_step"] == best_step
        saved = safe_torch_load(out / fold / "w2v1/model.pt")
        for key, value in saved.items():
            assert torch.equal(value, best["state_dict"][f"model.{key}"]), key
    # A best before the last step, so last.ckpt (step 6, tested above) is not just the best.
    assert any(min(r.valid, key=r.valid.__getitem__) < 6 for r in trained.recorders)
    # The recorded losses differ between steps, so the choice above was a real choice.
    assert any(len(set(r.valid.values())) == 3 for r in trained.recorders)


def test_saved_model_loads_in_one_call_with_identical_features(
    trained: _Run, corpus: DemoCorpus
) -> None:
    model_dir = next(iter(trained.result.model_dirs.values()))
    model, classes = load_emotion_w2v1(model_dir)
    assert classes == list(corpus.classes) and not model.training
    summary = json.loads((model_dir / "config.json").read_text())["training"]
    best = safe_torch_load(model_dir.parent / "checkpoints" / summary["best_checkpoint"])
    reference = EmotionWav2Vec1(load_wav2vec1("tiny"), len(classes))
    reference.load_state_dict(
        {k[len("model.") :]: v for k, v in best["state_dict"].items() if k.startswith("model.")}
    )
    wav = torch.randn(2, 20000)
    for ours, theirs in zip(
        model.extract_features(wav), reference.extract_features(wav), strict=True
    ):
        assert torch.equal(ours, theirs)
    # ... and it is what the clustering stage finds for that fold.
    fold = read_label_file(corpus.label_files[0])
    found = cluster.resolve_model_dir(trained.config.output_dir, fold)
    assert found == trained.result.model_dirs[fold.name]


def test_save_and_load_round_trip_keeps_options(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = EmotionWav2Vec1(
        load_wav2vec1("tiny"), 3, head_hidden=7, lstm_hidden=5, time_mask_prob=0.3
    )
    save_emotion_w2v1(model, tmp_path / "m", ["a", "b", "c"], training={"global_step": 9})
    loaded, classes = load_emotion_w2v1(tmp_path / "m")
    assert classes == ["a", "b", "c"]
    assert loaded.lstm.hidden_size == 5 and loaded.time_mask_prob == 0.3
    wav = torch.randn(1, 12000)
    model.eval()
    assert torch.equal(loaded(wav)["utterance_logits"], model(wav)["utterance_logits"])
    with pytest.raises(SerInputError, match="3 classes"):
        save_emotion_w2v1(model, tmp_path / "x", ["a", "b"])
    (tmp_path / "m" / "config.json").write_text('{"format": "other"}')
    with pytest.raises(SerInputError, match="not a saved phase-1 model config"):
        load_emotion_w2v1(tmp_path / "m")
    with pytest.raises(SerInputError, match="lacks config.json"):
        load_emotion_w2v1(tmp_path / "missing")


def test_resumes_after_a_kill_and_runs_only_the_remaining_steps(
    corpus: DemoCorpus, tmp_path: Path
) -> None:
    config = _config(corpus, tmp_path, labelpath=str(corpus.label_files[0]))
    fold_dir = tmp_path / corpus.label_files[0].stem
    with pytest.raises(RuntimeError, match=KILL_MESSAGE):
        ptapt_phase1.run(config, _with(KillAt(at_step=3)))
    assert safe_torch_load(fold_dir / "checkpoints/last.ckpt")["global_step"] == 2
    assert not (fold_dir / "w2v1").exists()

    second = _Recorder()
    result = ptapt_phase1.run(config, _with(second))
    assert result.global_step[fold_dir.name] == 6
    assert second.batches == 4  # steps 3..6 only
    assert sorted(second.valid) == [4, 6]  # step 2's validation is not repeated

    third = _Recorder()
    again = ptapt_phase1.run(config, _with(third))  # finished: the fold is skipped
    assert third.batches == 0 and again.best_valid_loss == result.best_valid_loss


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"training_step": 0}, "training_step=0"),
        ({"batch_size": -1}, "batch_size=-1"),
        ({"checkpoint_every": 0}, "checkpoint_every=0"),
        ({"valid_fraction": 0.0}, "valid_fraction=0.0"),
        ({"valid_fraction": 1.0}, "valid_fraction=1.0"),
        ({"warmup_fraction": 1.0}, "warmup_fraction=1.0"),
        ({"w2v1": "no/such/wav2vec_large.pt"}, "w2v1='no/such"),
        ({"classes": "anger"}, "classes='anger'"),
        ({"datadir": "no/such/dir"}, "datadir no/such/dir"),
    ],
)
def test_bad_parameters_fail_before_any_work(
    corpus: DemoCorpus, tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    config = _config(corpus, tmp_path / "out", **overrides)
    with pytest.raises(SerInputError, match=message):
        ptapt_phase1.run(config)
    assert not (tmp_path / "out").exists()


def test_crop_to_shortest_takes_a_window_of_each_item_without_padding() -> None:
    lengths = torch.tensor([10, 4, 7])
    wav = torch.zeros(3, 10)
    for row, n in enumerate(lengths.tolist()):
        wav[row, :n] = torch.arange(1, n + 1) + 100 * row  # padding stays 0
    cropped = crop_to_shortest(wav, lengths, np.random.default_rng(0))
    assert cropped.shape == (3, 4)
    for row in range(3):
        values = cropped[row] - 100 * row
        assert (values >= 1).all() and (values <= lengths[row]).all()  # never padding
        assert torch.equal(values.diff(), torch.ones(3))  # one contiguous window
    again = crop_to_shortest(wav, lengths, np.random.default_rng(0))
    assert torch.equal(again, cropped)


def test_clips_too_short_for_a_frame_are_left_out_with_a_warning(
    corpus: DemoCorpus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shortest = min_samples(Wav2Vec1Config.preset("tiny"))
    assert shortest == 945
    fold = read_label_file(corpus.label_files[0])
    audio = tmp_path / "audio"  # the fold's Train audio plus one clip too short for a frame
    audio.mkdir()
    for name in fold.train:
        (audio / name).symlink_to(corpus.audio_dir / name)
    write_wav(audio / "tiny_clip.wav", np.full(shortest - 1, 0.1, dtype=np.float32))
    labels = tmp_path / "short.json"
    write_label_file(labels, {"Train": {**fold.train, "tiny_clip.wav": "sad"}})
    config = _config(
        corpus, tmp_path / "out", datadir=str(audio), labelpath=str(labels), training_step=2
    )
    with caplog.at_level(logging.WARNING):
        ptapt_phase1.run(config)
    assert "tiny_clip.wav" in caplog.text and "shorter than 945 samples" in caplog.text
    split = json.loads((tmp_path / "out/short/split.json").read_text())
    assert "tiny_clip.wav" not in split["train"] + split["valid"]
    assert len(split["train"]) + len(split["valid"]) == len(fold.train)
