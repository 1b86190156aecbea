"""Every backbone family (wav2vec 2.0, HuBERT, WavLM, data2vec-audio) through every way to name
it, fine-tuning, P-TAPT phase 2, export and serving, activation checkpointing; TAPT refuses all
but wav2vec 2.0 before any work."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Data2VecAudioForSequenceClassification,
    Data2VecAudioModel,
    HubertForSequenceClassification,
    HubertModel,
    PreTrainedModel,
    Wav2Vec2ForSequenceClassification,
    Wav2Vec2Model,
    WavLMForSequenceClassification,
    WavLMModel,
)

from ser.audio import check_audio_files
from ser.config import FinetuneConfig, Phase2Config, TaptConfig, TaptMethodConfig
from ser.data.frames import label_frame_count
from ser.data.synthetic import DemoCorpus
from ser.errors import SerInputError
from ser.models.backbones import (
    FAMILIES,
    MODEL_JSON,
    PRESET_FAMILIES,
    backbone_family,
    describe_backbone,
    load_backbone,
    load_pretraining_model,
    save_backbone,
    set_gradient_checkpointing,
    write_model_json,
)
from ser.models.finetuned import export_model, load_finetuned, predict
from ser.models.heads import FrameClusterHeads, UtteranceClassifier
from ser.stages import finetune, ptapt_phase2, tapt
from ser.training import last_checkpoint

# preset -> (base model class, a head model class of the family)
FAMILY_CLASSES: dict[str, tuple[type[PreTrainedModel], type[PreTrainedModel]]] = {
    "tiny": (Wav2Vec2Model, Wav2Vec2ForSequenceClassification),
    "tiny-hubert": (HubertModel, HubertForSequenceClassification),
    "tiny-wavlm": (WavLMModel, WavLMForSequenceClassification),
    "tiny-data2vec-audio": (Data2VecAudioModel, Data2VecAudioForSequenceClassification),
}
PRESETS = sorted(FAMILY_CLASSES)
OTHER_FAMILIES = [p for p in PRESETS if p != "tiny"]
CLASSES = ["anger", "happy", "neutral", "sad"]
TAPT_REFUSAL = r"TAPT needs wav2vec 2\.0's quantizer and contrastive head.*P-TAPT"


def _backbone(preset: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return load_backbone(preset)


def _outputs(model: PreTrainedModel, samples: int = 8000) -> torch.Tensor:
    wav = torch.randn(2, samples, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.eval()(wav).last_hidden_state


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two utterances (1 s and 0.6 s, zero-padded), their sample mask and two labels."""
    wav = torch.randn(2, 16000, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(wav, dtype=torch.long)
    mask[1, 9600:] = 0
    return wav * mask, mask, torch.tensor([0, 3])


# --- loading ------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_is_its_family_at_tiny_size(preset: str) -> None:
    model = _backbone(preset)
    base, _ = FAMILY_CLASSES[preset]
    assert type(model) is base and model.training
    assert model.config.model_type == PRESET_FAMILIES[preset]
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    # The full 320x conv downsampling: a 3 s clip is 149 frames, as wav2vec 2.0's.
    assert int(model._get_feat_extract_output_lengths(torch.tensor(48000))) == 149
    assert _outputs(model, 48000).shape == (2, 149, 64)
    assert FAMILIES[PRESET_FAMILIES[preset]].label in describe_backbone(preset, model)


@pytest.mark.parametrize("preset", PRESETS)
def test_save_and_load_round_trip_gives_identical_outputs(preset: str, tmp_path: Path) -> None:
    model = _backbone(preset)
    loaded = load_backbone(str(save_backbone(model, tmp_path / "backbone")))
    assert type(loaded) is type(model) and loaded.training
    assert torch.equal(_outputs(loaded), _outputs(model))


@pytest.mark.parametrize("preset", PRESETS)
def test_head_model_directory_loads_as_the_base_model(preset: str, tmp_path: Path) -> None:
    base, head_class = FAMILY_CLASSES[preset]
    torch.manual_seed(0)
    head = head_class(load_backbone(preset).config)
    head.save_pretrained(tmp_path / "head")
    loaded = load_backbone(str(tmp_path / "head"))
    assert type(loaded) is base
    assert _same_weights(loaded, getattr(head, head.base_model_prefix))


@pytest.mark.parametrize("preset", PRESETS)
def test_stage_checkpoint_with_model_json_loads_as_its_family(preset: str, tmp_path: Path) -> None:
    classifier = UtteranceClassifier(_backbone(preset), num_classes=4)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in classifier.state_dict().items()}},
               path)
    write_model_json(tmp_path, classifier.backbone.config)
    recorded = json.loads((tmp_path / MODEL_JSON).read_text())["backbone_config"]
    assert recorded["model_type"] == PRESET_FAMILIES[preset]
    assert backbone_family(str(path)) == PRESET_FAMILIES[preset]
    loaded = load_backbone(str(path))
    assert type(loaded) is FAMILY_CLASSES[preset][0]
    assert _same_weights(loaded, classifier.backbone)


