"""SpecAugment masks as wav2vec 2.0 draws them, safe on utterances shorter than a mask span.

transformers' ``_compute_mask_indices`` raises ("`mask_length` has to be smaller than
`sequence_length`") when a whole padded batch is shorter than the span, which the original recipe
hits whenever phase 1 crops a batch to a clip under 0.3 s (RECIPE defect 5). Here every utterance
is masked within its own valid frames and a short one gets a shorter span instead of an error.
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
    lengths_cpu = lengths.detach().to("cpu", torch.long)
    if lengths_cpu.dim() != 1:
        raise SerInputError(
            f"time_mask: lengths must be 1-D [batch], got shape {list(lengths.shape)}"
        )
    if lengths_cpu.numel() and int(lengths_cpu.max()) > max_len:
        raise SerInputError(
            f"time_mask: a length ({int(lengths_cpu.max())}) exceeds max_len ({max_len}); "
            "pass the padded frame count as max_len"
        )
    mask = torch.zeros(len(lengths_cpu), max_len, dtype=torch.bool)
    if prob > 0:
        for row, length in enumerate(lengths_cpu.tolist()):
            _mask_row(mask[row], length, prob, span, min_masks, generator, short_halves=True)
    return mask.to(lengths.device)


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


def _check_mask_args(kind: str, prob: float, span: int, min_masks: int) -> None:
    if not 0.0 <= prob <= 1.0:
        raise SerInputError(f"{kind} mask probability must be in [0, 1], got {prob}")
    if span < 1:
        raise SerInputError(f"{kind} mask span must be at least 1 frame, got {span}")
    if min_masks < 0:
        raise SerInputError(f"{kind} mask min_masks must be >= 0, got {min_masks}")
