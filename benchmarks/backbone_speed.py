"""Seconds per training step of the fine-tuning model on CPU (or a GPU when one is visible).

Measures forward + backward + Adam step of ``UtteranceClassifier`` on random audio, after a
warm-up step, median of ``--steps`` steps:

    python benchmarks/backbone_speed.py                         # tiny, batch 1 and 4, 3 s
    python benchmarks/backbone_speed.py --presets tiny base --batch_sizes 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ser.config import SAMPLE_RATE
from ser.models.backbones import load_backbone
from ser.models.heads import UtteranceClassifier


def step_seconds(preset: str, batch_size: int, seconds: float, steps: int, device: str) -> float:
    torch.manual_seed(0)
    model = UtteranceClassifier(load_backbone(preset), num_classes=4).to(device).train()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-4)
    audio = torch.randn(batch_size, int(seconds * SAMPLE_RATE), device=device)
    mask = torch.ones_like(audio, dtype=torch.long)
    labels = torch.randint(0, 4, (batch_size,), device=device)
    times = []
    for _ in range(steps + 1):  # the first step pays for allocation and is dropped
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(audio, mask), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, audio: {args.seconds} s\n")
    print("| preset | batch | s / step (fwd+bwd+Adam) |\n| --- | --- | --- |")
    for preset in args.presets:
        for batch_size in args.batch_sizes:
            value = step_seconds(preset, batch_size, args.seconds, args.steps, device)
            print(f"| {preset} | {batch_size} | {value:.3f} |")


if __name__ == "__main__":
    main()
