"""The three methods as chains of tracked stages, and the tracked execution of one stage.

A method run is a parent MLflow run; each stage is a child run that gets its inputs as artifact
URIs of the stage before it (``runs:/<id>/backbone``), so every result traces back to the exact
data, labels and weights that made it. Before a stage runs, a finished run with the same
parameters, inputs and data fingerprint is looked up and reused (``force`` recomputes).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any

import mlflow

from ser import serving, tracking
from ser.config import (
    ClusterConfig,
    FinetuneConfig,
    MethodConfig,
    Phase1Config,
    Phase2Config,
    PtaptMethodConfig,
    TaptConfig,
    TaptMethodConfig,
)
from ser.stages import common

if TYPE_CHECKING:
    from ser.stages.finetune import CallbackFactory

log = logging.getLogger(__name__)

HEADLINE = ("UA", "WA", "F1")
TAG_MODEL = "ser.model_uri"
TAG_FINETUNE_RUN = "ser.finetune_run"  # on a method run: its (possibly reused) fine-tuning run


@dataclass(frozen=True)
class Stage:
    """A stage as the pipelines see it."""

    name: str  # the MLproject entry point and the ser.stage tag
    config_cls: type[Any]
    module: str  # ser.stages.<module> with run(config, *, logger_factory)
    inputs: tuple[str, ...]  # config fields that may be artifact URIs
    outputs: tuple[str, ...]  # per-fold output folders, logged as <output>/<fold>/...
    top_level: tuple[str, ...] = ()  # folders of output_dir that are not folds

    def run_function(self) -> Callable[..., Any]:
        return importlib.import_module(f"ser.stages.{self.module}").run


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("finetune", FinetuneConfig, "finetune", ("backbone", "pretrained_path"), (),
              top_level=("model",)),
        Stage("tapt_pretrain", TaptConfig, "tapt", ("backbone",), ("backbone",)),
        Stage("pretrain_w2v1", Phase1Config, "ptapt_phase1", ("w2v1",), ("w2v1",)),
        Stage("cluster", ClusterConfig, "cluster", ("pretrained_path",), ("clusters",)),
        Stage("pretrain_w2v2", Phase2Config, "ptapt_phase2", ("backbone", "clusterpath"),
              ("backbone",)),
    )
}  # fmt: skip


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    run_id: str
    reused: bool
    output_dir: Path

    def uri(self, output: str) -> str:
        return f"runs:/{self.run_id}/{output}"


def execute_stage(
    name: str,
    config: Any,
    *,
    method: str = "",
    force: bool = False,
    nested: bool = False,
    output_root: str = "outputs",
    register_as: str = "",
    callback_factory: CallbackFactory | None = None,
) -> StageOutcome:
    """Run one stage as an MLflow run, or reuse a finished identical one.

    ``callback_factory`` (fine-tuning only) adds Trainer callbacks; it is not part of the reuse
    key, and an exception it raises leaves the run incomplete, so never reused."""
    stage = STAGES[name]
    local = _with_local_inputs(stage, config)
    data_print = _data_print(local)
    key = tracking.reuse_key(name, _key_params(stage, config, local), data_print)
    found = None if force else tracking.find_reusable(name, key)
    if found is not None:
        return _reuse(stage, found, nested)
    # Named after the key, so the same command re-run after a crash resumes in the same place.
    output_dir = Path(config.output_dir or Path(output_root) / name / key[:12])
    local = dataclasses.replace(local, output_dir=str(output_dir))
    tags = {tracking.TAG_KEY: key, tracking.TAG_METHOD: method, "ser.output_dir": str(output_dir)}
    with tracking.stage_run(name, tags, nested) as run:
        run_id = run.info.run_id
        tracking.log_params({**dataclasses.asdict(config), "output_dir": str(output_dir)})
        mlflow.set_tag(tracking.TAG_FINGERPRINT, data_print)
        extra = {"callback_factory": callback_factory} if callback_factory else {}
        stage.run_function()(
            local, logger_factory=lambda fold: tracking.stage_logger(run_id, fold), **extra
        )
        _log_outputs(stage, output_dir)
        if name == "finetune":
            _finish_finetune(output_dir, register_as)
        mlflow.set_tag(tracking.TAG_OUTPUT, f"runs:/{run_id}/")
        tracking.mark_complete(run_id)
    log.info("%s: done in run %s; outputs in %s", name, run_id, output_dir)
    return StageOutcome(name, run_id, False, output_dir)


def _with_local_inputs(stage: Stage, config: Any) -> Any:
    local = {f: tracking.resolve_input(getattr(config, f), f) for f in stage.inputs}
    return dataclasses.replace(config, **local)


def _key_params(stage: Stage, config: Any, local: Any) -> dict[str, Any]:
    """Parameters plus a content fingerprint of every input given as a local path."""
    params = dataclasses.asdict(config)
    for field in stage.inputs:
        value = getattr(config, field)
        if value and not tracking.is_uri(value) and Path(value).exists():
            params[f"{field}.fingerprint"] = _path_print(Path(getattr(local, field)))
    return params


def _path_print(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    root = path if path.is_dir() else path.parent
    return tracking.fingerprint((str(f.relative_to(root)), f) for f in files)


def _data_print(config: Any) -> str:
    """Fingerprint of the label files and their audio, after checking both (as the stage will)."""
    folds = common.load_folds(config)
    return tracking.data_fingerprint(config.datadir, [fold.path for fold in folds])


def _reuse(stage: Stage, run: Any, nested: bool) -> StageOutcome:
    run_id = run.info.run_id
    log.info("%s: reusing finished run %s (same parameters, inputs and data)", stage.name, run_id)
    if mlflow.active_run() is not None:
        mlflow.set_tag(f"ser.reused.{stage.name}", run_id)
    output_dir = Path(run.data.tags.get("ser.output_dir", ""))
    return StageOutcome(stage.name, run_id, True, output_dir)


def _log_outputs(stage: Stage, output_dir: Path) -> None:
    """Artifacts: each per-fold output as ``<output>/<fold>/`` (what the next stage takes as a
    ``runs:/<id>/<output>`` URI), everything else of a fold under ``folds/<fold>/`` (checkpoints,
    results), and the files and folders at the top of ``output_dir`` as they are."""
    for entry in sorted(output_dir.iterdir()):
        if entry.is_file():
            mlflow.log_artifact(str(entry))
        elif entry.name in stage.top_level:
            mlflow.log_artifacts(str(entry), artifact_path=entry.name)
        elif entry.is_dir():
            _log_fold(stage, entry)


def _log_fold(stage: Stage, fold_dir: Path) -> None:
    for item in sorted(fold_dir.iterdir()):
        if item.name in stage.outputs:
            mlflow.log_artifacts(str(item), artifact_path=f"{item.name}/{fold_dir.name}")
        elif item.is_dir():
            mlflow.log_artifacts(str(item), artifact_path=f"folds/{fold_dir.name}/{item.name}")
        else:
            mlflow.log_artifact(str(item), artifact_path=f"folds/{fold_dir.name}")


def _finish_finetune(output_dir: Path, register_as: str) -> None:
    """Headline metrics, per-class recall and the servable model, on the fine-tuning run."""
    summary = json.loads((output_dir / "summary.json").read_text())
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
    mlflow.log_metrics(metrics)
    model_uri = serving.log_model(output_dir / "model", summary["classes"], register_as)
    mlflow.set_tag(TAG_MODEL, model_uri)


def stage_config(cls: type[Any], source: Any, **overrides: Any) -> Any:
    """A stage config filled from a method config's fields of the same name, then ``overrides``."""
    names = {f.name for f in dataclasses.fields(cls)}
    shared = {k: v for k, v in dataclasses.asdict(source).items() if k in names}
    return cls(**{**shared, "output_dir": "", **overrides})


