"""Optuna searches: trials as nested MLflow runs, shared and resumed studies, pruning, reuse."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
import torch
from optuna.trial import TrialState

from ser import search as search_module
from ser.config import SearchConfig
from ser.data.synthetic import DemoCorpus
from ser.errors import SerInputError
from ser.search import search

ROOT = Path(__file__).resolve().parents[1]
LR = {"lr_min": 1e-4, "lr_max": 1e-1}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model gains nothing from two threads, and on a busy two-core machine their
    contention made each trial several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(corpus: DemoCorpus, tmp_path: Path, **overrides: Any) -> Any:
    """One fold, one epoch, batches of 2 or 4: a trial takes a second or two."""
    values: dict[str, Any] = {
        "method": "vft", "datadir": str(corpus.audio_dir),
        "labelpath": str(corpus.label_dir / "fold_1.json"), "output_root": str(tmp_path / "out"),
        "max_epochs": 1, "batch_sizes": (2, 4), **LR,
    }  # fmt: skip
    return SearchConfig(**{**values, **overrides})


def _runs(stage: str) -> list[mlflow.entities.Run]:
    return mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.`ser.stage` = '{stage}'",
        output_format="list",
    )  # fmt: skip


def _children(run_id: str) -> list[mlflow.entities.Run]:
    return mlflow.search_runs(
        search_all_experiments=True, output_format="list",
        filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
    )  # fmt: skip


def _study(name: str, tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def test_a_three_trial_study_tracks_each_trial_under_the_search_run(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    result = search(_config(corpus, tmp_path, n_trials=3, study_name="three"))
    assert result.storage == f"sqlite:///{tmp_path / 'optuna.db'}"  # beside mlflow.db
    assert (result.trials_run, result.complete, result.pruned) == (3, 3, 0)
    study = _study("three", tmp_path)
    trials = {t.number: t for t in study.trials}
    assert sorted(trials) == [0, 1, 2]

    (parent,) = _runs("search")
    assert parent.info.run_id == result.parent_run_id
    assert parent.data.tags["ser.method"] == "vft" and parent.data.tags["ser.study"] == "three"
    children = {int(r.data.tags["ser.trial"]): r for r in _children(parent.info.run_id)}
    assert sorted(children) == [0, 1, 2]
    for number, run in children.items():
        trial = trials[number]
        assert run.info.status == "FINISHED" and run.data.tags["ser.trial_state"] == "COMPLETE"
        assert run.data.params["trial_number"] == str(number)
        assert float(run.data.params["lr"]) == pytest.approx(trial.params["lr"])
        assert run.data.params["batch_size"] == str(trial.params["batch_size"])
        assert run.data.metrics["valid_UA"] == pytest.approx(trial.value)
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        # the method's own run nests under the trial, its fine-tuning run under that
        (method_run,) = _children(run.info.run_id)
        assert method_run.data.tags["ser.stage"] == "vft"
        (finetune,) = _children(method_run.info.run_id)
        assert finetune.info.run_id == trial.user_attrs["mlflow_finetune_run_id"]
        assert finetune.data.params["lr"] == run.data.params["lr"]
        assert finetune.data.metrics["valid_UA_mean"] == pytest.approx(trial.value)

    best = study.best_trial
    assert result.best_trial == best.number and result.best_params == best.params
    assert parent.data.metrics["best_valid_UA"] == pytest.approx(best.value)
    assert float(parent.data.params["best_lr"]) == pytest.approx(best.params["lr"])
    assert parent.data.params["best_batch_size"] == str(best.params["batch_size"])
    assert parent.data.params["best_run_id"] == children[best.number].info.run_id
    assert parent.data.tags["ser.best_run_id"] == children[best.number].info.run_id
    best_finetune = mlflow.get_run(best.user_attrs["mlflow_finetune_run_id"])
    assert parent.data.metrics["best_test_UA_mean"] == pytest.approx(
        best_finetune.data.metrics["test_UA_mean"]
    )
    assert not any(k.startswith("test_") for k in parent.data.metrics)  # only best_test_*
    images = mlflow.artifacts.list_artifacts(run_id=parent.info.run_id, artifact_path="search")
    assert sorted(Path(a.path).name for a in images) == [
        "optimization_history.png", "param_importances.png",
    ]  # fmt: skip

    # Same seed, new study: the same values again, so every fine-tuning run is reused.
    again = search(_config(corpus, tmp_path, n_trials=3, study_name="three-again"))
    assert [t.params for t in _study("three-again", tmp_path).trials] == [
        trials[n].params for n in range(3)
    ]
    assert again.best_value == pytest.approx(result.best_value)
    assert len(_runs("finetune")) == 3


def test_a_resumed_study_continues_its_trial_count(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    first = search(_config(corpus, tmp_path, n_trials=2, study_name="resumed"))
    second = search(_config(corpus, tmp_path, n_trials=4, study_name="resumed"))
    assert (first.trials_run, second.trials_run) == (2, 2)
    study = _study("resumed", tmp_path)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({t.params["lr"] for t in study.trials}) == 4  # the resumed worker drew anew
    for parent, numbers in ((first, {"0", "1"}), (second, {"2", "3"})):
        assert {r.data.tags["ser.trial"] for r in _children(parent.parent_run_id)} == numbers
    assert search(_config(corpus, tmp_path, n_trials=4, study_name="resumed")).trials_run == 0

    with pytest.raises(SerInputError, match=r"other settings \(max_epochs differ\)"):
        search(_config(corpus, tmp_path, n_trials=5, study_name="resumed", max_epochs=2))
    assert len(_study("resumed", tmp_path).trials) == 4


def test_a_clearly_worse_trial_is_pruned_and_its_runs_killed(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    # Two earlier trials that scored above any possible UA at every step: whatever the next
    # trial learns, it is worse than their median at its first validation.
    study = optuna.create_study(
        study_name="pruned", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize"
    )
    distributions = {
        "lr": optuna.distributions.FloatDistribution(LR["lr_min"], LR["lr_max"], log=True),
        "batch_size": optuna.distributions.CategoricalDistribution([2, 4]),
    }
    for lr in (1e-3, 2e-3):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr, "batch_size": 4}, distributions=distributions, value=101.0,
            intermediate_values={0: 101.0, 1: 101.0},
        ))  # fmt: skip
    result = search(_config(corpus, tmp_path, n_trials=3, study_name="pruned", max_epochs=2,
                            pruner_warmup_steps=0))  # fmt: skip
    assert (result.trials_run, result.pruned) == (1, 1)
    trial = _study("pruned", tmp_path).trials[2]
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [0]  # stopped at its first validation

    (run,) = _children(result.parent_run_id)
    assert run.data.tags["ser.trial"] == "2" and run.data.tags["ser.trial_state"] == "PRUNED"
    assert run.info.status == "KILLED"
    (method_run,) = _children(run.info.run_id)
    (finetune,) = _children(method_run.info.run_id)
    for killed in (method_run, finetune):
        assert killed.info.status == "KILLED"
        assert "ser.complete" not in killed.data.tags  # never reused
    assert "valid_UA" not in run.data.metrics


def test_pruning_steps_count_across_folds_and_epochs(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    config = _config(corpus, tmp_path, n_trials=1, labelpath="", labeldir=str(corpus.label_dir),
                     max_epochs=2, pruner="none")  # fmt: skip
    search(config)
    (trial,) = _study("ser-vft", tmp_path).trials
    finetune = mlflow.get_run(trial.user_attrs["mlflow_finetune_run_id"])
    client = mlflow.MlflowClient()
    expected = {}
    for index, fold in enumerate(("fold_1", "fold_2", "fold_3")):  # natural order, as trained
        history = client.get_metric_history(finetune.info.run_id, f"{fold}/run_0-valid_UA")
        assert len(history) == 2  # one validation per epoch
        for epoch, metric in enumerate(sorted(history, key=lambda m: m.step)):
            expected[index * 2 + epoch] = metric.value
    assert trial.intermediate_values == pytest.approx(expected)
    assert sorted(trial.intermediate_values) == list(range(6))


def test_a_trial_of_a_dead_worker_is_failed_and_replaced(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(search_module, "GRACE_S", 1)
    storage = search_module.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="dead", storage=storage, direction="maximize")
    dead = study.ask()  # a worker took this trial, said it was alive once, and died
    storage.record_heartbeat(dead._trial_id)
    left_running = mlflow.MlflowClient().create_run(experiment_id="0")
    dead.set_user_attr("mlflow_run_id", left_running.info.run_id)
    time.sleep(2.5)  # past the grace period (the database clock counts whole seconds)
    result = search(_config(corpus, tmp_path, n_trials=1, study_name="dead"))
    assert result.trials_run == 1
    assert [t.state for t in _study("dead", tmp_path).trials] == [
        TrialState.FAIL, TrialState.COMPLETE,
    ]  # fmt: skip
    ended = mlflow.get_run(left_running.info.run_id)
    assert ended.info.status == "FAILED" and ended.data.tags["ser.trial_state"] == "FAIL"


def test_the_search_needs_a_validation_split(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    labels = tmp_path / "labels"
    labels.mkdir()
    for source in sorted(corpus.label_dir.glob("*.json")):
        splits = json.loads(source.read_text())
        splits["Train"].update(splits.pop("Val"))
        (labels / source.name).write_text(json.dumps({**splits, "Val": {}}))
    config = _config(corpus, tmp_path, labelpath="", labeldir=str(labels))
    with pytest.raises(SerInputError, match="empty Val split.*needs a validation split"):
        search(config)
    assert not list(tmp_path.glob("*.db"))  # neither MLflow nor Optuna was touched


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_trials": 0}, "n_trials=0 must be an integer >= 1"),
        ({"method": "xft"}, "method='xft' is not one of: vft, tapt, ptapt"),
        ({"lr_min": 0.1, "lr_max": 0.01}, "lr_min=0.1 must be <= lr_max=0.01"),
        ({"lr_min": 0.0}, "lr_min=0.0 must be a finite number > 0"),
        ({"batch_sizes": ()}, "batch_sizes"),
        ({"batch_sizes": (4, 0)}, "batch_sizes='4,0'"),
        ({"method": "ptapt", "num_clusters_choices": "8,x;16"}, "num_clusters_choices"),
        ({"method": "ptapt", "num_clusters_choices": "1,8"}, "integers >= 2"),
        ({"pruner": "hyperband"}, "pruner='hyperband' is not one of: median, none"),
        ({"sampler": "grid"}, "sampler='grid'"),
        ({"timeout": -1.0}, "timeout=-1.0"),
        ({"max_epochs": 0}, "max_epochs=0"),
        ({"storage": "nonsense:///x"}, "storage=nonsense:///x: cannot open it"),
    ],
)
def test_bad_parameters_are_refused_before_any_run(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(SerInputError, match=message.replace("(", r"\(").replace("?", r"\?")):
        search(_config(corpus, tmp_path, **overrides))
    assert not list(tmp_path.glob("*.db"))  # neither MLflow nor Optuna was touched


def test_one_value_ranges_are_fixed_not_tuned() -> None:
    space = search_module.SearchSpace(lr=(1e-3, 1e-3), batch_sizes=(4,), num_clusters=((2, 3),))
    assert space.tuned == []
    trial = optuna.create_study().ask()
    assert space.suggest(trial) == {"lr": 1e-3, "batch_size": 4, "num_clusters": (2, 3)}
    assert trial.params == {}
    wide = dataclasses.replace(space, lr=(1e-4, 1e-2), num_clusters=((2, 3), (4, 6)))
    assert wide.tuned == ["lr", "num_clusters"]


_WORKER = """
import sys, time
from pathlib import Path
from ser.cli import entry_main
import ser.search  # the heavy imports, before the start line
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.05)
sys.exit(entry_main("search", sys.argv[2:]))
"""


@pytest.mark.slow
def test_two_worker_processes_share_one_study(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    go = tmp_path / "go"
    argv = [
        "--method", "vft", "--n_trials", "4", "--study_name", "shared", "--storage", storage,
        "--datadir", str(corpus.audio_dir),
        "--labelpath", str(corpus.label_dir / "fold_1.json"),
        "--output_root", str(tmp_path / "out"), "--max_epochs", "1", "--batch_sizes", "2,4",
        "--lr_min", str(LR["lr_min"]), "--lr_max", str(LR["lr_max"]),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(go), *argv], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]  # fmt: skip
    time.sleep(1.0)
    go.touch()  # both start at once, on a fresh Optuna database and a fresh MLflow database
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    study = optuna.load_study(study_name="shared", storage=storage)
    numbers = sorted(t.number for t in study.trials)
    # Two workers asking at the same instant may take the study one trial past n_trials.
    assert numbers == list(range(len(numbers))) and len(numbers) in (4, 5)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({(t.params["lr"], t.params["batch_size"]) for t in study.trials}) == len(numbers)

    parents = {r.info.run_id: r for r in _runs("search")}
    assert len(parents) == 2
    trial_runs = _runs("trial")
    assert sorted(int(r.data.tags["ser.trial"]) for r in trial_runs) == numbers
    assert {r.info.run_id for r in trial_runs} == {t.user_attrs["mlflow_run_id"]
                                                   for t in study.trials}  # fmt: skip
    assert all(r.info.status == "FINISHED" for r in trial_runs)
    per_parent = [sum(r.data.tags["mlflow.parentRunId"] == p for r in trial_runs) for p in parents]
    assert sorted(per_parent)[0] >= 1 and sum(per_parent) == len(numbers)  # both worked
    assert {p.data.metrics["best_valid_UA"] for p in parents.values()} <= {
        t.value for t in study.trials
    }


@pytest.mark.slow
def test_a_ptapt_search_reuses_pretraining_across_trials(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    config = _config(
        corpus, tmp_path, method="ptapt", n_trials=2, batch_sizes=(4,), num_clusters_choices="2,3",
        phase1_training_step=2, phase2_training_step=2, phase2_warmup_step=1,
    )  # fmt: skip
    result = search(config)
    assert result.complete == 2
    assert [len(_runs(s)) for s in ("pretrain_w2v1", "cluster", "pretrain_w2v2", "finetune")] == [
        1, 1, 1, 2,
    ]  # fmt: skip
    trial_runs = sorted(_runs("trial"), key=lambda r: int(r.data.tags["ser.trial"]))
    later_method = _children(trial_runs[1].info.run_id)[0]
    assert later_method.data.tags["ser.stage"] == "ptapt"
    for stage in ("pretrain_w2v1", "cluster", "pretrain_w2v2"):
        assert later_method.data.tags[f"ser.reused.{stage}"] == _runs(stage)[0].info.run_id
    assert trial_runs[1].data.params["num_clusters"] == "2,3"  # fixed, logged, not tuned
    assert set(result.best_params) == {"lr"}
