"""Frame arithmetic of the convolutional encoders, and frame-label alignment for P-TAPT phase 2.

wav2vec 2.0 turns 16 kHz audio into one frame every 320 samples (20 ms) with a stack of seven
convolutions. P-TAPT's pseudo-labels come from a different stream: wav2vec 1.0's feature
extractor (five convolutions, one frame every 160 samples, 10 ms), its causal context network
(same length), then a Conv1d(kernel 4, stride 2) that halves the rate to 320 samples. Both streams
therefore have the same hop; they differ in receptive field and so in frame count. This module
makes that relation explicit instead of assuming the two streams are the same length.

How exact the alignment is (RECIPE defect 7), from the convolution arithmetic alone:

- Frame ``j`` of a stream whose convolutions have overall stride 320 reads a window of audio that
  starts at sample ``320 * j``. wav2vec 2.0's window is 400 samples (25 ms) long; the label
  stream's convolutional window is 945 samples (59 ms), and its causal context network also looks
  further back. So label ``j`` and wav2vec 2.0 frame ``j`` start at the same sample, but their
  window centres differ by (945 - 400) / 2 = 272.5 samples (17 ms, less than one frame). No shift
  of whole frames fixes that; index-by-index pairing is the best whole-frame alignment.
- For ``L`` samples the label stream has ``(L - 945) // 320 + 1`` frames and wav2vec 2.0
  ``(L - 400) // 320 + 1``: one or two fewer labels. ``align_labels`` pads the tail with the
  ignore index (or cuts, should labels be longer), as the original does.
- When audio is cropped, labels must be cropped at the frame where the crop starts:
  ``start_sample // 320``. That is exact when the crop starts on a multiple of 320 samples (which
  ``ser.data.datasets.FrameLabelDataset`` ensures); otherwise the label windows start up to
  319 samples before the cropped audio's windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

from ser.errors import SerInputError

W2V2_CONV_KERNELS = (10, 3, 3, 3, 3, 2, 2)
W2V2_CONV_STRIDES = (5, 2, 2, 2, 2, 2, 2)

# wav2vec 1.0's feature extractor (10 ms frames), then phase 1's Conv1d(k=4, s=2) to 20 ms. The
# context network between them is causal and keeps the length, so it adds nothing here.
W2V1_CONV_KERNELS = (10, 8, 4, 4, 4)
W2V1_CONV_STRIDES = (5, 4, 2, 2, 2)
LABEL_CONV_KERNELS = (*W2V1_CONV_KERNELS, 4)
LABEL_CONV_STRIDES = (*W2V1_CONV_STRIDES, 2)

FRAME_HOP = 320  # samples per wav2vec 2.0 frame (and per label frame) at 16 kHz
IGNORE_INDEX = -100  # the cross-entropy ignore index of torch and transformers

Length = TypeVar("Length", int, torch.Tensor)


def _check_stack(kernels: Sequence[int], strides: Sequence[int]) -> None:
    if len(kernels) != len(strides) or not kernels:
        raise SerInputError(
            f"kernels {tuple(kernels)} and strides {tuple(strides)} must be non-empty and of "
            "equal length (one of each per convolution)"
        )
    if min(kernels) < 1 or min(strides) < 1:
        raise SerInputError(f"kernels {tuple(kernels)} and strides {tuple(strides)} must be >= 1")


def conv_output_length(
    num_samples: Length,
    kernels: Sequence[int] = W2V2_CONV_KERNELS,
    strides: Sequence[int] = W2V2_CONV_STRIDES,
) -> Length:
    """Frames out of a stack of unpadded 1-d convolutions for ``num_samples`` input samples.

    Applies ``(L - kernel) // stride + 1`` layer by layer, like torch's Conv1d and transformers'
    ``Wav2Vec2Model._get_feat_extract_output_lengths``, but returns 0 (where transformers goes
    negative) for inputs shorter than the receptive field. Works on ints and integer tensors
    (elementwise).
    """
    _check_stack(kernels, strides)
    length = num_samples
    for kernel, stride in zip(kernels, strides, strict=True):
        if isinstance(length, torch.Tensor):
            length = torch.clamp(
                torch.div(length - kernel, stride, rounding_mode="floor") + 1, min=0
            )
        else:
            length = max((int(length) - kernel) // stride + 1, 0)
    return length


def receptive_field(
    kernels: Sequence[int] = W2V2_CONV_KERNELS, strides: Sequence[int] = W2V2_CONV_STRIDES
) -> int:
    """Input samples one output frame of the convolution stack reads (400 for wav2vec 2.0)."""
    _check_stack(kernels, strides)
    field, jump = 1, 1
    for kernel, stride in zip(kernels, strides, strict=True):
        field += (kernel - 1) * jump
        jump *= stride
    return field


def label_frame_count(num_samples: int) -> int:
    """Pseudo-labels P-TAPT's phase-1 model produces for ``num_samples`` samples (20 ms frames)."""
    return conv_output_length(num_samples, LABEL_CONV_KERNELS, LABEL_CONV_STRIDES)


def align_labels(labels: Sequence[int], num_frames: int, pad: int = IGNORE_INDEX) -> list[int]:
    """Labels padded at the end with ``pad``, or cut, to exactly ``num_frames`` entries.

    Label ``j`` is paired with wav2vec 2.0 frame ``j``: both windows start at sample ``320 * j``
    (see the module docstring for how far their centres differ). The label stream is one or two
    frames shorter than wav2vec 2.0's, so the tail is normally padded with the ignore index.
    """
    if num_frames < 0:
        raise SerInputError(f"num_frames must be >= 0, got {num_frames}")
    kept = [int(label) for label in labels[:num_frames]]
    return kept + [pad] * (num_frames - len(kept))


def crop_frames(
    start_sample: int,
    num_samples: int,
    *,
    hop: int = FRAME_HOP,
    kernels: Sequence[int] = W2V2_CONV_KERNELS,
    strides: Sequence[int] = W2V2_CONV_STRIDES,
) -> tuple[int, int]:
    """Label frame range ``(first, stop)`` for audio cropped to ``[start_sample, start_sample +
    num_samples)``.

    ``first = start_sample // hop`` and ``stop - first`` is the number of wav2vec 2.0 frames of
    the cropped audio, so ``labels[first:stop]`` pairs with the crop's frames one to one. The
    pairing is exact when ``start_sample`` is a multiple of ``hop``; otherwise each label window
    starts ``start_sample % hop`` samples before the matching frame of the crop.
    """
    if start_sample < 0 or num_samples < 0:
        raise SerInputError(
            f"start_sample ({start_sample}) and num_samples ({num_samples}) must be >= 0"
        )
    if hop < 1:
        raise SerInputError(f"hop must be >= 1, got {hop}")
    first = start_sample // hop
    return first, first + conv_output_length(num_samples, kernels, strides)


def crop_labels(
    labels: Sequence[int], start_sample: int, num_samples: int, pad: int = IGNORE_INDEX
) -> list[int]:
    """The labels of an audio crop, aligned to wav2vec 2.0's frame count of the crop."""
    first, stop = crop_frames(start_sample, num_samples)
    return align_labels(labels[first:stop], stop - first, pad)
