"""Fine-tuning on emotion labels: V-FT, and the last stage of TAPT and P-TAPT.

Every fold file x ``num_exps`` repeats (seed ``config.seed + repeat``) trains an
:class:`~ser.models.heads.UtteranceClassifier` (backbone -> ReLU -> mean over valid frames ->
ReLU -> Linear) with cross-entropy weighted by the inverse class frequency of the fold's Train
split, Adam at a constant learning rate over the trainable parameters only, and SpecAugment
during training. With a Val split the checkpoint of the best validation UA is tested; without
one (IEMOCAP's session files) the last epoch is.

Outputs (``output_dir`` defaults to ``outputs/finetune``)::

    output_dir/
      config.json                     the config, and the classes resolved from it
      <fold>/run_<r>/checkpoints/     Lightning checkpoints (best save_top_k, last.ckpt) and
                                      model.json, so a checkpoint is also a backbone spec
      <fold>/run_<r>/results.json     scores of the tested checkpoint (WA, UA, F1, per-class
                                      recall, confusion matrix), its path, seed, sizes, and
                                      every test utterance's prediction
      summary.json, summary.txt       mean / std / median over folds and repeats (as
                                      ``ser.metrics.summarise``), per fold, per class, every run
      confusion_matrix.png            the confusion matrix summed over runs
      model/                          one run's fine-tuned model, for serving:
                                      :func:`load_finetuned` and :func:`predict` read it

A run whose ``results.json`` exists is skipped, so a re-run after a crash resumes: finished runs
are reused and the interrupted one continues from its ``last.ckpt``.

Which model is exported: picking the run with the best *test* UA would select on the test set.
The run with the best *validation* UA (at its tested checkpoint) is exported when the folds have
a Val split; without one there is nothing to select on, and the first fold's first run is.

Evaluation batches: with a group-norm feature encoder (wav2vec2-base, the ``tiny`` preset) an
utterance's logits change when it is padded in a batch, because the first conv layer normalises
over the whole padded time axis, so validation and test run one utterance at a time, as the
original does. With a layer-norm feature encoder (wav2vec2-large) padded batches give the same
logits (tests/test_stage_finetune.py shows both), and utterances are evaluated
:data:`EVAL_BATCH_SIZE` at a time.

``logger_factory`` is called once per run with ``"<fold>/run_<r>"``; ``callback_factory``, if
given, with the run's index and that name, and its callbacks join the run's Trainer.

Departures from the original
----------------------------
- Training audio longer than ``maxseqlen`` is cropped at a random offset each epoch; the original
  kept its first ``maxseqlen`` seconds.
- UA and macro-F1 average over the classes present in a fold's test split; the original counted
  a class absent from the test split as recall 0 (see ``ser.metrics``).
- The classifier has no BiLSTM: the original built one that forward never used and optimised it
  anyway (RECIPE defect 1); only parameters that train are given to Adam.
- Mean pooling covers every valid frame; the original left the last one out (defect 2).
- Every run is seeded (``seed + repeat``: initialisation, masks, crops and batch order), and
  folds run in natural file-name order (defect 8).
- An existing output directory is resumed, not refused (defect 9).
- A class with no Train utterance in some fold is refused before training (its inverse-frequency
  weight would be infinite).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import Logger
from torch.utils.data import DataLoader
from transformers import Wav2Vec2Config

from ser import training
from ser.atomic import atomic_path, atomic_write_json, atomic_write_text
from ser.audio import MIN_SAMPLES
from ser.checkpoints import safe_torch_load
from ser.config import SAMPLE_RATE, FinetuneConfig
from ser.data.datasets import UtteranceDataset, collate_audio, collate_utterances
from ser.data.labels import LabelFile
from ser.data.sampling import BucketBatchSampler
from ser.errors import SerInputError
from ser.metrics import Scores, score, summarise
from ser.models.backbones import load_backbone, save_backbone, write_model_json
from ser.models.heads import UtteranceClassifier
from ser.plots import plot_confusion
from ser.stages import common

log = logging.getLogger(__name__)

STAGE = "finetune"
RESULTS = "results.json"
SUMMARY_JSON = "summary.json"
SUMMARY_TXT = "summary.txt"
CONFUSION_PNG = "confusion_matrix.png"
MODEL_DIR = "model"
MODEL_JSON = "model.json"
MODEL_FORMAT = "ser-finetuned-classifier/1"
BACKBONE_SUBDIR = "backbone"  # where an earlier stage puts a fold's backbone, and our export
HEAD_FILE = "head.pt"
EVAL_BATCH_SIZE = 8  # utterances per evaluation batch when padding cannot change the logits
METRICS = ("WA", "UA", "F1")

LoggerFactory = Callable[[str], Logger | bool]
# Extra callbacks for one run's Trainer, given the run's index (folds x repeats, in order) and
# name; e.g. a search's pruning callback, which counts its steps across runs.
CallbackFactory = Callable[[int, str], Sequence[Callback]]


@dataclass(frozen=True)
class FinetuneResult:
    """Where fine-tuning wrote its outputs, and its headline numbers (percent)."""

    output_dir: Path
    summary_path: Path
    summary_text_path: Path
    confusion_path: Path
    model_dir: Path
    runs: list[dict[str, Any]]
    ua: float  # mean over every run of every fold
    wa: float
    f1: float


# --------------------------------------------------------------------------- building blocks


def class_weights(labels: Sequence[int], num_classes: int) -> list[float]:
    """Inverse class frequency ``N / n_c``, normalised to sum to 1 (RECIPE)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    if len(counts) != num_classes or (counts == 0).any():
        raise ValueError(f"every one of {num_classes} classes needs a label; counts {counts}")
    inverse = len(labels) / counts
    return (inverse / inverse.sum()).tolist()


