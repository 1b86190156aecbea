"""P-TAPT phase 1: train the wav2vec 1.0 emotion model whose frame features clustering labels.

Per fold, only the fold's Train split is used: it is split at random (seeded) into a training
part and a validation part (``valid_fraction``, 10 % as in the original); the fold's own Val and
Test splits are never read. The model (:class:`~ser.models.emotion_w2v1.EmotionWav2Vec1`) learns
each utterance's emotion from the utterance and from every frame, with cross-entropy weighted by
the inverse class frequency of the training part. Validation runs every ``checkpoint_every``
optimizer steps and once more at the last step; the checkpoint with the lowest ``valid_loss`` is
the output, written to ``output_dir/<fold>/w2v1/`` by ``ser.models.emotion_w2v1``'s
``save_emotion_w2v1``, so that the clustering stage rebuilds it with its ``load_emotion_w2v1``.

Outputs per fold (besides ``checkpoints/``): ``split.json`` (the two parts, for the record) and
``w2v1/`` (``config.json``: model structure, classes and training summary; ``model.pt``).

Departures from the original
----------------------------
- Batches are grouped by length (``BucketBatchSampler``, fixed ``batch_size``), then cropped, as
  the original does, to their shortest item at a random offset per item. Cropping keeps padding
  out of wav2vec 1.0's GroupNorm, which normalises over the whole input (padding would change
  every feature); bucketing keeps the crop from throwing away most of a batch when one short
  clip lands among long ones, which random batches do. Our masking handles clips shorter than a
  mask span (RECIPE defect 5), so a short batch no longer crashes.
- Clips that give no 20 ms frame (under 945 samples for wav2vec_large's structure) are left out
  with a warning: the model cannot read them.
- Validation reads whole utterances one at a time (no padding, no crop, no masking), and
  ``valid_loss`` is their class-weighted mean (the training loss's weighting), so the best
  checkpoint does not depend on batch composition. Validation also runs at the last step, so the
  final weights compete for "best" too.
- Seeds: the 90/10 split, the batch order, the crops and the initialisation are all seeded.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ser import artifacts, distributed, training
from ser.atomic import atomic_write_json
from ser.audio import check_audio_files
from ser.checkpoints import safe_torch_load
from ser.config import SAMPLE_RATE, Phase1Config
from ser.data.datasets import UtteranceDataset, collate_utterances
from ser.data.labels import LabelFile
from ser.data.sampling import BucketBatchSampler, ResumableLoader
from ser.errors import SerInputError
from ser.models.emotion_w2v1 import (
    EmotionWav2Vec1,
    read_emotion_w2v1_config,
    save_emotion_w2v1,
    w2v1_frames_20ms,
)
from ser.models.wav2vec1 import (
    PRESETS,
    Wav2Vec1Config,
    Wav2Vec1Model,
    load_wav2vec1,
    receptive_field,
)
from ser.schedule import warmup_flat_decay
from ser.stages.contract import NO_CONTEXT, Stage, StageContext

log = logging.getLogger(__name__)

SPLIT_FILE = "split.json"

@dataclass
class Phase1Result:
    """Where each fold's model went, and how its training ended."""

    output_dir: Path
    model_dirs: dict[str, Path]  # fold -> output_dir/<fold>/w2v1
    best_valid_loss: dict[str, float]
    global_step: dict[str, int]


# --- data ------------------------------------------------------------------------------------


def split_train(
    items: Mapping[str, str], valid_fraction: float, seed: int
) -> tuple[dict[str, str], dict[str, str]]:
    """A seeded random split of a fold's Train items into (train, validation) parts.

    Items are sorted by name first, so the split does not depend on the label file's order. The
    validation part gets ``round(valid_fraction * n)`` items, at least one; the training part at
    least one.
    """
    names = sorted(items)
    if len(names) < 2:
        raise SerInputError(
            f"the Train split has {len(names)} usable file(s); phase 1 needs at least 2 to hold "
            "one out for validation"
        )
    num_valid = min(max(round(valid_fraction * len(names)), 1), len(names) - 1)
    order = np.random.default_rng(seed).permutation(len(names))
    valid = {names[i] for i in order[:num_valid].tolist()}
    train = {name: items[name] for name in names if name not in valid}
    return train, {name: items[name] for name in names if name in valid}


def crop_to_shortest(
    wav: torch.Tensor, lengths: torch.Tensor, rng: np.random.Generator
) -> torch.Tensor:
    """Cut every row of a padded batch to the batch's shortest item, at a random offset per row
    inside that row's own samples (so the result holds no padding)."""
    target = int(lengths.min())
    rows = [
        wav[i, start : start + target]
        for i, start in enumerate(int(rng.integers(0, n - target + 1)) for n in lengths.tolist())
    ]
    return torch.stack(rows)


def min_samples(config: Wav2Vec1Config) -> int:
    """The shortest clip (in samples) from which the phase-1 model gets one 20 ms frame."""
    samples = receptive_field(config.conv_feature_layers)
    while w2v1_frames_20ms(samples, config) < 1:
        samples += 1
    return samples


