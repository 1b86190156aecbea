"""P-TAPT phase 1's model: wav2vec 1.0 trained to recognise emotion per utterance and per frame.

The frozen wav2vec 1.0 feature extractor gives 10 ms frames; SpecAugment masks them (training
only); the trainable aggregator and a new stride-2 convolution with ReLU give 20 ms frames, the
rate of wav2vec 2.0, whose features are later clustered into pseudo-labels. Two heads train it:
every frame predicts its utterance's emotion, and a BiLSTM averaged over the valid frames predicts
it once per utterance.

GroupNorm in wav2vec 1.0 normalises over the whole input, padding included, so a zero-padded
utterance's features depend on the padding. The original crops every training batch to its
shortest item; :meth:`EmotionWav2Vec1.extract_features` runs one utterance at a time (as the
original's clustering did with batch size 1), so clustering features never see padding.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ser import artifacts
from ser.atomic import atomic_write_json
from ser.checkpoints import read_saved_config, safe_torch_load, save_state_dict
from ser.errors import SerInputError
from ser.models.heads import LinearHead, masked_mean
from ser.models.masking import feature_mask, time_mask
from ser.models.wav2vec1 import (
    Wav2Vec1Config,
    Wav2Vec1Model,
    conv_output_length,
    load_state_dict_strict,
    load_wav2vec1,
)

# The new convolution that halves wav2vec 1.0's frame rate (10 ms -> 20 ms).
DOWNSAMPLE_KERNEL = 4
DOWNSAMPLE_STRIDE = 2


def w2v1_frames_20ms(
    num_samples: torch.Tensor | int, config: Wav2Vec1Config | None = None
) -> torch.Tensor | int:
    """20 ms frames that :class:`EmotionWav2Vec1` gives for ``num_samples`` samples (may be <= 0
    for clips too short to give one); ``config`` defaults to wav2vec_large's structure."""
    layers = (config or Wav2Vec1Config.preset("large")).conv_feature_layers
    frames_10ms = conv_output_length(num_samples, layers)  # the aggregator keeps the count
    return (frames_10ms - DOWNSAMPLE_KERNEL) // DOWNSAMPLE_STRIDE + 1


