"""P-TAPT phase 2: train the backbone to predict the k-means cluster of every masked frame.

Per fold, the pretrained backbone (``backbone``, of any family ``ser.models.backbones`` loads:
wav2vec 2.0, HuBERT, WavLM, data2vec-audio; not the phase-1 model) gets one
``LinearHead`` per cluster count (``ser.models.heads.FrameClusterHeads``). Its convolutional
encoder and feature projection stay frozen; time masks (``mask_time_prob``, span 15, at least 2,
valid frames only) replace frames by the mask embedding, and the loss is the sum over heads of
the cross-entropy on masked frames. Data: the fold's Train audio, cropped at random up to
``maxseqlen`` with its labels cropped at the same frame, in dynamic length-bucketed batches.

Input ``clusterpath``: the clustering stage's output, either a merged label file
``{"<file>.wav": [[labels for k1], [labels for k2], ...]}`` or a folder with one subfolder per
fold holding ``clusters.json`` (``ser.training.fold_input`` picks the fold's). The cluster
counts, in head order, come from ``num_clusters`` in ``cluster_stats.json`` beside the label
file; without that file, from the largest label of each head plus one (``ser.artifacts``).

Output per fold: ``<fold>/backbone/``, the backbone's base model (``save_pretrained``) that
fine-tuning loads with ``ser.models.backbones.load_backbone``; ``<fold>/checkpoints/last.ckpt``
is the resume point. The heads are not kept: they only serve this stage.

Departures from the original
----------------------------
- Every Train file of a fold must have cluster labels (the original silently trained on the
  files that had some); labels of other files are ignored.
- Training crops start on a 20 ms frame boundary so that labels and audio frames line up
  exactly (``ser.data.datasets.FrameLabelDataset``).
- Dynamic batches keep the last, partly filled batch of each epoch (the original dropped it).

Option whose default is the original's behaviour: ``train_mask_embedding=False`` (default), the
mask embedding that replaces masked frames is not given to Adam, as the original (which masked
under ``no_grad`` and optimised the transformer encoder only) never trained it; ``True`` trains
it with the encoder and heads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import Logger

from ser import artifacts, training
from ser.artifacts import CLUSTER_STATS_JSON as STATS_JSON
from ser.artifacts import CLUSTERS_JSON
from ser.config import SAMPLE_RATE, Phase2Config
from ser.data.datasets import FrameLabelDataset, collate_frame_labels
from ser.data.labels import LabelFile
from ser.errors import SerInputError
from ser.models.backbones import load_backbone, save_backbone, set_gradient_checkpointing
from ser.models.heads import FrameClusterHeads
from ser.schedule import warmup_flat_decay
from ser.stages.contract import NO_CONTEXT, Stage, StageContext

log = logging.getLogger(__name__)

MASK_SPAN = 15
MIN_MASKS = 2
_SHOW = 5  # offending entries an error message lists

FrameLabels = dict[str, list[list[int]]]


@dataclass
class Phase2Result:
    """Where phase 2 wrote each fold's backbone, the cluster counts, and the last loss of the
    folds trained in this call."""

    output_dir: Path
    backbones: dict[str, Path] = field(default_factory=dict)
    num_clusters: dict[str, list[int]] = field(default_factory=dict)
    final_loss: dict[str, float] = field(default_factory=dict)


@dataclass
class ClusterLabels:
    """One fold's cluster labels: the file they came from, k per head, labels per file."""

    path: Path
    num_clusters: list[int]
    labels: FrameLabels


def cluster_file(clusterpath: str, fold: LabelFile) -> Path:
    """The merged cluster-label file for ``fold``: ``clusterpath`` itself, or
    ``clusterpath[/<fold>][/clusters]/clusters.json`` when it is a folder (the clustering
    stage's output directory, or its ``runs:/<id>/clusters`` artifact)."""
    path = Path(training.fold_input(clusterpath, fold))
    if not path.is_dir():
        return path
    nested = path / artifacts.CLUSTERS / CLUSTERS_JSON
    return nested if nested.is_file() else path / CLUSTERS_JSON


