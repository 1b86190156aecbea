"""wav2vec 2.0 backbones from a preset, a model directory, a hub name, a fairseq file or a stage
checkpoint, all as transformers' ``Wav2Vec2Model`` (or ``Wav2Vec2ForPreTraining`` for TAPT).

Accepted ``spec`` forms (see :data:`SPEC_FORMS`):

- a preset: ``tiny`` (a few layers, small widths, wav2vec 2.0's full 320x conv stack: for tests
  and the demo), ``base`` and ``large`` (the architectures of facebook/wav2vec2-base and
  facebook/wav2vec2-large-lv60), randomly initialised from torch's seed;
- a directory written by ``save_pretrained`` (of ``Wav2Vec2Model``, ``Wav2Vec2ForPreTraining``
  or any wav2vec2 head model): ``config.json`` plus weights;
- a hub name such as ``facebook/wav2vec2-base``: read from the local Hugging Face cache only,
  never from the network;
- a fairseq wav2vec 2.0 ``.pt`` (pretrained or CTC fine-tuned), see ``fairseq_import``;
- a Lightning ``.ckpt`` written by one of our stages.

A preset name wins over a same-named path: write ``./tiny`` for a directory called ``tiny``.

Every load comes out with activation checkpointing OFF, whatever the config says:
facebook/wav2vec2-base's hub config carries ``"gradient_checkpointing": true``, which transformers 5
silently turns into checkpointing in every layer when the model is built (20-35 % slower
training; the original, on transformers 4.10, trained without it). Stages turn it on explicitly
with :func:`set_gradient_checkpointing`.

Stage checkpoint convention (stages follow it so that their output is a backbone spec):

- the LightningModule holds its ``Wav2Vec2Model`` at attribute ``backbone`` (state-dict prefix
  ``backbone.``), or a ``Wav2Vec2ForPreTraining`` at attribute ``model`` (prefix ``model.``, its
  backbone under ``model.wav2vec2.``); heads may hold the backbone deeper, e.g. an
  ``UtteranceClassifier`` at ``model`` gives ``model.backbone.``: any single prefix that ends
  where a wav2vec 2.0 state dict begins is found;
- beside the checkpoint the stage writes :data:`MODEL_JSON` with :func:`write_model_json`: the
  backbone's ``Wav2Vec2Config.to_dict()``, which is all that is needed to rebuild it;
- ``save_hyperparameters`` gets plain values only, so the checkpoint loads with
  ``weights_only=True`` (:func:`ser.checkpoints.safe_torch_load`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, Wav2Vec2Config, Wav2Vec2ForPreTraining, Wav2Vec2Model

from ser.atomic import atomic_write_json, current_umask
from ser.checkpoints import safe_torch_load
from ser.errors import SerInputError
from ser.models.fairseq_import import (
    w2v2_from_fairseq_checkpoint,
    w2v2_pretraining_from_fairseq_checkpoint,
)

log = logging.getLogger(__name__)

MODEL_JSON = "model.json"
_CONV_STACK: dict[str, Any] = {
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
}
PRESETS: dict[str, dict[str, Any]] = {
    # Base-like (group norm, post-layer-norm) at toy size: a 3 s clip is 149 frames.
    "tiny": {
        **_CONV_STACK,
        "conv_dim": [32] * 7,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
        "num_codevectors_per_group": 16,
        "num_codevector_groups": 2,
        "codevector_dim": 32,
        "proj_codevector_dim": 32,
        "num_negatives": 20,
        "layerdrop": 0.0,
        "mask_time_prob": 0.05,
        "mask_time_length": 10,
    },
    # facebook/wav2vec2-base
    "base": {
        **_CONV_STACK,
        "conv_dim": [512] * 7,
        "feat_proj_dropout": 0.1,
        "activation_dropout": 0.0,
        "final_dropout": 0.0,
        "layerdrop": 0.05,
        "mask_time_prob": 0.05,
        "mask_time_length": 10,
    },
    # facebook/wav2vec2-large-lv60: stable layer norm, layer-norm conv stack with bias
    "large": {
        **_CONV_STACK,
        "conv_dim": [512] * 7,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
        "conv_bias": True,
        "codevector_dim": 768,
        "proj_codevector_dim": 768,
        "feat_proj_dropout": 0.1,
        "activation_dropout": 0.0,
        "final_dropout": 0.0,
        "layerdrop": 0.1,
        "mask_time_prob": 0.05,
        "mask_time_length": 10,
    },
}
SPEC_FORMS = (
    f"a preset ({', '.join(PRESETS)}); a directory with config.json written by save_pretrained; "
    "a hub name like facebook/wav2vec2-base that is in the local Hugging Face cache; "
    "a fairseq wav2vec 2.0 .pt file; a Lightning .ckpt written by a ser stage"
)
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Where a wav2vec 2.0 state dict begins: the key that every variant has.
_ANCHOR = "feature_projection.projection.weight"
_PREFERRED_PREFIXES = ("backbone.", "model.wav2vec2.")


def preset_config(name: str, **overrides: Any) -> Wav2Vec2Config:
    """The ``Wav2Vec2Config`` of a preset, with ``overrides`` applied."""
    if name not in PRESETS:
        raise SerInputError(f"unknown backbone preset {name!r}; presets: {', '.join(PRESETS)}")
    return Wav2Vec2Config(**{**PRESETS[name], **overrides})


def load_backbone(spec: str) -> Wav2Vec2Model:
    """A ``Wav2Vec2Model`` from any accepted ``spec`` (module docstring), in training mode.

    Training mode like any freshly built module, whatever the source: transformers'
    ``from_pretrained`` returns eval mode, and Lightning keeps submodules' modes, so a backbone
    left in eval mode would silently train without dropout. Call ``.eval()`` for inference.
    """
    kind, value = _resolve(spec)
    if kind == "preset":
        model = Wav2Vec2Model(preset_config(spec))
    elif kind == "directory":
        model = _from_directory(value)
    elif kind == "hub":
        model = _from_hub_cache(spec)
    elif kind == "fairseq":
        model = w2v2_from_fairseq_checkpoint(value, spec)
    else:
        model = _from_lightning(value, Path(spec), pretraining=False)
    set_gradient_checkpointing(model, False)
    log.info("backbone: %s", describe_backbone(spec, model))
    return model.train()


def load_pretraining_model(spec: str) -> Wav2Vec2ForPreTraining:
    """A ``Wav2Vec2ForPreTraining`` for TAPT from any accepted ``spec``, in training mode (see
    :func:`load_backbone`). Where the source has no quantizer or projection heads (a plain
    backbone), they start fresh."""
    kind, value = _resolve(spec)
    if kind == "preset":
        model = Wav2Vec2ForPreTraining(preset_config(spec))
    elif kind in ("directory", "hub"):
        source = value if kind == "directory" else spec
        model = _pretraining_from_pretrained(source, hub=kind == "hub")
    elif kind == "fairseq":
        model = w2v2_pretraining_from_fairseq_checkpoint(value, spec)
    else:
        model = _from_lightning(value, Path(spec), pretraining=True)
    set_gradient_checkpointing(model, False)
    log.info("pretraining model: %s", describe_backbone(spec, model))
    return model.train()


def set_gradient_checkpointing(model: PreTrainedModel, enabled: bool) -> None:
    """Turn activation checkpointing of every layer of ``model`` on or off.

    On, each layer's activations are recomputed in the backward pass: less memory, slower. It
    applies in training mode with gradients enabled only (a frozen feature encoder run under
    ``no_grad`` is not checkpointed). Non-reentrant (``use_reentrant=False``), the variant
    PyTorch recommends: the reentrant one gives a layer no gradients when none of its tensor
    inputs requires grad.
    """
    kwargs = {"use_reentrant": False}
    # Later transformers 5 releases rename these activation_checkpointing_*; the old names warn.
    if enabled and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    # A config that still carries the key would turn checkpointing on again in the next loader
    # (it is consumed when a model is built, but a config may be shared or rebuilt from a dict).
    if hasattr(model.config, "gradient_checkpointing"):
        delattr(model.config, "gradient_checkpointing")


def describe_backbone(spec: str, model: torch.nn.Module | None = None) -> str:
    """A short description for logs: where the backbone came from and its size."""
    source = f"preset {spec!r} (random init)" if spec in PRESETS else repr(spec)
    if model is None:
        return source
    config = model.config
    params = sum(p.numel() for p in model.parameters()) / 1e6
    norm = "layer-norm-first" if config.do_stable_layer_norm else "post-layer-norm"
    return (
        f"{source}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, {norm}, "
        f"{params:.1f} M parameters"
    )


def save_backbone(
    model: Wav2Vec2Model | Wav2Vec2ForPreTraining, directory: str | os.PathLike[str]
) -> Path:
    """``save_pretrained`` into ``directory`` atomically: written into a temporary directory
    beside it, then renamed into place (an existing directory is replaced only then)."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*"):  # what a killed save left
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it owner-only
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            target.rename(old / target.name)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def write_model_json(directory: str | os.PathLike[str], config: Wav2Vec2Config) -> Path:
    """Write :data:`MODEL_JSON` (the backbone config) beside a stage's checkpoints."""
    path = Path(directory) / MODEL_JSON
    atomic_write_json(path, {
        "backbone_config": config.to_dict(),
        "rebuild": "ser.models.backbones.load_backbone('<checkpoint>.ckpt') with this file "
                   "beside the checkpoint",
    })
    return path