def test_model_json_without_model_type_is_wav2vec2(tmp_path: Path) -> None:
    backbone = _backbone("tiny")
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}},
               path)
    config = {k: v for k, v in backbone.config.to_dict().items() if k != "model_type"}
    (tmp_path / MODEL_JSON).write_text(json.dumps({"backbone_config": config}))
    assert _same_weights(load_backbone(str(path)), backbone)


def test_config_without_model_type_is_read_from_its_architectures(tmp_path: Path) -> None:
    head = HubertForSequenceClassification(load_backbone("tiny-hubert").config)
    head.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert type(load_backbone(str(tmp_path))) is HubertModel


def test_directory_of_an_unsupported_model_type_names_file_and_families(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(SerInputError) as info:
        load_backbone(str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "config.json") in message and "'whisper'" in message
    for family in ("wav2vec 2.0", "HuBERT", "WavLM", "data2vec-audio"):
        assert family in message


@pytest.mark.parametrize("preset", PRESETS)
def test_hub_name_loads_its_family_from_the_local_cache(
    preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"ser-tests/{preset}"
    repo = tmp_path / f"models--{name.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model = _backbone(preset)
    model.save_pretrained(repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert backbone_family(name) == PRESET_FAMILIES[preset]
    loaded = load_backbone(name)
    assert type(loaded) is type(model)
    assert torch.equal(_outputs(loaded), _outputs(model))


# --- fine-tuning and phase 2 ----------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_one_fine_tuning_step_trains_the_encoder_only(preset: str) -> None:
    classifier = UtteranceClassifier(_backbone(preset), num_classes=4).train()
    wav, mask, labels = _batch()
    loss = F.cross_entropy(classifier(wav, mask), labels)
    loss.backward()
    assert torch.isfinite(loss)
    backbone = classifier.backbone
    frozen = [*backbone.feature_extractor.parameters(), *backbone.feature_projection.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    assert all(p.grad is not None for p in backbone.encoder.parameters() if p.requires_grad)
    assert classifier.output.weight.grad is not None
    assert backbone.masked_spec_embed.grad is None  # the original never trained it
    trained = {id(p) for p in classifier.trainable_parameters()}
    assert not any(id(p) in trained for p in frozen)


@pytest.mark.parametrize("preset", PRESETS)
def test_time_masks_replace_frames_by_the_mask_embedding(preset: str) -> None:
    classifier = UtteranceClassifier(_backbone(preset), num_classes=4, feature_mask_prob=0.0,
                                     train_mask_embedding=True).train()
    wav, mask, labels = _batch()
    masked = torch.zeros(2, 49, dtype=torch.bool)
    masked[:, 10:20] = True
    F.cross_entropy(classifier(wav, mask, mask_time_indices=masked), labels).backward()
    grad = classifier.backbone.masked_spec_embed.grad
    assert grad is not None and bool(grad.abs().sum() > 0)


@pytest.mark.parametrize("preset", PRESETS)
def test_phase2_heads_train_on_masked_frames(preset: str) -> None:
    heads = FrameClusterHeads(_backbone(preset), [4, 8]).train()
    wav, mask, _ = _batch()
    frames = int(heads.backbone._get_feat_extract_output_lengths(torch.tensor(16000)))
    labels = torch.stack([torch.randint(0, k, (2, frames)) for k in (4, 8)], dim=1)
    out = heads(wav, mask, labels)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and int(out["masked_frames"]) > 0
    assert all(p.grad is None for p in heads.backbone.feature_extractor.parameters())
    assert all(p.grad is not None for p in heads.heads.parameters())
    assert any(p.grad is not None for p in heads.backbone.encoder.parameters())


def _loss_and_grads(classifier: UtteranceClassifier) -> tuple[torch.Tensor, dict[str, Any]]:
    classifier.train().zero_grad()
    torch.manual_seed(7)  # the same masks and dropout both times
    wav, mask, labels = _batch()
    loss = F.cross_entropy(classifier(wav, mask), labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in classifier.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("preset", PRESETS)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(preset: str) -> None:
    classifier = UtteranceClassifier(_backbone(preset), num_classes=4)
    plain_loss, plain = _loss_and_grads(classifier)
    set_gradient_checkpointing(classifier.backbone, True)
    assert all(layer.gradient_checkpointing for layer in classifier.backbone.encoder.layers)
    loss, grads = _loss_and_grads(classifier)
    torch.testing.assert_close(loss, plain_loss)
    assert set(grads) == set(plain)
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], msg=name)
    set_gradient_checkpointing(classifier.backbone, False)
    assert not any(getattr(m, "gradient_checkpointing", False)
                   for m in classifier.backbone.modules())


# --- export, load, serve --------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_fine_tuned_model_exports_loads_and_serves(preset: str, tmp_path: Path) -> None:
    from ser.serving import MODEL_ARTIFACT, EmotionModel  # MLflow: only for this test

    classifier = UtteranceClassifier(_backbone(preset), num_classes=len(CLASSES)).eval()
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in classifier.state_dict().items()}},
               checkpoint)
    write_model_json(checkpoint.parent, classifier.backbone.config)
    directory = export_model(checkpoint, CLASSES, tmp_path / "model", {"test": preset})
    model, classes = load_finetuned(directory)
    assert classes == CLASSES and type(model.backbone) is type(classifier.backbone)
    waves = [np.random.default_rng(i).standard_normal(n).astype(np.float32)
             for i, n in enumerate((16000, 9600, 12000))]
    indices, probs = predict(model, waves)
    with torch.no_grad():
        alone = [torch.softmax(classifier(torch.from_numpy(w)[None]), -1)[0] for w in waves]
    np.testing.assert_allclose(probs, torch.stack(alone).numpy(), atol=1e-5)
    served = EmotionModel()
    served.load_context(SimpleNamespace(artifacts={MODEL_ARTIFACT: str(directory)}))
    table = served.predict(None, pd.DataFrame({"audio": [w.tolist() for w in waves]}))
    assert list(table["label"]) == [CLASSES[i] for i in indices]


