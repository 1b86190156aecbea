"""The training progress bar of every ser Trainer (see ``ser.console`` for the rest of what
people read): labelled with the fold and run, counting steps for step-based stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar


class TrainingProgress(TQDMProgressBar):
    """One training bar per Trainer, labelled with what trains.

    Step-based stages (``max_steps``) count optimizer steps out of ``max_steps`` on one bar
    across epochs, starting where a resumed run starts; epoch-based ones count the epoch's
    batches and say ``epoch e/E``.
    """

    def __init__(self, label: str) -> None:
        super().__init__(leave=False)
        self.label = label

    @staticmethod
    def step_based(trainer: pl.Trainer) -> bool:
        return trainer.max_steps > 0 and trainer.max_epochs in (None, -1)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self.step_based(trainer):
            super().on_train_epoch_start(trainer, *args)
            self.train_progress_bar.set_description(
                f"{self.label} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")
            return
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # the run's first epoch (resumed or not)
            bar.reset(total=trainer.max_steps)
            bar.n = bar.initial = trainer.global_step
            bar.set_description(f"{self.label} step")
            bar.refresh()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        if not self.step_based(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        if self._should_update(trainer.global_step, trainer.max_steps) and not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Step-based: the bar goes on into the next epoch; it closes when training ends.
        if not self.step_based(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's run id, not a number anyone reads here
        return metrics


def progress_label(output_dir: Path) -> str:
    """``<fold>`` or ``<fold>/run_<r>``: what a Trainer writing into ``output_dir`` trains."""
    if output_dir.name.startswith("run_"):
        return f"{output_dir.parent.name}/{output_dir.name}"
    return output_dir.name or "training"
