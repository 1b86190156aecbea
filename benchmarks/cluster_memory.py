"""Peak memory of the clustering stage's feature pass, k-means and assignment, by corpus size.

A synthetic stream of frame features (files of 250 frames drawn around 64 centres) goes through
the stage's own code (``ser.stages.cluster``: FeatureStore, plan_sample, store_features,
train_kmeans, assign_all); each configuration runs in a fresh process, whose peak resident set
size (``getrusage``) is reported above the baseline of the imports. Three tables:

1. growing corpus, fixed k-means sample: the peak should stay flat while the corpus grows;
2. fixed corpus, growing sample: the peak should follow the sample;
3. the same corpora with one ``np.memmap`` of the whole feature file kept open for the whole
   pass (the obvious implementation): its touched pages stay in the resident set, so the peak
   follows the corpus even though the arrays are "on disk".

    python benchmarks/cluster_memory.py                       # about 1-2 minutes on 2 cores
    python benchmarks/cluster_memory.py --frames 50000 200000 --k 64 512 --cap 1000

The feature files go to a temporary folder under ``--workdir`` (default: the current directory,
not /tmp, which may be memory-backed) and are removed.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

FRAMES_PER_FILE = 250  # 5 s of 20 ms frames


def synthetic_features(files: int, dim: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = 4 * rng.standard_normal((64, dim), dtype=np.float32)
    for _ in range(files):
        noise = rng.standard_normal((FRAMES_PER_FILE, dim), dtype=np.float32)
        yield noise + centres[rng.integers(0, 64, FRAMES_PER_FILE)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration, in this (fresh) process."""
    from ser.stages.cluster import (
        FeatureStore,
        assign_all,
        plan_sample,
        store_features,
        train_kmeans,
    )

    baseline = peak_rss_mb()
    files = args.child_frames // FRAMES_PER_FILE
    counts = [FRAMES_PER_FILE] * files
    total = sum(counts)
    rows = plan_sample(counts, ratio=1.0, cap=args.cap * max(args.k), seed=0)
    tmp = Path(tempfile.mkdtemp(prefix=".cluster-bench-", dir=args.workdir))
    timings: dict[str, float] = {}
    try:
        began = time.perf_counter()
        if args.naive:
            sample = _naive_pass(tmp / "f.f32", counts, args, rows)
        else:
            store = FeatureStore(tmp / "f.f32", total, args.dim)
            sample = store_features(synthetic_features(files, args.dim, 0), counts, store, rows)
        timings["features_s"] = time.perf_counter() - began
        began = time.perf_counter()
        models = [train_kmeans(sample, k, args.niter, seed=0) for k in args.k]
        timings["kmeans_s"] = time.perf_counter() - began
        del sample
        began = time.perf_counter()
        if args.naive:
            mapped = np.memmap(tmp / "f.f32", np.float32, "r", shape=(total, args.dim))
            for start in range(0, total, 32768):
                for kmeans in models:
                    kmeans.index.search(np.asarray(mapped[start : start + 32768]), 1)
        else:
            assign_all(store, models)
        timings["assign_s"] = time.perf_counter() - began
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "frames": total,
        "corpus_mb": total * args.dim * 4 / 2**20,
        "sample": len(rows),
        "sample_mb": len(rows) * args.dim * 4 / 2**20,
        "baseline_mb": baseline,
        "peak_mb": peak_rss_mb(),
        **timings,
    }


def _naive_pass(
    path: Path, counts: list[int], args: argparse.Namespace, rows: np.ndarray
) -> np.ndarray:
    """Write through one mapping of the whole file, kept open, then gather the sample from it."""
    mapped = np.memmap(path, np.float32, "w+", shape=(sum(counts), args.dim))
    start = 0
    for block in synthetic_features(len(counts), args.dim, 0):
        mapped[start : start + len(block)] = block
        start += len(block)
    return np.asarray(mapped[rows])


def run_child(args: argparse.Namespace, frames: int, cap: int, naive: bool) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child_frames",
        str(frames),
        "--cap",
        str(cap),
        "--dim",
        str(args.dim),
        "--niter",
        str(args.niter),
        "--workdir",
        args.workdir,
        "--k",
        *map(str, args.k),
    ]
    if naive:
        command.append("--naive")
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(title: str, results: list[dict[str, Any]]) -> str:
    lines = [
        f"\n{title}",
        "| frames | corpus MB | sampled frames | sample MB | peak RSS MB | above imports MB "
        "| features s | k-means s | assign s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['frames']:,} | {r['corpus_mb']:.0f} | {r['sample']:,} | {r['sample_mb']:.0f} "
            f"| {r['peak_mb']:.0f} | {r['peak_mb'] - r['baseline_mb']:.0f} "
            f"| {r['features_s']:.1f} | {r['kmeans_s']:.1f} | {r['assign_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[50_000, 200_000, 800_000])
    parser.add_argument("--k", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument(
        "--cap", type=int, default=100, help="sample cap per centroid (the recipe: 1000)"
    )
    parser.add_argument(
        "--sweep_caps", type=int, nargs="*", default=[25, 100, 300],
        help="caps for table 2 (on the middle corpus size); none: skip it",
    )  # fmt: skip
    parser.add_argument("--niter", type=int, default=5, help="k-means iterations (recipe: 20)")
    parser.add_argument("--no_naive", action="store_true", help="skip table 3")
    parser.add_argument("--workdir", default=".")
    parser.add_argument("--child_frames", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_frames:
        print(json.dumps(child(args)))
        return

    began = time.perf_counter()
    grow = [run_child(args, frames, args.cap, naive=False) for frames in args.frames]
    print(table(f"1. corpus grows, sample cap {args.cap} x max(k)={max(args.k)}", grow))
    if args.sweep_caps:
        middle = sorted(args.frames)[len(args.frames) // 2]
        sweep = [run_child(args, middle, cap, naive=False) for cap in args.sweep_caps]
        print(table(f"2. corpus fixed at {middle:,} frames, sample grows", sweep))
    if not args.no_naive:
        naive = [run_child(args, frames, args.cap, naive=True) for frames in args.frames]
        print(table("3. for comparison: one np.memmap of the whole file kept open", naive))
    print(
        f"\nk={args.k}, dim={args.dim}, niter={args.niter}; "
        f"total {time.perf_counter() - began:.0f} s"
    )


if __name__ == "__main__":
    main()
