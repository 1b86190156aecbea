"""Fine-tuning (and phase 2's mask embedding) train as the original did, by default.

- Time masks: the original's share of masked valid frames (transformers 4.10's batch-level
  draw), checked against an independent re-implementation on IEMOCAP-like lengths;
  ``time_masking="utterance"`` masks far more.
- Channel masks: every utterance gets a 64-channel span (the original's ``min_masks=1``).
- The mask embedding is left out of the optimizer unless ``train_mask_embedding=True``.
- ``batching="random"``: seeded random batches, last partial one dropped; ``"bucket"`` groups.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Model

from ser import training
from ser.audio import check_audio_files
from ser.config import SAMPLE_RATE, FinetuneConfig, Phase2Config
from ser.data.frames import label_frame_count
from ser.data.labels import read_label_file
from ser.data.sampling import BucketBatchSampler
from ser.data.synthetic import DemoCorpus
from ser.models.backbones import preset_config
from ser.models.heads import FrameClusterHeads, UtteranceClassifier
from ser.stages import finetune
from ser.stages import ptapt_phase2 as phase2
from ser.stages.finetune import FinetuneModule

FRAMES_PER_SECOND = 50  # wav2vec 2.0's 20 ms frames
SAMPLES_PER_FRAME = SAMPLE_RATE // FRAMES_PER_SECOND


class _Stop(Exception):
    """Raised by a spy to end a stage once it has seen what the test needs."""


# --------------------------------------------------------------------------- time masks


def _iemocap_like_seconds(seed: int = 0) -> np.ndarray:
    """5,531 durations like IEMOCAP's 4-class set: lognormal, median 3.5 s, mean about 4.5 s,
    clipped to 0.6-34 s."""
    rng = np.random.default_rng(seed)
    sigma = np.sqrt(2 * np.log(4.5 / 3.5))  # mean / median = exp(sigma^2 / 2)
    return np.clip(rng.lognormal(np.log(3.5), sigma, 5531), 0.6, 34.0)


def _original_time_masks(
    lengths: np.ndarray, rng: np.random.Generator, prob: float = 0.08, span: int = 15,
    min_masks: int = 2,
) -> np.ndarray:
    """transformers 4.10's ``_compute_mask_indices`` as FT-w2v2-ser's fine-tuning used it
    (RECIPE.md), in numpy: one count per batch from the padded length, starts without
    replacement over the padded row, then AND valid frames."""
    padded = int(lengths.max())
    count = max(int(prob * padded / span + rng.random()), min_masks)
    if count * span > padded:
        count = padded // span
    mask = np.zeros((len(lengths), padded), dtype=bool)
    for row in range(len(lengths)):
        for start in rng.choice(padded - span + 1, count, replace=False):
            mask[row, start : start + span] = True
    return mask & (np.arange(padded)[None] < lengths[:, None])


@pytest.fixture(scope="module")
def batches() -> list[np.ndarray]:
    """Frame lengths of three epochs of fine-tuning's random batches of 64 (maxseqlen 10 s):
    the span count varies by batch, and three epochs keep each side's noise near 0.2 points."""
    samples = (_iemocap_like_seconds() * SAMPLE_RATE).astype(np.int64)
    config = FinetuneConfig(batch_size=64, maxseqlen=10.0)
    sampler = finetune.train_batch_sampler(config, samples.tolist(), seed=0)
    frames = np.minimum(samples, int(config.maxseqlen * SAMPLE_RATE)) // SAMPLES_PER_FRAME
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs += [frames[batch] for batch in sampler]
    return epochs


def _masked_share(module: FinetuneModule, batches: list[np.ndarray]) -> float:
    """Share of valid frames that the classifier's training time masks cover."""
    torch.manual_seed(0)
    masked = valid = 0
    for lengths in batches:
        frame_mask = torch.arange(int(lengths.max()))[None] < torch.from_numpy(lengths)[:, None]
        masked += int(module.model.draw_time_mask(frame_mask).sum())
        valid += int(frame_mask.sum())
    return masked / valid


