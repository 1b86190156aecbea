"""Optuna searches over a method's fine-tuning settings, every trial a nested MLflow run.

One call of :func:`search` is one *worker*: it opens (or creates) a named study in Optuna's RDB
storage, opens a parent run tagged ``ser.stage=search``, and runs trials until the study holds
``n_trials`` trials that are complete, pruned or running, or ``timeout`` has passed. Each trial
is a child run tagged ``ser.trial=<number>`` with the sampled values as params, and under it the
method's own run and its stage runs (``ser.pipelines``). Stages whose settings a trial shares
with an earlier one (P-TAPT phase 1 and clustering do not depend on fine-tuning's lr) are reused
by the pipelines' reuse mechanism, not recomputed.

The objective is validation UA: the mean over folds and repeats of the tested checkpoint's
``valid_UA``. The search never reads a test score; the best trial's test scores are logged on the
parent once, after the study (``best_test_*``).

Several workers (processes, or machines sharing a database) may run the same study at once: the
trial count is the study's, so together they run ``n_trials`` trials, and a stopped search run
again resumes where the study stands. Two workers that start a trial at the same instant may take
the study one trial past ``n_trials``. A trial of a worker that died without a word (no heartbeat
for :data:`GRACE_S` seconds) is marked failed and no longer counts.

Pruning: each validation epoch reports its UA to the trial at a step counted across runs (run
index x ``max_epochs`` + epoch, so steps mean the same in every trial); when the pruner says so the
trial stops, its MLflow runs end KILLED (the trial run tagged ``ser.trial_state=PRUNED``), and its
fine-tuning run is never marked complete, so never reused.

Each trial samples with a sampler seeded from (``sampler_seed``, trial number): a search run the
same way samples the same values, while concurrent workers and resumed searches do not repeat
each other's draws.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import pytorch_lightning as pl
from optuna.distributions import BaseDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler, RandomSampler, TPESampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState
from pytorch_lightning.callbacks import Callback

from ser import cores, pipelines, recipes, tracking, training
from ser.config import METHOD_CONFIGS, METHOD_STAGES, parse_cluster_sets
from ser.data.labels import LabelFile
from ser.errors import SerInputError

if TYPE_CHECKING:
    from ser.config import SearchConfig
    from ser.stages.contract import CallbackFactory

log = logging.getLogger(__name__)

STAGE = "search"
TRIAL_STAGE = tracking.TRIAL_STAGE
TAG_TRIAL = "ser.trial"
TAG_TRIAL_STATE = "ser.trial_state"
TAG_STUDY = "ser.study"
TAG_BEST_RUN = "ser.best_run_id"
ATTR_RUN = "mlflow_run_id"  # trial user attributes
ATTR_FINETUNE_RUN = "mlflow_finetune_run_id"
ATTR_SETTINGS = "ser.settings"  # study user attribute: what a resumed search must not change
MONITOR = "valid_UA"
OBJECTIVE = "valid_UA_mean"
TARGET_NAME = "Validation UA (%)"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
SQLITE_TIMEOUT_S = 60  # several workers on one SQLite file wait for its lock this long
OPEN_ATTEMPTS = 3
HEARTBEAT_S = 30  # a running trial's worker says it is alive this often
GRACE_S = 180  # after this long without a word its trial is failed and no longer counts
# Search settings a resumed study may change: budget, storage and how the next trials are picked.
_CONTROL = ("n_trials", "workers_per_machine", "timeout", "study_name", "storage", "sampler",
            "sampler_seed", "pruner", "pruner_startup_trials", "pruner_warmup_steps")  # fmt: skip
# Settings that change where or how fast a trial runs, not what it computes.
_NOT_SETTINGS = tracking.NOT_IN_KEY | {"output_root"}


@dataclass(frozen=True)
class SearchSpace:
    """What a trial samples: the fine-tuning lr (log scale), its batch size, and for P-TAPT the
    cluster-count set. A range of one value is fixed, not sampled."""

    lr: tuple[float, float]
    batch_sizes: tuple[int, ...]
    num_clusters: tuple[tuple[int, ...], ...] = ()  # empty: the method does no clustering

    @property
    def tuned(self) -> list[str]:
        sizes = {"lr": 2 if self.lr[0] < self.lr[1] else 1, "batch_size": len(self.batch_sizes),
                 "num_clusters": len(self.num_clusters)}  # fmt: skip
        return [name for name, size in sizes.items() if size > 1]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Every value a trial's method config takes from the space, sampled or fixed."""
        tuned = self.tuned
        low, high = self.lr
        values: dict[str, Any] = {
            "lr": trial.suggest_float("lr", low, high, log=True) if "lr" in tuned else low,
            "batch_size": (trial.suggest_categorical("batch_size", list(self.batch_sizes))
                           if "batch_size" in tuned else self.batch_sizes[0]),
        }  # fmt: skip
        if self.num_clusters:
            texts = [_counts_text(c) for c in self.num_clusters]
            chosen = (trial.suggest_categorical("num_clusters", texts)
                      if "num_clusters" in tuned else texts[0])  # fmt: skip
            values["num_clusters"] = self.num_clusters[texts.index(chosen)]
        return values


