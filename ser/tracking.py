"""Everything ser asks of MLflow: stage runs, their tags, inputs by URI, and reuse of finished runs.

A stage run is reused only when it finished *completely* (tag ``ser.complete=true``, set as the
very last step) and its reuse key matches: the stage, every parameter that changes the result,
the input URIs, and a fingerprint of the audio and label files' contents. A failed or killed
run never carries the tag, so it is never reused; re-running the same command lands in the same
output directory (named after the key) and resumes from its ``last.ckpt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from pytorch_lightning.loggers import MLFlowLogger

from ser.errors import SerInputError

log = logging.getLogger(__name__)

TAG_STAGE = "ser.stage"
TAG_METHOD = "ser.method"
TAG_KEY = "ser.reuse_key"
TAG_COMPLETE = "ser.complete"
TAG_FINGERPRINT = "ser.data_fingerprint"
TAG_COMMIT = "ser.git_commit"
TAG_OUTPUT = "ser.output_uri"
TAG_OUTPUT_DIR = "ser.output_dir"  # where the stage wrote on disk (resume, reuse)
TAG_MODEL = "ser.model_uri"  # on fine-tuning and method runs: the logged pyfunc model
TAG_FINETUNE_RUN = "ser.finetune_run"  # on a method run: its (possibly reused) fine-tuning run
TAG_PARENT = "mlflow.parentRunId"
TRIAL_STAGE = "trial"  # ser.stage of a search trial run
TAG_RESOLVED_PREFIX = "ser.resolved."  # a value the run used where `mlflow run` logged another

# Parameters that change where or how fast a stage runs, not what it computes.
NOT_IN_KEY = frozenset({"output_dir", "num_workers", "accelerator", "devices", "force",
                        "keep_checkpoints", "keep_run_models"})
_URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "s3://", "gs://", "wasbs://", "dbfs:/")
_CHUNK = 1 << 20


def is_uri(value: str) -> bool:
    return value.startswith(_URI_SCHEMES)


def resolve_input(value: str, name: str, cache: Path | None = None) -> str:
    """A local path for ``value``: downloaded with MLflow when it is an artifact or model URI.

    With ``cache``, into ``cache/<the URI as a path>`` once: later stages and reruns find it
    there (a run's artifacts never change) instead of downloading it again into a temporary
    folder nobody removes. The download lands whole or not at all (written beside, renamed).
    """
    if not value or not is_uri(value):
        return value
    if cache is None:
        return _download(value, name, None)
    target = cache / re.sub(r"[^A-Za-z0-9._/-]", "_", value.replace(":/", "/")).strip("/")
    if target.exists():
        return str(target)
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shutil.move(_download(value, name, partial), target)
    shutil.rmtree(partial, ignore_errors=True)
    log.info("%s: %s downloaded to %s", name, value, target)
    return str(target)


def _download(uri: str, name: str, into: Path | None) -> str:
    try:
        return mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(into) if into else None
        )
    except Exception as err:  # MLflow raises several types for unknown runs/paths
        raise SerInputError(
            f"{name}={uri}: cannot download it from the tracking server "
            f"{mlflow.get_tracking_uri()} ({err}); check the run id and artifact path "
            "(`mlflow artifacts list --run-id ID`)"
        ) from err


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(files: Iterable[tuple[str, Path]]) -> str:
    """One hash over ``(name, content)`` pairs: changes when any file's name or bytes change."""
    digest = hashlib.sha256()
    for name, path in sorted(files):
        digest.update(f"{name}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


def data_fingerprint(datadir: str, label_files: Iterable[Path]) -> str:
    """Fingerprint of the label files and every audio file they name."""
    labels = sorted(Path(p) for p in label_files)
    names: set[str] = set()
    for path in labels:
        splits = json.loads(path.read_text(encoding="utf-8"))
        names.update(name for split in splits.values() for name in split)
    audio = Path(datadir)
    pairs = [(f"labels/{p.name}", p) for p in labels]
    pairs += [(f"audio/{name}", audio / name) for name in sorted(names)]
    return fingerprint(pairs)


def key_params(params: Mapping[str, Any]) -> dict[str, str]:
    return {k: _param_text(v) for k, v in sorted(params.items()) if k not in NOT_IN_KEY}


def reuse_key(stage: str, params: Mapping[str, Any], data_print: str) -> str:
    payload = json.dumps([stage, key_params(params), data_print], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def find_reusable(stage: str, key: str) -> Run | None:
    """The newest complete, finished run of ``stage`` with this reuse key, in any experiment."""
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=(
            f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_KEY}` = '{key}' "
            f"and tags.`{TAG_COMPLETE}` = 'true' and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0] if runs else None


def reused_tag(stage: str) -> str:
    """Tag on the active (method) run naming the finished ``stage`` run it reused."""
    return f"ser.reused.{stage}"


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


class StopRun(Exception):
    """Stops runs on purpose (a pruned search trial): each run it passes through ends KILLED,
    not FAILED, and none is marked complete, so none is reused."""


@contextlib.contextmanager
def stage_run(
    stage: str, tags: Mapping[str, str], nested: bool, run_name: str = ""
) -> Iterator[Run]:
    """Start (or, for an ``mlflow run`` entry point, continue) the MLflow run of one stage."""
    active = mlflow.active_run()
    if active is None and os.environ.get("MLFLOW_RUN_ID") and not nested:
        # `mlflow run` created the run for this entry point: log into it. The variable goes while
        # it is open, or every nested start_run would resume this run instead of making a child.
        run_id = os.environ.pop("MLFLOW_RUN_ID")
        try:
            with mlflow.start_run(run_id=run_id) as run, _killed_on_stop():
                mlflow.set_tags({TAG_STAGE: stage, TAG_COMMIT: git_commit(), **tags})
                yield mlflow.get_run(run.info.run_id)
        finally:
            os.environ["MLFLOW_RUN_ID"] = run_id
        return
    with (
        mlflow.start_run(run_name=run_name or stage, nested=active is not None) as run,
        _killed_on_stop(),
    ):
        mlflow.set_tags({TAG_STAGE: stage, TAG_COMMIT: git_commit(), **tags})
        yield mlflow.get_run(run.info.run_id)


@contextlib.contextmanager
def _killed_on_stop() -> Iterator[None]:
    try:
        yield
    except StopRun:
        mlflow.end_run("KILLED")  # the run's own context then finds it ended and leaves it
        raise


def child_runs(run_id: str) -> list[Run]:
    """The runs nested directly under ``run_id``, oldest first."""
    return mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )


def log_params(params: Mapping[str, Any]) -> None:
    """Log params the active run does not have yet.

    ``mlflow run`` logs the entry point's own command-line values first, and MLflow refuses to
    log a param twice with another value. Where the run used another value (``recipe=paper``
    filled it in), that value goes to a tag ``ser.resolved.<name>``, and a warning says so.
    """
    run = mlflow.active_run()
    have = mlflow.get_run(run.info.run_id).data.params if run else {}
    texts = {k: _param_text(v)[:6000] for k, v in params.items()}
    mlflow.log_params({k: v for k, v in texts.items() if k not in have})
    resolved = {k: v for k, v in texts.items() if k in have and _unquoted(have[k]) != v}
    if resolved:
        mlflow.set_tags({f"{TAG_RESOLVED_PREFIX}{k}": v for k, v in resolved.items()})
        log.warning(
            "MLflow recorded the command line's values of %s; the run used %s (tags %s*)",
            ", ".join(sorted(resolved)), ", ".join(f"{k}={v}" for k, v in sorted(resolved.items())),
            TAG_RESOLVED_PREFIX,
        )


def _unquoted(text: str) -> str:
    # `mlflow run` shell-quotes string parameters it logs.
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] == "'" else text


def mark_complete(run_id: str) -> None:
    mlflow.MlflowClient().set_tag(run_id, TAG_COMPLETE, "true")


class StageLogger(MLFlowLogger):
    """Lightning's MLflow logger writing into an existing stage run without ending it.

    Lightning's logger marks its run FINISHED when one ``fit`` ends; a stage fits once per fold
    and only the stage itself may say when it is complete.
    """

    def finalize(self, status: str = "success") -> None:
        return None


def stage_logger(run_id: str, prefix: str) -> StageLogger:
    """Metrics of one fold's training, under the stage's run, named ``<prefix>-<metric>``."""
    return StageLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=run_id, prefix=prefix)


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


# --- the active run and plain look-ups: the rest of ser calls these, never mlflow itself --------


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def get_run(run_id: str) -> Run:
    return mlflow.get_run(run_id)


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def set_tags(tags: Mapping[str, str], run_id: str | None = None) -> None:
    """Tags on ``run_id``, or on the active run (nothing when there is none)."""
    if run_id is not None:
        client = mlflow.MlflowClient()
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    elif mlflow.active_run() is not None:
        mlflow.set_tags(dict(tags))


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    mlflow.log_metrics(dict(metrics), step=step)


def log_file(path: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_folder(path: Path, artifact_path: str) -> None:
    mlflow.log_artifacts(str(path), artifact_path=artifact_path)


def log_figure(figure: Any, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file, save_kwargs={"bbox_inches": "tight"})


def register_model(model_uri: str, name: str) -> None:
    mlflow.register_model(model_uri, name)


def search_runs(filter_string: str, experiment_ids: list[str] | None = None,
                order_by: list[str] | None = None) -> list[Run]:
    """Runs matching ``filter_string`` in ``experiment_ids`` (default: every experiment)."""
    return mlflow.search_runs(
        experiment_ids=experiment_ids, search_all_experiments=experiment_ids is None,
        filter_string=filter_string, order_by=order_by, output_format="list",
    )  # fmt: skip


def experiment_id(name: str) -> str | None:
    experiment = mlflow.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else None


def end_run_by_id(run_id: str, status: str) -> None:
    """End a run that is not the active one (a dead search worker's)."""
    mlflow.MlflowClient().set_terminated(run_id, status)


def open_store() -> None:
    """Open the tracking store once, which creates its tables when it is new."""
    mlflow.MlflowClient()


def log_pyfunc_model(
    *, python_model: Path, artifacts: Mapping[str, Path], code_paths: list[Path],
    requirements: list[str], signature: Any, input_example: Any, register_as: str = "",
) -> str:
    """Log a models-from-code pyfunc model as ``model`` of the active run; its model URI."""
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(python_model),
        artifacts={k: str(v) for k, v in artifacts.items()},
        code_paths=[str(p) for p in code_paths],
        pip_requirements=requirements,
        signature=signature,
        input_example=input_example,
        registered_model_name=register_as or None,
    )
    return info.model_uri