def _module(**kwargs: Any) -> FinetuneModule:
    return FinetuneModule("tiny", ["a", "b"], [0.5, 0.5], **kwargs)


def test_time_masks_cover_the_originals_share_of_valid_frames(batches: list[np.ndarray]) -> None:
    rng = np.random.default_rng(1)
    masks = [_original_time_masks(lengths, rng) for lengths in batches]
    original = sum(int(m.sum()) for m in masks) / sum(int(b.sum()) for b in batches)
    assert 0.06 < original < 0.095  # RECIPE: about 7.8 %
    ours = _masked_share(_module(), batches)  # time_masking="batch", the default
    assert abs(ours - original) < 0.01
    # Per utterance (the other option), every clip gets at least 2 spans of its own: far more
    # masking (about 14 % of all valid frames here; 20 % of an average utterance's).
    per_utterance = _masked_share(_module(time_masking="utterance"), batches)
    assert per_utterance > original + 0.05


# --------------------------------------------------------------------------- channel masks


def test_every_utterance_gets_one_channel_span_of_64() -> None:
    # wav2vec2-base's 768 channels (a small model otherwise): count int(0.05 * 768 / 64 + u)
    # is 0 or 1 and min_masks=1 makes it 1, as in the original: exactly one span of 64.
    config = preset_config("tiny", hidden_size=768, num_hidden_layers=1)
    model = UtteranceClassifier(Wav2Vec2Model(config), num_classes=4)
    for seed in range(10):
        torch.manual_seed(seed)
        assert model.draw_feature_mask(64, 768).sum(1).tolist() == [64] * 64
    # The tiny preset: a span of the same share of its 64 channels, still one per utterance.
    tiny = _module().model
    torch.manual_seed(0)
    assert tiny.draw_feature_mask(64, 64).any(dim=1).all()


# --------------------------------------------------------------------------- mask embedding


def _optimised_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("train_embedding", [False, True])
def test_finetune_optimizer_holds_the_mask_embedding_only_on_request(
    train_embedding: bool,
) -> None:
    module = _module(train_mask_embedding=train_embedding)
    embed = module.model.backbone.masked_spec_embed
    optimised = _optimised_ids(module.configure_optimizers())
    assert (id(embed) in optimised) == embed.requires_grad == train_embedding
    assert id(module.model.output.weight) in optimised


@pytest.mark.parametrize("train_embedding", [False, True])
def test_phase2_optimizer_holds_the_mask_embedding_only_on_request(train_embedding: bool) -> None:
    torch.manual_seed(0)
    heads = FrameClusterHeads(Wav2Vec2Model(preset_config("tiny")), [4, 8],
                              train_mask_embedding=train_embedding)
    module = phase2.Phase2Module(heads, lr=1e-4, warmup_step=1, training_step=10)
    optimised = _optimised_ids(module.configure_optimizers()["optimizer"])
    assert (id(heads.backbone.masked_spec_embed) in optimised) == train_embedding
    assert id(heads.heads[0][0].weight) in optimised


