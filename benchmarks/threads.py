"""One ``tiny`` training step (forward, backward, Adam; 4 utterances of 3 s) with 1 and 2 torch
threads, on an idle machine and beside other CPU-bound processes: the measurement behind
``ser.cores`` (threads from the free cores, never torch's default of every core).

Each case runs in a fresh process, since OpenMP reads its settings when torch loads:

    python benchmarks/threads.py                  # 0 and 2 busy processes
    python benchmarks/threads.py --busy 0 1 2 3
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

SPIN = "while True: pass"
STEPS = 20


def _step_ms(threads: int) -> float:
    import torch

    from ser.models.backbones import load_backbone

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load_backbone("tiny")
    optimizer = torch.optim.Adam(model.parameters())
    audio = torch.randn(4, 48_000)
    for _ in range(3):  # warm-up
        model(audio).last_hidden_state.sum().backward()
    began = time.perf_counter()
    for _ in range(STEPS):
        model(audio).last_hidden_state.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - began) / STEPS * 1000


def _measure(threads: int) -> float:
    result = subprocess.run([sys.executable, __file__, "--one", str(threads)], check=True,
                            capture_output=True, text=True)  # fmt: skip
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, nargs="*", default=[0, 2])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a single measurement
    args = parser.parse_args()
    if args.one:
        print(f"{_step_ms(args.one):.1f}")
        return
    print("| other busy processes | 1 thread, ms/step | 2 threads, ms/step |\n| --- | --- | --- |")
    for busy in args.busy:
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
        try:
            one, two = _measure(1), _measure(2)
        finally:
            for spinner in spinners:
                spinner.kill()
        print(f"| {busy} | {one:.0f} | {two:.0f} |", flush=True)


if __name__ == "__main__":
    main()
