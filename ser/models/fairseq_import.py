"""fairseq wav2vec 2.0 checkpoints -> transformers ``Wav2Vec2Model``, without importing fairseq.

fairseq 0.12 does not import on Python 3.11 and transformers 5 no longer ships its conversion
script, so the mapping lives here: the model options become a ``Wav2Vec2Config`` and the state
dict is renamed by an explicit table (:data:`_RENAMES`). Loading is strict: a key that neither
maps nor is a known pretraining-only key, or a model parameter that nothing fills, is an error.

:func:`load_fairseq_backbone` is the entry point for any fairseq backbone file: it reads the
family from the model name the checkpoint holds and hands HuBERT to ``fairseq_hubert``, which
builds on the helpers here.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import re
from typing import Any

import torch
from transformers import (
    HubertModel,
    PreTrainedConfig,
    Wav2Vec2Config,
    Wav2Vec2ForPreTraining,
    Wav2Vec2Model,
)

from ser.checkpoints import fairseq_model_options, safe_torch_load
from ser.errors import SerInputError

log = logging.getLogger(__name__)

# fairseq's Wav2Vec2Config defaults (fairseq/models/wav2vec/wav2vec2.py) for the options that
# shape the network; old checkpoints (args Namespace) may lack the later ones.
FAIRSEQ_W2V2_DEFAULTS: dict[str, Any] = {
    "extractor_mode": "default",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_type": "transformer",
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "dropout_input": 0.0,
    "dropout_features": 0.0,
    "final_dim": 0,
    "layer_norm_first": False,
    "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
    "conv_bias": False,
    "logit_temp": 0.1,
    "quantize_targets": False,
    "quantize_input": False,
    "latent_vars": 320,
    "latent_groups": 2,
    "latent_dim": 0,
    "quantizer_depth": 1,
    "target_glu": False,
    "mask_length": 10,
    "mask_prob": 0.65,
    "mask_channel_length": 10,
    "mask_channel_prob": 0.0,
    "num_negatives": 100,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "pos_conv_depth": 1,
    "conv_pos_batch_norm": False,
}

# fairseq model names (cfg.model._name / args.arch) of wav2vec 2.0 pretraining and fine-tuning.
_PRETRAINING_ARCHS = {"wav2vec2"}
_FINETUNED_ARCHS = {"wav2vec_ctc", "wav2vec2_ctc", "wav_ctc"}
# HuBERT (fairseq/models/hubert/): pretraining, and hubert_asr.py's CTC fine-tuning; loaded by
# ser.models.fairseq_hubert.
HUBERT_ARCHS = frozenset({"hubert"})
HUBERT_FINETUNED_ARCHS = frozenset({"hubert_ctc"})
# Backbone family of each fairseq model name that load_fairseq_backbone accepts.
_FAMILIES: dict[str, str] = {
    **dict.fromkeys(_PRETRAINING_ARCHS | _FINETUNED_ARCHS, "wav2vec2"),
    **dict.fromkeys(HUBERT_ARCHS | HUBERT_FINETUNED_ARCHS, "hubert"),
}
_FINETUNED_PREFIX = "w2v_encoder.w2v_model."
# Pretraining-only parts that Wav2Vec2Model has no place for.
_PRETRAINING_ONLY = ("quantizer.", "project_q.", "final_proj.", "target_glu.", "label_embs")
_FINETUNED_ONLY = ("w2v_encoder.proj.",)

# (fairseq key pattern, transformers key template). Weight norm of the positional conv is
# resolved per model in _weight_norm_names (torch's parametrizations or the old weight_g/_v).
_RENAMES: list[tuple[str, str]] = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)",
     r"feature_extractor.conv_layers.\1.conv.\2"),
    # extractor_mode "default": one GroupNorm in the first block
    (r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)",
     r"feature_extractor.conv_layers.0.layer_norm.\1"),
    # extractor_mode "layer_norm": Sequential(TransposeLast, LayerNorm, TransposeLast) per block
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)",
     r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"mask_emb", r"masked_spec_embed"),
    (r"encoder\.pos_conv\.0\.bias", r"encoder.pos_conv_embed.conv.bias"),
    (r"encoder\.pos_conv\.0\.(?:weight_g|parametrizations\.weight\.original0)", "<weight_g>"),
    (r"encoder\.pos_conv\.0\.(?:weight_v|parametrizations\.weight\.original1)", "<weight_v>"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)",
     r"encoder.layers.\1.attention.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)",
     r"encoder.layers.\1.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)",
     r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)",
     r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)",
     r"encoder.layers.\1.final_layer_norm.\2"),
]
# Wav2Vec2ForPreTraining's heads (keys relative to it; the backbone goes under "wav2vec2.").
_PRETRAINING_RENAMES: list[tuple[str, str]] = [
    (r"quantizer\.vars", r"quantizer.codevectors"),
    (r"quantizer\.weight_proj\.(weight|bias)", r"quantizer.weight_proj.\1"),
    (r"project_q\.(weight|bias)", r"project_q.\1"),
    (r"final_proj\.(weight|bias)", r"project_hid.\1"),
]


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """fairseq's ``conv_feature_layers`` string, e.g. ``"[(512, 10, 5)] + [(512, 3, 2)] * 4"``,
    evaluated without ``eval``: only lists of int triples, ``+`` and ``* int`` are allowed."""
    try:
        value = _literal_list(ast.parse(spec, mode="eval").body)
        layers = [tuple(int(v) for v in layer) for layer in value]
    except (SyntaxError, ValueError, TypeError) as err:
        raise SerInputError(
            f"fairseq option conv_feature_layers={spec!r} is not a list of (dim, kernel, stride) "
            f"triples ({err})"
        ) from err
    if not layers or any(len(layer) != 3 for layer in layers):
        raise SerInputError(
            f"fairseq option conv_feature_layers={spec!r}: expected (dim, kernel, stride) triples"
        )
    return layers  # type: ignore[return-value]


_MAX_REPEAT = 1000  # far above any real conv stack; stops "[(1, 1, 1)] * 10**9"


def _literal_list(node: ast.AST) -> list[Any]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _literal_list(node.left) + _literal_list(node.right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        count = ast.literal_eval(node.right)
        if not isinstance(count, int) or not 0 <= count <= _MAX_REPEAT:
            raise ValueError(f"repeat count {count!r} is not an int in [0, {_MAX_REPEAT}]")
        return _literal_list(node.left) * count
    if isinstance(node, ast.List):
        return [ast.literal_eval(item) for item in node.elts]
    raise ValueError(f"unsupported expression {ast.dump(node)[:60]}")


def w2v2_options(checkpoint: dict[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """The wav2vec 2.0 model options of a pretraining or fine-tuned (CTC) fairseq checkpoint,
    with fairseq's defaults filled in. Raises SerInputError for any other model."""
    options = fairseq_model_options(checkpoint, source)
    arch = options.get("_name") or options.get("arch")
    if arch in _FINETUNED_ARCHS or options.get("w2v_args") is not None:
        options = fairseq_pretraining_options(options.get("w2v_args"), source)
        arch = options.get("_name") or options.get("arch") or "wav2vec2"
    state = checkpoint.get("model")
    keys = state.keys() if isinstance(state, dict) else ()
    if arch == "wav2vec" or any(k.startswith("feature_aggregator.") for k in keys):
        raise SerInputError(
            f"{source} is a wav2vec 1.0 checkpoint (model '{arch}', feature_aggregator keys); "
            "expected wav2vec 2.0 (model 'wav2vec2' or a fine-tuned 'wav2vec_ctc'). wav2vec 1.0 "
            "is the phase-1 model of P-TAPT, not a backbone."
        )
    if arch not in _PRETRAINING_ARCHS:
        raise SerInputError(
            f"{source} holds a fairseq '{arch}' model; expected wav2vec 2.0 ('wav2vec2' or a "
            "fine-tuned 'wav2vec_ctc')."
        )
    return {**FAIRSEQ_W2V2_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}


