"""fairseq HuBERT checkpoints -> transformers' HubertModel, without fairseq: parity with the
outputs fairseq itself computed (fixtures from tests/parity/make_hubert_fixtures.py), the strict
key map, and the dispatch of a fairseq file to its family by the model name it holds.

Layout of ``fairseq_hubert_tiny*_outputs.npz``: ``input`` [B, samples] (padding zeroed),
``attention_mask`` [B, samples], ``frame_padding_mask`` [B, T] (True = padding),
``conv_features`` [B, T, C] (the conv stack's output, before the feature layer norm),
``layer_0`` .. ``layer_L`` (encoder input, then each layer's output, as transformers'
``hidden_states``) and ``last_hidden_state``. tests/parity/README.md has more.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fairseq_w2v2_helpers import hubert_fairseq_options, write_fairseq_hubert_checkpoint
from transformers import HubertConfig, HubertModel, Wav2Vec2Model

from ser.checkpoints import safe_torch_load
from ser.errors import SerInputError
from ser.models.fairseq_hubert import (
    FAIRSEQ_HUBERT_DEFAULTS,
    HUBERT_PRETRAINING_ONLY,
    hubert_config_from_fairseq,
    load_fairseq_hubert,
)
from ser.models.fairseq_import import fairseq_family, load_fairseq_backbone, load_fairseq_w2v2

FIXTURES = Path(__file__).parent / "fixtures"
CASES = {
    "fairseq_hubert_tiny.pt": "fairseq_hubert_tiny_outputs.npz",  # cfg dict, group norm
    "fairseq_hubert_tiny_args.pt": "fairseq_hubert_tiny_outputs.npz",  # args Namespace
    "fairseq_hubert_tiny_lnf.pt": "fairseq_hubert_tiny_lnf_outputs.npz",  # layer norm first
    "fairseq_hubert_tiny_lnf_args.pt": "fairseq_hubert_tiny_lnf_outputs.npz",
}
TOLERANCE = 1e-5


def _fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: generate it with tests/parity/make_hubert_fixtures.py")
    return path


def _run(model: HubertModel, expected: np.lib.npyio.NpzFile) -> dict[str, torch.Tensor]:
    wav = torch.from_numpy(expected["input"])
    with torch.no_grad():
        out = model(wav, attention_mask=torch.from_numpy(expected["attention_mask"]),
                    output_hidden_states=True)
        conv = model.feature_extractor(wav).transpose(1, 2)
    got = {f"layer_{i}": h for i, h in enumerate(out.hidden_states)}
    return {**got, "last_hidden_state": out.last_hidden_state, "conv_features": conv}


# --- parity with fairseq ------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", CASES)
def test_every_layer_matches_fairseq(checkpoint: str) -> None:
    model = load_fairseq_backbone(_fixture(checkpoint)).eval()
    assert type(model) is HubertModel
    expected = np.load(_fixture(CASES[checkpoint]))
    got = _run(model, expected)
    assert len(got) == model.config.num_hidden_layers + 3
    for name, tensor in got.items():
        reference = torch.from_numpy(expected[name])
        assert tensor.shape == reference.shape, name
        # Padded frames included: both implementations compute them the same way.
        diff = (tensor - reference).abs().max().item()
        assert diff < TOLERANCE, f"{checkpoint} {name}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("checkpoint", CASES)
def test_frame_mask_matches_fairseq(checkpoint: str) -> None:
    # fairseq's HuBERT splits the samples evenly among the frames; transformers counts conv
    # output lengths. The rules can differ by a frame in general; for this input they agree.
    model = load_fairseq_hubert(_fixture(checkpoint))
    expected = np.load(_fixture(CASES[checkpoint]))
    padding = torch.from_numpy(expected["frame_padding_mask"])
    frame_mask = model._get_feature_vector_attention_mask(
        padding.shape[1], torch.from_numpy(expected["attention_mask"])
    )
    assert torch.equal(frame_mask, ~padding)


@pytest.mark.parametrize(
    ("checkpoint", "norm", "stable", "bias"),
    [("fairseq_hubert_tiny_args.pt", "group", False, False),
     ("fairseq_hubert_tiny_lnf.pt", "layer", True, True)],
)
def test_config_is_read_from_both_checkpoint_shapes(
    checkpoint: str, norm: str, stable: bool, bias: bool
) -> None:
    config = load_fairseq_hubert(_fixture(checkpoint)).config
    assert (config.feat_extract_norm, config.do_stable_layer_norm, config.conv_bias) == (
        norm, stable, bias,
    )
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 4)
    assert (config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups) == (16, 4)
    assert list(config.conv_dim) == [24] * 7 and list(config.conv_stride) == [5] + [2] * 6


def test_pretraining_heads_are_in_the_fixture_and_dropped_by_name() -> None:
    state = safe_torch_load(_fixture("fairseq_hubert_tiny.pt"))["model"]
    assert {"label_embs_concat", "final_proj.weight", "final_proj.bias"} <= set(state)
    loaded = load_fairseq_hubert(_fixture("fairseq_hubert_tiny.pt"))
    assert torch.equal(loaded.masked_spec_embed, state["mask_emb"])
    assert "target_glu.0.weight" in HUBERT_PRETRAINING_ONLY


# --- dispatch by family -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("checkpoint", "family", "cls"),
    [("fairseq_w2v2_tiny.pt", "wav2vec2", Wav2Vec2Model),
     ("fairseq_w2v2_tiny_args.pt", "wav2vec2", Wav2Vec2Model),
     ("fairseq_hubert_tiny.pt", "hubert", HubertModel),
     ("fairseq_hubert_tiny_lnf_args.pt", "hubert", HubertModel)],
)
def test_dispatch_reads_the_family_from_the_checkpoint(
    tmp_path: Path, checkpoint: str, family: str, cls: type
) -> None:
    # A misleading file name must not matter: the model name inside decides.
    misleading = "hubert_base_ls960.pt" if family == "wav2vec2" else "wav2vec_small.pt"
    path = shutil.copy(_fixture(checkpoint), tmp_path / misleading)
    assert fairseq_family(safe_torch_load(path)) == family
    assert type(load_fairseq_backbone(path)) is cls


@pytest.mark.parametrize("fmt", ["cfg", "args", "finetuned"])
def test_dispatch_of_written_hubert_in_every_shape(tmp_path: Path, fmt: str) -> None:
    source = _tiny_hubert()
    path = write_fairseq_hubert_checkpoint(tmp_path / "model.pt", source, fmt=fmt)
    loaded = load_fairseq_backbone(path).eval()
    assert type(loaded) is HubertModel
    assert torch.equal(_outputs(loaded), _outputs(source))


@pytest.mark.parametrize(
    ("options", "shown"),
    [({"_name": "data2vec_audio"}, "'data2vec_audio' model"),
     ({"_name": "wav2vec_ctc", "w2v_args": {"model": {"_name": "wavlm"}}}, "'wavlm' model"),
     ({"encoder_layers": 2}, "no model name")],
)
def test_unknown_model_name_is_refused(tmp_path: Path, options: dict, shown: str) -> None:
    path = tmp_path / "other.pt"
    torch.save({"cfg": {"model": options}, "model": {"mask_emb": torch.zeros(4)}}, path)
    with pytest.raises(SerInputError, match=rf"{path}.* holds .*{shown}.*wav2vec 2\.0.*HuBERT"):
        load_fairseq_backbone(path)


def test_wav2vec1_is_refused_by_the_dispatcher(tmp_path: Path) -> None:
    path = tmp_path / "w2v1.pt"
    torch.save({"args": argparse.Namespace(arch="wav2vec"),
                "model": {"feature_aggregator.conv_layers.0.0.weight": torch.zeros(2)}}, path)
    with pytest.raises(SerInputError, match="wav2vec 1.0 checkpoint.*not a backbone"):
        load_fairseq_backbone(path)


def test_each_family_loader_refuses_the_other_family() -> None:
    with pytest.raises(SerInputError, match="'hubert' model; expected wav2vec 2.0"):
        load_fairseq_w2v2(_fixture("fairseq_hubert_tiny.pt"))
    with pytest.raises(SerInputError, match="'wav2vec2' model; expected HuBERT"):
        load_fairseq_hubert(_fixture("fairseq_w2v2_tiny.pt"))


def test_finetuned_hubert_without_w2v_args_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ctc.pt"
    torch.save({"cfg": {"model": {"_name": "hubert_ctc", "w2v_args": None}},
                "model": {"w2v_encoder.proj.weight": torch.zeros(1)}}, path)
    with pytest.raises(SerInputError, match="options of its HuBERT.*w2v_args is missing"):
        load_fairseq_backbone(path)


# --- strict key map -----------------------------------------------------------------------


def _edited_fixture(tmp_path: Path, edit: dict[str, torch.Tensor | None]) -> Path:
    """The group-norm fixture with keys removed (None) or added/replaced."""
    checkpoint = safe_torch_load(_fixture("fairseq_hubert_tiny.pt"))
    for key, value in edit.items():
        if value is None:
            del checkpoint["model"][key]
        else:
            checkpoint["model"][key] = value
    path = tmp_path / "edited.pt"
    torch.save(checkpoint, path)
    return path


def test_missing_key_is_named(tmp_path: Path) -> None:
    path = _edited_fixture(tmp_path, {"encoder.layers.1.fc2.weight": None})
    with pytest.raises(SerInputError, match=rf"{path}.*missing: encoder\.layers\.1\.feed_forward"
                                            r"\.output_dense\.weight"):
        load_fairseq_backbone(path)


@pytest.mark.parametrize(
    ("extra_key", "shown"),
    [("encoder.layers.0.adapter.weight", "encoder.layers.0.adapter.weight"),
     ("target_glu.1.weight", "target_glu.1.weight"),  # only the named heads are dropped
     ("encoder.layers.7.fc1.weight", "beyond the configured layers")],
)
def test_extra_key_is_named(tmp_path: Path, extra_key: str, shown: str) -> None:
    path = _edited_fixture(tmp_path, {extra_key: torch.zeros(3)})
    with pytest.raises(SerInputError, match=rf"{path}.*not map onto .*HubertModel.*{shown}"):
        load_fairseq_backbone(path)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    path = _edited_fixture(tmp_path, {"mask_emb": torch.zeros(5)})
    with pytest.raises(SerInputError, match="wrong shape: masked_spec_embed"):
        load_fairseq_backbone(path)


# --- config mapping and round trips without fairseq ----------------------------------------


def _tiny_hubert(seed: int = 0, **overrides: object) -> HubertModel:
    torch.manual_seed(seed)
    sizes: dict[str, object] = {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "conv_dim": [24] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2], "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
    }
    return HubertModel(HubertConfig(**{**sizes, **overrides})).eval()


def _outputs(model: HubertModel) -> torch.Tensor:
    wav = torch.randn(2, 6000, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6000, dtype=torch.long)
    mask[1, 4000:] = 0
    with torch.no_grad():
        return model(wav * mask, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize(
    "overrides",
    [{}, {"feat_extract_norm": "layer", "do_stable_layer_norm": True, "conv_bias": True}],
)
def test_round_trip_through_fairseq_names(tmp_path: Path, overrides: dict) -> None:
    source = _tiny_hubert(**overrides)
    loaded = load_fairseq_hubert(write_fairseq_hubert_checkpoint(tmp_path / "h.pt", source))
    expected, got = source.state_dict(), loaded.eval().state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_equal_widths_give_an_identity_projection(tmp_path: Path) -> None:
    # fairseq omits post_extract_proj when the conv width equals the encoder width.
    source = _tiny_hubert(conv_dim=[32] * 7)
    with torch.no_grad():
        source.feature_projection.projection.weight.copy_(torch.eye(32))
        source.feature_projection.projection.bias.zero_()
    path = write_fairseq_hubert_checkpoint(tmp_path / "h.pt", source)
    checkpoint = safe_torch_load(path)
    del checkpoint["model"]["post_extract_proj.weight"]
    del checkpoint["model"]["post_extract_proj.bias"]
    torch.save(checkpoint, path)
    loaded = load_fairseq_hubert(path).eval()
    assert torch.equal(loaded.feature_projection.projection.weight, torch.eye(32))
    assert torch.equal(_outputs(loaded), _outputs(source))


def test_config_fills_fairseq_defaults_and_ignores_training_options() -> None:
    config = hubert_config_from_fairseq({"encoder_layers": 3, "feature_grad_mult": 0.1,
                                         "untie_final_proj": True, "skip_masked": True})
    assert config.num_hidden_layers == 3
    assert config.hidden_size == FAIRSEQ_HUBERT_DEFAULTS["encoder_embed_dim"] == 768
    assert config.feat_extract_norm == "group" and not config.do_stable_layer_norm
    assert config.feat_proj_layer_norm  # fairseq's HuBERT always has self.layer_norm
    assert list(config.conv_kernel) == [10, 3, 3, 3, 3, 2, 2]
    assert (config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups) == (128, 16)


def test_config_round_trips_through_fairseq_options() -> None:
    source = _tiny_hubert(feat_extract_norm="layer", do_stable_layer_norm=True).config
    mapped = hubert_config_from_fairseq(hubert_fairseq_options(source))
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "conv_dim", "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm",
              "do_stable_layer_norm", "num_conv_pos_embeddings", "num_conv_pos_embedding_groups")
    assert {f: _plain(getattr(mapped, f)) for f in fields} == {
        f: _plain(getattr(source, f)) for f in fields
    }


def _plain(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize(
    ("options", "message"),
    [({"layer_type": "conformer"}, "layer_type"), ({"pos_enc_type": "rope"}, "pos_enc_type"),
     ({"conv_pos_batch_norm": True}, "conv_pos_batch_norm"),
     ({"activation_fn": "swish"}, "activation_fn"),
     ({"extractor_mode": "other"}, "extractor_mode")],
)
def test_unsupported_variants_are_refused(options: dict, message: str) -> None:
    with pytest.raises(SerInputError, match=f"checkpoint: fairseq HuBERT variant.*{message}"):
        hubert_config_from_fairseq(options)


def test_a_fairseq_hubert_file_is_a_backbone_spec_and_tapt_refuses_it() -> None:
    """Through ``load_backbone`` (what every stage calls) the file is a HubertModel; TAPT, which
    needs wav2vec 2.0's quantizer, refuses it and names P-TAPT."""
    from ser.models.backbones import load_backbone, load_pretraining_model

    path = FIXTURES / "fairseq_hubert_tiny.pt"
    assert isinstance(load_backbone(str(path)), HubertModel)
    assert isinstance(load_backbone(str(FIXTURES / "fairseq_w2v2_tiny.pt")), Wav2Vec2Model)
    with pytest.raises(SerInputError, match="P-TAPT"):
        load_pretraining_model(str(path))
