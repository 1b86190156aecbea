"""Compare method runs: a Markdown and CSV table and a bar chart with error bars.

Reads the headline metrics every method run logs on its parent run (``test_UA_mean``,
``test_UA_std``, ...), so the table shows exactly what the MLflow UI's compare view shows.
From each method's fine-tuning run's per-utterance ``results.json`` it also writes per-fold,
per-speaker and per-class tables and paired tests between methods (:mod:`ser.significance`):
``significance.json``, ``significance.md`` and ``per_fold_ua.png``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from ser import significance, tracking  # noqa: E402
from ser.atomic import atomic_path, atomic_write_text  # noqa: E402
from ser.config import CompareConfig  # noqa: E402
from ser.data.labels import read_label_file  # noqa: E402
from ser.errors import SerInputError  # noqa: E402
from ser.plots import plot_per_fold  # noqa: E402
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
    # Per-fold, per-speaker, per-class tables and paired tests (ser.significance): written when
    # at least one method run names a fine-tuning run with per-utterance results.
    significance: dict[str, Any] | None = None
    files: list[Path] = field(default_factory=list)  # everything written, as logged


SIGNIFICANCE_JSON = "significance.json"
SIGNIFICANCE_MD = "significance.md"
PER_FOLD_PNG = "per_fold_ua.png"


def compare(config: CompareConfig) -> Comparison:
    """Write the table and chart of the chosen method runs and, from their fine-tuning runs'
    per-utterance results, :mod:`ser.significance`'s tables, paired tests and per-fold plot; log
    them all as artifacts of the entry point's run (``mlflow run . -e compare``) when there is
    one."""
    runs = _chosen_runs(config)
    rows = [_row(run) for run in runs]
    out = Path(config.output_dir)
    markdown, table_csv, chart = (out / f"comparison.{ext}" for ext in ("md", "csv", "png"))
    atomic_write_text(markdown, to_markdown(rows))
    atomic_write_text(table_csv, to_csv(rows))
    plot(rows, chart)
    files = [markdown, table_csv, chart]
    report = _significance(runs, rows, out)
    if report is not None:
        files += [out / SIGNIFICANCE_JSON, out / SIGNIFICANCE_MD, out / PER_FOLD_PNG]
    log.info("compared %d runs: wrote %s", len(rows), ", ".join(str(f) for f in files))
    logged = tracking.log_to_entry_run(files)
    if logged:
        log.info("logged them as artifacts of run %s", logged)
    return Comparison(rows, markdown, table_csv, chart, report, files)


def _significance(runs: list[Run], rows: list[Row], out: Path) -> dict[str, Any] | None:
    methods: dict[str, list[dict[str, Any]]] = {}
    labels: dict[str, list[dict[str, str] | None]] = {}
    cache: dict[str, dict[str, str] | None] = {}
    run_ids: dict[str, str] = {}
    for run, row in zip(runs, rows, strict=True):
        records = _results_of(run)
        if not records:
            continue
        name = row.method if row.method not in methods else f"{row.method}@{row.run_id[:8]}"
        methods[name] = records
        run_ids[name] = row.run_id
        labels[name] = [_true_labels(r, cache) for r in records]
    if not methods:
        log.info("no method run names a fine-tuning run with results.json artifacts "
                 "(tag %s): no per-fold tables or paired tests", tracking.TAG_FINETUNE_RUN)
        return None
    report = significance.analyse(methods, labels)
    report["runs"] = run_ids
    atomic_write_text(out / SIGNIFICANCE_JSON, json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / SIGNIFICANCE_MD, significance.to_markdown(report))
    per_fold = {m: {f: v["mean"] for f, v in report["methods"][m]["per_fold"].items()}
                for m in report["methods"]}  # fmt: skip
    plot_per_fold(per_fold, out / PER_FOLD_PNG)
    return report


def _results_of(run: Run) -> list[dict[str, Any]]:
    """The ``results.json`` records of the method run's fine-tuning (or probe) run."""
    stage_run = run.data.tags.get(tracking.TAG_FINETUNE_RUN, "")
    if not stage_run:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        files = tracking.download_results(stage_run, Path(tmp))
        records = [json.loads(p.read_text()) for p in files]
    return sorted(records, key=lambda r: (str(r["fold"]), int(r["repeat"])))


def _true_labels(
    record: dict[str, Any], cache: dict[str, dict[str, str] | None]
) -> dict[str, str] | None:
    """The Test labels of the record's label file, or None when the file cannot be read here
    or does not cover its predictions (the run's own logged scores stand in then)."""
    path = str(record.get("label_file", ""))
    if path not in cache:
        try:
            cache[path] = read_label_file(path).test if path else None
        except (SerInputError, OSError) as err:
            log.warning("cannot read label file %s (%s): using the runs' logged UA", path, err)
            cache[path] = None
    test = cache[path]
    if test is None or not set(record["predictions"]) <= set(test):
        return None
    return test


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