@dataclass(frozen=True)
class SearchResult:
    """What one worker did, and where the study stands after it."""

    study_name: str
    storage: str  # password hidden
    parent_run_id: str
    trials_run: int  # by this worker
    complete: int  # in the study
    pruned: int
    best_trial: int | None
    best_value: float | None  # validation UA, percent
    best_params: dict[str, Any]
    best_run_id: str


# --------------------------------------------------------------------------- checks


def centred_on_method(config: SearchConfig) -> SearchConfig:
    """``config`` with the lr range and batch sizes it leaves at their defaults (fine-tuning's
    lr / 10 .. x 10, half, once and twice its batch size) around the method's own defaults
    instead: a probe's head trains at another lr than a backbone does. The fine-tuning methods'
    own defaults are fine-tuning's, so their space stays as it is."""
    method = METHOD_CONFIGS.get(config.method)
    if method is None:  # refused with the list of methods by check_config
        return config
    lr, batch = method.lr, method.batch_size
    centred = {"lr_min": lr / 10, "lr_max": lr * 10, "batch_sizes": (batch // 2, batch, batch * 2)}
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    unset = {name: value for name, value in centred.items()
             if getattr(config, name) == defaults[name]}  # fmt: skip
    return dataclasses.replace(config, **unset)


def check_config(config: SearchConfig) -> tuple[SearchSpace, list[LabelFile]]:
    """The search space and the folds, after refusing every bad setting (``config.check()``:
    the search's own, and the method's at the corners of the space), and data without a Val
    split."""
    config.check()
    clusters = "cluster" in {step.stage for step in METHOD_STAGES[config.method]}
    space = SearchSpace(
        lr=(float(config.lr_min), float(config.lr_max)),
        batch_sizes=tuple(dict.fromkeys(config.batch_sizes)),
        num_clusters=parse_cluster_sets(config.num_clusters_choices) if clusters else (),
    )
    return space, _folds_with_val(config)


def _counts_text(counts: tuple[int, ...]) -> str:
    return ",".join(map(str, counts))


def _folds_with_val(config: SearchConfig) -> list[LabelFile]:
    folds = training.load_folds(config)
    without = [str(fold.path) for fold in folds if not fold.val]
    if without:
        raise SerInputError(
            f"label file(s) {', '.join(without)} have an empty Val split; a search selects on "
            "validation UA and never looks at Test, so it needs a validation split: hold out a "
            "speaker (or some Train utterances) as Val in every label file"
        )
    return folds


# --------------------------------------------------------------------------- study and storage


def default_storage() -> str:
    """SQLite ``optuna.db`` beside the MLflow database when that is SQLite, else in the working
    directory."""
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).parent / 'optuna.db'}"
    return "sqlite:///optuna.db"


@contextlib.contextmanager
def one_process_at_a_time(url: str) -> Iterator[None]:
    """Hold a machine-wide lock for the SQLite database at ``url`` (no lock for other URLs).

    Processes that start together on a fresh SQLite database would each create its tables (MLflow
    runs migrations) and all but one would fail; under this lock the first creates them and the
    others find them made.
    """
    if not url.startswith("sqlite:///"):
        yield
        return
    path = Path(url.removeprefix("sqlite:///")).resolve()
    key = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"ser-sqlite-{key}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at ``url`` (any SQLAlchemy URL), with heartbeats so a trial of a dead
    worker is failed, and SQLite writers that wait for each other instead of failing."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith(
        "sqlite") else {}
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S, heartbeat_stale_trial_callback=_dead_worker_trial,
                )  # fmt: skip
        except (IntegrityError, OperationalError, ProgrammingError) as err:
            # Workers that start together on a fresh database race to create its tables (on
            # PostgreSQL the loser may hear "already exists" of a table or a type); the losers
            # find them made when they try again.
            if isinstance(err, ProgrammingError) and not _already_exists(err):
                raise SerInputError(_storage_error(url, err)) from err
            if attempt == OPEN_ATTEMPTS:
                raise SerInputError(_storage_error(url, err)) from err
            time.sleep(attempt)
        except Exception as err:  # SQLAlchemy and drivers raise many types for a bad URL
            raise SerInputError(_storage_error(url, err)) from err
    raise AssertionError("unreachable")


