"""Seconds for one evaluation pass of the fine-tuning module over the demo corpus's Val and Test
splits: one utterance at a time (how group-norm models were evaluated before) vs batched.

Each pass is ``Trainer.validate`` of a freshly initialised ``FinetuneModule`` (the ``tiny``
preset: a group-norm feature encoder, as wav2vec2-base) over ``ser.stages.finetune.eval_loader``,
the loader validation and test use, with ``torch.set_num_threads(--threads)``: median and min of
``--repeats`` passes after one warm-up pass, the two batch sizes taking turns so that load from
other processes weighs on both alike. Also prints the largest difference of log-probabilities
between the two and whether every argmax agrees. The corpus is the demo's (``DemoCorpusConfig``
defaults: 4 speakers x 4 classes x 12 utterances of 1.5-4 s), generated once into
``--corpus_dir``::

    python benchmarks/eval_batching.py
    python benchmarks/eval_batching.py --corpus_dir data/demo --fold 2 --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch

from ser.config import EMOTIONS_4, DemoCorpusConfig, FinetuneConfig
from ser.data.labels import read_label_file
from ser.data.synthetic import DemoCorpus, generate_corpus
from ser.models.finetuned import EVAL_BATCH_SIZE
from ser.stages import finetune
from ser.stages.finetune import FinetuneModule


def _trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False)


def pass_seconds(module: FinetuneModule, config: FinetuneConfig, items: Mapping[str, str],
                 batch_sizes: Sequence[int], repeats: int) -> list[list[float]]:
    """Seconds of each validation pass over ``items``, per batch size, after a warm-up pass.
    The batch sizes take turns, so that load from other processes weighs on each alike."""
    loaders = [finetune.eval_loader(config, items, module.classes, b) for b in batch_sizes]
    trainer = _trainer()
    times: list[list[float]] = [[] for _ in batch_sizes]
    for _ in range(repeats + 1):
        for loader, own in zip(loaders, times, strict=True):
            start = time.perf_counter()
            trainer.validate(module, loader, verbose=False)
            own.append(time.perf_counter() - start)
    return [own[1:] for own in times]


def logits(module: FinetuneModule, config: FinetuneConfig, items: Mapping[str, str],
           batch_size: int) -> dict[str, torch.Tensor]:
    """Each utterance's log-probabilities (predict_step), by name."""
    loader = finetune.eval_loader(config, items, module.classes, batch_size)
    outputs = _trainer().predict(module, loader)
    return {n: p.log() for out in outputs for n, p in zip(out["names"], out["probs"], strict=True)}


def compare(module: FinetuneModule, config: FinetuneConfig, items: Mapping[str, str],
            repeats: int) -> str:
    alone_s, batched_s = pass_seconds(module, config, items, (1, EVAL_BATCH_SIZE), repeats)
    alone = logits(module, config, items, 1)
    batched = logits(module, config, items, EVAL_BATCH_SIZE)
    diff = max(float((batched[n] - alone[n]).abs().max()) for n in alone)
    same = all(int(batched[n].argmax()) == int(alone[n].argmax()) for n in alone)
    median, best = statistics.median, min
    return (f"{len(items)} utterances: one at a time {median(alone_s):.2f} s (min "
            f"{best(alone_s):.2f}), batched by {EVAL_BATCH_SIZE} {median(batched_s):.2f} s (min "
            f"{best(batched_s):.2f}): {median(alone_s) / median(batched_s):.1f}x; max |delta "
            f"log-prob| {diff:.1e}, argmax {'identical' if same else 'DIFFERENT'}")


def demo_corpus(directory: Path) -> DemoCorpus:
    return generate_corpus(DemoCorpusConfig(output_dir=str(directory)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_dir = Path(tempfile.gettempdir()) / "ser-eval-batching-corpus"
    parser.add_argument("--corpus_dir", type=Path, default=default_dir,
                        help="the demo corpus; generated there when absent")
    parser.add_argument("--fold", type=int, default=1, help="which fold file's splits")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    corpus = demo_corpus(args.corpus_dir)
    fold = read_label_file(corpus.label_files[args.fold - 1])
    config = FinetuneConfig(datadir=str(corpus.audio_dir))
    torch.manual_seed(0)
    module = FinetuneModule(args.preset, EMOTIONS_4, [1.0] * len(EMOTIONS_4))
    print(f"{fold.name}, preset {args.preset}, {args.threads} thread(s), median (and min) of "
          f"{args.repeats} passes (Trainer.validate):")
    for split, items in (("Val", fold.val), ("Test", fold.test)):
        print(f"  {split}: {compare(module, config, items, args.repeats)}")


if __name__ == "__main__":
    main()
