"""No MLflow run stays RUNNING: runs end by how their command ended, and a rerun continues (or
replaces) what a killed process left RUNNING, while runs of live processes are left alone."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Run

from ser import pipelines, tracking
from ser.config import SearchConfig, TaptMethodConfig
from ser.data.synthetic import DemoCorpus
from ser.search import search

KEY = {tracking.TAG_KEY: "k1"}


def _left_running(key: str = "k1", params: dict[str, str] | None = None, stage: str = "cluster",
                  **owner: str) -> str:  # fmt: skip
    """A RUNNING run as a process leaves it when it dies: by default a process of this host that
    had this test's pid before it (another start time), so it is gone."""
    tags = {**tracking.owner_tags(), tracking.TAG_PID_START: "0", **owner,
            tracking.TAG_STAGE: stage, tracking.TAG_KEY: key}  # fmt: skip
    client = mlflow.MlflowClient()
    run_id = client.create_run(experiment_id="0", tags=tags).info.run_id
    for name, value in (params or {}).items():
        client.log_param(run_id, name, value)
    for step in range(3):
        client.log_metric(run_id, "loss", 3.0 - step, step=step)
    return run_id


def _gone_pid() -> str:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: no process has this pid now
    return str(child.pid)


def _get(run_id: str) -> Run:
    return mlflow.get_run(run_id)


def _running() -> list[Run]:
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="attributes.status = 'RUNNING'")  # fmt: skip


def test_a_dead_run_of_the_same_work_is_continued(tracking_uri: str) -> None:
    dead = _left_running(params={"lr": "0.1"})
    with tracking.stage_run("cluster", KEY, nested=False, params={"lr": 0.1, "k": 3}) as run:
        mlflow.log_metric("loss", 0.5, step=3)
    assert run.info.run_id == dead
    ended = _get(dead)
    assert ended.info.status == "FINISHED" and ended.data.params == {"lr": "0.1", "k": "3"}
    assert ended.data.tags[tracking.TAG_PID_START] == tracking.owner_tags()[
        tracking.TAG_PID_START]  # fmt: skip
    history = mlflow.MlflowClient().get_metric_history(dead, "loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("params", "parent"), [({"lr": "0.2"}, False), ({"lr": "0.1"}, True)],
    ids=["other-params", "other-parent"],
)  # fmt: skip
def test_a_dead_run_that_cannot_be_continued_is_marked_killed(
    tracking_uri: str, params: dict[str, str], parent: bool
) -> None:
    dead = _left_running(params=params, **{tracking.TAG_PID: _gone_pid()})
    # The dead run was top-level; with `parent`, this one nests under a method run.
    with (
        tracking.stage_run("ptapt", {}, nested=False) if parent else contextlib.nullcontext(),
        tracking.stage_run("cluster", KEY, nested=True, params={"lr": 0.1}) as run,
    ):
        pass
    replaced = _get(dead)
    assert run.info.run_id != dead
    assert replaced.info.status == "KILLED"
    assert replaced.data.tags[tracking.TAG_REPLACED_BY] == run.info.run_id
    assert _running() == []


def test_runs_of_live_or_unknown_processes_are_left_alone(tracking_uri: str) -> None:
    live = _left_running(**{tracking.TAG_PID_START: tracking.owner_tags()[tracking.TAG_PID_START]})
    elsewhere = _left_running(**{tracking.TAG_HOST: "another-host"})
    untagged = mlflow.MlflowClient().create_run(
        experiment_id="0", tags={tracking.TAG_STAGE: "cluster", **KEY}).info.run_id
    with tracking.stage_run("cluster", KEY, nested=False, params={}) as run:
        pass
    assert run.info.run_id not in {live, elsewhere, untagged}
    for left in (live, elsewhere, untagged):
        tags = _get(left).data.tags
        assert _get(left).info.status == "RUNNING"
        assert tracking.TAG_REPLACED_BY not in tags and tracking.TAG_ENDED_BY not in tags


