"""What every stage shares: folds, seeds, the Trainer, checkpoints, loaders and callbacks.

Lightning does the work (loops, mixed precision, accumulation, clipping, checkpointing,
resuming); this module turns a :class:`~ser.config.TrainingConfig` into a Trainer the same way
for every stage, and holds the few pieces of data plumbing that Lightning leaves to us.

Output layout of a stage run (``output_dir`` defaults to ``outputs/<stage>``)::

    output_dir/
      config.json              the resolved config of the run
      <fold>/                  one folder per fold file (its name without .json)
        checkpoints/           Lightning checkpoints: best save_top_k and last.ckpt
        ...                    the stage's outputs for that fold (ser.artifacts)

An input that an earlier stage produced per fold (``pretrained_path``, ``clusterpath``) may be
given as that stage's ``output_dir``-like folder: :func:`fold_input` then picks the fold's own
subfolder, so fold *i* of fine-tuning uses the backbone pretrained on fold *i*'s Train split.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch.utils.data import Dataset
from transformers import PretrainedConfig

from ser import artifacts, cores, distributed
from ser.atomic import atomic_write_json
from ser.audio import check_audio_files
from ser.checkpoint_io import CheckpointIO, resume_point
from ser.config import PRECISIONS, SAMPLE_RATE, TrainingConfig
from ser.data.labels import LabelFile, read_label_dir, read_label_file
from ser.data.sampling import BucketBatchSampler, ResumableLoader
from ser.errors import SerInputError, TrainingDiverged
from ser.models.backbones import write_model_json
from ser.progress import TrainingProgress, progress_label
from ser.resume import RandomState

log = logging.getLogger(__name__)

NUM_BUCKETS = 50
POINTS_PER_CURVE = 500
# Dynamic batches hold this many seconds of (padded) audio per 64 utterances of batch_size.
SECONDS_PER_64 = 250


# --------------------------------------------------------------------------- folds and seeds

def load_folds(config: Any, classes: Iterable[str] | None = None) -> list[LabelFile]:
    """The fold files of ``config.labelpath`` (one) or ``config.labeldir`` (all), validated.

    Every audio file that any fold names is checked here (header only), so a bad file stops the
    run before any training starts.
    """
    audio_dir = Path(config.datadir)
    if not audio_dir.is_dir():
        raise SerInputError(
            f"datadir {audio_dir} is not a directory; pass the folder the label files' audio "
            "paths are relative to, made by `mlflow run . -e demo_corpus` (data/demo/Audio_16k) "
            "or `-e prepare_iemocap`"
        )
    wanted = list(classes) if classes else None
    if config.labelpath:
        folds = [read_label_file(config.labelpath, audio_dir, wanted)]
    else:
        folds = read_label_dir(config.labeldir, audio_dir, wanted)
    names = sorted({name for fold in folds for name in fold.files()})
    check_audio_files([audio_dir / name for name in names], downmix=config.downmix)
    return folds


def resolve_classes(config: Any, folds: list[LabelFile]) -> list[str]:
    """``config.classes`` (comma-separated) or the sorted labels of every fold."""
    if getattr(config, "classes", ""):
        classes = [c.strip() for c in config.classes.split(",") if c.strip()]
        if len(set(classes)) < 2:
            raise SerInputError(f"classes={config.classes!r}: give at least two distinct classes")
        for fold in folds:  # validates labels against the declared set
            read_label_file(fold.path, classes=classes)
        return classes
    classes = sorted({label for fold in folds for label in fold.classes()})
    if len(classes) < 2:
        raise SerInputError(f"the label files hold only the class(es) {classes}; need two or more")
    return classes


def fold_input(path: str, fold: LabelFile) -> str:
    """``path/<fold>`` when an earlier stage wrote one folder per fold there, else ``path``."""
    candidate = Path(path) / fold.name
    return str(candidate) if path and candidate.is_dir() else path


def save_config(config: Any, output_dir: Path, **extra: Any) -> Path:
    """Write the resolved config beside the outputs, so a run explains itself (rank 0)."""
    target = output_dir / artifacts.CONFIG_JSON
    if distributed.is_zero():
        atomic_write_json(target, {**dataclasses.asdict(config), **extra})
    return target


def finish_fold(fold_dir: Path, config: Any, write: Callable[[], object]) -> None:
    """A fold's (or run's) outputs written once, by rank 0, then its resume points removed; the
    other ranks wait for both, so no rank reads a half-written output."""
    if distributed.is_zero():
        write()
        drop_checkpoints(fold_dir, config)
    distributed.barrier()


def class_weights(labels: Sequence[str], classes: Sequence[str], where: str) -> list[float]:
    """Inverse class frequency ``N / n_c``, normalised to sum to 1 (RECIPE "Fine-tuning").

    A class without an utterance in ``labels`` is refused: its weight would be infinite.
    """
    counts = np.array([sum(1 for label in labels if label == c) for c in classes], dtype=float)
    missing = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if missing:
        raise SerInputError(
            f"{where} has no utterance of class(es) {missing}, so its class weights (inverse "
            "frequency) are undefined; add some, or pass --classes without them"
        )
    weights = len(labels) / counts
    return (weights / weights.sum()).tolist()


def require_train_audio(folds: Sequence[LabelFile]) -> None:
    empty = [fold.path.name for fold in folds if not fold.train]
    if empty:
        raise SerInputError(
            f"the fold files {empty} have an empty Train split; pretraining uses Train audio "
            "only, so give every fold some Train files"
        )


# --------------------------------------------------------------------------- the Trainer

def seed_everything(seed: int) -> None:
    pl.seed_everything(seed, workers=True, verbose=False)


def resolve_precision(precision: str, cuda: bool | None = None) -> str:
    """The Lightning precision to use here; GPU precisions fall back to 32 on a CPU-only machine."""
    if precision not in PRECISIONS:
        raise SerInputError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    has_cuda = torch.cuda.is_available() if cuda is None else cuda
    if precision != "32" and not has_cuda:
        warnings.warn(
            f"precision={precision} needs a GPU and none is visible; training in 32-bit instead. "
            "Pass --precision 32 to silence this.",
            stacklevel=2,
        )
        return "32"
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        warnings.warn(
            "this GPU has no bf16; training with 16-mixed (fp16 with loss scaling) instead.",
            stacklevel=2,
        )
        return "16-mixed"
    return precision


def stage_output_dir(config: TrainingConfig | Any, stage: str) -> Path:
    return Path(config.output_dir or f"outputs/{stage}")


def last_checkpoint(output_dir: Path) -> Path | None:
    """The intact checkpoint to go on from in ``output_dir``: ``last.ckpt``, else the newest
    other one (:func:`ser.checkpoint_io.resume_point`). Called by every rank: rank 0 alone
    looks, since it may set damaged files aside, and tells the others."""
    chosen = resume_point(output_dir / artifacts.CHECKPOINTS) if distributed.is_zero() else None
    return distributed.broadcast(chosen)


class _Checkpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` follows every validation, not only a new best.

    Lightning refreshes ``last.ckpt`` only when it writes a top-k file, so with a monitored
    metric a resumed run would restart from the last *best* validation instead of the last one.
    """

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Once-per-epoch validation saves here, not at validation end.
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        if self.monitor is not None and not self._should_skip_saving_checkpoint(trainer):
            # (the skip check is true right after a save at this step)
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def build_trainer(
    config: TrainingConfig,
    output_dir: Path,
    *,
    max_steps: int = -1,
    max_epochs: int | None = None,
    monitor: str | None = None,
    mode: str = "max",
    every_n_train_steps: int | None = None,
    logger: Any = False,
    callbacks: Sequence[Callback] = (),
    enable_validation: bool = True,
    val_check_interval: int | None = None,
) -> pl.Trainer:
    """A Trainer that checkpoints into ``output_dir/checkpoints`` (best ``save_top_k`` and last).

    ``val_check_interval``: validate every that many training batches, counted across epochs
    (step-based stages); None: once per epoch. Pair it with ``every_n_train_steps=None`` and a
    ``monitor``, so checkpoints are written after each validation, with its fresh metric.
    """
    checkpoint = _Checkpoint(
        dirpath=output_dir / artifacts.CHECKPOINTS,
        filename="{epoch}-{step}",
        monitor=monitor,
        mode=mode,
        # Step-based stages without a monitor keep only last.ckpt: a "latest" file beside it
        # would double the disk a 20,000-step run rewrites at every checkpoint. Epoch-based ones
        # (fine-tuning without Val) need one: Lightning writes last.ckpt at an epoch's end only
        # when it saved another checkpoint there.
        save_top_k=config.save_top_k if monitor else (0 if every_n_train_steps else 1),
        save_last=True,
        every_n_train_steps=every_n_train_steps,
    )
    here = distributed.world()
    _check_processes(config, here)
    return pl.Trainer(
        accelerator=config.accelerator,
        # Every rank was started by a launcher (torchrun, srun) and joined the group already
        # (ser.distributed); Lightning takes it as it is.
        devices=here.local_size if here.size > 1 else 1,
        num_nodes=here.nodes,
        strategy="ddp" if here.size > 1 else "auto",
        precision=resolve_precision(config.precision),
        max_steps=max_steps,
        max_epochs=max_epochs,
        accumulate_grad_batches=config.accumulate_grad_batches,
        gradient_clip_val=config.gradient_clip_val or None,
        callbacks=[checkpoint, RandomState(), NonFiniteGuard(), *callbacks,
                   TrainingProgress(progress_label(output_dir))],
        logger=logger,
        default_root_dir=output_dir,
        limit_val_batches=None if enable_validation else 0,
        val_check_interval=val_check_interval,
        check_val_every_n_epoch=None if val_check_interval else 1,
        num_sanity_val_steps=0,
        # Our BucketBatchSampler shards batches across ranks itself (equal counts per rank).
        use_distributed_sampler=False,
        # At most ~500 points per curve: a 20,000-step run logging every step writes 20,000
        # rows per metric to the tracking store, and a plot of them shows no more.
        log_every_n_steps=max(1, max_steps // POINTS_PER_CURVE),
        deterministic=False,
        enable_model_summary=False,
        # Each checkpoint written beside its target and renamed into place (ser.checkpoint_io).
        plugins=[CheckpointIO()],
    )


def fit(trainer: pl.Trainer, module: pl.LightningModule, output_dir: Path, **loaders: Any) -> None:
    """``trainer.fit``, resuming from ``last.ckpt`` when an earlier run left one."""
    resume = last_checkpoint(output_dir)
    if resume is not None:
        log.info("resuming from %s", resume)
    with warnings.catch_warnings():
        # Evaluation metrics are computed over every rank's share already (ser.distributed);
        # a training loss is the logging rank's: no cross-rank reduction is wanted.
        warnings.filterwarnings("ignore", message="It is recommended to use `self.log")
        trainer.fit(module, ckpt_path=resume, **loaders)


def drop_checkpoints(directory: Path, config: TrainingConfig | Any) -> None:
    """Remove ``directory/checkpoints`` once its fold or run has written its outputs: resume
    points matter only while a run is unfinished (``keep_checkpoints`` keeps them)."""
    target = directory / artifacts.CHECKPOINTS
    if target.is_dir() and not config.keep_checkpoints and distributed.is_zero():
        shutil.rmtree(target)
        log.debug("removed %s: the run is finished", target)


def best_checkpoint(trainer: pl.Trainer) -> Path | None:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback else ""
    return Path(path) if path else None


def _check_processes(config: Any, here: distributed.World) -> None:
    wanted = distributed.requested_processes(config.accelerator, config.devices) * here.nodes
    if wanted != here.size:
        raise SerInputError(
            f"devices={config.devices!r} asks for {wanted} process(es) and {here.size} are "
            "running: start data-parallel runs with an entry point (it starts torchrun for "
            "devices > 1), torchrun or srun, with one process per device"
        )


# --------------------------------------------------------------------------- data and callbacks

def loader_options(config: Any) -> dict[str, Any]:
    """``DataLoader`` arguments for ``config.num_workers`` (-1: ``ser.cores.loader_workers``
    chooses). Workers persist across epochs, so they start once per loader."""
    workers = cores.loader_workers(config.num_workers, distributed.world().local_size)
    return {"num_workers": workers, "persistent_workers": workers > 0}


def dynamic_batch_loader(
    dataset: Dataset, lengths: Sequence[int], config: TrainingConfig | Any,
    collate_fn: Callable[[Sequence[dict[str, Any]]], dict[str, Any]],
) -> ResumableLoader:
    """Length-bucketed dynamic batches of RECIPE's 250 s of audio per 64 utterances of
    ``config.batch_size``, 50 buckets, lengths capped at ``maxseqlen``, closed by
    ``config.dynamic_batch_rule`` (``"sum"``: the original's; see ``ser.data.sampling``);
    resumable mid-epoch."""
    sampler = BucketBatchSampler(
        lengths,
        max_batch_samples=int(SECONDS_PER_64 * SAMPLE_RATE * config.batch_size / 64),
        num_buckets=NUM_BUCKETS,
        max_len=int(config.maxseqlen * SAMPLE_RATE),
        dynamic_batch_rule=config.dynamic_batch_rule,
        shuffle=True,
        seed=config.seed,
    )
    return ResumableLoader(dataset, sampler, collate_fn=collate_fn, **loader_options(config))


class SetDatasetEpoch(Callback):
    """Lightning sets the sampler's epoch but not the dataset's, whose random crops depend on it:
    without this every epoch would repeat its crops. (Needed for a plain ``DataLoader`` without
    workers; a ``ResumableLoader`` gives the epoch with every index.)"""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run resumed mid-epoch continues it without on_train_epoch_start.
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(trainer.current_epoch)


class WriteModelJson(Callback):
    """Writes ``model.json`` beside the checkpoints, so that a ``.ckpt`` is a backbone spec.

    At train start rather than before ``fit``: Lightning warns when the checkpoint directory
    already holds files at setup, which on a fresh run would wrongly suggest a stale one.
    """

    def __init__(self, config: PretrainedConfig) -> None:
        self.config = config

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        if callback is not None and callback.dirpath and trainer.is_global_zero:
            write_model_json(callback.dirpath, self.config)


class NonFiniteGuard(Callback):
    """Stops a run whose loss or weights stop being finite, before it writes them anywhere.

    A NaN weight never recovers, and a model made of them would otherwise be tested, exported,
    marked complete and reused. Checked: the loss of every step (a stage may skip a step with a
    non-finite loss, and 16-mixed's scaler does: only :data:`PATIENCE` in a row stop the run),
    and every weight before each checkpoint is written and when training ends.
    """

    PATIENCE = 10

    def __init__(self) -> None:
        self.in_a_row = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        finite = loss is None or bool(torch.isfinite(loss.detach()).all())
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if self.in_a_row >= self.PATIENCE:
            self._stop(trainer, f"the loss has not been finite for {self.in_a_row} steps in a row")

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._check_weights(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_weights(trainer, pl_module)

    def _check_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bad = [name for name, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            self._stop(trainer, f"{len(bad)} weight tensor(s) are no longer finite ({bad[0]}, ...)")

    @staticmethod
    def _stop(trainer: pl.Trainer, what: str) -> None:
        where = Path(trainer.default_root_dir)
        raise TrainingDiverged(
            f"training in {where} stopped at step {trainer.global_step}: {what}. Nothing of it "
            "is marked complete or exported. Lower lr, keep gradient_clip_val > 0, train in "
            "32-bit, or check the audio"
        )


def skip_non_finite_step(
    module: pl.LightningModule, optimizer: torch.optim.Optimizer, loss_not_finite: bool
) -> None:
    """Skip this optimizer step when its loss or gradients are not finite: drop the gradients,
    so Adam leaves the weights and its moments untouched (a zero gradient would still move them).

    Under ``16-mixed`` the gradient scaler already skips such steps and lowers its scale (its
    first steps routinely overflow), so nothing is done there.
    """
    if getattr(module.trainer.precision_plugin, "scaler", None) is not None:
        return
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None]
    # One device sync for all gradients, not one per tensor.
    grads_finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    if grads_finite and not loss_not_finite:
        return
    what = "loss" if loss_not_finite else "gradients"
    log.warning(
        "step %d: the %s are not finite; skipping this optimizer step. If this recurs, lower "
        "lr, keep gradient_clip_val > 0, or train in 32-bit or bf16-mixed precision",
        module.global_step, what,
    )
    module.skipped_steps = getattr(module, "skipped_steps", 0) + 1
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None
