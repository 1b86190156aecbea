"""P-TAPT clustering: phase-1 frame features -> k-means pseudo-labels per Train file."""

from __future__ import annotations

import csv
import json
import shutil
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pytorch_lightning.loggers import CSVLogger

from ser.audio import read_audio, write_wav
from ser.config import ClusterConfig
from ser.data.datasets import FrameLabelDataset
from ser.data.frames import label_frame_count
from ser.data.labels import read_label_file, write_label_file
from ser.data.synthetic import DemoCorpus
from ser.errors import SerInputError
from ser.models.emotion_w2v1 import (
    EmotionWav2Vec1,
    load_emotion_w2v1,
    save_emotion_w2v1,
    w2v1_frames_20ms,
)
from ser.models.wav2vec1 import Wav2Vec1Config, load_wav2vec1
from ser.stages import cluster, ptapt_phase2
from ser.stages.cluster import (
    FeatureStore,
    assign_all,
    plan_sample,
    resolve_model_dir,
    store_features,
    train_kmeans,
)
from ser.stages.contract import StageContext

# Lengths in samples: no frame at all (500 < 945), exactly one frame, odd lengths around whole
# frames, several seconds.
EXTRA_LENGTHS = {"len_500.wav": 500, "len_945.wav": 945, "len_1264.wav": 1264}
EXTRA_LENGTHS |= {"len_16000.wav": 16000, "len_16321.wav": 16321, "len_40000.wav": 40000}


@dataclass
class _Setup:
    audio_dir: Path
    label_dir: Path
    phase1_dir: Path  # a phase-1 output_dir: <fold>/w2v1 per fold
    folds: list[str]


@pytest.fixture(scope="module")
def setup(corpus: DemoCorpus, tmp_path_factory: pytest.TempPathFactory) -> _Setup:
    """The shared corpus (copied, as clips are added), plus clips of chosen lengths in every
    fold's Train split, and a phase-1 model per fold (random tiny weights: clustering does not
    care how they were trained)."""
    root = tmp_path_factory.mktemp("cluster")
    audio_dir = root / "corpus" / corpus.audio_dir.name
    shutil.copytree(corpus.audio_dir, audio_dir)
    rng = np.random.default_rng(0)
    for name, samples in EXTRA_LENGTHS.items():
        write_wav(audio_dir / name, 0.1 * rng.standard_normal(samples).astype(np.float32))
    label_dir = root / "labels"
    folds = []
    for path in corpus.label_files[:2]:
        fold = read_label_file(path)
        extra = dict.fromkeys(EXTRA_LENGTHS, "neutral")
        write_label_file(label_dir / path.name, {**fold.splits, "Train": {**fold.train, **extra}})
        folds.append(path.stem)
    for i, fold_name in enumerate(folds):
        torch.manual_seed(i)
        model = EmotionWav2Vec1(load_wav2vec1("tiny"), len(corpus.classes))
        save_emotion_w2v1(model, root / "phase1" / fold_name / "w2v1", corpus.classes)
    return _Setup(audio_dir, label_dir, root / "phase1", folds)


def _config(setup: _Setup, output_dir: Path, **overrides: Any) -> ClusterConfig:
    values: dict[str, Any] = {
        "datadir": str(setup.audio_dir),
        "labeldir": str(setup.label_dir),
        "output_dir": str(output_dir),
        "pretrained_path": str(setup.phase1_dir),
        "num_clusters": (4, 2),  # not sorted: the merged file keeps this order
        "niter": 5,
    }
    return ClusterConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def clustered(
    setup: _Setup, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ClusterConfig, cluster.ClusterResult, list[Path]]:
    """One run over both folds, remembering where the features were stored meanwhile."""
    config = _config(setup, tmp_path_factory.mktemp("out"))
    stores: list[Path] = []
    original = FeatureStore.write

    def spy(self: FeatureStore, start: int, rows: np.ndarray) -> None:
        original(self, start, rows)
        on_disk = np.memmap(self.path, np.float32, "r", shape=(self.total, self.dim))
        assert np.array_equal(on_disk[start : start + len(rows)], rows)
        assert self.path.stat().st_size == self.total * self.dim * 4
        stores.append(self.path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FeatureStore, "write", spy)
        result = cluster.run(config)
    return config, result, stores


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