def test_finetune_stage_passes_its_masking_options(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []

    def spy(*args: Any, **kwargs: Any) -> FinetuneModule:
        seen.append(kwargs)
        raise _Stop

    monkeypatch.setattr(finetune, "FinetuneModule", spy)
    for values in ({}, {"time_masking": "utterance", "train_mask_embedding": True}):
        config = FinetuneConfig(datadir=str(corpus.audio_dir), labeldir=str(corpus.label_dir),
                                output_dir=str(tmp_path / str(len(seen))), **values)
        with pytest.raises(_Stop):
            finetune.run(config)
    picked = [(kw["time_masking"], kw["train_mask_embedding"]) for kw in seen]
    assert picked == [("batch", False), ("utterance", True)]


@pytest.mark.parametrize("train_embedding", [False, True])
def test_phase2_stage_optimizes_the_mask_embedding_only_on_request(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train_embedding: bool,
) -> None:
    samples = check_audio_files(sorted(corpus.audio_dir.glob("*.wav")))
    labels = {Path(path).name: [[0, 1] * (label_frame_count(n) // 2 + 1)] * 2
              for path, n in samples.items()}
    clusters = tmp_path / "clusters.json"
    clusters.write_text(json.dumps(labels))
    seen: list[bool] = []

    def fit(trainer: Any, module: phase2.Phase2Module, *args: Any, **kwargs: Any) -> None:
        optimizer = module.configure_optimizers()["optimizer"]
        seen.append(id(module.model.backbone.masked_spec_embed) in _optimised_ids(optimizer))
        raise _Stop

    monkeypatch.setattr(training, "fit", fit)
    config = Phase2Config(
        datadir=str(corpus.audio_dir), labelpath=str(corpus.label_files[0]),
        output_dir=str(tmp_path / "out"), clusterpath=str(clusters), backbone="tiny",
        training_step=2, warmup_step=1, checkpoint_every=1, batch_size=1,
        train_mask_embedding=train_embedding,
    )
    with pytest.raises(_Stop):
        phase2.run(config)
    assert seen == [train_embedding]


# --------------------------------------------------------------------------- batching


def _spread_lengths(count: int = 1000, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(SAMPLE_RATE // 2, 10 * SAMPLE_RATE, count).tolist()


def _within_batch_spread(sampler: BucketBatchSampler, lengths: list[int]) -> float:
    """Mean within-batch std of lengths over the std of all lengths (1: not grouped)."""
    values = np.asarray(lengths)
    return float(np.mean([values[b].std() for b in sampler if len(b) > 1]) / values.std())


def test_random_batches_are_not_grouped_drop_the_last_and_are_seeded() -> None:
    lengths = _spread_lengths()
    config = FinetuneConfig(batch_size=64)  # batching="random", the default
    sampler = finetune.train_batch_sampler(config, lengths, seed=3)
    batches = list(sampler)
    assert [len(b) for b in batches] == [64] * (1000 // 64)  # the 40 left over are dropped
    assert len({i for b in batches for i in b}) == 64 * (1000 // 64)
    assert _within_batch_spread(sampler, lengths) > 0.8
    assert batches == list(finetune.train_batch_sampler(config, lengths, seed=3))
    assert batches != list(finetune.train_batch_sampler(config, lengths, seed=4))
    sampler.set_epoch(1)
    assert list(sampler) != batches  # a new order every epoch


def test_bucket_batches_group_by_length_and_keep_the_last() -> None:
    lengths = _spread_lengths()
    sampler = finetune.train_batch_sampler(
        FinetuneConfig(batch_size=64, batching="bucket"), lengths, seed=3)
    assert sorted(i for b in sampler for i in b) == list(range(1000))
    assert _within_batch_spread(sampler, lengths) < 0.3


def test_a_train_split_smaller_than_a_batch_keeps_its_partial_batch() -> None:
    sampler = finetune.train_batch_sampler(FinetuneConfig(batch_size=64), _spread_lengths(10),
                                           seed=0)
    assert [sorted(b) for b in sampler] == [list(range(10))]


@pytest.mark.parametrize(("batching", "buckets", "drop_last"),
                         [("random", 1, True), ("bucket", 50, False)])
def test_the_train_loader_uses_the_chosen_batching(
    corpus: DemoCorpus, tmp_path: Path, batching: str, buckets: int, drop_last: bool
) -> None:
    fold = read_label_file(corpus.label_files[0])
    config = FinetuneConfig(datadir=str(corpus.audio_dir), labeldir=str(corpus.label_dir),
                            output_dir=str(tmp_path), batch_size=3, batching=batching)
    classes = sorted(set(fold.train.values()))
    sampler = finetune._loaders(config, fold, classes, seed=0, eval_batch=1).train.batch_sampler
    assert isinstance(sampler, BucketBatchSampler)
    assert (sampler.num_buckets, sampler.drop_last) == (buckets, drop_last)
    assert len(fold.train) % 3 != 0  # so that the last batch is partial
    assert all(len(b) == 3 for b in sampler) == drop_last
