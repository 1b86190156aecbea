"""TAPT: continue wav2vec 2.0's self-supervised pretraining on the task's own audio.

wav2vec 2.0 only: the loss needs its quantizer and contrastive head (``Wav2Vec2ForPreTraining``).
A backbone of another family (HuBERT, WavLM, data2vec-audio) is refused by the config check
(``TaptConfig.check``, from the spec's preset name or config files) before any work; P-TAPT is
the task-adaptive pretraining for those.

Per fold, a ``Wav2Vec2ForPreTraining`` (backbone, quantizer and projection heads) trains on the
fold's Train audio only, with every parameter trainable (the convolutional encoder too) and
transformers' own loss: contrastive loss over masked frames plus the codebook diversity loss.
This stage draws the inputs that loss needs: time masks with the model config's
``mask_time_prob`` and ``mask_time_length`` (at least two spans, valid frames only) and, for
every frame, ``num_negatives`` distractor frames from the same utterance's valid frames.

Output per fold (see ``ser.training`` for the layout): ``<fold>/backbone/``, the whole
``Wav2Vec2ForPreTraining`` written by ``save_pretrained``. Fine-tuning loads it with
``ser.models.backbones.load_backbone`` (which takes its ``wav2vec2`` part); passing it to TAPT
again as ``backbone`` continues pretraining with the quantizer it learnt. ``<fold>/checkpoints/``
holds ``last.ckpt`` (the resume point, itself a backbone spec thanks to ``model.json`` beside it).

Departures from the original
----------------------------
- The attention mask is passed to the model, and negatives are drawn from valid frames only, so
  padding is neither attended to nor used as a distractor (RECIPE defect 3).
- Masks are drawn with ``ser.models.masking.time_mask``, per utterance inside its valid frames;
  an utterance shorter than the mask span gets a shorter span instead of crashing (defect 5).
- Negatives come from every valid frame of the utterance, as transformers' pretraining example
  draws them; transformers 4.10, which the original used, drew them inside the model from every
  frame of the padded batch row.
- The loss weighs its two terms as transformers 4.10 (the original's) did, with
  ``diversity_weighting="original"`` (the default): ``contrastive_sum + w * diversity``, ``w`` the
  model config's ``diversity_loss_weight`` (0.1) and ``diversity = (G*V - perplexity) / (G*V)``
  once per batch. transformers 5 (as fairseq's criterion) multiplies the diversity term by the
  batch's number of masked frames, which makes it that many times heavier relative to the
  contrastive term than in the paper's runs (on the order of a thousand with 250 s batches);
  ``"per_frame"`` trains with that weighting. Either way the whole loss is then divided by the
  number of masked frames (not in the original), so that gradient clipping (below) sees a size
  that does not grow with the batch. That leaves the two terms' relative weight as chosen; Adam
  is nearly insensitive to the overall scale, and batches, of similar audio size, weigh about
  alike either way. The logged ``contrastive_loss`` is per masked frame, ``diversity_loss`` the
  unscaled diversity.
- Gradient clipping at norm 1.0 (``gradient_clip_val``), and an optimizer step whose loss or
  gradients are not finite is skipped with a warning instead of poisoning the weights (defect 4:
  the original reportedly diverged to NaN under fp16). Under ``16-mixed`` the gradient scaler
  already skips such steps and lowers its scale, so nothing more is done there.
- The Gumbel softmax temperature decays as in transformers' pretraining example and fairseq's
  wav2vec 2.0 recipe, ``max(2.0 * 0.999995 ** step, 0.5)``; the original kept transformers'
  fixed 2.0 (over 20,000 steps the decay reaches about 1.81, a small difference).
- The LightningModule holds the pretraining model once (the original also registered its
  backbone a second time, so checkpoints held every backbone weight twice: defect 6).
- Dynamic batches keep the last, partly filled batch of each epoch (the corpora can be small).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import Logger
from transformers import Wav2Vec2ForPreTraining
from transformers.models.wav2vec2.modeling_wav2vec2 import _sample_negative_indices

from ser import artifacts, training
from ser.config import DIVERSITY_WEIGHTINGS, SAMPLE_RATE, TaptConfig
from ser.data.datasets import AudioOnlyDataset, collate_audio
from ser.data.frames import conv_output_length
from ser.data.labels import LabelFile
from ser.models.backbones import (
    load_pretraining_model,
    save_backbone,
    set_gradient_checkpointing,
)
from ser.models.heads import ensure_mask_embedding
from ser.models.masking import time_mask
from ser.schedule import warmup_flat_decay
from ser.stages.contract import NO_CONTEXT, Stage, StageContext

log = logging.getLogger(__name__)

MIN_MASKS = 2  # RECIPE: at least two masked spans per utterance
# Gumbel temperature schedule of transformers' pretraining example (and fairseq's base recipe).
GUMBEL_MAX, GUMBEL_MIN, GUMBEL_DECAY = 2.0, 0.5, 0.999995


@dataclass
class TaptResult:
    """Where TAPT wrote each fold's backbone, and the last training loss of the folds it ran."""

    output_dir: Path
    backbones: dict[str, Path] = field(default_factory=dict)
    final_loss: dict[str, float] = field(default_factory=dict)  # folds trained in this call


