"""Batched evaluation gives every utterance the logits it gets alone, for every feature encoder:
the classifier in eval mode, the fine-tuning stage's validation and test, and ``predict`` of an
exported model (also one exported when model dirs said ``eval_batch_size`` 1)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from transformers import (
    Data2VecAudioConfig,
    Data2VecAudioModel,
    HubertConfig,
    HubertModel,
    PretrainedConfig,
    PreTrainedModel,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
)

from ser import artifacts
from ser.audio import MIN_SAMPLES
from ser.config import EMOTIONS_4, FinetuneConfig
from ser.data.labels import read_label_file
from ser.data.synthetic import DemoCorpus
from ser.models import finetuned
from ser.models.backbones import PRESETS, preset_config, write_model_json
from ser.models.heads import (
    UtteranceClassifier,
    encoder_ignores_padding,
    feature_encoder_sees_padding,
    frozen_features,
)
from ser.stages import finetune
from ser.stages.finetune import FinetuneModule

# Very different lengths, one at the shortest input (a single frame), longest not first.
LENGTHS = (16000, MIN_SAMPLES, 48000, 23456, 9000, MIN_SAMPLES + 1)
NORMS = {
    "group": {},  # the tiny preset as it is: wav2vec2-base's group-norm conv stack
    "layer": {"feat_extract_norm": "layer", "do_stable_layer_norm": True, "conv_bias": True},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only spin on shared cores
    yield
    torch.set_num_threads(threads)


def _waves(lengths: tuple[int, ...] = LENGTHS) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=generator) for n in lengths]


def _padded(wavs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    padded = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
    mask = torch.arange(padded.shape[1]) < torch.tensor([len(w) for w in wavs])[:, None]
    return padded, mask.long()


def _classifier(backbone: PreTrainedModel) -> UtteranceClassifier:
    return UtteranceClassifier(backbone, num_classes=4).eval()


def _batched_and_alone(model: UtteranceClassifier, wavs: list[torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        alone = torch.cat([model(w[None]) for w in wavs])
        batched = model(*_padded(wavs))
    return batched, alone


def _assert_same(batched: torch.Tensor, alone: torch.Tensor) -> None:
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(batched.argmax(-1), alone.argmax(-1))


# --------------------------------------------------------------------------- the classifier


def test_every_encoder_evaluates_in_batches() -> None:
    assert finetuned.eval_batch_size() == finetuned.EVAL_BATCH_SIZE > 1
    torch.manual_seed(0)
    module = FinetuneModule("tiny", EMOTIONS_4, [1.0] * 4)
    assert feature_encoder_sees_padding(module.model.backbone)  # the group-norm preset
    assert module.eval_batch_size == finetuned.EVAL_BATCH_SIZE


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_batched_logits_are_those_of_one_utterance_at_a_time(norm: str) -> None:
    torch.manual_seed(0)
    model = _classifier(Wav2Vec2Model(preset_config("tiny", **NORMS[norm])))
    wavs = _waves()
    _assert_same(*_batched_and_alone(model, wavs))
    # Why the group-norm encoder runs per utterance: through the padded batch its frames move.
    padded, mask = _padded(wavs)
    with torch.no_grad():
        through_padding, frames = frozen_features(model.backbone, padded, mask)
        own, _ = model.features(padded, mask)
    moved = (through_padding[frames] - own[frames]).abs().max()
    assert (moved > 1e-3) if norm == "group" else (moved < 1e-5)


def test_training_still_reads_the_padded_batch() -> None:
    # The original trained on padded batches through the group norm: that is the recipe.
    torch.manual_seed(0)
    model = UtteranceClassifier(Wav2Vec2Model(preset_config("tiny")), num_classes=4).train()
    padded, mask = _padded(_waves())
    with torch.no_grad():
        trained_on, _ = model.features(padded, mask)
        padded_batch, _ = frozen_features(model.backbone, padded, mask)
    assert torch.equal(trained_on, padded_batch)


def test_time_masks_still_apply_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = _classifier(Wav2Vec2Model(preset_config("tiny")))
    padded, mask = _padded(_waves((16000, 8000)))
    frames = model.backbone._get_feature_vector_attention_mask(49, mask)
    with torch.no_grad():
        plain = model(padded, mask)
        on_padding = model(padded, mask, mask_time_indices=~frames)
        on_valid = model(padded, mask, mask_time_indices=frames & (torch.arange(49) < 10))
    assert torch.equal(plain, on_padding)
    assert not torch.allclose(plain, on_valid)


# --------------------------------------------------------------------------- other backbones


def _tiny(config_class: type[PretrainedConfig], **overrides: Any) -> PretrainedConfig:
    keys = ("conv_dim", "conv_kernel", "conv_stride", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "intermediate_size", "num_conv_pos_embedding_groups",
            "mask_time_prob")
    return config_class(**{k: PRESETS["tiny"][k] for k in keys}, **overrides)


# The wav2vec2-like models transformers has (feature_extractor, feature_projection, encoder,
# masked_spec_embed), at the tiny preset's sizes; data2vec-audio's conv stack is layer norm only.
OTHERS = {
    "hubert-group": (HubertModel, HubertConfig, {"feat_extract_norm": "group"}),
    "hubert-layer": (HubertModel, HubertConfig, {"feat_extract_norm": "layer"}),
    "wavlm-group": (WavLMModel, WavLMConfig, {"feat_extract_norm": "group"}),
    "data2vec-audio": (Data2VecAudioModel, Data2VecAudioConfig, {"conv_pos_kernel_size": 5}),
}


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_other_wav2vec2_like_backbones_batch_exactly(name: str) -> None:
    model_class, config_class, overrides = OTHERS[name]
    torch.manual_seed(0)
    backbone = model_class(_tiny(config_class, **overrides))
    if not hasattr(backbone, "freeze_feature_encoder"):  # HubertModel has none of its own
        backbone.freeze_feature_encoder = backbone.feature_extractor._freeze_parameters
    model = _classifier(backbone)
    assert feature_encoder_sees_padding(backbone) == name.endswith("group")
    # data2vec-audio stacks positional convs, through which padding reaches valid frames.
    assert encoder_ignores_padding(backbone) == (name != "data2vec-audio")
    _assert_same(*_batched_and_alone(model, _waves((16000, MIN_SAMPLES, 23456))))


# --------------------------------------------------------------------------- the stage


def _evaluate(module: FinetuneModule, config: FinetuneConfig, items: dict[str, str],
              batch_size: int) -> dict[str, Any]:
    """Validation metrics, test scores and predictions, and predict_step's probabilities."""
    loader = finetune.eval_loader(config, items, module.classes, batch_size)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    valid = trainer.validate(module, loader, verbose=False)[0]
    trainer.test(module, loader, verbose=False)
    outputs = trainer.predict(module, loader)
    probs = {n: p for out in outputs for n, p in zip(out["names"], out["probs"], strict=True)}
    return {"valid": valid, "scores": module.test_scores.as_dict(),
            "predictions": dict(module.test_predictions), "probs": probs}