def _resolve(spec: str) -> tuple[str, Any]:
    """(kind, payload): preset, directory (Path), hub, fairseq or lightning (checkpoint dict)."""
    if spec in PRESETS:
        return "preset", None
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SerInputError(
                f"backbone directory {path} has no config.json; expected a directory written by "
                f"save_pretrained. Accepted backbones: {SPEC_FORMS}."
            )
        return "directory", path
    if path.is_file():
        checkpoint = safe_torch_load(path)
        if "state_dict" in checkpoint:
            return "lightning", checkpoint
        if "model" in checkpoint:
            return "fairseq", checkpoint
        raise SerInputError(
            f"checkpoint {path} has neither 'state_dict' (Lightning) nor 'model' (fairseq) "
            f"(keys: {sorted(checkpoint)[:10]}). Accepted backbones: {SPEC_FORMS}."
        )
    if _HUB_NAME.fullmatch(spec):
        return "hub", None
    raise SerInputError(f"backbone {spec!r} is not a preset, a file or a directory. "
                        f"Accepted backbones: {SPEC_FORMS}.")


def _from_directory(path: Path) -> Wav2Vec2Model:
    architectures = _read_architectures(path)
    if "Wav2Vec2ForPreTraining" in architectures:
        # Load it whole and take its backbone: strict, and no report of "unused" heads.
        return _checked_pretrained(Wav2Vec2ForPreTraining, path).wav2vec2
    return _checked_pretrained(Wav2Vec2Model, path)


