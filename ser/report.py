"""Fine-tuning's report: scores over folds and repeats, per fold and class, as JSON and text.

``summarise_runs`` turns the runs' ``results.json`` records into ``summary.json``;
``format_summary`` writes it as the plain-text ``summary.txt`` (the confusion-matrix picture is
``ser.plots.plot_confusion``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ser.metrics import summarise

METRICS = ("WA", "UA", "F1")


def summarise_runs(runs: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """Scores over folds and repeats (``ser.metrics.summarise``), per fold (mean and std over
    repeats), per class (recall averaged over the runs whose test split has the class), the
    confusion matrix summed over runs, and one row per run."""
    folds = list(dict.fromkeys(run["fold"] for run in runs))
    by_fold = {f: sorted((r for r in runs if r["fold"] == f), key=lambda r: r["repeat"])
               for f in folds}
    metrics: dict[str, Any] = {}
    for key in METRICS:
        grid = {f: [r["scores"][key] for r in fold_runs] for f, fold_runs in by_fold.items()}
        metrics[key] = {
            **summarise(grid).as_dict(),
            "per_fold": {f: {"mean": float(np.mean(v)), "std": float(np.std(v))}
                         for f, v in grid.items()},
        }
    recall = {}
    for name in classes:
        values = [r["scores"]["recall"][name] for r in runs if name in r["scores"]["recall"]]
        if values:
            recall[name] = float(np.mean(values))
    confusion = np.sum([np.asarray(r["scores"]["confusion"]) for r in runs], axis=0)
    return {
        "classes": list(classes),
        "folds": folds,
        "num_exps": max(len(v) for v in by_fold.values()),
        "num_runs": len(runs),
        "metrics": metrics,
        "recall": recall,
        "confusion": confusion.tolist(),
        "runs": [run_row(r) for r in runs],
    }


def run_row(run: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "fold": run["fold"],
        "repeat": run["repeat"],
        "seed": run["seed"],
        **{key: run["scores"][key] for key in METRICS},
        "valid_UA": run["valid_UA"],
        "tested": run["tested"],
        "checkpoint": run["checkpoint"],
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as a plain-text report (what the original wrote to its OUTPUT_FILE, and more)."""
    classes, metrics = summary["classes"], summary["metrics"]
    lines = [
        f"Fine-tuning: {len(summary['folds'])} fold(s) x {summary['num_exps']} run(s) = "
        f"{summary['num_runs']} runs; classes: {', '.join(classes)}",
        "Test scores in percent. 'folds': std / median across folds within a run index, averaged"
        " over run indices;",
        "'repeats': std / median across run indices of the mean over folds (population std).",
        "",
        f"{'metric':<8}{'mean':>9}{'std(folds)':>12}{'median(folds)':>15}{'std(repeats)':>14}"
        f"{'median(repeats)':>17}",
    ]
    for key in METRICS:
        m = metrics[key]
        lines.append(f"{key:<8}{m['mean']:>9.2f}{m['std_over_folds']:>12.2f}"
                     f"{m['median_over_folds']:>15.2f}{m['std_over_repeats']:>14.2f}"
                     f"{m['median_over_repeats']:>17.2f}")
    lines += ["", "Per fold (mean +- std over runs):",
              f"{'fold':<16}" + "".join(f"{key:>18}" for key in METRICS)]
    for fold in summary["folds"]:
        cells = [metrics[key]["per_fold"][fold] for key in METRICS]
        lines.append(f"{fold:<16}" + "".join(f"{c['mean']:>11.2f} +- {c['std']:<4.2f}"
                                             for c in cells))
    lines += ["", "Per-class recall (mean over runs whose test split has the class):"]
    lines += [f"  {name:<14}{value:>7.2f}" for name, value in summary["recall"].items()]
    lines += ["", "Confusion matrix summed over runs (rows: reference, columns: predicted):",
              " " * 14 + "".join(f"{name[:10]:>11}" for name in classes)]
    for name, row in zip(classes, summary["confusion"], strict=True):
        lines.append(f"  {name[:12]:<12}" + "".join(f"{count:>11d}" for count in row))
    lines += ["", "Runs:", f"{'fold':<16}{'run':>4}{'seed':>6}{'WA':>8}{'UA':>8}{'F1':>8}"
              f"{'valid_UA':>10}  {'tested':<7}checkpoint"]
    for row in summary["runs"]:
        valid = "-" if row["valid_UA"] is None else f"{row['valid_UA']:.2f}"
        lines.append(f"{row['fold']:<16}{row['repeat']:>4}{row['seed']:>6}{row['WA']:>8.2f}"
                     f"{row['UA']:>8.2f}{row['F1']:>8.2f}{valid:>10}  {row['tested']:<7}"
                     f"{row['checkpoint']}")
    exported = summary.get("exported_model")
    if exported:
        lines += ["", f"Exported model: {exported['path']}/ (fold {exported['fold']}, run "
                      f"{exported['repeat']}; {exported['selected_by']})"]
    return "\n".join(lines) + "\n"
