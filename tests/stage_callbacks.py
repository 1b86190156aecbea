"""Lightning callbacks the stage tests use to kill a run at a step and to count the steps run."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from ser.training import build_trainer

KILL_MESSAGE = "simulated kill"


class KillAt(Callback):
    """Raise before the batch at global step ``at_step`` runs, as a killed process would stop."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError(f"{KILL_MESSAGE} at step {self.at_step}")


class CountSteps(Callback):
    """The number of training batches run, and the global step the training ended at."""

    def __init__(self) -> None:
        self.steps = 0
        self.final_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.steps += 1

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.final_step = trainer.global_step


def add_callback(
    monkeypatch: pytest.MonkeyPatch, stage_module: ModuleType, callback: Callback
) -> None:
    """Give every Trainer that ``stage_module`` builds ``callback`` too.

    It wraps the real :func:`ser.training.build_trainer`, not the module's current one, so a
    second call replaces the callback of the first instead of adding to it.
    """

    def build(*args: Any, callbacks: Any = (), **kwargs: Any) -> pl.Trainer:
        return build_trainer(*args, callbacks=[*callbacks, callback], **kwargs)

    monkeypatch.setattr(stage_module, "build_trainer", build)
