"""Every way to name a backbone, every bad one, save/load round trips, and activation
checkpointing: off after every load, on where a stage asks for it."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from fairseq_w2v2_helpers import pretraining_heads, write_fairseq_checkpoint
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining, Wav2Vec2Model
from transformers.models.wav2vec2.modeling_wav2vec2 import _sample_negative_indices

from ser import training
from ser.audio import check_audio_files
from ser.config import FinetuneConfig, Phase2Config, TaptConfig
from ser.data.frames import label_frame_count
from ser.data.synthetic import DemoCorpus
from ser.errors import SerInputError
from ser.models.backbones import (
    MODEL_JSON,
    describe_backbone,
    load_backbone,
    load_pretraining_model,
    preset_config,
    save_backbone,
    set_gradient_checkpointing,
    write_model_json,
)
from ser.models.heads import UtteranceClassifier
from ser.stages import finetune, ptapt_phase2, tapt


def _outputs(model: Wav2Vec2Model, samples: int = 8000) -> torch.Tensor:
    wav = torch.randn(2, samples, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.eval()(wav).last_hidden_state


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- presets ------------------------------------------------------------------------------


def test_tiny_preset_has_wav2vec2_frame_rate() -> None:
    model = load_backbone("tiny")
    assert model.training  # Lightning keeps submodules' modes: eval here would drop dropout
    assert int(model._get_feat_extract_output_lengths(torch.tensor(48000))) == 149  # 3 s
    assert _outputs(model, 48000).shape == (2, 149, 64)
    assert model.config.num_hidden_layers == 2 and model.config.feat_extract_norm == "group"


def test_presets_are_deterministic_given_the_seed() -> None:
    torch.manual_seed(3)
    first = load_backbone("tiny")
    torch.manual_seed(3)
    assert _same_weights(first, load_backbone("tiny"))
    torch.manual_seed(4)
    assert not _same_weights(first, load_backbone("tiny"))


def test_tiny_preset_works_for_pretraining() -> None:
    model = load_pretraining_model("tiny")
    mask = _time_mask(2, 49)
    negatives = _sample_negative_indices((2, 49), model.config.num_negatives, mask.numpy())
    out = model(torch.randn(2, 16000), mask_time_indices=mask,
                sampled_negative_indices=torch.from_numpy(negatives))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.quantizer.codevectors.grad is not None


def _time_mask(batch: int, frames: int) -> torch.Tensor:
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    mask[:, 5:15] = True
    return mask


@pytest.mark.parametrize(
    ("name", "hidden", "layers", "stable", "millions"),
    [("base", 768, 12, False, 94.4), ("large", 1024, 24, True, 315.4)],
)
def test_published_architectures(
    name: str, hidden: int, layers: int, stable: bool, millions: float
) -> None:
    config = preset_config(name)
    assert (config.hidden_size, config.num_hidden_layers) == (hidden, layers)
    assert config.do_stable_layer_norm is stable
    assert config.feat_extract_norm == ("layer" if stable else "group")
    with torch.device("meta"):  # count parameters without allocating them
        params = sum(p.numel() for p in Wav2Vec2Model(config).parameters())
    assert abs(params / 1e6 - millions) < 0.1


def test_base_preset_builds() -> None:
    assert load_backbone("base").config.hidden_size == 768


# --- model directories --------------------------------------------------------------------


def test_save_and_load_directory_round_trip(tmp_path: Path) -> None:
    model = load_backbone("tiny")
    save_backbone(model, tmp_path / "backbone")
    assert (tmp_path / "backbone" / "config.json").is_file()
    loaded = load_backbone(str(tmp_path / "backbone"))
    assert isinstance(loaded, Wav2Vec2Model)
    assert torch.equal(_outputs(loaded), _outputs(model))


def test_save_replaces_an_existing_directory_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "backbone"
    save_backbone(load_backbone("tiny"), target)
    torch.manual_seed(9)
    newer = load_backbone("tiny")
    save_backbone(newer, target)
    assert torch.equal(_outputs(load_backbone(str(target))), _outputs(newer))
    assert [p.name for p in tmp_path.iterdir()] == ["backbone"]


def test_pretraining_directory_loads_as_backbone_and_whole(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pretraining = Wav2Vec2ForPreTraining(preset_config("tiny"))
    save_backbone(pretraining, tmp_path / "tapt")
    backbone = load_backbone(str(tmp_path / "tapt"))
    assert isinstance(backbone, Wav2Vec2Model)
    assert _same_weights(backbone, pretraining.wav2vec2)
    assert _same_weights(load_pretraining_model(str(tmp_path / "tapt")), pretraining)


def test_pretraining_model_from_plain_backbone_warns_and_keeps_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backbone = load_backbone("tiny")
    save_backbone(backbone, tmp_path / "plain")
    with caplog.at_level(logging.WARNING, logger="ser"):
        model = load_pretraining_model(str(tmp_path / "plain"))
    assert "no pretraining heads" in caplog.text and "random init" in caplog.text
    assert _same_weights(model.wav2vec2, backbone)


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SerInputError, match="has no config.json"):
        load_backbone(str(tmp_path))


def test_directory_with_incomplete_weights_is_refused(tmp_path: Path) -> None:
    save_backbone(load_backbone("tiny"), tmp_path / "small")
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the weights have 2 layers
    (tmp_path / "small" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SerInputError, match=r"missing encoder\.layers\.2\."):
        load_backbone(str(tmp_path / "small"))


def test_directory_of_an_unsupported_model_type_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(SerInputError, match="'whisper' model.*supported families.*HuBERT"):
        load_backbone(str(tmp_path))


# --- hub names ----------------------------------------------------------------------------


def test_hub_name_not_in_cache_fails_with_download_advice() -> None:
    with pytest.raises(SerInputError) as info:
        load_backbone("ser-tests-no-such-org/no-such-wav2vec2")
    message = str(info.value)
    assert "huggingface-cli download ser-tests-no-such-org/no-such-wav2vec2" in message
    assert "--backbone DIR" in message
    with pytest.raises(SerInputError, match="huggingface-cli download"):
        load_pretraining_model("ser-tests-no-such-org/no-such-wav2vec2")


def test_unknown_spec_lists_the_accepted_forms() -> None:
    with pytest.raises(SerInputError, match="preset.*tiny.*save_pretrained.*fairseq.*Lightning"):
        load_backbone("not-a-model")


# --- fairseq files ------------------------------------------------------------------------


def test_fairseq_checkpoint_loads(tmp_path: Path) -> None:
    source = load_backbone("tiny")
    path = write_fairseq_checkpoint(tmp_path / "w2v2.pt", source)
    assert torch.equal(_outputs(load_backbone(str(path))), _outputs(source))


def test_fairseq_pretraining_checkpoint_loads_for_tapt(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = Wav2Vec2ForPreTraining(preset_config("tiny"))
    path = write_fairseq_checkpoint(
        tmp_path / "pt.pt", source.wav2vec2, extra_state=pretraining_heads(source)
    )
    assert _same_weights(load_pretraining_model(str(path)), source)


def test_fairseq_wav2vec1_given_as_backbone_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w2v1.pt"
    torch.save({"cfg": {"model": {"_name": "wav2vec"}},
                "model": {"feature_aggregator.conv_layers.0.0.weight": torch.zeros(1)}}, path)
    with pytest.raises(SerInputError, match="wav2vec 1.0"):
        load_backbone(str(path))


def test_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_text("not a checkpoint")
    # (safe_torch_load's wording for such files is its own business; it must name the file)
    with pytest.raises(SerInputError, match=re.escape(str(path))):
        load_backbone(str(path))
    odd = tmp_path / "odd.pt"
    torch.save({"weights": torch.zeros(1)}, odd)
    with pytest.raises(SerInputError, match="neither 'state_dict' .* nor 'model'"):
        load_backbone(str(odd))


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unsafe code ran",))


def test_checkpoint_with_arbitrary_global_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _Payload()}, path)
    with pytest.raises(SerInputError, match="not safe to unpickle"):
        load_backbone(str(path))


# --- Lightning checkpoints of our stages --------------------------------------------------


class _FineTune(pl.LightningModule):
    """Holds its Wav2Vec2Model at ``backbone``, as the convention in backbones.py says."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = load_backbone("tiny")
        self.head = torch.nn.Linear(64, 2)
        self.save_hyperparameters({"lr": 1e-4, "classes": ["a", "b"]})

    def training_step(self, batch: torch.Tensor, _index: int) -> torch.Tensor:
        return self.head(self.backbone(batch).last_hidden_state).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def _train_and_save(module: pl.LightningModule, directory: Path) -> Path:
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=directory, accelerator="cpu",
    )
    data = torch.utils.data.DataLoader(torch.randn(2, 4000), batch_size=2)
    trainer.fit(module, data)
    path = directory / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_lightning_checkpoint_of_a_stage_loads(tmp_path: Path) -> None:
    module = _FineTune()
    path = _train_and_save(module, tmp_path)
    write_model_json(tmp_path, module.backbone.config)
    loaded = load_backbone(str(path))
    assert torch.equal(_outputs(loaded), _outputs(module.backbone))
    # The backbone alone also makes a (fresh-headed) pretraining model.
    assert _same_weights(load_pretraining_model(str(path)).wav2vec2, module.backbone)


