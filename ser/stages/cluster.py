"""P-TAPT clustering: k-means of phase-1 frame features into pseudo-labels for phase 2.

Per fold, the phase-1 model (``pretrained_path``: its ``w2v1/`` folder, or the phase-1
``output_dir`` holding one folder per fold) reads every file of the fold's Train split once, in
eval mode, in fp32, one utterance at a time, and its 20 ms features go to a float32 file on disk
(:class:`FeatureStore`). k-means trains on a seeded sample of those frames (``sample_ratio`` of
each utterance, at most ``sample_cap_per_centroid * max(k)`` in all), one faiss k-means per
cluster count; then every frame of every Train file is assigned to its nearest centroid, reading
the features back in chunks. Memory therefore grows with the sample, not with the corpus.

Outputs in ``output_dir/<fold>/clusters/`` (all written atomically; ``clusters.json`` last, its
presence marks the fold as done)::

    clusters_k<k>.json    {"<file>.wav": [label per frame, ...]} for one cluster count
    clusters.json         {"<file>.wav": [[labels for k1], [labels for k2], ...]}, in the order
                          of num_clusters: phase 2 builds its heads in that order
    centroids_k<k>.npy    float32 [k, dim]
    cluster_stats.json    num_clusters, frame counts, and per k the cluster sizes, inertia, empty
                          clusters and timing

Files too short for one 20 ms frame get an empty label list. While a fold runs, its features
live in ``output_dir/<fold>/.features-*/`` (the output disk, not /tmp, which may be memory-backed),
removed when the fold ends, or at the start of the next run if the process was killed.

Departures from the original
----------------------------
- The features are written to disk in one pass and read back in chunks instead of being held in
  memory; the memory-mapped windows are unmapped after each use, since pages of a mapping kept
  open count towards the process's resident memory for as long as it lives.
- Sampling and k-means are seeded.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from pytorch_lightning.loggers import Logger
from tqdm.auto import tqdm

from ser import artifacts, distributed, training
from ser.artifacts import CLUSTER_STATS_JSON as STATS_FILE
from ser.artifacts import CLUSTERS as OUTPUT_DIR
from ser.artifacts import CLUSTERS_JSON as MERGED_FILE
from ser.artifacts import centroids_file, labels_file
from ser.atomic import atomic_path, atomic_write_json
from ser.audio import check_audio_files, read_audio
from ser.config import ClusterConfig
from ser.data.labels import LabelFile
from ser.errors import SerInputError
from ser.models.emotion_w2v1 import (
    EmotionWav2Vec1,
    load_emotion_w2v1,
    read_emotion_w2v1_config,
    w2v1_frames_20ms,
)
from ser.models.wav2vec1 import Wav2Vec1Config
from ser.stages.contract import NO_CONTEXT, Stage, StageContext

log = logging.getLogger(__name__)

MODEL_DIR = artifacts.W2V1
# faiss subsamples to k * max_points_per_centroid training points; the recipe's 500,000 keeps it
# from ever doing so (our sample is capped at sample_cap_per_centroid * max(k) first).
MAX_POINTS_PER_CENTROID = 500_000
FEATURES_PREFIX = ".features-"  # temporary feature folders inside the fold folder
ASSIGN_CHUNK_BYTES = 16 << 20  # features read back and assigned at a time (x2 while copied)


@dataclass
class ClusterResult:
    """Where each fold's merged label file went, and its statistics."""

    output_dir: Path
    cluster_files: dict[str, Path] = field(default_factory=dict)  # fold -> clusters.json
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)


# --- features on disk ------------------------------------------------------------------------


class FeatureStore:
    """Frame features ``float32 [total, dim]`` in a file, written and read through short-lived
    ``np.memmap`` windows so that neither the corpus nor its mapping stays in memory."""

    def __init__(self, path: Path, total: int, dim: int, create: bool = True) -> None:
        if total < 1 or dim < 1:
            raise ValueError(f"a feature store needs total >= 1 and dim >= 1, got {total}, {dim}")
        self.path = Path(path)
        self.total = total
        self.dim = dim
        if create:  # else another rank made it, and this one writes its share into it
            with open(self.path, "wb") as handle:
                handle.truncate(total * dim * 4)  # sparse: disk fills as features are written

    def _window(self, start: int, count: int, mode: str) -> np.memmap:
        if start < 0 or count < 0 or start + count > self.total:
            raise IndexError(f"rows {start}:{start + count} outside 0:{self.total}")
        return np.memmap(
            self.path, np.float32, mode, offset=start * self.dim * 4, shape=(count, self.dim)
        )

    def write(self, start: int, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows must be [n, {self.dim}], got {list(rows.shape)}")
        if len(rows):
            window = self._window(start, len(rows), "r+")
            window[:] = rows
            del window  # unmap: the written pages leave this process's resident memory

    def read(self, start: int, stop: int) -> np.ndarray:
        window = self._window(start, stop - start, "r")
        rows = np.array(window)
        del window
        return rows

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.total, rows):
            yield start, self.read(start, min(start + rows, self.total))