def gumbel_temperature(step: int) -> float:
    return max(GUMBEL_MAX * GUMBEL_DECAY**step, GUMBEL_MIN)


def sample_negatives(frame_mask: torch.Tensor, num_negatives: int) -> torch.Tensor:
    """Flat frame indices ``[B, F, num_negatives]`` into the ``B * F`` frames of a batch.

    A valid frame's negatives are other valid frames of its own utterance (transformers'
    ``_sample_negative_indices`` with the frame-level attention mask), so padding is never a
    negative. Every other entry (padding, or an utterance with fewer than two frames, which
    ``time_mask`` never masks and so never scores) points at its utterance's first frame.
    """
    valid = frame_mask.detach().cpu().numpy().astype(bool)
    batch, frames = valid.shape
    indices = np.repeat(np.arange(batch) * frames, frames * num_negatives)
    indices = indices.reshape(batch, frames, num_negatives)
    # transformers draws from valid_count - 1 candidates, so it needs at least two valid frames.
    rows = np.flatnonzero(valid.sum(axis=1) >= 2)
    if len(rows):
        drawn = _sample_negative_indices((len(rows), frames), num_negatives, valid[rows])
        # transformers offsets by the row's position in the array it was given; re-offset.
        shift = (rows - np.arange(len(rows))) * frames
        drawn = drawn.astype(np.int64) + shift[:, None, None]
        row_valid = valid[rows][:, :, None]
        indices[rows] = np.where(row_valid, drawn, indices[rows])
    return torch.from_numpy(indices).to(frame_mask.device)


def pretraining_inputs(
    model: Wav2Vec2ForPreTraining, input_values: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask_time_indices [B, F]`` (bool) and ``sampled_negative_indices [B, F, N]`` for a
    zero-padded batch and its sample-level ``attention_mask`` (1 = real sample)."""
    config = model.config
    frames = conv_output_length(input_values.shape[1], config.conv_kernel, config.conv_stride)
    frame_mask = model._get_feature_vector_attention_mask(frames, attention_mask, add_adapter=False)
    lengths = frame_mask.sum(dim=1)
    masks = time_mask(lengths, frames, config.mask_time_prob, config.mask_time_length, MIN_MASKS)
    negatives = sample_negatives(frame_mask, config.num_negatives)
    return masks & frame_mask, negatives


class TaptModule(pl.LightningModule):
    """Continued pretraining of a ``Wav2Vec2ForPreTraining`` held at ``model`` (the checkpoint
    convention of ``ser.models.backbones``), every parameter trainable."""

    def __init__(
        self, model: Wav2Vec2ForPreTraining, *, lr: float, warmup_step: int, training_step: int,
        diversity_weighting: str = "original",
    ) -> None:
        super().__init__()
        if diversity_weighting not in DIVERSITY_WEIGHTINGS:
            raise ValueError(f"diversity_weighting must be one of {DIVERSITY_WEIGHTINGS}, "
                             f"got {diversity_weighting!r}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        model.requires_grad_(True)
        # transformers' conv encoder checks this flag, not requires_grad, before tracking grads.
        model.wav2vec2.feature_extractor._requires_grad = True
        # The mask embedding replaces masked frames; a config with mask_time_prob 0 has none.
        ensure_mask_embedding(model.wav2vec2)
        self._loss_not_finite = False
        self.skipped_steps = 0

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss weighted by ``diversity_weighting`` and divided by the number of masked
        frames (see the module docstring), its two terms, and the codevector perplexity."""
        inputs, attention = batch["input_values"], batch["attention_mask"]
        masks, negatives = pretraining_inputs(self.model, inputs, attention)
        out = self.model(
            inputs,
            attention_mask=attention,
            mask_time_indices=masks,
            sampled_negative_indices=negatives,
        )
        masked = masks.sum().clamp(min=1)
        return {
            "loss": self._weighted_loss(out) / masked,
            "contrastive_loss": out.contrastive_loss.detach() / masked,
            "diversity_loss": out.diversity_loss.detach() / masked,
            "codevector_perplexity": out.codevector_perplexity.detach(),
            "masked_frames": masked.detach().float(),
        }

    def _weighted_loss(self, out: Any) -> torch.Tensor:
        if self.hparams.diversity_weighting == "per_frame":
            return out.loss  # transformers 5: contrastive sum + w * diversity * masked frames
        # transformers 4.10: the diversity term once per batch, not once per masked frame.
        config = self.model.config
        codevectors = config.num_codevectors_per_group * config.num_codevector_groups
        diversity = (codevectors - out.codevector_perplexity) / codevectors
        return out.contrastive_loss + config.diversity_loss_weight * diversity

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.model.set_gumbel_temperature(gumbel_temperature(self.global_step))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        loss = losses["loss"]
        # OR over the micro-batches of one optimizer step (gradient accumulation).
        self._loss_not_finite |= not bool(torch.isfinite(loss.detach()))
        size = len(batch["input_values"])
        self.log("loss", loss.detach(), prog_bar=True, batch_size=size)
        for name in ("contrastive_loss", "diversity_loss", "codevector_perplexity",
                     "masked_frames"):
            self.log(name, losses[name], batch_size=size)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=size)
        self.log("gumbel_temperature", float(self.model.quantizer.temperature), batch_size=size)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        training.skip_non_finite_step(self, optimizer, self._loss_not_finite)
        self._loss_not_finite = False

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.hparams.lr)
        scheduler = warmup_flat_decay(
            optimizer, self.hparams.warmup_step, self.hparams.training_step
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "step"}}


