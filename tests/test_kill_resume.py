"""A stage killed with SIGKILL mid-training resumes from its last checkpoint, in the same MLflow
run, when re-run; SIGTERM ends its run KILLED."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from ser.data.synthetic import DemoCorpus

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30


def _last_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def _command(corpus: DemoCorpus, out: Path) -> list[str]:
    return [
        sys.executable, str(ROOT / "entrypoints" / "tapt_pretrain.py"),
        "--datadir", str(corpus.audio_dir),
        "--labelpath", str(corpus.label_dir / "fold_1.json"),
        "--output_dir", str(out), "--training_step", str(STEPS), "--warmup_step", "2",
        "--checkpoint_every", "5", "--batch_size", "4", "--keep_checkpoints", "true",
    ]  # fmt: skip


def _stopped_after_a_checkpoint(command: list[str], last: Path, env: dict[str, str],
                                how: signal.Signals) -> int:  # fmt: skip
    """Start ``command``, send it ``how`` once it saved a resume point; its exit status."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(how)
    process.wait(timeout=120)
    return process.returncode


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_with_the_planned_steps(
    corpus: DemoCorpus, tmp_path: Path, tracking_uri: str
) -> None:
    out = tmp_path / "tapt"
    command = _command(corpus, out)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    last = out / "fold_1" / "checkpoints" / "last.ckpt"
    returncode = _stopped_after_a_checkpoint(command, last, env, signal.SIGKILL)
    assert returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = _last_step(last)
    assert 0 < killed_at < STEPS
    (killed,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert killed.info.status == "RUNNING"  # nobody could end it

    rerun_ms = time.time() * 1000
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _last_step(last) == STEPS
    # The rerun continued the killed run: one run, its params kept, its metrics carried on.
    (resumed,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["ser.complete"] == "true"
    assert resumed.data.params == killed.data.params
    history = mlflow.MlflowClient().get_metric_history(resumed.info.run_id, "fold_1-loss")
    before = [m.step for m in history if m.timestamp < rerun_ms]
    after = [m.step for m in history if m.timestamp >= rerun_ms]
    assert before and min(before) < killed_at  # the killed process's steps stay
    assert after and min(after) >= killed_at  # continued from the checkpoint, not from 0
    assert max(after) in (STEPS - 1, STEPS)


@pytest.mark.slow
def test_sigterm_ends_the_run_killed(corpus: DemoCorpus, tmp_path: Path, tracking_uri: str) -> None:
    out = tmp_path / "tapt"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    last = out / "fold_1" / "checkpoints" / "last.ckpt"
    returncode = _stopped_after_a_checkpoint(_command(corpus, out), last, env, signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "KILLED" and "ser.complete" not in run.data.tags
