"""wav2vec 1.0 (Schneider et al., 2019), ported from fairseq so that fairseq is not needed.

Only the two parts P-TAPT phase 1 uses are ported: the convolutional ``feature_extractor``
(waveform -> z, 10 ms frames) and the causal convolutional ``feature_aggregator`` (z -> c). Their
state-dict keys are fairseq's, so a fairseq checkpoint loads strictly once its pretraining-only
parts (:data:`PRETRAINING_ONLY_PREFIXES`) are dropped. Tensors are channel-first, as in fairseq:
z is ``[B, C, T]`` and c is ``[B, C', T]``.

Checkpoints come from three places (:func:`load_wav2vec1`): a preset name (random weights), a
fairseq ``.pt`` file (old ``args`` or new ``cfg`` format) or a directory written by
:func:`save_wav2vec1`.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ser.atomic import atomic_write_json
from ser.checkpoints import (
    fairseq_model_options,
    read_saved_config,
    safe_torch_load,
    save_state_dict,
)
from ser.errors import SerInputError

logger = logging.getLogger(__name__)

Layer = tuple[int, int, int]  # (channels, kernel, stride), as fairseq writes them

# Parts of fairseq's Wav2VecModel that only the contrastive pretraining uses: the step-wise
# predictor, and the optional projection of targets through a (same or new) aggregator.
PRETRAINING_ONLY_PREFIXES = ("wav2vec_predictions.", "project_features.")

# fairseq's Wav2VecConfig (fairseq 0.12) layer defaults.
_DEFAULT_FEATURE_LAYERS: list[Layer] = (
    [(512, 10, 5), (512, 8, 4)] + [(512, 4, 2)] * 3 + [(512, 1, 1)] * 3
)
_DEFAULT_AGGREGATOR_LAYERS: list[Layer] = [(512, k, 1) for k in range(2, 14)]

# wav2vec_large.pt: five strided convolutions plus two 1x1 ones (10 ms frames, 30 ms receptive
# field) and twelve aggregator layers of growing kernel.
_LARGE_FEATURE_LAYERS: list[Layer] = (
    [(512, 10, 5), (512, 8, 4)] + [(512, 4, 2)] * 3 + [(512, 1, 1)] * 2
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"
_SAVE_FORMAT = "ser-wav2vec1"


@dataclass
class Wav2Vec1Config:
    """The options of fairseq's ``Wav2VecModel`` that shape the extractor and the aggregator.

    Field names and defaults are fairseq 0.12's (``Wav2VecConfig``): that is what fairseq fills in
    for an old checkpoint that lacks an option, so :meth:`from_fairseq_options` does the same.
    """

    conv_feature_layers: list[Layer] = field(default_factory=lambda: list(_DEFAULT_FEATURE_LAYERS))
    conv_aggregator_layers: list[Layer] = field(
        default_factory=lambda: list(_DEFAULT_AGGREGATOR_LAYERS)
    )
    dropout: float = 0.0  # inside each aggregator block (the extractor's is always 0 in fairseq)
    skip_connections_feat: bool = False
    skip_connections_agg: bool = True
    residual_scale: float = 0.5  # residual sums are scaled by sqrt(residual_scale)
    log_compression: bool = True
    agg_zero_pad: bool = False  # False: the aggregator's causal padding replicates frame 0
    non_affine_group_norm: bool = False
    no_conv_bias: bool = False  # aggregator convolutions only; the extractor's never have bias
    activation: str = "relu"
    aggregator: str = "cnn"

    def __post_init__(self) -> None:
        self.conv_feature_layers = _check_layers("conv_feature_layers", self.conv_feature_layers)
        self.conv_aggregator_layers = _check_layers(
            "conv_aggregator_layers", self.conv_aggregator_layers
        )
        if self.aggregator != "cnn":
            raise SerInputError(
                f"wav2vec 1.0 option aggregator={self.aggregator!r} is not supported; only the "
                "convolutional aggregator ('cnn', as in wav2vec_large.pt) is ported"
            )
        if self.activation not in _ACTIVATIONS:
            raise SerInputError(
                f"wav2vec 1.0 option activation={self.activation!r} is not supported; "
                f"use one of {sorted(_ACTIVATIONS)}"
            )
        strided = [layer for layer in self.conv_aggregator_layers if layer[2] != 1]
        if strided:
            raise SerInputError(
                f"wav2vec 1.0 option conv_aggregator_layers has strided layers {strided}; the "
                "aggregator's causal padding only keeps the frame count with stride 1"
            )
        if self.residual_scale <= 0:
            raise SerInputError(
                f"wav2vec 1.0 option residual_scale must be > 0, got {self.residual_scale}"
            )

    @property
    def embed_dim(self) -> int:
        """Channels of z, the feature extractor's output."""
        return self.conv_feature_layers[-1][0]

    @property
    def output_dim(self) -> int:
        """Channels of c, the aggregator's output."""
        return self.conv_aggregator_layers[-1][0]

    @classmethod
    def preset(cls, name: str) -> Wav2Vec1Config:
        if name not in PRESETS:
            raise SerInputError(
                f"unknown wav2vec 1.0 preset {name!r}; choose one of {sorted(PRESETS)}"
            )
        return cls(**PRESETS[name])

    @classmethod
    def from_fairseq_options(
        cls, options: dict[str, Any], source: str = "options"
    ) -> Wav2Vec1Config:
        """Build from fairseq's model options (``vars(args)`` or ``cfg["model"]``).

        Missing options take fairseq 0.12's defaults. Layer specs are strings of Python literals
        such as ``"[(512, 10, 5)] + [(512, 4, 2)] * 3"``; they are parsed, never evaluated.
        Options for pretraining only (negatives, prediction steps, dropout outside the two
        modules) are ignored.
        """
        vq_type = options.get("vq_type", "none")
        if vq_type not in (None, "none"):
            raise SerInputError(
                f"{source}: vq_type={vq_type!r} is a vq-wav2vec model; only wav2vec 1.0 "
                "without a quantizer (like wav2vec_large.pt) is supported"
            )
        kwargs: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            if item.name not in options or options[item.name] is None:
                continue
            value = options[item.name]
            if item.name in ("conv_feature_layers", "conv_aggregator_layers"):
                value = parse_layer_spec(value, f"{source}: {item.name}")
            kwargs[item.name] = _coerce(item.name, value, source)
        return _build(cls, kwargs, source)

    def to_json_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("conv_feature_layers", "conv_aggregator_layers"):
            data[key] = [list(layer) for layer in data[key]]
        return data

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], source: str) -> Wav2Vec1Config:
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SerInputError(
                f"{source}: unknown wav2vec 1.0 config fields {unknown}; expected only "
                f"{sorted(known)}"
            )
        return _build(
            cls, {key: _coerce(key, value, source) for key, value in data.items()}, source
        )


