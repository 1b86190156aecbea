"""Probing the frozen backbone: the SUPERB / EmoBox protocol, on the same folds as fine-tuning.

The backbone never trains. Every hidden state it has (``output_hidden_states=True``: the
CNN-projected input as the encoder sees it, then each transformer layer's output) is averaged
over each utterance's valid frames; a learned softmax over the layers mixes them, and one
``Linear`` maps the mix to the classes (:class:`LayerWeightedHead`). Every fold file x
``num_exps`` repeats (seed ``config.seed + repeat``) trains that head with cross-entropy weighted
by the inverse class frequency of the fold's Train split and Adam at a constant learning rate;
with a Val split the checkpoint of the best validation UA is tested, without one the last.
Scores, reports and the selection of the exported run are fine-tuning's.

Which head, and why
-------------------
s3prl's emotion downstream (SUPERB ER) mixes the layers with its featurizer's softmax weights,
projects every frame with a ``Linear`` to 256 dimensions, averages the valid frames and applies
a ``Linear`` to the classes, with no nonlinearity anywhere. That is one linear map of the
weighted sum, whose rank the class count bounds anyway, so a single ``Linear`` has the same
function class with fewer weights; it is what this head is. EmoBox's recipe puts a ReLU on each
frame before the average (a 1-hidden-layer MLP); a nonlinearity before the pooling does not
commute with it, and would need every frame on disk (below). A probe measures what the layers
hold linearly; the linear head keeps that reading, and the features tiny.

Features on disk
----------------
The weighted sum and the time average commute (both are linear), and so does the ``Linear``:
``head(mean_t sum_l w_l h_lt) = head(sum_l w_l mean_t h_lt)``. So each utterance is stored as its
per-layer means, ``[layers x dim]`` float32, whatever its length: 13 x 768 x 4 = 39,936 bytes for
a base model (25 x 1024 x 4 = 102,400 for a large one), about 9 kB per second of audio at
IEMOCAP's mean of 4.5 s; its 5,531 utterances take 221 MB with base. Every frame of every layer
would take 50 frames/s x 13 x 768 x 4 bytes = 2.0 MB per second of audio (1.0 MB in float16):
about 50 GB for IEMOCAP's seven hours.

The backbone is frozen and one for every fold (a preset's random weights are drawn from
``seed``), so the features of an utterance are the same in every fold: the store holds every
utterance that any fold names, computed once per stage run (not once per fold: IEMOCAP's five
folds each cover the whole corpus), and each fold reads its rows. ``features/pooled.npy`` is
written beside itself and renamed into place, then ``features/index.json`` (row names and what
the features depend on); a store with an index is complete, and a rerun, another repeat, fold or
epoch reads it memory-mapped without running the backbone again. Each utterance's states are
those it gets alone: batched where padding changes no valid frame (a layer-norm feature encoder
and an encoder that ignores padding, ``ser.models.heads``), else one utterance at a time.

Outputs (``output_dir`` defaults to ``outputs/probe_head``)::

    output_dir/
      config.json                     the config, and the classes resolved from it
      features/pooled.npy, index.json the frozen per-layer means (never logged as artifacts)
      <fold>/run_<r>/results.json     as fine-tuning's, plus the tested run's layer weights
      <fold>/run_<r>/head.pt          the tested head (layer logits and Linear), a few kB
      summary.json, summary.txt       as fine-tuning's, plus the layer weights (mean over runs)
      confusion_matrix.png            the confusion matrix summed over runs
      model/                          backbone/, head.pt and model.json of the run with the best
                                      validation UA (or the first fold's first run): load with
                                      :func:`load_probe`, predict with
                                      ``ser.models.finetuned.predict``

Not MLflow-servable yet: ``ser.serving`` loads fine-tuned classifiers only, so the pipelines log
the probe's metrics but not its model, and the ``probe`` method refuses ``register_as``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedModel

from ser import artifacts, classification, report, training
from ser.atomic import atomic_path, atomic_write_json, atomic_write_text, replace_dir, restore_dir
from ser.checkpoints import safe_torch_load
from ser.classification import SplitEvaluation
from ser.config import SAMPLE_RATE, ProbeConfig
from ser.data.datasets import AudioOnlyDataset, collate_audio
from ser.data.labels import LabelFile
from ser.data.sampling import BucketBatchSampler, ResumableLoader
from ser.errors import SerInputError
from ser.models.backbones import PRESETS, load_backbone, save_backbone
from ser.models.heads import encoder_ignores_padding, feature_encoder_sees_padding, masked_mean
from ser.plots import plot_confusion
from ser.stages.contract import NO_CONTEXT, Stage, StageContext

log = logging.getLogger(__name__)

FEATURES = "features"  # top-level folder of the output: the frozen features
POOLED_NPY = "pooled.npy"
INDEX_JSON = "index.json"
HEAD_PT = "head.pt"
STORE_FORMAT = "ser-probe-features/1"
MODEL_FORMAT = "ser-probe-classifier/1"
EXTRACT_BATCH = 8  # utterances per backbone call where padding changes nothing
EVAL_BATCH = 256  # utterance vectors per evaluation batch of the head


@dataclass(frozen=True)
class ProbeResult:
    """Where the probe wrote its outputs, and its headline numbers (percent)."""

    output_dir: Path
    summary_path: Path
    summary_text_path: Path
    confusion_path: Path
    model_dir: Path
    features_dir: Path
    runs: list[dict[str, Any]]
    summary: dict[str, Any]  # as summary.json
    ua: float  # mean over every run of every fold
    wa: float
    f1: float


# --------------------------------------------------------------------------- the model


class LayerWeightedHead(nn.Module):
    """Softmax-weighted sum of an utterance's per-layer vectors ``[B, layers, dim]`` -> Linear."""

    def __init__(self, num_layers: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))  # uniform weights at start
        self.output = nn.Linear(dim, num_classes)

    def layer_weights(self) -> torch.Tensor:
        return torch.softmax(self.layer_logits, dim=0)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        mixed = torch.einsum("l,bld->bd", self.layer_weights().to(pooled.dtype), pooled)
        return self.output(mixed)


