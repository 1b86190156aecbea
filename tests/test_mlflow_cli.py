"""What users type: `mlflow run`, `mlflow models predict/serve` and `mlflow server`.

These start real processes (several seconds each) and are marked slow; CI runs them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from ser.data.synthetic import DemoCorpus

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = [
    "-P", "max_epochs=1", "-P", "batch_size=4", "-P", "phase1_training_step=2",
    "-P", "phase2_training_step=2", "-P", "phase2_warmup_step=1", "-P", "num_clusters=2,3",
]  # fmt: skip

pytestmark = pytest.mark.slow


def _env(tracking_uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    return {**env, "PATH": f"{BIN}:{env['PATH']}", "MLFLOW_TRACKING_URI": tracking_uri}


def _mlflow_run(
    entry: str, corpus: DemoCorpus, cwd: Path, tracking_uri: str, *params: str
) -> float:
    data = ["-P", f"datadir={corpus.audio_dir}", "-P", f"labeldir={corpus.label_dir}"]
    start = time.perf_counter()
    result = subprocess.run(
        ["mlflow", "run", str(ROOT), "--env-manager", "local", "-e", entry, *data, *params],
        cwd=cwd, env=_env(tracking_uri), capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return time.perf_counter() - start


def _runs(tracking_uri: str, stage: str) -> list[mlflow.entities.Run]:
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.`ser.stage` = '{stage}'",
        order_by=["attributes.start_time ASC"], output_format="list",
    )  # fmt: skip


def test_ptapt_twice_reuses_every_stage_then_predicts(
    corpus: DemoCorpus, tmp_path: Path, tracking_uri: str
) -> None:
    _mlflow_run("ptapt", corpus, tmp_path, tracking_uri, *SMALL)
    stages = ("pretrain_w2v1", "cluster", "pretrain_w2v2", "finetune")
    first = {s: _runs(tracking_uri, s) for s in stages}
    assert all(len(runs) == 1 for runs in first.values())
    _mlflow_run("ptapt", corpus, tmp_path, tracking_uri, *SMALL)
    parents = _runs(tracking_uri, "ptapt")
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    for stage in stages:
        assert len(_runs(tracking_uri, stage)) == 1  # no stage ran again
        assert parents[1].data.tags[f"ser.reused.{stage}"] == first[stage][0].info.run_id
    assert parents[1].data.metrics["test_UA_mean"] == parents[0].data.metrics["test_UA_mean"]

    wav = sorted(corpus.audio_dir.glob("*.wav"))[0]
    (tmp_path / "input.csv").write_text(f"path\n{wav}\n")
    result = subprocess.run(
        ["mlflow", "models", "predict", "-m", parents[1].data.tags["ser.model_uri"],
         "-i", str(tmp_path / "input.csv"), "-t", "csv", "--env-manager", "local"],
        cwd=tmp_path, env=_env(tracking_uri), capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    prediction = json.loads(result.stdout.strip().splitlines()[-1])["predictions"][0]
    assert prediction["label"] in {"anger", "happy", "neutral", "sad"}
    assert sum(v for k, v in prediction.items() if k.startswith("prob_")) == pytest.approx(1.0)


def test_stages_chain_across_separate_mlflow_runs(
    corpus: DemoCorpus, tmp_path: Path, tracking_uri: str
) -> None:
    _mlflow_run("pretrain_w2v1", corpus, tmp_path, tracking_uri,
                "-P", "training_step=2", "-P", "batch_size=4")  # fmt: skip
    phase1 = _runs(tracking_uri, "pretrain_w2v1")[0]
    uri = f"runs:/{phase1.info.run_id}/w2v1"
    _mlflow_run("cluster", corpus, tmp_path, tracking_uri,
                "-P", f"pretrained_path={uri}", "-P", "num_clusters=2,3")  # fmt: skip
    cluster = _runs(tracking_uri, "cluster")[0]
    assert cluster.info.status == "FINISHED" and cluster.data.params["pretrained_path"] == uri
    assert cluster.data.tags["mlflow.project.entryPoint"] == "cluster"
    stats_uri = f"runs:/{cluster.info.run_id}/clusters/fold_1/cluster_stats.json"
    stats = mlflow.artifacts.load_dict(stats_uri)
    assert stats["num_clusters"] == [2, 3]


def test_a_bad_parameter_is_one_clear_line_before_training(
    corpus: DemoCorpus, tmp_path: Path, tracking_uri: str
) -> None:
    data = ["--datadir", str(corpus.audio_dir), "--labeldir", str(corpus.label_dir)]
    cases = [
        ("cluster", ["--pretrained_path", str(tmp_path), "--num_clusters", "1,8"], "num_clusters"),
        ("finetune", ["--backbone", "no-such-model"], "no-such-model"),
        ("vft", ["--datadir", str(tmp_path / "missing")], "missing"),
    ]
    for entry, args, message in cases:
        result = subprocess.run(
            [sys.executable, str(ROOT / "entrypoints" / f"{entry}.py"), *data, *args],
            cwd=tmp_path, env=_env(tracking_uri), capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.ckpt"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


@contextlib.contextmanager
def _process(args: list[str], cwd: Path, env: dict[str, str], ready_url: str) -> Iterator[None]:
    log = open(cwd / f"{args[1]}-{args[2]}.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        _wait_for(ready_url, 90)
        yield
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


def test_vft_against_a_real_server_then_serve_its_model(corpus: DemoCorpus, tmp_path: Path) -> None:
    port = _free_port()
    server = [
        "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination", str(tmp_path / "server-artifacts"),
    ]  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    with _process(server, tmp_path, _env(uri), f"{uri}/health"):
        _mlflow_run("vft", corpus, tmp_path, uri, "-P", "max_epochs=1", "-P", "batch_size=4")
        parent = _runs(uri, "vft")[0]
        assert parent.info.status == "FINISHED" and "test_UA_mean" in parent.data.metrics
        finetune = _runs(uri, "finetune")[0]
        assert finetune.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert (tmp_path / "server-artifacts").is_dir()  # artifacts went through the server

        serve_port = _free_port()
        serve = [
            "mlflow", "models", "serve", "-m", parent.data.tags["ser.model_uri"],
            "--env-manager", "local", "--host", "127.0.0.1", "-p", str(serve_port),
        ]  # fmt: skip
        with _process(serve, tmp_path, _env(uri), f"http://127.0.0.1:{serve_port}/ping"):
            wav = str(sorted(corpus.audio_dir.glob("*.wav"))[0])
            body = json.dumps({"dataframe_split": {"columns": ["path"], "data": [[wav]]}})
            request = urllib.request.Request(
                f"http://127.0.0.1:{serve_port}/invocations", data=body.encode(),
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
    prediction = answer["predictions"][0]
    assert prediction["label"] in {"anger", "happy", "neutral", "sad"}
