"""Seconds per epoch of the probe against fine-tuning, on the same fold of the demo corpus.

Both stages run as they ship (their default lr, batch size and masking), on one fold file, with a
callback timing each epoch (training and validation; the first, which pays for start-up, is
left out); the probe's one-off feature extraction is timed on its own and not counted in its
epochs. Prints a Markdown table:

    python benchmarks/probe_speed.py                       # tiny, 3 epochs each
    python benchmarks/probe_speed.py --presets tiny base   # base takes minutes per epoch on a CPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from ser import console
from ser.config import DemoCorpusConfig, FinetuneConfig, ProbeConfig
from ser.data.labels import read_label_file
from ser.data.synthetic import generate_corpus
from ser.stages import finetune, probe
from ser.stages.contract import StageContext


class EpochTimer(Callback):
    """Wall seconds of each training epoch, its validation included (Lightning validates before
    ``on_train_epoch_end``)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


def timed(run: Any, config: Any) -> float:
    """Median seconds per epoch of ``run(config)``, the first epoch left out."""
    timer = EpochTimer()
    run(config, StageContext(callback_factory=lambda index, name: [timer]))
    return statistics.median(timer.seconds[1:])


def measure(preset: str, data: dict[str, str], epochs: int, out: Path) -> dict[str, float]:
    common = {**data, "backbone": preset, "max_epochs": epochs, "num_exps": 1}
    fine_tuning = timed(finetune.run, FinetuneConfig(**common, output_dir=str(out / "ft")))
    config = ProbeConfig(**common, output_dir=str(out / "probe"))
    start = time.perf_counter()
    names = sorted(set(read_label_file(data["labelpath"]).files()))
    store = probe.feature_store(config, names, out / "probe" / "features")
    extraction = time.perf_counter() - start
    return {"fine_tuning": fine_tuning, "probe": timed(probe.run, config),
            "extraction": extraction, "bytes": float(store.pooled.nbytes)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"])
    parser.add_argument("--epochs", type=int, default=3, help="per stage; the first is not timed")
    parser.add_argument("--fold", default="fold_1", help="the demo corpus's fold file to train on")
    args = parser.parse_args()
    console.configure()
    with tempfile.TemporaryDirectory(prefix="probe_speed.") as tmp:
        corpus = generate_corpus(DemoCorpusConfig(output_dir=str(Path(tmp) / "corpus")))
        label_file = corpus.label_dir / f"{args.fold}.json"
        data = {"datadir": str(corpus.audio_dir), "labelpath": str(label_file)}
        rows = {p: measure(p, data, args.epochs, Path(tmp) / p) for p in args.presets}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\ndevice: {device}, torch threads: {torch.get_num_threads()}, demo corpus "
          f"{args.fold}, {args.epochs} epochs per stage (first not timed)\n")
    print("| preset | fine-tuning s/epoch | probe s/epoch | ratio | probe features, once | "
          "features on disk |\n| --- | --- | --- | --- | --- | --- |")
    for preset, r in rows.items():
        print(f"| {preset} | {r['fine_tuning']:.2f} | {r['probe']:.3f} | "
              f"{r['fine_tuning'] / r['probe']:.0f}x | {r['extraction']:.1f} s | "
              f"{r['bytes'] / 1e3:.0f} kB |")


if __name__ == "__main__":
    main()
