"""SpecAugment masks: spans inside valid frames only, no crash on short utterances, and the
original's batch-level time masks (one span count per batch from the padded length)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from ser.errors import SerInputError
from ser.models.masking import batch_time_mask, feature_mask, time_mask


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _runs(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor."""
    runs, current = [], 0
    for value in row.tolist() + [False]:
        if value:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


def test_masks_stay_inside_valid_frames() -> None:
    lengths = torch.tensor([120, 40, 61, 15])
    for seed in range(50):
        mask = time_mask(lengths, 130, prob=0.3, span=15, generator=_gen(seed))
        assert mask.shape == (4, 130) and mask.dtype == torch.bool
        for row, length in zip(mask, lengths.tolist(), strict=True):
            assert not row[length:].any()
            assert row[:length].any()


def test_spans_have_the_requested_width_and_min_count() -> None:
    # prob so small that the count comes from min_masks alone: 2 spans of 15 at distinct starts.
    for seed in range(50):
        row = time_mask(torch.tensor([200]), 200, prob=1e-6, span=15, min_masks=2,
                        generator=_gen(seed))[0]
        assert 16 <= int(row.sum()) <= 30
        assert all(run >= 15 for run in _runs(row))


def test_span_count_follows_probability() -> None:
    # 1000 frames, p=0.08, span 15: 5.33 spans on average (about 77 frames after overlaps).
    masked = [
        int(time_mask(torch.tensor([1000]), 1000, 0.08, 15, 2, generator=_gen(seed)).sum())
        for seed in range(200)
    ]
    mean = sum(masked) / len(masked)
    assert 74 < mean < 80  # without the random rounding: about 72
    # Padding does not count: the same utterance in a longer padded batch masks as much.
    padded = [
        int(time_mask(torch.tensor([1000]), 3000, 0.08, 15, 2, generator=_gen(seed)).sum())
        for seed in range(200)
    ]
    assert padded == masked


def test_zero_probability_masks_nothing() -> None:
    assert not time_mask(torch.tensor([100, 50]), 100, 0.0, 15, min_masks=2).any()
    assert not feature_mask(3, 768, 0.0, 64, min_masks=2).any()


def test_short_utterances_get_half_their_length_and_never_crash() -> None:
    lengths = torch.tensor([10, 200, 1, 0, 14])
    for seed in range(20):
        mask = time_mask(lengths, 200, 0.08, 15, 2, generator=_gen(seed))
        assert _runs(mask[0]) == [5]  # one span of 10 // 2 frames
        assert not mask[2].any() and not mask[3].any()
        assert _runs(mask[4]) == [7]
        assert int(mask[1].sum()) >= 16


def test_whole_batch_shorter_than_span_is_fine_where_transformers_crashes() -> None:
    # RECIPE defect 5: phase 1 crops a batch to its shortest clip; one 0.2 s clip then gives a
    # batch of 10 frames, shorter than the 15-frame span.
    lengths = torch.tensor([10, 8])
    attention = (torch.arange(10)[None] < lengths[:, None]).long()
    with pytest.raises(ValueError, match="`mask_length` has to be smaller than `sequence_length`"):
        _compute_mask_indices((2, 10), 0.08, 15, attention_mask=attention, min_masks=2)
    mask = time_mask(lengths, 10, 0.08, 15, 2, generator=_gen())
    assert [int(m.sum()) for m in mask] == [5, 4]


def test_same_generator_seed_gives_same_masks() -> None:
    lengths = torch.tensor([300, 150])
    first = time_mask(lengths, 300, 0.08, 15, generator=_gen(7))
    assert torch.equal(first, time_mask(lengths, 300, 0.08, 15, generator=_gen(7)))
    assert not torch.equal(first, time_mask(lengths, 300, 0.08, 15, generator=_gen(8)))


def test_int32_lengths_are_accepted() -> None:
    mask = time_mask(torch.tensor([30, 20], dtype=torch.int32), 30, 0.5, 5, generator=_gen())
    assert mask.shape == (2, 30) and not mask[1, 20:].any()


def test_feature_masks_cover_channel_spans() -> None:
    for seed in range(20):
        mask = feature_mask(4, 768, 0.05, 64, min_masks=1, generator=_gen(seed))
        assert mask.shape == (4, 768)
        for row in mask:
            assert row.any() and all(run >= 64 for run in _runs(row))
    # A span wider than the channels is cut to them instead of failing.
    assert feature_mask(2, 32, 0.5, 64, min_masks=1, generator=_gen()).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"prob": 1.5}, "probability"), ({"span": 0}, "span"), ({"min_masks": -1}, "min_masks")],
)
def test_bad_arguments_are_refused(kwargs: dict[str, float], message: str) -> None:
    args = {"prob": 0.1, "span": 10, "min_masks": 2, **kwargs}
    with pytest.raises(SerInputError, match=message):
        time_mask(torch.tensor([50]), 50, **args)
    with pytest.raises(SerInputError, match=message):
        feature_mask(1, 50, **args)


