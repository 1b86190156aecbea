"""The three methods as chains of tracked stages, and the tracked execution of one stage.

A method run is a parent MLflow run; each stage is a child run that gets its inputs as artifact
URIs of the stage before it (``runs:/<id>/backbone``), so every result traces back to the exact
data, labels and weights that made it. Before a stage runs, a finished run with the same
parameters, inputs and data fingerprint is looked up and reused (``force`` recomputes).

Everything here works from the stages' declarations (``ser.stages.contract.Stage``) and the
methods' (``ser.config.METHOD_STAGES``); MLflow is reached through ``ser.tracking`` only.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

from ser import artifacts, distributed, recipes, serving, tracking, training
from ser.stages import cluster, finetune, probe, ptapt_phase1, ptapt_phase2, tapt
from ser.stages.contract import CallbackFactory, Stage, StageContext

log = logging.getLogger(__name__)

HEADLINE = ("UA", "WA", "F1")
INPUT_CACHE = ".inputs"  # under output_root: downloaded input URIs, by run id and path

STAGES: dict[str, Stage] = {
    spec.name: spec
    for spec in (finetune.SPEC, tapt.SPEC, ptapt_phase1.SPEC, cluster.SPEC, ptapt_phase2.SPEC,
                 probe.SPEC)
}


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    run_id: str
    reused: bool
    output_dir: Path

    def uri(self, output: str) -> str:
        return f"runs:/{self.run_id}/{output}"


@dataclass(frozen=True)
class _Plan:
    """What global rank 0 decided for a stage, and every rank follows."""

    local: Any  # the config with local input paths and the output folder
    key: str
    data_print: str


def execute_stage(
    name: str,
    config: Any,
    *,
    method: str = "",
    force: bool = False,
    nested: bool = False,
    output_root: str = "outputs",
    register_as: str = "",
    context: StageContext | None = None,
) -> StageOutcome:
    """Run one stage as an MLflow run, or reuse a finished identical one.

    The config is checked before anything else. Under data parallelism every rank calls this;
    global rank 0 alone talks to MLflow (look-up, run, params, artifacts, model, completion) and
    the other ranks follow its decisions. ``context`` (callbacks, e.g. a search's pruning) is
    not part of the reuse key; an exception it raises leaves the run incomplete, so never
    reused."""
    stage = STAGES[name]
    stage.check(config)
    zero = distributed.is_zero()
    decided = distributed.broadcast(_decide(stage, config, force, output_root) if zero else None)
    if isinstance(decided, StageOutcome):
        return decided
    context = context or StageContext()
    if not zero:
        stage.run(decided.local, context)
        return distributed.broadcast(None)  # rank 0's outcome, once its run is complete
    outcome = _run_tracked(stage, config, decided, (method, nested, register_as), context)
    return distributed.broadcast(outcome)


def _decide(stage: Stage, config: Any, force: bool, output_root: str) -> StageOutcome | _Plan:
    """A finished identical run to reuse, or the plan of a new run (rank 0)."""
    data_print = _data_print(config)
    key = tracking.reuse_key(stage.name, _key_params(stage, config), data_print)
    found = None if force else tracking.find_reusable(stage.name, key)
    if found is not None:  # decided before any input is downloaded
        return _reuse(stage, found)
    # Named after the key, so the same command re-run after a crash resumes in the same place.
    output_dir = Path(config.output_dir or Path(output_root) / stage.name / key[:12])
    local = _with_local_inputs(stage, config, Path(output_root))
    return _Plan(dataclasses.replace(local, output_dir=str(output_dir)), key, data_print)


def _run_tracked(
    stage: Stage, config: Any, plan: _Plan, where: tuple[str, bool, str], context: StageContext
) -> StageOutcome:
    method, nested, register_as = where
    output_dir = Path(plan.local.output_dir)
    tags = {tracking.TAG_KEY: plan.key, tracking.TAG_METHOD: method,
            tracking.TAG_OUTPUT_DIR: str(output_dir)}  # fmt: skip
    params = {**dataclasses.asdict(config), "output_dir": str(output_dir)}
    # A run of this key left RUNNING by a killed process is continued: same run, same output_dir.
    with tracking.stage_run(stage.name, tags, nested, params=params) as run:
        run_id = run.info.run_id
        tracking.set_tags({tracking.TAG_FINGERPRINT: plan.data_print})
        logged = dataclasses.replace(
            context, logger_factory=lambda fold: tracking.stage_logger(run_id, fold)
        )
        result = stage.run(plan.local, logged)
        _log_outputs(stage, output_dir)
        if isinstance(result, finetune.FinetuneResult):
            _finish_finetune(result, register_as)
        elif isinstance(result, probe.ProbeResult):  # not servable: ser.serving loads fine-tuning's
            _log_headline(result.summary)
        tracking.set_tags({tracking.TAG_OUTPUT: f"runs:/{run_id}/"})
        tracking.mark_complete(run_id)
    log.info("%s: done in run %s; outputs in %s", stage.name, run_id, output_dir)
    return StageOutcome(stage.name, run_id, False, output_dir)


def _with_local_inputs(stage: Stage, config: Any, output_root: Path) -> Any:
    """``config`` with every input URI downloaded, once, into ``output_root``'s input cache."""
    cache = output_root / INPUT_CACHE
    local = {f: tracking.resolve_input(getattr(config, f), f, cache) for f in stage.inputs}
    return dataclasses.replace(config, **local)


def _key_params(stage: Stage, config: Any) -> dict[str, Any]:
    """Parameters plus a content fingerprint of every input given as a local path (a URI
    names a run's artifact, which never changes: the URI itself is its fingerprint)."""
    params = dataclasses.asdict(config)
    for field in stage.inputs:
        value = getattr(config, field)
        if value and not tracking.is_uri(value) and Path(value).exists():
            params[f"{field}.fingerprint"] = _path_print(Path(value))
    return params


def _path_print(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    root = path if path.is_dir() else path.parent
    return tracking.fingerprint((str(f.relative_to(root)), f) for f in files)


def _data_print(config: Any) -> str:
    """Fingerprint of the label files and their audio, after checking both (as the stage will)."""
    folds = training.load_folds(config)
    return tracking.data_fingerprint(config.datadir, [fold.path for fold in folds])


def _reuse(stage: Stage, run: Any) -> StageOutcome:
    run_id, parent = run.info.run_id, tracking.active_run_id()
    if parent is not None and run.data.tags.get(tracking.TAG_PARENT) == parent:
        # A continued method run: this stage finished under it before its process was killed.
        log.info("%s: already finished in run %s, under this method run", stage.name, run_id)
    else:
        log.info("%s: reusing finished run %s (same parameters, inputs and data)", stage.name,
                 run_id)  # fmt: skip
        tracking.set_tags({tracking.reused_tag(stage.name): run_id})
    output_dir = Path(run.data.tags.get(tracking.TAG_OUTPUT_DIR, ""))
    return StageOutcome(stage.name, run_id, True, output_dir)


# Never artifacts: resume points (scratch, removed once a run finishes) and fine-tuned weights,
# which the logged pyfunc model already holds (the exported model) or which stay local on
# request (every run's, ``keep_run_models``).
NOT_LOGGED = frozenset({artifacts.CHECKPOINTS, artifacts.MODEL, probe.FEATURES})


def _log_outputs(stage: Stage, output_dir: Path) -> None:
    """Artifacts: each per-fold output as ``<output>/<fold>/`` (what the next stage takes as a
    ``runs:/<id>/<output>`` URI), the small files of a fold under ``folds/<fold>/`` (results,
    splits), and the files and folders at the top of ``output_dir`` as they are; never
    checkpoints or fine-tuned weights (:data:`NOT_LOGGED`)."""
    for entry in sorted(output_dir.iterdir()):
        if entry.is_file():
            tracking.log_file(entry)
        elif entry.name in stage.top_level:
            tracking.log_folder(entry, entry.name)
        elif entry.is_dir() and entry.name not in NOT_LOGGED:
            _log_fold(stage, entry)


def _log_fold(stage: Stage, fold_dir: Path, prefix: str = "") -> None:
    where = f"{prefix}{fold_dir.name}"
    for item in sorted(fold_dir.iterdir()):
        if item.name in NOT_LOGGED:
            continue
        if item.name in stage.outputs:
            tracking.log_folder(item, f"{item.name}/{where}")
        elif item.is_dir():  # a fine-tuning run: <fold>/run_<r>/
            _log_fold(stage, item, prefix=f"{where}/")
        else:
            tracking.log_file(item, f"folds/{where}")


def _finish_finetune(result: finetune.FinetuneResult, register_as: str) -> None:
    """Headline metrics, per-class recall and the servable model, on the fine-tuning run."""
    _log_headline(result.summary)
    model_uri = serving.log_model(result.model_dir, result.summary["classes"], register_as)
    tracking.set_tags({tracking.TAG_MODEL: model_uri})


def _log_headline(summary: dict[str, Any]) -> None:
    """Headline metrics and per-class recall of a classifier stage's summary, on its run."""
    metrics = {}
    for name in HEADLINE:
        entry = summary["metrics"][name]
        metrics[f"test_{name}_mean"] = entry["mean"]
        metrics[f"test_{name}_std"] = entry["std_over_folds"]
        metrics[f"test_{name}_std_over_repeats"] = entry["std_over_repeats"]
    metrics.update({f"test_recall_{c}": v for c, v in summary["recall"].items()})
    valid = [row["valid_UA"] for row in summary["runs"]]
    if valid and None not in valid:  # what a search selects on: never the test scores
        metrics["valid_UA_mean"] = fmean(valid)
    tracking.log_metrics(metrics)


# --------------------------------------------------------------------------- methods


def run_method(
    config: Any, *, finetune_callbacks: CallbackFactory | None = None
) -> dict[str, float]:
    """Run ``config``'s method (``config.METHOD``): check every stage's config, then each stage
    as a child run of the method's run, each fed the URIs of the outputs before it; fine-tuning
    (or the probe) last, whose headline metrics and model go on the method's run.

    ``finetune_callbacks``: extra Trainer callbacks for fine-tuning (a search's pruning); never
    part of a reuse key."""
    config = recipes.resolve(config)
    config.check()  # every stage's values, before the first one starts
    method = config.METHOD
    if not distributed.is_zero():  # rank 0 alone opens the method's run
        _run_stages(config, finetune_callbacks)
        return distributed.broadcast({})
    # Under an active run (a search trial) the method run nests under it. Its key lets a rerun
    # after a kill continue it, so that every stage run of the method ends up under one run.
    params = dataclasses.asdict(config)
    tags = {tracking.TAG_METHOD: method, tracking.TAG_KEY: tracking.reuse_key(method, params, "")}
    with tracking.stage_run(method, tags, nested=False, params=params):
        fine_tuned = _run_stages(config, finetune_callbacks)
        return distributed.broadcast(_method_headline(fine_tuned, config.register_as))


def _run_stages(config: Any, finetune_callbacks: CallbackFactory | None) -> StageOutcome:
    """Each stage of the method in order, fed the URIs of the outputs before it; the last one's
    outcome (fine-tuning's, or the probe's)."""
    done: dict[str, StageOutcome] = {}
    for step in config.stage_params():
        inputs = {field: done[stage].uri(output)
                  for field, (stage, output) in step.chained.items()}  # fmt: skip
        # The last stage classifies (fine-tuning, or the probe): a search prunes its epochs.
        context = StageContext(callback_factory=finetune_callbacks
                               if step is config.stage_params()[-1] else None)  # fmt: skip
        done[step.stage] = execute_stage(
            step.stage, step.build(config, inputs), method=config.METHOD, force=config.force,
            nested=True, output_root=config.output_root, register_as=config.register_as,
            context=context,
        )  # fmt: skip
    return done[config.stage_params()[-1].stage]


def _method_headline(outcome: StageOutcome, register_as: str) -> dict[str, float]:
    """Fine-tuning's headline metrics and model, put on the method's run."""
    run = tracking.get_run(outcome.run_id)
    headline = {k: v for k, v in run.data.metrics.items() if k.startswith(("test_", "valid_"))}
    tracking.log_metrics(headline)
    model_uri = run.data.tags.get(tracking.TAG_MODEL, "")
    tracking.set_tags({tracking.TAG_FINETUNE_RUN: outcome.run_id, tracking.TAG_MODEL: model_uri})
    if outcome.reused and register_as and model_uri:
        tracking.register_model(model_uri, register_as)
    return headline