def pooled_hidden_states(
    backbone: PreTrainedModel, input_values: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Every hidden state averaged over each utterance's valid frames, ``[B, layers, dim]``
    float32, each utterance's as it gets alone (see the module docstring). ``attention_mask``:
    valid samples first, as ``collate_audio`` pads."""
    if feature_encoder_sees_padding(backbone) or not encoder_ignores_padding(backbone):
        return torch.cat([_pooled(backbone, input_values[i : i + 1, :n], None)
                          for i, n in enumerate(attention_mask.sum(-1).long().tolist())])
    return _pooled(backbone, input_values, attention_mask)


def _pooled(
    backbone: PreTrainedModel, input_values: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    states = backbone(input_values, attention_mask=attention_mask,
                      output_hidden_states=True).hidden_states
    frames = states[0].shape[1]
    if attention_mask is None:  # one utterance, unpadded: every frame is valid
        mask = torch.ones(states[0].shape[:2], dtype=torch.bool, device=states[0].device)
    else:
        mask = backbone._get_feature_vector_attention_mask(frames, attention_mask).bool()
    return torch.stack([masked_mean(state.float(), mask) for state in states], dim=1)


class ProbeClassifier(nn.Module):
    """The frozen backbone and a trained head, from audio: ``forward(input_values,
    attention_mask)`` -> logits. ``output`` is the head's Linear, so that
    ``ser.models.finetuned.predict`` takes this model too."""

    def __init__(self, backbone: PreTrainedModel, head: LayerWeightedHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    @property
    def output(self) -> nn.Linear:
        return self.head.output

    def forward(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_values, dtype=torch.long)
        with torch.no_grad():  # the backbone is frozen: never a graph through it
            pooled = pooled_hidden_states(self.backbone, input_values, attention_mask)
        return self.head(pooled)


def frozen_backbone(spec: str, seed: int) -> PreTrainedModel:
    """The backbone in eval mode, without gradients; a preset's random weights drawn from
    ``seed``, so that extraction and export build the same one."""
    training.seed_everything(seed)
    backbone = load_backbone(spec).eval()
    backbone.requires_grad_(False)
    return backbone


# --------------------------------------------------------------------------- the feature store


@dataclass(frozen=True)
class FeatureStore:
    """Per-layer means of every utterance: ``pooled`` ``[N, layers, dim]`` float32,
    memory-mapped, row ``i`` being ``names[i]``."""

    directory: Path
    names: list[str]
    pooled: np.ndarray

    def rows(self, names: Sequence[str]) -> list[int]:
        where = {name: row for row, name in enumerate(self.names)}
        return [where[name] for name in names]


def _identity(config: ProbeConfig) -> dict[str, Any]:
    """What the features depend on besides the file names: a store made otherwise is computed
    afresh. (The content behind a backbone path is not looked at; the pipelines give a changed
    one another output folder, its content being part of the reuse key.)"""
    return {
        "format": STORE_FORMAT, "backbone": config.backbone,
        "seed": config.seed if config.backbone in PRESETS else None,  # a preset's random init
        "datadir": str(Path(config.datadir).resolve()), "downmix": config.downmix,
        "precision": config.precision,
    }  # fmt: skip


def feature_store(config: ProbeConfig, names: Sequence[str], directory: Path) -> FeatureStore:
    """The store of ``names`` in ``directory``: the one there when it holds them with the same
    :func:`_identity`, else computed now (one backbone pass per utterance)."""
    identity, index_path = _identity(config), directory / INDEX_JSON
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if {k: index.get(k) for k in identity} == identity and set(names) <= set(index["names"]):
            store = _open_store(directory, index["names"])
            log.info("probe: reusing the features of %d utterance(s) in %s", len(names), directory)
            return store
    _extract(config, sorted(set(names)), directory, identity)
    return _open_store(directory, json.loads(index_path.read_text())["names"])


def _open_store(directory: Path, names: list[str]) -> FeatureStore:
    return FeatureStore(directory, names, np.load(directory / POOLED_NPY, mmap_mode="r"))


def _extract(config: ProbeConfig, names: list[str], directory: Path,
             identity: dict[str, Any]) -> None:  # fmt: skip
    (directory / INDEX_JSON).unlink(missing_ok=True)  # incomplete until the new index is in
    for stale in directory.glob(f".{POOLED_NPY}.*.tmp"):  # what a killed extraction left
        stale.unlink()
    device = _device(config.accelerator)
    backbone = frozen_backbone(config.backbone, config.seed).to(device)
    dataset = AudioOnlyDataset(config.datadir, names, downmix=config.downmix)
    order = np.argsort(dataset.lengths, kind="stable").tolist()  # little padding per batch
    loader = DataLoader(dataset, batch_size=EXTRACT_BATCH, sampler=order,
                        collate_fn=collate_audio, **training.loader_options(config))
    with atomic_path(directory / POOLED_NPY) as tmp:
        pooled: np.ndarray | None = None
        for start, values in _batches(backbone, loader, device, config.precision):
            if pooled is None:  # the layer count and width as the backbone returns them
                shape = (len(names), *values.shape[1:])
                pooled = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            pooled[order[start : start + len(values)]] = values
        assert pooled is not None  # a fold's splits are never empty (checked before)
        pooled.flush()
        shape = pooled.shape
        del pooled  # unmapped before the rename
    seconds = sum(dataset.lengths) / SAMPLE_RATE
    atomic_write_json(directory / INDEX_JSON, {
        **identity, "layers": shape[1], "dim": shape[2], "dtype": "float32",
        "bytes_per_utterance": 4 * shape[1] * shape[2], "seconds": seconds, "names": names,
    })  # fmt: skip
    log.info("probe: features of %d utterance(s) (%.0f s of audio) from %s: %d layers x %d per "
             "utterance, %.1f MB in all; wrote %s", len(names), seconds, config.backbone,
             shape[1], shape[2], 4 * np.prod(shape) / 1e6, directory)  # fmt: skip


def _batches(
    backbone: PreTrainedModel, loader: DataLoader, device: torch.device, precision: str
) -> Iterator[tuple[int, np.ndarray]]:
    """(position of the batch in the loader's order, its per-layer means)."""
    start = 0
    for batch in loader:
        with torch.inference_mode(), _autocast(device, precision):
            values = pooled_hidden_states(backbone, batch["input_values"].to(device),
                                          batch["attention_mask"].to(device))  # fmt: skip
        yield start, values.float().cpu().numpy()
        start += len(values)


def _device(accelerator: str) -> torch.device:
    """Where the backbone runs: the accelerator the head will train on."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator in ("auto", "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    if dtype is None or device.type == "cpu":  # on a CPU the Trainer falls back to 32 too
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------- training the head


class ProbeModule(SplitEvaluation):
    """The head, its weighted loss and optimizer, and evaluation over whole splits (logs
    ``valid_UA``, ``valid_WA``, ``valid_loss``; a test leaves ``test_scores`` and
    ``test_predictions``), as fine-tuning's module does."""

    def __init__(self, num_layers: int, dim: int, classes: Sequence[str],
                 class_weights: Sequence[float], lr: float) -> None:  # fmt: skip
        super().__init__()
        # Plain values, so the checkpoint loads with weights_only=True; not logged (see
        # ser.stages.finetune.FinetuneModule).
        self.save_hyperparameters({
            "num_layers": int(num_layers), "dim": int(dim), "classes": list(classes),
            "class_weights": [float(w) for w in class_weights], "lr": float(lr),
        }, logger=False)  # fmt: skip
        self.classes, self.lr = list(classes), lr
        self.head = LayerWeightedHead(num_layers, dim, len(self.classes))
        self.register_buffer(
            "class_weights", torch.tensor(class_weights, dtype=torch.float32), persistent=False
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["features"])
        loss = F.cross_entropy(logits.float(), batch["labels"], weight=self.class_weights)
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=len(logits))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.head.parameters(), lr=self.lr)

    def batch_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self(batch["features"])