def fairseq_pretraining_options(
    w2v_args: Any, source: str, family: str = "wav2vec 2.0"
) -> dict[str, Any]:
    """The options of the pretrained model inside a fine-tuned checkpoint (its ``w2v_args``)."""
    if isinstance(w2v_args, argparse.Namespace):
        return dict(vars(w2v_args))
    if isinstance(w2v_args, dict) and isinstance(w2v_args.get("model"), dict):
        return dict(w2v_args["model"])
    raise SerInputError(
        f"{source} is a fine-tuned fairseq model without the options of its {family} "
        "(w2v_args is missing); load it once in fairseq and save it again, or use the "
        "pretrained checkpoint it was fine-tuned from."
    )


def w2v2_config_from_fairseq(options: dict[str, Any]) -> Wav2Vec2Config:
    """A transformers config equal in architecture to fairseq's wav2vec 2.0 ``options``."""
    options = {**FAIRSEQ_W2V2_DEFAULTS, **options}
    _refuse_unsupported(options)
    layers = parse_conv_layers(str(options["conv_feature_layers"]))
    final_dim = options["final_dim"] or options["encoder_embed_dim"]
    return Wav2Vec2Config(
        hidden_size=options["encoder_embed_dim"],
        num_hidden_layers=options["encoder_layers"],
        num_attention_heads=options["encoder_attention_heads"],
        intermediate_size=options["encoder_ffn_embed_dim"],
        hidden_act=options["activation_fn"],
        hidden_dropout=options["dropout"],
        attention_dropout=options["attention_dropout"],
        activation_dropout=options["activation_dropout"],
        feat_proj_dropout=options["dropout_input"],
        feat_quantizer_dropout=options["dropout_features"],
        layerdrop=options["encoder_layerdrop"],
        feat_extract_norm="layer" if options["extractor_mode"] == "layer_norm" else "group",
        feat_extract_activation="gelu",
        conv_dim=[dim for dim, _, _ in layers],
        conv_kernel=[kernel for _, kernel, _ in layers],
        conv_stride=[stride for _, _, stride in layers],
        conv_bias=bool(options["conv_bias"]),
        num_conv_pos_embeddings=options["conv_pos"],
        num_conv_pos_embedding_groups=options["conv_pos_groups"],
        do_stable_layer_norm=bool(options["layer_norm_first"]),
        # A positive time-mask probability makes transformers build masked_spec_embed (mask_emb).
        mask_time_prob=options["mask_prob"] or 0.05,
        mask_time_length=options["mask_length"],
        mask_feature_prob=options["mask_channel_prob"],
        mask_feature_length=options["mask_channel_length"],
        num_codevectors_per_group=options["latent_vars"],
        num_codevector_groups=options["latent_groups"],
        codevector_dim=options["latent_dim"] or final_dim,
        proj_codevector_dim=final_dim,
        contrastive_logits_temperature=options["logit_temp"],
        num_negatives=options["num_negatives"],
    )


