"""What people read: no third-party tips or banners, bars that count what a stage counts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ser import console
from ser.config import TrainingConfig
from ser.progress import TrainingProgress, progress_label
from ser.training import build_trainer, fit


def test_lightning_tips_and_banners_are_dropped_and_other_lines_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    console.configure()
    lightning = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        lightning.info("💡 Tip: For seamless cloud logging, try installing litlogger")
        lightning.info("GPU available: False, used: False")
        lightning.info("Something a user must read")
    assert [r.getMessage() for r in caplog.records] == ["Something a user must read"]


class _Toy(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _bar_after(tmp_path: Path, **length: int) -> TrainingProgress:
    data = TensorDataset(torch.randn(8, 3), torch.randn(8, 1))
    trainer = build_trainer(TrainingConfig(), tmp_path / "fold_1", enable_validation=False,
                            **length)
    fit(trainer, _Toy(), tmp_path / "fold_1", train_dataloaders=DataLoader(data, batch_size=2))
    bar = trainer.progress_bar_callback
    assert isinstance(bar, TrainingProgress)
    return bar


def test_a_step_based_stage_counts_its_steps_on_one_bar_across_epochs(tmp_path: Path) -> None:
    bar = _bar_after(tmp_path, max_steps=10, every_n_train_steps=5)  # 4 batches an epoch
    shown = bar.train_progress_bar
    assert (shown.n, shown.total) == (10, 10)
    assert shown.desc.startswith("fold_1 step")
    assert "-2" not in str(shown)


def test_an_epoch_based_stage_says_which_epoch_of_how_many(tmp_path: Path) -> None:
    bar = _bar_after(tmp_path, max_epochs=3)
    assert bar.train_progress_bar.desc.startswith("fold_1 epoch 3/3")


def test_the_bar_is_labelled_with_the_fold_and_run() -> None:
    assert progress_label(Path("outputs/finetune/ab12/fold_2/run_1")) == "fold_2/run_1"
    assert progress_label(Path("outputs/tapt_pretrain/ab12/fold_2")) == "fold_2"