def test_a_command_ends_the_dead_runs_it_did_not_continue(tracking_uri: str) -> None:
    other_work = _left_running(key="k2", stage="pretrain_w2v1")
    with (
        tracking.stage_run("ptapt", {}, nested=False) as parent,
        tracking.stage_run("cluster", KEY, nested=True),
    ):
        assert _get(other_work).info.status == "RUNNING"  # only as the command ends
    ended = _get(other_work)
    assert ended.info.status == "KILLED"
    assert ended.data.tags[tracking.TAG_ENDED_BY] == parent.info.run_id


def _stopped(how: str) -> None:
    if how == "exception":
        raise RuntimeError("broken")
    if how == "ctrl-c":
        raise KeyboardInterrupt
    # Never the default handler here: that would end this test process.
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize(
    ("how", "raised", "status"),
    [("exception", RuntimeError, "FAILED"), ("ctrl-c", KeyboardInterrupt, "KILLED"),
     ("sigterm", tracking.Terminated, "KILLED")],
)  # fmt: skip
def test_every_run_ends_with_how_its_command_ended(
    tracking_uri: str, how: str, raised: type[BaseException], status: str
) -> None:
    with (
        pytest.raises(raised) as caught,
        tracking.stage_run("ptapt", {}, nested=False) as parent,
        tracking.stage_run("cluster", KEY, nested=True) as child,
    ):
        _stopped(how)
    assert [_get(r.info.run_id).info.status for r in (parent, child)] == [status, status]
    if how == "sigterm":
        assert caught.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handed back


def test_a_search_ends_the_trial_runs_of_a_killed_worker(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    trial = _left_running(key="", stage="trial")
    method = _left_running(key="m", stage="vft")
    config = SearchConfig(
        method="vft", datadir=str(corpus.audio_dir), n_trials=1,
        labelpath=str(corpus.label_dir / "fold_1.json"), output_root=str(tmp_path / "out"),
        max_epochs=1, batch_sizes=(4,), lr_min=1e-3, lr_max=1e-3,
    )  # fmt: skip
    result = search(config)
    for left in (trial, method):
        run = _get(left)
        assert run.info.status == "KILLED"
        assert run.data.tags[tracking.TAG_ENDED_BY] == result.parent_run_id
    assert _running() == []


_KILLED_IN_FINETUNING = """
import dataclasses, json, os, signal, sys
from ser import pipelines
from ser.config import TaptMethodConfig

def killed(config, context):
    os.kill(os.getpid(), signal.SIGKILL)

pipelines.STAGES["finetune"] = dataclasses.replace(pipelines.STAGES["finetune"], run=killed)
pipelines.run_method(TaptMethodConfig(**json.loads(sys.argv[1])))
"""


def _stage_runs(stage: str) -> list[Run]:
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`ser.stage` = '{stage}'")  # fmt: skip


@pytest.mark.slow
def test_a_method_killed_in_a_later_stage_is_continued_under_one_parent(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    values = {
        "datadir": str(corpus.audio_dir), "labelpath": str(corpus.label_dir / "fold_1.json"),
        "output_root": str(tmp_path / "out"), "max_epochs": 1, "batch_size": 4,
        "tapt_training_step": 2, "tapt_warmup_step": 1, "tapt_batch_size": 4, "num_workers": 0,
    }  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    killed = subprocess.run([sys.executable, "-c", _KILLED_IN_FINETUNING, json.dumps(values)],
                            cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (dead_parent,) = _stage_runs("tapt")
    (dead_finetune,) = _stage_runs("finetune")
    assert dead_finetune.info.status == dead_parent.info.status == "RUNNING"

    pipelines.run_method(TaptMethodConfig(**values))
    (parent,) = _stage_runs("tapt")
    assert parent.info.run_id == dead_parent.info.run_id and parent.info.status == "FINISHED"
    children = {r.data.tags["ser.stage"]: r for r in tracking.child_runs(parent.info.run_id)}
    assert set(children) == {"tapt_pretrain", "finetune"}
    assert children["finetune"].info.run_id == dead_finetune.info.run_id
    assert all(r.info.status == "FINISHED" and r.data.tags["ser.complete"] == "true"
               for r in children.values())  # fmt: skip
    assert "ser.reused.tapt_pretrain" not in parent.data.tags  # its own child, not reused
    assert parent.data.tags["ser.finetune_run"] == dead_finetune.info.run_id
    assert _running() == []