def eval_batch_size(backbone_config: Wav2Vec2Config) -> int:
    """Utterances per evaluation batch: 1 unless padding cannot change the logits (see the
    module docstring)."""
    return EVAL_BATCH_SIZE if backbone_config.feat_extract_norm == "layer" else 1


class FinetuneModule(pl.LightningModule):
    """The utterance classifier, its weighted loss, optimizer and evaluation over whole splits.

    ``backbone`` is any spec :func:`ser.models.backbones.load_backbone` accepts. Validation
    logs ``valid_UA``, ``valid_WA`` and ``valid_loss`` computed over the whole split; a test
    leaves its :class:`~ser.metrics.Scores` in ``test_scores`` and every utterance's predicted
    class in ``test_predictions``.
    """

    def __init__(
        self,
        backbone: str,
        classes: Sequence[str],
        class_weights: Sequence[float],
        lr: float = 1e-4,
        mask_time_prob: float = 0.08,
        mask_feature_prob: float = 0.05,
    ) -> None:
        super().__init__()
        if len(class_weights) != len(classes):
            raise ValueError(f"{len(class_weights)} class weights for {len(classes)} classes")
        # Plain values only, so the checkpoint loads with weights_only=True. Not sent to the
        # logger: runs of one stage share an MLflow run, whose params cannot change value, and
        # the class weights and backbone differ between folds.
        self.save_hyperparameters({
            "backbone": backbone,
            "classes": list(classes),
            "class_weights": [float(w) for w in class_weights],
            "lr": float(lr),
            "mask_time_prob": float(mask_time_prob),
            "mask_feature_prob": float(mask_feature_prob),
        }, logger=False)
        self.classes = list(classes)
        self.lr = lr
        self.model = UtteranceClassifier(
            load_backbone(backbone),
            len(self.classes),
            time_mask_prob=mask_time_prob,
            feature_mask_prob=mask_feature_prob,
        )
        self.register_buffer(
            "class_weights", torch.tensor(class_weights, dtype=torch.float32), persistent=False
        )
        self._outputs: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []
        self.test_scores: Scores | None = None
        self.test_predictions: dict[str, str] = {}

    @property
    def eval_batch_size(self) -> int:
        return eval_batch_size(self.model.backbone.config)

    def forward(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.model(input_values, attention_mask)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_values"], batch["attention_mask"])
        loss = F.cross_entropy(logits.float(), batch["labels"], weight=self.class_weights)
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=len(logits))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.trainable_parameters(), lr=self.lr)

    # Evaluation gathers every utterance first: UA is a property of the whole split, not an
    # average of per-batch values.
    def on_validation_epoch_start(self) -> None:
        self._outputs = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def on_validation_epoch_end(self) -> None:
        logits, labels, _ = self._gathered()
        scores = self._validation_scores(labels.tolist(), logits.argmax(-1).tolist())
        loss = F.cross_entropy(logits, labels, weight=self.class_weights.cpu())
        self.log("valid_UA", scores.ua, prog_bar=True)
        self.log("valid_WA", scores.wa)
        self.log("valid_loss", loss)

    def _validation_scores(self, labels: list[int], preds: list[int]) -> Scores:
        return score(labels, preds, self.classes)

    def on_test_epoch_start(self) -> None:
        self._outputs = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def on_test_epoch_end(self) -> None:
        logits, labels, names = self._gathered()
        preds = logits.argmax(-1).tolist()
        self.test_scores = score(labels.tolist(), preds, self.classes)
        self.test_predictions = {
            name: self.classes[p] for name, p in zip(names, preds, strict=True)
        }
        for key, value in (("UA", self.test_scores.ua), ("WA", self.test_scores.wa),
                           ("F1", self.test_scores.f1)):
            self.log(f"test_{key}", value)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        logits = self(batch["input_values"], batch["attention_mask"])
        return {"names": batch["names"], "probs": torch.softmax(logits.float(), dim=-1).cpu()}

    def _collect(self, batch: dict[str, Any]) -> None:
        logits = self(batch["input_values"], batch["attention_mask"])
        self._outputs.append((logits.detach().float().cpu(), batch["labels"].cpu(),
                              list(batch["names"])))

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        logits = torch.cat([out[0] for out in self._outputs])
        labels = torch.cat([out[1] for out in self._outputs])
        names = [name for out in self._outputs for name in out[2]]
        self._outputs = []
        return logits, labels, names