def _finetune(
    method: str, config: MethodConfig, pretrained: str, callbacks: CallbackFactory | None
) -> dict[str, float]:
    """Fine-tune, then put its headline metrics and model on the method's parent run."""
    finetune = stage_config(FinetuneConfig, config, pretrained_path=pretrained)
    outcome = _chain_runner(method, config, callbacks)("finetune", finetune)
    run = mlflow.get_run(outcome.run_id)
    headline = {k: v for k, v in run.data.metrics.items() if k.startswith(("test_", "valid_"))}
    mlflow.log_metrics(headline)
    mlflow.set_tag(TAG_FINETUNE_RUN, outcome.run_id)
    model_uri = run.data.tags.get(TAG_MODEL, "")
    mlflow.set_tag(TAG_MODEL, model_uri)
    if outcome.reused and config.register_as and model_uri:
        mlflow.register_model(model_uri, config.register_as)
    return headline


def _method_run(
    method: str,
    config: MethodConfig,
    body: Callable[[], str],
    finetune_callbacks: CallbackFactory | None,
) -> dict[str, float]:
    # Under an active run (a search trial) the method run nests under it.
    with tracking.stage_run(method, {tracking.TAG_METHOD: method}, nested=False):
        tracking.log_params(dataclasses.asdict(config))
        return _finetune(method, config, body(), finetune_callbacks)


