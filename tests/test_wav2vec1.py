"""The wav2vec 1.0 port: presets, option parsing, loading errors, saving, causality."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from ser.checkpoints import safe_torch_load
from ser.errors import SerInputError
from ser.models.wav2vec1 import (
    PRETRAINING_ONLY_PREFIXES,
    Wav2Vec1Config,
    Wav2Vec1Model,
    load_wav2vec1,
    parse_layer_spec,
    save_wav2vec1,
)

FIXTURES = Path(__file__).parent / "fixtures"
W2V1 = FIXTURES / "fairseq_w2v1_tiny.pt"


def _expected_large_params() -> int:
    """wav2vec_large's extractor + aggregator size, counted from the paper's layer table."""
    dim = 512
    feature = dim * 10 + dim * dim * 8 + 3 * dim * dim * 4 + 2 * dim * dim  # bias-free convs
    feature += 7 * 2 * dim  # GroupNorm scale and shift
    aggregator = sum(dim * dim * k + dim + 2 * dim for k in range(2, 14))  # conv, bias, norm
    return feature + aggregator


def test_large_preset_has_wav2vec_large_structure() -> None:
    model = load_wav2vec1("large")
    assert sum(p.numel() for p in model.parameters()) == _expected_large_params()
    keys = set(model.state_dict())
    # fairseq's key names: conv 0 / norm 2 in the extractor, pad 0 / conv 1 / norm 3 in the
    # aggregator; no residual projections as all layers have 512 channels.
    assert "feature_extractor.conv_layers.6.0.weight" in keys
    assert "feature_extractor.conv_layers.6.2.bias" in keys
    assert "feature_aggregator.conv_layers.11.1.bias" in keys
    assert "feature_aggregator.conv_layers.11.3.weight" in keys
    assert not any("residual_proj" in key for key in keys)
    assert model.receptive_field == 465  # 30 ms at 16 kHz (wav2vec paper)
    assert model.num_frames(16000) == 98  # 10 ms frames


def test_tiny_preset_runs_and_frame_formula_matches_convolutions() -> None:
    model = load_wav2vec1("tiny").eval()
    for samples in (model.receptive_field, 1000, 3201, 16000):
        with torch.no_grad():
            z, c = model(torch.randn(2, samples))
        assert z.shape == (2, model.config.embed_dim, model.num_frames(samples))
        assert c.shape == (2, model.config.output_dim, model.num_frames(samples))


def test_too_short_or_misshaped_audio_is_refused() -> None:
    model = load_wav2vec1("tiny")
    with pytest.raises(SerInputError, match="receptive field"):
        model(torch.randn(1, model.receptive_field - 1))
    with pytest.raises(SerInputError, match=r"\[batch, samples\]"):
        model(torch.randn(16000))


def test_unknown_spec_names_the_presets() -> None:
    with pytest.raises(SerInputError, match="large, tiny"):
        load_wav2vec1("wav2vec_huge")


def test_replication_padding_keeps_a_constant_input_constant() -> None:
    # The aggregator pads each causal convolution on the left by kernel - 1 frames, repeating
    # the first frame (fairseq's default) or with zeros (agg_zero_pad).
    torch.manual_seed(0)
    replicate = Wav2Vec1Model(Wav2Vec1Config(**_tiny_options())).eval()
    zero = Wav2Vec1Model(Wav2Vec1Config(**{**_tiny_options(), "agg_zero_pad": True})).eval()
    zero.load_state_dict(replicate.state_dict())
    z = (torch.rand(1, 16, 1) + 1.0).expand(1, 16, 30)
    with torch.no_grad():
        steady = replicate.feature_aggregator(z)
        padded = zero.feature_aggregator(z)
    assert steady.shape == padded.shape == z.shape
    assert torch.allclose(steady, steady[..., :1].expand_as(steady), atol=1e-5)
    assert not torch.allclose(padded[..., 0], padded[..., -1], atol=1e-3)


# --- options -------------------------------------------------------------------------------


def test_old_args_missing_later_options_get_fairseq_defaults() -> None:
    # wav2vec_large.pt's args predate activation, vq_* and infonce; dropout etc. are also gone.
    old = {
        "arch": "wav2vec",
        "conv_feature_layers": "[(512, 10, 5), (512, 8, 4)] + [(512, 4, 2)] * 3",
        "conv_aggregator_layers": "[(512, 3, 1)] * 2",
        "skip_connections_feat": True,
        "log_compression": False,
        "num_negatives": 10,  # pretraining-only: ignored
    }
    config = Wav2Vec1Config.from_fairseq_options(old)
    assert config.conv_feature_layers == [(512, 10, 5), (512, 8, 4)] + [(512, 4, 2)] * 3
    assert config.conv_aggregator_layers == [(512, 3, 1), (512, 3, 1)]
    assert config.skip_connections_feat is True
    assert config.log_compression is False  # given, so kept
    assert config.activation == "relu"  # missing: fairseq 0.12's defaults
    assert config.skip_connections_agg is True
    assert config.residual_scale == 0.5
    assert config.agg_zero_pad is False


def test_options_of_the_wrong_type_are_named() -> None:
    with pytest.raises(SerInputError, match="log_compression"):
        Wav2Vec1Config.from_fairseq_options({"log_compression": "yes"})
    with pytest.raises(SerInputError, match="residual_scale"):
        Wav2Vec1Config.from_fairseq_options({"residual_scale": "0.5"})


def test_gru_aggregator_and_vq_wav2vec_are_refused() -> None:
    with pytest.raises(SerInputError, match="aggregator='gru'"):
        Wav2Vec1Config.from_fairseq_options({"aggregator": "gru"})
    with pytest.raises(SerInputError, match="vq-wav2vec"):
        Wav2Vec1Config.from_fairseq_options({"vq_type": "gumbel"})
    with pytest.raises(SerInputError, match="activation"):
        Wav2Vec1Config.from_fairseq_options({"activation": "swish"})
    with pytest.raises(SerInputError, match="strided"):
        Wav2Vec1Config.from_fairseq_options({"conv_aggregator_layers": "[(512, 3, 2)]"})


def test_layer_spec_parsing_never_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hostile = f"__import__('pathlib').Path({str(marker)!r}).touch() or [(1, 2, 3)]"
    with pytest.raises(SerInputError, match="conv_feature_layers"):
        Wav2Vec1Config.from_fairseq_options({"conv_feature_layers": hostile})
    assert not marker.exists()
    for bad in ("[(1, 2, 3)] * 10 ** 9", "[(1, 2, 3)] * 100000", "[(1, 2, 3)] + 5", "[x]"):
        with pytest.raises(SerInputError):
            parse_layer_spec(bad, "spec")


@pytest.mark.parametrize(
    "spec", ["[(512, 10)]", "[(512.0, 10, 5)]", "[]", "[(512, 0, 1)]", "(512, 10, 5)"]
)
def test_malformed_layers_are_refused(spec: str) -> None:
    with pytest.raises(SerInputError, match="spec"):
        parse_layer_spec(spec, "spec")


def test_layer_spec_arithmetic_matches_python() -> None:
    spec = "[(512, 10, 5)] + [(512, 8, 4)] + [(512, 4, 2)] * 3 + [(512, 1, 1)] * 2"
    assert parse_layer_spec(spec, "spec") == [tuple(x) for x in eval(spec)]  # noqa: S307


# --- loading fairseq checkpoints -------------------------------------------------------------


def test_fairseq_checkpoint_drops_only_pretraining_keys() -> None:
    state = safe_torch_load(W2V1)["model"]
    dropped = {key for key in state if key.startswith(PRETRAINING_ONLY_PREFIXES)}
    assert dropped == {
        "wav2vec_predictions.project_to_steps.weight",
        "wav2vec_predictions.project_to_steps.bias",
    }
    model = load_wav2vec1(W2V1)
    assert set(model.state_dict()) == set(state) - dropped


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    checkpoint = safe_torch_load(W2V1)
    state = checkpoint["model"]
    del state["feature_aggregator.conv_layers.3.1.bias"]
    state["feature_aggregator.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save(checkpoint, bad)
    with pytest.raises(SerInputError) as err:
        load_wav2vec1(bad)
    message = str(err.value)
    assert str(bad) in message
    assert "missing keys (1): feature_aggregator.conv_layers.3.1.bias" in message
    assert "unexpected keys (1): feature_aggregator.extra.weight" in message


def test_shape_mismatch_is_listed(tmp_path: Path) -> None:
    checkpoint = safe_torch_load(W2V1)
    checkpoint["args"].conv_aggregator_layers = checkpoint["args"].conv_aggregator_layers.replace(
        "(16, 13, 1)", "(16, 14, 1)"
    )
    bad = tmp_path / "bad.pt"
    torch.save(checkpoint, bad)
    with pytest.raises(SerInputError, match=r"conv_layers\.11\.1\.weight: \[16, 16, 13\] vs"):
        load_wav2vec1(bad)


def test_unsupported_checkpoint_options_name_the_file(tmp_path: Path) -> None:
    checkpoint = safe_torch_load(W2V1)
    checkpoint["args"].aggregator = "gru"
    path = tmp_path / "gru.pt"
    torch.save(checkpoint, path)
    with pytest.raises(SerInputError, match=r"gru\.pt: wav2vec 1.0 option aggregator='gru'"):
        load_wav2vec1(path)


@pytest.mark.parametrize(
    "name", ["fairseq_w2v2_tiny.pt", "fairseq_w2v2_tiny_args.pt", "fairseq_w2v2_tiny_lnf.pt"]
)
def test_wav2vec2_checkpoint_is_refused(name: str) -> None:
    with pytest.raises(SerInputError, match="'wav2vec2'.*expected a wav2vec 1.0"):
        load_wav2vec1(FIXTURES / name)


def test_wav2vec2_state_dict_without_a_name_is_refused(tmp_path: Path) -> None:
    checkpoint = safe_torch_load(FIXTURES / "fairseq_w2v2_tiny.pt")
    del checkpoint["cfg"]["model"]["_name"]
    path = tmp_path / "nameless.pt"
    torch.save(checkpoint, path)
    with pytest.raises(SerInputError, match="wav2vec 2.0 state dict"):
        load_wav2vec1(path)


def test_non_checkpoints_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(SerInputError, match="notes.pt"):
        load_wav2vec1(text)
    no_model = tmp_path / "no_model.pt"
    torch.save({"args": argparse.Namespace(arch="wav2vec")}, no_model)
    with pytest.raises(SerInputError, match="no 'model' state dict"):
        load_wav2vec1(no_model)
    no_options = tmp_path / "no_options.pt"
    torch.save({"model": {}}, no_options)
    with pytest.raises(SerInputError, match="neither 'args' nor 'cfg'"):
        load_wav2vec1(no_options)


# --- our own saved models ---------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = load_wav2vec1(W2V1).eval()
    out = save_wav2vec1(model, tmp_path / "w2v1")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.pt"]
    reloaded = load_wav2vec1(out).eval()
    assert reloaded.config == model.config
    wav = torch.randn(2, 4000)
    with torch.no_grad():
        for a, b in zip(model(wav), reloaded(wav), strict=True):
            assert torch.equal(a, b)


def test_saved_directory_problems_are_named(tmp_path: Path) -> None:
    directory = save_wav2vec1(load_wav2vec1("tiny"), tmp_path / "w2v1")
    (directory / "model.pt").unlink()
    with pytest.raises(SerInputError, match="lacks config.json or model.pt"):
        load_wav2vec1(directory)

    directory = save_wav2vec1(load_wav2vec1("tiny"), tmp_path / "w2v1b")
    meta = json.loads((directory / "config.json").read_text())
    meta["config"]["kernel_size"] = 3
    (directory / "config.json").write_text(json.dumps(meta))
    with pytest.raises(
        SerInputError, match="unknown wav2vec 1.0 config fields \\['kernel_size'\\]"
    ):
        load_wav2vec1(directory)

    (directory / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(SerInputError, match="not a saved wav2vec 1.0 model config"):
        load_wav2vec1(directory)


def test_saved_weights_must_match_the_saved_config(tmp_path: Path) -> None:
    directory = save_wav2vec1(load_wav2vec1("tiny"), tmp_path / "w2v1")
    narrow_meta = {"format": "ser-wav2vec1", "version": 1, "config": _tiny_options(dim=8)}
    (directory / "config.json").write_text(json.dumps(narrow_meta))
    with pytest.raises(SerInputError, match="shape mismatches"):
        load_wav2vec1(directory)


def _tiny_options(dim: int = 16) -> dict[str, object]:
    return {
        "conv_feature_layers": [[dim, 10, 5], [dim, 8, 4], [dim, 4, 2], [dim, 4, 2], [dim, 4, 2]]
        + [[dim, 1, 1]] * 2,
        "conv_aggregator_layers": [[dim, k, 1] for k in range(2, 6)],
        "skip_connections_feat": True,
    }
