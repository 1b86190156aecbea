"""What the stages that classify utterances (fine-tuning, the probe) share: folds checked for
training, evaluation over whole splits, the record of one run, and which run is exported.

UA is a property of a whole split, not an average of per-batch values, so evaluation gathers
every utterance's logits first (from every rank under data parallelism) and scores them once.
Which run is exported: picking the best *test* UA would select on the test set, so the best
*validation* UA is, and without a Val split the first fold's first run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ser import artifacts, distributed, training
from ser.data.labels import LabelFile
from ser.errors import SerInputError
from ser.metrics import Scores, score

log = logging.getLogger(__name__)


def check_folds(folds: Sequence[LabelFile], classes: list[str]) -> dict[str, list[float]]:
    """Each fold's inverse-frequency class weights; refuses folds that cannot be trained or
    tested (an empty Train or Test split, a class without Train utterances)."""
    weights = {}
    for fold in folds:
        for split, items in (("Train", fold.train), ("Test", fold.test)):
            if not items:
                raise SerInputError(f"label file {fold.path}: the {split} split is empty")
        absent = sorted(set(classes) - set(fold.train.values()))
        if absent:
            raise SerInputError(
                f"label file {fold.path}: no Train utterance of class(es) {absent}, so the "
                "class weights (inverse frequency) are undefined; add Train data for them or "
                f"leave them out of --classes"
            )
        weights[fold.name] = training.class_weights(
            list(fold.train.values()), classes, f"the Train split of {fold.path}"
        )
    return weights


class SplitEvaluation(pl.LightningModule):
    """Validation and test over whole splits for a classifier with ``self.classes`` and a
    ``class_weights`` buffer: validation logs ``valid_UA``, ``valid_WA`` and ``valid_loss``; a
    test leaves its :class:`~ser.metrics.Scores` in ``test_scores`` and every utterance's
    predicted class in ``test_predictions``. Subclasses say how a batch becomes logits."""

    classes: list[str]
    class_weights: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self._outputs: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []
        self.test_scores: Scores | None = None
        self.test_predictions: dict[str, str] = {}

    def batch_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def on_validation_epoch_start(self) -> None:
        self._outputs = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def on_validation_epoch_end(self) -> None:
        logits, labels, _ = self._gathered()
        scores = self._validation_scores(labels.tolist(), logits.argmax(-1).tolist())
        loss = F.cross_entropy(logits, labels, weight=self.class_weights.cpu())
        self.log("valid_UA", scores.ua, prog_bar=True)
        self.log("valid_WA", scores.wa)
        self.log("valid_loss", loss)

    def _validation_scores(self, labels: list[int], preds: list[int]) -> Scores:
        return score(labels, preds, self.classes)

    def on_test_epoch_start(self) -> None:
        self._outputs = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def on_test_epoch_end(self) -> None:
        logits, labels, names = self._gathered()
        preds = logits.argmax(-1).tolist()
        self.test_scores = score(labels.tolist(), preds, self.classes)
        self.test_predictions = {
            name: self.classes[p] for name, p in zip(names, preds, strict=True)
        }
        for key, value in (("UA", self.test_scores.ua), ("WA", self.test_scores.wa),
                           ("F1", self.test_scores.f1)):
            self.log(f"test_{key}", value)

    def _collect(self, batch: dict[str, Any]) -> None:
        logits = self.batch_logits(batch)
        self._outputs.append((logits.detach().float().cpu(), batch["labels"].cpu(),
                              list(batch["names"])))

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Every utterance of the split, from every rank (each evaluated one share of it)."""
        mine = (
            torch.cat([out[0] for out in self._outputs]) if self._outputs
            else torch.zeros(0, len(self.classes)),
            torch.cat([out[1] for out in self._outputs]) if self._outputs
            else torch.zeros(0, dtype=torch.long),
            [name for out in self._outputs for name in out[2]],
        )  # fmt: skip
        self._outputs = []
        parts = distributed.gather(mine)
        names = [name for part in parts for name in part[2]]
        keep = distributed.first_of_each(names)
        return (torch.cat([p[0] for p in parts])[keep], torch.cat([p[1] for p in parts])[keep],
                [names[i] for i in keep])  # fmt: skip


def run_record(
    job: Any, module: SplitEvaluation, trainer: pl.Trainer, tested: Path, output_dir: Path
) -> dict[str, Any]:
    """``results.json`` of one run (``job``: fold, repeat, seed): its test scores, which
    checkpoint was tested, sizes, and every test utterance's prediction."""
    assert module.test_scores is not None  # set by trainer.test
    has_val = bool(job.fold.val)
    best = getattr(trainer.checkpoint_callback, "best_model_score", None)
    return {
        "fold": job.fold.name,
        "repeat": job.repeat,
        "seed": job.seed,
        "classes": module.classes,
        "scores": module.test_scores.as_dict(),
        "valid_UA": float(best) if has_val and best is not None else None,
        "tested": "best" if has_val else "last",
        "checkpoint": tested.resolve().relative_to(output_dir.resolve()).as_posix(),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "num_train": len(job.fold.train),
        "num_val": len(job.fold.val),
        "num_test": len(job.fold.test),
        "label_file": str(job.fold.path),
        "predictions": module.test_predictions,
    }


def select_export_run(runs: Sequence[Mapping[str, Any]]) -> tuple[Mapping[str, Any], str]:
    """The run to export, and why: the best validation UA, never the test score (see the module
    docstring); without validation, the first fold's first run."""
    validated = [r for r in runs if r["valid_UA"] is not None]
    if validated:
        best = max(validated, key=lambda r: r["valid_UA"])  # first of equals
        return best, f"best validation UA ({best['valid_UA']:.2f}) over {len(validated)} run(s)"
    return runs[0], "no Val split to select on: the first fold's first run"


def warn_on_changed_config(config: Any, output_dir: Path) -> None:
    """A rerun into an output folder made with other settings reuses its finished runs: say so."""
    saved = output_dir / artifacts.CONFIG_JSON
    if not saved.is_file():
        return
    old = json.loads(saved.read_text())
    changed = sorted(k for k, v in dataclasses.asdict(config).items() if old.get(k, v) != v)
    if changed:
        log.warning(
            "%s holds runs made with other settings (%s differ); finished runs are reused as "
            "they are. Use a new output_dir to start afresh.", output_dir, ", ".join(changed))
