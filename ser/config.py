"""Typed configuration: one dataclass per job, the only source of defaults.

The command line (``ser.cli``), the MLproject file and the Optuna search space all read their
defaults from these classes, so a default changed here changes everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, get_type_hints

SAMPLE_RATE = 16_000
EMOTIONS_4 = ("anger", "happy", "neutral", "sad")
# Field metadata for values the user must give: the CLI and MLproject make them required.
REQUIRED = {"required": True}


@dataclass
class DemoCorpusConfig:
    """The built-in synthetic emotional speech corpus (``ser.data.synthetic``)."""

    output_dir: str = "data/demo"
    num_speakers: int = 4
    utterances_per_class: int = 12  # per speaker and class
    min_seconds: float = 1.5
    max_seconds: float = 4.0
    seed: int = 0
    # Also write the same corpus in the IEMOCAP_full_release layout here (for testing the
    # IEMOCAP preparation end to end); empty: do not.
    iemocap_layout_dir: str = ""


@dataclass
class PrepareIemocapConfig:
    """IEMOCAP release -> 16 kHz wavs and session-wise label files (``ser.data.iemocap``)."""

    iemocap_dir: str = field(default="", metadata=REQUIRED)
    output_dir: str = field(default="", metadata=REQUIRED)


@dataclass
class TrainingConfig:
    """What every training stage shares: data, hardware, precision, checkpoints, seeds."""

    datadir: str = "data/demo/Audio_16k"  # the audio directory label paths are relative to
    labeldir: str = "data/demo/labels"  # a folder of fold files
    labelpath: str = ""  # one fold file; when given, used instead of labeldir
    output_dir: str = ""  # empty: outputs/<stage>
    seed: int = 0
    precision: str = "32"  # 32, 16-mixed or bf16-mixed (GPU precisions fall back to 32 on CPU)
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 0.0  # 0: no clipping, as in the original
    save_top_k: int = 1
    num_workers: int = 0
    accelerator: str = "auto"
    devices: str = "auto"
    downmix: bool = False  # average multi-channel audio instead of refusing it
    maxseqlen: float = 10.0  # seconds; longer training audio is cropped at random


@dataclass
class FinetuneConfig(TrainingConfig):
    """Fine-tuning on emotion labels: V-FT, and the last stage of TAPT and P-TAPT."""

    backbone: str = "tiny"  # preset, HF directory or hub name, fairseq .pt, or our checkpoint
    pretrained_path: str = ""  # an earlier stage's backbone (path or runs:/ URI): wins over it
    classes: str = ""  # comma-separated; empty: the sorted labels of every fold file
    lr: float = 1e-3  # the paper: 1e-4 (pretrained base); the tiny demo model needs more
    batch_size: int = 16  # the paper: 64; smaller gives the 96-file demo folds more steps
    max_epochs: int = 15
    num_exps: int = 1  # repeats per fold, differing by seed
    mask_time_prob: float = 0.08
    mask_feature_prob: float = 0.05


@dataclass
class TaptConfig(TrainingConfig):
    """TAPT: continued wav2vec 2.0 pretraining (contrastive + diversity loss) on Train audio."""

    backbone: str = "tiny"
    lr: float = 1e-4
    batch_size: int = 16  # sets the dynamic batch: 250 s of audio per 64; the paper: 64
    training_step: int = 200  # the paper: 20000 (IEMOCAP)
    warmup_step: int = 20  # the paper: 100
    gradient_clip_val: float = 1.0  # departs from the original: keeps mixed precision NaN-free
    checkpoint_every: int = 100  # steps between last.ckpt saves (resume points)


@dataclass
class Phase1Config(TrainingConfig):
    """P-TAPT phase 1: the wav2vec 1.0 emotion model trained on utterance labels."""

    w2v1: str = "tiny"  # preset, fairseq wav2vec_large.pt, or our saved directory
    classes: str = ""
    lr: float = 1e-4
    batch_size: int = 64
    training_step: int = 200  # the paper: 10000
    warmup_fraction: float = 0.05
    valid_fraction: float = 0.1  # of Train, held out at random (fixed seed) for checkpointing
    checkpoint_every: int = 50


@dataclass
class ClusterConfig:
    """k-means pseudo-labels from phase-1 frame features, one label file per cluster count."""

    datadir: str = "data/demo/Audio_16k"
    labeldir: str = "data/demo/labels"
    labelpath: str = ""
    output_dir: str = ""
    pretrained_path: str = ""  # the phase-1 model (directory, checkpoint or runs:/ URI)
    num_clusters: tuple[int, ...] = (8, 32)  # the paper: 64,512,4096
    sample_ratio: float = 1.0  # share of each utterance's frames that k-means trains on
    sample_cap_per_centroid: int = 1000  # k-means trains on at most this many frames x max(k)
    niter: int = 20
    seed: int = 0
    downmix: bool = False


@dataclass
class Phase2Config(TrainingConfig):
    """P-TAPT phase 2: wav2vec 2.0 trained to predict every frame's cluster labels."""

    backbone: str = "tiny"
    clusterpath: str = ""  # the merged cluster-label JSON (path or runs:/ URI)
    lr: float = 1e-4
    batch_size: int = 16  # sets the dynamic batch as in TaptConfig; the paper: 64
    training_step: int = 200  # the paper: 20000
    warmup_step: int = 20  # the paper: 100
    mask_time_prob: float = 0.06
    checkpoint_every: int = 100