# ``finetune_callbacks``: extra Trainer callbacks for fine-tuning (a search's pruning); never
# part of a reuse key.


def vft(
    config: MethodConfig, *, finetune_callbacks: CallbackFactory | None = None
) -> dict[str, float]:
    """V-FT: fine-tune the backbone as it is."""
    return _method_run("vft", config, lambda: "", finetune_callbacks)


def tapt(
    config: TaptMethodConfig, *, finetune_callbacks: CallbackFactory | None = None
) -> dict[str, float]:
    """TAPT: continue wav2vec 2.0 pretraining per fold, then fine-tune its backbones."""

    def pretrain() -> str:
        stage = stage_config(
            TaptConfig, config, lr=config.pretrain_lr, batch_size=config.pretrain_batch_size
        )
        return _chain_runner("tapt", config)("tapt_pretrain", stage).uri("backbone")

    return _method_run("tapt", config, pretrain, finetune_callbacks)


def ptapt(
    config: PtaptMethodConfig, *, finetune_callbacks: CallbackFactory | None = None
) -> dict[str, float]:
    """P-TAPT: phase 1 -> cluster -> phase 2 -> fine-tune, each fold on its Train split only."""

    def pretrain() -> str:
        run = _chain_runner("ptapt", config)
        # The method's lr and batch_size are fine-tuning's: phase 1 keeps its own, so that it
        # (and all after it but fine-tuning) is shared by runs that differ in fine-tuning only.
        phase1 = run(
            "pretrain_w2v1",
            stage_config(
                Phase1Config, config, training_step=config.w2v1_training_step,
                lr=Phase1Config.lr, batch_size=Phase1Config.batch_size,
            ),
        )  # fmt: skip
        clusters = run(
            "cluster", stage_config(ClusterConfig, config, pretrained_path=phase1.uri("w2v1"))
        )
        phase2 = run(
            "pretrain_w2v2",
            stage_config(
                Phase2Config, config, lr=config.pretrain_lr, batch_size=config.pretrain_batch_size,
                clusterpath=clusters.uri("clusters"),
            ),
        )  # fmt: skip
        return phase2.uri("backbone")

    return _method_run("ptapt", config, pretrain, finetune_callbacks)


def _chain_runner(
    method: str, config: MethodConfig, callbacks: CallbackFactory | None = None
) -> Callable[[str, Any], StageOutcome]:
    def run(name: str, stage_cfg: Any) -> StageOutcome:
        return execute_stage(
            name, stage_cfg, method=method, force=config.force, nested=True,
            output_root=config.output_root, register_as=config.register_as,
            callback_factory=callbacks,
        )  # fmt: skip

    return run


METHODS: Mapping[str, tuple[type[Any], Callable[..., dict[str, float]]]] = {
    "vft": (MethodConfig, vft),
    "tapt": (TaptMethodConfig, tapt),
    "ptapt": (PtaptMethodConfig, ptapt),
}
