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
      model/                          one run's fine-tuned model, for serving
                                      (``ser.models.finetuned``: export, load, predict)

A run whose ``results.json`` exists is skipped, so a re-run after a crash resumes: finished runs
are reused and the interrupted one continues from its ``last.ckpt``.

Which model is exported: picking the run with the best *test* UA would select on the test set.
The run with the best *validation* UA (at its tested checkpoint) is exported when the folds have
a Val split; without one there is nothing to select on, and the first fold's first run is.

Validation and test batch utterances, each getting exactly the logits it gets alone (see
``ser.models.finetuned``); the summary and its text are ``ser.report``'s.

The context's logger is asked once per run with ``"<fold>/run_<r>"``, its callbacks with the
run's index (folds x repeats, in order) and that name; they join the run's Trainer.

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

Options whose default is the original's behaviour, and what their other value changes:

- ``time_masking="batch"`` (default): time masks as the original drew them (transformers 4.10):
  one span count per batch from its PADDED frame count, starts over the padded row, then only
  the valid frames kept; about 7.7 % of valid frames masked on IEMOCAP-like lengths.
  ``"utterance"``: the count from each utterance's own length (at least 2 spans each) and the
  spans inside its valid frames, about 14 % of valid frames masked, 20 % of an average
  utterance's (``ser.models.masking``). Either way a batch shorter than a span is masked, not
  a crash (defect 5).
- Channel masks: every utterance gets at least one 64-channel span, as the original's
  ``min_masks=1`` (not an option).
- ``train_mask_embedding=False`` (default): the mask embedding is not given to Adam, as the
  original (which masked under ``no_grad``) never trained it; ``True`` trains it too.
- ``batching="random"`` (default): batches of ``batch_size`` drawn at random, the last partial
  batch dropped, as the original's ``shuffle=True, drop_last=True``; except that a Train split
  smaller than one batch keeps its single partial batch. ``"bucket"``: batches grouped by length
  (50 buckets, last partial batch kept), with less padding.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ser import artifacts, classification, distributed, report, training
from ser.atomic import atomic_write_json, atomic_write_text, replace_dir, restore_dir
from ser.classification import SplitEvaluation
from ser.config import SAMPLE_RATE, FinetuneConfig
from ser.data.datasets import UtteranceDataset, collate_utterances
from ser.data.labels import LabelFile
from ser.data.sampling import BucketBatchSampler, ResumableLoader
from ser.errors import SerInputError
from ser.models.backbones import load_backbone, set_gradient_checkpointing, write_model_json
from ser.models.finetuned import eval_batch_size, export_model
from ser.models.heads import UtteranceClassifier
from ser.plots import plot_confusion
from ser.stages.contract import NO_CONTEXT, Stage, StageContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    """Where fine-tuning wrote its outputs, and its headline numbers (percent)."""

    output_dir: Path
    summary_path: Path
    summary_text_path: Path
    confusion_path: Path
    model_dir: Path
    runs: list[dict[str, Any]]
    summary: dict[str, Any]  # as summary.json
    ua: float  # mean over every run of every fold
    wa: float
    f1: float


# --------------------------------------------------------------------------- building blocks


class FinetuneModule(SplitEvaluation):
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
        time_masking: str = "batch",
        train_mask_embedding: bool = False,
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
            "time_masking": str(time_masking),
            "train_mask_embedding": bool(train_mask_embedding),
        }, logger=False)
        self.classes = list(classes)
        self.lr = lr
        self.model = UtteranceClassifier(
            load_backbone(backbone),
            len(self.classes),
            time_mask_prob=mask_time_prob,
            feature_mask_prob=mask_feature_prob,
            time_masking=time_masking,
            train_mask_embedding=train_mask_embedding,
        )
        self.register_buffer(
            "class_weights", torch.tensor(class_weights, dtype=torch.float32), persistent=False
        )

    @property
    def eval_batch_size(self) -> int:
        """Utterances per validation, test and predict batch: any size gives the logits each
        utterance gets alone, since the classifier evaluates padding-free (eval mode)."""
        return eval_batch_size()

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

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        logits = self(batch["input_values"], batch["attention_mask"])
        return {"names": batch["names"], "probs": torch.softmax(logits.float(), dim=-1).cpu()}

    def batch_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self(batch["input_values"], batch["attention_mask"])


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
    sampler = train_batch_sampler(config, train.lengths, seed)
    return _Loaders(
        train=ResumableLoader(train, sampler, collate_fn=collate_utterances,
                              **training.loader_options(config)),
        val=eval_loader(config, fold.val, classes, eval_batch) if fold.val else None,
        test=eval_loader(config, fold.test, classes, eval_batch),
        train_dataset=train,
    )


