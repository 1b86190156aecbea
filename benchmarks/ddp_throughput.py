"""Fine-tuning throughput with 1 and 2 data-parallel processes (gloo on CPU, NCCL on a GPU).

Runs the ``finetune`` entry point (which starts torchrun for ``--devices 2``) twice per process
count, for a short and a long number of epochs on the demo corpus; the difference removes
start-up, loading and evaluation-free overheads, leaving training utterances per second:

    python benchmarks/ddp_throughput.py                    # CPU: 1 and 2 processes
    python benchmarks/ddp_throughput.py --accelerator gpu --devices 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _corpus(where: Path) -> Path:
    subprocess.run(
        [sys.executable, str(ROOT / "entrypoints" / "demo_corpus.py"), "--output_dir",
         str(where)], check=True, capture_output=True,
    )  # fmt: skip
    return where


def _seconds(corpus: Path, out: Path, devices: int, epochs: int, args: argparse.Namespace) -> float:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out}.db"}
    command = [
        sys.executable, str(ROOT / "entrypoints" / "finetune.py"),
        "--datadir", str(corpus / "Audio_16k"), "--labelpath", str(corpus / "labels/fold_1.json"),
        "--output_dir", str(out), "--max_epochs", str(epochs), "--batch_size", str(args.batch_size),
        "--accelerator", args.accelerator, "--devices", str(devices), "--batching", "bucket",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--epochs", type=int, nargs=2, default=[1, 6], help="short and long")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = _corpus(Path(tmp) / "corpus")
        train = len(json.loads((corpus / "labels/fold_1.json").read_text())["Train"])
        short, long = args.epochs
        print(f"| processes | {short} epoch(s), s | {long} epochs, s | train utterances / s |")
        print("| --- | --- | --- | --- |")
        for devices in args.devices:
            times = [_seconds(corpus, Path(tmp) / f"d{devices}e{e}", devices, e, args)
                     for e in (short, long)]  # fmt: skip
            rate = (long - short) * train / (times[1] - times[0])
            print(f"| {devices} | {times[0]:.1f} | {times[1]:.1f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
