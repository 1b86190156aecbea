"""fairseq HuBERT checkpoints -> transformers ``HubertModel``, without importing fairseq.

fairseq builds HuBERT (fairseq/models/hubert/hubert.py) from wav2vec 2.0's own
``ConvFeatureExtractionModel`` and ``TransformerEncoder``, and transformers' Hubert modules copy
Wav2Vec2's names, so the backbone's key map is :data:`_HUBERT_RENAMES`, written out here, and
the architecture options are read the same way. What differs is what surrounds the backbone:
the pretraining heads (:data:`HUBERT_PRETRAINING_ONLY`, dropped by name), a feature layer norm
that every HuBERT has, and a feature projection that fairseq omits when the conv and encoder
widths agree. Loading is strict, as for wav2vec 2.0: every fairseq key is mapped or dropped by
name, and every ``HubertModel`` parameter is filled.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import HubertConfig, HubertModel

from ser.checkpoints import fairseq_model_options, safe_torch_load
from ser.errors import SerInputError
from ser.models.fairseq_import import (
    HUBERT_ARCHS,
    HUBERT_FINETUNED_ARCHS,
    beyond_configured_layers,
    fairseq_pretraining_options,
    parse_conv_layers,
    rename_state,
    shorten_keys,
    strict_load,
    strip_finetuned_prefix,
    warn_if_normalized,
)

log = logging.getLogger(__name__)

# fairseq's HubertConfig defaults (fairseq/models/hubert/hubert.py, fairseq 0.12) for the
# options that shape the network or that the transformers config records; old checkpoints
# (args Namespace) hold only the options given on the command line. The rest of its fields
# (label_rate, losses, feature_grad_mult, required_seq_len_multiple) change no forward pass.
FAIRSEQ_HUBERT_DEFAULTS: dict[str, Any] = {
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
    "layer_norm_first": False,
    "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "conv_bias": False,
    "mask_length": 10,
    "mask_prob": 0.65,
    "mask_channel_length": 10,
    "mask_channel_prob": 0.0,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "conv_pos_batch_norm": False,
    "pos_conv_depth": 1,  # not a HuBERT option; fairseq's encoder reads it with default 1
    "pos_enc_type": "abs",
}

# Keys of the pretraining model (and of the CTC head) that HubertModel has no place for; named
# one by one so that anything else unplaced is an error.
HUBERT_PRETRAINING_ONLY = frozenset({
    "label_embs_concat",  # codeword embeddings of the k-means targets
    "final_proj.weight", "final_proj.bias",  # projection to the codeword space
    "target_glu.0.weight", "target_glu.0.bias",  # only with target_glu=True
})
HUBERT_FINETUNED_ONLY = frozenset({"w2v_encoder.proj.weight", "w2v_encoder.proj.bias"})

# (fairseq key pattern, transformers key template); <weight_g>/<weight_v> are the positional
# conv's weight norm, named as this torch names it.
_HUBERT_RENAMES: list[tuple[str, str]] = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)",
     r"feature_extractor.conv_layers.\1.conv.\2"),
    # extractor_mode "default": GroupNorm(dim, dim) at index 2 of the first conv block only
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

# fairseq activation names -> transformers' ACT2FN names of the same function.
_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_accurate": "gelu_new", "tanh": "tanh",
                "linear": "linear"}


def hubert_options(checkpoint: dict[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """The HuBERT model options of a pretraining or fine-tuned (``hubert_ctc``) fairseq
    checkpoint, with fairseq's defaults filled in. Raises SerInputError for any other model."""
    options = fairseq_model_options(checkpoint, source)
    name = options.get("_name") or options.get("arch")
    if name in HUBERT_FINETUNED_ARCHS or options.get("w2v_args") is not None:
        options = fairseq_pretraining_options(options.get("w2v_args"), source, "HuBERT")
        name = options.get("_name") or options.get("arch") or "hubert"
    if name not in HUBERT_ARCHS:
        raise SerInputError(
            f"{source} holds a fairseq '{name}' model; expected HuBERT ('hubert' or a fine-tuned "
            "'hubert_ctc')."
        )
    return {**FAIRSEQ_HUBERT_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}


