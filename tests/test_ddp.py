"""Two processes (gloo, CPU), one run: every stage data-parallel under torchrun.

Each test starts real ranks through the entry points (which hand over to torchrun for
``--devices 2``) or through torchrun itself, then checks what a one-process run would leave:
one MLflow run per stage, one logged model, each rank a share of the batches, and evaluation
over every utterance exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from pytorch_lightning import Trainer

from ser.config import ClusterConfig, FinetuneConfig
from ser.data.datasets import UtteranceDataset
from ser.data.labels import read_label_file
from ser.data.sampling import BucketBatchSampler
from ser.data.synthetic import DemoCorpus
from ser.stages import cluster, finetune
from ser.stages.finetune import FinetuneModule

ROOT = Path(__file__).resolve().parents[1]
TWO = ["--accelerator", "cpu", "--devices", "2"]


def _run(script: str, args: list[str], tracking_uri: str, cwd: Path, launcher: list[str] | None
         = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("MLFLOW_RUN_ID", None)
    command = [*(launcher or [sys.executable]), str(ROOT / "entrypoints" / script), *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _kill_everything_running(marker: str) -> None:
    """SIGKILL every process whose command line holds ``marker``: torchrun starts its ranks in
    sessions of their own, so killing its process group would leave them running."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in command:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def _runs() -> list[mlflow.entities.Run]:
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def _models(runs: list[mlflow.entities.Run]) -> int:
    client = mlflow.MlflowClient()
    experiments = sorted({r.info.experiment_id for r in runs})
    return len(client.search_logged_models(experiment_ids=experiments))


def _data(corpus: DemoCorpus) -> list[str]:
    return ["--datadir", str(corpus.audio_dir), "--labelpath", str(corpus.label_files[0])]


def _per_rank_batches(corpus: DemoCorpus, batch_size: int) -> int:
    fold = read_label_file(corpus.label_files[0])
    dataset = UtteranceDataset(str(corpus.audio_dir), fold.train, sorted(set(fold.train.values())))
    sampler = BucketBatchSampler(dataset.lengths, batch_size=batch_size, num_buckets=1,
                                 drop_last=True, num_replicas=2, rank=0)  # fmt: skip
    return len(sampler)


def _one_process_test_scores(out: Path, corpus: DemoCorpus, run: dict) -> dict:
    """The tested checkpoint evaluated again in this single process."""
    fold = read_label_file(corpus.label_files[0])
    config = FinetuneConfig(datadir=str(corpus.audio_dir))
    module = FinetuneModule.load_from_checkpoint(out / run["checkpoint"], weights_only=True)
    loader = finetune.eval_loader(config, fold.test, module.classes, module.eval_batch_size)
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False).test(module, loader, verbose=False)  # fmt: skip
    return {"scores": module.test_scores.as_dict(), "predictions": module.test_predictions}


@pytest.mark.slow
def test_ptapt_on_two_processes_leaves_what_one_process_leaves(
    corpus: DemoCorpus, tracking_uri: str, tmp_path: Path
) -> None:
    args = [*_data(corpus), *TWO, "--output_root", str(tmp_path / "out"), "--max_epochs", "2",
            "--batch_size", "2", "--phase1_training_step", "4", "--phase1_batch_size", "2",
            "--phase1_checkpoint_every", "2", "--num_clusters", "2,3",
            "--phase2_training_step", "4", "--phase2_warmup_step", "1",
            "--phase2_checkpoint_every", "2", "--keep_run_models", "true"]  # fmt: skip
    _run("ptapt.py", args, tracking_uri, tmp_path)

    runs = _runs()
    stages = sorted(r.data.tags["ser.stage"] for r in runs)
    assert stages == ["cluster", "finetune", "pretrain_w2v1", "pretrain_w2v2", "ptapt"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags.get("ser.complete") == "true" for r in runs if r.data.tags[
        "ser.stage"] != "ptapt")  # fmt: skip
    parent = next(r for r in runs if r.data.tags["ser.stage"] == "ptapt")
    assert {r.data.tags.get("mlflow.parentRunId") for r in runs if r is not parent} == {
        parent.info.run_id}
    assert _models(runs) == 1
    tuned = next(r for r in runs if r.data.tags["ser.stage"] == "finetune")
    out = Path(tuned.data.tags["ser.output_dir"])
    result = json.loads((out / "fold_1" / "run_0" / "results.json").read_text())
    # each rank a half of every epoch's batches
    assert result["global_step"] == 2 * _per_rank_batches(corpus, 2)
    fold = read_label_file(corpus.label_files[0])
    assert sorted(result["predictions"]) == sorted(fold.test)  # every test utterance once
    assert parent.data.metrics["test_UA_mean"] == pytest.approx(result["scores"]["UA"])

    # Clustering shared its feature pass between the ranks: the labels are those that one
    # process makes from the same phase-1 model.
    by_stage = {r.data.tags["ser.stage"]: Path(r.data.tags["ser.output_dir"]) for r in runs
                if "ser.output_dir" in r.data.tags}  # fmt: skip
    alone = cluster.run(ClusterConfig(
        datadir=str(corpus.audio_dir), labelpath=str(corpus.label_files[0]),
        output_dir=str(tmp_path / "alone"), pretrained_path=str(by_stage["pretrain_w2v1"]),
        num_clusters=(2, 3),
    ))  # fmt: skip
    shared = by_stage["cluster"] / "fold_1" / "clusters" / "clusters.json"
    assert json.loads(shared.read_text()) == json.loads(alone.cluster_files["fold_1"].read_text())


@pytest.mark.slow
def test_a_stage_under_torchrun_equals_one_process_evaluation(
    corpus: DemoCorpus, tracking_uri: str, tmp_path: Path
) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]  # fmt: skip
    out = tmp_path / "ft"
    args = [*_data(corpus), *TWO, "--output_dir", str(out), "--max_epochs", "2",
            "--batch_size", "2", "--keep_checkpoints", "true"]  # fmt: skip
    _run("finetune.py", args, tracking_uri, tmp_path, launcher=torchrun)
    runs = _runs()
    assert [r.data.tags["ser.stage"] for r in runs] == ["finetune"] and _models(runs) == 1
    run = json.loads((out / "fold_1" / "run_0" / "results.json").read_text())
    again = _one_process_test_scores(out, corpus, run)
    assert again["predictions"] == run["predictions"]
    assert again["scores"] == run["scores"]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert not any("checkpoints" in path or path.endswith(".ckpt") for path in logged)


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_from_its_last_checkpoint(
    corpus: DemoCorpus, tracking_uri: str, tmp_path: Path
) -> None:
    steps, out = 30, tmp_path / "tapt"
    args = [*_data(corpus), *TWO, "--output_dir", str(out), "--training_step", str(steps),
            "--warmup_step", "2", "--checkpoint_every", "5", "--batch_size", "4",
            "--keep_checkpoints", "true"]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    command = [sys.executable, str(ROOT / "entrypoints" / "tapt_pretrain.py"), *args]
    last = out / "fold_1" / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    _kill_everything_running(str(out))  # torchrun and both ranks, as a scheduler would
    process.wait()
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < killed_at < steps

    _run("tapt_pretrain.py", args, tracking_uri, tmp_path)
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == steps
    (run,) = _runs()  # the killed run, continued: no second run, none left RUNNING
    assert run.info.status == "FINISHED" and run.data.tags.get("ser.complete") == "true"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "fold_1-loss")
    assert max(m.step for m in history) >= steps - 1  # its curve goes on to the planned end
