from __future__ import annotations

import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from ser.data.frames import (
    FRAME_HOP,
    LABEL_CONV_KERNELS,
    LABEL_CONV_STRIDES,
    W2V2_CONV_KERNELS,
    W2V2_CONV_STRIDES,
    align_labels,
    conv_output_length,
    crop_frames,
    crop_labels,
    label_frame_count,
    receptive_field,
)
from ser.errors import SerInputError

LENGTHS = [400, 401, 719, 720, 721, 1000, 16000, 16319, 16320, 24321, 48000, 160000, 160001]


@pytest.fixture(scope="module")
def tiny_wav2vec2() -> Wav2Vec2Model:
    config = Wav2Vec2Config(
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=8,
        conv_dim=(4,) * 7,
        num_conv_pos_embeddings=2,
        num_conv_pos_embedding_groups=1,
    )
    return Wav2Vec2Model(config).eval()


def first_sample_stack(kernels: tuple[int, ...], strides: tuple[int, ...]) -> torch.nn.Sequential:
    """Convolutions whose output frame equals the first input sample of its window."""
    layers = []
    for kernel, stride in zip(kernels, strides, strict=True):
        conv = torch.nn.Conv1d(1, 1, kernel, stride, bias=False).double()
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0, 0] = 1.0
        layers.append(conv)
    return torch.nn.Sequential(*layers)


def test_matches_transformers_formula_for_many_lengths(tiny_wav2vec2: Wav2Vec2Model) -> None:
    assert tuple(tiny_wav2vec2.config.conv_kernel) == W2V2_CONV_KERNELS
    assert tuple(tiny_wav2vec2.config.conv_stride) == W2V2_CONV_STRIDES
    lengths = torch.arange(400, 50_000, 37)
    expected = tiny_wav2vec2._get_feat_extract_output_lengths(lengths)
    assert torch.equal(conv_output_length(lengths), expected)
    for length in LENGTHS:
        assert conv_output_length(length) == int(
            tiny_wav2vec2._get_feat_extract_output_lengths(length)
        )


def test_matches_the_real_feature_encoder(tiny_wav2vec2: Wav2Vec2Model) -> None:
    for length in (400, 721, 16000, 16321):
        with torch.no_grad():
            features = tiny_wav2vec2.feature_extractor(torch.zeros(1, length))
        assert features.shape[-1] == conv_output_length(length)


def test_inputs_shorter_than_the_receptive_field_give_zero(tiny_wav2vec2: Wav2Vec2Model) -> None:
    short = torch.arange(0, 400)
    assert torch.all(conv_output_length(short) == 0)
    assert torch.all(tiny_wav2vec2._get_feat_extract_output_lengths(short) <= 0)
    assert conv_output_length(399) == 0 and conv_output_length(400) == 1


def test_label_stream_counts_match_real_convolutions() -> None:
    stack = first_sample_stack(LABEL_CONV_KERNELS, LABEL_CONV_STRIDES)
    assert label_frame_count(944) == 0
    for length in [945, *LENGTHS[6:]]:
        with torch.no_grad():
            frames = stack(torch.zeros(1, 1, length, dtype=torch.float64)).shape[-1]
        assert label_frame_count(length) == frames


def test_receptive_fields_and_closed_form_counts() -> None:
    assert receptive_field() == 400
    assert receptive_field(LABEL_CONV_KERNELS, LABEL_CONV_STRIDES) == 945
    for length in range(945, 60_000, 53):
        assert conv_output_length(length) == (length - 400) // FRAME_HOP + 1
        assert label_frame_count(length) == (length - 945) // FRAME_HOP + 1
        # the label stream is one or two frames shorter than wav2vec 2.0's
        assert conv_output_length(length) - label_frame_count(length) in (1, 2)


def test_align_labels_pads_or_cuts() -> None:
    assert align_labels([1, 2, 3], 5) == [1, 2, 3, -100, -100]
    assert align_labels([1, 2, 3], 2) == [1, 2]
    assert align_labels([1, 2, 3], 3) == [1, 2, 3]
    assert align_labels([], 2, pad=7) == [7, 7]
    assert align_labels([4], 0) == []
    with pytest.raises(SerInputError, match="num_frames"):
        align_labels([1], -1)


@pytest.mark.parametrize("start", [0, 320, 3200, 12_800])
@pytest.mark.parametrize("crop", [400, 7_000, 32_000])
def test_cropped_labels_start_where_the_crop_frames_start(start: int, crop: int) -> None:
    """Label frame first+j and crop frame j read windows that begin at the same sample."""
    audio = torch.arange(48_000, dtype=torch.float64).view(1, 1, -1)
    with torch.no_grad():
        label_starts = first_sample_stack(LABEL_CONV_KERNELS, LABEL_CONV_STRIDES)(audio)
        crop_starts = first_sample_stack(W2V2_CONV_KERNELS, W2V2_CONV_STRIDES)(
            audio[..., start : start + crop]
        )
    first, stop = crop_frames(start, crop)
    assert first == start // FRAME_HOP
    assert stop - first == crop_starts.shape[-1] == conv_output_length(crop)
    labels = label_starts.flatten().long().tolist()
    aligned = crop_labels(labels, start, crop)
    expected = (crop_starts.flatten().long()).tolist()
    real = [label for label in aligned if label != -100]
    assert real == expected[: len(real)]
    assert len(real) >= len(expected) - 2  # at most the last two frames lack a label


def test_crop_frames_rejects_negative_input() -> None:
    with pytest.raises(SerInputError, match="start_sample"):
        crop_frames(-1, 400)
    with pytest.raises(SerInputError, match="kernels"):
        conv_output_length(400, (10, 3), (5,))