def _already_exists(err: Exception) -> bool:
    # PostgreSQL's duplicate_table and duplicate_object
    return getattr(getattr(err, "orig", None), "sqlstate", "") in ("42P07", "42710")


def _dead_worker_trial(study: Study, trial: FrozenTrial) -> None:
    """End the MLflow runs a dead worker left RUNNING with its trial, now failed."""
    run_id = trial.user_attrs.get(ATTR_RUN, "")
    log.warning("search: trial %d of study %s had no heartbeat for %d s (its worker died?): "
                "marked failed%s", trial.number, study.study_name, GRACE_S,
                f", with its MLflow run {run_id}" if run_id else "")  # fmt: skip
    if not run_id:
        return
    tracking.set_tags({TAG_TRIAL_STATE: TrialState.FAIL.name}, run_id=run_id)
    pending = [run_id]
    while pending:  # the trial run, its method run and the stage runs under that
        current = pending.pop()
        if tracking.get_run(current).info.status == "RUNNING":
            tracking.end_run_by_id(current, "FAILED")
        pending += [child.info.run_id for child in tracking.child_runs(current)]


def _storage_error(url: str, err: Exception) -> str:
    return (
        f"storage={hidden_password(url)}: cannot open it ({err}); pass an SQLAlchemy URL such "
        "as sqlite:///optuna.db or postgresql://user@host/db"
    )


def hidden_password(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def study_settings(config: SearchConfig, folds: Sequence[LabelFile]) -> dict[str, Any]:
    """What a study's trials must share: the method, the space, every fixed setting and a
    fingerprint of the data. JSON values, as the study stores them."""
    values = {k: v for k, v in dataclasses.asdict(config).items()
              if k not in _CONTROL and k not in _NOT_SETTINGS}  # fmt: skip
    values["data_fingerprint"] = tracking.data_fingerprint(config.datadir, [f.path for f in folds])
    return json.loads(json.dumps(values))


def load_study(
    config: SearchConfig, name: str, storage: optuna.storages.BaseStorage, settings: dict[str, Any]
) -> Study:
    """The named study (created when new); refuses one made with other ``settings``
    (:func:`study_settings`)."""
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(n_startup_trials=config.pruner_startup_trials,
                                    n_warmup_steps=config.pruner_warmup_steps)
        if config.pruner == "median" else optuna.pruners.NopPruner()
    )  # fmt: skip
    study = optuna.create_study(
        study_name=name, storage=storage, direction="maximize", load_if_exists=True,
        sampler=TrialSeededSampler(config.sampler, config.sampler_seed), pruner=pruner,
    )  # fmt: skip
    if study.direction != StudyDirection.MAXIMIZE:
        raise SerInputError(
            f"study {name!r} minimises; a search maximises validation UA: pick another study_name"
        )
    saved = study.user_attrs.get(ATTR_SETTINGS)
    if saved is None:
        study.set_user_attr(ATTR_SETTINGS, settings)
    elif saved != settings:
        differ = sorted(k for k in settings.keys() | saved.keys()
                        if saved.get(k) != settings.get(k))  # fmt: skip
        raise SerInputError(
            f"study {name!r} was made with other settings ({', '.join(differ)} differ); resume "
            "it with the same ones, or pass another study_name to start a new study"
        )
    return study


class TrialSeededSampler(BaseSampler):
    """TPE (or random) sampling whose random state comes from (seed, trial number).

    One seeded sampler per process would make every worker, and every resumed search, draw the
    same values as the first; seeding per trial keeps a one-worker search reproducible without
    that.
    """

    def __init__(self, kind: str, seed: int) -> None:
        self._kind, self._seed = kind, seed
        self._inner: BaseSampler = self._make(0)

    def _make(self, number: int) -> BaseSampler:
        seed = int(np.random.SeedSequence([self._seed, number]).generate_state(1)[0])
        return TPESampler(seed=seed) if self._kind == "tpe" else RandomSampler(seed=seed)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._inner = self._make(trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, name: str, distribution: BaseDistribution
    ) -> Any:
        return self._inner.sample_independent(study, trial, name, distribution)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._inner.after_trial(study, trial, state, values)


# --------------------------------------------------------------------------- pruning


class TrialPruned(optuna.TrialPruned, tracking.StopRun):
    """Optuna's pruning signal that also ends the trial's MLflow runs as KILLED."""