def test_writes_labels_of_the_phase1_frame_count_for_every_train_file(
    setup: _Setup, clustered: tuple[ClusterConfig, cluster.ClusterResult, list[Path]]
) -> None:
    config, result, _ = clustered
    out = Path(config.output_dir)
    assert sorted(result.cluster_files) == setup.folds
    model, _ = load_emotion_w2v1(setup.phase1_dir / setup.folds[0] / "w2v1")
    for fold_name in setup.folds:
        fold = read_label_file(setup.label_dir / f"{fold_name}.json")
        merged = _load(out / fold_name / "clusters/clusters.json")
        assert result.cluster_files[fold_name] == out / fold_name / "clusters/clusters.json"
        assert sorted(merged) == sorted(fold.train)  # every Train file, nothing else
        for name, samples in EXTRA_LENGTHS.items():
            expected = label_frame_count(samples)
            assert expected == max(model.num_frames(samples), 0)  # it counts < 0 frames
            assert len(merged[name][0]) == len(merged[name][1]) == expected
        assert merged["len_500.wav"] == [[], []]
        assert len(merged["len_945.wav"][0]) == 1


def test_merged_file_follows_the_order_of_num_clusters(
    setup: _Setup, clustered: tuple[ClusterConfig, cluster.ClusterResult, list[Path]]
) -> None:
    config, _, _ = clustered
    fold_dir = Path(config.output_dir) / setup.folds[0] / "clusters"
    merged = _load(fold_dir / "clusters.json")
    per_k = {k: _load(fold_dir / f"clusters_k{k}.json") for k in (4, 2)}
    for name, label_sets in merged.items():
        assert label_sets == [per_k[4][name], per_k[2][name]]
    assert max(max(labels, default=0) for labels in per_k[4].values()) == 3
    assert max(max(labels, default=0) for labels in per_k[2].values()) == 1
    stats = _load(fold_dir / "cluster_stats.json")
    assert stats["num_clusters"] == [4, 2]


def test_every_frame_goes_to_its_nearest_centroid(
    setup: _Setup, clustered: tuple[ClusterConfig, cluster.ClusterResult, list[Path]]
) -> None:
    config, _, _ = clustered
    fold_dir = Path(config.output_dir) / setup.folds[1] / "clusters"
    model, _ = load_emotion_w2v1(setup.phase1_dir / setup.folds[1] / "w2v1")
    merged = _load(fold_dir / "clusters.json")
    for name in ("len_16321.wav", "len_40000.wav", sorted(merged)[0]):
        wav = torch.from_numpy(read_audio(setup.audio_dir / name)).unsqueeze(0)
        features = model.extract_features(wav)[0].numpy()
        for position, k in enumerate((4, 2)):
            centroids = np.load(fold_dir / f"centroids_k{k}.npy")
            assert centroids.shape == (k, model.feature_dim)
            distances = ((features[:, None, :] - centroids[None]) ** 2).sum(-1)
            assert merged[name][position] == distances.argmin(1).tolist()


def test_stats_add_up(
    setup: _Setup, clustered: tuple[ClusterConfig, cluster.ClusterResult, list[Path]]
) -> None:
    config, result, _ = clustered
    for fold_name in setup.folds:
        fold_dir = Path(config.output_dir) / fold_name / "clusters"
        stats = _load(fold_dir / "cluster_stats.json")
        assert stats == result.stats[fold_name]
        merged = _load(fold_dir / "clusters.json")
        total = sum(len(sets[0]) for sets in merged.values())
        assert stats["frames_total"] == total
        assert stats["frames_sampled"] == total  # sample_ratio 1.0, far under the cap
        assert stats["files"] == len(merged)
        for position, k in enumerate((4, 2)):
            entry = stats["per_k"][str(k)]
            counts = np.bincount(
                [label for sets in merged.values() for label in sets[position]], minlength=k
            )
            assert entry["cluster_sizes"] == counts.tolist()
            assert sum(entry["cluster_sizes"]) == total
            assert entry["empty_clusters"] == int((counts == 0).sum())
            assert entry["inertia"] > 0


def test_features_go_through_a_memmapped_file_that_is_removed(
    clustered: tuple[ClusterConfig, cluster.ClusterResult, list[Path]],
) -> None:
    config, _, stores = clustered
    assert stores, "no feature was written to the feature store"
    assert {path.parent.parent for path in stores} == {
        Path(config.output_dir) / name for name in ("fold_1", "fold_2")
    }  # on the output disk, one store per fold
    assert not any(path.exists() for path in stores)
    assert not list(Path(config.output_dir).glob("*/.features-*"))