@dataclass
class CompareConfig:
    """A table and a bar chart comparing finished method runs (V-FT, TAPT, P-TAPT)."""

    runs: str = ""  # comma-separated run ids; empty: the newest finished run of each method
    experiment_name: str = ""  # where to look when runs is empty; empty: every experiment
    output_dir: str = "outputs/compare"


@dataclass
class MethodConfig:
    """V-FT: fine-tuning alone. What every method shares: data, fine-tuning, tracking.

    Defaults are read off the stage configs, so a stage default changed there changes here.
    """

    datadir: str = TrainingConfig.datadir
    labeldir: str = TrainingConfig.labeldir
    labelpath: str = TrainingConfig.labelpath
    output_root: str = "outputs"  # each stage writes to <output_root>/<stage>/<reuse key>
    seed: int = TrainingConfig.seed
    precision: str = TrainingConfig.precision
    num_workers: int = TrainingConfig.num_workers
    accelerator: str = TrainingConfig.accelerator
    devices: str = TrainingConfig.devices
    downmix: bool = TrainingConfig.downmix
    maxseqlen: float = TrainingConfig.maxseqlen
    backbone: str = FinetuneConfig.backbone
    classes: str = FinetuneConfig.classes
    lr: float = FinetuneConfig.lr  # fine-tuning
    batch_size: int = FinetuneConfig.batch_size  # fine-tuning
    max_epochs: int = FinetuneConfig.max_epochs
    num_exps: int = FinetuneConfig.num_exps
    force: bool = False  # recompute stages even when a finished identical run exists
    register_as: str = ""  # register the fine-tuned model under this name in the registry


@dataclass
class TaptMethodConfig(MethodConfig):
    """TAPT: continued wav2vec 2.0 pretraining on each fold's Train audio, then fine-tuning."""

    pretrain_lr: float = TaptConfig.lr
    pretrain_batch_size: int = TaptConfig.batch_size
    training_step: int = TaptConfig.training_step
    warmup_step: int = TaptConfig.warmup_step


@dataclass
class PtaptMethodConfig(MethodConfig):
    """P-TAPT: wav2vec 1.0 emotion model -> k-means pseudo-labels -> wav2vec 2.0 -> fine-tuning."""

    w2v1: str = Phase1Config.w2v1
    w2v1_training_step: int = Phase1Config.training_step
    num_clusters: tuple[int, ...] = ClusterConfig.num_clusters
    sample_ratio: float = ClusterConfig.sample_ratio
    pretrain_lr: float = Phase2Config.lr
    pretrain_batch_size: int = Phase2Config.batch_size
    training_step: int = Phase2Config.training_step
    warmup_step: int = Phase2Config.warmup_step



