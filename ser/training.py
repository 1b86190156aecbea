"""What every training stage shares: precision, seeds, checkpoints, resuming, the Trainer itself.

Lightning does the work (loops, mixed precision, accumulation, clipping, checkpointing); this module
only turns a :class:`~ser.config.TrainingConfig` into a Trainer the same way for every stage.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from ser.config import TrainingConfig
from ser.errors import SerInputError

log = logging.getLogger(__name__)

PRECISIONS = ("32", "16-mixed", "bf16-mixed")
CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


def resolve_precision(precision: str, cuda: bool | None = None) -> str:
    """The Lightning precision to use here; GPU precisions fall back to 32 on a CPU-only machine."""
    if precision not in PRECISIONS:
        raise SerInputError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    has_cuda = torch.cuda.is_available() if cuda is None else cuda
    if precision != "32" and not has_cuda:
        warnings.warn(
            f"precision={precision} needs a GPU and none is visible; training in 32-bit instead. "
            "Pass --precision 32 to silence this.",
            stacklevel=2,
        )
        return "32"
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        warnings.warn(
            "this GPU has no bf16; training with 16-mixed (fp16 with loss scaling) instead.",
            stacklevel=2,
        )
        return "16-mixed"
    return precision


def stage_output_dir(config: TrainingConfig | Any, stage: str) -> Path:
    return Path(config.output_dir or f"outputs/{stage}")


def last_checkpoint(output_dir: Path) -> Path | None:
    """``last.ckpt`` of an earlier, interrupted run of the same stage in ``output_dir``."""
    path = output_dir / CHECKPOINT_DIR / LAST
    return path if path.is_file() else None


class _Checkpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` follows every validation, not only a new best.

    Lightning refreshes ``last.ckpt`` only when it writes a top-k file, so with a monitored
    metric a resumed run would restart from the last *best* validation instead of the last one.
    """

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Once-per-epoch validation saves here, not at validation end.
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        if self.monitor is not None and not self._should_skip_saving_checkpoint(trainer):
            # (the skip check is true right after a save at this step)
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def build_trainer(
    config: TrainingConfig,
    output_dir: Path,
    *,
    max_steps: int = -1,
    max_epochs: int | None = None,
    monitor: str | None = None,
    mode: str = "max",
    every_n_train_steps: int | None = None,
    logger: Any = False,
    callbacks: Sequence[Callback] = (),
    enable_validation: bool = True,
    val_check_interval: int | None = None,
) -> pl.Trainer:
    """A Trainer that checkpoints into ``output_dir/checkpoints`` (best ``save_top_k`` and last).

    ``val_check_interval``: validate every that many training batches, counted across epochs
    (step-based stages); None: once per epoch. Pair it with ``every_n_train_steps=None`` and a
    ``monitor``, so checkpoints are written after each validation, with its fresh metric.
    """
    checkpoint = _Checkpoint(
        dirpath=output_dir / CHECKPOINT_DIR,
        filename="{epoch}-{step}",
        monitor=monitor,
        mode=mode,
        save_top_k=config.save_top_k if monitor else 1,
        save_last=True,
        every_n_train_steps=every_n_train_steps,
    )
    return pl.Trainer(
        accelerator=config.accelerator,
        devices=_devices(config.devices),
        precision=resolve_precision(config.precision),
        max_steps=max_steps,
        max_epochs=max_epochs,
        accumulate_grad_batches=config.accumulate_grad_batches,
        gradient_clip_val=config.gradient_clip_val or None,
        callbacks=[checkpoint, *callbacks],
        logger=logger,
        default_root_dir=output_dir,
        limit_val_batches=None if enable_validation else 0,
        val_check_interval=val_check_interval,
        check_val_every_n_epoch=None if val_check_interval else 1,
        num_sanity_val_steps=0,
        # Our BucketBatchSampler shards batches across ranks itself (equal counts per rank).
        use_distributed_sampler=False,
        log_every_n_steps=1,
        deterministic=False,
        enable_model_summary=False,
    )


def fit(trainer: pl.Trainer, module: pl.LightningModule, output_dir: Path, **loaders: Any) -> None:
    """``trainer.fit``, resuming from ``last.ckpt`` when an earlier run left one."""
    resume = last_checkpoint(output_dir)
    if resume is not None:
        log.info("resuming from %s", resume)
    trainer.fit(module, ckpt_path=resume, **loaders)


def best_checkpoint(trainer: pl.Trainer) -> Path | None:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback else ""
    return Path(path) if path else None


def _devices(devices: str) -> int | str:
    return int(devices) if devices.isdigit() else devices