def _usable(
    items: Mapping[str, str], samples: Mapping[str, int], min_samples: int
) -> dict[str, str]:
    return {name: label for name, label in items.items() if samples[name] >= min_samples}


# --- the LightningModule ---------------------------------------------------------------------


class Phase1Module(pl.LightningModule):
    """Trains :class:`EmotionWav2Vec1`; logs ``train_loss`` per step and ``valid_loss``."""

    def __init__(
        self,
        model: EmotionWav2Vec1,
        weights: torch.Tensor,
        *,
        lr: float,
        warmup_steps: int,
        total_steps: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("class_weights", weights.clone())
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.seed = seed
        self._valid: list[tuple[str, float, float]] = []  # name, weighted loss, weight

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # Seeded by the step, so a resumed run crops as the uninterrupted one would.
        rng = np.random.default_rng([self.seed, self.global_step, batch_idx])
        wav = crop_to_shortest(batch["input_values"], batch["lengths"], rng)
        outputs = self.model(wav)
        loss = self.model.loss(outputs, batch["labels"], self.class_weights)
        self.log("train_loss", loss, batch_size=wav.size(0), prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Stopping "early" at max_steps makes Lightning validate (and checkpoint) the last step.
        if self.trainer.max_steps > 0 and self.global_step >= self.trainer.max_steps:
            self.trainer.should_stop = True

    def on_validation_epoch_start(self) -> None:
        self._valid = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        for i in range(batch["input_values"].size(0)):  # one at a time: no padding in GroupNorm
            n = int(batch["lengths"][i])
            outputs = self.model(batch["input_values"][i : i + 1, :n])
            label = batch["labels"][i : i + 1]
            loss, weight = self.model.loss(outputs, label), self.class_weights[label[0]]
            self._valid.append((batch["names"][i], float(loss * weight), float(weight)))

    def on_validation_epoch_end(self) -> None:
        # Each rank validated its own share of the held-out files: every file counts once.
        rows = [row for part in distributed.gather(self._valid) for row in part]
        rows = [rows[i] for i in distributed.first_of_each([name for name, _, _ in rows])]
        total = sum(weight for _, _, weight in rows)
        if total > 0:
            loss = sum(weighted for _, weighted, _ in rows) / total
            self.log("valid_loss", torch.tensor(loss), prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        # Only trainable parameters: the frozen feature extractor is never optimised.
        optimizer = torch.optim.Adam(self.model.trainable_parameters(), lr=self.lr)
        scheduler = warmup_flat_decay(optimizer, self.warmup_steps, self.total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


# --- the stage -------------------------------------------------------------------------------


@dataclass
class _FoldPlan:
    fold: LabelFile
    train: dict[str, str]
    valid: dict[str, str]
    weights: torch.Tensor


def run(config: Phase1Config, context: StageContext = NO_CONTEXT) -> Phase1Result:
    """Train one phase-1 model per fold; see the module docstring.

    The context's callbacks join each fold's Trainer (index: the fold's position).
    """
    config.check()
    _check_w2v1(config)
    folds = training.load_folds(config)
    classes = training.resolve_classes(config, folds)
    training.seed_everything(config.seed)  # a preset's random weights too
    base = load_wav2vec1(config.w2v1)
    samples = _samples(config, folds)
    shortest = min_samples(base.config)
    plans = [_plan_fold(config, fold, classes, samples, shortest) for fold in folds]
    output_dir = training.stage_output_dir(config, SPEC.name)
    training.save_config(config, output_dir, classes=classes)

    result = Phase1Result(output_dir, {}, {}, {})
    for index, plan in enumerate(plans):
        model_dir, summary = _run_fold(
            config, plan, base, classes, samples, output_dir, context, index
        )
        result.model_dirs[plan.fold.name] = model_dir
        result.best_valid_loss[plan.fold.name] = float(summary["best_valid_loss"])
        result.global_step[plan.fold.name] = int(summary["global_step"])
    log.info(
        "phase 1 done: %d fold model(s) in %s (best valid_loss %s)",
        len(plans),
        output_dir,
        {name: round(loss, 4) for name, loss in result.best_valid_loss.items()},
    )
    return result


def _check_w2v1(config: Phase1Config) -> None:
    if config.w2v1 not in PRESETS and not Path(config.w2v1).exists():
        raise SerInputError(
            f"w2v1={config.w2v1!r}: no such file or directory and not a preset "
            f"({', '.join(sorted(PRESETS))}); pass wav2vec_large.pt or a preset name"
        )


def _samples(config: Phase1Config, folds: list[LabelFile]) -> dict[str, int]:
    names = sorted({name for fold in folds for name in fold.train})
    found = check_audio_files([Path(config.datadir) / n for n in names], downmix=config.downmix)
    return {name: found[str(Path(config.datadir) / name)] for name in names}


def _plan_fold(
    config: Phase1Config,
    fold: LabelFile,
    classes: list[str],
    samples: Mapping[str, int],
    shortest: int,
) -> _FoldPlan:
    """Split and weights of one fold, checked before any fold trains."""
    usable = _usable(fold.train, samples, shortest)
    dropped = sorted(set(fold.train) - set(usable))
    if dropped:
        log.warning(
            "%s: leaving out %d Train clip(s) shorter than %d samples, which give no 20 ms frame "
            "(e.g. %s); remove them from the label file to silence this",
            fold.path,
            len(dropped),
            shortest,
            dropped[:3],
        )
    try:
        train, valid = split_train(usable, config.valid_fraction, config.seed)
    except SerInputError as err:
        raise SerInputError(f"{fold.path}: {err}") from err
    weights = training.class_weights(
        list(train.values()), classes, f"the training part of {fold.path}"
    )
    return _FoldPlan(fold, train, valid, torch.tensor(weights, dtype=torch.float32))


def _run_fold(
    config: Phase1Config,
    plan: _FoldPlan,
    base: Wav2Vec1Model,
    classes: list[str],
    samples: Mapping[str, int],
    output_dir: Path,
    context: StageContext,
    index: int,
) -> tuple[Path, dict[str, Any]]:
    fold_dir = output_dir / plan.fold.name
    model_dir = fold_dir / artifacts.W2V1
    if (model_dir / artifacts.CONFIG_JSON).is_file():
        summary = read_emotion_w2v1_config(model_dir)["training"]
        log.info("%s: phase-1 model already in %s; skipping the fold", plan.fold.name, model_dir)
        training.drop_checkpoints(fold_dir, config)  # left by a kill after the model
        return model_dir, summary
    if distributed.is_zero():
        atomic_write_json(
            fold_dir / SPLIT_FILE, {"train": sorted(plan.train), "valid": sorted(plan.valid)}
        )
    training.seed_everything(config.seed)
    model = EmotionWav2Vec1(copy.deepcopy(base), len(classes))
    module = Phase1Module(
        model,
        plan.weights,
        lr=config.lr,
        warmup_steps=int(config.warmup_fraction * config.training_step),
        total_steps=config.training_step,
        seed=config.seed,
    )
    trainer = training.build_trainer(
        config,
        fold_dir,
        max_steps=config.training_step,
        monitor="valid_loss",
        mode="min",
        every_n_train_steps=None,  # checkpoints follow each validation, with its fresh loss
        val_check_interval=config.checkpoint_every * config.accumulate_grad_batches,
        logger=context.logger(plan.fold.name),
        callbacks=[training.SetDatasetEpoch(), *context.callbacks(index, plan.fold.name)],
    )
    train_loader, valid_loader = _loaders(config, plan, classes, samples)
    training.fit(
        trainer, module, fold_dir, train_dataloaders=train_loader, val_dataloaders=valid_loader
    )

    best = training.best_checkpoint(trainer)
    if best is None or not best.is_file():
        raise RuntimeError(f"{fold_dir}: training ended without a validated checkpoint")
    checkpoint = safe_torch_load(best)
    prefix = "model."
    state = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    model.load_state_dict(state)
    summary = {
        "best_checkpoint": best.name,
        "best_valid_loss": float(trainer.checkpoint_callback.best_model_score),
        "best_step": int(checkpoint["global_step"]),
        "global_step": int(trainer.global_step),
        "train_files": len(plan.train),
        "valid_files": len(plan.valid),
    }
    training.finish_fold(
        fold_dir, config, lambda: save_emotion_w2v1(model, model_dir, classes, training=summary)
    )
    log.info(
        "%s: phase-1 model from step %d (valid_loss %.4f) written to %s",
        plan.fold.name,
        summary["best_step"],
        summary["best_valid_loss"],
        model_dir,
    )
    return model_dir, summary


def _loaders(
    config: Phase1Config,
    plan: _FoldPlan,
    classes: list[str],
    samples: Mapping[str, int],
) -> tuple[DataLoader, DataLoader]:
    max_samples = int(config.maxseqlen * SAMPLE_RATE)
    train = UtteranceDataset(
        config.datadir,
        plan.train,
        classes,
        max_samples=max_samples,
        train=True,
        seed=config.seed,
        downmix=config.downmix,
        lengths=samples,
    )
    sampler = BucketBatchSampler(
        train.lengths,
        batch_size=config.batch_size,
        num_buckets=training.NUM_BUCKETS,
        max_len=max_samples,
        seed=config.seed,
    )
    valid = UtteranceDataset(
        config.datadir, plan.valid, classes, downmix=config.downmix, lengths=samples
    )
    return (
        ResumableLoader(
            train,
            sampler,
            collate_fn=collate_utterances,
            **training.loader_options(config),
        ),
        DataLoader(  # its own generator, as finetune.eval_loader's
            valid, batch_size=1, sampler=distributed.shard(range(len(valid))),
            collate_fn=collate_utterances, generator=torch.Generator(),
            **training.loader_options(config),
        ),
    )


SPEC = Stage(
    name="pretrain_w2v1", config_cls=Phase1Config, run=run, inputs=("w2v1",),
    outputs=(artifacts.W2V1,),
)
