"""A team's tracking: one PostgreSQL behind an MLflow server, and Optuna studies in it too.

A real PostgreSQL server (tests/postgres.py: Debian's binaries, 127.0.0.1, a free port, password
login) holds two databases: ``mlflow``, the backend store of a real ``mlflow server`` that also
proxies artifacts (``--artifacts-destination``), and ``optuna``, the study's storage, which the
search workers open directly as a remote machine would. Clients run as separate processes with
``MLFLOW_TRACKING_URI=http://...``, as a lab's machines do.

Slow (real servers, real processes); CI runs them. Without the server binaries the tests fail
with what to install (.ci/run installs them), never pass silently.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState
from postgres import Postgres, free_port, running_postgres

from ser.data.synthetic import DemoCorpus

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVER_START_S = 180  # migrations of a fresh PostgreSQL store on a busy two-core machine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


@dataclass(frozen=True)
class TeamServer:
    uri: str  # http://127.0.0.1:<port>
    artifacts: Path  # --artifacts-destination
    database: str  # the backend store's database in `postgres`


@pytest.fixture(scope="module")
def team_server(
    postgres: Postgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TeamServer]:
    """``mlflow server`` on the ``mlflow`` database, proxying artifacts to a local folder."""
    workdir = tmp_path_factory.mktemp("team-server")
    port = free_port()
    args = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", postgres.create_database("mlflow"),
        "--artifacts-destination", str(workdir / "artifacts"),
    ]  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # No job runner: its seven extra processes serve MLflow's GenAI jobs, which ser never uses,
    # and would take a two-core machine's CPU at start.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(workdir / "server.log", "w") as log:
        process = subprocess.Popen(args, cwd=workdir, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            _wait_for(f"{uri}/health", SERVER_START_S, process, workdir / "server.log")
            yield TeamServer(uri=uri, artifacts=workdir / "artifacts", database="mlflow")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def _wait_for(url: str, seconds: float, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({process.returncode}):\n"
                               f"{log.read_text()[-3000:]}")  # fmt: skip
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds} s:\n{log.read_text()[-3000:]}")


@pytest.fixture()
def as_client(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[str], mlflow.MlflowClient]]:
    """Point this process's MLflow at a tracking URI for one test; reset afterwards."""

    def use(uri: str) -> mlflow.MlflowClient:
        monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        return mlflow.MlflowClient(uri)

    yield use
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # back to the environment's


