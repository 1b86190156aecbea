"""Speech SSL backbones (wav2vec 2.0, HuBERT, WavLM, data2vec-audio) from a preset, a model
directory, a hub name, a fairseq file or a stage checkpoint, as the family's transformers base
model (:data:`Backbone`), or as ``Wav2Vec2ForPreTraining`` for TAPT (wav2vec 2.0 only).

Families (:data:`FAMILIES`, keyed by the config's ``model_type``): ``wav2vec2``
(``Wav2Vec2Model``), ``hubert`` (``HubertModel``), ``wavlm`` (``WavLMModel``) and
``data2vec-audio`` (``Data2VecAudioModel``). The family is read from the source's config
(``model_type``, else ``architectures``), never guessed from a file name.

Accepted ``spec`` forms (see :data:`SPEC_FORMS`):

- a preset, randomly initialised from torch's seed: ``tiny`` (a few layers, small widths,
  wav2vec 2.0's full 320x conv stack: for tests and the demo), ``base`` and ``large`` (the
  architectures of facebook/wav2vec2-base and facebook/wav2vec2-large-lv60), all wav2vec 2.0;
  ``tiny-hubert``, ``tiny-wavlm`` and ``tiny-data2vec-audio``, the other families at ``tiny``'s
  sizes (data2vec-audio keeps its own stack of five positional convs);
- a directory written by ``save_pretrained`` of any family's base model or head model (e.g.
  ``Wav2Vec2ForPreTraining``, ``HubertForSequenceClassification``): ``config.json`` plus
  weights; a head model gives its backbone;
- a hub name such as ``facebook/hubert-base-ls960``: read from the local Hugging Face cache only,
  never from the network;
- a fairseq ``.pt`` (wav2vec 2.0 or HuBERT, pretrained or CTC fine-tuned), see
  ``fairseq_import``; every ``.pt`` goes through :func:`_from_fairseq`;
- a Lightning ``.ckpt`` written by one of our stages.

A preset name wins over a same-named path: write ``./tiny`` for a directory called ``tiny``.

TAPT needs wav2vec 2.0's quantizer and contrastive head: :func:`load_pretraining_model` refuses
the other families, and :func:`tapt_refusal` says so from the spec alone (config files, no
weights), so that TAPT's config check refuses before any work.

Every load comes out with activation checkpointing OFF, whatever the config says:
facebook/wav2vec2-base's hub config carries ``"gradient_checkpointing": true``, which transformers 5
silently turns into checkpointing in every layer when the model is built (20-35 % slower
training; the original, on transformers 4.10, trained without it). Stages turn it on explicitly
with :func:`set_gradient_checkpointing`.

Stage checkpoint convention (stages follow it so that their output is a backbone spec):

- the LightningModule holds its backbone at attribute ``backbone`` (state-dict prefix
  ``backbone.``), or a ``Wav2Vec2ForPreTraining`` at attribute ``model`` (prefix ``model.``, its
  backbone under ``model.wav2vec2.``); heads may hold the backbone deeper, e.g. an
  ``UtteranceClassifier`` at ``model`` gives ``model.backbone.``: any single prefix that ends
  where a backbone state dict begins is found;
- beside the checkpoint the stage writes :data:`MODEL_JSON` with :func:`write_model_json`: the
  backbone's ``config.to_dict()``, whose ``model_type`` names the family (a file without one, as
  written before other families, is wav2vec 2.0), which is all that is needed to rebuild it;
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import (
    Data2VecAudioConfig,
    Data2VecAudioModel,
    HubertConfig,
    HubertModel,
    PreTrainedConfig,
    PreTrainedModel,
    Wav2Vec2Config,
    Wav2Vec2ForPreTraining,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
)

from ser.atomic import atomic_write_json, current_umask
from ser.checkpoints import safe_torch_load
from ser.errors import SerInputError
from ser.models.fairseq_import import (
    backbone_from_fairseq_checkpoint,
    fairseq_family,
    w2v2_pretraining_from_fairseq_checkpoint,
)

log = logging.getLogger(__name__)

Backbone = Wav2Vec2Model | HubertModel | WavLMModel | Data2VecAudioModel


@dataclass(frozen=True)
class Family:
    """A backbone family: its name in messages, config and base-model classes, and the prefix
    of its class names in a config's ``architectures`` (``HubertForCTC``)."""

    label: str
    config: type[PreTrainedConfig]
    model: type[PreTrainedModel]
    class_prefix: str


