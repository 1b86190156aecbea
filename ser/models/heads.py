"""Heads on a backbone of any family (``ser.models.backbones``: wav2vec 2.0, HuBERT, WavLM,
data2vec-audio): the utterance classifier and phase 2's frame-cluster heads.

As in the original, neither gives the backbone's mask embedding (``masked_spec_embed``) to the
optimizer by default: FT-w2v2-ser replaced masked frames under ``torch.no_grad()``, so that
embedding never trained. ``train_mask_embedding=True`` trains it too. Fine-tuning's classifier
draws time masks per batch from the padded length, as the original (``time_masking="batch"``,
:func:`ser.models.masking.batch_time_mask`), or per utterance (``"utterance"``), and always masks
at least one channel span (``feature_min_masks=1``, the original's ``min_masks=1``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ser.config import TIME_MASKINGS
from ser.errors import SerInputError
from ser.models.backbones import Backbone
from ser.models.masking import batch_time_mask, feature_mask, time_mask

log = logging.getLogger(__name__)
IGNORE_INDEX = -100  # frames without a cluster label (padding, cut-off ends)
ORIGINAL_FEATURE_SPAN = 64  # channels per feature-mask span in the original (of 768)


class LinearHead(nn.Sequential):
    """Linear -> Tanh -> Linear, the head the original uses in phase 1 and phase 2."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, out_dim))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [B, T, D]`` over every frame where ``mask [B, T]`` is True (RECIPE defect 2:
    the original dropped the last valid frame). A row with no valid frame gives zeros."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    counts = weights.sum(dim=1).clamp(min=1.0)
    return (x * weights).sum(dim=1) / counts


def freeze_feature_encoder(backbone: Backbone) -> None:
    """Freeze the conv feature encoder and the feature projection (RECIPE: phase 2 and
    fine-tuning train only the transformer encoder), on every family."""
    # HubertModel has no freeze_feature_encoder; every family's conv encoder has this, which
    # also clears the flag that makes it track gradients of its input.
    backbone.feature_extractor._freeze_parameters()
    backbone.feature_projection.requires_grad_(False)


