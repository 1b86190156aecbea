"""Build fairseq-format wav2vec 2.0 checkpoints from transformers models, for the tests.

The renames here run the other way from ``ser.models.fairseq_import`` and are written out
independently (transformers name -> fairseq name), so a wrong rule there is not mirrored here.
The real proof against fairseq itself is ``test_parity_w2v2.py`` on fixtures made by fairseq.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining, Wav2Vec2Model

_TO_FAIRSEQ = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
    (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.", "<conv-norm \\1>."),
    (r"feature_projection\.layer_norm\.", "layer_norm."),
    (r"feature_projection\.projection\.", "post_extract_proj."),
    (r"masked_spec_embed$", "mask_emb"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0$",
     "encoder.pos_conv.0.weight_g"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1$",
     "encoder.pos_conv.0.weight_v"),
    (r"encoder\.pos_conv_embed\.conv\.bias$", "encoder.pos_conv.0.bias"),
    (r"encoder\.layers\.(\d+)\.attention\.", r"encoder.layers.\1.self_attn."),
    (r"encoder\.layers\.(\d+)\.layer_norm\.", r"encoder.layers.\1.self_attn_layer_norm."),
    (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.", r"encoder.layers.\1.fc1."),
    (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.", r"encoder.layers.\1.fc2."),
]


def to_fairseq_state(model: Wav2Vec2Model) -> dict[str, torch.Tensor]:
    """A transformers backbone's weights under fairseq's names."""
    layer_norm_mode = model.config.feat_extract_norm == "layer"
    state = {}
    for key, value in model.state_dict().items():
        new = key
        for pattern, template in _TO_FAIRSEQ:
            new = re.sub(pattern, template, new)
        # GroupNorm sits at index 2 of fairseq's first conv block; LayerNorm inside a
        # Sequential(TransposeLast, LayerNorm, TransposeLast) at index 2 of every block.
        new = re.sub(
            r"<conv-norm (\d+)>",
            r"feature_extractor.conv_layers.\1.2.1" if layer_norm_mode
            else r"feature_extractor.conv_layers.\1.2",
            new,
        )
        state[new] = value.clone()
    return state


def fairseq_options(config: Wav2Vec2Config) -> dict[str, Any]:
    """fairseq's model options for a transformers config (what cfg['model'] holds)."""
    layers = list(zip(config.conv_dim, config.conv_kernel, config.conv_stride, strict=True))
    return {
        "_name": "wav2vec2",
        "extractor_mode": "layer_norm" if config.feat_extract_norm == "layer" else "default",
        "encoder_layers": config.num_hidden_layers,
        "encoder_embed_dim": config.hidden_size,
        "encoder_ffn_embed_dim": config.intermediate_size,
        "encoder_attention_heads": config.num_attention_heads,
        "activation_fn": "gelu",
        "layer_norm_first": config.do_stable_layer_norm,
        "conv_feature_layers": " + ".join(f"[{layer}]" for layer in layers),
        "conv_bias": config.conv_bias,
        "conv_pos": config.num_conv_pos_embeddings,
        "conv_pos_groups": config.num_conv_pos_embedding_groups,
        "final_dim": config.proj_codevector_dim,
        "latent_dim": config.codevector_dim,
        "latent_vars": config.num_codevectors_per_group,
        "latent_groups": config.num_codevector_groups,
        "quantize_targets": True,
        "mask_prob": 0.65,
        "mask_length": 10,
    }


def pretraining_heads(model: Wav2Vec2ForPreTraining) -> dict[str, torch.Tensor]:
    """Quantizer and projections of a transformers pretraining model under fairseq's names."""
    return {
        "quantizer.vars": model.quantizer.codevectors.detach().clone(),
        "quantizer.weight_proj.weight": model.quantizer.weight_proj.weight.detach().clone(),
        "quantizer.weight_proj.bias": model.quantizer.weight_proj.bias.detach().clone(),
        "project_q.weight": model.project_q.weight.detach().clone(),
        "project_q.bias": model.project_q.bias.detach().clone(),
        "final_proj.weight": model.project_hid.weight.detach().clone(),
        "final_proj.bias": model.project_hid.bias.detach().clone(),
    }