def _build(cls: type[Wav2Vec1Config], kwargs: dict[str, Any], source: str) -> Wav2Vec1Config:
    try:
        return cls(**kwargs)
    except SerInputError as err:
        raise SerInputError(f"{source}: {err}") from err


PRESETS: dict[str, dict[str, Any]] = {
    # The structure of wav2vec_large.pt (fairseq's wav2vec 1.0 release).
    "large": {
        "conv_feature_layers": _LARGE_FEATURE_LAYERS,
        "conv_aggregator_layers": _DEFAULT_AGGREGATOR_LAYERS,
        "skip_connections_feat": True,
        "skip_connections_agg": True,
        "residual_scale": 0.5,
        "log_compression": True,
    },
    # The same strides and kernels with 16 channels and 4 aggregator layers: for tests and demos.
    "tiny": {
        "conv_feature_layers": [(16, k, s) for _, k, s in _LARGE_FEATURE_LAYERS],
        "conv_aggregator_layers": [(16, k, 1) for k in range(2, 6)],
        "skip_connections_feat": True,
        "skip_connections_agg": True,
        "residual_scale": 0.5,
        "log_compression": True,
    },
}


def parse_layer_spec(spec: Any, where: str) -> list[Layer]:
    """Parse fairseq's layer spec string: literals joined by list ``+`` and ``* int`` only."""
    if not isinstance(spec, str):
        return _check_layers(where, spec)
    try:
        tree = ast.parse(spec.strip(), mode="eval")
        value = _literal_list_expr(tree.body)
    except (SyntaxError, ValueError, TypeError) as err:
        raise SerInputError(
            f"{where}: cannot parse {spec!r} ({err}); expected a list of (channels, kernel, "
            'stride) tuples such as "[(512, 10, 5)] + [(512, 4, 2)] * 3"'
        ) from err
    return _check_layers(where, value)


