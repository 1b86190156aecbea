from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ser.config import TrainingConfig
from ser.errors import SerInputError, TrainingDiverged
from ser.schedule import warmup_flat_decay, warmup_flat_decay_factor
from ser.training import build_trainer, class_weights, fit, last_checkpoint, resolve_precision


def test_schedule_warms_up_holds_then_decays_to_zero() -> None:
    total, warmup = 100, 10
    factors = [warmup_flat_decay_factor(s, warmup, total, 0.05) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10:15] == [1.0] * 5  # 5 % of 100 steps flat
    assert all(a >= b for a, b in zip(factors[15:], factors[16:], strict=False))
    assert factors[-1] == pytest.approx(1 / 85)  # last step still trains, then 0
    assert warmup_flat_decay_factor(total, warmup, total, 0.05) == 0.0


def test_schedule_drives_the_optimizer() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1e-3)
    scheduler = warmup_flat_decay(optimizer, warmup=4, total=20)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])


def test_gpu_precision_falls_back_on_cpu_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="needs a GPU"):
        assert resolve_precision("16-mixed", cuda=False) == "32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("32", cuda=False) == "32"
    with pytest.raises(SerInputError, match="precision='16'"):
        resolve_precision("16")


class _Toy(pl.LightningModule):
    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.stop_at = stop_at
        self.steps_run = 0

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.stop_at is not None and self.global_step == self.stop_at:
            raise RuntimeError("killed")
        self.steps_run += 1
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(8, 3, generator=generator), torch.randn(8, 1, generator=generator)
    data = TensorDataset(inputs, targets)
    return DataLoader(data, batch_size=2)


def _train(output: Path, stop_at: int | None, by_epoch: bool = False) -> _Toy:
    torch.manual_seed(0)
    module = _Toy(stop_at)
    steps = {"max_epochs": 3} if by_epoch else {"max_steps": 10, "every_n_train_steps": 4}
    trainer = build_trainer(TrainingConfig(), output, enable_validation=False, **steps)
    fit(trainer, module, output, train_dataloaders=_loader())
    return module


def test_an_epoch_based_run_without_validation_resumes_from_its_last_epoch(
    tmp_path: Path,
) -> None:
    # Fine-tuning on IEMOCAP's folds: no Val split, so no monitored checkpoint; each epoch end
    # still leaves a resume point.
    with pytest.raises(RuntimeError, match="killed"):
        _train(tmp_path, stop_at=9, by_epoch=True)  # 4 steps an epoch: dies in epoch 2
    last = last_checkpoint(tmp_path)
    assert last is not None and torch.load(last, weights_only=True)["global_step"] == 8
    assert _train(tmp_path, None, by_epoch=True).steps_run == 4  # only the last epoch again


def test_interrupted_run_resumes_from_last_checkpoint(tmp_path: Path) -> None:
    reference = _train(tmp_path / "straight", None)
    out = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="killed"):
        _train(out, stop_at=9)  # checkpoints at steps 4 and 8 (epoch ends), then dies at 9
    assert last_checkpoint(out) is not None
    assert torch.load(last_checkpoint(out), weights_only=True)["global_step"] == 8
    resumed = _train(out, None)
    assert resumed.trainer.global_step == 10
    assert resumed.steps_run == 2  # only the steps after the checkpoint were trained again
    # resumed at an epoch boundary, the run is the uninterrupted one, step for step
    torch.testing.assert_close(resumed.layer.weight, reference.layer.weight)


def test_class_weights_are_normalised_inverse_frequencies() -> None:
    # N = 6, counts 3, 1, 2: N / n = 2, 6, 3, normalised by 11.
    weights = class_weights(list("aaabcc"), ["a", "b", "c"], "here")
    assert weights == pytest.approx([2 / 11, 6 / 11, 3 / 11])
    with pytest.raises(SerInputError, match=r"here has no utterance of class\(es\) \['c'\]"):
        class_weights(["a", "b"], ["a", "b", "c"], "here")


class _Diverging(_Toy):
    """Its loss turns NaN from ``nan_from`` on; ``skips``: it drops those steps' gradients, as
    TAPT does, so the weights stay finite and only the run of NaN losses can stop it."""

    def __init__(self, nan_from: int, skips: bool) -> None:
        super().__init__()
        self.nan_from, self.skips = nan_from, skips

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= self.nan_from else loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.skips and self.global_step >= self.nan_from:
            optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize(("skips", "stopped_at", "what"), [
    (False, 4, "weight tensor"),  # NaN weights from step 3: refused before the step-4 checkpoint
    (True, 13, "the loss has not been finite for 10 steps in a row"),
])
def test_a_run_whose_loss_or_weights_stop_being_finite_is_stopped(
    tmp_path: Path, skips: bool, stopped_at: int, what: str
) -> None:
    torch.manual_seed(0)
    module = _Diverging(nan_from=3, skips=skips)
    trainer = build_trainer(TrainingConfig(), tmp_path, enable_validation=False, max_steps=20,
                            every_n_train_steps=4)
    with pytest.raises(TrainingDiverged, match=what) as raised:
        fit(trainer, module, tmp_path, train_dataloaders=_loader())
    assert f"stopped at step {stopped_at}" in str(raised.value)
    saved = last_checkpoint(tmp_path)  # no checkpoint holds a NaN weight
    assert saved is None or all(
        torch.isfinite(t).all() for t in torch.load(saved, weights_only=True)["state_dict"].values()
    )