def _from_hub_cache(name: str) -> Wav2Vec2Model:
    try:
        return _checked_pretrained(Wav2Vec2Model, name, local_files_only=True)
    except OSError as err:
        raise SerInputError(_no_network_advice(name)) from err


def _pretraining_from_pretrained(source: Path | str, hub: bool) -> Wav2Vec2ForPreTraining:
    try:
        model, info = Wav2Vec2ForPreTraining.from_pretrained(
            source, local_files_only=True, output_loading_info=True, dtype=torch.float32
        )
    except OSError as err:
        if hub:
            raise SerInputError(_no_network_advice(str(source))) from err
        raise SerInputError(f"cannot load {source} as a wav2vec 2.0 model: {err}") from err
    missing = sorted(info["missing_keys"])
    backbone_missing = [k for k in missing if k.startswith("wav2vec2.")]
    if backbone_missing:
        raise SerInputError(f"{source}: weights missing for {_short(backbone_missing)}")
    if missing:
        log.warning(
            "%s has no pretraining heads (%s): they start from random init, so TAPT first "
            "relearns the quantizer; pass a pretraining checkpoint to continue it instead",
            source, _short(missing),
        )
    return model


def _checked_pretrained(cls: type, source: Path | str, local_files_only: bool = True) -> Any:
    """``cls.from_pretrained`` that refuses missing weights (transformers only warns)."""
    model, info = cls.from_pretrained(
        source, local_files_only=local_files_only, output_loading_info=True, dtype=torch.float32
    )
    if info["missing_keys"] or info["mismatched_keys"]:
        raise SerInputError(
            f"{source} does not hold a complete {cls.__name__}: missing "
            f"{_short(sorted(info['missing_keys']))}, wrong shape "
            f"{_short(sorted(map(str, info['mismatched_keys'])))}"
        )
    return model