def _refuse_unsupported(options: dict[str, Any]) -> None:
    problems = []
    if options["layer_type"] != "transformer":
        problems.append(f"layer_type={options['layer_type']!r} (only 'transformer')")
    if int(options["pos_conv_depth"]) > 1:
        problems.append(f"pos_conv_depth={options['pos_conv_depth']} (only 1)")
    if options["conv_pos_batch_norm"]:
        problems.append("conv_pos_batch_norm=True")
    if options["quantize_input"]:
        problems.append("quantize_input=True")
    if options["extractor_mode"] not in ("default", "layer_norm"):
        problems.append(f"extractor_mode={options['extractor_mode']!r}")
    if problems:
        raise SerInputError(
            "fairseq wav2vec 2.0 variant not supported by transformers' Wav2Vec2Model: "
            + ", ".join(problems)
        )


def w2v2_state_dict_from_fairseq(
    fairseq_state: dict[str, torch.Tensor], config: Wav2Vec2Config
) -> dict[str, torch.Tensor]:
    """fairseq's state dict renamed for ``Wav2Vec2Model(config)``; pretraining-only and CTC keys
    dropped. Raises SerInputError naming any key it cannot place."""
    mapped, unmapped = rename_state(strip_finetuned_prefix(fairseq_state), _RENAMES)
    unmapped = [k for k in unmapped if not k.startswith(_PRETRAINING_ONLY + _FINETUNED_ONLY)]
    unmapped += [
        f"{k} (beyond the configured layers)" for k in mapped if beyond_configured_layers(k, config)
    ]
    if unmapped:
        raise SerInputError(
            f"fairseq checkpoint has {len(unmapped)} key(s) that do not map onto transformers' "
            f"Wav2Vec2Model: {shorten_keys(unmapped)}; it is not a plain wav2vec 2.0 model."
        )
    return mapped


def beyond_configured_layers(key: str, config: PreTrainedConfig) -> bool:
    """Whether a transformers key names a conv or transformer layer the config does not have."""
    for pattern, count in (
        (r"feature_extractor\.conv_layers\.(\d+)\.", config.num_feat_extract_layers),
        (r"encoder\.layers\.(\d+)\.", config.num_hidden_layers),
    ):
        match = re.match(pattern, key)
        if match and int(match.group(1)) >= count:
            return True
    return False


