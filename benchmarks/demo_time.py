"""How long a new user's first command takes: ``mlflow run . -e ptapt`` with no parameters (what
``make demo`` runs), on a fresh copy of the project, on an idle machine and beside other
CPU-bound jobs (a laptop that is also doing something else).

Each case starts from nothing: a fresh copy of the tracked files, no demo corpus (the command
builds it), a fresh tracking store; so every stage trains. Per-stage times are read back from
the MLflow runs the command made.

    python benchmarks/demo_time.py                 # idle, then with 2 busy processes
    python benchmarks/demo_time.py --busy 0        # idle only
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]
SPIN = "while True: pass"


def _copy_project(into: Path) -> Path:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True,
                           text=True).stdout.split()  # fmt: skip
    for name in files:
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    return into


def _run_demo(project: Path) -> tuple[float, str]:
    uri = f"sqlite:///{project / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    began = time.perf_counter()
    subprocess.run(["mlflow", "run", ".", "--env-manager", "local", "-e", "ptapt"],
                   cwd=project, env=env, check=True, capture_output=True)  # fmt: skip
    return time.perf_counter() - began, uri


def _stage_seconds(uri: str) -> dict[str, float]:
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    seconds: dict[str, float] = {}
    for run in runs:
        name = run.data.tags.get("ser.stage", run.info.run_name or "?")
        if run.info.end_time:
            seconds[name] = (run.info.end_time - run.info.start_time) / 1000
    return seconds


def _case(busy: int) -> tuple[float, dict[str, float]]:
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory(prefix="ser-demo-") as work:
            total, uri = _run_demo(_copy_project(Path(work)))
            return total, _stage_seconds(uri)
    finally:
        for spinner in spinners:
            spinner.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, nargs="*", default=[0, 2],
                        help="other CPU-bound processes running, one case each")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; load before: {os.getloadavg()[0]:.2f}")
    print("| other busy processes | total | stages |\n| --- | --- | --- |")
    for busy in args.busy:
        total, stages = _case(busy)
        detail = ", ".join(f"{name} {sec:.0f} s" for name, sec in sorted(stages.items()))
        print(f"| {busy} | {total:.0f} s ({total / 60:.1f} min) | {detail} |", flush=True)


if __name__ == "__main__":
    main()
