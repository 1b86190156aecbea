"""Compare method runs: a Markdown and CSV table and a bar chart with error bars.

Reads the headline metrics every method run logs on its parent run (``test_UA_mean``,
``test_UA_std``, ...), so the table shows exactly what the MLflow UI's compare view shows.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from ser import tracking  # noqa: E402
from ser.atomic import atomic_path, atomic_write_text  # noqa: E402
from ser.config import CompareConfig  # noqa: E402
from ser.errors import SerInputError  # noqa: E402
from ser.tracking import TAG_METHOD, TAG_PARENT, TAG_STAGE, Run  # noqa: E402

log = logging.getLogger(__name__)

METRICS = ("UA", "WA", "F1")
METHOD_ORDER = ("probe", "vft", "tapt", "ptapt")  # cheapest first: the frozen baseline


@dataclass(frozen=True)
class Row:
    method: str
    run_id: str
    values: dict[str, tuple[float, float]]  # metric -> (mean, std)


@dataclass(frozen=True)
class Comparison:
    rows: list[Row]
    markdown: Path
    csv: Path
    chart: Path


def compare(config: CompareConfig) -> Comparison:
    runs = _chosen_runs(config)
    rows = [_row(run) for run in runs]
    out = Path(config.output_dir)
    markdown, table_csv, chart = (out / f"comparison.{ext}" for ext in ("md", "csv", "png"))
    atomic_write_text(markdown, to_markdown(rows))
    atomic_write_text(table_csv, to_csv(rows))
    plot(rows, chart)
    log.info("compared %d runs: wrote %s, %s and %s", len(rows), markdown, table_csv, chart)
    return Comparison(rows, markdown, table_csv, chart)


def _chosen_runs(config: CompareConfig) -> list[Run]:
    ids = [r.strip() for r in config.runs.split(",") if r.strip()]
    if ids:
        return [_get_run(run_id) for run_id in ids]
    runs = _newest_per_method(config.experiment_name)
    if not runs:
        raise SerInputError(
            "no finished method run (tag ser.method, metric test_UA_mean) found"
            + (f" in experiment {config.experiment_name!r}" if config.experiment_name else "")
            + "; run `mlflow run . -e vft` (or probe, tapt, ptapt) first, or pass runs=ID,ID"
        )
    return runs


def _get_run(run_id: str) -> Run:
    try:
        run = tracking.get_run(run_id)
    except Exception as err:
        raise SerInputError(f"runs: no run {run_id!r} on {tracking.tracking_uri()}") from err
    if "test_UA_mean" not in run.data.metrics:
        raise SerInputError(
            f"runs: run {run_id} has no test_UA_mean metric; pass the parent run of a method "
            f"({', '.join(METHOD_ORDER)}), not one of its stages"
        )
    return run


def _newest_per_method(experiment_name: str) -> list[Run]:
    experiments = None
    if experiment_name:
        experiment = tracking.experiment_id(experiment_name)
        if experiment is None:
            raise SerInputError(f"experiment_name: no experiment named {experiment_name!r}")
        experiments = [experiment]
    found = tracking.search_runs(
        "attributes.status = 'FINISHED' and metrics.test_UA_mean >= 0",
        experiment_ids=experiments, order_by=["attributes.start_time DESC"],
    )  # fmt: skip
    newest: dict[str, Run] = {}
    for run in found:
        method = run.data.tags.get(TAG_METHOD, "?")
        # The method's parent, not its finetune run, nor a method run inside a search trial.
        if run.data.tags.get(TAG_STAGE) == method and method not in newest and not _in_trial(run):
            newest[method] = run
    return [newest[m] for m in sorted(newest, key=_method_rank)]


def _in_trial(run: Run) -> bool:
    parent = run.data.tags.get(TAG_PARENT)
    return bool(parent) and (
        tracking.get_run(parent).data.tags.get(TAG_STAGE) == tracking.TRIAL_STAGE
    )


def _method_rank(method: str) -> tuple[int, str]:
    if method in METHOD_ORDER:
        return METHOD_ORDER.index(method), ""
    return len(METHOD_ORDER), method


def _row(run: Run) -> Row:
    metrics = run.data.metrics
    values = {
        m: (metrics.get(f"test_{m}_mean", float("nan")), metrics.get(f"test_{m}_std", float("nan")))
        for m in METRICS
    }
    return Row(run.data.tags.get(TAG_METHOD, "?"), run.info.run_id, values)


def to_markdown(rows: list[Row]) -> str:
    header = "| method | run | " + " | ".join(f"{m} [%]" for m in METRICS) + " |"
    lines = [header, "|" + " --- |" * (len(METRICS) + 2)]
    for row in rows:
        cells = " | ".join(f"{mean:.1f} ± {std:.1f}" for mean, std in row.values.values())
        lines.append(f"| {row.method} | {row.run_id[:8]} | {cells} |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "run_id", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std"))])
    for row in rows:
        numbers = [v for pair in row.values.values() for v in pair]
        writer.writerow([row.method, row.run_id, *numbers])
    return buffer.getvalue()


def plot(rows: list[Row], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rows), 3.6))
    width = 0.8 / len(METRICS)
    for i, metric in enumerate(METRICS):
        xs = [j + (i - (len(METRICS) - 1) / 2) * width for j in range(len(rows))]
        means = [row.values[metric][0] for row in rows]
        stds = [row.values[metric][1] for row in rows]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=metric)
    ax.set_xticks(range(len(rows)), [f"{r.method}\n{r.run_id[:8]}" for r in rows])
    ax.set_ylabel("percent (mean ± std over folds and repeats)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
