"""A stage killed with SIGKILL mid-training resumes from its last checkpoint when re-run."""

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


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_with_the_planned_steps(
    corpus: DemoCorpus, tmp_path: Path, tracking_uri: str
) -> None:
    out = tmp_path / "tapt"
    command = [
        sys.executable, str(ROOT / "entrypoints" / "tapt_pretrain.py"),
        "--datadir", str(corpus.audio_dir),
        "--labelpath", str(corpus.label_dir / "fold_1.json"),
        "--output_dir", str(out), "--training_step", str(STEPS), "--warmup_step", "2",
        "--checkpoint_every", "5", "--batch_size", "4", "--keep_checkpoints", "true",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    last = out / "fold_1" / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = _last_step(last)
    assert 0 < killed_at < STEPS

    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _last_step(last) == STEPS
    runs = mlflow.search_runs(
        search_all_experiments=True, output_format="list", order_by=["attributes.start_time ASC"]
    )
    killed, resumed = runs
    assert killed.info.status == "RUNNING" and "ser.complete" not in killed.data.tags
    assert resumed.data.tags["ser.complete"] == "true"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(resumed.info.run_id,
                                                                      "fold_1-loss")]  # fmt: skip
    assert min(steps) >= killed_at  # continued from the checkpoint, did not start over
    assert max(steps) in (STEPS - 1, STEPS)
