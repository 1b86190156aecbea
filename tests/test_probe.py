"""The probe: frozen backbone, learned layer weights, features computed once, fine-tuning's
reports and headline metrics."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Model

from ser import artifacts, pipelines, recipes
from ser.audio import read_audio
from ser.checks import ConfigError
from ser.compare import compare
from ser.config import CompareConfig, ProbeConfig, ProbeMethodConfig, SearchConfig
from ser.data.datasets import collate_audio
from ser.data.labels import read_label_file
from ser.data.synthetic import DemoCorpus
from ser.models import finetuned
from ser.models.backbones import preset_config
from ser.search import centred_on_method
from ser.stages import probe

# What fine-tuning writes per run and in its summary (ser.stages.finetune, ser.report).
RUN_KEYS = {"fold", "repeat", "seed", "classes", "scores", "valid_UA", "tested", "checkpoint",
            "epochs", "global_step", "num_train", "num_val", "num_test", "backbone",
            "label_file", "predictions"}  # fmt: skip
SUMMARY_KEYS = {"classes", "folds", "num_exps", "num_runs", "metrics", "recall", "confusion",
                "runs", "exported_model"}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()  # the tiny model gains nothing from busy cores' threads
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Backbones:
    """Every backbone the stage loaded, its weights when loaded, and the forward calls of all."""

    loaded: list[torch.nn.Module] = field(default_factory=list)
    at_load: list[dict[str, torch.Tensor]] = field(default_factory=list)
    forwards: int = 0

    def load(self, spec: str) -> torch.nn.Module:
        model = REAL_LOAD(spec)
        self.loaded.append(model)
        self.at_load.append({k: v.clone() for k, v in model.state_dict().items()})

        def count(*_: Any) -> None:
            self.forwards += 1

        model.register_forward_hook(count)
        return model


REAL_LOAD = probe.load_backbone


@dataclass
class Probed:
    config: ProbeConfig
    first: probe.ProbeResult
    again: probe.ProbeResult
    backbones: Backbones
    forwards_first: int  # after the first run
    utterances: int


@pytest.fixture(scope="module")
def probed(corpus: DemoCorpus, tmp_path_factory: pytest.TempPathFactory) -> Probed:
    """Three folds x one repeat x three epochs, then the same output with a second repeat."""
    config = ProbeConfig(datadir=str(corpus.audio_dir), labeldir=str(corpus.label_dir),
                         output_dir=str(tmp_path_factory.mktemp("probe")), max_epochs=3,
                         batch_size=4, num_workers=0)  # fmt: skip
    backbones = Backbones()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(probe, "load_backbone", backbones.load)
        first = probe.run(config)
        forwards = backbones.forwards
        again = probe.run(dataclasses.replace(config, num_exps=2))
    utterances = len({p.name for p in corpus.audio_dir.glob("*.wav")})
    return Probed(config, first, again, backbones, forwards, utterances)


def test_layer_weights_are_a_softmax_that_learns_which_layer_informs() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (64,))
    pooled = torch.randn(64, 3, 8)
    pooled[:, 1, 0] += 3.0 * (2 * labels - 1)  # only layer 1 tells the classes apart
    head = probe.LayerWeightedHead(num_layers=3, dim=8, num_classes=2)
    assert torch.allclose(head.layer_weights(), torch.full((3,), 1 / 3))
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = head.layer_weights().detach()
    assert float(weights.sum()) == pytest.approx(1.0)
    assert int(weights.argmax()) == 1 and float(weights[1]) > 0.4


def test_pooled_states_are_each_utterances_alone_when_batched() -> None:
    # A layer-norm feature encoder and one positional conv: the batched path is taken.
    torch.manual_seed(0)
    backbone = Wav2Vec2Model(preset_config("tiny", feat_extract_norm="layer", conv_bias=True))
    backbone.eval()
    wavs = [torch.randn(n) for n in (16_000, 9_000, 23_000)]
    batch = collate_audio([{"input_values": w, "name": str(i)} for i, w in enumerate(wavs)])
    with torch.inference_mode():
        batched = probe.pooled_hidden_states(backbone, batch["input_values"],
                                             batch["attention_mask"])  # fmt: skip
        alone = [probe.pooled_hidden_states(backbone, w[None], torch.ones(1, len(w)))
                 for w in wavs]  # fmt: skip
    assert batched.shape == (3, 3, 64)  # the projected input and two layers
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-4)


def test_the_backbone_gets_no_gradient_and_is_unchanged(probed: Probed) -> None:
    assert probed.backbones.loaded  # extraction and export each load the frozen backbone
    for model, at_load in zip(probed.backbones.loaded, probed.backbones.at_load, strict=True):
        assert all(not p.requires_grad and p.grad is None for p in model.parameters())
        for name, value in model.state_dict().items():
            assert torch.equal(value, at_load[name]), name
    # Export rebuilds the very backbone the features came from (a preset, drawn from seed).
    first, last = probed.backbones.at_load[0], probed.backbones.at_load[-1]
    assert all(torch.equal(first[k], last[k]) for k in first)


def test_features_are_computed_once_for_every_fold_epoch_and_rerun(probed: Probed) -> None:
    # tiny has a group-norm feature encoder: one backbone call per utterance, each alone.
    assert probed.forwards_first == probed.utterances
    assert probed.backbones.forwards == probed.forwards_first  # the second repeat read the store
    index = json.loads((probed.first.features_dir / probe.INDEX_JSON).read_text())
    assert len(index["names"]) == probed.utterances and index["layers"] == 3
    pooled = np.load(probed.first.features_dir / probe.POOLED_NPY, mmap_mode="r")
    assert pooled.shape == (probed.utterances, 3, 64) and pooled.dtype == np.float32


def test_the_stage_writes_results_and_summary_like_fine_tuning(probed: Probed) -> None:
    out = probed.again.output_dir
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/run_*/results.json"))]
    assert len(records) == 3 * 2 and all(set(r) >= RUN_KEYS for r in records)
    assert all(r["epochs"] == 3 and r["tested"] == "best" for r in records)
    assert not list(out.glob("*/run_*/checkpoints"))  # resume points go once a run finishes
    summary = json.loads((out / artifacts.SUMMARY_JSON).read_text())
    assert set(summary) >= SUMMARY_KEYS and summary["num_runs"] == 6
    assert summary["metrics"]["UA"]["mean"] == pytest.approx(probed.again.ua)
    assert (out / artifacts.CONFUSION_PNG).stat().st_size > 0
    text = (out / artifacts.SUMMARY_TXT).read_text()
    assert text.startswith("Probe of the frozen backbone 'tiny'") and "Layer weights" in text
    for record in records:  # learned: no longer the uniform 1/3 each
        assert float(np.abs(np.asarray(record["layer_weights"]) - 1 / 3).max()) > 1e-4


def test_the_exported_model_predicts_what_its_run_tested(probed: Probed) -> None:
    chosen = probed.again.summary["exported_model"]
    record = next(r for r in probed.again.runs
                  if (r["fold"], r["repeat"]) == (chosen["fold"], chosen["repeat"]))  # fmt: skip
    model, classes = probe.load_probe(probed.again.model_dir)
    names = sorted(record["predictions"])
    wavs = [read_audio(Path(probed.config.datadir) / name) for name in names]
    indices, probs = finetuned.predict(model, wavs)
    assert [classes[i] for i in indices] == [record["predictions"][n] for n in names]
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_register_as_is_refused_before_any_run() -> None:
    with pytest.raises(ConfigError, match="register_as='x' must be empty"):
        ProbeMethodConfig(register_as="x").check()
    with pytest.raises(ConfigError, match="devices='2' must be 1"):
        ProbeConfig(devices="2").check()


def test_a_search_centres_on_the_probes_lr_and_recipe_paper_keeps_its_head() -> None:
    space = centred_on_method(SearchConfig(method="probe"))
    assert (space.lr_min, space.lr_max) == pytest.approx((ProbeConfig.lr / 10, ProbeConfig.lr * 10))
    space.check()  # the probe at the corners of its space
    assert centred_on_method(SearchConfig(method="vft")) == SearchConfig(method="vft")
    assert centred_on_method(SearchConfig(method="probe", lr_min=0.5)).lr_min == 0.5  # typed
    paper = recipes.resolve(ProbeMethodConfig(recipe="paper"))
    assert (paper.num_exps, paper.lr) == (5, ProbeConfig.lr)


@pytest.mark.slow
def test_the_probe_method_logs_vft_headline_metrics_and_compare_lists_it(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    config = ProbeMethodConfig(datadir=str(corpus.audio_dir), labeldir=str(corpus.label_dir),
                               output_root=str(tmp_path / "out"), max_epochs=1, batch_size=4,
                               num_workers=0)  # fmt: skip
    headline = pipelines.run_method(config)
    wanted = {f"test_{m}_{s}" for m in ("UA", "WA", "F1")
              for s in ("mean", "std", "std_over_repeats")} | {"valid_UA_mean"}  # fmt: skip
    assert wanted <= set(headline)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parent = next(r for r in runs if r.data.tags["ser.stage"] == "probe")
    stage = next(r for r in runs if r.data.tags["ser.stage"] == "probe_head")
    assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.metrics["test_UA_mean"] == pytest.approx(headline["test_UA_mean"])
    listed = mlflow.artifacts.list_artifacts
    logged = {a.path for a in listed(run_id=stage.info.run_id)}
    folds = {a.path for a in listed(run_id=stage.info.run_id, artifact_path="folds")}
    assert "summary.json" in logged and "folds/fold_1" in folds
    assert probe.FEATURES not in logged and f"folds/{probe.FEATURES}" not in folds  # scratch
    rows = compare(CompareConfig(output_dir=str(tmp_path / "compare"))).rows
    assert [(r.method, r.run_id) for r in rows] == [("probe", parent.info.run_id)]
    assert rows[0].values["UA"][0] == pytest.approx(headline["test_UA_mean"])


@pytest.mark.parametrize("backbone", ["tiny-hubert", "tiny-wavlm", "tiny-data2vec-audio"])
def test_the_probe_takes_every_backbone_family(
    backbone: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    """One fold, one epoch: each family's hidden states are stored, mixed and scored."""
    config = ProbeConfig(datadir=str(corpus.audio_dir), labelpath=str(corpus.label_files[0]),
                         output_dir=str(tmp_path), backbone=backbone, max_epochs=1,
                         batch_size=4, num_workers=0)  # fmt: skip
    result = probe.run(config)
    (run,) = result.runs
    assert run["backbone"] == backbone and len(run["layer_weights"]) == 3  # input + 2 layers
    assert set(run["predictions"]) == set(read_label_file(corpus.label_files[0]).test)
    assert 0 <= result.ua <= 100