def plan_sample(frame_counts: Sequence[int], ratio: float, cap: int, seed: int) -> np.ndarray:
    """Sorted global row indices of the k-means sample.

    ``round(ratio * n)`` frames of each utterance of ``n`` frames, drawn without replacement;
    then, if more than ``cap``, ``cap`` of those at random. Depends on frame counts only, so the
    sample size is known before any feature is computed.
    """
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum(frame_counts)[:-1]]).astype(np.int64)
    picked = [
        start + rng.choice(n, size=round(ratio * n), replace=False)
        for start, n in zip(starts.tolist(), frame_counts, strict=True)
        if n > 0
    ]
    rows = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    if len(rows) > cap:
        rows = rng.choice(rows, size=cap, replace=False)
    return np.sort(rows.astype(np.int64))


def store_features(
    features: Iterable[np.ndarray],
    frame_counts: Sequence[int],
    store: FeatureStore,
    sample_rows: np.ndarray,
) -> np.ndarray:
    """Write each utterance's ``[n_i, dim]`` features in order, and return the sampled rows
    ``[len(sample_rows), dim]``, copied out as they pass (the store is not read back for them).
    """
    sample = np.empty((len(sample_rows), store.dim), dtype=np.float32)
    start = 0
    for count, rows in zip(frame_counts, features, strict=True):
        if rows.shape != (count, store.dim):
            raise RuntimeError(
                f"expected {count} frames of {store.dim} features, got {list(rows.shape)}"
            )
        store.write(start, rows)
        lo, hi = np.searchsorted(sample_rows, [start, start + count])
        sample[lo:hi] = rows[sample_rows[lo:hi] - start]
        start += count
    if start != store.total:
        raise RuntimeError(f"got {start} frames, expected {store.total}")
    return sample