def write_fairseq_checkpoint(
    path: Path,
    model: Wav2Vec2Model,
    fmt: str = "cfg",
    extra_state: dict[str, torch.Tensor] | None = None,
    drop_options: tuple[str, ...] = (),
) -> Path:
    """Write ``model`` as a fairseq pretraining checkpoint: ``fmt`` "cfg" (new, plain dict),
    "args" (old, argparse.Namespace) or "finetuned" (CTC model, prefixed keys, w2v_args)."""
    options = fairseq_options(model.config)
    for name in drop_options:
        options.pop(name)
    state = {**to_fairseq_state(model), **(extra_state or {})}
    training_state = {"optimizer_history": [{"num_updates": 1}], "extra_state": {"epoch": 1}}
    if fmt == "cfg":
        checkpoint = {"cfg": {"model": options, "task": {"normalize": False}}, "model": state}
    elif fmt == "args":
        options["arch"] = options.pop("_name")
        checkpoint = {"args": argparse.Namespace(**options), "model": state}
    elif fmt == "finetuned":
        prefixed = {f"w2v_encoder.w2v_model.{k}": v for k, v in state.items()}
        hidden = model.config.hidden_size
        prefixed["w2v_encoder.proj.weight"] = torch.randn(32, hidden)
        prefixed["w2v_encoder.proj.bias"] = torch.randn(32)
        w2v_args = {"model": options, "task": {"normalize": False}}
        ctc = {"_name": "wav2vec_ctc", "w2v_path": "/x/wav2vec_small.pt", "w2v_args": w2v_args}
        checkpoint = {"cfg": {"model": ctc}, "model": prefixed}
    else:
        raise ValueError(fmt)
    torch.save({**checkpoint, **training_state}, path)
    return path


# --- HuBERT -------------------------------------------------------------------------------
# fairseq's HuBERT is built from the same conv extractor and transformer encoder as wav2vec 2.0,
# and transformers' Hubert modules carry Wav2Vec2's names, so to_fairseq_state serves both.


def hubert_fairseq_options(config: Any) -> dict[str, Any]:
    """fairseq's HuBERT model options for a transformers ``HubertConfig``."""
    layers = list(zip(config.conv_dim, config.conv_kernel, config.conv_stride, strict=True))
    return {
        "_name": "hubert",
        "label_rate": 50,
        "extractor_mode": "layer_norm" if config.feat_extract_norm == "layer" else "default",
        "encoder_layers": config.num_hidden_layers,
        "encoder_embed_dim": config.hidden_size,
        "encoder_ffn_embed_dim": config.intermediate_size,
        "encoder_attention_heads": config.num_attention_heads,
        "activation_fn": "gelu",
        "layer_norm_first": config.do_stable_layer_norm,
        "conv_feature_layers": " + ".join(f"[{layer}]" for layer in layers),
        "conv_bias": config.conv_bias,
        "conv_pos": config.num_conv_pos_embeddings,
        "conv_pos_groups": config.num_conv_pos_embedding_groups,
        "final_dim": 16,
        "feature_grad_mult": 0.1,
        "mask_prob": 0.8,
        "mask_length": 10,
    }


def hubert_pretraining_heads(hidden: int, classes: int = 12, final_dim: int = 16) -> dict[
    str, torch.Tensor
]:
    """Random stand-ins for fairseq HuBERT's pretraining-only parameters."""
    return {
        "label_embs_concat": torch.randn(classes, final_dim),
        "final_proj.weight": torch.randn(final_dim, hidden),
        "final_proj.bias": torch.randn(final_dim),
    }


def write_fairseq_hubert_checkpoint(
    path: Path, model: torch.nn.Module, fmt: str = "cfg",
    extra_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a transformers ``HubertModel`` as a fairseq HuBERT checkpoint, pretraining heads
    included: ``fmt`` "cfg" (plain dict), "args" (argparse.Namespace) or "finetuned"
    (``hubert_ctc``: prefixed keys, CTC head, the pretraining options in ``w2v_args``)."""
    options = hubert_fairseq_options(model.config)
    heads = hubert_pretraining_heads(model.config.hidden_size)
    state = {**to_fairseq_state(model), **heads, **(extra_state or {})}  # type: ignore[arg-type]
    task = {"_name": "hubert_pretraining", "normalize": False, "labels": ["km"]}
    if fmt == "cfg":
        checkpoint: dict[str, Any] = {"cfg": {"model": options, "task": task}, "model": state}
    elif fmt == "args":
        options["arch"] = options.pop("_name")
        checkpoint = {"args": argparse.Namespace(**options), "model": state}
    elif fmt == "finetuned":
        prefixed = {f"w2v_encoder.w2v_model.{k}": v for k, v in state.items()
                    if k not in ("final_proj.weight", "final_proj.bias")}
        prefixed["w2v_encoder.proj.weight"] = torch.randn(32, model.config.hidden_size)
        prefixed["w2v_encoder.proj.bias"] = torch.randn(32)
        ctc = {"_name": "hubert_ctc", "w2v_path": "/x/hubert_base_ls960.pt",
               "w2v_args": {"model": options, "task": task}}
        checkpoint = {"cfg": {"model": ctc, "task": task}, "model": prefixed}
    else:
        raise ValueError(fmt)
    torch.save({**checkpoint, "optimizer_history": [{"num_updates": 1}]}, path)
    return path