def test_lightning_checkpoint_of_tapt_loads_whole(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tapt = Wav2Vec2ForPreTraining(preset_config("tiny"))
    path = tmp_path / "tapt.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in tapt.state_dict().items()}}, path)
    write_model_json(tmp_path, tapt.config)
    assert _same_weights(load_backbone(str(path)), tapt.wav2vec2)
    assert _same_weights(load_pretraining_model(str(path)), tapt)


def test_classifier_nested_under_model_is_found(tmp_path: Path) -> None:
    classifier = UtteranceClassifier(load_backbone("tiny"), num_classes=4)
    path = tmp_path / "ft.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in classifier.state_dict().items()}},
               path)
    write_model_json(tmp_path, classifier.backbone.config)
    assert _same_weights(load_backbone(str(path)), classifier.backbone)


def test_lightning_checkpoint_without_model_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"backbone.feature_projection.projection.weight": torch.zeros(1)}},
               path)
    with pytest.raises(SerInputError, match=f"no {MODEL_JSON} beside it"):
        load_backbone(str(path))


def test_lightning_checkpoint_that_does_not_match_model_json_is_refused(tmp_path: Path) -> None:
    backbone = load_backbone("tiny")
    path = tmp_path / "x.ckpt"
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    del state["backbone.encoder.layers.1.feed_forward.output_dense.weight"]
    torch.save({"state_dict": state}, path)
    write_model_json(tmp_path, backbone.config)
    with pytest.raises(SerInputError, match="does not match the backbone.*output_dense"):
        load_backbone(str(path))