class _CropEpoch(Callback):
    """Lightning sets the sampler's epoch but never the dataset's: draw this epoch's crops."""

    def __init__(self, dataset: UtteranceDataset) -> None:
        self.dataset = dataset

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dataset.set_epoch(trainer.current_epoch)


# --------------------------------------------------------------------------- data


@dataclass
class _Loaders:
    train: DataLoader
    val: DataLoader | None
    test: DataLoader
    train_dataset: UtteranceDataset


def _loaders(
    config: FinetuneConfig, fold: LabelFile, classes: list[str], seed: int, eval_batch: int
) -> _Loaders:
    max_samples = int(config.maxseqlen * SAMPLE_RATE)
    train = UtteranceDataset(config.datadir, fold.train, classes, max_samples=max_samples,
                             train=True, seed=seed, downmix=config.downmix)
    sampler = BucketBatchSampler(train.lengths, batch_size=config.batch_size,
                                 max_len=max_samples, seed=seed)
    return _Loaders(
        train=DataLoader(train, batch_sampler=sampler, collate_fn=collate_utterances,
                         num_workers=config.num_workers),
        val=eval_loader(config, fold.val, classes, eval_batch) if fold.val else None,
        test=eval_loader(config, fold.test, classes, eval_batch),
        train_dataset=train,
    )


def eval_loader(
    config: FinetuneConfig, items: Mapping[str, str], classes: Sequence[str], batch_size: int
) -> DataLoader:
    """Whole utterances sorted by length (little padding), ``batch_size`` at a time."""
    dataset = UtteranceDataset(config.datadir, items, classes, downmix=config.downmix)
    # A plain sampler, not a batch sampler: Trainer.predict rebuilds the batch sampler of its
    # loaders and can only do that for torch's own.
    order = np.argsort(dataset.lengths, kind="stable").tolist()
    return DataLoader(dataset, batch_size=batch_size, sampler=order,
                      collate_fn=collate_utterances, num_workers=config.num_workers)


