"""fairseq wav2vec 2.0 checkpoints -> transformers, without fairseq (see test_parity_w2v2.py for
the comparison against fairseq's own outputs)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch
from fairseq_w2v2_helpers import (
    fairseq_options,
    pretraining_heads,
    to_fairseq_state,
    write_fairseq_checkpoint,
)
from transformers import Wav2Vec2ForPreTraining, Wav2Vec2Model

from ser.errors import SerInputError
from ser.models.backbones import preset_config
from ser.models.fairseq_import import (
    FAIRSEQ_W2V2_DEFAULTS,
    load_fairseq_w2v2,
    load_fairseq_w2v2_pretraining,
    parse_conv_layers,
    w2v2_config_from_fairseq,
    w2v2_state_dict_from_fairseq,
)

FIXTURE_W2V1 = Path(__file__).parent / "fixtures" / "fairseq_w2v1_tiny.pt"


def _model(seed: int = 0, **overrides: object) -> Wav2Vec2Model:
    torch.manual_seed(seed)
    return Wav2Vec2Model(preset_config("tiny", **overrides)).eval()


def _outputs(model: Wav2Vec2Model, seed: int = 1) -> torch.Tensor:
    wav = torch.randn(2, 6000, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, 6000, dtype=torch.long)
    mask[1, 4000:] = 0
    with torch.no_grad():
        return model(wav * mask, attention_mask=mask).last_hidden_state


VARIANTS = {
    "base-like": {},
    "large-like": {"feat_extract_norm": "layer", "do_stable_layer_norm": True, "conv_bias": True},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", ["cfg", "args", "finetuned"])
def test_loaded_model_equals_the_written_one(tmp_path: Path, variant: str, fmt: str) -> None:
    source = _model(**VARIANTS[variant])
    path = write_fairseq_checkpoint(tmp_path / "w2v2.pt", source, fmt=fmt)
    loaded = load_fairseq_w2v2(path).eval()
    assert loaded.config.do_stable_layer_norm == source.config.do_stable_layer_norm
    assert loaded.config.feat_extract_norm == source.config.feat_extract_norm
    assert torch.equal(_outputs(loaded), _outputs(source))
    assert torch.equal(loaded.masked_spec_embed, source.masked_spec_embed)


def test_pretraining_heads_are_dropped_and_mask_embedding_kept() -> None:
    pretraining = Wav2Vec2ForPreTraining(preset_config("tiny"))
    state = {**to_fairseq_state(pretraining.wav2vec2), **pretraining_heads(pretraining)}
    mapped = w2v2_state_dict_from_fairseq(state, pretraining.config)
    assert not any(k.startswith(("quantizer", "project", "final_proj")) for k in mapped)
    assert torch.equal(mapped["masked_spec_embed"], pretraining.wav2vec2.masked_spec_embed)
    assert set(mapped) == set(pretraining.wav2vec2.state_dict())


def test_pretraining_model_with_quantizer_loads_whole(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = Wav2Vec2ForPreTraining(preset_config("tiny"))
    path = write_fairseq_checkpoint(
        tmp_path / "pt.pt", source.wav2vec2, extra_state=pretraining_heads(source)
    )
    loaded = load_fairseq_w2v2_pretraining(path)
    expected = source.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_pretraining_load_refuses_a_checkpoint_without_quantizer(tmp_path: Path) -> None:
    path = write_fairseq_checkpoint(tmp_path / "ft.pt", _model(), fmt="finetuned")
    with pytest.raises(SerInputError, match="no quantizer"):
        load_fairseq_w2v2_pretraining(path)


def test_config_maps_architecture_and_fills_old_defaults() -> None:
    # An old checkpoint's options may name only what differed from the defaults.
    config = w2v2_config_from_fairseq({"encoder_layers": 3, "layer_norm_first": True,
                                       "extractor_mode": "layer_norm"})
    assert config.num_hidden_layers == 3
    assert config.do_stable_layer_norm and config.feat_extract_norm == "layer"
    assert config.hidden_size == FAIRSEQ_W2V2_DEFAULTS["encoder_embed_dim"] == 768
    assert list(config.conv_kernel) == [10, 3, 3, 3, 3, 2, 2]
    assert list(config.conv_stride) == [5, 2, 2, 2, 2, 2, 2]
    assert config.num_conv_pos_embeddings == 128 and config.num_conv_pos_embedding_groups == 16
    assert w2v2_config_from_fairseq({}).feat_extract_norm == "group"


def test_config_round_trips_through_fairseq_options() -> None:
    config = preset_config("tiny", conv_bias=True)
    mapped = w2v2_config_from_fairseq(fairseq_options(config))
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "conv_dim", "conv_kernel", "conv_stride", "conv_bias", "codevector_dim",
              "proj_codevector_dim", "num_codevectors_per_group", "num_conv_pos_embeddings",
              "num_conv_pos_embedding_groups")
    assert {f: _plain(getattr(mapped, f)) for f in fields} == {
        f: _plain(getattr(config, f)) for f in fields
    }


def _plain(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value


def test_conv_layers_are_parsed_without_eval() -> None:
    assert parse_conv_layers("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2") == (
        [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    )
    for bad in ("__import__('os').system('true')", "[(512, 10)]", "[(1, 2, 3)] * 'x'", "[(",
                "[(1, 1, 1)] * 1000000000"):
        with pytest.raises(SerInputError, match="conv_feature_layers"):
            parse_conv_layers(bad)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"layer_type": "conformer"}, "layer_type"), ({"pos_conv_depth": 5}, "pos_conv_depth"),
     ({"quantize_input": True}, "quantize_input")],
)
def test_unsupported_variants_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(SerInputError, match=message):
        w2v2_config_from_fairseq(options)


def test_missing_key_is_refused(tmp_path: Path) -> None:
    model = _model()
    state = to_fairseq_state(model)
    del state["encoder.layers.1.fc2.weight"]
    path = tmp_path / "missing.pt"
    torch.save({"cfg": {"model": fairseq_options(model.config)}, "model": state}, path)
    with pytest.raises(SerInputError, match=r"missing: encoder\.layers\.1\.feed_forward"):
        load_fairseq_w2v2(path)


@pytest.mark.parametrize(
    ("extra_key", "shown"),
    [("encoder.layers.0.adapter.weight", "encoder.layers.0.adapter.weight"),
     ("encoder.layers.7.fc1.weight", "beyond the configured layers")],
)
def test_extra_key_is_refused(tmp_path: Path, extra_key: str, shown: str) -> None:
    path = write_fairseq_checkpoint(
        tmp_path / "extra.pt", _model(), extra_state={extra_key: torch.zeros(3)}
    )
    with pytest.raises(SerInputError, match=shown):
        load_fairseq_w2v2(path)


def test_wrong_shape_is_refused(tmp_path: Path) -> None:
    model = _model()
    path = write_fairseq_checkpoint(
        tmp_path / "shape.pt", model, extra_state={"mask_emb": torch.zeros(5)}
    )
    with pytest.raises(SerInputError, match="wrong shape: masked_spec_embed"):
        load_fairseq_w2v2(path)


def test_wav2vec1_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "w2v1.pt"
    torch.save({"args": argparse.Namespace(arch="wav2vec"),
                "model": {"feature_aggregator.conv_layers.0.0.weight": torch.zeros(2)}}, path)
    paths = [path] + ([FIXTURE_W2V1] if FIXTURE_W2V1.is_file() else [])
    for candidate in paths:
        with pytest.raises(SerInputError, match="wav2vec 1.0 checkpoint.*expected wav2vec 2.0"):
            load_fairseq_w2v2(candidate)


def test_checkpoint_without_model_or_options_is_refused(tmp_path: Path) -> None:
    no_model = tmp_path / "no_model.pt"
    torch.save({"cfg": {"model": {"_name": "wav2vec2"}}}, no_model)
    with pytest.raises(SerInputError, match="no 'model' state dict"):
        load_fairseq_w2v2(no_model)
    no_options = tmp_path / "no_options.pt"
    torch.save({"model": {"mask_emb": torch.zeros(4)}}, no_options)
    with pytest.raises(SerInputError, match="neither 'args' nor 'cfg'"):
        load_fairseq_w2v2(no_options)


def test_other_fairseq_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hubert.pt"
    torch.save({"cfg": {"model": {"_name": "hubert"}}, "model": {"x": torch.zeros(1)}}, path)
    with pytest.raises(SerInputError, match="'hubert' model; expected wav2vec 2.0"):
        load_fairseq_w2v2(path)


def test_finetuned_without_w2v_args_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ctc.pt"
    torch.save({"cfg": {"model": {"_name": "wav2vec_ctc", "w2v_args": None}},
                "model": {"w2v_encoder.proj.weight": torch.zeros(1)}}, path)
    with pytest.raises(SerInputError, match="w2v_args is missing"):
        load_fairseq_w2v2(path)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unsafe code ran",))


def test_pickle_with_arbitrary_global_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": {"model": {"_name": "wav2vec2"}}, "x": _Payload()}, path)
    with pytest.raises(SerInputError, match="not safe to unpickle"):
        load_fairseq_w2v2(path)


def test_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(SerInputError, match="not a PyTorch checkpoint"):
        load_fairseq_w2v2(path)


def test_model_trained_on_normalised_audio_is_flagged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_fairseq_checkpoint(tmp_path / "lv60.pt", _model())
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["cfg"]["task"]["normalize"] = True
    torch.save(checkpoint, path)
    with caplog.at_level(logging.WARNING, logger="ser"):
        load_fairseq_w2v2(path)
    assert "trained on normalised audio" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ser"):
        load_fairseq_w2v2(write_fairseq_checkpoint(tmp_path / "base.pt", _model()))
    assert "normalised" not in caplog.text
