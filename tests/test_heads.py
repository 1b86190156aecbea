"""Heads: pooling over every valid frame, the frozen feature encoder, padding invariance,
SpecAugment only in training and on valid frames, and phase 2's loss on masked frames only."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Model

from ser.errors import SerInputError
from ser.models import heads
from ser.models.backbones import preset_config
from ser.models.heads import FrameClusterHeads, LinearHead, UtteranceClassifier, masked_mean

NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
              "feat_proj_dropout": 0.0}
# Layer norm in every conv layer: frames do not depend on padding (group norm's statistics do,
# so in eval mode the classifier runs a group-norm conv stack per utterance).
LAYER_NORM_CONVS = {"feat_extract_norm": "layer", "do_stable_layer_norm": True}


def _backbone(seed: int = 0, **overrides: object) -> Wav2Vec2Model:
    torch.manual_seed(seed)
    return Wav2Vec2Model(preset_config("tiny", **{**NO_DROPOUT, **overrides}))


def _batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    wav = torch.randn(len(lengths), max(lengths), generator=gen)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return wav * mask, mask


def test_linear_head_is_linear_tanh_linear() -> None:
    head = LinearHead(8, 5, 3)
    x = torch.randn(4, 8)
    first, second = head[0], head[2]
    expected = second(torch.tanh(first(x)))
    assert torch.allclose(head(x), expected)
    assert (first.in_features, first.out_features, second.out_features) == (8, 5, 3)


def test_masked_mean_includes_the_last_valid_frame() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(2, 6, 1) ** 2
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    pooled = masked_mean(x, mask)
    assert torch.allclose(pooled[:, 0], torch.stack([x[0, :3].mean(), x[1, :5].mean()]))
    # The original pooled x[:length - 1] (RECIPE defect 2): a different number.
    original = torch.stack([x[0, :2].mean(), x[1, :4].mean()])
    assert not torch.allclose(pooled[:, 0], original)


def test_masked_mean_of_an_empty_row_is_zero_not_nan() -> None:
    pooled = masked_mean(torch.randn(2, 4, 3), torch.tensor([[True] * 4, [False] * 4]))
    assert torch.equal(pooled[1], torch.zeros(3))


@pytest.mark.parametrize("train_embedding", [False, True])
def test_classifier_trains_encoder_and_head_only(train_embedding: bool) -> None:
    model = UtteranceClassifier(_backbone(), num_classes=4,
                                train_mask_embedding=train_embedding).train()
    wav, mask = _batch([16000, 12000])
    model(wav, mask).sum().backward()
    frozen = {n for n, _ in model.named_parameters()
              if n.startswith(("backbone.feature_extractor.", "backbone.feature_projection."))}
    assert frozen
    if not train_embedding:  # the original never trained it (masked under no_grad)
        frozen.add("backbone.masked_spec_embed")
    trainable = {id(p) for p in model.trainable_parameters()}
    for name, param in model.named_parameters():
        if name in frozen:
            assert param.grad is None and id(param) not in trainable, name
        else:
            # Every other parameter is used (RECIPE defect 1: an unused BiLSTM was optimised).
            assert param.grad is not None and id(param) in trainable, name
    embed = model.backbone.masked_spec_embed
    assert (id(embed) in trainable) == embed.requires_grad == train_embedding


def test_classifier_draws_time_masks_in_the_chosen_style(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("batch_time_mask", "time_mask"):
        real = getattr(heads, name)

        def spy(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> torch.Tensor:
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(heads, name, spy)
    wav, mask = _batch([16000, 8000])
    UtteranceClassifier(_backbone(), num_classes=2).train()(wav, mask)
    assert calls == ["batch_time_mask"]  # the original's style is the default
    UtteranceClassifier(_backbone(), num_classes=2, time_masking="utterance").train()(wav, mask)
    assert calls == ["batch_time_mask", "time_mask"]
    with pytest.raises(SerInputError, match="time_masking must be one of"):
        UtteranceClassifier(_backbone(), num_classes=2, time_masking="frame")


def test_classifier_time_masks_stay_on_valid_frames() -> None:
    model = UtteranceClassifier(_backbone(), num_classes=2, time_mask_prob=0.5)
    frames = torch.arange(200)[None] < torch.tensor([[200], [30], [5]])
    for seed in range(20):
        torch.manual_seed(seed)
        drawn = model.draw_time_mask(frames)
        assert drawn.shape == (3, 200) and not (drawn & ~frames).any()
        assert drawn[0].any()


def test_classifier_masks_at_least_one_channel_span_per_utterance() -> None:
    model = UtteranceClassifier(_backbone(), num_classes=2)
    for seed in range(20):
        torch.manual_seed(seed)
        assert model.draw_feature_mask(64, 768).any(dim=1).all()


@pytest.mark.parametrize("convs", [{}, LAYER_NORM_CONVS], ids=["group-norm", "layer-norm"])
def test_padding_does_not_change_logits_in_eval_mode(convs: dict[str, object]) -> None:
    # Group norm: eval mode runs the conv feature encoder on each utterance's own samples.
    model = UtteranceClassifier(_backbone(**convs), num_classes=4).eval()
    wav, mask = _batch([16000, 9000, 4800], seed=1)
    with torch.no_grad():
        batched = model(wav, mask)
        alone = torch.cat([model(wav[i:i + 1, :n], mask[i:i + 1, :n])
                           for i, n in enumerate([16000, 9000, 4800])])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_spec_augment_only_in_training() -> None:
    model = UtteranceClassifier(_backbone(), num_classes=4)
    wav, mask = _batch([16000, 16000])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(wav, mask), model(wav, mask))
        model.train()  # no dropout in this backbone: only the masks make runs differ
        torch.manual_seed(1)
        first = model(wav, mask)
        torch.manual_seed(2)
        assert not torch.allclose(first, model(wav, mask))


def test_time_masks_on_padding_are_ignored() -> None:
    model = UtteranceClassifier(_backbone(), num_classes=4).eval()
    wav, mask = _batch([16000, 8000])
    frames = model.backbone._get_feature_vector_attention_mask(49, mask)
    with torch.no_grad():
        plain = model(wav, mask)
        on_padding = model(wav, mask, mask_time_indices=~frames)
        on_valid = model(wav, mask, mask_time_indices=frames & (torch.arange(49) < 10))
    assert torch.equal(plain, on_padding)
    assert not torch.allclose(plain, on_valid)


def test_short_clips_train_without_crashing() -> None:
    # 0.1 s: 4 frames, far below the 15-frame span that crashed the original (RECIPE defect 5).
    model = UtteranceClassifier(_backbone(), num_classes=3).train()
    wav, mask = _batch([1600, 1600])
    logits = model(wav, mask)
    logits.sum().backward()
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_backbone_without_mask_embedding_gets_one(caplog: pytest.LogCaptureFixture) -> None:
    backbone = _backbone(mask_time_prob=0.0)
    assert getattr(backbone, "masked_spec_embed", None) is None
    with caplog.at_level(logging.WARNING):
        model = UtteranceClassifier(backbone, num_classes=2)
    assert "no mask embedding" in caplog.text
    assert model.backbone.masked_spec_embed.shape == (64,)
    assert model.backbone.config.mask_time_prob > 0  # so a saved model loads back with it


def test_classifier_needs_two_classes() -> None:
    with pytest.raises(SerInputError, match="at least 2 classes"):
        UtteranceClassifier(_backbone(), num_classes=1)


# --- FrameClusterHeads ---------------------------------------------------------------------


def _cluster_model(counts: list[int] = [4, 9]) -> FrameClusterHeads:  # noqa: B006
    return FrameClusterHeads(_backbone(), counts).eval()


def _labels(batch: int, counts: list[int], frames: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.randint(0, k, (batch, frames), generator=gen) for k in counts], dim=1
    )


def test_one_head_per_cluster_count() -> None:
    model = _cluster_model([4, 9, 16])
    assert [head[-1].out_features for head in model.heads] == [4, 9, 16]
    wav, mask = _batch([16000, 16000])
    out = model(wav, mask, _labels(2, [4, 9, 16], 49))
    assert out["losses"].shape == (3,) and out["accuracies"].shape == (3,)
    assert torch.allclose(out["loss"], out["losses"].sum())


def test_loss_counts_masked_frames_only() -> None:
    model = _cluster_model()
    wav, mask = _batch([16000, 16000])
    masked = torch.zeros(2, 49, dtype=torch.bool)
    masked[:, 10:25] = True
    labels = _labels(2, [4, 9], 49)
    with torch.no_grad():
        base = model(wav, mask, labels, mask_time_indices=masked)
        changed_unmasked = labels.clone()
        changed_unmasked[:, :, 30:] = (changed_unmasked[:, :, 30:] + 1) % 4
        same = model(wav, mask, changed_unmasked, mask_time_indices=masked)
        changed_masked = labels.clone()
        changed_masked[:, :, 10:25] = (changed_masked[:, :, 10:25] + 1) % 4
        different = model(wav, mask, changed_masked, mask_time_indices=masked)
    assert torch.equal(base["loss"], same["loss"])
    assert not torch.allclose(base["loss"], different["loss"])
    assert int(base["masked_frames"]) == 30


def test_loss_is_cross_entropy_over_labelled_masked_frames() -> None:
    model = _cluster_model()
    wav, mask = _batch([16000, 16000])
    masked = torch.zeros(2, 49, dtype=torch.bool)
    masked[:, 5:20] = True
    labels = _labels(2, [4, 9], 49)
    labels[0, 0, 5:12] = -100  # unlabelled frames inside the mask
    captured: list[torch.Tensor] = []
    hook = model.heads[0].register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        out = model(wav, mask, labels, mask_time_indices=masked)
    hook.remove()
    logits, target = captured[0], labels[:, 0]
    keep = masked & (target != -100)
    expected = F.cross_entropy(logits[keep], target[keep])
    assert torch.allclose(out["losses"][0], expected)
    accuracy = (logits[keep].argmax(-1) == target[keep]).float().mean()
    assert torch.allclose(out["accuracies"][0], accuracy)


def test_all_ignored_labels_give_zero_loss_not_nan() -> None:
    model = _cluster_model()
    wav, mask = _batch([16000])
    labels = torch.full((1, 2, 49), -100)
    out = model(wav, mask, labels)
    assert torch.equal(out["losses"], torch.zeros(2))
    out["loss"].backward()  # still part of the graph


def test_masks_fall_on_valid_frames_and_labels_are_fitted_to_frames() -> None:
    model = _cluster_model()
    wav, mask = _batch([16000, 8000])
    every = torch.ones(2, 49, dtype=torch.bool)
    with torch.no_grad():
        # Labels 3 frames short (padded with -100) or 5 frames long (cut) both work.
        short = model(wav, mask, _labels(2, [4, 9], 46), mask_time_indices=every)
        long = model(wav, mask, _labels(2, [4, 9], 54), mask_time_indices=every)
    assert int(short["masked_frames"]) == 49 + 24  # valid frames of 1 s and 0.5 s
    assert torch.isfinite(long["loss"])


@pytest.mark.parametrize("train_embedding", [False, True])
def test_phase2_trains_encoder_and_heads_only(train_embedding: bool) -> None:
    model = FrameClusterHeads(_backbone(), [4, 9], train_mask_embedding=train_embedding).train()
    wav, mask = _batch([16000, 12000])
    model(wav, mask, _labels(2, [4, 9], 49))["loss"].backward()
    for name, param in model.named_parameters():
        frozen = name.startswith(("backbone.feature_extractor.", "backbone.feature_projection."))
        if name == "backbone.masked_spec_embed":
            frozen = not train_embedding  # as the original, which never trained it
        assert (param.grad is None) == frozen, name
    assert len(model.trainable_parameters()) == sum(
        1 for n, p in model.named_parameters() if p.grad is not None
    )


def test_labels_of_the_wrong_shape_are_refused() -> None:
    model = _cluster_model()
    wav, mask = _batch([16000])
    with pytest.raises(SerInputError, match=r"frame_labels must be \[batch, 2, frames\]"):
        model(wav, mask, torch.zeros(1, 3, 49, dtype=torch.long))
    with pytest.raises(SerInputError, match="cluster counts of at least 2"):
        FrameClusterHeads(_backbone(), [])
