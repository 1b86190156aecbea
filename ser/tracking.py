"""Everything ser asks of MLflow: stage runs, their tags, inputs by URI, and reuse of finished runs.

A stage run is reused only when it finished *completely* (tag ``ser.complete=true``, set as the
very last step) and its reuse key matches: the stage, every parameter that changes the result,
the input URIs, and a fingerprint of the audio and label files' contents. A failed or killed
run never carries the tag, so it is never reused; re-running the same command lands in the same
output directory (named after the key) and resumes from its ``last.ckpt``.

No run stays RUNNING after its command: an exception ends it FAILED; Ctrl-C, SIGTERM and a pruned
trial end it KILLED. A process killed outright (SIGKILL, a power cut) cannot end its runs, so each
run records who runs it (host, pid namespace, pid and that process's start time): a rerun of the
same work *continues* such a dead run (same run id, params, metric history), or, where it cannot
(other parameters, experiment or parent run), marks it KILLED with ``ser.replaced_by``; when a
command's outermost run ends, every other dead run of this host is marked KILLED with
``ser.ended_by``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.tracking.fluent import ActiveRun
from mlflow.tracking.fluent import (  # private: the experiment start_run gives a new run
    _get_experiment_id as experiment_of_new_runs,
)
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
# Who runs a run, so that a RUNNING run whose process is gone can be told from a live one.
TAG_HOST = "ser.host"
TAG_PID_NAMESPACE = "ser.pid_namespace"  # containers sharing a host name have their own pids
TAG_PID = "ser.pid"
TAG_PID_START = "ser.pid_start"  # so that another process given the same pid is not taken for it
TAG_REPLACED_BY = "ser.replaced_by"  # on a dead run that a rerun of its work could not continue
TAG_ENDED_BY = "ser.ended_by"  # on any other dead run: the run of the command that ended it

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
    """``uri`` downloaded with MLflow (into ``into``, else a folder of MLflow's choosing).

    An unresolvable URI is one SerInputError line naming the parameter: MLflow's own messages
    can span lines (server responses), and a command line shows one.
    """
    try:
        return mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(into) if into else None
        )
    except Exception as err:  # MLflow raises several types for unknown runs/paths/models
        reason = next(iter(str(err).strip().splitlines()), "") or type(err).__name__
        raise SerInputError(
            f"{name}={uri}: cannot download it from the tracking server "
            f"{mlflow.get_tracking_uri()} ({reason}); check the run id, model version or "
            "artifact path (`mlflow artifacts list --run-id ID`)"
        ) from err


def download_model(uri: str, into: Path) -> Path:
    """A logged or registered model (``models:/``, ``runs:/``...) downloaded into ``into``."""
    return Path(_download(uri, "model", into))


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


class Terminated(SystemExit):
    """SIGTERM, raised where the command is, so that its runs end KILLED; the process then exits
    with status 143 as a terminated one does."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@contextlib.contextmanager
def stage_run(
    stage: str, tags: Mapping[str, str], nested: bool, run_name: str = "",
    params: Mapping[str, Any] | None = None,
) -> Iterator[Run]:
    """Start the MLflow run of one stage (or method, trial, search) and log ``params`` on it.

    With a reuse key in ``tags`` (``TAG_KEY``), a RUNNING run of the same stage and key whose
    process died is continued instead (:func:`_open_run`). An ``mlflow run`` entry point logs
    into the run ``mlflow run`` created. Around a command's outermost run, SIGTERM ends the runs
    KILLED, and at its end the other dead runs of this host are ended (:func:`end_dead_runs`).
    """
    outermost = mlflow.active_run() is None
    # `mlflow run` created the run for this entry point. The variable goes while it is open, or
    # every nested start_run would resume this run instead of making a child.
    entry_run = os.environ.pop("MLFLOW_RUN_ID", "") if outermost and not nested else ""
    run_id = ""
    try:
        with _sigterm_ends_runs(outermost), contextlib.ExitStack() as lock:
            lock.enter_context(_tidy_lock())
            active, dead = _open_run(stage, tags, run_name, entry_run, params or {})
            run_id = active.info.run_id
            with active, _killed_on_stop():
                _replace(stage, dead, run_id)
                lock.close()  # the dead runs are settled: other processes may judge theirs
                if params:
                    log_params(params)
                yield mlflow.get_run(run_id)
    finally:
        if entry_run:
            os.environ["MLFLOW_RUN_ID"] = entry_run
        if outermost and run_id:
            end_dead_runs(run_id)


def _open_run(
    stage: str, tags: Mapping[str, str], run_name: str, entry_run: str,
    params: Mapping[str, Any],
) -> tuple[ActiveRun, list[tuple[Run, str]]]:
    """The run to log into, and the dead runs of the same work it replaces, each with why it
    does not continue them."""
    dead = _dead_runs_of(stage, tags.get(TAG_KEY, ""))
    mine = {**owner_tags(), TAG_STAGE: stage, TAG_COMMIT: git_commit(), **tags}
    if entry_run:
        why = "`mlflow run` made a new run"
        return mlflow.start_run(run_id=entry_run, tags=mine), [(run, why) for run in dead]
    nested = mlflow.active_run() is not None
    reasons = [(run, _obstacle(run, params)) for run in dead]
    heir = next((run for run, why in reasons if not why), None)
    if heir is None:
        return mlflow.start_run(run_name=run_name or stage, nested=nested, tags=mine), reasons
    log.info("%s: continuing run %s, which %s left RUNNING", stage, heir.info.run_id,
             _owner(heir))  # fmt: skip
    others = [(run, why or "another run continued its work") for run, why in reasons
              if run is not heir]  # fmt: skip
    return mlflow.start_run(run_id=heir.info.run_id, nested=nested, tags=mine), others


def _obstacle(run: Run, params: Mapping[str, Any]) -> str:
    """Why this process cannot continue the dead ``run`` of its work ("" when it can): MLflow
    refuses another value for a logged param, a continued run stays in its experiment, and
    stage runs belong under the method run that made them."""
    if run.info.experiment_id != experiment_of_new_runs():  # as start_run picks it
        return "it is in another experiment"
    active = mlflow.active_run()
    if run.data.tags.get(TAG_PARENT) != (active.info.run_id if active else None):
        return "it is under another parent run"
    texts = _param_texts(params)
    if any(texts.get(name) != _unquoted(value) for name, value in run.data.params.items()):
        return "its parameters differ"
    return ""


def _replace(stage: str, dead: list[tuple[Run, str]], run_id: str) -> None:
    for run, why in dead:
        _end_dead(run, {TAG_REPLACED_BY: run_id})
        log.warning("%s: run %s, which %s left RUNNING, marked KILLED: replaced by run %s (%s)",
                    stage, run.info.run_id, _owner(run), run_id, why)  # fmt: skip


@contextlib.contextmanager
def _killed_on_stop() -> Iterator[None]:
    try:
        yield
    except (StopRun, KeyboardInterrupt, SystemExit):
        # Stopped, not broken: a pruned trial, Ctrl-C (inside `fit` Lightning turns it into
        # SystemExit) or SIGTERM (Terminated).
        mlflow.end_run("KILLED")  # the run's own context then finds it ended and leaves it
        raise


@contextlib.contextmanager
def _sigterm_ends_runs(outermost: bool) -> Iterator[None]:
    """While the command's outermost run is open, SIGTERM raises :class:`Terminated` (Python's
    default is to die on the spot, runs RUNNING). Left alone where someone else handles SIGTERM,
    or off the main thread, where no handler can be set."""
    main = threading.current_thread() is threading.main_thread()
    if not (outermost and main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
        yield
        return
    owner = os.getpid()

    def terminate(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
        if os.getpid() != owner:  # a forked child (a data loader worker): die as by default
            os.kill(os.getpid(), signal.SIGTERM)
            return
        log.warning("SIGTERM: ending this command's MLflow runs as KILLED")
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# --- who runs a run: a RUNNING run whose process is gone -----------------------------------------


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks after boot: field 22 of /proc/<pid>/stat); None
    when no such process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # after the name, which may hold spaces and ')'


def owner_tags() -> dict[str, str]:
    """Tags naming this process, recorded on every run it starts or continues."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    pid = os.getpid()
    return {TAG_HOST: socket.gethostname(), TAG_PID_NAMESPACE: namespace, TAG_PID: str(pid),
            TAG_PID_START: _process_start(pid) or ""}  # fmt: skip


def is_dead(run: Run) -> bool:
    """Whether the process that runs ``run`` is known to be gone: it ran on this host (and pid
    namespace) and no process with its pid and start time exists.

    A run started on another host is never judged dead: its process may be alive where this one
    cannot see it (a search's parallel workers, two users sharing a server). Nor is one without
    these tags (made before ser recorded them), nor any on a system without /proc.
    """
    tags, here = run.data.tags, owner_tags()
    if not here[TAG_PID_START] or not tags.get(TAG_PID, "").isdigit():
        return False
    if any(tags.get(name) != here[name] for name in (TAG_HOST, TAG_PID_NAMESPACE)):
        return False
    return _process_gone(int(tags[TAG_PID]), tags.get(TAG_PID_START, ""))


def _process_gone(pid: int, started: str) -> bool:
    now = _process_start(pid)
    if now is not None:
        return now != started  # another process was given the pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process, which /proc hides (hidepid): alive
        return False
    return False


def _owner(run: Run) -> str:
    tags = run.data.tags
    return f"process {tags.get(TAG_PID, '?')} on {tags.get(TAG_HOST, '?')} (now gone)"


def _dead_runs_of(stage: str, key: str) -> list[Run]:
    """RUNNING runs of ``stage`` with reuse key ``key`` whose process died, newest first."""
    if not key:
        return []
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=(
            f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_KEY}` = '{key}' "
            f"and tags.`{TAG_HOST}` = '{socket.gethostname()}' and attributes.status = 'RUNNING'"
        ),
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return [run for run in runs if is_dead(run)]


def end_dead_runs(by: str) -> None:
    """Mark KILLED, tagged ``ser.ended_by=<by>``, every run of this host still RUNNING whose
    process died, and which no rerun continued or replaced. Never raises: it runs as a command
    ends, maybe with an exception of its own on the way out."""
    try:
        with _tidy_lock():
            runs = mlflow.search_runs(
                search_all_experiments=True, output_format="list",
                filter_string=(f"attributes.status = 'RUNNING' and "
                               f"tags.`{TAG_HOST}` = '{socket.gethostname()}'"),
            )  # fmt: skip
            for run in filter(is_dead, runs):
                _end_dead(run, {TAG_ENDED_BY: by})
                log.warning("%s: run %s, which %s left RUNNING, marked KILLED (no rerun "
                            "continued it)", run.data.tags.get(TAG_STAGE, "?"), run.info.run_id,
                            _owner(run))  # fmt: skip
    except Exception as err:  # the tracking server gone: the next command tidies instead
        log.warning("could not end the runs that dead processes left RUNNING: %s", err)


def _end_dead(run: Run, tags: Mapping[str, str]) -> None:
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, "KILLED")


@contextlib.contextmanager
def _tidy_lock() -> Iterator[None]:
    """One process of this host at a time judges and settles dead runs of this tracking store,
    so two reruns never both continue one dead run, nor one ends a run the other continues.
    Only this host's processes judge this host's runs dead, so a lock on this host suffices."""
    key = hashlib.sha256(mlflow.get_tracking_uri().encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"ser-runs-{key}.lock"
    try:  # read-only: another user's lock file in /tmp can be locked, not written
        handle = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        handle = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


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
    texts = _param_texts(params)
    mlflow.log_params({k: v for k, v in texts.items() if k not in have})
    resolved = {k: v for k, v in texts.items() if k in have and _unquoted(have[k]) != v}
    if resolved:
        mlflow.set_tags({f"{TAG_RESOLVED_PREFIX}{k}": v for k, v in resolved.items()})
        log.warning(
            "MLflow recorded the command line's values of %s; the run used %s (tags %s*)",
            ", ".join(sorted(resolved)), ", ".join(f"{k}={v}" for k, v in sorted(resolved.items())),
            TAG_RESOLVED_PREFIX,
        )


def _param_texts(params: Mapping[str, Any]) -> dict[str, str]:
    return {k: _param_text(v)[:6000] for k, v in params.items()}


def _unquoted(text: str) -> str:
    # `mlflow run` shell-quotes string parameters it logs.
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] == "'" else text


def mark_complete(run_id: str) -> None:
    mlflow.MlflowClient().set_tag(run_id, TAG_COMPLETE, "true")


class StageLogger(MLFlowLogger):
    """Lightning's MLflow logger writing into an existing stage run without ending it.

    Lightning's logger marks its run FINISHED when one ``fit`` ends; a stage fits once per fold
    and only the stage itself may say when it is complete. Metrics are sent in the background
    (MLflow's asynchronous logging): a synchronous write to a SQLite store costs about 20 ms,
    which on a small model is a tenth of a training step. Each ``fit`` waits for its metrics
    at its end, so a stage marked complete has all of them stored.
    """

    def finalize(self, status: str = "success") -> None:
        mlflow.flush_async_logging()


def stage_logger(run_id: str, prefix: str) -> StageLogger:
    """Metrics of one fold's training, under the stage's run, named ``<prefix>-<metric>``."""
    return StageLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=run_id, prefix=prefix,
                       synchronous=False)


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


def download_results(run_id: str, into: Path, name: str = "results.json") -> list[Path]:
    """Every ``name`` file among the ``folds/`` artifacts of ``run_id`` (fine-tuning and the
    probe log each run's ``folds/<fold>/run_<r>/results.json``), downloaded under ``into``;
    none when the run has no such artifacts."""
    if not mlflow.MlflowClient().list_artifacts(run_id, "folds"):
        return []
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="folds", dst_path=str(into)
    )
    return sorted(Path(local).rglob(name))


def log_to_entry_run(paths: Iterable[Path], artifact_path: str | None = None) -> str | None:
    """Log ``paths`` as artifacts of the active run, or else of the run ``mlflow run`` made for
    this entry point (``MLFLOW_RUN_ID``); its id, or None (and nothing logged) when neither."""
    run_id = active_run_id() or os.environ.get("MLFLOW_RUN_ID", "")
    if not run_id:
        return None
    client = mlflow.MlflowClient()
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)
    return run_id
