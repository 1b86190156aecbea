"""TAPT stage: Train audio only, the attention mask and padding-free negatives, short clips,
the non-finite-step guard, outputs that load with no missing or unexpected weights, resuming,
the loss's diversity weighting."""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import transformers
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from stage_callbacks import KILL_MESSAGE, CountSteps, KillAt, add_callback
from torch.utils.data import DataLoader
from transformers import Wav2Vec2ForPreTraining, Wav2Vec2Model
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from ser import artifacts, training
from ser.checkpoints import safe_torch_load
from ser.config import TaptConfig
from ser.data.datasets import AudioOnlyDataset, collate_audio
from ser.data.labels import read_label_file
from ser.data.synthetic import DemoCorpus
from ser.errors import SerInputError
from ser.models.backbones import load_backbone, load_pretraining_model, preset_config, save_backbone
from ser.stages import tapt
from ser.stages.contract import StageContext
from ser.training import build_trainer, fit, last_checkpoint

STEPS = 4


@pytest.fixture(scope="module")
def initial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretraining model saved as TAPT's input (so outputs can be compared with it)."""
    torch.manual_seed(0)
    return save_backbone(Wav2Vec2ForPreTraining(preset_config("tiny")),
                         tmp_path_factory.mktemp("initial") / "w2v2")


def _config(corpus: DemoCorpus, out: Path, backbone: Path | str = "tiny", **overrides: Any
            ) -> TaptConfig:
    values: dict[str, Any] = {
        "datadir": str(corpus.audio_dir), "labelpath": str(corpus.label_files[0]),
        "output_dir": str(out), "backbone": str(backbone), "training_step": STEPS,
        "warmup_step": 1, "checkpoint_every": 2, "batch_size": 1,  # about 4 s of audio a batch
        "keep_checkpoints": True,  # these tests read the resume points
    }
    return TaptConfig(**{**values, **overrides})