def strip_finetuned_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not any(k.startswith(_FINETUNED_PREFIX) for k in state):
        return dict(state)
    return {
        (k[len(_FINETUNED_PREFIX):] if k.startswith(_FINETUNED_PREFIX) else k): v
        for k, v in state.items()
    }


def rename_state(
    state: dict[str, torch.Tensor], renames: list[tuple[str, str]]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    weight_g, weight_v = _weight_norm_names()
    mapped: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        new = _rename(key, renames)
        if new is None:
            unmapped.append(key)
            continue
        mapped[new.replace("<weight_g>", weight_g).replace("<weight_v>", weight_v)] = value
    return mapped, unmapped


def _rename(key: str, renames: list[tuple[str, str]]) -> str | None:
    for pattern, template in renames:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    return None


def _weight_norm_names() -> tuple[str, str]:
    """State-dict names of the positional conv's weight norm in this torch + transformers."""
    prefix = "encoder.pos_conv_embed.conv."
    if hasattr(torch.nn.utils.parametrizations, "weight_norm"):
        return (
            prefix + "parametrizations.weight.original0",
            prefix + "parametrizations.weight.original1",
        )
    return prefix + "weight_g", prefix + "weight_v"


def shorten_keys(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_fairseq_w2v2(path: str | os.PathLike[str]) -> Wav2Vec2Model:
    """A fairseq wav2vec 2.0 checkpoint (pretrained or CTC fine-tuned) as a Wav2Vec2Model."""
    return w2v2_from_fairseq_checkpoint(safe_torch_load(path), str(path))


def load_fairseq_w2v2_pretraining(path: str | os.PathLike[str]) -> Wav2Vec2ForPreTraining:
    """A fairseq wav2vec 2.0 pretraining checkpoint, quantizer included, for TAPT."""
    return w2v2_pretraining_from_fairseq_checkpoint(safe_torch_load(path), str(path))


def w2v2_from_fairseq_checkpoint(checkpoint: dict[str, Any], source: str) -> Wav2Vec2Model:
    """:func:`load_fairseq_w2v2` on an already loaded checkpoint dict."""
    options, state = _model_parts(checkpoint, source)
    config = w2v2_config_from_fairseq(options)
    model = Wav2Vec2Model(config)
    strict_load(model, w2v2_state_dict_from_fairseq(state, config), source)
    warn_if_normalized(checkpoint, options, source)
    log.info("loaded fairseq wav2vec 2.0 %s (%d layers, hidden %d)", source,
             config.num_hidden_layers, config.hidden_size)
    return model


def w2v2_pretraining_from_fairseq_checkpoint(
    checkpoint: dict[str, Any], source: str
) -> Wav2Vec2ForPreTraining:
    """A pretraining checkpoint as ``Wav2Vec2ForPreTraining``: the backbone by
    :func:`w2v2_state_dict_from_fairseq`, quantizer and projections by their own renames.
    Fine-tuned checkpoints have no quantizer and are refused."""
    options, state = _model_parts(checkpoint, source)
    if not options["quantize_targets"] or "quantizer.vars" not in state:
        raise SerInputError(
            f"{source} has no quantizer (quantize_targets is off or the model is fine-tuned); "
            "TAPT needs a wav2vec 2.0 pretraining checkpoint with its quantizer."
        )
    if int(options["quantizer_depth"]) > 1 or options["target_glu"]:
        raise SerInputError(
            f"{source}: quantizer_depth > 1 or target_glu is not supported by transformers' "
            "Wav2Vec2ForPreTraining."
        )
    config = w2v2_config_from_fairseq(options)
    heads = {k: v for k, v in state.items() if k.startswith(_PRETRAINING_ONLY)}
    backbone = {k: v for k, v in state.items() if not k.startswith(_PRETRAINING_ONLY)}
    mapped = {f"wav2vec2.{k}": v for k, v in w2v2_state_dict_from_fairseq(backbone, config).items()}
    head_mapped, unmapped = rename_state(heads, _PRETRAINING_RENAMES)
    if unmapped:
        raise SerInputError(
            f"{source}: pretraining keys with no place: {shorten_keys(unmapped)}"
        )
    model = Wav2Vec2ForPreTraining(config)
    strict_load(model, {**mapped, **head_mapped}, source)
    warn_if_normalized(checkpoint, options, source)
    return model


def _model_parts(
    checkpoint: dict[str, Any], source: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    state = checkpoint.get("model")
    if not isinstance(state, dict):
        raise SerInputError(
            f"{source} has no 'model' state dict (keys: {sorted(checkpoint)[:10]}); expected a "
            "fairseq wav2vec 2.0 checkpoint as written by fairseq-train."
        )
    return w2v2_options(checkpoint, source), state


def strict_load(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or wrong_shape:
        parts = [
            f"{name}: {shorten_keys(keys)}"
            for name, keys in (("missing", missing), ("unexpected", unexpected),
                               ("wrong shape", wrong_shape))
            if keys
        ]
        raise SerInputError(
            f"fairseq checkpoint {source} does not match the architecture its options describe "
            f"({'; '.join(parts)}); the file may be damaged or a different model."
        )
    model.load_state_dict(state, strict=True)


def warn_if_normalized(checkpoint: dict[str, Any], options: dict[str, Any], source: str) -> None:
    # Large (LV-60) models were trained on per-utterance standardised audio; feeding raw audio
    # still runs but hurts. The data pipeline, not the backbone, has to do it.
    task = _section(checkpoint, "task")
    if options.get("normalize") or task.get("normalize"):
        log.warning(
            "%s was trained on normalised audio (zero mean, unit variance per utterance): "
            "normalise inputs the same way", source,
        )


def _section(checkpoint: dict[str, Any], name: str) -> dict[str, Any]:
    cfg = checkpoint.get("cfg")
    if isinstance(cfg, dict) and isinstance(cfg.get(name), dict):
        return cfg[name]
    args = checkpoint.get("args")
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else {}


# --- dispatch by model family -------------------------------------------------------------


def fairseq_family(checkpoint: dict[str, Any], source: str = "checkpoint") -> str:
    """The backbone family, "wav2vec2" or "hubert", of a fairseq checkpoint, read from its model
    name (``cfg.model._name`` or ``args.arch``; for a fine-tuned model, that of the pretrained
    model in ``w2v_args``), never from the file name. Raises SerInputError for anything else."""
    options = fairseq_model_options(checkpoint, source)
    name = options.get("_name") or options.get("arch")
    if options.get("w2v_args") is not None:
        # A fine-tuned model is of the family of the pretrained model it wraps.
        inner = fairseq_pretraining_options(options["w2v_args"], source)
        name = inner.get("_name") or inner.get("arch") or name
    if name in _FAMILIES:
        return _FAMILIES[name]
    raise _unknown_family(name, checkpoint, source)


def _unknown_family(name: Any, checkpoint: dict[str, Any], source: str) -> SerInputError:
    state = checkpoint.get("model")
    keys = state.keys() if isinstance(state, dict) else ()
    if name == "wav2vec" or any(k.startswith("feature_aggregator.") for k in keys):
        return SerInputError(
            f"{source} is a wav2vec 1.0 checkpoint (model '{name}'); wav2vec 1.0 is the phase-1 "
            "model of P-TAPT, not a backbone."
        )
    what = f"a fairseq '{name}' model" if name else "no model name (cfg.model._name or args.arch)"
    return SerInputError(
        f"{source} holds {what}; ser loads fairseq backbones of the families wav2vec 2.0 "
        f"(models {sorted(k for k, v in _FAMILIES.items() if v == 'wav2vec2')}) and HuBERT "
        f"(models {sorted(k for k, v in _FAMILIES.items() if v == 'hubert')})."
    )


def load_fairseq_backbone(path: str | os.PathLike[str]) -> Wav2Vec2Model | HubertModel:
    """A fairseq wav2vec 2.0 or HuBERT checkpoint (pretrained or CTC fine-tuned) as
    transformers' Wav2Vec2Model or HubertModel, whichever its model name says."""
    return backbone_from_fairseq_checkpoint(safe_torch_load(path), str(path))


def backbone_from_fairseq_checkpoint(
    checkpoint: dict[str, Any], source: str
) -> Wav2Vec2Model | HubertModel:
    """:func:`load_fairseq_backbone` on an already loaded checkpoint dict."""
    if fairseq_family(checkpoint, source) == "hubert":
        # Imported here because fairseq_hubert builds on this module's helpers.
        from ser.models.fairseq_hubert import hubert_from_fairseq_checkpoint

        return hubert_from_fairseq_checkpoint(checkpoint, source)
    return w2v2_from_fairseq_checkpoint(checkpoint, source)