class _Split(Dataset):
    """One split's rows of the store: ``features`` [layers, dim], ``labels``, ``names``."""

    def __init__(self, store: FeatureStore, items: Mapping[str, str],
                 classes: Sequence[str]) -> None:  # fmt: skip
        self.store, self.names = store, list(items)
        self.rows = store.rows(self.names)
        self.labels = [list(classes).index(items[name]) for name in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        i = index[1] if isinstance(index, tuple) else index  # ResumableLoader: (epoch, index)
        features = torch.from_numpy(np.array(self.store.pooled[self.rows[i]]))
        return {"features": features, "labels": self.labels[i], "names": self.names[i]}


@dataclass(frozen=True)
class _Loaders:
    train: DataLoader
    val: DataLoader | None
    test: DataLoader


def _loaders(config: ProbeConfig, fold: LabelFile, classes: Sequence[str], store: FeatureStore,
             seed: int) -> _Loaders:  # fmt: skip
    """Shuffled Train batches (a new seeded order each epoch, resumable mid-epoch), whole Val
    and Test splits. No worker processes: the features are in the page cache already, and a
    worker would only copy them."""
    train = _Split(store, fold.train, classes)
    sampler = BucketBatchSampler([1] * len(train), batch_size=config.batch_size, num_buckets=1,
                                 seed=seed)  # fmt: skip
    evaluate = lambda items: DataLoader(_Split(store, items, classes), batch_size=EVAL_BATCH)  # noqa: E731
    return _Loaders(train=ResumableLoader(train, sampler, num_workers=0),
                    val=evaluate(fold.val) if fold.val else None, test=evaluate(fold.test))


@dataclass(frozen=True)
class _Run:
    fold: LabelFile
    repeat: int
    seed: int
    weights: list[float]
    directory: Path

    @property
    def name(self) -> str:
        return f"{self.fold.name}/run_{self.repeat}"


def _train_and_test(config: ProbeConfig, job: _Run, classes: list[str], store: FeatureStore,
                    context: StageContext, index: int) -> dict[str, Any]:  # fmt: skip
    """Train and test one run's head (or read its results when it finished before)."""
    results_path = job.directory / artifacts.RESULTS_JSON
    if results_path.is_file():
        log.info("probe %s: already finished (%s), skipping", job.name, results_path)
        training.drop_checkpoints(job.directory, config)  # left by a kill after the results
        return json.loads(results_path.read_text())
    training.seed_everything(job.seed)
    layers, dim = store.pooled.shape[1:]
    module = ProbeModule(layers, dim, classes, job.weights, config.lr)
    loaders = _loaders(config, job.fold, classes, store, job.seed)
    trainer = training.build_trainer(
        config, job.directory, max_epochs=config.max_epochs,
        monitor="valid_UA" if loaders.val else None, mode="max", logger=context.logger(job.name),
        callbacks=context.callbacks(index, job.name), enable_validation=loaders.val is not None,
    )  # fmt: skip
    with warnings.catch_warnings():
        # No workers on purpose (see _loaders); folds without Val are expected.
        warnings.filterwarnings("ignore", message=".*does not have many workers")
        warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no")
        training.fit(trainer, module, job.directory, train_dataloaders=loaders.train,
                     val_dataloaders=loaders.val)  # fmt: skip
        tested = (training.best_checkpoint(trainer) if loaders.val
                  else training.last_checkpoint(job.directory))  # fmt: skip
        if tested is None:
            raise RuntimeError(f"probe {job.name}: training left no checkpoint in {job.directory}")
        trainer.test(module, dataloaders=loaders.test, ckpt_path=str(tested), verbose=False,
                     weights_only=True)  # fmt: skip
    output_dir = training.stage_output_dir(config, SPEC.name)
    record = {**classification.run_record(job, module, trainer, tested, output_dir),
              "backbone": config.backbone, "layer_weights": module.head.layer_weights().tolist()}

    def write() -> None:
        with atomic_path(job.directory / HEAD_PT) as tmp:
            torch.save(module.head.state_dict(), tmp)  # the tested weights (trainer.test loaded)
        atomic_write_json(results_path, record)  # the run is finished once this exists

    training.finish_fold(job.directory, config, write)
    log.info("probe %s (seed %d): test UA %.2f WA %.2f F1 %.2f with the %s checkpoint; wrote %s",
             job.name, job.seed, record["scores"]["UA"], record["scores"]["WA"],
             record["scores"]["F1"], record["tested"], results_path)  # fmt: skip
    return record


# --------------------------------------------------------------------------- the stage


def run(config: ProbeConfig, context: StageContext = NO_CONTEXT) -> ProbeResult:
    """Probe every fold ``num_exps`` times on features computed once, test, summarise, export."""
    config.check()
    folds = training.load_folds(config)
    classes = training.resolve_classes(config, folds)
    weights = classification.check_folds(folds, classes)
    output_dir = training.stage_output_dir(config, SPEC.name)
    restore_dir(output_dir / artifacts.MODEL)  # a kill in the middle of its replacement
    classification.warn_on_changed_config(config, output_dir)
    training.save_config(config, output_dir, resolved_classes=classes)
    names = sorted({name for fold in folds for name in fold.files()})
    store = feature_store(config, names, output_dir / FEATURES)
    jobs = [_Run(fold, repeat, config.seed + repeat, weights[fold.name],
                 output_dir / fold.name / f"run_{repeat}")
            for fold in folds for repeat in range(config.num_exps)]  # fmt: skip
    runs = [_train_and_test(config, job, classes, store, context, index)
            for index, job in enumerate(jobs)]  # fmt: skip
    return _finish(config, runs, classes, output_dir)


def _finish(config: ProbeConfig, runs: list[dict[str, Any]], classes: list[str],
            output_dir: Path) -> ProbeResult:  # fmt: skip
    summary = report.summarise_runs(runs, classes)
    summary["layer_weights"] = np.mean([r["layer_weights"] for r in runs], axis=0).tolist()
    chosen, reason = classification.select_export_run(runs)
    summary["exported_model"] = {"path": artifacts.MODEL, "fold": chosen["fold"],
                                 "repeat": chosen["repeat"], "selected_by": reason}  # fmt: skip
    model_dir = _export(config, chosen, reason, classes, output_dir)
    paths = [output_dir / name for name in
             (artifacts.SUMMARY_JSON, artifacts.SUMMARY_TXT, artifacts.CONFUSION_PNG)]  # fmt: skip
    atomic_write_json(paths[0], summary)
    atomic_write_text(paths[1], _summary_text(summary, config.backbone))
    plot_confusion(summary["confusion"], classes, paths[2],
                   title=f"Probe: confusion matrix, {summary['num_runs']} run(s) summed")
    metrics = summary["metrics"]
    log.info("probe: %d run(s) over %d fold(s): UA %.2f, WA %.2f, F1 %.2f (mean); wrote %s, %s, "
             "%s and the model in %s", len(runs), len(summary["folds"]), metrics["UA"]["mean"],
             metrics["WA"]["mean"], metrics["F1"]["mean"], *paths, model_dir)  # fmt: skip
    return ProbeResult(
        output_dir=output_dir, summary_path=paths[0], summary_text_path=paths[1],
        confusion_path=paths[2], model_dir=model_dir, features_dir=output_dir / FEATURES,
        runs=runs, summary=summary, ua=metrics["UA"]["mean"], wa=metrics["WA"]["mean"],
        f1=metrics["F1"]["mean"],
    )


def _summary_text(summary: Mapping[str, Any], backbone: str) -> str:
    # ser.report's header names fine-tuning; everything under it reads the same for a probe.
    text = report.format_summary(summary).replace(
        "Fine-tuning:", f"Probe of the frozen backbone {backbone!r}:", 1)
    weights = ", ".join(f"{i}: {w:.3f}" for i, w in enumerate(summary["layer_weights"]))
    return (f"{text}\nLayer weights (softmax, mean over runs; 0 is the CNN-projected input): "
            f"{weights}\n")  # fmt: skip


# --------------------------------------------------------------------------- the exported model


def _export(config: ProbeConfig, chosen: Mapping[str, Any], reason: str, classes: list[str],
            output_dir: Path) -> Path:  # fmt: skip
    """``model/`` for the chosen run, unless it holds that run's model already."""
    model_dir = output_dir / artifacts.MODEL
    source = {**report.run_row(chosen), "selected_by": reason}
    manifest = model_dir / artifacts.MODEL_JSON
    if manifest.is_file() and json.loads(manifest.read_text()).get("source") == source:
        return model_dir
    head = output_dir / chosen["fold"] / f"run_{chosen['repeat']}" / HEAD_PT
    replace_dir(model_dir, lambda folder: export_probe(
        frozen_backbone(config.backbone, config.seed), head, classes, folder, source))
    return model_dir


def export_probe(backbone: PreTrainedModel, head_file: Path, classes: Sequence[str],
                 directory: Path, source: Mapping[str, Any]) -> Path:  # fmt: skip
    """Write ``backbone/`` (``save_pretrained``), ``head.pt`` and ``model.json`` (last: a
    directory with one is complete)."""
    state = safe_torch_load(head_file)
    save_backbone(backbone, directory / artifacts.BACKBONE)
    with atomic_path(directory / HEAD_PT) as tmp:
        torch.save(state, tmp)
    layers, dim = len(state["layer_logits"]), state["output.weight"].shape[1]
    atomic_write_json(directory / artifacts.MODEL_JSON, {
        "format": MODEL_FORMAT, "classes": list(classes), "backbone": artifacts.BACKBONE,
        "head": HEAD_PT, "layers": layers, "dim": int(dim), "sample_rate": SAMPLE_RATE,
        "layer_weights": torch.softmax(state["layer_logits"], 0).tolist(), "source": dict(source),
        "rebuild": "ser.stages.probe.load_probe('<this directory>') -> (model, classes); "
                   "ser.models.finetuned.predict(model, wavs) -> (class indices, probabilities)",
    })  # fmt: skip
    return directory


def load_probe(directory: str | Path) -> tuple[ProbeClassifier, list[str]]:
    """The exported probe (eval mode, backbone frozen) and its classes, from
    ``<output_dir>/model``."""
    root = Path(directory)
    manifest = root / artifacts.MODEL_JSON
    data = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if data.get("format") != MODEL_FORMAT:
        raise SerInputError(f"{root} holds no exported probe ({manifest} with format "
                            f"{MODEL_FORMAT}); pass <output_dir>/{artifacts.MODEL} of a probe")
    classes = [str(c) for c in data["classes"]]
    backbone = load_backbone(str(root / data["backbone"])).eval()
    backbone.requires_grad_(False)
    head = LayerWeightedHead(data["layers"], data["dim"], len(classes))
    head.load_state_dict(safe_torch_load(root / data["head"]))
    return ProbeClassifier(backbone, head).eval(), classes


SPEC = Stage(name="probe_head", config_cls=ProbeConfig, run=run, inputs=("backbone",))