def _padded(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    wav = torch.randn(len(lengths), max(lengths), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_values": wav * mask, "attention_mask": mask}


def _module(seed: int = 0, **overrides: Any) -> tapt.TaptModule:
    torch.manual_seed(seed)
    model = Wav2Vec2ForPreTraining(preset_config("tiny", **overrides))
    return tapt.TaptModule(model, lr=1e-3, warmup_step=0, training_step=10)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- end to end -------------------------------------------------------------------------------


class _SpyDataset(AudioOnlyDataset):
    """Records, per dataset built, the files it was given and every file whose audio it read."""

    built: list[tuple[list[str], list[tuple[str, int, int]]]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read: list[tuple[str, int, int]] = []  # name, epoch, samples
        _SpyDataset.built.append((list(self.names), self.read))

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        self.read.append((item["name"], self.epoch, len(item["input_values"])))
        return item


def test_runs_every_fold_on_its_train_audio_only(
    corpus: DemoCorpus, initial: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tapt, "AudioOnlyDataset", _SpyDataset)
    monkeypatch.setattr(_SpyDataset, "built", [])
    folds = [read_label_file(path) for path in corpus.label_files]
    # 1 s crops: three to a dynamic batch of batch_size 1 (62,500 samples), so three batches
    # per epoch of a fold's 8 Train files, and STEPS = 4 reaches a second epoch.
    config = _config(corpus, tmp_path / "out", initial, labelpath="",
                     labeldir=str(corpus.label_dir), maxseqlen=1.0)
    logs = StageContext(logger_factory=lambda fold: CSVLogger(tmp_path / "logs", fold))
    result = tapt.run(config, logs)
    assert sorted(result.backbones) == [fold.name for fold in folds]
    assert (tmp_path / "out" / "config.json").is_file()
    assert len(_SpyDataset.built) == len(folds)  # one dataset per fold, in fold order
    for fold, (names, read) in zip(folds, _SpyDataset.built, strict=True):
        assert sorted(names) == sorted(fold.train)
        files = {name for name, _, _ in read}
        assert files and files <= set(fold.train)
        assert not files & (set(fold.val) | set(fold.test))
        assert max(samples for _, _, samples in read) == 16000  # cropped to maxseqlen
        assert {epoch for _, epoch, _ in read} == {0, 1}  # each epoch draws its own crops
    assert all(np.isfinite(loss) for loss in result.final_loss.values())
    start = load_pretraining_model(str(initial))
    trained = load_pretraining_model(str(result.backbones[folds[0].name]))
    # Every part trained, the convolutional feature encoder and the quantizer included.
    for name in ("wav2vec2.feature_extractor.conv_layers.0.conv.weight",
                 "wav2vec2.encoder.layers.0.attention.q_proj.weight",
                 "quantizer.codevectors", "project_q.weight"):
        assert not torch.equal(trained.state_dict()[name], start.state_dict()[name]), name
    with open(tmp_path / "logs" / folds[0].name / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"loss", "contrastive_loss", "diversity_loss", "codevector_perplexity", "lr",
            "gumbel_temperature"} <= logged
    assert len([row for row in rows if row.get("loss")]) == STEPS


@pytest.fixture
def transformers_logs() -> Iterator[None]:
    """Let transformers' loading reports (missing / unexpected keys) reach caplog."""
    transformers.utils.logging.enable_propagation()
    yield
    transformers.utils.logging.disable_propagation()


def test_output_loads_for_finetuning_and_tapt_with_every_weight_once(
    corpus: DemoCorpus, initial: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    transformers_logs: None,
) -> None:
    result = tapt.run(_config(corpus, tmp_path, initial))
    backbone_dir = next(iter(result.backbones.values()))
    model, info = Wav2Vec2ForPreTraining.from_pretrained(backbone_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        backbone = load_backbone(str(backbone_dir))
        continued = load_pretraining_model(str(backbone_dir))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, caplog.text
    assert isinstance(backbone, Wav2Vec2Model)
    _assert_same(backbone.state_dict(), model.wav2vec2.state_dict())
    _assert_same(continued.state_dict(), model.state_dict())
    # RECIPE defect 6: the checkpoint holds every weight once, under the single "model." prefix.
    ckpt = last_checkpoint(backbone_dir.parent)
    assert ckpt is not None
    state = safe_torch_load(ckpt)["state_dict"]
    assert sorted(state) == sorted(f"model.{key}" for key in model.state_dict())
    _assert_same(load_backbone(str(ckpt)).state_dict(), backbone.state_dict())


def _assert_same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], msg=key)


def test_the_module_trains_every_parameter_and_holds_each_once() -> None:
    module = _module()
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.model.parameters()}
    assert len(module.state_dict()) == len(module.model.state_dict())


# --- masks, negatives and the attention mask --------------------------------------------------


def test_negatives_are_valid_frames_of_the_same_utterance() -> None:
    model = _module().model
    batch = _padded([16000, 9000, 3000, 500, 16000])
    masks, negatives = tapt.pretraining_inputs(model, **batch)
    frames = masks.shape[1]
    frame_mask = model._get_feature_vector_attention_mask(frames, batch["attention_mask"])
    valid_counts = frame_mask.sum(1)
    assert valid_counts.tolist()[3] == 1 and valid_counts.min() < valid_counts.max()
    assert negatives.shape == (5, frames, model.config.num_negatives)
    # Never padding, always the same utterance, never the frame itself.
    assert frame_mask.flatten()[negatives].all()
    rows = torch.arange(5)[:, None, None]
    assert (negatives // frames == rows).all()
    own = (rows * frames + torch.arange(frames)[None, :, None]).expand_as(negatives)
    several = (valid_counts >= 2)[:, None, None] & frame_mask[:, :, None]
    assert not (negatives == own)[several.expand_as(negatives)].any()
    # Masks: only valid frames, at least two spans where there is room for them.
    assert not (masks & ~frame_mask).any()
    assert masks[0].sum() >= model.config.mask_time_length and masks[3].sum() == 0


def test_the_attention_mask_is_passed_to_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _module()
    seen: dict[str, Any] = {}
    forward = module.model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(module.model, "forward", spy)
    batch = _padded([16000, 6000])
    module.compute_losses(batch)
    assert torch.equal(seen["attention_mask"], batch["attention_mask"])
    assert not seen["mask_time_indices"][1, 20:].any()  # 6000 samples: 18 frames


# --- robustness -------------------------------------------------------------------------------


def test_a_batch_with_clips_shorter_than_the_mask_span_trains() -> None:
    module = _module()
    span = module.model.config.mask_time_length
    # transformers' own masking refuses a batch shorter than the span (RECIPE defect 5) ...
    with pytest.raises(ValueError, match="mask_length"):
        _compute_mask_indices((2, span - 4), 0.05, span, min_masks=2)
    optimizer = torch.optim.Adam(module.model.parameters(), lr=1e-3)
    for lengths in ([16000, 2000], [2000, 1500]):  # 6 and 4 frames: shorter than the span
        before = _weights(module.model)
        losses = module.compute_losses(_padded(lengths))
        assert losses["masked_frames"] > 0 and torch.isfinite(losses["loss"])
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        after = module.model.state_dict()
        assert all(torch.isfinite(value).all() for value in after.values())
        assert any(not torch.equal(before[k], after[k]) for k in before)


class _Record(Callback):
    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.optimizer_state_sizes: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any
                           ) -> None:
        self.after_step.append(_weights(module))
        self.optimizer_state_sizes.append(len(trainer.optimizers[0].state))


def test_a_step_with_a_non_finite_loss_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    module = _module()
    initial_weights = _weights(module)
    compute = module.compute_losses
    calls = []

    def nan_first(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        losses = compute(batch)
        calls.append(1)
        if len(calls) == 1:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(module, "compute_losses", nan_first)
    items = [{"input_values": torch.randn(n), "name": str(n)} for n in (16000, 12000)]
    loader = DataLoader(items, batch_size=2, collate_fn=collate_audio)
    record = _Record()
    config = TaptConfig()
    trainer = build_trainer(config, tmp_path, max_steps=2, callbacks=[record],
                            enable_validation=False)
    assert trainer.gradient_clip_val == 1.0  # clipping is on by default for TAPT
    with caplog.at_level(logging.WARNING, logger="ser.training"):
        fit(trainer, module, tmp_path, train_dataloaders=loader)
    assert "not finite" in caplog.text and "skipping" in caplog.text
    _assert_same(record.after_step[0], initial_weights)  # the NaN step changed nothing
    assert record.optimizer_state_sizes[0] == 0  # not even Adam's moments
    assert module.skipped_steps == 1
    final = record.after_step[1]
    assert all(torch.isfinite(v).all() for v in final.values())
    assert any(not torch.equal(final[k], initial_weights[k]) for k in final)


def test_gumbel_temperature_decays_to_its_floor() -> None:
    temperatures = [tapt.gumbel_temperature(step) for step in (0, 1000, 20000, 10**7)]
    assert temperatures[0] == 2.0 and temperatures[-1] == 0.5
    assert temperatures[0] > temperatures[1] > temperatures[2] > temperatures[3]
    module = _module()
    module.on_train_batch_start({}, 0)  # global_step 0 without a trainer
    assert module.model.quantizer.temperature == 2.0


# --- parameters and resuming ------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    ({"training_step": 0}, "training_step=0"),
    ({"lr": -1e-4}, "lr=-0.0001"),
    ({"warmup_step": 9}, "warmup_step=9"),
    ({"gradient_clip_val": -1.0}, "gradient_clip_val"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"maxseqlen": 0.01}, "maxseqlen=0.01"),
    ({"backbone": "no-such-model"}, "no-such-model"),
    ({"datadir": "/no/such/dir"}, "datadir"),
])
def test_bad_parameters_fail_before_any_output(
    corpus: DemoCorpus, tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(SerInputError, match=message):
        tapt.run(_config(corpus, tmp_path / "out", **overrides))
    assert not (tmp_path / "out").exists()


def test_a_killed_run_resumes_and_runs_only_the_remaining_steps(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(corpus, tmp_path, training_step=5, checkpoint_every=2)
    fold_dir = tmp_path / Path(corpus.label_files[0]).stem
    add_callback(monkeypatch, training, KillAt(at_step=3))
    with pytest.raises(RuntimeError, match=KILL_MESSAGE):
        tapt.run(config)
    checkpoint = last_checkpoint(fold_dir)
    assert checkpoint is not None and safe_torch_load(checkpoint)["global_step"] == 2
    assert not (fold_dir / artifacts.BACKBONE).exists()
    count = CountSteps()
    add_callback(monkeypatch, training, count)
    tapt.run(config)
    assert count.final_step == 5 and count.steps == 3
    assert (fold_dir / artifacts.BACKBONE / "config.json").is_file()
    # A finished fold is skipped: nothing trains again.
    again = CountSteps()
    add_callback(monkeypatch, training, again)
    result = tapt.run(config)
    assert again.steps == 0 and result.final_loss == {}
    assert result.backbones == {fold_dir.name: fold_dir / artifacts.BACKBONE}


# --- the loss's weighting ---------------------------------------------------------------------


def _loss_and_output(module: tapt.TaptModule, monkeypatch: pytest.MonkeyPatch
                     ) -> tuple[dict[str, torch.Tensor], Any, torch.Tensor]:
    """One batch's losses, the model output they came from and the masked-frame count."""
    seen: dict[str, Any] = {}
    forward = module.model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen["out"], seen["masks"] = forward(*args, **kwargs), kwargs["mask_time_indices"]
        return seen["out"]

    monkeypatch.setattr(module.model, "forward", spy)
    torch.manual_seed(1)
    losses = module.train().compute_losses(_padded([16000, 12000, 7000]))
    return losses, seen["out"], seen["masks"].sum()


@pytest.mark.parametrize("weight", [0.1, 0.3])
@pytest.mark.parametrize("weighting", ["original", "per_frame"])
def test_diversity_weight_relative_to_contrastive_is_the_chosen_transformers(
    monkeypatch: pytest.MonkeyPatch, weighting: str, weight: float
) -> None:
    torch.manual_seed(0)
    model = Wav2Vec2ForPreTraining(preset_config("tiny", diversity_loss_weight=weight))
    module = tapt.TaptModule(model, lr=1e-3, warmup_step=0, training_step=10,
                             diversity_weighting=weighting)
    losses, out, masked = _loss_and_output(module, monkeypatch)
    assert masked > 10
    codevectors = 2 * 16  # the tiny preset's G * V
    diversity = (codevectors - out.codevector_perplexity) / codevectors  # not x masked frames
    if weighting == "original":  # transformers 4.10: contrastive_sum + w * diversity
        expected, relative = out.contrastive_loss + weight * diversity, weight
    else:  # transformers 5 (and fairseq): the diversity term counted once per masked frame
        expected, relative = out.contrastive_loss + weight * diversity * masked, weight * masked
    torch.testing.assert_close(losses["loss"], expected / masked)
    # The weight itself: d(loss)/d(diversity) over d(loss)/d(contrastive sum).
    d_contrastive, d_perplexity = torch.autograd.grad(
        losses["loss"], [out.contrastive_loss, out.codevector_perplexity])
    d_diversity = -codevectors * d_perplexity
    torch.testing.assert_close(d_diversity / d_contrastive, torch.as_tensor(relative).float())
    # Logged as before: contrastive per masked frame, the diversity unscaled.
    torch.testing.assert_close(losses["contrastive_loss"], out.contrastive_loss.detach() / masked)
    torch.testing.assert_close(losses["diversity_loss"], diversity.detach())


def test_an_unknown_diversity_weighting_is_refused() -> None:
    with pytest.raises(ValueError, match="diversity_weighting"):
        tapt.TaptModule(Wav2Vec2ForPreTraining(preset_config("tiny")), lr=1e-3, warmup_step=0,
                        training_step=10, diversity_weighting="fairseq")
