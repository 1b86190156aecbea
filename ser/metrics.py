"""Emotion-classification metrics and their summary over repeats and folds.

WA is plain accuracy; UA is the mean per-class recall over the classes present in the reference
(a class absent from a fold's test split has no recall and is left out of UA, as the original's
sklearn-based code does); macro-F1 averages per-class F1 over the same classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Scores:
    """Test scores of one fine-tuning run, in percent, and its confusion matrix."""

    wa: float
    ua: float
    f1: float
    recall: dict[str, float]
    confusion: list[list[int]]  # rows: reference class, columns: predicted class

    def as_dict(self) -> dict[str, object]:
        return {
            "WA": self.wa,
            "UA": self.ua,
            "F1": self.f1,
            "recall": self.recall,
            "confusion": self.confusion,
        }


def confusion_matrix(labels: Sequence[int], preds: Sequence[int], num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return matrix


def score(labels: Sequence[int], preds: Sequence[int], classes: Sequence[str]) -> Scores:
    """WA, UA, macro-F1 (percent), per-class recall and the confusion matrix."""
    if len(labels) != len(preds) or not labels:
        raise ValueError(
            f"need equal, non-zero numbers of labels ({len(labels)}) and preds ({len(preds)})"
        )
    matrix = confusion_matrix(labels, preds, len(classes))
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    hits = np.diag(matrix).astype(np.float64)
    present = support > 0
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=present)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(hits), where=denom > 0)
    return Scores(
        wa=100.0 * float(hits.sum() / support.sum()),
        ua=100.0 * float(recall[present].mean()),
        f1=100.0 * float(f1[present].mean()),
        recall={c: 100.0 * float(r) for c, r, p in zip(classes, recall, present, strict=True) if p},
        confusion=matrix.tolist(),
    )


@dataclass(frozen=True)
class Summary:
    """One metric over a grid of runs ``values[fold][repeat]``, as the original summarises it.

    Standard deviations are population ones (``np.std``), as in the original's summary.
    """

    mean: float  # over every run of every fold
    std_over_folds: float  # std across folds within a repeat, averaged over repeats
    median_over_folds: float  # median across folds within a repeat, averaged over repeats
    std_over_repeats: float  # std across repeats of each repeat's mean over folds
    median_over_repeats: float  # median across repeats of each repeat's mean over folds

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def summarise(values: Mapping[str, Sequence[float]]) -> Summary:
    """Summarise ``{fold: [value per repeat]}``."""
    grid = np.array([list(v) for v in values.values()], dtype=np.float64)  # folds x repeats
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError("need the same, non-zero number of repeats in every fold")
    repeat_means = grid.mean(axis=0)
    return Summary(
        mean=float(grid.mean()),
        std_over_folds=float(grid.std(axis=0).mean()),
        median_over_folds=float(np.median(grid, axis=0).mean()),
        std_over_repeats=float(repeat_means.std()),
        median_over_repeats=float(np.median(repeat_means)),
    )