class PruningCallback(Callback):
    """Reports each validation's UA to the trial and stops the trial when the pruner says so.

    Steps count across the fine-tuning runs of a trial (``first_step`` + epoch), so step *s*
    means the same fold, repeat and epoch in every trial.
    """

    def __init__(self, trial: optuna.Trial, first_step: int, run_name: str) -> None:
        self.trial, self.first_step, self.run_name = trial, first_step, run_name

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(MONITOR)
        if trainer.sanity_checking or value is None:
            return
        step = self.first_step + trainer.current_epoch
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            raise TrialPruned(
                f"pruned at step {step} (run {self.run_name}, epoch {trainer.current_epoch}): "
                f"validation UA {float(value):.2f}"
            )


def pruning_callbacks(trial: optuna.Trial, epochs_per_run: int) -> CallbackFactory:
    """A fine-tuning ``callback_factory`` that reports to ``trial``."""
    return lambda index, name: [PruningCallback(trial, index * epochs_per_run, name)]


# --------------------------------------------------------------------------- trials


def make_objective(
    config: SearchConfig, space: SearchSpace, study_name: str
) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        values = space.suggest(trial)
        tags = {TAG_TRIAL: str(trial.number), tracking.TAG_METHOD: config.method,
                TAG_STUDY: study_name}  # fmt: skip
        with tracking.stage_run(TRIAL_STAGE, tags, nested=True,
                                run_name=f"trial-{trial.number}") as run:  # fmt: skip
            trial.set_user_attr(ATTR_RUN, run.info.run_id)
            tracking.log_params({"trial_number": trial.number, **values})
            pruning = pruning_callbacks(trial, config.max_epochs)
            try:
                headline = pipelines.run_method(config.method_config(values),
                                                finetune_callbacks=pruning)
            except optuna.TrialPruned:
                tracking.set_tags({TAG_TRIAL_STATE: TrialState.PRUNED.name})
                raise
            except SystemExit as err:
                # Lightning turns Ctrl-C into SystemExit, which Optuna would let pass with the
                # trial left RUNNING; as KeyboardInterrupt the trial is marked failed.
                tracking.set_tags({TAG_TRIAL_STATE: TrialState.FAIL.name})
                raise KeyboardInterrupt from err
            except BaseException:
                tracking.set_tags({TAG_TRIAL_STATE: TrialState.FAIL.name})
                raise
            value = _objective_value(headline, run.info.run_id)
            tracking.log_metrics({MONITOR: value})
            tracking.set_tags({TAG_TRIAL_STATE: TrialState.COMPLETE.name})
            trial.set_user_attr(ATTR_FINETUNE_RUN, _finetune_run(run.info.run_id, config.method))
        log.info("search: trial %d: validation UA %.2f with %s (run %s)", trial.number, value,
                 _describe(values), run.info.run_id)
        return value

    return objective


def _objective_value(headline: dict[str, float], run_id: str) -> float:
    if OBJECTIVE not in headline:
        raise RuntimeError(
            f"trial run {run_id}: the method logged no {OBJECTIVE} (a fine-tuning run reused "
            "from before validation UA was logged?); delete that run or change its settings"
        )
    return float(headline[OBJECTIVE])


def _finetune_run(trial_run_id: str, method: str) -> str:
    for child in tracking.child_runs(trial_run_id):
        if child.data.tags.get(tracking.TAG_STAGE) == method:
            return child.data.tags.get(tracking.TAG_FINETUNE_RUN, "")
    return ""


def _describe(values: dict[str, Any]) -> str:
    def text(value: Any) -> str:
        if isinstance(value, tuple):
            return ",".join(map(str, value))
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return ", ".join(f"{name}={text(value)}" for name, value in values.items())