def test_outputs_load_as_phase2_frame_labels(
    setup: _Setup,
    clustered: tuple[ClusterConfig, cluster.ClusterResult, list[Path]],
    tmp_path: Path,
) -> None:
    config, _, _ = clustered
    fold = read_label_file(setup.label_dir / f"{setup.folds[0]}.json")
    result_dir = Path(config.output_dir) / fold.name / "clusters"
    # The pipelines log <fold>/clusters/ as the artifact clusters/<fold>/, phase 2's input.
    artifact = tmp_path / "clusters"
    artifact.mkdir()
    (artifact / fold.name).symlink_to(result_dir, target_is_directory=True)
    found = ptapt_phase2.read_cluster_labels(
        ptapt_phase2.cluster_file(str(artifact), fold), fold.train
    )
    assert found.num_clusters == [4, 2] and sorted(found.labels) == sorted(fold.train)
    merged = _load(result_dir / "clusters.json")
    usable = {name: sets for name, sets in merged.items() if name != "len_500.wav"}
    dataset = FrameLabelDataset(setup.audio_dir, usable, train=False)
    assert dataset.num_label_sets == 2
    item = dataset[dataset.names.index("len_40000.wav")]
    assert item["frame_labels"].shape[0] == 2
    assert item["frame_labels"][0, :5].tolist() == merged["len_40000.wav"][0][:5]


def test_is_deterministic_and_skips_finished_folds(
    setup: _Setup,
    clustered: tuple[ClusterConfig, cluster.ClusterResult, list[Path]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, result, _ = clustered
    stale = tmp_path / "fold_1" / ".features-killed"  # as a SIGKILLed run would leave it
    stale.mkdir(parents=True)
    (stale / "features.f32").write_bytes(b"0" * 64)
    again = cluster.run(_config(setup, tmp_path, labelpath=str(setup.label_dir / "fold_1.json")))
    assert not stale.exists()
    first = Path(config.output_dir) / "fold_1/clusters"
    assert _load(tmp_path / "fold_1/clusters/clusters.json") == _load(first / "clusters.json")
    for k in (4, 2):
        np.testing.assert_array_equal(
            np.load(tmp_path / f"fold_1/clusters/centroids_k{k}.npy"),
            np.load(first / f"centroids_k{k}.npy"),
        )
    assert again.stats["fold_1"]["per_k"]["4"]["inertia"] == pytest.approx(
        result.stats["fold_1"]["per_k"]["4"]["inertia"]
    )

    def no_work(*args: Any) -> None:
        raise AssertionError("a finished fold was run again")

    monkeypatch.setattr(cluster, "load_emotion_w2v1", no_work)
    skipped = cluster.run(config)
    assert skipped.stats == result.stats


def test_gives_each_fold_its_numbers_through_the_logger_factory(
    setup: _Setup,
    clustered: tuple[ClusterConfig, cluster.ClusterResult, list[Path]],
    tmp_path: Path,
) -> None:
    config, result, _ = clustered
    logs = StageContext(logger_factory=lambda fold: CSVLogger(tmp_path, name=fold))
    cluster.run(config, logs)  # skips
    for fold_name in setup.folds:
        with open(tmp_path / fold_name / "version_0" / "metrics.csv") as handle:
            row = next(csv.DictReader(handle))
        stats = result.stats[fold_name]
        assert float(row["inertia_k4"]) == pytest.approx(stats["per_k"]["4"]["inertia"])
        assert float(row["empty_clusters_k2"]) == stats["per_k"]["2"]["empty_clusters"]
        assert float(row["frames_total"]) == stats["frames_total"]


def test_a_failure_mid_fold_leaves_no_features_and_no_merged_file(
    setup: _Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any) -> None:
        raise RuntimeError("k-means died")

    config = _config(setup, tmp_path, labelpath=str(setup.label_dir / "fold_2.json"))
    with monkeypatch.context() as patch:
        patch.setattr(cluster, "train_kmeans", fail)
        with pytest.raises(RuntimeError, match="k-means died"):
            cluster.run(config)
    assert not list((tmp_path / "fold_2").glob(".features-*"))
    assert not (tmp_path / "fold_2/clusters/clusters.json").exists()
    assert cluster.run(config).cluster_files["fold_2"].is_file()  # a re-run does the fold


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_clusters": (1,)}, r"num_clusters=\(1,\) must list .* integer >= 2"),
        ({"num_clusters": (4, 0)}, r"num_clusters=\(4, 0\)"),
        ({"num_clusters": ()}, r"num_clusters=\(\)"),
        ({"num_clusters": (2, 2)}, "repeats"),
        ({"num_clusters": (2, 100_000)}, "only .* frames .* lower num_clusters or raise"),
        ({"sample_ratio": 0.0}, "sample_ratio=0.0"),
        ({"sample_ratio": 1.5}, "sample_ratio=1.5"),
        ({"niter": 0}, "niter=0"),
        ({"pretrained_path": ""}, "pretrained_path='' is empty"),
        ({"pretrained_path": "no/such/dir"}, "pretrained_path=no/such/dir: no such"),
    ],
)
def test_bad_parameters_fail_before_any_work(
    setup: _Setup,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    overrides: dict[str, Any],
    message: str,
) -> None:
    def no_work(*args: Any) -> None:
        raise AssertionError("work started before the parameters were checked")

    monkeypatch.setattr(cluster, "load_emotion_w2v1", no_work)
    with pytest.raises(SerInputError, match=message):
        cluster.run(_config(setup, tmp_path / "out", **overrides))
    assert not (tmp_path / "out").exists()