def read_cluster_labels(
    path: Path, train: Mapping[str, str], num_clusters: Sequence[int] | None = None
) -> ClusterLabels:
    """Read and validate a merged cluster-label file for the Train files ``train``.

    Returns the labels of the Train files only; raises :class:`SerInputError` naming the file
    when it is missing, not JSON of the expected shape, or lacks labels for a Train file.
    ``num_clusters``: the counts an earlier read found (else from :data:`STATS_JSON` or the
    labels).
    """
    if not path.is_file():
        raise SerInputError(
            f"cluster labels {path} do not exist; pass as clusterpath the clustering stage's "
            f"output directory (with <fold>/clusters/{CLUSTERS_JSON}) or one merged label file"
        )
    raw = _load_json(path)
    if not isinstance(raw, dict) or not raw:
        raise SerInputError(
            f"{path} must be a non-empty JSON object {{\"<file>.wav\": [[labels for k1], ...]}}"
        )
    missing = [name for name in train if name not in raw]
    if missing:
        raise SerInputError(
            f"{path} has no cluster labels for {len(missing)} of the {len(train)} Train files "
            f"of this fold, e.g. {missing[:_SHOW]}; run the clustering stage on this fold's "
            "label file (it labels every Train file)"
        )
    labels = {name: raw[name] for name in train}
    heads = _check_shape(path, labels)
    counts = list(num_clusters) if num_clusters else _num_clusters(path, labels, heads)
    _check_range(path, labels, counts)
    return ClusterLabels(path=path, num_clusters=counts, labels=labels)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SerInputError(f"{path} is not readable JSON ({err}); re-run clustering") from err


def _is_int(value: Any) -> bool:
    # JSON integers load as int; bool is an int subclass but no label.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_shape(path: Path, labels: Mapping[str, Any]) -> int:
    """Every file: a non-empty list of equally long integer lists, as many as every other file."""
    bad = [
        name for name, sets in labels.items()
        if not isinstance(sets, list) or not sets
        or not all(isinstance(seq, list) and all(_is_int(x) for x in seq) for seq in sets)
        or len({len(seq) for seq in sets}) != 1
    ]
    if bad:
        raise SerInputError(
            f"{path}: the labels of {len(bad)} files are not lists of equally long integer "
            f"lists, one per cluster count, e.g. {bad[:_SHOW]}"
        )
    counts = sorted({len(sets) for sets in labels.values()})
    if len(counts) > 1:
        raise SerInputError(
            f"{path}: files have different numbers of label lists ({counts}); every file needs "
            "one list per cluster count"
        )
    return counts[0]


def _num_clusters(path: Path, labels: Mapping[str, list[list[int]]], heads: int) -> list[int]:
    stats = path.parent / STATS_JSON
    if stats.is_file():
        data = _load_json(stats)
        declared = data.get("num_clusters") if isinstance(data, dict) else None
        if (not isinstance(declared, list) or len(declared) != heads
                or not all(_is_int(k) and k >= 2 for k in declared)):
            raise SerInputError(
                f"{stats}: num_clusters must list {heads} cluster counts >= 2 (one per label "
                f"list in {path.name}), got {declared!r}"
            )
        return [int(k) for k in declared]
    inferred = [
        1 + max((max(sets[h], default=-1) for sets in labels.values()), default=-1)
        for h in range(heads)
    ]
    log.info("%s has no %s beside it: cluster counts %s inferred from the labels",
             path, STATS_JSON, inferred)
    if min(inferred) < 2:
        raise SerInputError(
            f"{path}: a label list uses fewer than 2 clusters (counts {inferred}); phase 2 "
            "needs at least 2 per head"
        )
    return inferred


def _check_range(path: Path, labels: Mapping[str, list[list[int]]], ks: Sequence[int]) -> None:
    bad = [
        name for name, sets in labels.items()
        if any(seq and (min(seq) < 0 or max(seq) >= k) for seq, k in zip(sets, ks, strict=True))
    ]
    if bad:
        raise SerInputError(
            f"{path}: labels outside [0, k) for the cluster counts {list(ks)} in {len(bad)} "
            f"files, e.g. {bad[:_SHOW]}; the label file and {STATS_JSON} do not match"
        )


class Phase2Module(pl.LightningModule):
    """``FrameClusterHeads`` at ``model`` (backbone under ``model.backbone.``), trained on the
    masked frames' cluster labels."""

    def __init__(
        self,
        model: FrameClusterHeads,
        *,
        lr: float,
        warmup_step: int,
        training_step: int,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.model(batch["input_values"], batch["attention_mask"], batch["frame_labels"])
        size = len(batch["input_values"])
        self.log("loss", out["loss"].detach(), prog_bar=True, batch_size=size)
        for k, loss, accuracy in zip(
            self.model.cluster_counts, out["losses"], out["accuracies"], strict=True
        ):
            self.log(f"loss_k{k}", loss, batch_size=size)
            self.log(f"accuracy_k{k}", accuracy, batch_size=size)
        self.log("masked_frames", out["masked_frames"].float(), batch_size=size)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=size)
        return out["loss"]

    def configure_optimizers(self) -> dict[str, Any]:
        # Only the trainable parts: the frozen feature encoder stays out (RECIPE defect 1).
        optimizer = torch.optim.Adam(self.model.trainable_parameters(), lr=self.hparams.lr)
        scheduler = warmup_flat_decay(
            optimizer, self.hparams.warmup_step, self.hparams.training_step
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "step"}}