WAV2VEC2 = "wav2vec2"
FAMILIES: dict[str, Family] = {  # keyed by the config's model_type
    WAV2VEC2: Family("wav2vec 2.0", Wav2Vec2Config, Wav2Vec2Model, "Wav2Vec2"),
    "hubert": Family("HuBERT", HubertConfig, HubertModel, "Hubert"),
    "wavlm": Family("WavLM", WavLMConfig, WavLMModel, "WavLM"),
    "data2vec-audio": Family("data2vec-audio", Data2VecAudioConfig, Data2VecAudioModel,
                             "Data2VecAudio"),
}
# A family's base or head class, e.g. HubertModel, WavLMForCTC; not Wav2Vec2ConformerModel.
_ARCHITECTURE = re.compile(
    rf"({'|'.join(f.class_prefix for f in FAMILIES.values())})(Model|For[A-Za-z]+)"
)

MODEL_JSON = "model.json"
_CONV_STACK: dict[str, Any] = {
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
}
# Toy sizes every family's tiny preset shares: a 3 s clip is 149 frames.
_TINY_SIZES: dict[str, Any] = {
    **_CONV_STACK,
    "conv_dim": [32] * 7,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "num_conv_pos_embedding_groups": 4,
    "layerdrop": 0.0,
    "mask_time_prob": 0.05,
    "mask_time_length": 10,
}
# The kernel of the single positional conv of wav2vec 2.0, HuBERT and WavLM. data2vec-audio
# reads num_conv_pos_embeddings as its NUMBER of positional convs, so it keeps its own (5 of 19).
_TINY_POS_CONV: dict[str, Any] = {"num_conv_pos_embeddings": 16}
PRESETS: dict[str, dict[str, Any]] = {
    # Base-like (group norm, post-layer-norm) at toy size, with a small quantizer for TAPT.
    "tiny": {
        **_TINY_SIZES,
        **_TINY_POS_CONV,
        "num_codevectors_per_group": 16,
        "num_codevector_groups": 2,
        "codevector_dim": 32,
        "proj_codevector_dim": 32,
        "num_negatives": 20,
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
    # The other families at tiny's sizes: group-norm conv stack (data2vec-audio: layer norm,
    # its only kind), post-layer-norm encoder.
    "tiny-hubert": {**_TINY_SIZES, **_TINY_POS_CONV},
    "tiny-wavlm": {**_TINY_SIZES, **_TINY_POS_CONV},
    "tiny-data2vec-audio": dict(_TINY_SIZES),
}
PRESET_FAMILIES: dict[str, str] = {
    "tiny": WAV2VEC2, "base": WAV2VEC2, "large": WAV2VEC2,
    "tiny-hubert": "hubert", "tiny-wavlm": "wavlm", "tiny-data2vec-audio": "data2vec-audio",
}  # fmt: skip
_FAMILY_LIST = ", ".join(f"{f.label} ({name})" for name, f in FAMILIES.items())
SPEC_FORMS = (
    f"a preset ({', '.join(PRESETS)}); a directory with config.json written by save_pretrained "
    f"of a base or head model of the families {_FAMILY_LIST}; a hub name like "
    "facebook/wav2vec2-base that is in the local Hugging Face cache; a fairseq wav2vec 2.0 or "
    "HuBERT .pt file; a Lightning .ckpt written by a ser stage"
)
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Where a backbone state dict begins: the key that every variant of every family has.
_ANCHOR = "feature_projection.projection.weight"
_PREFERRED_PREFIXES = ("backbone.", "model.wav2vec2.")


def preset_config(name: str, **overrides: Any) -> PreTrainedConfig:
    """The config of a preset (its family's config class), with ``overrides`` applied."""
    if name not in PRESETS:
        raise SerInputError(f"unknown backbone preset {name!r}; presets: {', '.join(PRESETS)}")
    return FAMILIES[PRESET_FAMILIES[name]].config(**{**PRESETS[name], **overrides})


def load_backbone(spec: str) -> Backbone:
    """The base model of its family (:data:`Backbone`) from any accepted ``spec`` (module
    docstring), in training mode.

    Training mode like any freshly built module, whatever the source: transformers'
    ``from_pretrained`` returns eval mode, and Lightning keeps submodules' modes, so a backbone
    left in eval mode would silently train without dropout. Call ``.eval()`` for inference.
    """
    kind, value = _resolve(spec)
    if kind == "preset":
        model = FAMILIES[PRESET_FAMILIES[spec]].model(preset_config(spec))
    elif kind == "directory":
        model = _from_directory(value)
    elif kind == "hub":
        model = _from_hub_cache(spec)
    elif kind == "fairseq":
        model = _from_fairseq(value, spec, pretraining=False)
    else:
        model = _from_lightning(value, Path(spec), pretraining=False)
    set_gradient_checkpointing(model, False)
    log.info("backbone: %s", describe_backbone(spec, model))
    return model.train()


def load_pretraining_model(spec: str) -> Wav2Vec2ForPreTraining:
    """A ``Wav2Vec2ForPreTraining`` for TAPT from any accepted ``spec``, in training mode (see
    :func:`load_backbone`). Where the source has no quantizer or projection heads (a plain
    backbone), they start fresh. Another family is refused (:func:`tapt_refusal`)."""
    kind, value = _resolve(spec)
    if kind == "preset":
        _require_wav2vec2(spec, PRESET_FAMILIES[spec])
        model = Wav2Vec2ForPreTraining(preset_config(spec))
    elif kind in ("directory", "hub"):
        config_file = value / "config.json" if kind == "directory" else _hub_config(spec)
        _require_wav2vec2(spec, _read_family(config_file)[0])
        source = value if kind == "directory" else spec
        model = _pretraining_from_pretrained(source, hub=kind == "hub")
    elif kind == "fairseq":
        model = _from_fairseq(value, spec, pretraining=True)
    else:
        model = _from_lightning(value, Path(spec), pretraining=True)
    set_gradient_checkpointing(model, False)
    log.info("pretraining model: %s", describe_backbone(spec, model))
    return model.train()


def backbone_family(spec: str) -> str | None:
    """The family (``model_type``) of ``spec`` from its preset name or config files, without
    loading weights: a directory's ``config.json``, the :data:`MODEL_JSON` beside a checkpoint
    file, a hub name's cached ``config.json``. None where that cannot tell: a file with no
    :data:`MODEL_JSON` beside it (a fairseq ``.pt``: known once loaded), a hub name not in the
    cache, a spec that names nothing. Raises SerInputError for an unsupported family."""
    if spec in PRESETS:
        return PRESET_FAMILIES[spec]
    path = Path(spec).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        return _read_family(config_file)[0] if config_file.is_file() else None
    if path.is_file():
        manifest = path.parent / MODEL_JSON
        return _manifest_family(manifest, _read_manifest(manifest)) if manifest.is_file() else None
    if _HUB_NAME.fullmatch(spec):
        cached = _cached_hub_config(spec)
        return _read_family(cached)[0] if cached is not None else None
    return None


def tapt_refusal(spec: str) -> str | None:
    """Why TAPT cannot start from ``spec`` (read as :func:`backbone_family` reads it), or None:
    TAPT needs wav2vec 2.0's quantizer and contrastive head, which no other family has."""
    family = backbone_family(spec)
    return None if family in (None, WAV2VEC2) else _tapt_reason(family)


def _tapt_reason(family: str) -> str:
    label = FAMILIES[family].label
    return (
        f"is a {label} model (model_type {family!r}): TAPT needs wav2vec 2.0's quantizer and "
        f"contrastive head (Wav2Vec2ForPreTraining), which {label} lacks. For {label}, use "
        "P-TAPT (method ptapt; its phase 2 pretrains any family on k-means frame labels) or "
        "fine-tune directly (method vft)"
    )


def _require_wav2vec2(spec: str, family: str) -> None:
    if family != WAV2VEC2:
        raise SerInputError(f"backbone {spec!r} {_tapt_reason(family)}")


def set_gradient_checkpointing(model: PreTrainedModel, enabled: bool) -> None:
    """Turn activation checkpointing of every layer of ``model`` on or off (every family).

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
    """A short description for logs: where the backbone came from, its family and size."""
    source = f"preset {spec!r} (random init)" if spec in PRESETS else repr(spec)
    if model is None:
        return source
    config = model.config
    family = FAMILIES.get(config.model_type)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    # data2vec-audio has no layer-norm-first variant, nor the config key.
    stable = getattr(config, "do_stable_layer_norm", False)
    norm = "layer-norm-first" if stable else "post-layer-norm"
    return (
        f"{source}: {family.label if family else config.model_type}, "
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {norm}, "
        f"{params:.1f} M parameters"
    )


def save_backbone(model: PreTrainedModel, directory: str | os.PathLike[str]) -> Path:
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


def write_model_json(directory: str | os.PathLike[str], config: PreTrainedConfig) -> Path:
    """Write :data:`MODEL_JSON` (the backbone config, whose ``model_type`` names the family)
    beside a stage's checkpoints."""
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


def _from_fairseq(
    checkpoint: dict[str, Any], source: str, pretraining: bool
) -> Backbone | Wav2Vec2ForPreTraining:
    """Every fairseq ``.pt`` goes through here: the importer of the checkpoint's family, read
    from its model name (``ser.models.fairseq_import``: wav2vec 2.0 and HuBERT)."""
    if pretraining:
        _require_wav2vec2(source, fairseq_family(checkpoint, source))
        return w2v2_pretraining_from_fairseq_checkpoint(checkpoint, source)
    return backbone_from_fairseq_checkpoint(checkpoint, source)


def _from_directory(path: Path) -> Backbone:
    family, architectures = _read_family(path / "config.json")
    if family == WAV2VEC2 and "Wav2Vec2ForPreTraining" in architectures:
        # Load it whole and take its backbone: strict, and no report of "unused" heads.
        return _checked_pretrained(Wav2Vec2ForPreTraining, path).wav2vec2
    # Any other head model loads as its base model (transformers strips the head's prefix).
    return _checked_pretrained(FAMILIES[family].model, path)


def _from_hub_cache(name: str) -> Backbone:
    family, _ = _read_family(_hub_config(name))
    try:
        return _checked_pretrained(FAMILIES[family].model, name, local_files_only=True)
    except OSError as err:
        raise SerInputError(_no_network_advice(name)) from err


def _hub_config(name: str) -> Path:
    """The cached ``config.json`` of hub model ``name``, or the advice to fetch it."""
    cached = _cached_hub_config(name)
    if cached is None:
        raise SerInputError(_no_network_advice(name))
    return cached


def _cached_hub_config(name: str) -> Path | None:
    """The ``config.json`` of hub model ``name`` in the local cache, never the network."""
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # huggingface_hub's refusal of an invalid repo id
        return None
    return Path(cached) if isinstance(cached, str) else None


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


def _read_family(config_file: Path) -> tuple[str, list[str]]:
    """(family, architectures) of a ``config.json``: its ``model_type``, or for a config without
    one the family of its ``architectures``. Refuses a family not in :data:`FAMILIES`."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise SerInputError(f"{config_file} is not readable JSON: {err}") from err
    if not isinstance(config, dict):
        raise SerInputError(f"{config_file} is not a model config (a JSON object)")
    architectures = [str(a) for a in config.get("architectures") or []]
    family = config.get("model_type") or _architectures_family(architectures)
    return _supported(family, config_file), architectures


def _architectures_family(architectures: list[str]) -> str | None:
    prefixes = {f.class_prefix: name for name, f in FAMILIES.items()}
    for architecture in architectures:
        match = _ARCHITECTURE.fullmatch(architecture)
        if match:
            return prefixes[match.group(1)]
    return None


def _supported(family: Any, source: Path) -> str:
    if family not in FAMILIES:
        raise SerInputError(
            f"{source} describes a {family!r} model, not a supported backbone; supported "
            f"families (model_type): {_FAMILY_LIST}"
        )
    return str(family)


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
) -> Backbone | Wav2Vec2ForPreTraining:
    state = checkpoint["state_dict"]
    config = _lightning_config(path)
    prefix = _backbone_prefix(state, path)
    backbone_state = _sub_state(state, prefix)
    if not pretraining:
        model = FAMILIES[config.model_type].model(config)
        _load_strict(model, backbone_state, path)
        return model
    _require_wav2vec2(str(path), config.model_type)
    model = Wav2Vec2ForPreTraining(config)
    if prefix.endswith("wav2vec2."):
        _load_strict(model, _sub_state(state, prefix[: -len("wav2vec2.")]), path)
    else:
        log.warning("%s holds a backbone only: the pretraining heads start from random init", path)
        _load_strict(model.wav2vec2, backbone_state, path)
    return model


def _lightning_config(path: Path) -> PreTrainedConfig:
    manifest = path.parent / MODEL_JSON
    if not manifest.is_file():
        raise SerInputError(
            f"checkpoint {path} has no {MODEL_JSON} beside it; a ser stage writes one with the "
            "backbone config. Copy it from the stage's output directory."
        )
    data = _read_manifest(manifest)
    family = _manifest_family(manifest, data)
    try:
        return FAMILIES[family].config.from_dict(data["backbone_config"])
    except (ValueError, TypeError) as err:
        raise SerInputError(f"{manifest} is not a valid backbone description: {err}") from err


def _read_manifest(manifest: Path) -> dict[str, Any]:
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise SerInputError(f"{manifest} is not a valid backbone description: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("backbone_config"), dict):
        raise SerInputError(
            f"{manifest} is not a valid backbone description: no 'backbone_config' object"
        )
    return data


def _manifest_family(manifest: Path, data: dict[str, Any]) -> str:
    # model.json files written before other families were supported are all wav2vec 2.0 (their
    # config's to_dict() carries model_type anyway; a hand-written one may not).
    return _supported(data["backbone_config"].get("model_type") or WAV2VEC2, manifest)


def _backbone_prefix(state: dict[str, torch.Tensor], path: Path) -> str:
    prefixes = sorted(k[: -len(_ANCHOR)] for k in state if k.endswith(_ANCHOR))
    for preferred in _PREFERRED_PREFIXES:
        if preferred in prefixes:
            return preferred
    if len(prefixes) == 1:
        return prefixes[0]
    raise SerInputError(
        f"checkpoint {path}: expected one backbone in its state_dict (under 'backbone.' by "
        f"convention), found {len(prefixes)}: {prefixes}"
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