def _read_architectures(path: Path) -> list[str]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise SerInputError(f"{path / 'config.json'} is not readable JSON: {err}") from err
    if config.get("model_type") != "wav2vec2":
        raise SerInputError(
            f"{path} holds a {config.get('model_type')!r} model; expected model_type 'wav2vec2'"
        )
    return list(config.get("architectures") or [])


def _no_network_advice(name: str) -> str:
    return (
        f"backbone {name!r} is not a local path and is not in the local Hugging Face cache, and "
        "this machine does not download models. On a machine with internet run "
        f"`huggingface-cli download {name} --local-dir DIR` (or "
        f"huggingface_hub.snapshot_download('{name}', local_dir=DIR)), copy DIR here and pass "
        "--backbone DIR."
    )


def _from_lightning(
    checkpoint: dict[str, Any], path: Path, pretraining: bool
) -> Wav2Vec2Model | Wav2Vec2ForPreTraining:
    state = checkpoint["state_dict"]
    config = _lightning_config(path)
    prefix = _backbone_prefix(state, path)
    backbone_state = _sub_state(state, prefix)
    if not pretraining:
        model = Wav2Vec2Model(config)
        _load_strict(model, backbone_state, path)
        return model
    model = Wav2Vec2ForPreTraining(config)
    if prefix.endswith("wav2vec2."):
        _load_strict(model, _sub_state(state, prefix[: -len("wav2vec2.")]), path)
    else:
        log.warning("%s holds a backbone only: the pretraining heads start from random init", path)
        _load_strict(model.wav2vec2, backbone_state, path)
    return model


def _lightning_config(path: Path) -> Wav2Vec2Config:
    manifest = path.parent / MODEL_JSON
    if not manifest.is_file():
        raise SerInputError(
            f"checkpoint {path} has no {MODEL_JSON} beside it; a ser stage writes one with the "
            "backbone config. Copy it from the stage's output directory."
        )
    try:
        data = json.loads(manifest.read_text())
        return Wav2Vec2Config.from_dict(data["backbone_config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SerInputError(f"{manifest} is not a valid backbone description: {err}") from err


def _backbone_prefix(state: dict[str, torch.Tensor], path: Path) -> str:
    prefixes = sorted(k[: -len(_ANCHOR)] for k in state if k.endswith(_ANCHOR))
    for preferred in _PREFERRED_PREFIXES:
        if preferred in prefixes:
            return preferred
    if len(prefixes) == 1:
        return prefixes[0]
    raise SerInputError(
        f"checkpoint {path}: expected one wav2vec 2.0 backbone in its state_dict (under "
        f"'backbone.' by convention), found {len(prefixes)}: {prefixes}"
    )


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SerInputError(
            f"checkpoint {path} does not match the backbone described by {MODEL_JSON}: "
            f"{str(err).splitlines()[0]} {_short(str(err).splitlines()[1:])}"
        ) from err


def _short(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(s.strip() for s in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