def hubert_config_from_fairseq(options: dict[str, Any], source: str = "checkpoint") -> HubertConfig:
    """A transformers config equal in architecture to fairseq's HuBERT ``options``."""
    options = {**FAIRSEQ_HUBERT_DEFAULTS, **options}
    _refuse_unsupported(options, source)
    layers = parse_conv_layers(str(options["conv_feature_layers"]))
    return HubertConfig(
        hidden_size=int(options["encoder_embed_dim"]),
        num_hidden_layers=int(options["encoder_layers"]),
        num_attention_heads=int(options["encoder_attention_heads"]),
        intermediate_size=int(options["encoder_ffn_embed_dim"]),
        hidden_act=_ACTIVATIONS[str(options["activation_fn"])],
        hidden_dropout=float(options["dropout"]),
        attention_dropout=float(options["attention_dropout"]),
        activation_dropout=float(options["activation_dropout"]),
        feat_proj_dropout=float(options["dropout_input"]),
        layerdrop=float(options["encoder_layerdrop"]),
        # fairseq's HuBERT always normalises the conv features (self.layer_norm) before the
        # projection, whatever the extractor mode.
        feat_proj_layer_norm=True,
        feat_extract_norm="layer" if options["extractor_mode"] == "layer_norm" else "group",
        feat_extract_activation="gelu",  # fairseq's conv blocks always use nn.GELU
        conv_dim=[dim for dim, _, _ in layers],
        conv_kernel=[kernel for _, kernel, _ in layers],
        conv_stride=[stride for _, _, stride in layers],
        conv_bias=bool(options["conv_bias"]),
        num_conv_pos_embeddings=int(options["conv_pos"]),
        num_conv_pos_embedding_groups=int(options["conv_pos_groups"]),
        do_stable_layer_norm=bool(options["layer_norm_first"]),
        # A positive time-mask probability makes transformers build masked_spec_embed (mask_emb).
        mask_time_prob=float(options["mask_prob"] or 0.05),
        mask_time_length=int(options["mask_length"]),
        mask_feature_prob=float(options["mask_channel_prob"]),
        mask_feature_length=int(options["mask_channel_length"]),
    )


def _refuse_unsupported(options: dict[str, Any], source: str) -> None:
    problems = []
    if options["layer_type"] != "transformer":
        problems.append(f"layer_type={options['layer_type']!r} (only 'transformer')")
    if options["pos_enc_type"] != "abs":
        problems.append(f"pos_enc_type={options['pos_enc_type']!r} (only 'abs')")
    if int(options["pos_conv_depth"]) > 1:
        problems.append(f"pos_conv_depth={options['pos_conv_depth']} (only 1)")
    if options["conv_pos_batch_norm"]:
        problems.append("conv_pos_batch_norm=True")
    if options["extractor_mode"] not in ("default", "layer_norm"):
        problems.append(f"extractor_mode={options['extractor_mode']!r}")
    if options["activation_fn"] not in _ACTIVATIONS:
        problems.append(f"activation_fn={options['activation_fn']!r}")
    if problems:
        raise SerInputError(
            f"{source}: fairseq HuBERT variant not supported by transformers' HubertModel: "
            + ", ".join(problems)
        )


def hubert_state_dict_from_fairseq(
    fairseq_state: dict[str, torch.Tensor], config: HubertConfig, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """fairseq's HuBERT state dict renamed for ``HubertModel(config)``; the pretraining heads
    and the CTC head dropped by name. Raises SerInputError naming any key it cannot place."""
    state = strip_finetuned_prefix(fairseq_state)
    kept = {k: v for k, v in state.items()
            if k not in HUBERT_PRETRAINING_ONLY | HUBERT_FINETUNED_ONLY}
    mapped, unmapped = rename_state(kept, _HUBERT_RENAMES)
    unmapped += [f"{k} (beyond the configured layers)" for k in mapped
                 if beyond_configured_layers(k, config)]
    if unmapped:
        raise SerInputError(
            f"{source}: fairseq HuBERT checkpoint has {len(unmapped)} key(s) that do not map onto "
            f"transformers' HubertModel: {shorten_keys(unmapped)}; it is not a plain HuBERT."
        )
    return _with_identity_projection(mapped, config)


def _with_identity_projection(
    mapped: dict[str, torch.Tensor], config: HubertConfig
) -> dict[str, torch.Tensor]:
    # fairseq has no post_extract_proj when the last conv width equals the encoder width (it
    # feeds the features straight in); HubertModel always has one, so it becomes the identity.
    projected = "feature_projection.projection.weight" in mapped
    if projected or config.conv_dim[-1] != config.hidden_size:
        return mapped
    return {
        **mapped,
        "feature_projection.projection.weight": torch.eye(config.hidden_size),
        "feature_projection.projection.bias": torch.zeros(config.hidden_size),
    }


def load_fairseq_hubert(path: str | os.PathLike[str]) -> HubertModel:
    """A fairseq HuBERT checkpoint (pretrained or ``hubert_ctc`` fine-tuned) as a HubertModel."""
    return hubert_from_fairseq_checkpoint(safe_torch_load(path), str(path))


def hubert_from_fairseq_checkpoint(checkpoint: dict[str, Any], source: str) -> HubertModel:
    """:func:`load_fairseq_hubert` on an already loaded checkpoint dict."""
    state = checkpoint.get("model")
    if not isinstance(state, dict):
        raise SerInputError(
            f"{source} has no 'model' state dict (keys: {sorted(checkpoint)[:10]}); expected a "
            "fairseq HuBERT checkpoint as written by fairseq-train."
        )
    options = hubert_options(checkpoint, source)
    config = hubert_config_from_fairseq(options, source)
    model = HubertModel(config)
    strict_load(model, hubert_state_dict_from_fairseq(state, config, source), source)
    warn_if_normalized(checkpoint, options, source)
    log.info("loaded fairseq HuBERT %s (%d layers, hidden %d)", source,
             config.num_hidden_layers, config.hidden_size)
    return model