def test_checkpoint_with_two_backbones_is_refused(tmp_path: Path) -> None:
    backbone = load_backbone("tiny")
    state = {f"{prefix}{k}": v for prefix in ("a.", "b.") for k, v in
             backbone.state_dict().items()}
    path = tmp_path / "two.ckpt"
    torch.save({"state_dict": state}, path)
    write_model_json(tmp_path, backbone.config)
    with pytest.raises(SerInputError, match=r"found 2: \['a\.', 'b\.'\]"):
        load_backbone(str(path))


def test_describe_backbone_names_source_and_size() -> None:
    text = describe_backbone("tiny", load_backbone("tiny"))
    assert "preset 'tiny'" in text and "2 layers" in text and "hidden 64" in text


def test_saved_backbone_directory_is_readable_by_others(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        target = save_backbone(load_backbone("tiny"), tmp_path / "bb")
    finally:
        os.umask(previous)
    assert target.stat().st_mode & 0o777 == 0o755


# --- activation checkpointing ----------------------------------------------------------------


def _with_checkpointing_in_config(directory: Path) -> Path:
    """``directory``'s config.json made to say ``"gradient_checkpointing": true``, as
    facebook/wav2vec2-base's hub config does."""
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "gradient_checkpointing": True}))
    return directory


def _checkpointing_specs(tmp_path: Path) -> list[str]:
    torch.manual_seed(0)
    plain = _with_checkpointing_in_config(save_backbone(load_backbone("tiny"), tmp_path / "bb"))
    whole = _with_checkpointing_in_config(
        save_backbone(Wav2Vec2ForPreTraining(preset_config("tiny")), tmp_path / "pt"))
    # A stage checkpoint whose model.json carries the key.
    backbone = load_backbone("tiny")
    ckpt = tmp_path / "stage" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}},
               ckpt)
    write_model_json(ckpt.parent, Wav2Vec2Config(**{**backbone.config.to_dict(),
                                                    "gradient_checkpointing": True}))
    return [str(plain), str(whole), str(ckpt)]