def test_low_sample_ratio_can_leave_too_few_frames(setup: _Setup, tmp_path: Path) -> None:
    config = _config(setup, tmp_path, num_clusters=(64,), sample_ratio=0.01)
    with pytest.raises(SerInputError, match="fewer than k=64; lower num_clusters or raise"):
        cluster.run(config)


def test_resolve_model_dir_accepts_the_phase1_output_or_a_model_folder(
    setup: _Setup, tmp_path: Path
) -> None:
    fold = read_label_file(setup.label_dir / "fold_2.json")
    expected = setup.phase1_dir / "fold_2" / "w2v1"
    assert resolve_model_dir(str(setup.phase1_dir), fold) == expected
    assert resolve_model_dir(str(expected.parent), fold) == expected
    assert resolve_model_dir(str(expected), fold) == expected
    with pytest.raises(SerInputError, match="found no phase-1 model for fold fold_2"):
        resolve_model_dir(str(tmp_path), fold)


def test_plan_sample_is_seeded_per_utterance_and_capped() -> None:
    counts = [10, 0, 7, 30]
    rows = plan_sample(counts, ratio=0.5, cap=1000, seed=0)
    starts = np.cumsum([0, *counts])
    per_file = [((rows >= a) & (rows < b)).sum() for a, b in zip(starts, starts[1:], strict=False)]
    assert per_file == [5, 0, round(3.5), 15]
    assert len(np.unique(rows)) == len(rows) and rows.max() < sum(counts)
    assert np.array_equal(plan_sample(counts, 0.5, 1000, seed=0), rows)
    assert not np.array_equal(plan_sample(counts, 0.5, 1000, seed=1), rows)
    capped = plan_sample(counts, ratio=1.0, cap=12, seed=0)
    assert len(capped) == 12 and np.all(np.diff(capped) > 0)


def test_store_keeps_features_and_passes_the_sample_on(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    counts = [3, 0, 5, 2]
    features = [rng.standard_normal((n, 4)).astype(np.float32) for n in counts]
    store = FeatureStore(tmp_path / "f.f32", sum(counts), 4)
    sample_rows = np.array([0, 2, 4, 9])
    sample = store_features(iter(features), counts, store, sample_rows)
    everything = np.concatenate(features)
    np.testing.assert_array_equal(store.read(0, store.total), everything)
    np.testing.assert_array_equal(sample, everything[sample_rows])
    with pytest.raises(RuntimeError, match="expected 3 frames"):
        store_features(iter(features[1:]), counts, store, sample_rows)


def test_memory_grows_with_the_sample_not_the_corpus(tmp_path: Path) -> None:
    dim, per_file, files = 32, 500, 800  # 400k frames: a 51 MB corpus on disk
    counts = [per_file] * files
    sample_rows = plan_sample(counts, ratio=0.01, cap=100_000, seed=0)  # 4k frames, 0.5 MB

    def stream() -> Any:
        rng = np.random.default_rng(0)
        for _ in range(files):
            yield rng.standard_normal((per_file, dim), dtype=np.float32)

    tracemalloc.start()
    try:
        store = FeatureStore(tmp_path / "f.f32", sum(counts), dim)
        sample = store_features(stream(), counts, store, sample_rows)
        labels = assign_all(store, [train_kmeans(sample, 8, niter=3, seed=0)], chunk_rows=65536)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    corpus_bytes = sum(counts) * dim * 4
    assert len(labels[0]) == sum(counts) and labels[0].max() == 7
    # The peak is one read chunk (65536 x 32 floats, 8 MB) plus labels; never the corpus.
    assert peak < corpus_bytes / 4, (peak, corpus_bytes)


def test_frame_count_formulas_agree_for_the_presets() -> None:
    for preset in ("tiny", "large"):
        config = Wav2Vec1Config.preset(preset)
        for samples in range(0, 50_000, 331):
            expected = label_frame_count(samples)
            assert max(int(w2v1_frames_20ms(samples, config)), 0) == expected, (preset, samples)
