from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from stage_callbacks import KILL_MESSAGE, CountSteps, KillAt, add_callback
from transformers import Wav2Vec2Model

from ser import training
from ser.audio import read_audio
from ser.config import EMOTIONS_4, FinetuneConfig
from ser.data.labels import read_label_file, write_label_file
from ser.data.synthetic import DemoCorpus
from ser.errors import SerInputError
from ser.metrics import Scores
from ser.models import finetuned
from ser.models.backbones import load_backbone, preset_config
from ser.models.finetuned import load_finetuned, predict
from ser.models.heads import UtteranceClassifier
from ser.stages import finetune
from ser.stages.contract import StageContext
from ser.stages.finetune import FinetuneModule


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # The tiny model gains nothing from intra-op threads, and on shared, busy cores torch's
    # spinning threads made these tests several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(corpus: DemoCorpus, out: Path, **overrides: Any) -> FinetuneConfig:
    # lr 1e-3 so that two tiny epochs move the weights visibly; batch 4: 2 steps per epoch.
    values: dict[str, Any] = {
        "datadir": str(corpus.audio_dir), "labeldir": str(corpus.label_dir),
        "output_dir": str(out), "batch_size": 4, "max_epochs": 2, "lr": 1e-3,
        "keep_checkpoints": True,  # these tests read the checkpoints a run tested
    }
    return FinetuneConfig(**{**values, **overrides})


@dataclass
class Finished:
    result: finetune.FinetuneResult
    logger_names: list[str]
    log_dir: Path