# --- TAPT: wav2vec 2.0 only -----------------------------------------------------------------


def _other_family_specs(tmp_path: Path) -> list[str]:
    """A preset, a model directory and a stage checkpoint of families TAPT cannot take."""
    directory = save_backbone(_backbone("tiny-hubert"), tmp_path / "hubert")
    backbone = _backbone("tiny-wavlm")
    checkpoint = tmp_path / "stage" / "last.ckpt"
    checkpoint.parent.mkdir()
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}},
               checkpoint)
    write_model_json(checkpoint.parent, backbone.config)
    return ["tiny-data2vec-audio", str(directory), str(checkpoint)]


def test_tapt_refuses_other_families_in_its_config_check(tmp_path: Path) -> None:
    for spec in _other_family_specs(tmp_path):
        with pytest.raises(SerInputError, match=TAPT_REFUSAL):
            TaptConfig(backbone=spec).check()
        with pytest.raises(SerInputError, match=TAPT_REFUSAL):
            load_pretraining_model(spec)
    with pytest.raises(SerInputError, match=f"backbone='tiny-wavlm' .*{TAPT_REFUSAL}"):
        TaptMethodConfig(backbone="tiny-wavlm").check()
    TaptConfig(backbone="tiny").check()
    TaptConfig(backbone=str(save_backbone(_backbone("tiny"), tmp_path / "w2v2"))).check()


def test_tapt_stage_stops_before_any_work(corpus: DemoCorpus, tmp_path: Path) -> None:
    config = TaptConfig(datadir=str(corpus.audio_dir), labelpath=str(corpus.label_files[0]),
                        output_dir=str(tmp_path / "out"), backbone="tiny-hubert")
    with pytest.raises(SerInputError, match=TAPT_REFUSAL):
        tapt.run(config)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset", OTHER_FAMILIES)
def test_phase2_stage_trains_and_writes_its_family(
    preset: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    samples = check_audio_files(sorted(corpus.audio_dir.glob("*.wav")))
    rng = np.random.default_rng(0)
    labels = {Path(path).name: [rng.integers(0, 4, label_frame_count(n)).tolist()]
              for path, n in samples.items()}
    clusters = tmp_path / "clusters.json"
    clusters.write_text(json.dumps(labels))
    config = Phase2Config(
        datadir=str(corpus.audio_dir), labelpath=str(corpus.label_files[0]),
        output_dir=str(tmp_path / "out"), clusterpath=str(clusters), backbone=preset,
        training_step=2, warmup_step=1, checkpoint_every=2, batch_size=1, keep_checkpoints=True,
    )
    result = ptapt_phase2.run(config)
    (fold_dir,) = result.backbones.values()
    assert np.isfinite(next(iter(result.final_loss.values())))
    trained = load_backbone(str(fold_dir))
    assert type(trained) is FAMILY_CLASSES[preset][0]
    resume = last_checkpoint(fold_dir.parent)  # itself a backbone, model.json beside it
    assert resume is not None
    assert _same_weights(load_backbone(str(resume)), trained)


@pytest.mark.slow
@pytest.mark.parametrize("preset", OTHER_FAMILIES)
def test_finetune_stage_exports_its_family(preset: str, corpus: DemoCorpus, tmp_path: Path) -> None:
    config = FinetuneConfig(
        datadir=str(corpus.audio_dir), labelpath=str(corpus.label_files[0]),
        output_dir=str(tmp_path / "out"), backbone=preset, batch_size=4, max_epochs=1,
        gradient_checkpointing=True,
    )
    result = finetune.run(config)
    model, classes = load_finetuned(result.model_dir)
    assert type(model.backbone) is FAMILY_CLASSES[preset][0] and classes == CLASSES
    _, probs = predict(model, [np.zeros(16000, dtype=np.float32)])
    assert np.isfinite(probs).all()