def run(config: TaptConfig, context: StageContext = NO_CONTEXT) -> TaptResult:
    """TAPT on every fold (module docstring); a fold whose backbone exists is skipped."""
    config.check()
    folds = training.load_folds(config)
    training.require_train_audio(folds)
    training.seed_everything(config.seed)  # preset backbones are drawn from the seed
    initial = load_pretraining_model(config.backbone)
    output_dir = training.stage_output_dir(config, SPEC.name)
    training.save_config(config, output_dir)
    result = TaptResult(output_dir=output_dir)
    for index, fold in enumerate(folds):
        hooks = (context.logger(fold.name), context.callbacks(index, fold.name))
        path, loss = _run_fold(config, fold, initial, output_dir / fold.name, hooks)
        result.backbones[fold.name] = path
        if loss is not None:
            result.final_loss[fold.name] = loss
    log.info(
        "TAPT: %d fold(s) (%d trained now), backbones in %s/<fold>/%s",
        len(folds), len(result.final_loss), output_dir, artifacts.BACKBONE,
    )
    return result


def _run_fold(
    config: TaptConfig,
    fold: LabelFile,
    initial: Wav2Vec2ForPreTraining,
    fold_dir: Path,
    hooks: tuple[Logger | bool, list[Callback]],
) -> tuple[Path, float | None]:
    target = fold_dir / artifacts.BACKBONE
    logger, callbacks = hooks
    if (target / "config.json").is_file():
        log.info("TAPT fold %s: already done, its backbone is in %s; skipping", fold.name, target)
        training.drop_checkpoints(fold_dir, config)  # left by a kill after the backbone
        return target, None
    training.seed_everything(config.seed)
    # Train audio only: the fold's Val and Test files must stay unseen until evaluation.
    dataset = AudioOnlyDataset(
        config.datadir,
        list(fold.train),
        max_samples=int(config.maxseqlen * SAMPLE_RATE),
        train=True,
        seed=config.seed,
        downmix=config.downmix,
    )
    loader = training.dynamic_batch_loader(dataset, dataset.lengths, config, collate_audio)
    module = TaptModule(
        copy.deepcopy(initial),
        lr=config.lr,
        warmup_step=config.warmup_step,
        training_step=config.training_step,
        diversity_weighting=config.diversity_weighting,
    )
    set_gradient_checkpointing(module.model, config.gradient_checkpointing)
    trainer = training.build_trainer(
        config,
        fold_dir,
        max_steps=config.training_step,
        every_n_train_steps=config.checkpoint_every,
        logger=logger,
        callbacks=[training.SetDatasetEpoch(), training.WriteModelJson(module.model.config),
                   *callbacks],
        enable_validation=False,
    )
    training.fit(trainer, module, fold_dir, train_dataloaders=loader)
    training.finish_fold(fold_dir, config, lambda: save_backbone(module.model, target))
    loss = trainer.callback_metrics.get("loss")
    final = float(loss) if loss is not None else float("nan")
    log.info(
        "TAPT fold %s: %d steps on %d Train files (last loss %.4f, %d steps skipped as "
        "non-finite); backbone written to %s",
        fold.name, trainer.global_step, len(dataset), final, module.skipped_steps, target,
    )
    return target, final


SPEC = Stage(
    name="tapt_pretrain", config_cls=TaptConfig, run=run, inputs=("backbone",),
    outputs=(artifacts.BACKBONE,),
)