@pytest.fixture(scope="module")
def finished(corpus: DemoCorpus, tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """Three folds x two repeats, trained once for the tests that read their outputs."""
    out = tmp_path_factory.mktemp("finetune")
    names: list[str] = []

    def factory(name: str) -> CSVLogger:
        names.append(name)
        return CSVLogger(save_dir=out / "logs", name=name, version=0)

    config = _config(corpus, out / "run", num_exps=2)
    result = finetune.run(config, StageContext(logger_factory=factory))
    return Finished(result, names, out / "logs")


def _results(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(output_dir.glob("*/run_*/results.json"))]


def _test_probs(module: FinetuneModule, config: FinetuneConfig, items: dict[str, str]
                ) -> dict[str, torch.Tensor]:
    """The module's own probabilities (its predict_step) for every utterance of ``items``."""
    loader = finetune.eval_loader(config, items, module.classes, batch_size=1)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    outputs = trainer.predict(module, dataloaders=loader)
    return {name: probs for out in outputs
            for name, probs in zip(out["names"], out["probs"], strict=True)}


def _predicted_classes(checkpoint: Path, config: FinetuneConfig, items: dict[str, str]
                       ) -> dict[str, str]:
    module = FinetuneModule.load_from_checkpoint(checkpoint, weights_only=True)
    probs = _test_probs(module, config, items)
    return {name: module.classes[int(p.argmax())] for name, p in probs.items()}


# --------------------------------------------------------------------------- end to end


def test_runs_every_fold_and_repeat_and_writes_outputs(finished: Finished) -> None:
    out = finished.result.output_dir
    runs = _results(out)
    assert [(r["fold"], r["repeat"], r["seed"]) for r in runs] == [
        (f"fold_{k}", r, r) for k in (1, 2, 3) for r in (0, 1)
    ]
    assert finished.logger_names == [f"fold_{k}/run_{r}" for k in (1, 2, 3) for r in (0, 1)]
    for run in runs:
        assert (run["num_train"], run["num_val"], run["num_test"]) == (8, 8, 8)
        assert run["tested"] == "best" and run["valid_UA"] is not None
        assert (out / run["checkpoint"]).is_file()
        assert run["global_step"] == 4 and run["epochs"] == 2
        assert len(run["predictions"]) == 8
        assert sum(map(sum, run["scores"]["confusion"])) == 8
    for path in (finished.result.summary_path, finished.result.summary_text_path,
                 finished.result.confusion_path, out / "config.json",
                 out / "model" / "model.json"):
        assert path.is_file(), path
    assert finished.result.confusion_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["resolved_classes"] == list(EMOTIONS_4)


def test_logger_factory_gets_validation_and_test_metrics(finished: Finished) -> None:
    rows = list(csv.DictReader(
        (finished.log_dir / "fold_2" / "run_1" / "version_0" / "metrics.csv").open()))
    valid = [float(r["valid_UA"]) for r in rows if r.get("valid_UA")]
    test = [float(r["test_UA"]) for r in rows if r.get("test_UA")]
    result = json.loads(
        (finished.result.output_dir / "fold_2" / "run_1" / "results.json").read_text())
    # No hyperparameters go to the logger: MLflow refuses a param whose value changes between
    # the runs of a stage, and the class weights and backbone differ between folds.
    hparams = finished.log_dir / "fold_2" / "run_1" / "version_0" / "hparams.yaml"
    assert not hparams.exists() or "class_weights" not in hparams.read_text()
    assert len(valid) == 2  # one per epoch, over the whole Val split
    assert result["valid_UA"] == pytest.approx(max(valid))
    assert test == [pytest.approx(result["scores"]["UA"])]


def test_summary_agrees_with_the_per_run_results(finished: Finished) -> None:
    runs = _results(finished.result.output_dir)
    summary = json.loads(finished.result.summary_path.read_text())
    for key in ("WA", "UA", "F1"):
        grid = np.array([[r["scores"][key] for r in runs if r["fold"] == f"fold_{k}"]
                         for k in (1, 2, 3)])  # folds x repeats
        got = summary["metrics"][key]
        assert got["mean"] == pytest.approx(np.mean([r["scores"][key] for r in runs]))
        assert got["std_over_folds"] == pytest.approx(grid.std(axis=0).mean())
        assert got["std_over_repeats"] == pytest.approx(grid.mean(axis=0).std())
        assert got["median_over_folds"] == pytest.approx(np.median(grid, axis=0).mean())
        for k, row in zip((1, 2, 3), grid, strict=True):
            assert got["per_fold"][f"fold_{k}"] == pytest.approx(
                {"mean": row.mean(), "std": row.std()})
    assert summary["confusion"] == np.sum([r["scores"]["confusion"] for r in runs], 0).tolist()
    for name in EMOTIONS_4:
        assert summary["recall"][name] == pytest.approx(
            np.mean([r["scores"]["recall"][name] for r in runs]))
    assert [(r["fold"], r["repeat"], r["UA"]) for r in summary["runs"]] == [
        (r["fold"], r["repeat"], r["scores"]["UA"]) for r in runs]
    assert finished.result.ua == pytest.approx(summary["metrics"]["UA"]["mean"])
    text = finished.result.summary_text_path.read_text()
    ua_line = next(line for line in text.splitlines() if line.startswith("UA "))
    assert float(ua_line.split()[1]) == pytest.approx(summary["metrics"]["UA"]["mean"], abs=0.01)
    assert sum(line.startswith("fold_") for line in text.splitlines()) == 3 + 6  # folds + runs


def test_repeats_differ_by_seed_and_a_seed_reproduces_its_run(
    finished: Finished, corpus: DemoCorpus, tmp_path: Path
) -> None:
    out = finished.result.output_dir

    def head(path: Path) -> torch.Tensor:
        return torch.load(path, weights_only=True)["state_dict"]["model.output.weight"]

    run0, run1 = (out / "fold_1" / f"run_{r}" / "checkpoints" / "last.ckpt" for r in (0, 1))
    assert not torch.allclose(head(run0), head(run1))
    again = finetune.run(_config(corpus, tmp_path, labelpath=str(corpus.label_files[0])))
    torch.testing.assert_close(head(again.output_dir / "fold_1/run_0/checkpoints/last.ckpt"),
                               head(run0))
    assert again.runs[0]["predictions"] == _results(out)[0]["predictions"]


def test_finished_runs_are_skipped_with_a_warning_on_changed_settings(
    finished: Finished, corpus: DemoCorpus, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _forbid_training(monkeypatch)
    out = finished.result.output_dir
    with caplog.at_level(logging.INFO, logger="ser.stages.finetune"):
        again = finetune.run(_config(corpus, out, num_exps=2))
    assert again.runs == finished.result.runs
    assert again.ua == finished.result.ua
    assert caplog.text.count("already finished") == 6
    assert "differ" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ser.stages.finetune"):
        finetune.run(_config(corpus, out, num_exps=2, lr=5e-4))
    assert "(lr differ)" in caplog.text
    finetune.run(_config(corpus, out, num_exps=2))  # leave config.json as the fixture wrote it


# --------------------------------------------------------------------------- checkpoints


def _single_fold(corpus: DemoCorpus, tmp_path: Path, val: bool) -> Path:
    """fold_1 with one Train 'sad' file left out (Train counts 2, 2, 2, 1), Val kept or emptied."""
    fold = read_label_file(corpus.label_files[0])
    dropped = sorted(n for n, label in fold.train.items() if label == "sad")[0]
    train = {n: label for n, label in fold.train.items() if n != dropped}
    path = tmp_path / "labels" / "fold_1.json"
    write_label_file(path, {"Train": train, "Val": fold.val if val else {}, "Test": fold.test})
    return path


def test_empty_val_tests_the_last_checkpoint(corpus: DemoCorpus, tmp_path: Path) -> None:
    labels = _single_fold(corpus, tmp_path, val=False)
    config = _config(corpus, tmp_path / "out", labelpath=str(labels))
    result = finetune.run(config)
    run = result.runs[0]
    assert (run["tested"], run["valid_UA"], run["num_val"]) == ("last", None, 0)
    last = result.output_dir / run["checkpoint"]
    assert last.name == "last.ckpt"
    # 7 Train files in random batches of 4, the partial one dropped: 1 step an epoch, 2 epochs
    assert torch.load(last, weights_only=True)["global_step"] == run["global_step"] == 2
    test_items = read_label_file(labels).test
    assert _predicted_classes(last, config, test_items) == run["predictions"]
    summary = json.loads(result.summary_path.read_text())
    assert "first fold's first run" in summary["exported_model"]["selected_by"]


def test_val_split_tests_the_best_checkpoint(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Validation UA 70 after epoch 0, 30 after epoch 1: the best is not the last.
    def scripted(self: FinetuneModule, labels: list[int], preds: list[int]) -> Scores:
        ua = (70.0, 30.0)[self.current_epoch]
        return Scores(wa=ua, ua=ua, f1=ua, recall={}, confusion=[])

    monkeypatch.setattr(FinetuneModule, "_validation_scores", scripted)
    labels = _single_fold(corpus, tmp_path, val=True)
    config = _config(corpus, tmp_path / "out", labelpath=str(labels))
    run = finetune.run(config).runs[0]
    best = Path(config.output_dir) / run["checkpoint"]
    assert run["tested"] == "best" and run["valid_UA"] == pytest.approx(70.0)
    assert torch.load(best, weights_only=True)["epoch"] == 0
    last = training.last_checkpoint(best.parent.parent)
    assert last is not None and last != best
    # it trained on (and last.ckpt, the resume point, followed), yet tested the earlier weights
    assert run["global_step"] == torch.load(last, weights_only=True)["global_step"] == 2
    assert _predicted_classes(best, config, read_label_file(labels).test) == run["predictions"]


def test_class_weights_are_normalised_inverse_frequencies(
    corpus: DemoCorpus, tmp_path: Path
) -> None:
    # The stage gives the fold's weights to the loss: Train counts 2, 2, 2, 1 -> 3.5, 3.5, 3.5, 7.
    labels = _single_fold(corpus, tmp_path, val=False)
    result = finetune.run(_config(corpus, tmp_path / "out", labelpath=str(labels),
                                  max_epochs=1))
    checkpoint = torch.load(result.output_dir / result.runs[0]["checkpoint"], weights_only=True)
    assert checkpoint["hyper_parameters"]["class_weights"] == pytest.approx([0.2, 0.2, 0.2, 0.4])
    module = FinetuneModule.load_from_checkpoint(
        result.output_dir / result.runs[0]["checkpoint"], weights_only=True)
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    batch = {"labels": torch.tensor([1, 3])}
    nll = -torch.log_softmax(logits, -1)[[0, 1], [1, 3]]
    expected = (0.2 * nll[0] + 0.4 * nll[1]) / (0.2 + 0.4)
    module.forward = lambda *args: logits  # type: ignore[method-assign]
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    loss = module.training_step({**batch, "input_values": None, "attention_mask": None}, 0)
    assert float(loss) == pytest.approx(float(expected))


def test_killed_run_resumes_from_its_last_checkpoint(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(corpus, tmp_path, labelpath=str(corpus.label_files[0]))
    run_dir = tmp_path / "fold_1" / "run_0"
    with monkeypatch.context() as patch:
        add_callback(patch, training, KillAt(at_step=3))  # epoch 0 ends (and checkpoints) at step 2
        with pytest.raises(RuntimeError, match=KILL_MESSAGE):
            finetune.run(config)
    assert not (run_dir / "results.json").exists()
    last = training.last_checkpoint(run_dir)
    assert last is not None and torch.load(last, weights_only=True)["global_step"] == 2
    counter = CountSteps()
    add_callback(monkeypatch, training, counter)
    result = finetune.run(config)
    assert result.runs[0]["global_step"] == 4
    assert counter.steps == 2  # only the steps after the checkpoint ran


class _RecordBatches(Callback):
    def __init__(self) -> None:
        self.seen: dict[tuple[int, str], torch.Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, *args: Any
                             ) -> None:
        for name, wav, length in zip(batch["names"], batch["input_values"], batch["lengths"],
                                     strict=True):
            self.seen[(trainer.current_epoch, name)] = wav[:length].clone()


def test_training_crops_to_maxseqlen_at_a_new_offset_each_epoch(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _RecordBatches()
    add_callback(monkeypatch, training, recorder)
    finetune.run(_config(corpus, tmp_path, labelpath=str(corpus.label_files[0]),
                         maxseqlen=0.5))
    names = sorted(read_label_file(corpus.label_files[0]).train)
    assert sorted(name for epoch, name in recorder.seen if epoch == 0) == names
    assert all(len(wav) == 8000 for wav in recorder.seen.values())  # every file is over 1 s
    moved = [name for name in names
             if not torch.equal(recorder.seen[(0, name)], recorder.seen[(1, name)])]
    assert len(moved) >= len(names) - 1  # an equal offset twice is possible, not likely


# --------------------------------------------------------------------------- the exported model


def test_exported_model_predicts_like_the_module(finished: Finished, corpus: DemoCorpus) -> None:
    out = finished.result.output_dir
    runs = _results(out)
    summary = json.loads(finished.result.summary_path.read_text())
    best = max(runs, key=lambda r: r["valid_UA"])  # first of equals, never the test score
    assert (summary["exported_model"]["fold"], summary["exported_model"]["repeat"]) == (
        best["fold"], best["repeat"])
    model, classes = load_finetuned(finished.result.model_dir)
    assert classes == list(EMOTIONS_4)
    module = FinetuneModule.load_from_checkpoint(out / best["checkpoint"], weights_only=True)
    test_items = read_label_file(corpus.label_dir / f"{best['fold']}.json").test
    config = _config(corpus, out)
    own = _test_probs(module, config, test_items)
    names = sorted(test_items)
    labels, probs = predict(model, [read_audio(corpus.audio_dir / n) for n in names])
    torch.testing.assert_close(torch.from_numpy(probs), torch.stack([own[n] for n in names]))
    assert {n: classes[i] for n, i in zip(names, labels, strict=True)} == best["predictions"]


def test_stage_outputs_load_as_backbones(finished: Finished) -> None:
    out = finished.result.output_dir
    checkpoint = out / finished.result.runs[0]["checkpoint"]
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    backbone = load_backbone(str(checkpoint))  # model.json beside the checkpoint
    torch.testing.assert_close(backbone.state_dict()["encoder.layers.0.attention.q_proj.weight"],
                               state["model.backbone.encoder.layers.0.attention.q_proj.weight"])
    exported = load_backbone(str(finished.result.model_dir / "backbone"))
    assert exported.config.hidden_size == backbone.config.hidden_size


def test_load_finetuned_and_predict_refuse_bad_input(tmp_path: Path) -> None:
    with pytest.raises(SerInputError, match="model.json"):
        load_finetuned(tmp_path)
    model = UtteranceClassifier(Wav2Vec2Model(preset_config("tiny")), 2)
    with pytest.raises(SerInputError, match=r"waveforms \[1\]"):
        predict(model, [np.zeros(16000, np.float32), np.zeros(100, np.float32)])


# --------------------------------------------------------------------------- evaluation batches


def _utterances() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=generator) for n in (16000, 23456, 9000)]


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_eval_batches_for_every_feature_encoder(norm: str) -> None:
    # Group norm would normalise over the padded time axis; in eval mode the classifier runs its
    # conv feature encoder per utterance instead (tests/test_eval_batching.py has the rest).
    torch.manual_seed(0)
    config = preset_config("tiny", feat_extract_norm=norm, conv_bias=norm == "layer")
    model = UtteranceClassifier(Wav2Vec2Model(config), 4).eval()
    wavs = _utterances()
    with torch.no_grad():
        one_by_one = torch.cat([model(w[None]) for w in wavs])
        padded = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
        mask = (torch.arange(padded.shape[1]) < torch.tensor([len(w) for w in wavs])[:, None])
        batched = model(padded, mask.long())
    assert finetuned.eval_batch_size() == finetuned.EVAL_BATCH_SIZE > 1
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    _, probs = predict(model, [w.numpy() for w in wavs])  # batched, in input order
    torch.testing.assert_close(torch.from_numpy(probs), torch.softmax(one_by_one, -1),
                               atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("overrides", "message"), [
    ({"lr": 0.0}, "lr=0.0 must be a finite number > 0"),
    ({"lr": -1e-4}, "lr=-0.0001 must be a finite number > 0"),
    ({"num_exps": 0}, "num_exps=0 must be an integer >= 1"),
    ({"max_epochs": 0}, "max_epochs=0"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"mask_time_prob": 1.5}, "mask_time_prob=1.5"),
    ({"save_top_k": 0}, "save_top_k=0"),
    ({"pretrained_path": "/nonexistent/tapt"}, "pretrained_path='/nonexistent/tapt' does not"),
    ({"classes": "anger,happy,neutral"}, "sad"),
])
def test_bad_parameters_fail_before_training(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    overrides: dict[str, Any], message: str,
) -> None:
    _forbid_training(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(SerInputError, match=message):
        finetune.run(_config(corpus, out, **overrides))
    assert not out.exists()  # nothing written, not even config.json


def test_a_class_without_train_data_fails_before_training(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_training(monkeypatch)
    fold = read_label_file(corpus.label_files[0])
    labels = tmp_path / "fold_1.json"
    write_label_file(labels, {"Train": {n: c for n, c in fold.train.items() if c != "sad"},
                              "Val": fold.val, "Test": fold.test})
    with pytest.raises(SerInputError, match=r"no Train utterance of class\(es\) \['sad'\]"):
        finetune.run(_config(corpus, tmp_path / "out", labelpath=str(labels)))


def test_pretrained_path_picks_each_folds_backbone(corpus: DemoCorpus, tmp_path: Path) -> None:
    fold = read_label_file(corpus.label_files[0])
    stage_out = tmp_path / "tapt"
    (stage_out / "fold_1" / "backbone").mkdir(parents=True)
    (stage_out / "fold_1" / "backbone" / "config.json").write_text("{}")
    config = _config(corpus, tmp_path, pretrained_path=str(stage_out))
    assert finetune.backbone_source(config, fold) == str(stage_out / "fold_1" / "backbone")
    (stage_out / "fold_1" / "backbone" / "config.json").unlink()
    with pytest.raises(SerInputError, match="neither config.json nor backbone/config.json"):
        finetune.backbone_source(config, fold)
    assert finetune.backbone_source(_config(corpus, tmp_path), fold) == "tiny"


def _forbid_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Callable[..., Any]:
        raise AssertionError("training started")

    monkeypatch.setattr(training, "build_trainer", refuse)
    monkeypatch.setattr(finetune, "FinetuneModule", refuse)


def test_a_finished_run_keeps_weights_only_for_the_exported_model(
    corpus: DemoCorpus, tmp_path: Path
) -> None:
    config = _config(corpus, tmp_path / "out", keep_checkpoints=False, max_epochs=1, num_exps=2)
    result = finetune.run(config)
    out = result.output_dir
    assert not list(out.rglob("*.ckpt")), "resume checkpoints outlived their finished runs"
    models = sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("model.json")
                    if (p.parent / "head.pt").is_file())  # fmt: skip
    assert models == ["model"]  # the exported one only: no run's weights kept beside it
    exported = json.loads((out / "model" / "model.json").read_text())["source"]
    best = result.summary["exported_model"]
    assert (exported["fold"], exported["repeat"]) == (best["fold"], best["repeat"])

    kept = finetune.run(dataclasses.replace(config, output_dir=str(tmp_path / "kept"),
                                            keep_run_models=True, num_exps=1))  # fmt: skip
    runs = sorted(p.parent.parent.relative_to(kept.output_dir).as_posix()
                  for p in kept.output_dir.rglob("run_*/model/model.json"))  # fmt: skip
    assert runs == [f"{fold}/run_0" for fold in kept.summary["folds"]]