def test_lengths_beyond_max_len_are_refused() -> None:
    with pytest.raises(SerInputError, match="exceeds max_len"):
        time_mask(torch.tensor([60]), 50, 0.1, 10)
    with pytest.raises(SerInputError, match="1-D"):
        time_mask(torch.tensor([[60]]), 50, 0.1, 10)


# --- batch_time_mask: the original's (transformers 4.10) batch-level draw -------------------


def test_batch_masks_use_one_span_count_per_batch_from_the_padded_length() -> None:
    # span 1 (no overlap, distinct starts): a full-length row has exactly `count` masked frames.
    # prob * 100 / 1 = 5.7: count 5 or 6 (6 with probability 0.7), the same for every row.
    counts = []
    for seed in range(200):
        mask = batch_time_mask(torch.full((8,), 100), 100, 0.057, 1, 0, generator=_gen(seed))
        per_row = mask.sum(1).tolist()
        assert len(set(per_row)) == 1
        counts.append(per_row[0])
    assert set(counts) == {5, 6} and 0.6 < counts.count(6) / len(counts) < 0.8
    # The per-utterance draw counts each row on its own: rows differ within a batch.
    rows = time_mask(torch.full((8,), 100), 100, 0.057, 1, 0, generator=_gen())
    assert len(set(rows.sum(1).tolist())) > 1


def test_batch_masks_fall_on_valid_frames_only_and_thin_out_with_padding() -> None:
    lengths = torch.tensor([500, 100, 20])
    alone, padded, short_hits = [], [], 0
    for seed in range(300):
        mask = batch_time_mask(lengths, 500, 0.08, 15, 2, generator=_gen(seed))
        for row, length in zip(mask, lengths.tolist(), strict=True):
            assert not row[length:].any()
        padded.append(int(mask[1].sum()))
        short_hits += int(mask[2].any())
        alone.append(int(batch_time_mask(lengths[1:2], 100, 0.08, 15, 2,
                                         generator=_gen(seed)).sum()))
    # Spans start anywhere in the padded row: a 100-frame utterance in a 500-frame batch keeps
    # about a fifth of the masking it gets alone, and a 20-frame one is sometimes masked.
    assert sum(padded) < 0.5 * sum(alone)
    assert 0 < short_hits < 300


def test_batch_masks_respect_min_masks_and_the_padded_cap() -> None:
    for seed in range(20):
        # min_masks 2 with a tiny probability: 2 distinct starts of span 15 on every row.
        mask = batch_time_mask(torch.tensor([300, 300]), 300, 1e-6, 15, 2, generator=_gen(seed))
        assert all(16 <= int(row.sum()) <= 30 for row in mask)
        # min_masks 5 capped at 40 // 15 = 2 spans, as transformers 4.10 caps them.
        capped = batch_time_mask(torch.tensor([40]), 40, 0.08, 15, 5, generator=_gen(seed))
        assert 16 <= int(capped.sum()) <= 30


def test_batch_shorter_than_a_span_falls_back_to_half_spans() -> None:
    # transformers raises here (RECIPE defect 5); each row gets one span of half its frames.
    lengths = torch.tensor([10, 8, 1])
    for seed in range(20):
        mask = batch_time_mask(lengths, 10, 0.08, 15, 2, generator=_gen(seed))
        assert [_runs(row) for row in mask] == [[5], [4], []]


def test_batch_masks_edge_cases() -> None:
    assert not batch_time_mask(torch.tensor([100, 50]), 100, 0.0, 15, 2).any()
    assert batch_time_mask(torch.zeros(0, dtype=torch.long), 30, 0.1, 5).shape == (0, 30)
    lengths = torch.tensor([300, 150], dtype=torch.int32)
    first = batch_time_mask(lengths, 300, 0.08, 15, generator=_gen(7))
    assert torch.equal(first, batch_time_mask(lengths, 300, 0.08, 15, generator=_gen(7)))
    assert not torch.equal(first, batch_time_mask(lengths, 300, 0.08, 15, generator=_gen(8)))
    with pytest.raises(SerInputError, match="exceeds max_len"):
        batch_time_mask(torch.tensor([60]), 50, 0.1, 10)
    with pytest.raises(SerInputError, match="span"):
        batch_time_mask(torch.tensor([60]), 60, 0.1, 0)
