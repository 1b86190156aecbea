"""A run interrupted and resumed trains as the uninterrupted run does: the same batches in the
same order, the same crops and masks, so the same final weights (bitwise, on the CPU)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from stage_callbacks import KILL_MESSAGE, KillAt, add_callback
from torch.utils.data import Dataset

from ser import artifacts, training
from ser.config import SAMPLE_RATE, FinetuneConfig, Phase1Config, TaptConfig
from ser.data.datasets import (
    AudioOnlyDataset,
    EpochIndex,
    UtteranceDataset,
    collate_audio,
    collate_utterances,
)
from ser.data.labels import read_label_file
from ser.data.sampling import BucketBatchSampler, ResumableLoader
from ser.data.synthetic import DemoCorpus
from ser.resume import collect, restore
from ser.stages import finetune, ptapt_phase1, tapt


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models gain nothing from intra-op threads on two shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LENGTHS = [int(n) for n in np.random.default_rng(0).integers(16_000, 80_000, size=37)]


def _disturb_random_state() -> None:
    """What a fresh process (or anything run before the resume) does to the global generators."""
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)


# --------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("sizing", [{"batch_size": 4}, {"max_batch_samples": 200_000}])
@pytest.mark.parametrize("replicas", [1, 2])
def test_a_resumed_sampler_yields_exactly_the_rest_of_its_epoch(
    sizing: dict[str, int], replicas: int
) -> None:
    for rank in range(replicas):
        def sampler(rank: int = rank) -> BucketBatchSampler:
            return BucketBatchSampler(LENGTHS, seed=5, num_replicas=replicas, rank=rank, **sizing)

        first = sampler()
        first.set_epoch(3)
        epoch = list(first)
        assert len(epoch) > 4
        for done in (0, 1, 3, len(epoch)):
            interrupted = sampler()
            interrupted.set_epoch(3)
            iterator = iter(interrupted)
            assert [next(iterator) for _ in range(done)] == epoch[:done]
            state = interrupted.state_dict()
            assert state == {"epoch": 3, "batches_yielded": done, "num_replicas": replicas}

            resumed = sampler()  # a new process: epoch 0, nothing yielded
            resumed.load_state_dict(state)
            resumed.set_epoch(3)  # as Lightning does after loading: the same epoch, kept
            assert list(resumed) == epoch[done:]
            assert resumed.state_dict()["batches_yielded"] == len(epoch)
            assert list(resumed) == epoch  # the resume point is used once


def test_the_shards_of_a_resumed_epoch_are_the_rest_of_each_ranks_shard() -> None:
    ranks = [BucketBatchSampler(LENGTHS, batch_size=3, seed=1, num_replicas=2, rank=r)
             for r in range(2)]
    full = [list(r) for r in ranks]
    for rank, batches in zip(ranks, full, strict=True):
        rank.load_state_dict({"epoch": 0, "batches_yielded": 2, "num_replicas": 2})
        assert list(rank) == batches[2:]
    # Rank 0's state (the one a checkpoint holds) fits rank 1: both have run as many batches.
    assert len(full[0]) == len(full[1])
    # (the shards cover every item; one batch repeats to even out the counts)
    assert {i for shard in full for batch in shard for i in batch} == set(range(37))


def test_a_resume_point_at_an_epochs_end_moves_on_to_the_next_epoch() -> None:
    sampler = BucketBatchSampler(LENGTHS, batch_size=4, seed=2)
    sampler.load_state_dict({"epoch": 1, "batches_yielded": len(sampler), "num_replicas": 1})
    sampler.set_epoch(2)  # Lightning starts the next epoch
    assert list(sampler) == sampler.global_batches(2)


# --------------------------------------------------------------------------- the loader


class _Indices(Dataset):
    """Returns what the loader asked for, so the test sees the epoch travel with each index."""

    def __len__(self) -> int:
        return len(LENGTHS)

    def __getitem__(self, index: EpochIndex) -> EpochIndex:
        return index


def _collate(items: list[EpochIndex]) -> list[EpochIndex]:
    return list(items)


@pytest.mark.parametrize("workers", [0, 1])
def test_the_loader_state_counts_delivered_batches_not_prefetched_ones(workers: int) -> None:
    def loader() -> ResumableLoader:
        return ResumableLoader(_Indices(), BucketBatchSampler(LENGTHS, batch_size=4, seed=3),
                               collate_fn=_collate, num_workers=workers,
                               persistent_workers=workers > 0)

    interrupted = loader()
    interrupted.batch_sampler.set_epoch(2)
    expected = [[EpochIndex(2, i) for i in batch] for batch in
                interrupted.batch_sampler.global_batches(2)]
    iterator = iter(interrupted)
    assert [next(iterator) for _ in range(3)] == expected[:3]
    # With a worker the sampler is ahead (prefetching); the state is what training has seen.
    assert interrupted.state_dict() == {"epoch": 2, "batches_yielded": 3, "num_replicas": 1}

    resumed = loader()
    resumed.load_state_dict(interrupted.state_dict())
    resumed.batch_sampler.set_epoch(2)
    assert list(resumed) == expected[3:]
    assert resumed.state_dict()["batches_yielded"] == len(expected)


def test_crops_follow_the_epoch_in_a_persistent_worker(corpus: DemoCorpus) -> None:
    fold = read_label_file(corpus.label_files[0])
    classes = sorted(set(fold.train.values()))
    crop = 12_000  # shorter than every utterance: every item is cropped at a random offset
    dataset = UtteranceDataset(corpus.audio_dir, fold.train, classes, max_samples=crop,
                               train=True, seed=4)
    sampler = BucketBatchSampler(dataset.lengths, batch_size=3, seed=4)
    loader = ResumableLoader(dataset, sampler, collate_fn=collate_utterances, num_workers=1,
                             persistent_workers=True)
    for epoch in range(2):
        sampler.set_epoch(epoch)  # never reaches the worker's copy of the dataset
        dataset.set_epoch(epoch)  # the main process's copy, for the expected crops
        for batch in loader:
            for name, wav in zip(batch["names"], batch["input_values"], strict=True):
                expected = dataset[dataset.names.index(name)]["input_values"]
                assert torch.equal(wav, expected)
    dataset.set_epoch(0)
    first = dataset[0]["input_values"]
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[0]["input_values"])


# --------------------------------------------------------------------------- random state


def test_the_random_state_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save({"rng": collect()}, tmp_path / "state.ckpt")
    expected = (torch.rand(3), np.random.standard_normal(3), random.random())
    _disturb_random_state()
    restore(torch.load(tmp_path / "state.ckpt", weights_only=True)["rng"])
    drawn = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(drawn[0], expected[0])
    assert np.array_equal(drawn[1], expected[1]) and drawn[2] == expected[2]


# --------------------------------------------------------------------------- end to end


def _loader_state(checkpoint: Path) -> dict[str, int]:
    loops = torch.load(checkpoint, weights_only=True)["loops"]
    (state,) = loops["fit_loop"]["state_dict"]["combined_loader"]
    return state


def _kill(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Any], at_step: int) -> None:
    """Run until an exception stops it before step ``at_step``, after its last checkpoint."""
    with monkeypatch.context() as patch:
        add_callback(patch, training, KillAt(at_step=at_step))
        with pytest.raises(RuntimeError, match=KILL_MESSAGE):
            run()


def _epoch_length(corpus: DemoCorpus, config: TaptConfig, epoch: int) -> int:
    """Batches in ``epoch`` of TAPT's training loader (dynamic batches: it varies by epoch)."""
    fold = read_label_file(corpus.label_files[0])
    dataset = AudioOnlyDataset(corpus.audio_dir, list(fold.train), train=True, seed=config.seed,
                               max_samples=int(config.maxseqlen * SAMPLE_RATE))
    sampler = training.dynamic_batch_loader(dataset, dataset.lengths, config,
                                            collate_audio).batch_sampler
    sampler.set_epoch(epoch)
    return len(sampler)


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    differ = [key for key in want if not torch.equal(got[key], want[key])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.slow
def test_finetuning_killed_mid_epoch_resumes_to_the_uninterrupted_weights(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def config(name: str) -> FinetuneConfig:
        # 8 Train utterances in batches of 2: 4 steps an epoch, a checkpoint at each epoch's end.
        return FinetuneConfig(
            datadir=str(corpus.audio_dir), labelpath=str(corpus.label_files[0]),
            output_dir=str(tmp_path / name), batch_size=2, max_epochs=3, lr=1e-3, seed=7,
            keep_checkpoints=True, maxseqlen=1.2,  # crops at random offsets
        )  # fmt: skip

    whole = finetune.run(config("whole"))
    run_dir = Path("fold_1") / "run_0"
    # Killed at step 7, in the middle of epoch 1, three batches after the checkpoint at its start.
    _kill(monkeypatch, lambda: finetune.run(config("resumed")), at_step=7)
    resume_point = tmp_path / "resumed" / run_dir / "checkpoints" / artifacts.LAST_CKPT
    assert torch.load(resume_point, weights_only=True)["global_step"] == 4
    _disturb_random_state()
    finetune.run(config("resumed"))
    last = {name: tmp_path / name / run_dir / "checkpoints" / artifacts.LAST_CKPT
            for name in ("whole", "resumed")}
    _assert_same_weights(torch.load(last["resumed"], weights_only=True)["state_dict"],
                         torch.load(last["whole"], weights_only=True)["state_dict"])
    results = json.loads((tmp_path / "resumed" / run_dir / "results.json").read_text())
    assert results["global_step"] == whole.runs[0]["global_step"] == 12
    assert results["predictions"] == whole.runs[0]["predictions"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])  # with a worker, the sampler runs ahead (prefetch)
def test_tapt_killed_mid_epoch_resumes_to_the_uninterrupted_weights(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    def config(name: str) -> TaptConfig:
        return TaptConfig(
            datadir=str(corpus.audio_dir), labelpath=str(corpus.label_files[0]),
            output_dir=str(tmp_path / name), backbone="tiny", training_step=9, warmup_step=2,
            checkpoint_every=4, batch_size=1, seed=3, keep_checkpoints=True, num_workers=workers,
        )  # fmt: skip

    fold = Path(corpus.label_files[0]).stem
    tapt.run(config("whole"))
    # Killed at step 6, two batches after the checkpoint at step 4, in the middle of an epoch.
    _kill(monkeypatch, lambda: tapt.run(config("resumed")), at_step=6)
    state = _loader_state(tmp_path / "resumed" / fold / "checkpoints" / artifacts.LAST_CKPT)
    assert 0 < state["batches_yielded"] < _epoch_length(corpus, config("resumed"), state["epoch"])
    _disturb_random_state()
    tapt.run(config("resumed"))
    weights = {name: load_file(tmp_path / name / fold / artifacts.BACKBONE / "model.safetensors")
               for name in ("whole", "resumed")}
    _assert_same_weights(weights["resumed"], weights["whole"])


@pytest.mark.slow
def test_pretrain_w2v1_killed_mid_epoch_resumes_to_the_uninterrupted_weights(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def config(name: str) -> Phase1Config:
        # Validation, then a checkpoint, every 4 steps; an epoch is the 7 training files.
        return Phase1Config(
            datadir=str(corpus.audio_dir), labelpath=str(corpus.label_files[0]),
            output_dir=str(tmp_path / name), training_step=8, checkpoint_every=4, batch_size=1,
            lr=1e-2, seed=2, keep_checkpoints=True,
        )  # fmt: skip

    fold = Path(corpus.label_files[0]).stem
    ptapt_phase1.run(config("whole"))
    _kill(monkeypatch, lambda: ptapt_phase1.run(config("resumed")), at_step=6)
    checkpoints = {name: tmp_path / name / fold / "checkpoints" / artifacts.LAST_CKPT
                   for name in ("whole", "resumed")}
    split = json.loads((tmp_path / "resumed" / fold / ptapt_phase1.SPLIT_FILE).read_text())
    assert _loader_state(checkpoints["resumed"])["batches_yielded"] == 4 < len(split["train"])
    _disturb_random_state()
    ptapt_phase1.run(config("resumed"))
    final = {name: torch.load(path, weights_only=True) for name, path in checkpoints.items()}
    assert final["resumed"]["global_step"] == final["whole"]["global_step"] == 8
    _assert_same_weights(final["resumed"]["state_dict"], final["whole"]["state_dict"])