def _checkpointed(model: torch.nn.Module) -> bool:
    """Whether any layer of ``model`` recomputes its activations in the backward pass (the
    per-module flag transformers 5 sets; its ``is_gradient_checkpointing`` is deprecated)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_checkpointing_asked_for_by_a_config_is_off_after_every_load(tmp_path: Path) -> None:
    specs = _checkpointing_specs(tmp_path)
    # transformers 5 on its own would turn it on (so this test can fail).
    assert _checkpointed(Wav2Vec2Model.from_pretrained(specs[0]))
    assert _checkpointed(Wav2Vec2ForPreTraining.from_pretrained(specs[1]))
    for spec in specs:
        for model in (load_backbone(spec), load_pretraining_model(spec)):
            assert not _checkpointed(model), spec
            saved = save_backbone(model, tmp_path / "saved")
            assert "gradient_checkpointing" not in json.loads((saved / "config.json").read_text())


def _step(classifier: UtteranceClassifier, seed: int) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of one fine-tuning forward+backward, and how many times the encoder layers'
    attention ran (twice a layer when checkpointing recomputes it in the backward pass)."""
    calls = [0]

    def count(*_: object) -> None:
        calls[0] += 1

    hooks = [layer.attention.register_forward_hook(count)
             for layer in classifier.backbone.encoder.layers]
    classifier.train().zero_grad()
    torch.manual_seed(seed)
    wav = torch.randn(2, 16000, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(wav, dtype=torch.long)
    mask[1, 9000:] = 0
    classifier(wav * mask, mask).sum().backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in classifier.named_parameters() if p.grad is not None}
    return grads, calls[0]


def test_checkpointing_turned_on_recomputes_layers_and_trains_alike(tmp_path: Path) -> None:
    spec = _checkpointing_specs(tmp_path)[0]
    classifier = UtteranceClassifier(load_backbone(spec), num_classes=4)
    layers = len(classifier.backbone.encoder.layers)
    plain, plain_calls = _step(classifier, seed=3)
    set_gradient_checkpointing(classifier.backbone, True)
    assert _checkpointed(classifier.backbone)
    assert all(layer.gradient_checkpointing for layer in classifier.backbone.encoder.layers)
    checkpointed, calls = _step(classifier, seed=3)
    assert (plain_calls, calls) == (layers, 2 * layers)
    # Every trainable encoder weight gets the same gradient as without checkpointing.
    encoder = {n for n, p in classifier.named_parameters() if p.requires_grad}
    assert encoder <= set(checkpointed) and set(checkpointed) == set(plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
    set_gradient_checkpointing(classifier.backbone, False)
    assert not _checkpointed(classifier.backbone)


class _Stop(Exception):
    pass


def _stage_config(stage: str, corpus: DemoCorpus, out: Path) -> tuple[Any, Any]:
    """(stage module, config with gradient_checkpointing on) for a one-step run."""
    common = {"datadir": str(corpus.audio_dir), "output_dir": str(out),
              "gradient_checkpointing": True}
    if stage == "finetune":
        return finetune, FinetuneConfig(labeldir=str(corpus.label_dir), batch_size=4,
                                        max_epochs=1, **common)
    steps = {"labelpath": str(corpus.label_files[0]), "training_step": 1, "warmup_step": 1,
             "batch_size": 1, **common}
    if stage == "tapt":
        return tapt, TaptConfig(**steps)
    samples = check_audio_files(sorted(corpus.audio_dir.glob("*.wav")))
    # One head of k=2: labels alternate over each file's frames.
    labels = {Path(path).name: [[i % 2 for i in range(label_frame_count(n))]]
              for path, n in samples.items()}
    clusters = out.parent / "clusters.json"
    clusters.write_text(json.dumps(labels))
    return ptapt_phase2, Phase2Config(clusterpath=str(clusters), **steps)


@pytest.mark.parametrize("stage", ["finetune", "tapt", "ptapt_phase2"])
def test_the_stage_option_turns_checkpointing_on_for_training(
    stage: str, corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module_of_stage, config = _stage_config(stage, corpus, tmp_path / "out")
    seen: dict[str, Any] = {}
    real_fit = training.fit

    def fit(trainer: pl.Trainer, module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        backbones = [m for m in module.modules() if isinstance(m, Wav2Vec2Model)]
        seen["on"] = [_checkpointed(m) for m in backbones]
        real_fit(trainer, module, *args, **kwargs)  # trains with it: forward and backward
        seen["steps"] = trainer.global_step
        raise _Stop  # one fold is enough

    monkeypatch.setattr(training, "fit", fit)
    with pytest.raises(_Stop):
        module_of_stage.run(config)
    assert seen["on"] == [True] and seen["steps"] >= 1
