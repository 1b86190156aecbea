"""How much of one epoch's batches is padding: random vs bucketed vs bucketed dynamic batches.

Padding is computed the way the model sees it: every item capped at ``--max_seconds`` (the
training crop), each batch padded to its longest item. Without ``--labelpath`` the lengths come
from a seeded log-normal distribution shaped like IEMOCAP's utterances (most 1.7-4 s, a tail past
10 s); with it, from the headers of the chosen split's audio files.

    python benchmarks/padding.py
    python benchmarks/padding.py --audio_dir data/demo/audio --labelpath data/demo/labels/fold1.json
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from ser.audio import check_audio_files
from ser.config import SAMPLE_RATE
from ser.data.labels import read_label_file
from ser.data.sampling import BucketBatchSampler, padding_fraction


def synthetic_lengths(num_items: int, seed: int) -> list[int]:
    """IEMOCAP-like utterance lengths in samples: log-normal, median 3 s."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(mean=np.log(3.0), sigma=0.55, size=num_items), 0.6, 30.0)
    return [int(s * SAMPLE_RATE) for s in seconds]


def corpus_lengths(audio_dir: str, labelpath: str, split: str) -> list[int]:
    names = list(read_label_file(labelpath, audio_dir).splits.get(split, {}))
    if not names:
        raise SystemExit(f"{labelpath} has no {split} items")
    paths = [f"{audio_dir}/{name}" for name in names]
    return list(check_audio_files(paths).values())


def random_batches(num_items: int, batch_size: int, seed: int) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(num_items).tolist()
    return [order[i : i + batch_size] for i in range(0, num_items, batch_size)]


def row(name: str, batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> str:
    sizes = [len(batch) for batch in batches]
    return (
        f"| {name} | {len(batches)} | {np.mean(sizes):.1f} | "
        f"{100 * padding_fraction(batches, lengths):.1f} % |"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio_dir", help="audio folder of the label file")
    parser.add_argument("--labelpath", help="a label file; default: synthetic lengths")
    parser.add_argument("--split", default="Train")
    parser.add_argument("--num_items", type=int, default=5531, help="synthetic corpus size")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_batch_seconds", type=float, default=250.0)
    parser.add_argument("--max_seconds", type=float, default=10.0, help="crop length")
    parser.add_argument("--num_buckets", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if bool(args.audio_dir) != bool(args.labelpath):
        parser.error("give both --audio_dir and --labelpath, or neither")

    if args.labelpath:
        raw = corpus_lengths(args.audio_dir, args.labelpath, args.split)
        source = f"{args.labelpath} ({args.split})"
    else:
        raw = synthetic_lengths(args.num_items, args.seed)
        source = f"synthetic IEMOCAP-like lengths (seed {args.seed})"
    max_len = int(args.max_seconds * SAMPLE_RATE)
    lengths = np.minimum(raw, max_len).tolist()
    seconds = np.asarray(raw) / SAMPLE_RATE
    print(
        f"{source}: {len(raw)} utterances, median {np.median(seconds):.1f} s, "
        f"5-95 % {np.percentile(seconds, 5):.1f}-{np.percentile(seconds, 95):.1f} s, "
        f"max {seconds.max():.1f} s; capped at {args.max_seconds:g} s\n"
    )
    common = {"num_buckets": args.num_buckets, "max_len": max_len, "seed": args.seed}
    fixed = BucketBatchSampler(lengths, batch_size=args.batch_size, **common)
    budget = int(args.max_batch_seconds * SAMPLE_RATE)
    dynamic = BucketBatchSampler(lengths, max_batch_samples=budget, **common)
    print("| batching | batches per epoch | items per batch | padding |")
    print("| --- | --- | --- | --- |")
    print(
        row(
            f"random, {args.batch_size} per batch",
            random_batches(len(raw), args.batch_size, args.seed),
            lengths,
        )
    )
    print(row(f"bucketed, {args.batch_size} per batch", fixed.global_batches(), lengths))
    print(
        row(f"bucketed, dynamic <= {args.max_batch_seconds:g} s", dynamic.global_batches(), lengths)
    )


if __name__ == "__main__":
    main()