def test_stage_evaluation_is_unchanged_by_batching(corpus: DemoCorpus) -> None:
    torch.manual_seed(0)
    module = FinetuneModule("tiny", EMOTIONS_4, [1.0, 2.0, 1.0, 0.5])
    config = FinetuneConfig(datadir=str(corpus.audio_dir))
    fold = read_label_file(corpus.label_files[0])
    items = {**fold.val, **fold.test}
    alone = _evaluate(module, config, items, batch_size=1)
    batched = _evaluate(module, config, items, batch_size=module.eval_batch_size)
    assert batched["scores"] == alone["scores"]
    assert batched["predictions"] == alone["predictions"]
    assert batched["valid"] == pytest.approx(alone["valid"], abs=1e-5)
    assert batched["probs"].keys() == alone["probs"].keys() == items.keys()
    for name, probs in alone["probs"].items():
        torch.testing.assert_close(batched["probs"][name], probs, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- exported models


def _exported(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    module = FinetuneModule("tiny", EMOTIONS_4, [1.0] * 4)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir()
    torch.save({"state_dict": module.state_dict()}, checkpoint)
    write_model_json(checkpoint.parent, module.model.backbone.config)
    return finetuned.export_model(checkpoint, EMOTIONS_4, tmp_path / "model", {"test": True})


def _predict_counting_batches(directory: Path, wavs: list[np.ndarray]
                              ) -> tuple[list[int], np.ndarray, int]:
    model, _ = finetuned.load_finetuned(directory)
    calls: list[int] = []
    model.register_forward_hook(lambda _module, args, _out: calls.append(len(args[0])))
    labels, probs = finetuned.predict(model, wavs)
    return labels, probs, len(calls)


def test_exported_model_predicts_in_batches_as_one_at_a_time(tmp_path: Path) -> None:
    directory = _exported(tmp_path)
    manifest = directory / artifacts.MODEL_JSON
    assert json.loads(manifest.read_text())["eval_batch_size"] == finetuned.EVAL_BATCH_SIZE
    wavs = _waves(LENGTHS * 2)  # 12 utterances: two batches
    model, _ = finetuned.load_finetuned(directory)
    with torch.no_grad():
        alone = torch.softmax(torch.cat([model(w[None]) for w in wavs]), dim=-1)
    labels, probs, batches = _predict_counting_batches(directory, [w.numpy() for w in wavs])
    assert batches == math.ceil(len(wavs) / finetuned.EVAL_BATCH_SIZE)
    torch.testing.assert_close(torch.from_numpy(probs), alone, atol=1e-5, rtol=1e-5)
    assert labels == alone.argmax(-1).tolist()
    # A directory exported when group-norm models said 1 loads and predicts the same, batched.
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "eval_batch_size": 1}))
    again, again_probs, again_batches = _predict_counting_batches(
        directory, [w.numpy() for w in wavs])
    assert (again, again_batches) == (labels, batches)
    np.testing.assert_array_equal(again_probs, probs)