def train_batch_sampler(
    config: FinetuneConfig, lengths: Sequence[int], seed: int
) -> BucketBatchSampler:
    """Training batches of ``config.batch_size`` (lengths in samples, capped at ``maxseqlen``).

    ``batching="random"``, the original's ``shuffle=True, drop_last=True``: one bucket, so each
    epoch is a seeded random permutation cut into batches, no length grouping; the last partial
    batch is dropped, except that a Train split smaller than one batch keeps its single partial
    batch (dropping it would leave nothing to train on). ``"bucket"``: grouped by length in 50
    buckets, the last partial batch kept.
    """
    max_len = int(config.maxseqlen * SAMPLE_RATE)
    if config.batching == "bucket":
        return BucketBatchSampler(lengths, batch_size=config.batch_size, max_len=max_len,
                                  seed=seed)
    return BucketBatchSampler(lengths, batch_size=config.batch_size, num_buckets=1,
                              drop_last=len(lengths) >= config.batch_size, max_len=max_len,
                              seed=seed)


def eval_loader(
    config: FinetuneConfig, items: Mapping[str, str], classes: Sequence[str], batch_size: int
) -> DataLoader:
    """Whole utterances sorted by length (little padding), ``batch_size`` at a time."""
    dataset = UtteranceDataset(config.datadir, items, classes, downmix=config.downmix)
    # A plain sampler, not a batch sampler: Trainer.predict rebuilds the batch sampler of its
    # loaders and can only do that for torch's own.
    # Under data parallelism each rank evaluates its own share, never a padded one (no
    # utterance twice); FinetuneModule gathers the shares before scoring.
    order = distributed.shard(np.argsort(dataset.lengths, kind="stable").tolist())
    # Its own generator: each iteration draws a base seed from it, and persistent workers make
    # a resumed run iterate once more than an uninterrupted one (see ser.resume).
    return DataLoader(dataset, batch_size=batch_size, sampler=order,
                      collate_fn=collate_utterances, generator=torch.Generator(),
                      **training.loader_options(config))


# --------------------------------------------------------------------------- validation


