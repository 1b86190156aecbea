"""Figures written beside a stage's results: the confusion matrix of fine-tuning.

Matplotlib is used through its object API with the Agg canvas: no pyplot, no global backend
switch, so the figure renders on machines without a display and never touches other code's
plotting state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ser.atomic import atomic_path


def row_percentages(matrix: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """Each row of a confusion matrix as percentages of its total (a row with no utterance: 0)."""
    counts = np.asarray(matrix, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(100.0 * counts, totals, out=np.zeros_like(counts), where=totals > 0)


def plot_confusion(
    matrix: Sequence[Sequence[int]] | np.ndarray,
    classes: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "Confusion matrix",
) -> Path:
    """Write a PNG of ``matrix`` (rows: reference class, columns: predicted class), coloured by
    row percentage, each cell annotated with its percentage and its count. Written atomically."""
    counts = np.asarray(matrix, dtype=np.int64)
    n = len(classes)
    if counts.shape != (n, n):
        raise ValueError(
            f"confusion matrix has shape {counts.shape}, expected ({n}, {n}) for classes {classes}"
        )
    percent = row_percentages(counts)
    size = 1.2 + 1.1 * n
    figure = Figure(figsize=(size + 1.0, size), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(percent, cmap="Blues", vmin=0.0, vmax=100.0)
    figure.colorbar(image, ax=axes, label="% of the reference class")
    axes.set_xticks(range(n), labels=list(classes), rotation=45, ha="right")
    axes.set_yticks(range(n), labels=list(classes))
    axes.set_xlabel("predicted")
    axes.set_ylabel("reference")
    axes.set_title(title)
    for row in range(n):
        for col in range(n):
            # Dark cells get white text so the annotation stays readable.
            colour = "white" if percent[row, col] > 50 else "black"
            axes.text(col, row, f"{percent[row, col]:.1f}%\n({counts[row, col]})",
                      ha="center", va="center", color=colour, fontsize=9)
    target = Path(path)
    with atomic_path(target) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return target


def plot_per_fold(
    per_fold: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike[str],
    title: str = "UA per fold",
) -> Path:
    """Write a PNG of each method's UA per fold (``{method: {fold: UA}}``, methods along x), a
    line joining each fold's points across methods and a black bar at each method's mean, so a
    gain that holds on every fold reads as parallel rising lines. Written atomically."""
    methods = list(per_fold)
    folds = list(dict.fromkeys(f for values in per_fold.values() for f in values))
    figure = Figure(figsize=(2.4 + 1.3 * max(1, len(methods)), 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for fold in folds:
        xs = [i for i, m in enumerate(methods) if fold in per_fold[m]]
        ys = [per_fold[methods[i]][fold] for i in xs]
        axes.plot(xs, ys, marker="o", linewidth=1, alpha=0.8, label=fold)
    for i, method in enumerate(methods):
        if per_fold[method]:
            mean = float(np.mean(list(per_fold[method].values())))
            axes.hlines(mean, i - 0.2, i + 0.2, colors="black", linewidth=2.5)
    axes.set_xticks(range(len(methods)), labels=methods)
    axes.set_xlim(-0.5, len(methods) - 0.5)
    axes.set_ylabel("test UA [%] (mean over repeats)")
    axes.set_title(title)
    if folds:
        axes.legend(title="fold", fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    target = Path(path)
    with atomic_path(target) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return target