def _literal_list_expr(node: ast.expr) -> Any:
    """Value of a literal, ``list + list`` or ``list * int``; anything else is refused."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _literal_list_expr(node.left), _literal_list_expr(node.right)
        if isinstance(node.op, ast.Add) and isinstance(left, list) and isinstance(right, list):
            return left + right
        if isinstance(node.op, ast.Mult) and isinstance(left, list) and type(right) is int:
            if not 0 <= right <= 1000:
                raise ValueError(f"repetition count {right} out of range")
            return left * right
        raise ValueError(f"unsupported operation in layer spec: {ast.unparse(node)}")
    return ast.literal_eval(node)


def _check_layers(where: str, value: Any) -> list[Layer]:
    if not isinstance(value, (list, tuple)) or not value:
        raise SerInputError(f"{where}: expected a non-empty list of layers, got {value!r}")
    layers: list[Layer] = []
    for layer in value:
        if (
            not isinstance(layer, (list, tuple))
            or len(layer) != 3
            or not all(type(v) is int and v > 0 for v in layer)
        ):
            raise SerInputError(
                f"{where}: layer {layer!r} is not a (channels, kernel, stride) triple of "
                "positive integers"
            )
        layers.append((layer[0], layer[1], layer[2]))
    return layers


_BOOL_FIELDS = {
    "skip_connections_feat",
    "skip_connections_agg",
    "log_compression",
    "agg_zero_pad",
    "non_affine_group_norm",
    "no_conv_bias",
}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check an option's type (JSON and argparse both give plain Python values)."""
    if name in ("conv_feature_layers", "conv_aggregator_layers"):
        return _check_layers(f"{source}: {name}", value)
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise SerInputError(f"{source}: {name} must be true or false, got {value!r}")
        return value
    if name in ("dropout", "residual_scale"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SerInputError(f"{source}: {name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise SerInputError(f"{source}: {name} must be a string, got {value!r}")
    return value


_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 (as fairseq's): half-precision statistics are unstable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = nn.functional.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.type_as(x)


class FeatureExtractor(nn.Module):
    """Waveform ``[B, S]`` -> z ``[B, C, T]``: strided bias-free convolutions, each followed by a
    one-group GroupNorm and the activation; then log(|x| + 1) compression."""

    def __init__(self, config: Wav2Vec1Config) -> None:
        super().__init__()
        self.conv_layers = nn.ModuleList()
        in_dim = 1
        for dim, kernel, stride in config.conv_feature_layers:
            # Sequential indices (conv 0, dropout 1, norm 2) give fairseq's state-dict keys.
            self.conv_layers.append(
                nn.Sequential(
                    nn.Conv1d(in_dim, dim, kernel, stride=stride, bias=False),
                    nn.Dropout(p=0.0),
                    Fp32GroupNorm(1, dim, affine=not config.non_affine_group_norm),
                    _ACTIVATIONS[config.activation](),
                )
            )
            in_dim = dim
        self.skip_connections = config.skip_connections_feat
        self.residual_scale = math.sqrt(config.residual_scale)
        self.log_compression = config.log_compression

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = wav.unsqueeze(1)
        for conv in self.conv_layers:
            residual = x
            x = conv(x)
            if self.skip_connections and x.size(1) == residual.size(1):
                # The residual is subsampled to the block's frame rate by plain striding.
                steps = x.size(2)
                residual = residual[..., :: residual.size(2) // steps][..., :steps]
                x = (x + residual) * self.residual_scale
        if self.log_compression:
            x = (x.abs() + 1).log()
        return x


class Aggregator(nn.Module):
    """z ``[B, C, T]`` -> c ``[B, C', T]``: causal convolutions (left padding of kernel - 1
    frames), GroupNorm and activation, with residual sums through 1x1 projections where the
    channel count changes."""

    def __init__(self, config: Wav2Vec1Config) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        self.residual_proj = nn.ModuleList()
        in_dim = config.embed_dim
        for dim, kernel, stride in config.conv_aggregator_layers:
            skip_proj = in_dim != dim and config.skip_connections_agg
            self.residual_proj.append(
                nn.Conv1d(in_dim, dim, 1, bias=False) if skip_proj else nn.Identity()
            )
            pad: nn.Module = (
                nn.ConstantPad1d((kernel - 1, 0), 0.0)
                if config.agg_zero_pad
                else nn.ReplicationPad1d((kernel - 1, 0))
            )
            # Indices as fairseq's: pad 0, conv 1, dropout 2, norm 3, activation 4.
            blocks.append(
                nn.Sequential(
                    pad,
                    nn.Conv1d(in_dim, dim, kernel, stride=stride, bias=not config.no_conv_bias),
                    nn.Dropout(p=config.dropout),
                    Fp32GroupNorm(1, dim, affine=not config.non_affine_group_norm),
                    _ACTIVATIONS[config.activation](),
                )
            )
            in_dim = dim
        self.conv_layers = nn.Sequential(*blocks)
        self.skip_connections = config.skip_connections_agg
        self.residual_scale = math.sqrt(config.residual_scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z
        for proj, conv in zip(self.residual_proj, self.conv_layers, strict=True):
            residual = x
            x = conv(x)
            if self.skip_connections:
                x = (x + proj(residual)) * self.residual_scale
        return x


class Wav2Vec1Model(nn.Module):
    """wav2vec 1.0's feature extractor and context aggregator: ``forward(wav) -> (z, c)``."""

    def __init__(self, config: Wav2Vec1Config) -> None:
        super().__init__()
        self.config = config
        self.feature_extractor = FeatureExtractor(config)
        self.feature_aggregator = Aggregator(config)

    @property
    def receptive_field(self) -> int:
        """Samples one z frame sees: the shortest input the extractor accepts."""
        return receptive_field(self.config.conv_feature_layers)

    def num_frames(self, num_samples: torch.Tensor | int) -> torch.Tensor | int:
        """z (and c) frames for inputs of ``num_samples`` samples (10 ms frames for 16 kHz)."""
        return conv_output_length(num_samples, self.config.conv_feature_layers)

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if wav.dim() != 2:
            raise SerInputError(
                f"wav2vec 1.0 expects audio shaped [batch, samples], got {list(wav.shape)}"
            )
        if wav.size(1) < self.receptive_field:
            raise SerInputError(
                f"wav2vec 1.0: audio of {wav.size(1)} samples is shorter than the model's "
                f"receptive field ({self.receptive_field} samples); pad or drop such clips"
            )
        z = self.feature_extractor(wav)
        return z, self.feature_aggregator(z)


def conv_output_length(num_samples: torch.Tensor | int, layers: list[Layer]) -> torch.Tensor | int:
    """``(L - kernel) // stride + 1`` layer by layer (unpadded convolutions)."""
    length = num_samples
    for _, kernel, stride in layers:
        length = (length - kernel) // stride + 1
    return length


def receptive_field(layers: list[Layer]) -> int:
    field_size, jump = 1, 1
    for _, kernel, stride in layers:
        field_size += (kernel - 1) * jump
        jump *= stride
    return field_size


# --- loading and saving ------------------------------------------------------------------


def load_wav2vec1(spec: str | os.PathLike[str]) -> Wav2Vec1Model:
    """A wav2vec 1.0 model from a preset name, a fairseq ``.pt`` file or a saved directory."""
    text = os.fspath(spec)
    if text in PRESETS:
        return Wav2Vec1Model(Wav2Vec1Config.preset(text))
    path = Path(text)
    if path.is_dir():
        return _load_saved(path)
    if path.is_file():
        return _load_fairseq(path)
    raise SerInputError(
        f"wav2vec 1.0 model {text!r}: not a preset ({', '.join(sorted(PRESETS))}), an existing "
        "fairseq checkpoint file (e.g. wav2vec_large.pt) or a directory written by save_wav2vec1"
    )


def save_wav2vec1(model: Wav2Vec1Model, directory: str | os.PathLike[str]) -> Path:
    """Write ``config.json`` and ``model.pt`` (each atomically) for :func:`load_wav2vec1`."""
    out = Path(directory)
    save_state_dict(model, out / WEIGHTS_FILE)
    atomic_write_json(
        out / CONFIG_FILE,
        {"format": _SAVE_FORMAT, "version": 1, "config": model.config.to_json_dict()},
    )
    logger.info("saved wav2vec 1.0 model to %s", out)
    return out


def _load_saved(directory: Path) -> Wav2Vec1Model:
    config_path = directory / CONFIG_FILE
    meta = read_saved_config(
        directory, (CONFIG_FILE, WEIGHTS_FILE), _SAVE_FORMAT, "wav2vec 1.0 model",
        "pass a directory written by save_wav2vec1, a fairseq .pt file or a preset name",
    )
    if not isinstance(meta.get("config"), dict):
        raise SerInputError(f"{config_path}: field 'config' must be an object")
    config = Wav2Vec1Config.from_json_dict(meta["config"], str(config_path))
    model = Wav2Vec1Model(config)
    load_state_dict_strict(
        model, safe_torch_load(directory / WEIGHTS_FILE), directory / WEIGHTS_FILE
    )
    return model


def _load_fairseq(path: Path) -> Wav2Vec1Model:
    checkpoint = safe_torch_load(path)
    state = checkpoint.get("model")
    if not isinstance(state, dict):
        raise SerInputError(
            f"{path} has no 'model' state dict (keys: {sorted(checkpoint)}); expected a fairseq "
            "wav2vec 1.0 checkpoint such as wav2vec_large.pt"
        )
    options = fairseq_model_options(checkpoint, str(path))
    _require_wav2vec1(path, options, state)
    config = Wav2Vec1Config.from_fairseq_options(options, str(path))
    model = Wav2Vec1Model(config)
    kept = {
        key: value for key, value in state.items() if not key.startswith(PRETRAINING_ONLY_PREFIXES)
    }
    load_state_dict_strict(model, kept, path)
    logger.info(
        "loaded fairseq wav2vec 1.0 from %s (%d tensors, %d pretraining-only dropped)",
        path,
        len(kept),
        len(state) - len(kept),
    )
    return model


def _require_wav2vec1(path: Path, options: dict[str, Any], state: dict[str, Any]) -> None:
    """Refuse wav2vec 2.0 and other fairseq models with a message that says what was found."""
    name = options.get("_name") or options.get("arch")
    looks_w2v2 = any(key.startswith(("encoder.layers.", "post_extract_proj.")) for key in state)
    if (name is not None and name != "wav2vec") or looks_w2v2:
        found = f"a fairseq {name!r} model" if name else "a wav2vec 2.0 state dict"
        hint = (
            "; load wav2vec 2.0 checkpoints as a wav2vec 2.0 backbone instead"
            if looks_w2v2 or str(name).startswith("wav2vec2")
            else ""
        )
        raise SerInputError(
            f"{path} holds {found}; expected a wav2vec 1.0 checkpoint (fairseq arch 'wav2vec', "
            f"like wav2vec_large.pt){hint}"
        )
    if "feature_extractor.conv_layers.0.0.weight" not in state:
        raise SerInputError(
            f"{path} has no wav2vec 1.0 feature extractor weights "
            "('feature_extractor.conv_layers.0.0.weight'); expected a fairseq wav2vec 1.0 "
            "checkpoint such as wav2vec_large.pt"
        )


def load_state_dict_strict(
    model: nn.Module, state: dict[str, Any], source: str | os.PathLike[str]
) -> None:
    """Load ``state`` into ``model`` or raise one error that lists every key or shape problem."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key}: {_shape(state[key])} vs {_shape(expected[key])}"
        for key in sorted(set(state) & set(expected))
        if _shape(state[key]) != _shape(expected[key])
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(_shorten(keys))}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (checkpoint vs model)", mismatched),
        )
        if keys
    ]
    if problems:
        raise SerInputError(
            f"{os.fspath(source)} does not match the wav2vec 1.0 model its options describe: "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)


def _shape(value: Any) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _shorten(keys: list[str], limit: int = 12) -> list[str]:
    return keys if len(keys) <= limit else [*keys[:limit], f"... {len(keys) - limit} more"]