def counted_trials(study: Study) -> int:
    """Trials that count toward ``n_trials``: complete, pruned or running (after failing those
    of dead workers)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def run_trials(study: Study, objective: Callable[[optuna.Trial], float], n_trials: int,
               timeout: float) -> int:  # fmt: skip
    """Trials until the study counts ``n_trials`` or ``timeout`` seconds have passed (a running
    trial is never cut short); how many this worker ran."""
    deadline = time.monotonic() + timeout if timeout > 0 else None
    ran = 0
    while counted_trials(study) < n_trials:
        if deadline is not None and time.monotonic() >= deadline:
            log.info("search: timeout of %.0f s reached after %d trial(s)", timeout, ran)
            break
        study.optimize(objective, n_trials=1)
        ran += 1
    running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    if running:
        log.info("search: %d trial(s) still running count toward n_trials=%d: in other workers, "
                 "or left by a worker that died (failed %d s after its last heartbeat; then "
                 "run the search again)", running, n_trials, GRACE_S)  # fmt: skip
    return ran


# --------------------------------------------------------------------------- the report


def report(study: Study, space: SearchSpace) -> tuple[FrozenTrial | None, str]:
    """Best value, params and run, the best trial's test scores, and the plots, on the active
    (parent) run. Returns the best trial (None when no trial is complete) and its run id."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    tracking.log_metrics({"trials_complete": len(complete), "trials_pruned": len(pruned)})
    if not complete:
        log.warning("search: study %s has no complete trial yet; nothing to report",
                    study.study_name)
        return None, ""
    best = study.best_trial
    run_id = best.user_attrs.get(ATTR_RUN, "")
    tracking.log_metrics({"best_valid_UA": float(best.value)})
    tracking.log_params({**{f"best_{k}": v for k, v in best.params.items()},
                         "best_trial": best.number, "best_run_id": run_id})  # fmt: skip
    tracking.set_tags({TAG_BEST_RUN: run_id})
    finetune_id = best.user_attrs.get(ATTR_FINETUNE_RUN, "")
    if finetune_id:  # the one place the search reads test scores: reported, never selected on
        test = tracking.get_run(finetune_id).data.metrics
        tracking.log_metrics({f"best_{k}": v for k, v in test.items() if k.startswith("test_")})
    else:
        log.warning("search: best trial %d has no fine-tuning run recorded (added to the study "
                    "by hand?); no test scores to report", best.number)
    _log_plots(study, space)
    return best, run_id


def _log_plots(study: Study, space: SearchSpace) -> None:
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore", ExperimentalWarning)
        history = plots.plot_optimization_history(study, target_name=TARGET_NAME)
        figures = {"optimization_history.png": history.figure}
        if _importances_defined(study, space):
            importances = plots.plot_param_importances(study, target_name=TARGET_NAME)
            figures["param_importances.png"] = importances.figure
        else:
            log.info("search: parameter importances need two complete trials that differ in a "
                     "tuned value; not plotted")
    for warning in caught:  # e.g. too few trials for importances to differ: worth a line
        log.info("search: plots: %s", warning.message)
    for name, figure in figures.items():
        tracking.log_figure(figure, f"{STAGE}/{name}")  # bbox "tight": the legend is outside
        plt.close(figure)


def _importances_defined(study: Study, space: SearchSpace) -> bool:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return len(complete) >= 2 and any(
        len({str(t.params.get(name)) for t in complete}) > 1 for name in space.tuned
    )


# --------------------------------------------------------------------------- the search


def search(config: SearchConfig) -> SearchResult:
    """Run this worker's share of the study ``config`` names (see the module docstring)."""
    config = centred_on_method(recipes.resolve(config))
    space, folds = check_config(config)
    cores.set_threads(config.workers_per_machine, config.num_workers)
    settings = study_settings(config, folds)
    name = config.study_name or f"ser-{config.method}"
    url = config.storage or default_storage()
    with one_process_at_a_time(url):
        study = load_study(config, name, open_storage(url), settings)
    with one_process_at_a_time(tracking.tracking_uri()):
        tracking.open_store()
    before = len(study.trials)
    shown = hidden_password(url)
    tags = {tracking.TAG_METHOD: config.method, TAG_STUDY: name, "ser.storage": shown}
    with tracking.stage_run(STAGE, tags, nested=False) as parent:
        tracking.log_params({**dataclasses.asdict(config), "study_name": name, "storage": shown})
        log.info("search: study %s in %s holds %d trial(s); running trials until it counts %d "
                 "(tuning %s)", name, shown, before, config.n_trials,
                 ", ".join(space.tuned) or "nothing: every range is one value")  # fmt: skip
        ran = run_trials(study, make_objective(config, space, name), config.n_trials,
                         config.timeout)  # fmt: skip
        best, best_run = report(study, space)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    result = SearchResult(
        study_name=name, storage=shown, parent_run_id=parent.info.run_id, trials_run=ran,
        complete=states.count(TrialState.COMPLETE), pruned=states.count(TrialState.PRUNED),
        best_trial=best.number if best else None, best_value=best.value if best else None,
        best_params=dict(best.params) if best else {}, best_run_id=best_run,
    )  # fmt: skip
    log.info("search: this worker ran %d trial(s); study %s: %d complete, %d pruned; best: %s; "
             "logged to run %s", ran, name, result.complete, result.pruned,
             f"trial {result.best_trial}, validation UA {result.best_value:.2f} "
             f"({_describe(result.best_params)})" if best else "none",
             parent.info.run_id)  # fmt: skip
    return result