def read_sample(store: FeatureStore, sample_rows: np.ndarray) -> np.ndarray:
    """The rows ``sample_rows`` (sorted) of the store, read in one pass of chunks."""
    sample = np.empty((len(sample_rows), store.dim), dtype=np.float32)
    chunk_rows = max(ASSIGN_CHUNK_BYTES // (4 * store.dim), 1)
    for start, rows in store.chunks(chunk_rows):
        lo, hi = np.searchsorted(sample_rows, [start, start + len(rows)])
        sample[lo:hi] = rows[sample_rows[lo:hi] - start]
    return sample


def train_kmeans(sample: np.ndarray, k: int, niter: int, seed: int) -> faiss.Kmeans:
    """faiss k-means (L2) on every sampled frame (no subsampling inside faiss)."""
    kmeans = faiss.Kmeans(
        sample.shape[1],
        k,
        niter=niter,
        seed=seed,
        max_points_per_centroid=MAX_POINTS_PER_CENTROID,
        verbose=False,
    )
    kmeans.train(np.ascontiguousarray(sample, dtype=np.float32))
    return kmeans


def assign_all(
    store: FeatureStore, models: Sequence[faiss.Kmeans], chunk_rows: int | None = None
) -> list[np.ndarray]:
    """Nearest-centroid label of every stored frame, for each model, reading chunk by chunk
    (``chunk_rows`` frames at a time; default: 16 MiB of features)."""
    labels = [np.empty(store.total, dtype=np.int32) for _ in models]
    for start, rows in store.chunks(chunk_rows or max(ASSIGN_CHUNK_BYTES // (4 * store.dim), 1)):
        for out, kmeans in zip(labels, models, strict=True):
            _, nearest = kmeans.index.search(rows, 1)
            out[start : start + len(rows)] = nearest[:, 0]
        del rows  # before the next chunk is read, so only one is held at a time
    return labels


# --- the stage -------------------------------------------------------------------------------


@dataclass
class _FoldPlan:
    fold: LabelFile
    model_dir: Path
    names: list[str]
    frame_counts: list[int]
    sample_rows: np.ndarray


def run(config: ClusterConfig, context: StageContext = NO_CONTEXT) -> ClusterResult:
    """Cluster the phase-1 features of every fold's Train audio; see the module docstring.

    The context's logger for each fold receives that fold's numbers (inertia, empty clusters
    and k-means time per k; frames sampled and total).
    """
    config.check()
    _check_pretrained_path(config)
    ks = list(config.num_clusters)
    folds = training.load_folds(config)
    plans = [_plan_fold(config, fold, ks) for fold in folds]
    output_dir = training.stage_output_dir(config, SPEC.name)
    training.save_config(config, output_dir)
    result = ClusterResult(output_dir)
    for plan in plans:
        merged, stats = _run_fold(config, ks, plan, output_dir / plan.fold.name)
        result.cluster_files[plan.fold.name], result.stats[plan.fold.name] = merged, stats
        logger = context.logger(plan.fold.name)
        if isinstance(logger, Logger):
            logger.log_metrics(stats_metrics(stats))
            logger.save()
    log.info(
        "clustering done: %d fold(s), k=%s, labels in %s/<fold>/%s/%s",
        len(plans),
        list(ks),
        output_dir,
        OUTPUT_DIR,
        MERGED_FILE,
    )
    return result


def _check_pretrained_path(config: ClusterConfig) -> None:
    if not Path(config.pretrained_path).exists():
        raise SerInputError(
            f"pretrained_path={config.pretrained_path}: no such file or directory; pass the "
            f"phase-1 output_dir or a fold's {MODEL_DIR}/ folder"
        )


def resolve_model_dir(pretrained_path: str, fold: LabelFile) -> Path:
    """The fold's phase-1 model folder: ``<path>/<fold>/w2v1``, ``<path>/w2v1`` or ``<path>``."""
    base = Path(training.fold_input(pretrained_path, fold))
    for candidate in (base / MODEL_DIR, base):
        if (candidate / "config.json").is_file():
            return candidate
    raise SerInputError(
        f"pretrained_path={pretrained_path}: found no phase-1 model for fold {fold.name} (looked "
        f"for {base / MODEL_DIR} and {base}); pass the phase-1 output_dir or a {MODEL_DIR}/ folder"
    )


def _plan_fold(config: ClusterConfig, fold: LabelFile, ks: list[int]) -> _FoldPlan:
    """Model, frame counts and sample of one fold, checked before any fold starts."""
    model_dir = resolve_model_dir(config.pretrained_path, fold)
    meta = read_emotion_w2v1_config(model_dir)
    w2v1 = Wav2Vec1Config.from_json_dict(meta["wav2vec1"], str(model_dir / "config.json"))
    names = sorted(fold.train)
    paths = [Path(config.datadir) / name for name in names]
    samples = check_audio_files(paths, downmix=config.downmix)
    counts = [max(int(w2v1_frames_20ms(samples[str(p)], w2v1)), 0) for p in paths]
    cap = config.sample_cap_per_centroid * max(ks)
    rows = plan_sample(counts, config.sample_ratio, cap, config.seed)
    if len(rows) < max(ks):
        raise SerInputError(
            f"num_clusters={tuple(ks)}: k-means would train on only {len(rows)} frames of "
            f"{sum(counts)} in {fold.path}'s Train split, fewer than k={max(ks)}; lower "
            "num_clusters or raise sample_ratio"
        )
    return _FoldPlan(fold, model_dir, names, counts, rows)


def _run_fold(
    config: ClusterConfig, ks: list[int], plan: _FoldPlan, fold_dir: Path
) -> tuple[Path, dict[str, Any]]:
    out = fold_dir / OUTPUT_DIR
    merged = out / MERGED_FILE
    if merged.is_file() and (out / STATS_FILE).is_file():
        log.info("%s: cluster labels already in %s; skipping the fold", plan.fold.name, merged)
        return merged, _read_stats(out / STATS_FILE)
    model, _ = load_emotion_w2v1(plan.model_dir)
    model.to(_device())
    store = _shared_store(fold_dir, sum(plan.frame_counts), model.feature_dim)
    try:
        # Every rank extracts its share of the files into the one store; then rank 0 alone
        # trains k-means, labels every frame and writes the labels, once.
        _extract_share(model, config, plan, store)
        distributed.barrier()
        stats = _cluster_and_write(config, ks, plan, store, out) if distributed.is_zero() else {}
    finally:
        distributed.barrier()
        if distributed.is_zero():
            shutil.rmtree(store.path.parent, ignore_errors=True)
    stats = distributed.broadcast(stats)
    log.info(
        "%s: %d files, %d frames clustered with k=%s; labels in %s",
        plan.fold.name,
        len(plan.names),
        sum(plan.frame_counts),
        ks,
        merged,
    )
    return merged, stats


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", distributed.world().local_rank)
    return torch.device("cpu")


def _shared_store(fold_dir: Path, total: int, dim: int) -> FeatureStore:
    """The fold's feature file, made by rank 0 on the output disk (not /tmp: a real corpus's
    features take gigabytes) after removing what a killed run left; every rank opens it."""
    path = None
    if distributed.is_zero():
        fold_dir.joinpath(OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
        for stale in fold_dir.glob(f"{FEATURES_PREFIX}*"):  # left by a run that was killed
            shutil.rmtree(stale, ignore_errors=True)
        path = Path(tempfile.mkdtemp(prefix=FEATURES_PREFIX, dir=fold_dir)) / "features.f32"
        FeatureStore(path, total, dim)
    path = distributed.broadcast(path)
    return FeatureStore(path, total, dim, create=False)


def _extract_share(
    model: EmotionWav2Vec1, config: ClusterConfig, plan: _FoldPlan, store: FeatureStore
) -> None:
    """This rank's share of the Train files: features ``[frames, dim]`` at their rows."""
    starts = np.concatenate([[0], np.cumsum(plan.frame_counts)[:-1]]).astype(np.int64)
    mine = distributed.shard(range(len(plan.names)))
    progress = tqdm(mine, desc=f"{plan.fold.name} features", unit="file",
                    disable=not distributed.is_zero())  # fmt: skip
    device = next(model.parameters()).device
    for index in progress:
        if plan.frame_counts[index] == 0:  # too short for one frame
            continue
        wav = read_audio(Path(config.datadir) / plan.names[index], downmix=config.downmix)
        batch = torch.from_numpy(wav).unsqueeze(0).to(device)
        rows = model.extract_features(batch)[0].cpu().numpy()
        if rows.shape != (plan.frame_counts[index], store.dim):
            raise RuntimeError(f"{plan.names[index]}: expected {plan.frame_counts[index]} "
                               f"frames of {store.dim} features, got {list(rows.shape)}")
        store.write(int(starts[index]), rows)


def _cluster_and_write(
    config: ClusterConfig, ks: list[int], plan: _FoldPlan, store: FeatureStore, out: Path
) -> dict[str, Any]:
    sample = read_sample(store, plan.sample_rows)
    models, stats = _cluster(config, ks, plan, sample, out)
    del sample
    labels = assign_all(store, models)
    return _write_outputs(ks, plan, labels, stats, out)


def _cluster(
    config: ClusterConfig, ks: list[int], plan: _FoldPlan, sample: np.ndarray, out: Path
) -> tuple[list[faiss.Kmeans], dict[str, Any]]:
    models: list[faiss.Kmeans] = []
    per_k: dict[str, Any] = {}
    for k in ks:
        began = time.perf_counter()
        kmeans = train_kmeans(sample, k, config.niter, config.seed)
        seconds = time.perf_counter() - began
        with atomic_path(out / centroids_file(k)) as tmp, open(tmp, "wb") as handle:
            np.save(handle, kmeans.centroids.astype(np.float32))
        models.append(kmeans)
        per_k[str(k)] = {"inertia": float(kmeans.obj[-1]), "kmeans_seconds": round(seconds, 3)}
        log.info(
            "%s: k=%d trained on %d frames in %.1f s, inertia %.6g",
            plan.fold.name,
            k,
            len(sample),
            seconds,
            kmeans.obj[-1],
        )
    return models, {"per_k": per_k}


def _write_outputs(
    ks: list[int],
    plan: _FoldPlan,
    labels: Sequence[np.ndarray],
    stats: dict[str, Any],
    target: Path,
) -> dict[str, Any]:
    bounds = np.concatenate([[0], np.cumsum(plan.frame_counts)]).astype(np.int64)
    per_file = [
        {name: seq[bounds[i] : bounds[i + 1]].tolist() for i, name in enumerate(plan.names)}
        for seq in labels
    ]
    for k, by_name, seq in zip(ks, per_file, labels, strict=True):
        atomic_write_json(target / labels_file(k), by_name, indent=None)
        sizes = np.bincount(seq, minlength=k)
        stats["per_k"][str(k)].update(
            cluster_sizes=sizes.tolist(), empty_clusters=int((sizes == 0).sum())
        )
    summary = {
        "num_clusters": ks,
        "files": len(plan.names),
        "frames_total": int(bounds[-1]),
        "frames_sampled": len(plan.sample_rows),
        **stats,
    }
    atomic_write_json(target / STATS_FILE, summary)
    merged = {name: [by_name[name] for by_name in per_file] for name in plan.names}
    atomic_write_json(target / MERGED_FILE, merged, indent=None)
    return summary


def stats_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``cluster_stats.json`` as flat metrics (``inertia_k64``, ...)."""
    metrics = {"frames_total": float(stats["frames_total"])}
    metrics["frames_sampled"] = float(stats["frames_sampled"])
    for k, entry in stats["per_k"].items():
        for name in ("inertia", "empty_clusters", "kmeans_seconds"):
            metrics[f"{name}_k{k}"] = float(entry[name])
    return metrics


def _read_stats(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


SPEC = Stage(
    name="cluster", config_cls=ClusterConfig, run=run, inputs=("pretrained_path",),
    outputs=(artifacts.CLUSTERS,),
)