class EmotionWav2Vec1(nn.Module):
    """wav2vec 1.0 with frame and utterance emotion heads (RECIPE "P-TAPT phase 1").

    ``forward(wav, lengths)`` returns a dict: ``utterance_logits [B, K]``, ``frame_logits
    [B, T, K]``, ``frame_mask [B, T]`` (True on valid 20 ms frames) and ``features [B, T, D]``.
    """

    def __init__(
        self,
        wav2vec1: Wav2Vec1Model,
        num_classes: int,
        head_hidden: int = 128,
        lstm_hidden: int | None = None,
        time_mask_prob: float = 0.08,
        time_mask_span: int = 15,
        time_min_masks: int = 2,
        feature_mask_prob: float = 0.05,
        feature_mask_span: int | None = None,
        feature_min_masks: int = 1,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise SerInputError(f"num_classes must be at least 2, got {num_classes}")
        self.wav2vec1 = wav2vec1
        for param in wav2vec1.feature_extractor.parameters():
            param.requires_grad_(False)
        dim = wav2vec1.config.output_dim
        embed = wav2vec1.config.embed_dim
        self.downsample = nn.Conv1d(dim, dim, DOWNSAMPLE_KERNEL, stride=DOWNSAMPLE_STRIDE)
        self.frame_head = LinearHead(dim, head_hidden, num_classes)
        # The original's BiLSTM has 2 x 256 units for 512-d features: half the width each way.
        hidden = lstm_hidden or max(dim // 2, 1)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.utterance_head = LinearHead(2 * hidden, head_hidden, num_classes)
        self.num_classes = num_classes
        self.time_mask_prob = time_mask_prob
        self.time_mask_span = time_mask_span
        self.time_min_masks = time_min_masks
        self.feature_mask_prob = feature_mask_prob
        # 64 of 512 channels in the original; the same share of a narrower model's channels.
        self.feature_mask_span = feature_mask_span or max(embed // 8, 1)
        # The original always masks one channel span (min_masks=1 for features).
        self.feature_min_masks = feature_min_masks
        self._min_samples = _min_samples(wav2vec1.config)

    @classmethod
    def from_wav2vec1(
        cls, spec: str | os.PathLike[str], num_classes: int, **kwargs: Any
    ) -> EmotionWav2Vec1:
        """Build on :func:`~ser.models.wav2vec1.load_wav2vec1`: a preset, fairseq file or dir."""
        return cls(load_wav2vec1(spec), num_classes, **kwargs)

    @property
    def feature_dim(self) -> int:
        return self.downsample.out_channels

    @property
    def min_samples(self) -> int:
        """The shortest clip that gives one 20 ms frame."""
        return self._min_samples

    def num_frames(self, num_samples: torch.Tensor | int) -> torch.Tensor | int:
        return w2v1_frames_20ms(num_samples, self.wav2vec1.config)

    def train(self, mode: bool = True) -> EmotionWav2Vec1:
        super().train(mode)
        self.wav2vec1.feature_extractor.eval()  # frozen: never in training mode
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything but the frozen feature extractor: aggregator, downsampling conv, heads."""
        frozen = {id(p) for p in self.wav2vec1.feature_extractor.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]

    def forward(
        self,
        wav: torch.Tensor,
        lengths: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        lengths = self._sample_lengths(wav, lengths, attention_mask)
        with torch.no_grad():
            z = self.wav2vec1.feature_extractor(wav)
        frames_10ms = conv_output_length(lengths, self.wav2vec1.config.conv_feature_layers)
        frames_10ms = frames_10ms.clamp(max=z.size(2))
        if self.training:
            z = self._spec_augment(z, frames_10ms)
        c = self.wav2vec1.feature_aggregator(z)
        features = F.relu(self.downsample(c)).transpose(1, 2)  # [B, T, D]
        frames = ((frames_10ms - DOWNSAMPLE_KERNEL) // DOWNSAMPLE_STRIDE + 1).clamp(
            max=features.size(1)
        )
        frame_mask = torch.arange(features.size(1), device=wav.device) < frames.unsqueeze(1)
        return {
            "utterance_logits": self._utterance_logits(features, frames, frame_mask),
            "frame_logits": self.frame_head(features),
            "frame_mask": frame_mask,
            "features": features,
        }

    def loss(
        self,
        outputs: dict[str, torch.Tensor],
        labels: torch.Tensor,
        class_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted cross-entropy of the utterance prediction plus that of every valid frame,
        each frame's target being its utterance's label."""
        utterance_logits = outputs["utterance_logits"]
        if labels.shape != utterance_logits.shape[:1]:
            raise SerInputError(
                f"labels must have shape [{utterance_logits.size(0)}], got {list(labels.shape)}"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise SerInputError(
                f"labels must be class indices in [0, {self.num_classes}), got "
                f"{labels.min().item()}..{labels.max().item()}"
            )
        if class_weights is not None and class_weights.shape != (self.num_classes,):
            raise SerInputError(
                f"class_weights must have shape [{self.num_classes}], got "
                f"{list(class_weights.shape)}"
            )
        weight = None if class_weights is None else class_weights.to(utterance_logits)
        frame_mask = outputs["frame_mask"]
        frame_targets = labels.unsqueeze(1).expand_as(frame_mask)[frame_mask]
        frame_logits = outputs["frame_logits"][frame_mask]
        return F.cross_entropy(utterance_logits.float(), labels, weight=weight) + F.cross_entropy(
            frame_logits.float(), frame_targets, weight=weight
        )

    @torch.no_grad()
    def extract_features(
        self, wav: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Clustering features: ``[frames_i, D]`` per utterance, in fp32, eval mode, no masking.

        Utterances run one at a time so that padding never enters GroupNorm's statistics.
        """
        lengths = self._sample_lengths(wav, lengths, None)
        was_training = self.training
        self.eval()
        try:
            with torch.autocast(device_type=wav.device.type, enabled=False):
                return [
                    self(wav[i : i + 1, : int(n)].float())["features"][0]
                    for i, n in enumerate(lengths.tolist())
                ]
        finally:
            self.train(was_training)

    def _sample_lengths(
        self,
        wav: torch.Tensor,
        lengths: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if wav.dim() != 2:
            raise SerInputError(f"audio must be shaped [batch, samples], got {list(wav.shape)}")
        if lengths is not None and attention_mask is not None:
            raise SerInputError("pass either lengths or attention_mask, not both")
        if attention_mask is not None:
            lengths = attention_mask.long().sum(dim=-1)
        if lengths is None:
            return torch.full((wav.size(0),), wav.size(1), dtype=torch.long, device=wav.device)
        lengths = torch.as_tensor(lengths, device=wav.device).long()
        if lengths.shape != wav.shape[:1] or (lengths > wav.size(1)).any():
            raise SerInputError(
                f"lengths must be [{wav.size(0)}] sample counts <= {wav.size(1)}, got "
                f"{lengths.tolist()}"
            )
        too_short = [(i, n) for i, n in enumerate(lengths.tolist()) if n < self.min_samples]
        if too_short:
            raise SerInputError(
                f"clips {too_short} (batch index, samples) are shorter than the "
                f"{self.min_samples} samples that give one 20 ms frame; drop such clips"
            )
        return lengths

    def _spec_augment(self, z: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Zero masked time spans (valid frames only) and masked channel spans of z."""
        batch, channels, steps = z.shape
        times = time_mask(
            frames, steps, self.time_mask_prob, self.time_mask_span, self.time_min_masks
        )
        chans = feature_mask(
            batch, channels, self.feature_mask_prob, self.feature_mask_span,
            self.feature_min_masks,
        ).to(z.device)  # fmt: skip
        return z.masked_fill(times.unsqueeze(1) | chans.unsqueeze(2), 0.0)

    def _utterance_logits(
        self, features: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor
    ) -> torch.Tensor:
        # Packing keeps padding out of both LSTM directions (the backward one starts at the end).
        packed = pack_padded_sequence(
            features, frames.cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=features.size(1))
        return self.utterance_head(F.relu(masked_mean(out, frame_mask)))


def _min_samples(config: Wav2Vec1Config) -> int:
    samples = 1
    while w2v1_frames_20ms(samples, config) < 1:
        samples += 1
    return samples


# --- saving and loading (the phase-1 stage's output, the clustering stage's input) -----------

CONFIG_FILE = artifacts.CONFIG_JSON
WEIGHTS_FILE = "model.pt"
_SAVE_FORMAT = "ser-emotion-wav2vec1"


def save_emotion_w2v1(
    model: EmotionWav2Vec1,
    directory: str | os.PathLike[str],
    classes: Sequence[str],
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model.pt`` then ``config.json`` (each atomically) for :func:`load_emotion_w2v1`.

    ``config.json`` is written last: its presence means the directory is complete.
    ``training`` (optional) is a summary kept in the config for the record.
    """
    if len(classes) != model.num_classes:
        raise SerInputError(
            f"{len(classes)} class names given for a model with {model.num_classes} classes"
        )
    out = Path(directory)
    save_state_dict(model, out / WEIGHTS_FILE)
    atomic_write_json(
        out / CONFIG_FILE,
        {
            "format": _SAVE_FORMAT,
            "version": 1,
            "wav2vec1": model.wav2vec1.config.to_json_dict(),
            "classes": list(classes),
            "model": _model_options(model),
            "training": dict(training or {}),
        },
    )
    return out


def load_emotion_w2v1(directory: str | os.PathLike[str]) -> tuple[EmotionWav2Vec1, list[str]]:
    """The model saved by :func:`save_emotion_w2v1` (in eval mode) and its class names."""
    meta = read_emotion_w2v1_config(directory)
    config_path = Path(directory) / CONFIG_FILE
    config = Wav2Vec1Config.from_json_dict(meta["wav2vec1"], str(config_path))
    options = meta["model"]
    model = EmotionWav2Vec1(Wav2Vec1Model(config), len(meta["classes"]), **options)
    weights = Path(directory) / WEIGHTS_FILE
    load_state_dict_strict(model, safe_torch_load(weights), weights)
    return model.eval(), list(meta["classes"])


def read_emotion_w2v1_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated ``config.json`` of a saved phase-1 model directory."""
    config_path = Path(directory) / CONFIG_FILE
    meta = read_saved_config(
        directory, (CONFIG_FILE, WEIGHTS_FILE), _SAVE_FORMAT, "phase-1 model",
        f"pass the {artifacts.W2V1}/ folder (or the output_dir) of a finished phase-1 run",
    )
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise SerInputError(f"{config_path}: 'classes' must list at least two class names")
    for key in ("wav2vec1", "model"):
        if not isinstance(meta.get(key), dict):
            raise SerInputError(f"{config_path}: field {key!r} must be an object")
    return meta


def _model_options(model: EmotionWav2Vec1) -> dict[str, Any]:
    """The constructor arguments that rebuild ``model`` (besides the backbone and classes)."""
    return {
        "head_hidden": model.frame_head[0].out_features,
        "lstm_hidden": model.lstm.hidden_size,
        "time_mask_prob": model.time_mask_prob,
        "time_mask_span": model.time_mask_span,
        "time_min_masks": model.time_min_masks,
        "feature_mask_prob": model.feature_mask_prob,
        "feature_mask_span": model.feature_mask_span,
        "feature_min_masks": model.feature_min_masks,
    }