def backbone_source(config: FinetuneConfig, fold: LabelFile) -> str:
    """The backbone spec of ``fold``: the fold's own pretrained backbone when an earlier stage
    wrote one per fold (``pretrained_path/<fold>/`` or ``pretrained_path/<fold>/backbone/``),
    else ``pretrained_path``, else ``config.backbone``."""
    if not config.pretrained_path:
        return config.backbone
    path = Path(training.fold_input(config.pretrained_path, fold))
    if not path.exists():
        raise SerInputError(
            f"pretrained_path={config.pretrained_path!r} does not exist; pass a local backbone "
            "an earlier stage wrote (its output_dir, a backbone directory or a .ckpt), or "
            "leave it empty to start from --backbone"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        nested = path / artifacts.BACKBONE
        if (nested / "config.json").is_file():
            return str(nested)
        raise SerInputError(
            f"pretrained_path: {path} holds neither config.json nor {artifacts.BACKBONE}/"
            f"config.json (fold {fold.name}); pass the directory an earlier stage saved its "
            "backbone in"
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
    context: StageContext,
    index: int,
    earlier: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """Train and test one run (or read its results when it finished before); ``earlier``: the
    records of the runs before it, among which the exported model was chosen so far."""
    results_path = job.directory / artifacts.RESULTS_JSON
    if results_path.is_file():
        log.info("finetune %s: already finished (%s), skipping", job.name, results_path)
        training.drop_checkpoints(job.directory, config)  # left by a kill after the results
        return json.loads(results_path.read_text())
    training.seed_everything(job.seed)
    module = FinetuneModule(job.backbone, classes, job.weights, lr=config.lr,
                            mask_time_prob=config.mask_time_prob,
                            mask_feature_prob=config.mask_feature_prob,
                            time_masking=config.time_masking,
                            train_mask_embedding=config.train_mask_embedding)
    set_gradient_checkpointing(module.model.backbone, config.gradient_checkpointing)
    loaders = _loaders(config, job.fold, classes, job.seed, module.eval_batch_size)
    has_val = loaders.val is not None
    trainer = _fit(config, job, module, loaders, context, index)
    tested = training.best_checkpoint(trainer) if has_val else training.last_checkpoint(
        job.directory)
    if tested is None:
        raise RuntimeError(f"finetune {job.name}: training left no checkpoint in {job.directory}")
    trainer.test(module, dataloaders=loaders.test, ckpt_path=str(tested), verbose=False,
                 weights_only=True)
    result = {**classification.run_record(job, module, trainer, tested, output_dir),
              "backbone": job.backbone}

    def write() -> None:
        _keep_weights(config, job, tested, result, (classes, output_dir, earlier))
        atomic_write_json(results_path, result)  # the run is finished once this exists

    training.finish_fold(job.directory, config, write)
    log.info("finetune %s (seed %d): test UA %.2f WA %.2f F1 %.2f with the %s checkpoint; "
             "wrote %s", job.name, job.seed, result["scores"]["UA"], result["scores"]["WA"],
             result["scores"]["F1"], result["tested"], results_path)
    return result


def _fit(
    config: FinetuneConfig,
    job: _Run,
    module: FinetuneModule,
    loaders: _Loaders,
    context: StageContext,
    index: int,
) -> pl.Trainer:
    """Train (resuming from the run's last.ckpt); checkpoints by valid_UA when there is a Val."""
    has_val = loaders.val is not None
    trainer = training.build_trainer(
        config, job.directory, max_epochs=config.max_epochs,
        monitor="valid_UA" if has_val else None, mode="max",
        logger=context.logger(job.name),
        callbacks=[training.SetDatasetEpoch(), *context.callbacks(index, job.name)],
        enable_validation=has_val,
    )
    with warnings.catch_warnings():
        # Folds without Val (IEMOCAP's) are expected: no warning per run about it.
        warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no")
        training.fit(trainer, module, job.directory, train_dataloaders=loaders.train,
                     val_dataloaders=loaders.val)
    # Written after fit: ModelCheckpoint warns about a non-empty directory at the start.
    if distributed.is_zero():
        write_model_json(job.directory / artifacts.CHECKPOINTS, module.model.backbone.config)
    return trainer


# --------------------------------------------------------------------------- the stage


def run(config: FinetuneConfig, context: StageContext = NO_CONTEXT) -> FinetuneResult:
    """Fine-tune every fold ``num_exps`` times, test, summarise, and export one model."""
    config.check()
    folds = training.load_folds(config)
    classes = training.resolve_classes(config, folds)
    weights = classification.check_folds(folds, classes)
    sources = {fold.name: backbone_source(config, fold) for fold in folds}
    output_dir = training.stage_output_dir(config, SPEC.name)
    if distributed.is_zero():
        restore_dir(output_dir / artifacts.MODEL)  # a kill in the middle of its replacement
    classification.warn_on_changed_config(config, output_dir)
    training.save_config(config, output_dir, resolved_classes=classes)
    jobs = [
        _Run(fold, repeat, config.seed + repeat, sources[fold.name], weights[fold.name],
             output_dir / fold.name / f"run_{repeat}")
        for fold in folds
        for repeat in range(config.num_exps)
    ]
    runs: list[dict[str, Any]] = []
    for index, job in enumerate(jobs):
        runs.append(_train_and_test(config, job, classes, output_dir, context, index, runs))
    return _finish(runs, classes, output_dir)


def _keep_weights(
    config: FinetuneConfig, job: _Run, tested: Path, record: dict[str, Any],
    where: tuple[list[str], Path, Sequence[Mapping[str, Any]]],
) -> None:
    """Export the run's tested weights before its checkpoints go: as the stage's model while
    it is the one :func:`ser.classification.select_export_run` picks so far, and as
    ``run_<r>/model`` on request. So at most one set of fine-tuned weights is kept beyond the
    run in training."""
    classes, output_dir, earlier = where
    source = report.run_row(record)
    if config.keep_run_models:
        export_model(tested, classes, job.directory / artifacts.MODEL, source=source)
    chosen, reason = classification.select_export_run([*earlier, record])
    if chosen is record:
        replace_dir(output_dir / artifacts.MODEL, lambda folder: export_model(
            tested, classes, folder, source={**source, "selected_by": reason}))


def _finish(runs: list[dict[str, Any]], classes: list[str], output_dir: Path) -> FinetuneResult:
    summary = report.summarise_runs(runs, classes)
    chosen, reason = classification.select_export_run(runs)
    summary["exported_model"] = {"path": artifacts.MODEL, "fold": chosen["fold"],
                                 "repeat": chosen["repeat"], "selected_by": reason}
    model_dir = output_dir / artifacts.MODEL
    if distributed.is_zero():
        _write_report(summary, classes, output_dir)
    distributed.barrier()
    if not (model_dir / artifacts.MODEL_JSON).is_file():
        raise RuntimeError(
            f"finetune: {model_dir} holds no exported model; delete {output_dir} and run again"
        )
    metrics = summary["metrics"]
    summary_path, text_path, confusion_path = (
        output_dir / name
        for name in (artifacts.SUMMARY_JSON, artifacts.SUMMARY_TXT, artifacts.CONFUSION_PNG)
    )
    log.info("finetune: %d run(s) over %d fold(s): UA %.2f, WA %.2f, F1 %.2f (mean); wrote "
             "%s, %s, %s and the model in %s", len(runs), len(summary["folds"]),
             metrics["UA"]["mean"], metrics["WA"]["mean"], metrics["F1"]["mean"], summary_path,
             text_path, confusion_path, model_dir)
    return FinetuneResult(
        output_dir=output_dir, summary_path=summary_path, summary_text_path=text_path,
        confusion_path=confusion_path, model_dir=model_dir, runs=runs, summary=summary,
        ua=metrics["UA"]["mean"], wa=metrics["WA"]["mean"], f1=metrics["F1"]["mean"],
    )





def _write_report(summary: dict[str, Any], classes: list[str], output_dir: Path) -> None:
    atomic_write_json(output_dir / artifacts.SUMMARY_JSON, summary)
    atomic_write_text(output_dir / artifacts.SUMMARY_TXT, report.format_summary(summary))
    plot_confusion(
        summary["confusion"], classes, output_dir / artifacts.CONFUSION_PNG,
        title=f"Confusion matrix, {summary['num_runs']} run(s) summed",
    )


SPEC = Stage(
    name="finetune", config_cls=FinetuneConfig, run=run, inputs=("backbone", "pretrained_path"),
)
