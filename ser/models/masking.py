"""SpecAugment masks as wav2vec 2.0 draws them, safe on utterances shorter than a mask span.

Two ways to draw time masks:

- :func:`batch_time_mask`, the original's (transformers 4.10 ``_compute_mask_indices`` as
  FT-w2v2-ser's fine-tuning called it): ONE span count per batch from the PADDED frame count,
  starts uniform over the padded row, then ANDed with each row's valid frames. A short clip in a
  long batch keeps few masked frames: about 7.7 % of valid frames on IEMOCAP-like lengths
  (random batches of 64, 10 s cap; tests/test_fidelity_finetune.py).
  Fine-tuning's default (``time_masking="batch"``).
- :func:`time_mask`: the count from each utterance's own length and the spans inside its valid
  frames, so every utterance is masked at the nominal rate or more (at least ``min_masks``
  spans): about 14 % of valid frames on the same lengths (20 % of an average utterance's, the
  short ones' share being the largest). Fine-tuning's ``time_masking="utterance"``, and what
  TAPT, phase 1 and phase 2 use.

transformers' ``_compute_mask_indices`` raises ("`mask_length` has to be smaller than
`sequence_length`") when a whole padded batch is shorter than the span, which the original recipe
hits whenever phase 1 crops a batch to a clip under 0.3 s (RECIPE defect 5). Here a short
utterance gets a shorter span instead of an error (both functions; see :func:`time_mask`).
"""

from __future__ import annotations

import torch

from ser.errors import SerInputError


def time_mask(
    lengths: torch.Tensor,
    max_len: int,
    prob: float,
    span: int,
    min_masks: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Time masks ``[B, max_len]`` (True = masked) drawn inside each utterance's valid frames.

    Per utterance of ``L`` valid frames: ``floor(prob * L / span + u)`` spans (``u`` uniform in
    [0, 1), so the expected count is exact), at least ``min_masks``, at most ``L - span + 1``
    (distinct start frames); spans may overlap, as in wav2vec 2.0. Frames at ``>= L`` are never
    masked. Our choice for short clips: an utterance shorter than ``span`` gets a single span of
    ``L // 2`` frames, so it is never masked whole; one of fewer than 2 frames is not masked.
    ``prob == 0`` masks nothing.
    """
    _check_mask_args("time", prob, span, min_masks)
    lengths_cpu = _checked_lengths("time_mask", lengths, max_len)
    mask = torch.zeros(len(lengths_cpu), max_len, dtype=torch.bool)
    if prob > 0:
        for row, length in enumerate(lengths_cpu.tolist()):
            _mask_row(mask[row], length, prob, span, min_masks, generator, short_halves=True)
    return mask.to(lengths.device)


def batch_time_mask(
    lengths: torch.Tensor,
    max_len: int,
    prob: float,
    span: int,
    min_masks: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Time masks ``[B, max_len]`` (True = masked) drawn as the original drew them.

    As transformers 4.10's ``_compute_mask_indices`` (the torch version FT-w2v2-ser called):
    ``floor(prob * max_len / span + u)`` spans (``u`` uniform in [0, 1), drawn once), at least
    ``min_masks`` and at most ``max_len // span``, the SAME count for every row; each row's start
    frames distinct and uniform over ``[0, max_len - span]`` of the PADDED row (spans may overlap);
    only then ANDed with the row's valid frames (``< lengths[row]``). So a row keeps fewer masked
    frames the more padding it has, and a row shorter than ``span`` in a longer batch is masked
    where the batch's spans happen to fall on it (possibly whole, as in the original).

    Our choice where transformers raises (RECIPE defect 5), a whole batch shorter than ``span``
    (``max_len < span``): each row is masked as :func:`time_mask` does, one span of half its
    valid frames. ``prob == 0`` masks nothing.
    """
    _check_mask_args("time", prob, span, min_masks)
    lengths_cpu = _checked_lengths("batch_time_mask", lengths, max_len)
    batch = len(lengths_cpu)
    if prob == 0 or batch == 0:
        return torch.zeros(batch, max_len, dtype=torch.bool, device=lengths.device)
    if max_len < span:
        return time_mask(lengths, max_len, prob, span, min_masks, generator)
    rounding = float(torch.rand(1, generator=generator))
    count = min(max(int(prob * max_len / span + rounding), min_masks), max_len // span)
    # Distinct uniform starts per row, all rows at once: the first `count` of a random order.
    order = torch.rand(batch, max_len - span + 1, generator=generator).argsort(dim=1)
    covered = (order[:, :count, None] + torch.arange(span)).reshape(batch, -1)
    mask = torch.zeros(batch, max_len, dtype=torch.bool).scatter_(1, covered, True)
    valid = torch.arange(max_len)[None] < lengths_cpu[:, None]
    return (mask & valid).to(lengths.device)


def feature_mask(
    batch: int,
    channels: int,
    prob: float,
    span: int,
    min_masks: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Channel masks ``[batch, channels]`` (True = masked), one draw per utterance.

    The caller applies a row to every frame of its utterance (wav2vec 2.0 zeroes those
    channels). Span count as in :func:`time_mask`; a span wider than ``channels`` is cut to it.
    """
    _check_mask_args("feature", prob, span, min_masks)
    mask = torch.zeros(batch, channels, dtype=torch.bool)
    if prob > 0:
        for row in range(batch):
            _mask_row(mask[row], channels, prob, span, min_masks, generator, short_halves=False)
    return mask


def _mask_row(
    row: torch.Tensor,
    length: int,
    prob: float,
    span: int,
    min_masks: int,
    generator: torch.Generator | None,
    short_halves: bool,
) -> None:
    """Mask spans inside ``row[:length]`` in place."""
    if length < 2:
        return
    if span <= length:
        width = span
        rounding = float(torch.rand(1, generator=generator))
        count = max(int(prob * length / span + rounding), min_masks)
        count = min(count, length - width + 1)
    else:
        width = length // 2 if short_halves else length
        count = 1
    starts = torch.randperm(length - width + 1, generator=generator)[:count]
    for start in starts.tolist():
        row[start : start + width] = True


def _checked_lengths(caller: str, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``lengths`` as a CPU int64 vector, refused unless 1-D and at most ``max_len``."""
    lengths_cpu = lengths.detach().to("cpu", torch.long)
    if lengths_cpu.dim() != 1:
        raise SerInputError(
            f"{caller}: lengths must be 1-D [batch], got shape {list(lengths.shape)}"
        )
    if lengths_cpu.numel() and int(lengths_cpu.max()) > max_len:
        raise SerInputError(
            f"{caller}: a length ({int(lengths_cpu.max())}) exceeds max_len ({max_len}); "
            "pass the padded frame count as max_len"
        )
    return lengths_cpu


def _check_mask_args(kind: str, prob: float, span: int, min_masks: int) -> None:
    if not 0.0 <= prob <= 1.0:
        raise SerInputError(f"{kind} mask probability must be in [0, 1], got {prob}")
    if span < 1:
        raise SerInputError(f"{kind} mask span must be at least 1 frame, got {span}")
    if min_masks < 0:
        raise SerInputError(f"{kind} mask min_masks must be >= 0, got {min_masks}")
