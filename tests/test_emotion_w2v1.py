"""P-TAPT phase 1's wav2vec 1.0 emotion model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from ser.errors import SerInputError
from ser.models.emotion_w2v1 import EmotionWav2Vec1, w2v1_frames_20ms
from ser.models.wav2vec1 import Wav2Vec1Config, Wav2Vec1Model, load_wav2vec1

SR = 16_000
FIXTURES = Path(__file__).parent / "fixtures"


def _model(num_classes: int = 4, seed: int = 0) -> EmotionWav2Vec1:
    torch.manual_seed(seed)
    return EmotionWav2Vec1(load_wav2vec1("tiny"), num_classes)


def test_extractor_is_frozen_and_not_trainable() -> None:
    model = EmotionWav2Vec1.from_wav2vec1(FIXTURES / "fairseq_w2v1_tiny.pt", num_classes=4)
    model.train()
    assert not model.wav2vec1.feature_extractor.training
    out = model(torch.randn(2, 8000))
    model.loss(out, torch.tensor([0, 1])).backward()
    extractor = list(model.wav2vec1.feature_extractor.parameters())
    assert extractor and all(p.grad is None for p in extractor)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert not trainable & {id(p) for p in extractor}
    assert trainable | {id(p) for p in extractor} == {id(p) for p in model.parameters()}
    aggregator = list(model.wav2vec1.feature_aggregator.parameters())
    assert all(id(p) in trainable and p.grad is not None for p in aggregator)


@pytest.mark.parametrize("lengths", [[16000, 8000, 1600], [945, 945], [40000, 3200]])
def test_shapes_and_frame_counts(lengths: list[int]) -> None:
    model = _model().eval()
    wav = torch.randn(len(lengths), max(lengths))
    with torch.no_grad():
        out = model(wav, torch.tensor(lengths))
    frames = out["features"].size(1)
    assert frames == w2v1_frames_20ms(max(lengths), model.wav2vec1.config)
    assert out["features"].shape == (len(lengths), frames, model.feature_dim)
    assert out["frame_logits"].shape == (len(lengths), frames, 4)
    assert out["utterance_logits"].shape == (len(lengths), 4)
    assert out["frame_mask"].sum(1).tolist() == [w2v1_frames_20ms(n) for n in lengths]


def test_frame_formula_matches_the_convolutions() -> None:
    model = _model().eval()
    for samples in (model.min_samples, 1000, 4321, 16000, 16320):
        with torch.no_grad():
            frames = model(torch.randn(1, samples))["features"].size(1)
        assert frames == w2v1_frames_20ms(samples, model.wav2vec1.config) >= 1
    assert model.min_samples == 945  # 30 ms receptive field + 3 more 10 ms hops
    assert w2v1_frames_20ms(model.min_samples - 1) == 0
    # One second gives 48 frames (wav2vec 2.0 gives 49): the approximate alignment of defect 7.
    assert w2v1_frames_20ms(SR) == 48
    assert w2v1_frames_20ms(torch.tensor([SR, 2 * SR])).tolist() == [48, 98]


def test_attention_mask_equals_lengths() -> None:
    model = _model().eval()
    wav = torch.randn(2, 8000)
    mask = torch.zeros(2, 8000, dtype=torch.long)
    mask[0], mask[1, :5000] = 1, 1
    with torch.no_grad():
        by_mask = model(wav, attention_mask=mask)
        by_lengths = model(wav, torch.tensor([8000, 5000]))
    assert torch.equal(by_mask["utterance_logits"], by_lengths["utterance_logits"])
    with pytest.raises(SerInputError, match="either lengths or attention_mask"):
        model(wav, torch.tensor([8000, 5000]), attention_mask=mask)


def test_spec_augment_masks_valid_frames_in_training_only() -> None:
    model = _model()
    seen: list[torch.Tensor] = []
    model.wav2vec1.feature_aggregator.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().clone())
    )
    lengths = torch.tensor([16000, 6000])
    wav = torch.randn(2, 16000)
    wav[1, 6000:] = 0
    valid = model.wav2vec1.num_frames(lengths)
    model.eval()
    with torch.no_grad():
        model(wav, lengths)
    model.train()
    torch.manual_seed(1)
    model(wav, lengths)
    clean, masked = seen
    zeroed_frames = (masked == 0).all(dim=1)  # [B, T]: frames whose every channel is 0
    assert not (clean == 0).all(dim=1).any()
    for row in range(2):
        hits = zeroed_frames[row].nonzero().flatten()
        assert len(hits) >= 2 and hits.max() < valid[row]
    zeroed_channels = (masked == 0).all(dim=2)  # [B, C]
    assert zeroed_channels.sum(1).tolist() == [model.feature_mask_span] * 2


def test_a_very_short_item_in_a_batch_trains() -> None:
    # RECIPE defect 5: a clip shorter than a time-mask span crashed the original's masking.
    model = _model().train()
    lengths = torch.tensor([16000, 1000])  # 1000 samples: 5 frames at 10 ms, 1 at 20 ms
    out = model(torch.randn(2, 16000), lengths)
    assert out["frame_mask"].sum(1).tolist() == [48, 1]
    loss = model.loss(out, torch.tensor([1, 2]))
    loss.backward()
    assert math.isfinite(loss.item())
    # A whole batch shorter than a mask span, as when cropped to its shortest item.
    short = model(torch.randn(3, 1000))
    assert short["frame_mask"].all()


def test_clips_too_short_for_one_frame_are_named() -> None:
    model = _model()
    with pytest.raises(SerInputError, match=r"\(1, 900\).*945 samples"):
        model(torch.randn(2, 16000), torch.tensor([16000, 900]))


def test_loss_is_weighted_ce_of_utterances_plus_valid_frames() -> None:
    model = _model().eval()
    lengths = torch.tensor([16000, 4000])
    with torch.no_grad():
        out = model(torch.randn(2, 16000), lengths)
    labels = torch.tensor([3, 0])
    weights = torch.tensor([0.4, 0.1, 0.2, 0.3])
    frames = [w2v1_frames_20ms(int(n)) for n in lengths]
    frame_logits = torch.cat([out["frame_logits"][i, :n] for i, n in enumerate(frames)])
    frame_labels = torch.cat([labels[i].repeat(n) for i, n in enumerate(frames)])
    expected = F.cross_entropy(out["utterance_logits"], labels, weight=weights) + F.cross_entropy(
        frame_logits, frame_labels, weight=weights
    )
    assert torch.allclose(model.loss(out, labels, weights), expected)
    assert not torch.allclose(model.loss(out, labels), expected)
    with pytest.raises(SerInputError, match="class indices"):
        model.loss(out, torch.tensor([0, 4]))
    with pytest.raises(SerInputError, match="class_weights"):
        model.loss(out, labels, torch.ones(3))


def test_loss_decreases_on_a_toy_batch() -> None:
    model = _model(num_classes=2, seed=0)
    t = torch.arange(6000) / SR
    low, high = torch.sin(2 * math.pi * 150 * t), torch.sin(2 * math.pi * 1200 * t)
    wav = 0.5 * torch.stack([low, high, low * 0.7, high * 0.7])
    labels = torch.tensor([0, 1, 0, 1])
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model.loss(model(wav), labels).item()

    before = eval_loss()
    torch.manual_seed(0)
    for _ in range(15):
        model.train()
        loss = model.loss(model(wav), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert eval_loss() < 0.8 * before


def test_extract_features_ignores_padding_and_masking() -> None:
    model = _model().train()
    clip = torch.randn(1, 5000)
    batch = torch.zeros(2, 16000)
    batch[0] = torch.randn(16000)
    batch[1, :5000] = clip
    first = model.extract_features(batch, torch.tensor([16000, 5000]))
    again = model.extract_features(clip)
    assert model.training and not model.wav2vec1.feature_extractor.training
    assert [f.shape for f in first] == [(48, 16), (w2v1_frames_20ms(5000), 16)]
    assert torch.allclose(first[1], again[0], atol=1e-6)
    assert all(f.dtype == torch.float32 and not f.requires_grad for f in first)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(clip)["features"][0], again[0])


def test_dimensions_follow_the_backbone() -> None:
    config = Wav2Vec1Config(
        conv_feature_layers=[(8, 10, 5), (8, 8, 4), (8, 4, 2), (8, 4, 2), (8, 4, 2)],
        conv_aggregator_layers=[(8, 2, 1), (12, 3, 1)],
    )
    model = EmotionWav2Vec1(Wav2Vec1Model(config), num_classes=3)
    assert model.feature_dim == 12
    assert model.lstm.hidden_size == 6
    assert model.feature_mask_span == 1  # 8 extractor channels / 8
    out = model(torch.randn(2, 4000))
    assert out["features"].size(-1) == 12 and out["utterance_logits"].shape == (2, 3)
    with pytest.raises(SerInputError, match="num_classes"):
        EmotionWav2Vec1(Wav2Vec1Model(config), num_classes=1)