# --------------------------------------------------------------------------- validation


def _check_params(config: FinetuneConfig) -> None:
    common.positive("lr", config.lr)
    common.positive("maxseqlen", config.maxseqlen)
    for name, low in (("batch_size", 1), ("max_epochs", 1), ("num_exps", 1), ("seed", 0),
                      ("accumulate_grad_batches", 1), ("num_workers", 0)):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SerInputError(f"{name}={value!r} must be an integer >= {low}")
    for name in ("mask_time_prob", "mask_feature_prob"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise SerInputError(f"{name}={getattr(config, name)} must be in [0, 1]")
    if config.save_top_k < 1 and config.save_top_k != -1:
        raise SerInputError(
            f"save_top_k={config.save_top_k}: keep at least the best checkpoint (1), or all (-1)"
        )
    if config.gradient_clip_val < 0:
        raise SerInputError(f"gradient_clip_val={config.gradient_clip_val} must be >= 0")
    if config.precision not in training.PRECISIONS:
        raise SerInputError(
            f"precision={config.precision!r} is not one of {', '.join(training.PRECISIONS)}"
        )


def _check_folds(folds: list[LabelFile], classes: list[str]) -> dict[str, list[float]]:
    """Each fold's class weights; refuses folds that cannot be trained or tested."""
    weights = {}
    for fold in folds:
        for split, items in (("Train", fold.train), ("Test", fold.test)):
            if not items:
                raise SerInputError(f"label file {fold.path}: the {split} split is empty")
        absent = sorted(set(classes) - set(fold.train.values()))
        if absent:
            raise SerInputError(
                f"label file {fold.path}: no Train utterance of class(es) {absent}, so the "
                "class weights (inverse frequency) are undefined; add Train data for them or "
                f"leave them out of --classes"
            )
        index = {c: i for i, c in enumerate(classes)}
        weights[fold.name] = class_weights([index[c] for c in fold.train.values()], len(classes))
    return weights


def backbone_source(config: FinetuneConfig, fold: LabelFile) -> str:
    """The backbone spec of ``fold``: the fold's own pretrained backbone when an earlier stage
    wrote one per fold (``pretrained_path/<fold>/`` or ``pretrained_path/<fold>/backbone/``),
    else ``pretrained_path``, else ``config.backbone``."""
    if not config.pretrained_path:
        return config.backbone
    path = Path(common.fold_input(config.pretrained_path, fold))
    if not path.exists():
        raise SerInputError(
            f"pretrained_path={config.pretrained_path!r} does not exist; pass a local backbone "
            "an earlier stage wrote (its output_dir, a backbone directory or a .ckpt), or "
            "leave it empty to start from --backbone"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        nested = path / BACKBONE_SUBDIR
        if (nested / "config.json").is_file():
            return str(nested)
        raise SerInputError(
            f"pretrained_path: {path} holds neither config.json nor {BACKBONE_SUBDIR}/config.json"
            f" (fold {fold.name}); pass the directory an earlier stage saved its backbone in"
        )
    return str(path)


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class _Run:
    fold: LabelFile
    repeat: int
    seed: int
    backbone: str
    weights: list[float]
    directory: Path

    @property
    def name(self) -> str:
        return f"{self.fold.name}/run_{self.repeat}"


def _train_and_test(
    config: FinetuneConfig,
    job: _Run,
    classes: list[str],
    output_dir: Path,
    logger_factory: LoggerFactory | None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    results_path = job.directory / RESULTS
    if results_path.is_file():
        log.info("finetune %s: already finished (%s), skipping", job.name, results_path)
        return json.loads(results_path.read_text())
    common.seed_everything(job.seed)
    module = FinetuneModule(job.backbone, classes, job.weights, lr=config.lr,
                            mask_time_prob=config.mask_time_prob,
                            mask_feature_prob=config.mask_feature_prob)
    loaders = _loaders(config, job.fold, classes, job.seed, module.eval_batch_size)
    has_val = loaders.val is not None
    trainer = _fit(config, job, module, loaders, logger_factory, callbacks)
    tested = training.best_checkpoint(trainer) if has_val else training.last_checkpoint(
        job.directory)
    if tested is None:
        raise RuntimeError(f"finetune {job.name}: training left no checkpoint in {job.directory}")
    trainer.test(module, dataloaders=loaders.test, ckpt_path=str(tested), verbose=False,
                 weights_only=True)
    result = _run_record(job, module, trainer, tested, output_dir, has_val)
    atomic_write_json(results_path, result)
    log.info("finetune %s (seed %d): test UA %.2f WA %.2f F1 %.2f with the %s checkpoint; "
             "wrote %s", job.name, job.seed, result["scores"]["UA"], result["scores"]["WA"],
             result["scores"]["F1"], result["tested"], results_path)
    return result


def _fit(
    config: FinetuneConfig,
    job: _Run,
    module: FinetuneModule,
    loaders: _Loaders,
    logger_factory: LoggerFactory | None,
    callbacks: Sequence[Callback] = (),
) -> pl.Trainer:
    """Train (resuming from the run's last.ckpt); checkpoints by valid_UA when there is a Val."""
    has_val = loaders.val is not None
    trainer = training.build_trainer(
        config, job.directory, max_epochs=config.max_epochs,
        monitor="valid_UA" if has_val else None, mode="max",
        logger=logger_factory(job.name) if logger_factory else False,
        callbacks=[_CropEpoch(loaders.train_dataset), *callbacks], enable_validation=has_val,
    )
    with warnings.catch_warnings():
        # Folds without Val (IEMOCAP's) are expected: no warning per run about it.
        warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no")
        training.fit(trainer, module, job.directory, train_dataloaders=loaders.train,
                     val_dataloaders=loaders.val)
    # Written after fit: ModelCheckpoint warns about a non-empty directory at the start.
    write_model_json(job.directory / training.CHECKPOINT_DIR, module.model.backbone.config)
    return trainer


def _run_record(
    job: _Run,
    module: FinetuneModule,
    trainer: pl.Trainer,
    tested: Path,
    output_dir: Path,
    has_val: bool,
) -> dict[str, Any]:
    assert module.test_scores is not None  # set by trainer.test
    best_score = getattr(trainer.checkpoint_callback, "best_model_score", None)
    return {
        "fold": job.fold.name,
        "repeat": job.repeat,
        "seed": job.seed,
        "classes": module.classes,
        "scores": module.test_scores.as_dict(),
        "valid_UA": float(best_score) if has_val and best_score is not None else None,
        "tested": "best" if has_val else "last",
        "checkpoint": tested.resolve().relative_to(output_dir.resolve()).as_posix(),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "num_train": len(job.fold.train),
        "num_val": len(job.fold.val),
        "num_test": len(job.fold.test),
        "backbone": job.backbone,
        "label_file": str(job.fold.path),
        "predictions": module.test_predictions,
    }


# --------------------------------------------------------------------------- the stage


def run(
    config: FinetuneConfig,
    *,
    logger_factory: LoggerFactory | None = None,
    callback_factory: CallbackFactory | None = None,
) -> FinetuneResult:
    """Fine-tune every fold ``num_exps`` times, test, summarise, and export one model."""
    _check_params(config)
    folds = common.load_folds(config)
    classes = common.resolve_classes(config, folds)
    weights = _check_folds(folds, classes)
    sources = {fold.name: backbone_source(config, fold) for fold in folds}
    output_dir = training.stage_output_dir(config, STAGE)
    _warn_on_changed_config(config, output_dir)
    common.save_config(config, output_dir, resolved_classes=classes)
    jobs = [
        _Run(fold, repeat, config.seed + repeat, sources[fold.name], weights[fold.name],
             output_dir / fold.name / f"run_{repeat}")
        for fold in folds
        for repeat in range(config.num_exps)
    ]
    runs = [
        _train_and_test(config, job, classes, output_dir, logger_factory,
                        callback_factory(index, job.name) if callback_factory else ())
        for index, job in enumerate(jobs)
    ]  # fmt: skip
    return _finish(runs, classes, output_dir)


def _warn_on_changed_config(config: FinetuneConfig, output_dir: Path) -> None:
    saved = output_dir / "config.json"
    if not saved.is_file():
        return
    old = json.loads(saved.read_text())
    changed = sorted(k for k, v in dataclasses.asdict(config).items() if old.get(k, v) != v)
    if changed:
        log.warning(
            "%s holds runs made with other settings (%s differ); finished runs are reused as "
            "they are. Use a new output_dir to start afresh.", output_dir, ", ".join(changed))


def _finish(runs: list[dict[str, Any]], classes: list[str], output_dir: Path) -> FinetuneResult:
    summary = summarise_runs(runs, classes)
    chosen, reason = select_export_run(runs)
    model_dir = export_model(output_dir / chosen["checkpoint"], classes, output_dir / MODEL_DIR,
                             source={**_run_row(chosen), "selected_by": reason})
    summary["exported_model"] = {"path": MODEL_DIR, "fold": chosen["fold"],
                                 "repeat": chosen["repeat"], "selected_by": reason}
    summary_path, text_path = output_dir / SUMMARY_JSON, output_dir / SUMMARY_TXT
    atomic_write_json(summary_path, summary)
    atomic_write_text(text_path, format_summary(summary))
    confusion_path = plot_confusion(
        summary["confusion"], classes, output_dir / CONFUSION_PNG,
        title=f"Confusion matrix, {len(runs)} run(s) summed",
    )
    metrics = summary["metrics"]
    log.info("finetune: %d run(s) over %d fold(s): UA %.2f, WA %.2f, F1 %.2f (mean); wrote "
             "%s, %s, %s and the model in %s", len(runs), len(summary["folds"]),
             metrics["UA"]["mean"], metrics["WA"]["mean"], metrics["F1"]["mean"], summary_path,
             text_path, confusion_path, model_dir)
    return FinetuneResult(
        output_dir=output_dir, summary_path=summary_path, summary_text_path=text_path,
        confusion_path=confusion_path, model_dir=model_dir, runs=runs,
        ua=metrics["UA"]["mean"], wa=metrics["WA"]["mean"], f1=metrics["F1"]["mean"],
    )


# --------------------------------------------------------------------------- summary


def summarise_runs(runs: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """Scores over folds and repeats (``ser.metrics.summarise``), per fold (mean and std over
    repeats), per class (recall averaged over the runs whose test split has the class), the
    confusion matrix summed over runs, and one row per run."""
    folds = list(dict.fromkeys(run["fold"] for run in runs))
    by_fold = {f: sorted((r for r in runs if r["fold"] == f), key=lambda r: r["repeat"])
               for f in folds}
    metrics: dict[str, Any] = {}
    for key in METRICS:
        grid = {f: [r["scores"][key] for r in fold_runs] for f, fold_runs in by_fold.items()}
        metrics[key] = {
            **summarise(grid).as_dict(),
            "per_fold": {f: {"mean": float(np.mean(v)), "std": float(np.std(v))}
                         for f, v in grid.items()},
        }
    recall = {}
    for name in classes:
        values = [r["scores"]["recall"][name] for r in runs if name in r["scores"]["recall"]]
        if values:
            recall[name] = float(np.mean(values))
    confusion = np.sum([np.asarray(r["scores"]["confusion"]) for r in runs], axis=0)
    return {
        "classes": list(classes),
        "folds": folds,
        "num_exps": max(len(v) for v in by_fold.values()),
        "num_runs": len(runs),
        "metrics": metrics,
        "recall": recall,
        "confusion": confusion.tolist(),
        "runs": [_run_row(r) for r in runs],
    }


def _run_row(run: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "fold": run["fold"],
        "repeat": run["repeat"],
        "seed": run["seed"],
        **{key: run["scores"][key] for key in METRICS},
        "valid_UA": run["valid_UA"],
        "tested": run["tested"],
        "checkpoint": run["checkpoint"],
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as a plain-text report (what the original wrote to its OUTPUT_FILE, and more)."""
    classes, metrics = summary["classes"], summary["metrics"]
    lines = [
        f"Fine-tuning: {len(summary['folds'])} fold(s) x {summary['num_exps']} run(s) = "
        f"{summary['num_runs']} runs; classes: {', '.join(classes)}",
        "Test scores in percent. 'folds': std / median across folds within a run index, averaged"
        " over run indices;",
        "'repeats': std / median across run indices of the mean over folds (population std).",
        "",
        f"{'metric':<8}{'mean':>9}{'std(folds)':>12}{'median(folds)':>15}{'std(repeats)':>14}"
        f"{'median(repeats)':>17}",
    ]
    for key in METRICS:
        m = metrics[key]
        lines.append(f"{key:<8}{m['mean']:>9.2f}{m['std_over_folds']:>12.2f}"
                     f"{m['median_over_folds']:>15.2f}{m['std_over_repeats']:>14.2f}"
                     f"{m['median_over_repeats']:>17.2f}")
    lines += ["", "Per fold (mean +- std over runs):",
              f"{'fold':<16}" + "".join(f"{key:>18}" for key in METRICS)]
    for fold in summary["folds"]:
        cells = [metrics[key]["per_fold"][fold] for key in METRICS]
        lines.append(f"{fold:<16}" + "".join(f"{c['mean']:>11.2f} +- {c['std']:<4.2f}"
                                             for c in cells))
    lines += ["", "Per-class recall (mean over runs whose test split has the class):"]
    lines += [f"  {name:<14}{value:>7.2f}" for name, value in summary["recall"].items()]
    lines += ["", "Confusion matrix summed over runs (rows: reference, columns: predicted):",
              " " * 14 + "".join(f"{name[:10]:>11}" for name in classes)]
    for name, row in zip(classes, summary["confusion"], strict=True):
        lines.append(f"  {name[:12]:<12}" + "".join(f"{count:>11d}" for count in row))
    lines += ["", "Runs:", f"{'fold':<16}{'run':>4}{'seed':>6}{'WA':>8}{'UA':>8}{'F1':>8}"
              f"{'valid_UA':>10}  {'tested':<7}checkpoint"]
    for row in summary["runs"]:
        valid = "-" if row["valid_UA"] is None else f"{row['valid_UA']:.2f}"
        lines.append(f"{row['fold']:<16}{row['repeat']:>4}{row['seed']:>6}{row['WA']:>8.2f}"
                     f"{row['UA']:>8.2f}{row['F1']:>8.2f}{valid:>10}  {row['tested']:<7}"
                     f"{row['checkpoint']}")
    exported = summary.get("exported_model")
    if exported:
        lines += ["", f"Exported model: {exported['path']}/ (fold {exported['fold']}, run "
                      f"{exported['repeat']}; {exported['selected_by']})"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the exported model


def select_export_run(runs: Sequence[Mapping[str, Any]]) -> tuple[Mapping[str, Any], str]:
    """The run to export, and why: the best validation UA, never the test score (see the module
    docstring); without validation, the first fold's first run."""
    validated = [r for r in runs if r["valid_UA"] is not None]
    if validated:
        best = max(validated, key=lambda r: r["valid_UA"])  # first of equals
        return best, f"best validation UA ({best['valid_UA']:.2f}) over {len(validated)} run(s)"
    return runs[0], "no Val split to select on: the first fold's first run"


def export_model(
    checkpoint: Path, classes: Sequence[str], directory: Path, source: Mapping[str, Any]
) -> Path:
    """Write a fine-tuning checkpoint as a self-contained model directory: ``backbone/``
    (``save_pretrained``), ``head.pt`` (the output layer) and ``model.json``. ``model.json`` is
    removed first and written last, so a directory with one is complete."""
    classifier = _classifier_from_checkpoint(checkpoint, len(classes))
    manifest = directory / MODEL_JSON
    manifest.unlink(missing_ok=True)
    save_backbone(classifier.backbone, directory / BACKBONE_SUBDIR)
    with atomic_path(directory / HEAD_FILE) as tmp:
        torch.save(classifier.output.state_dict(), tmp)
    atomic_write_json(manifest, {
        "format": MODEL_FORMAT,
        "classes": list(classes),
        "backbone": BACKBONE_SUBDIR,
        "head": HEAD_FILE,
        "sample_rate": SAMPLE_RATE,
        "eval_batch_size": eval_batch_size(classifier.backbone.config),
        "source": dict(source),
        "rebuild": "ser.stages.finetune.load_finetuned('<this directory>') -> (model, classes);"
                   " ser.stages.finetune.predict(model, wavs) -> (class indices, probabilities)",
    })
    return directory


def _classifier_from_checkpoint(checkpoint: Path, num_classes: int) -> UtteranceClassifier:
    # The backbone loads through the checkpoint convention (model.json beside it); the head is
    # the state dict's model.output.* entries.
    classifier = UtteranceClassifier(load_backbone(str(checkpoint)), num_classes,
                                     time_mask_prob=0.0, feature_mask_prob=0.0)
    state = safe_torch_load(checkpoint)["state_dict"]
    prefix = "model.output."
    head = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    classifier.output.load_state_dict(head)
    return classifier.eval()


def load_finetuned(directory: str | Path) -> tuple[UtteranceClassifier, list[str]]:
    """The exported classifier (eval mode) and its classes, from ``output_dir/model``."""
    root = Path(directory)
    manifest = root / MODEL_JSON
    if not manifest.is_file():
        raise SerInputError(
            f"{root} has no {MODEL_JSON}; pass the model directory fine-tuning exported "
            f"(<output_dir>/{MODEL_DIR})"
        )
    try:
        data = json.loads(manifest.read_text())
        classes = [str(c) for c in data["classes"]]
        backbone_dir, head_file = root / data["backbone"], root / data["head"]
    except (ValueError, KeyError, TypeError) as err:
        raise SerInputError(f"{manifest} is not a fine-tuned model description: {err}") from err
    classifier = UtteranceClassifier(load_backbone(str(backbone_dir)), len(classes),
                                     time_mask_prob=0.0, feature_mask_prob=0.0)
    try:
        classifier.output.load_state_dict(safe_torch_load(head_file))
    except RuntimeError as err:
        raise SerInputError(f"{head_file} does not fit {len(classes)} classes: {err}") from err
    return classifier.eval(), classes


def predict(
    model: UtteranceClassifier, wavs: Sequence[np.ndarray | torch.Tensor]
) -> tuple[list[int], np.ndarray]:
    """Class indices (``classes[i]`` names them) and probabilities ``[N, classes]`` of 16 kHz
    mono waveforms, each evaluated whole, batched only where padding cannot change the result."""
    tensors = [torch.as_tensor(np.asarray(w), dtype=torch.float32) for w in wavs]
    bad = [i for i, t in enumerate(tensors) if t.dim() != 1 or len(t) < MIN_SAMPLES]
    if bad:
        raise SerInputError(
            f"predict: waveforms {bad[:5]} are not 1-D or shorter than {MIN_SAMPLES} samples; "
            f"pass mono {SAMPLE_RATE} Hz audio of at least {1000 * MIN_SAMPLES // SAMPLE_RATE} ms"
        )
    num_classes = model.output.out_features
    probs = np.zeros((len(tensors), num_classes), dtype=np.float32)
    order = sorted(range(len(tensors)), key=lambda i: len(tensors[i]))  # little padding
    batch = eval_batch_size(model.backbone.config)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            padded = collate_audio([{"input_values": tensors[i], "name": str(i)} for i in chunk])
            logits = model(padded["input_values"].to(device), padded["attention_mask"].to(device))
            probs[chunk] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    model.train(was_training)
    return probs.argmax(axis=1).tolist(), probs