def run(config: Phase2Config, context: StageContext = NO_CONTEXT) -> Phase2Result:
    """Phase 2 on every fold (module docstring); a fold whose backbone exists is skipped."""
    config.check()
    folds = training.load_folds(config)
    training.require_train_audio(folds)
    # Every fold's labels are checked before the first fold trains; each is re-read when its
    # fold trains rather than all held in memory at once.
    files = {fold.name: cluster_file(config.clusterpath, fold) for fold in folds}
    counts = {fold.name: read_cluster_labels(files[fold.name], fold.train).num_clusters
              for fold in folds}
    load_backbone(config.backbone)  # a bad backbone spec fails here, before any output
    output_dir = training.stage_output_dir(config, SPEC.name)
    training.save_config(config, output_dir)
    result = Phase2Result(output_dir=output_dir, num_clusters=counts)
    for index, fold in enumerate(folds):
        hooks = (context.logger(fold.name), context.callbacks(index, fold.name))
        clusters = (files[fold.name], counts[fold.name])
        path, loss = _run_fold(config, fold, clusters, output_dir / fold.name, hooks)
        result.backbones[fold.name] = path
        if loss is not None:
            result.final_loss[fold.name] = loss
    log.info(
        "P-TAPT phase 2: %d fold(s) (%d trained now), backbones in %s/<fold>/%s",
        len(folds), len(result.final_loss), output_dir, artifacts.BACKBONE,
    )
    return result


def _run_fold(
    config: Phase2Config, fold: LabelFile, cluster_input: tuple[Path, list[int]],
    fold_dir: Path, hooks: tuple[Logger | bool, list[Callback]],
) -> tuple[Path, float | None]:
    target = fold_dir / artifacts.BACKBONE
    logger, callbacks = hooks
    if (target / "config.json").is_file():
        log.info("phase 2 fold %s: already done, its backbone is in %s; skipping",
                 fold.name, target)
        training.drop_checkpoints(fold_dir, config)  # left by a kill after the backbone
        return target, None
    labels_path, num_clusters = cluster_input
    clusters = read_cluster_labels(labels_path, fold.train, num_clusters)
    training.seed_everything(config.seed)
    dataset = FrameLabelDataset(
        config.datadir,
        clusters.labels,
        max_samples=int(config.maxseqlen * SAMPLE_RATE),
        train=True,
        seed=config.seed,
        downmix=config.downmix,
    )
    loader = training.dynamic_batch_loader(dataset, dataset.lengths, config, collate_frame_labels)
    heads = FrameClusterHeads(
        load_backbone(config.backbone),
        clusters.num_clusters,
        time_mask_prob=config.mask_time_prob,
        time_mask_span=MASK_SPAN,
        time_min_masks=MIN_MASKS,
        train_mask_embedding=config.train_mask_embedding,
    )
    set_gradient_checkpointing(heads.backbone, config.gradient_checkpointing)
    module = Phase2Module(
        heads, lr=config.lr, warmup_step=config.warmup_step, training_step=config.training_step
    )
    trainer = training.build_trainer(
        config,
        fold_dir,
        max_steps=config.training_step,
        every_n_train_steps=config.checkpoint_every,
        logger=logger,
        callbacks=[training.SetDatasetEpoch(), training.WriteModelJson(heads.backbone.config),
                   *callbacks],
        enable_validation=False,
    )
    training.fit(trainer, module, fold_dir, train_dataloaders=loader)
    training.finish_fold(fold_dir, config, lambda: save_backbone(heads.backbone, target))
    loss = trainer.callback_metrics.get("loss")
    final = float(loss) if loss is not None else float("nan")
    log.info(
        "phase 2 fold %s: %d steps on %d Train files, heads for k=%s (last loss %.4f); "
        "backbone written to %s",
        fold.name, trainer.global_step, len(dataset), clusters.num_clusters, final, target,
    )
    return target, final


SPEC = Stage(
    name="pretrain_w2v2", config_cls=Phase2Config, run=run, inputs=("backbone", "clusterpath"),
    outputs=(artifacts.BACKBONE,),
)