def frozen_features(
    backbone: Backbone, input_values: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected features ``[B, T, D]`` computed without autograd, and the frame mask ``[B, T]``
    (True on valid frames) from the sample-level ``attention_mask`` (None: all valid)."""
    with torch.no_grad():
        features = backbone.feature_extractor(input_values).transpose(1, 2)
        hidden = project_features(backbone, features)
    if attention_mask is None:
        frame_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    else:
        frame_mask = backbone._get_feature_vector_attention_mask(hidden.shape[1], attention_mask)
    return hidden, frame_mask.bool()


def project_features(backbone: Backbone, features: torch.Tensor) -> torch.Tensor:
    """The feature projection of conv features ``[B, T, C]``: ``[B, T, D]``."""
    projected = backbone.feature_projection(features)
    # wav2vec2, WavLM and data2vec-audio return (projected, normed input); HuBERT the tensor.
    return projected[0] if isinstance(projected, tuple) else projected


def feature_encoder_sees_padding(backbone: Backbone) -> bool:
    """Whether the conv feature encoder normalises over time (GroupNorm, ``feat_extract_norm
    "group"``: wav2vec2-base, the ``tiny`` preset), so that padding changes valid frames.
    Read off the modules rather than the config, which not every wav2vec2-like model has."""
    return any(isinstance(m, nn.GroupNorm) for m in backbone.feature_extractor.modules())


def encoder_ignores_padding(backbone: Backbone) -> bool:
    """Whether the transformer encoder gives valid frames the same output whatever padding
    follows them under its frame mask. transformers' encoders zero padded frames before the
    positional conv embedding and mask them out of attention; that suffices for a single conv
    (wav2vec2, HuBERT, WavLM), not for a stack of them (data2vec-audio: the first conv's output
    on padded frames is not zero and reaches valid frames through the next). An encoder with
    no ``pos_conv_embed`` is not assumed to ignore padding."""
    positional = getattr(backbone.encoder, "pos_conv_embed", None)
    if positional is None:
        return False
    return sum(isinstance(m, nn.Conv1d) for m in positional.modules()) == 1


def utterance_features(
    backbone: Backbone, input_values: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`frozen_features`, but the conv feature encoder runs on each utterance's own
    samples (``attention_mask``: valid samples first, as ``collate_audio`` pads), so that its
    frames are those of the utterance alone whatever the encoder's norm. The frames are then
    padded with zeros to the padded batch's frame count and projected together."""
    frames = int(backbone._get_feat_extract_output_lengths(torch.tensor(input_values.shape[1])))
    frame_mask = backbone._get_feature_vector_attention_mask(frames, attention_mask).bool()
    samples, counts = attention_mask.sum(-1).tolist(), frame_mask.sum(-1).tolist()
    with torch.no_grad():
        rows = {i: backbone.feature_extractor(input_values[i : i + 1, :n])[0].T
                for i, n in enumerate(samples) if counts[i] > 0}  # [frames_i, C] each
        if not rows:  # no utterance long enough for one frame: as the padded batch would go
            return frozen_features(backbone, input_values, attention_mask)
        first = next(iter(rows.values()))
        features = first.new_zeros(len(samples), frames, first.shape[1])
        for i, row in rows.items():
            features[i, : len(row)] = row
        return project_features(backbone, features), frame_mask


def ensure_mask_embedding(backbone: Backbone) -> nn.Parameter:
    """The backbone's learned mask embedding; transformers builds it only when the config's mask
    probabilities are positive, so a model saved with both at 0 gets a fresh one here."""
    if getattr(backbone, "masked_spec_embed", None) is None:
        log.warning(
            "backbone has no mask embedding (its config's mask_time_prob and mask_feature_prob "
            "are 0); adding a freshly initialised one and setting mask_time_prob=0.05 so that "
            "saved models load back with it"
        )
        backbone.masked_spec_embed = nn.Parameter(
            torch.rand(backbone.config.hidden_size, device=backbone.device)
        )
        backbone.config.mask_time_prob = 0.05
    return backbone.masked_spec_embed


def feature_span(channels: int) -> int:
    """The channel-mask span for a backbone of ``channels``: the original's 64 (of
    wav2vec2-base's 768), or the same share of a narrower model's (test presets), so that one
    span never blanks every channel."""
    return min(ORIGINAL_FEATURE_SPAN, max(channels * ORIGINAL_FEATURE_SPAN // 768, 1))


def optimised_parameters(
    model: nn.Module, backbone: Backbone, train_mask_embedding: bool
) -> list[nn.Parameter]:
    """``model``'s parameters that require grad, the mask embedding left out unless
    ``train_mask_embedding`` (it may be created after the constructor froze it, see
    :func:`ensure_mask_embedding`, so it is excluded by identity too)."""
    embed = getattr(backbone, "masked_spec_embed", None)
    return [p for p in model.parameters()
            if p.requires_grad and (train_mask_embedding or p is not embed)]


def set_mask_embedding_trainable(backbone: Backbone, trainable: bool) -> None:
    """Freeze or unfreeze the mask embedding (when the backbone has one): frozen, it gets no
    gradient at all, as under the original's ``no_grad`` masking."""
    embed = getattr(backbone, "masked_spec_embed", None)
    if embed is not None:
        embed.requires_grad_(trainable)


def apply_time_mask(
    backbone: Backbone, hidden: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Replace the frames where ``mask [B, T]`` is True by the backbone's mask embedding."""
    embed = ensure_mask_embedding(backbone).to(hidden.dtype)
    return torch.where(mask.unsqueeze(-1), embed, hidden)


class UtteranceClassifier(nn.Module):
    """Fine-tuning model: backbone -> ReLU -> mean over valid frames -> ReLU -> Linear.

    The conv feature encoder and feature projection are frozen and run without autograd; only
    the transformer encoder and the output layer train, plus the mask embedding with
    ``train_mask_embedding=True`` (the original never trained it; see
    :meth:`trainable_parameters`). In training mode SpecAugment is applied as RECIPE describes:
    time masks on valid frames with the mask embedding (``time_masking``: ``"batch"``, the
    original's span count per batch from the padded length, or ``"utterance"``, per utterance
    from its own length; see ``ser.models.masking``), channel masks set to 0 (at least
    ``feature_min_masks`` spans per utterance; the original: 1) of ``feature_mask_span``
    channels (default: :func:`feature_span`, 64 on wav2vec2-base).

    In eval mode padding does not change an utterance's logits, so evaluation may batch: where
    the conv feature encoder normalises over time (wav2vec2-base's group norm, whose statistics
    would run over the padded time axis), it runs on each utterance alone
    (:func:`utterance_features`) and the rest of the backbone batched under the frame mask (or
    also one utterance at a time where the encoder does not ignore padding:
    :func:`encoder_ignores_padding`). In training the padded batch goes through the group norm,
    as the original trained.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        time_mask_prob: float = 0.08,
        time_mask_span: int = 15,
        time_min_masks: int = 2,
        feature_mask_prob: float = 0.05,
        feature_mask_span: int | None = None,
        feature_min_masks: int = 1,
        time_masking: str = "batch",
        train_mask_embedding: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise SerInputError(f"UtteranceClassifier needs at least 2 classes, got {num_classes}")
        if time_masking not in TIME_MASKINGS:
            raise SerInputError(
                f"time_masking must be one of {TIME_MASKINGS}, got {time_masking!r}"
            )
        self.backbone = backbone
        freeze_feature_encoder(backbone)
        if time_mask_prob > 0:
            ensure_mask_embedding(backbone)
        set_mask_embedding_trainable(backbone, train_mask_embedding)
        self.output = nn.Linear(backbone.config.hidden_size, num_classes)
        self.time_mask = (time_mask_prob, time_mask_span, time_min_masks)
        span = (feature_mask_span if feature_mask_span is not None
                else feature_span(backbone.config.hidden_size))
        self.feature_mask = (feature_mask_prob, span, feature_min_masks)
        self.time_masking = time_masking
        self.train_mask_embedding = train_mask_embedding

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to give the optimizer: the frozen feature encoder left out, and the
        mask embedding too unless ``train_mask_embedding``."""
        return optimised_parameters(self, self.backbone, self.train_mask_embedding)

    def draw_time_mask(self, frame_mask: torch.Tensor) -> torch.Tensor:
        """Training time masks ``[B, T]`` in the ``time_masking`` style, on the valid frames of
        ``frame_mask [B, T]`` only."""
        draw = batch_time_mask if self.time_masking == "batch" else time_mask
        mask = draw(frame_mask.sum(1), frame_mask.shape[1], *self.time_mask)
        return mask.to(frame_mask.device) & frame_mask

    def draw_feature_mask(self, batch: int, channels: int) -> torch.Tensor:
        """Training channel masks ``[batch, channels]``, one row per utterance."""
        return feature_mask(batch, channels, *self.feature_mask)

    def features(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected features ``[B, T, D]`` and frame mask ``[B, T]``; in eval mode those of
        each utterance alone, whatever the batch's padding (see the class docstring)."""
        if (not self.training and attention_mask is not None
                and feature_encoder_sees_padding(self.backbone)):
            return utterance_features(self.backbone, input_values, attention_mask)
        return frozen_features(self.backbone, input_values, attention_mask)

    def encode(self, hidden: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """The transformer encoder's output ``[B, T, D]``; in eval mode, with an encoder that
        does not ignore padding (:func:`encoder_ignores_padding`), each utterance's alone (its
        padded frames zero)."""
        encoder = self.backbone.encoder
        if self.training or encoder_ignores_padding(self.backbone):
            return encoder(hidden, attention_mask=frame_mask).last_hidden_state
        encoded = torch.zeros_like(hidden)
        for i, n in enumerate(frame_mask.sum(1).tolist()):
            if n == 0:  # an utterance shorter than one frame: nothing to encode
                continue
            encoded[i, :n] = encoder(hidden[i : i + 1, :n],
                                     attention_mask=frame_mask[i : i + 1, :n]).last_hidden_state[0]
        return encoded

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mask_time_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, num_classes]``. ``mask_time_indices`` overrides the drawn time masks."""
        hidden, frame_mask = self.features(input_values, attention_mask)
        if mask_time_indices is None and self.training and self.time_mask[0] > 0:
            mask_time_indices = self.draw_time_mask(frame_mask)
        if mask_time_indices is not None:
            hidden = apply_time_mask(self.backbone, hidden, mask_time_indices & frame_mask)
        if self.training and self.feature_mask[0] > 0:
            channels = self.draw_feature_mask(hidden.shape[0], hidden.shape[2])
            hidden = hidden.masked_fill(channels.to(hidden.device).unsqueeze(1), 0.0)
        encoded = self.encode(hidden, frame_mask)
        pooled = masked_mean(torch.relu(encoded), frame_mask)
        return self.output(torch.relu(pooled))


class FrameClusterHeads(nn.Module):
    """P-TAPT phase 2: predict each masked frame's k-means cluster, one head per cluster count.

    Time masks (p=0.06, span 15, at least 2, valid frames, mask embedding) are drawn in eval
    mode too, because the loss is defined on masked frames only; no channel masking. The mask
    embedding trains only with ``train_mask_embedding=True`` (the original never trained it).
    """

    def __init__(
        self,
        backbone: Backbone,
        cluster_counts: list[int],
        head_dim: int = 256,
        time_mask_prob: float = 0.06,
        time_mask_span: int = 15,
        time_min_masks: int = 2,
        train_mask_embedding: bool = False,
    ) -> None:
        super().__init__()
        if not cluster_counts or min(cluster_counts) < 2:
            raise SerInputError(
                f"FrameClusterHeads needs cluster counts of at least 2, got {cluster_counts}"
            )
        self.backbone = backbone
        freeze_feature_encoder(backbone)
        ensure_mask_embedding(backbone)
        set_mask_embedding_trainable(backbone, train_mask_embedding)
        self.train_mask_embedding = train_mask_embedding
        self.cluster_counts = list(cluster_counts)
        hidden = backbone.config.hidden_size
        self.heads = nn.ModuleList(LinearHead(hidden, head_dim, k) for k in cluster_counts)
        self.time_mask = (time_mask_prob, time_mask_span, time_min_masks)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to give the optimizer: the frozen feature encoder left out, and the
        mask embedding too unless ``train_mask_embedding``."""
        return optimised_parameters(self, self.backbone, self.train_mask_embedding)

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        frame_labels: torch.Tensor,
        mask_time_indices: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``frame_labels [B, K, F]`` (one row per cluster count, -100 = no label; F is padded
        with -100 or cut to the model's frame count). Returns ``loss`` (sum over heads),
        ``losses`` and ``accuracies`` (``[K]``, on the masked labelled frames) and
        ``masked_frames`` (how many frames were masked)."""
        if frame_labels.dim() != 3 or frame_labels.shape[1] != len(self.heads):
            raise SerInputError(
                f"frame_labels must be [batch, {len(self.heads)}, frames] (one row per cluster "
                f"count {self.cluster_counts}), got shape {list(frame_labels.shape)}"
            )
        hidden, frame_mask = frozen_features(self.backbone, input_values, attention_mask)
        if mask_time_indices is None:
            mask_time_indices = time_mask(frame_mask.sum(1), hidden.shape[1], *self.time_mask)
        masked = mask_time_indices.to(frame_mask.device) & frame_mask
        hidden = apply_time_mask(self.backbone, hidden, masked)
        encoded = self.backbone.encoder(hidden, attention_mask=frame_mask).last_hidden_state
        encoded = torch.relu(encoded)
        labels = _fit_frames(frame_labels.to(encoded.device), encoded.shape[1])
        losses, accuracies = [], []
        for k, head in enumerate(self.heads):
            target = labels[:, k].masked_fill(~masked, IGNORE_INDEX)
            loss, accuracy = _masked_cross_entropy(head(encoded), target)
            losses.append(loss)
            accuracies.append(accuracy)
        stacked = torch.stack(losses)
        return {
            "loss": stacked.sum(),
            "losses": stacked.detach(),
            "accuracies": torch.stack(accuracies),
            "masked_frames": masked.sum(),
        }


def _fit_frames(labels: torch.Tensor, frames: int) -> torch.Tensor:
    """Cut ``labels [B, K, F]`` to ``frames`` or pad them with IGNORE_INDEX."""
    if labels.shape[2] >= frames:
        return labels[:, :, :frames].long()
    pad = labels.new_full((*labels.shape[:2], frames - labels.shape[2]), IGNORE_INDEX)
    return torch.cat([labels, pad], dim=2).long()


def _masked_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy over frames whose target is not IGNORE_INDEX; zero loss
    (still attached to the graph) when there is none."""
    flat_logits, flat_target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    valid = flat_target != IGNORE_INDEX
    if not bool(valid.any()):
        zero = flat_logits.sum() * 0.0
        return zero, zero.detach()
    loss = F.cross_entropy(flat_logits, flat_target, ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        correct = (flat_logits[valid].argmax(-1) == flat_target[valid]).float().mean()
    return loss, correct