def _client_env(uri: str, experiment: str) -> dict[str, str]:
    """A lab machine's environment: the team server, one experiment, one torch thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment,
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def _runs(client: mlflow.MlflowClient, experiment_id: str, stage: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`ser.stage` = '{stage}'",
                              order_by=["attributes.start_time ASC"])  # fmt: skip


def _stored_at(server: TeamServer, artifact_uri: str) -> Path:
    """Where the server keeps ``mlflow-artifacts:/...`` on its disk."""
    assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri  # proxied, not a path
    return server.artifacts / artifact_uri.removeprefix("mlflow-artifacts:/").lstrip("/")


def test_a_method_run_lands_in_postgresql_through_the_team_server(
    postgres: Postgres, team_server: TeamServer, corpus: DemoCorpus, tmp_path: Path,
    as_client: Callable[[str], mlflow.MlflowClient],
) -> None:  # fmt: skip
    client = as_client(team_server.uri)
    experiment_id = client.create_experiment("team-vft")
    lab = tmp_path / "lab-machine"
    lab.mkdir()
    args = [
        sys.executable, str(ROOT / "entrypoints" / "vft.py"), "--datadir", str(corpus.audio_dir),
        "--labelpath", str(corpus.label_dir / "fold_1.json"), "--max_epochs", "1",
        "--batch_size", "4", "--output_root", str(lab / "outputs"),
    ]  # fmt: skip
    result = subprocess.run(args, cwd=lab, env=_client_env(team_server.uri, "team-vft"),
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    # The method run and its fine-tuning child, as the server reports them.
    [method] = _runs(client, experiment_id, "vft")
    [finetune] = _runs(client, experiment_id, "finetune")
    assert method.info.status == finetune.info.status == "FINISHED"
    assert finetune.data.tags["mlflow.parentRunId"] == method.info.run_id
    assert finetune.data.tags["ser.complete"] == "true"
    assert "test_UA_mean" in method.data.metrics

    # Artifacts went through the server to --artifacts-destination; the client kept none.
    stored = _stored_at(team_server, finetune.info.artifact_uri)
    assert (stored / "summary.json").is_file()
    assert not (lab / "mlruns").exists() and not (lab / "mlartifacts").exists()
    assert not (lab / "mlflow.db").exists()

    # The runs are rows of PostgreSQL's `runs` table (the client made no local store).
    rows = postgres.query(team_server.database,
                          "SELECT run_uuid, status FROM runs WHERE experiment_id = %s",
                          (int(experiment_id),))  # fmt: skip
    assert dict(rows) == {method.info.run_id: "FINISHED", finetune.info.run_id: "FINISHED"}
    [(metrics,)] = postgres.query(team_server.database,
                                  "SELECT count(*) FROM metrics WHERE run_uuid = %s",
                                  (method.info.run_id,))  # fmt: skip
    assert metrics >= 1

    # The logged model comes back through the server and predicts.
    model_uri = method.data.tags["ser.model_uri"]
    model_info = mlflow.models.get_model_info(model_uri)
    assert (_stored_at(team_server, client.get_logged_model(model_info.model_id).artifact_location)
            / "MLmodel").is_file()  # fmt: skip
    model = mlflow.pyfunc.load_model(model_uri)
    wav = sorted(corpus.audio_dir.glob("*.wav"))[0]
    prediction = model.predict(pd.DataFrame({"path": [str(wav)]}))
    assert prediction["label"][0] in {"anger", "happy", "neutral", "sad"}


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


def test_two_workers_share_a_study_in_postgresql(
    postgres: Postgres, team_server: TeamServer, corpus: DemoCorpus, tmp_path: Path,
    as_client: Callable[[str], mlflow.MlflowClient],
) -> None:  # fmt: skip
    """Two workers (``python entrypoints/search.py ...``, as on two machines) start at the same
    instant on a new study in PostgreSQL; MLflow through the team server."""
    client = as_client(team_server.uri)
    experiment_id = client.create_experiment("team-search")  # made once, before the workers
    storage = postgres.create_database("optuna")  # empty: the workers race to make its tables
    go = tmp_path / "go"
    # As a lab's machines would: no password on the command line (nor in the logged `storage`
    # param); libpq reads it from PGPASSWORD (or ~/.pgpass).
    shared = postgres.url("optuna", with_password=False)
    argv = [
        "--method", "vft", "--n_trials", "4", "--study_name", "team", "--storage", shared,
        "--workers_per_machine", "2",
        "--datadir", str(corpus.audio_dir), "--labelpath", str(corpus.label_dir / "fold_1.json"),
        "--output_root", str(tmp_path / "outputs"), "--max_epochs", "1", "--batch_sizes", "2,4",
        "--lr_min", "1e-4", "--lr_max", "1e-1",
    ]  # fmt: skip
    env = {**_client_env(team_server.uri, "team-search"), "PGPASSWORD": postgres.password}
    machines = [tmp_path / f"machine-{index}" for index in range(2)]
    workers = []
    for machine in machines:
        machine.mkdir()
        with open(machine / "worker.log", "w") as log:  # a file: a full pipe would block it
            workers.append(subprocess.Popen(
                [sys.executable, "-c", _WORKER, str(go), *argv], cwd=machine, env=env,
                stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip
    time.sleep(1.0)
    go.touch()  # both create the study and ask for trials at once
    try:
        for worker in workers:
            worker.wait(timeout=600)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    logs = [(m / "worker.log").read_text(errors="replace")[-3000:] for m in machines]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(logs)

    # No trial lost or duplicated: n_trials counted trials (one more if both asked at once).
    study = optuna.load_study(study_name="team", storage=storage)
    numbers = sorted(t.number for t in study.trials)
    assert numbers == list(range(len(numbers))) and len(numbers) in (4, 5)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    stored = postgres.query("optuna", "SELECT t.number FROM trials t JOIN studies s "
                            "ON t.study_id = s.study_id WHERE s.study_name = 'team'")  # fmt: skip
    assert sorted(n for (n,) in stored) == numbers

    # Each trial has exactly one MLflow trial run, and each trial run belongs to a trial.
    parents = {r.info.run_id: r for r in _runs(client, experiment_id, "search")}
    assert len(parents) == 2
    trial_runs = _runs(client, experiment_id, "trial")
    assert sorted(int(r.data.tags["ser.trial"]) for r in trial_runs) == numbers
    by_number = {int(r.data.tags["ser.trial"]): r for r in trial_runs}
    for trial in study.trials:
        run = by_number[trial.number]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.info.status == "FINISHED" and run.data.tags["ser.trial_state"] == "COMPLETE"
        assert run.data.tags["ser.study"] == "team"
        assert run.data.metrics["valid_UA"] == pytest.approx(trial.value)
    assert {p.data.params["storage"] for p in parents.values()} == {shared}  # no password
    per_worker = sorted(sum(r.data.tags["mlflow.parentRunId"] == p for r in trial_runs)
                        for p in parents)  # fmt: skip
    assert per_worker[0] >= 1 and sum(per_worker) == len(numbers)  # both workers ran trials
    # ... each with its method run, all of it in the team's PostgreSQL.
    methods = _runs(client, experiment_id, "vft")
    assert sorted(r.data.tags["mlflow.parentRunId"] for r in methods) == sorted(
        r.info.run_id for r in trial_runs
    )
    rows = postgres.query(team_server.database,
                          "SELECT count(*) FROM runs WHERE experiment_id = %s AND status = %s",
                          (int(experiment_id), "FINISHED"))  # fmt: skip
    assert rows[0][0] == len(parents) + len(trial_runs) + 2 * len(methods)  # + fine-tuning runs
    assert not any((machine / "mlruns").exists() for machine in machines)