def _scaled_sets(base: tuple[int, ...], factors: tuple[int, ...]) -> str:
    """``(8, 32), (1, 2)`` -> ``"8,32;16,64"``: cluster-count sets as the search takes them."""
    return ";".join(",".join(str(k * f) for k in base) for f in factors)


@dataclass
class SearchSpaceConfig:
    """An Optuna search (``ser.search``): its space, its budget, where its study lives.

    The ranges default to the stage configs: fine-tuning's lr / 10 .. x 10 (log scale), half,
    once and twice its batch size, P-TAPT's cluster-count set as it is and doubled. A range of
    one value is fixed, not tuned.
    """

    method: str = "ptapt"  # vft, tapt or ptapt
    n_trials: int = 10  # of the whole study (every worker, every resume): complete+pruned+running
    timeout: float = 0.0  # seconds after which this worker starts no new trial; 0: none
    study_name: str = ""  # empty: ser-<method>
    storage: str = ""  # SQLAlchemy URL; empty: SQLite optuna.db beside the MLflow database
    sampler: str = "tpe"  # tpe or random
    sampler_seed: int = 0
    pruner: str = "median"  # median or none
    pruner_startup_trials: int = 2  # complete trials before any pruning
    pruner_warmup_steps: int = FinetuneConfig.max_epochs // 3  # validations before pruning
    lr_min: float = FinetuneConfig.lr / 10  # fine-tuning learning rate, log scale
    lr_max: float = FinetuneConfig.lr * 10
    batch_sizes: tuple[int, ...] = (
        FinetuneConfig.batch_size // 2, FinetuneConfig.batch_size, FinetuneConfig.batch_size * 2
    )  # fmt: skip
    # P-TAPT only: cluster-count sets separated by ';'
    num_clusters_choices: str = _scaled_sets(ClusterConfig.num_clusters, (1, 2))


# What the search tunes (ranges above instead), and what concerns one run, not a search.
SEARCH_TUNED = ("lr", "batch_size", "num_clusters")
_NOT_IN_SEARCH = ("force", "register_as")

# The search's parameters: its space and budget, then every other P-TAPT (hence V-FT and TAPT)
# method setting, fixed for the whole study.
SearchConfig = make_dataclass(
    "SearchConfig",
    [
        (f.name, get_type_hints(PtaptMethodConfig)[f.name], field(default=f.default))
        for f in fields(PtaptMethodConfig)
        if f.name not in SEARCH_TUNED + _NOT_IN_SEARCH
    ],
    bases=(SearchSpaceConfig,),
)
SearchConfig.__module__ = __name__

def with_tracking(config_cls: type[Any]) -> type[Any]:
    """A stage's config plus what its standalone entry point adds: ``force`` (and, for
    fine-tuning, ``register_as``), which change tracking, not results."""
    extra: list[tuple[str, type, Any]] = [("force", bool, field(default=False))]
    if config_cls is FinetuneConfig:
        extra.append(("register_as", str, field(default="")))
    return make_dataclass(f"{config_cls.__name__}Entry", extra, bases=(config_cls,))


# The stage entry points of MLproject: name, config, description.
STAGE_ENTRY_POINTS: tuple[tuple[str, type[Any], str], ...] = (
    ("pretrain_w2v1", Phase1Config, "P-TAPT phase 1: train the wav2vec 1.0 emotion model."),
    ("cluster", ClusterConfig, "P-TAPT: k-means pseudo-labels from phase-1 frame features."),
    ("pretrain_w2v2", Phase2Config, "P-TAPT phase 2: wav2vec 2.0 on frame pseudo-labels."),
    ("tapt_pretrain", TaptConfig, "TAPT: continued wav2vec 2.0 pretraining on Train audio."),
    ("finetune", FinetuneConfig, "Fine-tune wav2vec 2.0 on emotion labels (all folds)."),
)
