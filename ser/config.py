"""Typed configuration: one dataclass per job, the only source of defaults and descriptions.

The command line (``ser.cli``, whose ``--help`` shows each ``help`` below), the MLproject file
and the Optuna search space all read their defaults from these classes, so a default changed
here changes everywhere. Every config has ``check()``, which refuses bad values before any work
starts (``ser.checks``).

A method's parameters say which stage they set: ``phase1_lr`` is P-TAPT phase 1's ``lr``,
``phase2_training_step`` phase 2's ``training_step``; ``lr`` and ``batch_size`` are
fine-tuning's. :data:`METHOD_STAGES` spells out, per method, how each stage's config is filled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from ser import artifacts, checks

SAMPLE_RATE = 16_000
EMOTIONS_4 = ("anger", "happy", "neutral", "sad")
PRECISIONS = ("32", "16-mixed", "bf16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
METHODS = ("vft", "tapt", "ptapt", "probe")
SAMPLERS = ("tpe", "random")
BATCHINGS = ("random", "bucket")
TIME_MASKINGS = ("batch", "utterance")
DYNAMIC_BATCH_RULES = ("sum", "padded")
DIVERSITY_WEIGHTINGS = ("original", "per_frame")
RECIPES = ("demo", "paper")
PRUNERS = ("median", "none")
# Stands for an input that an earlier stage of a method makes at run time.
PENDING = "runs:/<earlier stage>/"


def param(default: Any, help: str, *, required: bool = False) -> Any:
    """A config field with its one-line description (``--help``, MLproject comments)."""
    return field(default=default, metadata={"help": help, "required": required})


def describe(cls: type[Any], name: str) -> str:
    """The description of ``cls``'s field ``name``."""
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


def like(cls: type[Any], name: str, prefix: str = "") -> Any:
    """A method parameter that sets ``cls``'s field ``name``: its default and description."""
    default = next(f.default for f in fields(cls) if f.name == name)
    return param(default, prefix + describe(cls, name))


@dataclass
class DemoCorpusConfig:
    """The built-in synthetic emotional speech corpus (``ser.data.synthetic``)."""

    output_dir: str = param("data/demo", "where to write Audio_16k/ and labels/")
    num_speakers: int = param(4, "speakers; each is one leave-one-speaker-out fold")
    utterances_per_class: int = param(12, "utterances per speaker and class")
    min_seconds: float = param(1.5, "shortest utterance, seconds")
    max_seconds: float = param(4.0, "longest utterance, seconds")
    seed: int = param(0, "random seed of the synthesis")
    iemocap_layout_dir: str = param(
        "", "also write the corpus in the IEMOCAP_full_release layout here; empty: do not"
    )

    def check(self) -> None:
        checks.integer(self, "num_speakers", 2)
        checks.integer(self, "utterances_per_class", 1)
        checks.positive(self, "min_seconds", "max_seconds")
        checks.integer(self, "seed", 0)


@dataclass
class PrepareIemocapConfig:
    """IEMOCAP release -> 16 kHz wavs and session-wise label files (``ser.data.iemocap``)."""

    iemocap_dir: str = param("", "the IEMOCAP_full_release directory", required=True)
    output_dir: str = param("", "where to write Audio_16k/ and labels/", required=True)
    classes_setup: str = param(
        "4",
        "4 (exc merged into happy), 4-no-exc (exc dropped), 5 (exc apart), 6 (5 and fru)",
    )
    label_map: str = param("", "code=class,code=class or a JSON file; replaces classes_setup")
    folds: str = param("session", "session (5 folds) or speaker (10, leave one speaker out)")

    def check(self) -> None:
        checks.not_empty(self, "iemocap_dir", "the IEMOCAP_full_release directory")
        checks.not_empty(self, "output_dir", "a folder to write the prepared corpus to")
        checks.one_of(self, "classes_setup", ("4", "4-no-exc", "5", "6"))
        checks.one_of(self, "folds", ("session", "speaker"))


EMOBOX_VAL_RULES = ("auto", "speaker", "utterance", "none")


@dataclass
class PrepareEmoboxConfig:
    """An EmoBox corpus -> 16 kHz wavs and its folds as label files (``ser.data.emobox``)."""

    emobox_dir: str = param("", "an EmoBox checkout or its data/ folder", required=True)
    corpus: str = param("", "the corpus: a folder of EmoBox's data/, e.g. cremad", required=True)
    audio_root: str = param("", "the folder the metadata's wav paths start from", required=True)
    output_dir: str = param("", "where to write Audio_16k/ and labels/", required=True)
    val: str = param(
        "auto",
        "Val carved from Train where EmoBox has no valid file: speaker (one seeded Train "
        "speaker), utterance (a seeded val_fraction of Train), auto (speaker where the metadata "
        "names speakers, else utterance), none (empty Val)",
    )
    val_fraction: float = param(0.1, "the share of Train that Val takes under val=utterance")
    label_map: str = param("", "raw=class,raw=class or a JSON file; empty: label_map.json")
    seed: int = param(0, "picks the Val speaker or utterances")

    def check(self) -> None:
        checks.not_empty(self, "emobox_dir", "an EmoBox checkout or its data/ folder")
        checks.not_empty(self, "corpus", "the name of a corpus folder of EmoBox's data/")
        checks.not_empty(self, "audio_root", "the folder the metadata's wav paths start from")
        checks.not_empty(self, "output_dir", "a folder to write the prepared corpus to")
        checks.one_of(self, "val", EMOBOX_VAL_RULES)
        checks.in_range(self, "val_fraction", 0.0, 1.0, low_open=True, high_open=True)
        checks.integer(self, "seed", 0)


@dataclass
class DataConfig:
    """Where the corpus is, and the hardware and precision a stage trains with."""

    datadir: str = param("data/demo/Audio_16k", "the audio folder label paths are relative to")
    labeldir: str = param("data/demo/labels", "a folder of fold files (label JSON)")
    labelpath: str = param("", "one fold file; when given, used instead of labeldir")
    seed: int = param(0, "random seed (initialisation, masks, crops, batch order)")
    precision: str = param("32", "32, 16-mixed or bf16-mixed (GPU precisions: 32 on a CPU)")
    num_workers: int = param(-1, "data-loading worker processes; -1: chosen from the cores")
    accelerator: str = param("auto", f"Lightning accelerator: {', '.join(ACCELERATORS)}")
    devices: str = param("auto", "devices per machine: auto, a count, -1 (all) or ids 0,1")
    downmix: bool = param(False, "average multi-channel audio instead of refusing it")
    maxseqlen: float = param(10.0, "seconds; longer training audio is cropped at random")

    def check(self) -> None:
        checks.integer(self, "seed", 0)
        checks.one_of(self, "precision", PRECISIONS)
        checks.integer(self, "num_workers", -1)
        checks.one_of(self, "accelerator", ACCELERATORS)
        _check_devices(self)
        checks.positive(self, "maxseqlen")
        _check_maxseqlen(self)


def _check_devices(config: Any) -> None:
    text = str(config.devices).replace(" ", "")
    ids = text.split(",")
    if text in ("auto", "-1"):
        return
    if all(part.isdigit() for part in ids) and (len(ids) > 1 or int(text) >= 1):
        return
    raise checks.ConfigError(
        "devices", config.devices, "is not a device count: give auto, a number >= 1, -1 (all) "
        "or device ids such as 0,1"
    )


def _check_maxseqlen(config: Any) -> None:
    from ser.data.frames import receptive_field  # torch: only when a config is checked

    if int(config.maxseqlen * SAMPLE_RATE) < receptive_field():
        raise checks.ConfigError(
            "maxseqlen", config.maxseqlen,
            f"s is shorter than one wav2vec 2.0 frame ({receptive_field() / SAMPLE_RATE} s); "
            "the recipe uses 10",
        )


@dataclass
class TrainingConfig(DataConfig):
    """What every training stage shares besides data: outputs, accumulation, clipping."""

    output_dir: str = param("", "where the stage writes; empty: outputs/<stage>")
    accumulate_grad_batches: int = param(1, "batches per optimizer step")
    gradient_clip_val: float = param(0.0, "gradient norm clipping; 0: none, as in the original")
    save_top_k: int = param(1, "best checkpoints kept while a run trains (-1: all)")
    keep_checkpoints: bool = param(
        False, "keep Lightning checkpoints after a fold or run finishes (default: removed)"
    )

    def check(self) -> None:
        super().check()
        checks.integer(self, "accumulate_grad_batches", 1)
        checks.in_range(self, "gradient_clip_val", 0, float("inf"), high_open=True)
        if self.save_top_k < 1 and self.save_top_k != -1:
            raise checks.ConfigError(
                "save_top_k", self.save_top_k, "must keep the best checkpoint (1 or more) or all "
                "(-1)"
            )


def _check_steps(config: Any) -> None:
    """What a step-based stage (TAPT, phase 1, phase 2) needs of its numbers."""
    checks.positive(config, "lr")
    for name in ("batch_size", "training_step", "checkpoint_every"):
        checks.integer(config, name, 1)


def _check_warmup(config: Any) -> None:
    if not 0 <= config.warmup_step <= config.training_step:
        raise checks.ConfigError(
            "warmup_step", config.warmup_step,
            f"must be between 0 and {{training_step}}={config.training_step}",
        )


@dataclass
class FinetuneConfig(TrainingConfig):
    """Fine-tuning on emotion labels: V-FT, and the last stage of TAPT and P-TAPT."""

    backbone: str = param(
        "tiny", "wav2vec 2.0, HuBERT, WavLM or data2vec-audio: preset (tiny, base, large, "
        "tiny-hubert, tiny-wavlm, tiny-data2vec-audio), HF folder or cached hub name, stage "
        ".ckpt, fairseq .pt"
    )
    pretrained_path: str = param(
        "", "an earlier stage's backbone (path or runs:/ URI); wins over backbone"
    )
    classes: str = param("", "comma-separated classes; empty: the sorted labels of the folds")
    lr: float = param(1e-3, "fine-tuning learning rate (the paper: 1e-4 for wav2vec2-base)")
    batch_size: int = param(16, "fine-tuning batch size (the paper: 64)")
    max_epochs: int = param(15, "fine-tuning epochs per run")
    num_exps: int = param(1, "repeats per fold, differing by seed")
    mask_time_prob: float = param(0.08, "share of frames masked in time (SpecAugment)")
    mask_feature_prob: float = param(0.05, "share of channels masked (SpecAugment)")
    time_masking: str = param(
        "batch", "batch: span count per batch from its padded length, as the original; "
        "utterance: per utterance from its own length"
    )
    batching: str = param(
        "random", "random: shuffled batches, as the original; bucket: grouped by length"
    )
    train_mask_embedding: bool = param(
        False, "train the mask embedding too (the original never gave it to the optimizer)"
    )
    keep_run_models: bool = param(
        False, "keep every run's fine-tuned weights, not only the exported model's"
    )
    gradient_checkpointing: bool = param(
        False, "recompute activations in the backward pass: less memory, about 30 % slower"
    )

    def check(self) -> None:
        super().check()
        checks.positive(self, "lr")
        for name in ("batch_size", "max_epochs", "num_exps"):
            checks.integer(self, name, 1)
        checks.in_range(self, "mask_time_prob", 0, 1)
        checks.in_range(self, "mask_feature_prob", 0, 1)
        checks.one_of(self, "time_masking", TIME_MASKINGS)
        checks.one_of(self, "batching", BATCHINGS)


@dataclass
class TaptConfig(TrainingConfig):
    """TAPT: continued wav2vec 2.0 pretraining (contrastive + diversity loss) on Train audio."""

    backbone: str = param(
        "tiny", "wav2vec 2.0 only (TAPT needs its quantizer; P-TAPT takes any family): preset "
        "(tiny, base, large), HF folder or cached hub name, stage .ckpt, fairseq .pt"
    )
    lr: float = param(1e-4, "pretraining learning rate (the paper: 1e-4)")
    batch_size: int = param(8, "sets the dynamic batch, 250 s of audio per 64 (the paper: 64)")
    training_step: int = param(100, "pretraining steps (the paper: 20000 on IEMOCAP)")
    warmup_step: int = param(10, "learning-rate warmup steps (the paper: 100)")
    gradient_clip_val: float = param(
        1.0, "gradient norm clipping (departs from the original: keeps fp16 NaN-free)"
    )
    checkpoint_every: int = param(50, "steps between resume checkpoints")
    gradient_checkpointing: bool = like(FinetuneConfig, "gradient_checkpointing")
    diversity_weighting: str = param(
        "original", "original: contrastive sum + 0.1 x diversity (transformers 4.10, the "
        "paper's); per_frame: diversity x masked frames (fairseq, transformers 5)"
    )
    dynamic_batch_rule: str = param(
        "sum", "sum: a batch closes once its lengths sum to the budget (the original); "
        "padded: its padded size stays within it"
    )

    def check(self) -> None:
        super().check()
        _check_steps(self)
        _check_warmup(self)
        checks.one_of(self, "diversity_weighting", DIVERSITY_WEIGHTINGS)
        checks.one_of(self, "dynamic_batch_rule", DYNAMIC_BATCH_RULES)
        _check_tapt_backbone(self)


def _check_tapt_backbone(config: Any) -> None:
    """TAPT refuses a backbone of another family than wav2vec 2.0 here, before any work; read
    from its preset name or config files, no weights (``ser.models.backbones.tapt_refusal``)."""
    from ser.models.backbones import tapt_refusal  # transformers: only for a TAPT config

    reason = tapt_refusal(config.backbone)
    if reason is not None:
        raise checks.ConfigError("backbone", config.backbone, reason)


@dataclass
class Phase1Config(TrainingConfig):
    """P-TAPT phase 1: the wav2vec 1.0 emotion model trained on utterance labels."""

    w2v1: str = param("tiny", "wav2vec 1.0: preset, fairseq wav2vec_large.pt, or our w2v1/")
    classes: str = like(FinetuneConfig, "classes")
    lr: float = param(1e-4, "phase-1 learning rate (the paper: 1e-4)")
    batch_size: int = param(32, "phase-1 batch size (the paper: 64)")
    training_step: int = param(100, "phase-1 steps (the paper: 10000)")
    warmup_fraction: float = param(0.05, "share of training_step warming up the learning rate")
    valid_fraction: float = param(0.1, "share of Train held out (seeded) to pick the checkpoint")
    checkpoint_every: int = param(25, "steps between validations and checkpoints")

    def check(self) -> None:
        super().check()
        _check_steps(self)
        checks.in_range(self, "valid_fraction", 0, 1, low_open=True, high_open=True)
        checks.in_range(self, "warmup_fraction", 0, 1, high_open=True)


@dataclass
class ClusterConfig:
    """k-means pseudo-labels from phase-1 frame features, one label file per cluster count."""

    datadir: str = like(DataConfig, "datadir")
    labeldir: str = like(DataConfig, "labeldir")
    labelpath: str = like(DataConfig, "labelpath")
    output_dir: str = like(TrainingConfig, "output_dir")
    pretrained_path: str = param("", "the phase-1 model: folder, checkpoint or runs:/ URI")
    num_clusters: tuple[int, ...] = param((8, 32), "cluster counts (the paper: 64,512,4096)")
    sample_ratio: float = param(1.0, "share of each utterance's frames k-means trains on")
    sample_cap_per_centroid: int = param(1000, "k-means trains on at most this x max(k) frames")
    niter: int = param(20, "k-means iterations")
    seed: int = like(DataConfig, "seed")
    downmix: bool = like(DataConfig, "downmix")

    def check(self) -> None:
        ks = list(self.num_clusters)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 2 for k in ks):
            raise checks.ConfigError(
                "num_clusters", tuple(ks), "must list one or more cluster counts, each an "
                "integer >= 2, e.g. 64,512,4096",
            )
        if len(set(ks)) != len(ks):
            raise checks.ConfigError(
                "num_clusters", tuple(ks), "repeats a cluster count; give each once"
            )
        checks.in_range(self, "sample_ratio", 0, 1, low_open=True)
        checks.integer(self, "sample_cap_per_centroid", 1)
        checks.integer(self, "niter", 1)
        checks.integer(self, "seed", 0)
        checks.not_empty(self, "pretrained_path", "the phase-1 model (its output_dir or w2v1/)")


@dataclass
class Phase2Config(TrainingConfig):
    """P-TAPT phase 2: wav2vec 2.0 trained to predict every frame's cluster labels."""

    backbone: str = like(FinetuneConfig, "backbone")
    clusterpath: str = param("", "the clustering output or a merged clusters.json (or runs:/)")
    lr: float = param(1e-4, "phase-2 learning rate (the paper: 1e-4)")
    batch_size: int = param(8, "sets the dynamic batch, 250 s of audio per 64 (the paper: 64)")
    training_step: int = param(100, "phase-2 steps (the paper: 20000)")
    warmup_step: int = param(10, "learning-rate warmup steps (the paper: 100)")
    mask_time_prob: float = param(0.06, "share of frames masked; the loss is on masked frames")
    checkpoint_every: int = param(50, "steps between resume checkpoints")
    train_mask_embedding: bool = like(FinetuneConfig, "train_mask_embedding")
    gradient_checkpointing: bool = like(FinetuneConfig, "gradient_checkpointing")
    dynamic_batch_rule: str = like(TaptConfig, "dynamic_batch_rule")

    def check(self) -> None:
        super().check()
        _check_steps(self)
        _check_warmup(self)
        checks.in_range(self, "mask_time_prob", 0, 1, low_open=True)
        checks.one_of(self, "dynamic_batch_rule", DYNAMIC_BATCH_RULES)
        checks.not_empty(self, "clusterpath", "the clustering stage's output or clusters.json")


@dataclass
class ProbeConfig(TrainingConfig):
    """Probe: the frozen backbone's hidden states, softmax-weighted and mean-pooled, into a linear
    classifier (SUPERB, EmoBox), on every fold."""

    backbone: str = like(FinetuneConfig, "backbone")
    classes: str = like(FinetuneConfig, "classes")
    lr: float = param(1e-2, "probe learning rate: layer weights and linear head (SUPERB: 1e-4)")
    batch_size: int = param(16, "probe batch size in utterances (SUPERB: 32)")
    max_epochs: int = param(15, "probe epochs per run; each trains the head only")
    num_exps: int = like(FinetuneConfig, "num_exps")
    devices: str = param("1", "one device: the head is too small to share out")
    maxseqlen: float = param(10.0, "not used by the probe: every utterance is pooled whole")

    def check(self) -> None:
        super().check()
        checks.positive(self, "lr")
        for name in ("batch_size", "max_epochs", "num_exps"):
            checks.integer(self, name, 1)
        if str(self.devices).replace(" ", "") != "1":
            raise checks.ConfigError(
                "devices", self.devices, "must be 1: the probe trains a head of a few thousand "
                "weights, which gains nothing from data parallelism"
            )


@dataclass
class CompareConfig:
    """A table, a bar chart and paired tests comparing finished method runs (V-FT, TAPT,
    P-TAPT, probe)."""

    runs: str = param("", "comma-separated run ids; empty: the newest finished run per method")
    experiment_name: str = param("", "where to look when runs is empty; empty: everywhere")
    output_dir: str = param("outputs/compare", "where to write the table and chart")

    def check(self) -> None:
        checks.not_empty(self, "output_dir", "a folder for the table and chart")


PREDICT_OUTPUTS = (".csv", ".jsonl")
PREDICT_DEVICES = ("auto", "cpu", "cuda")


@dataclass
class PredictConfig:
    """Emotion labels and class probabilities for every audio file of a folder or list."""

    model: str = param(
        "", "models:/<name>/<version>, models:/<name>@<alias>, models:/m-<id>, runs:/<id>/<path>,"
        " <name>/<version>, <name>@<alias>, or an exported model directory (with model.json)",
        required=True,
    )
    input: str = param(
        "", "a folder of audio (searched recursively), a .csv with a path column, or a "
        "Kaldi wav.scp; relative paths in a list are relative to the list", required=True,
    )
    output: str = param("", "the .csv or .jsonl file to write", required=True)
    window: float = param(10.0, "seconds per scored window; longer files are scored window by "
                          "window and get the mean of the window probabilities; 0: whole files")
    hop: float = param(5.0, "seconds between the starts of consecutive windows")
    per_window: bool = param(False, "also write one row per window, with start and end seconds")
    batch_size: int = param(32, "windows scored per call of the model")
    device: str = param("auto", "auto (a GPU when there is one), cpu or cuda")

    def check(self) -> None:
        checks.not_empty(self, "model", "a model URI, a registered name/version or a directory")
        checks.not_empty(self, "input", "a folder of audio, a .csv or a wav.scp")
        checks.not_empty(self, "output", "a .csv or .jsonl file")
        if not self.output.lower().endswith(PREDICT_OUTPUTS):
            raise checks.ConfigError("output", self.output, "must end in .csv or .jsonl")
        checks.in_range(self, "window", 0.0, 86_400.0)
        if self.window > 0:
            checks.in_range(self, "hop", 0.0, self.window, low_open=True,
                            why=" (seconds, at most window: no audio is left out)")
        checks.integer(self, "batch_size", 1)
        checks.one_of(self, "device", PREDICT_DEVICES)


# --- options of entry points that change tracking, not results --------------------------------


@dataclass
class ForceOption:
    force: bool = param(False, "recompute stages even when a finished identical run exists")


@dataclass
class RecipeOption:
    recipe: str = param(
        "demo", "demo: the defaults, sized for the demo corpus; paper: every value of the "
        "paper's recipe (ser.recipes) where you set none"
    )

    def check(self) -> None:
        checks.one_of(self, "recipe", RECIPES)
        parent = super()
        if hasattr(parent, "check"):  # the config this option is added to
            parent.check()


@dataclass
class RegisterOption:
    register_as: str = param("", "register the fine-tuned model under this name")


@dataclass
class FinetuneEntry(RecipeOption, RegisterOption, ForceOption, FinetuneConfig):
    """The ``finetune`` entry point."""


@dataclass
class TaptEntry(RecipeOption, ForceOption, TaptConfig):
    """The ``tapt_pretrain`` entry point."""


@dataclass
class Phase1Entry(RecipeOption, ForceOption, Phase1Config):
    """The ``pretrain_w2v1`` entry point."""


@dataclass
class ClusterEntry(RecipeOption, ForceOption, ClusterConfig):
    """The ``cluster`` entry point."""


@dataclass
class Phase2Entry(RecipeOption, ForceOption, Phase2Config):
    """The ``pretrain_w2v2`` entry point."""


@dataclass
class ProbeEntry(RecipeOption, ForceOption, ProbeConfig):
    """The ``probe_head`` entry point."""


# --- methods ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageParams:
    """How a method fills one stage's config: ``renames`` maps a stage field to the method
    parameter that sets it (a field of the same name otherwise), ``chained`` a stage field to
    the earlier stage and output that make it at run time. Other fields keep their default."""

    stage: str  # the stage's entry point name
    config_cls: type[Any]
    renames: Mapping[str, str] = field(default_factory=dict)
    chained: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    def build(self, method: Any, inputs: Mapping[str, str]) -> Any:
        """The stage's config from ``method``'s values and the earlier stages' URIs."""
        values: dict[str, Any] = {}
        for f in fields(self.config_cls):
            source = self.renames.get(f.name, f.name)
            if f.name in self.chained:
                values[f.name] = inputs[f.name]
            elif f.name != "output_dir" and hasattr(method, source):
                values[f.name] = getattr(method, source)
        return self.config_cls(**values)

    def check(self, method: Any) -> None:
        """The stage's checks, naming the method's parameters in any error."""
        config = self.build(method, {name: PENDING for name in self.chained})
        try:
            config.check()
        except checks.ConfigError as err:
            raise err.renamed(self.renames) from None


def _prefixed(prefix: str, *names: str) -> dict[str, str]:
    return {name: f"{prefix}_{name}" for name in names}


_STEP_KNOBS = ("lr", "batch_size", "training_step", "checkpoint_every")
_TAPT_RENAMES = _prefixed("tapt", *_STEP_KNOBS, "warmup_step")
_PHASE1_RENAMES = _prefixed("phase1", *_STEP_KNOBS)
_PHASE2_RENAMES = _prefixed("phase2", *_STEP_KNOBS, "warmup_step")


def _finetune_after(stage: str) -> StageParams:
    return StageParams("finetune", FinetuneConfig,
                       chained={"pretrained_path": (stage, artifacts.BACKBONE)})


METHOD_STAGES: dict[str, tuple[StageParams, ...]] = {
    "vft": (StageParams("finetune", FinetuneConfig),),
    "tapt": (
        StageParams("tapt_pretrain", TaptConfig, renames=_TAPT_RENAMES),
        _finetune_after("tapt_pretrain"),
    ),
    "ptapt": (
        StageParams("pretrain_w2v1", Phase1Config, renames=_PHASE1_RENAMES),
        StageParams("cluster", ClusterConfig,
                    chained={"pretrained_path": ("pretrain_w2v1", artifacts.W2V1)}),
        StageParams("pretrain_w2v2", Phase2Config, renames=_PHASE2_RENAMES,
                    chained={"clusterpath": ("cluster", artifacts.CLUSTERS)}),
        _finetune_after("pretrain_w2v2"),
    ),
    "probe": (StageParams("probe_head", ProbeConfig),),
}  # fmt: skip


@dataclass
class MethodData(DataConfig):
    """What every method shares besides fine-tuning's tuned values: data, hardware, backbone."""

    output_root: str = param("outputs", "each stage writes to <output_root>/<stage>/<reuse key>")
    backbone: str = like(FinetuneConfig, "backbone")
    classes: str = like(FinetuneConfig, "classes")
    max_epochs: int = like(FinetuneConfig, "max_epochs")
    num_exps: int = like(FinetuneConfig, "num_exps")
    time_masking: str = like(FinetuneConfig, "time_masking")
    batching: str = like(FinetuneConfig, "batching")
    train_mask_embedding: bool = like(FinetuneConfig, "train_mask_embedding")
    gradient_checkpointing: bool = like(FinetuneConfig, "gradient_checkpointing")
    keep_run_models: bool = like(FinetuneConfig, "keep_run_models")


@dataclass
class FinetuneTuned:
    """Fine-tuning's values that a search tunes."""

    lr: float = like(FinetuneConfig, "lr")
    batch_size: int = like(FinetuneConfig, "batch_size")


@dataclass
class TaptParams:
    """TAPT pretraining's own values inside the ``tapt`` method."""

    tapt_lr: float = like(TaptConfig, "lr", "TAPT: ")
    tapt_batch_size: int = like(TaptConfig, "batch_size", "TAPT: ")
    tapt_training_step: int = like(TaptConfig, "training_step", "TAPT: ")
    tapt_warmup_step: int = like(TaptConfig, "warmup_step", "TAPT: ")
    tapt_checkpoint_every: int = like(TaptConfig, "checkpoint_every", "TAPT: ")
    diversity_weighting: str = like(TaptConfig, "diversity_weighting", "TAPT: ")


@dataclass
class DynamicBatchParams:
    """How TAPT's and phase 2's dynamic batches are filled."""

    dynamic_batch_rule: str = like(TaptConfig, "dynamic_batch_rule")


@dataclass
class Phase1Params:
    """P-TAPT phase 1's own values inside the ``ptapt`` method."""

    w2v1: str = like(Phase1Config, "w2v1")
    phase1_lr: float = like(Phase1Config, "lr")
    phase1_batch_size: int = like(Phase1Config, "batch_size")
    phase1_training_step: int = like(Phase1Config, "training_step")
    phase1_checkpoint_every: int = like(Phase1Config, "checkpoint_every", "phase 1: ")


@dataclass
class ClusterSampleParams:
    sample_ratio: float = like(ClusterConfig, "sample_ratio")


@dataclass
class ClusterCountParams:
    num_clusters: tuple[int, ...] = like(ClusterConfig, "num_clusters")


@dataclass
class Phase2Params:
    """P-TAPT phase 2's own values inside the ``ptapt`` method."""

    phase2_lr: float = like(Phase2Config, "lr")
    phase2_batch_size: int = like(Phase2Config, "batch_size")
    phase2_training_step: int = like(Phase2Config, "training_step")
    phase2_warmup_step: int = like(Phase2Config, "warmup_step")
    phase2_checkpoint_every: int = like(Phase2Config, "checkpoint_every", "phase 2: ")


class _Method:
    """A method's checks: every stage's config, built as the method will build it."""

    METHOD: ClassVar[str] = ""

    def stage_params(self) -> tuple[StageParams, ...]:
        return METHOD_STAGES[self.METHOD]

    def check(self) -> None:
        checks.one_of(self, "recipe", RECIPES)
        checks.not_empty(self, "output_root", "a folder for the stages' outputs")
        for stage in self.stage_params():
            stage.check(self)


@dataclass
class MethodConfig(_Method, RecipeOption, RegisterOption, ForceOption, FinetuneTuned,
                   MethodData):
    """V-FT: fine-tuning alone."""

    METHOD: ClassVar[str] = "vft"


@dataclass
class TaptMethodConfig(_Method, RecipeOption, RegisterOption, ForceOption, DynamicBatchParams,
                       TaptParams, FinetuneTuned, MethodData):
    """TAPT: continued wav2vec 2.0 pretraining on each fold's Train audio, then fine-tuning."""

    METHOD: ClassVar[str] = "tapt"


@dataclass
class PtaptMethodConfig(_Method, RecipeOption, RegisterOption, ForceOption, DynamicBatchParams,
                        Phase2Params, ClusterSampleParams, ClusterCountParams, Phase1Params,
                        FinetuneTuned, MethodData):
    """P-TAPT: wav2vec 1.0 emotion model -> k-means pseudo-labels -> wav2vec 2.0 -> fine-tuning."""

    METHOD: ClassVar[str] = "ptapt"


@dataclass
class ProbeParams(DataConfig):
    """The ``probe`` method's values besides tracking: data, hardware, backbone, the head's."""

    output_root: str = like(MethodData, "output_root")
    backbone: str = like(ProbeConfig, "backbone")
    classes: str = like(ProbeConfig, "classes")
    lr: float = like(ProbeConfig, "lr")
    batch_size: int = like(ProbeConfig, "batch_size")
    max_epochs: int = like(ProbeConfig, "max_epochs")
    num_exps: int = like(ProbeConfig, "num_exps")
    devices: str = like(ProbeConfig, "devices")
    maxseqlen: float = like(ProbeConfig, "maxseqlen")


@dataclass
class ProbeMethodConfig(_Method, RecipeOption, RegisterOption, ForceOption, ProbeParams):
    """Probe: the frozen backbone's weighted hidden states into a linear classifier."""

    METHOD: ClassVar[str] = "probe"
    register_as: str = param("", "must stay empty: the probe's model is not logged to MLflow")

    def check(self) -> None:
        super().check()
        if self.register_as:
            raise checks.ConfigError(
                "register_as", self.register_as, "must be empty: the probe exports its model to "
                "<output_dir>/model (ser.stages.probe.load_probe) but does not log it as an "
                "MLflow model, which serves fine-tuned classifiers only"
            )


METHOD_CONFIGS: dict[str, type[Any]] = {
    "vft": MethodConfig, "tapt": TaptMethodConfig, "ptapt": PtaptMethodConfig,
    "probe": ProbeMethodConfig,
}  # fmt: skip


# --- search -------------------------------------------------------------------------------------


def _scaled_sets(base: tuple[int, ...], factors: tuple[int, ...]) -> str:
    """``(8, 32), (1, 2)`` -> ``"8,32;16,64"``: cluster-count sets as the search takes them."""
    return ";".join(",".join(str(k * f) for k in base) for f in factors)


def parse_cluster_sets(text: str) -> tuple[tuple[int, ...], ...]:
    """``"8,32;16,64"`` -> ``((8, 32), (16, 64))``, without repeats."""
    sets = []
    for part in (p.strip() for p in text.split(";")):
        try:
            counts = tuple(int(k) for k in part.replace(" ", "").split(","))
        except ValueError:
            counts = ()
        if not counts or min(counts) < 2:
            raise checks.ConfigError(
                "num_clusters_choices", text, "must be cluster-count sets of integers >= 2, ',' "
                "within a set and ';' between sets, e.g. 8,32;16,64",
            )
        sets.append(counts)
    return tuple(dict.fromkeys(sets))


_FT_LR, _FT_BATCH = FinetuneConfig.lr, FinetuneConfig.batch_size


@dataclass
class SearchSpaceConfig:
    """An Optuna search's space, budget and study (``ser.search``).

    The ranges default to the stage configs: fine-tuning's lr / 10 .. x 10 (log scale), half,
    once and twice its batch size, P-TAPT's cluster-count set as it is and doubled. A range of
    one value is fixed, not tuned.
    """

    method: str = param("ptapt", f"the method a trial runs: {', '.join(METHODS)}")
    n_trials: int = param(10, "trials of the whole study: complete + pruned + running")
    workers_per_machine: int = param(
        1, "search workers started on this machine: each takes its share of the cores"
    )
    timeout: float = param(0.0, "seconds after which this worker starts no trial; 0: none")
    study_name: str = param("", "Optuna study name; empty: ser-<method>")
    storage: str = param("", "SQLAlchemy URL; empty: SQLite optuna.db beside the MLflow db")
    sampler: str = param("tpe", f"Optuna sampler: {', '.join(SAMPLERS)}")
    sampler_seed: int = param(0, "seed of the sampler (mixed with the trial number)")
    pruner: str = param("median", f"Optuna pruner: {', '.join(PRUNERS)}")
    pruner_startup_trials: int = param(2, "complete trials before any pruning")
    pruner_warmup_steps: int = param(FinetuneConfig.max_epochs // 3,
                                     "validations of a trial before it can be pruned")
    lr_min: float = param(_FT_LR / 10, "fine-tuning learning rate, low end (log scale)")
    lr_max: float = param(_FT_LR * 10, "fine-tuning learning rate, high end")
    batch_sizes: tuple[int, ...] = param(
        (_FT_BATCH // 2, _FT_BATCH, _FT_BATCH * 2), "fine-tuning batch sizes to try"
    )
    num_clusters_choices: str = param(
        _scaled_sets(ClusterConfig.num_clusters, (1, 2)),
        "P-TAPT only: cluster-count sets, ';' between sets",
    )


@dataclass
class SearchConfig(RecipeOption, DynamicBatchParams, Phase2Params, ClusterSampleParams,
                   Phase1Params, TaptParams, MethodData, SearchSpaceConfig):
    """The search's parameters: its space and budget, then every method setting it does not
    tune (fixed for the whole study)."""

    TUNED: ClassVar[tuple[str, ...]] = ("lr", "batch_size", "num_clusters")
    # A trial runs in its worker's process: to use several devices, start a worker per device.
    devices: str = param("1", "one device per trial; start one worker per device to use more")

    def check(self) -> None:
        checks.one_of(self, "recipe", RECIPES)
        if str(self.devices) != "1":
            raise checks.ConfigError(
                "devices", self.devices, "must be 1: a trial runs in its worker's process; to "
                "use several devices, start one worker per device (CUDA_VISIBLE_DEVICES=i)",
            )
        checks.one_of(self, "method", METHODS)
        for name, low in (("n_trials", 1), ("workers_per_machine", 1),
                          ("pruner_startup_trials", 0), ("pruner_warmup_steps", 0),
                          ("sampler_seed", 0)):  # fmt: skip
            checks.integer(self, name, low)
        checks.in_range(self, "timeout", 0, float("inf"), high_open=True)
        checks.one_of(self, "sampler", SAMPLERS)
        checks.one_of(self, "pruner", PRUNERS)
        checks.positive(self, "lr_min", "lr_max")
        if self.lr_min > self.lr_max:
            raise checks.ConfigError(
                "lr_min", self.lr_min, f"must be <= lr_max={self.lr_max} (equal: lr is fixed)"
            )
        sizes = tuple(self.batch_sizes)
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            raise checks.ConfigError(
                "batch_sizes", ",".join(map(str, sizes)), "must be integers >= 1, e.g. 8,16,32"
            )
        counts = parse_cluster_sets(self.num_clusters_choices)
        for values in self.corners(counts):
            self.method_config(values).check()

    def corners(self, counts: tuple[tuple[int, ...], ...]) -> Iterator[dict[str, Any]]:
        """The space's extreme points, each checked as a trial would run it."""
        for lr in (self.lr_min, self.lr_max):
            for batch_size in (min(self.batch_sizes), max(self.batch_sizes)):
                for num_clusters in counts:
                    yield {"lr": lr, "batch_size": batch_size, "num_clusters": num_clusters}

    def method_config(self, values: Mapping[str, Any]) -> Any:
        """The method's config: this search's fixed settings plus one trial's ``values``."""
        cls = METHOD_CONFIGS[self.method]
        names = {f.name for f in fields(cls)}
        fixed = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        return cls(**{**fixed, **{k: v for k, v in values.items() if k in names}})


# The entry points that are stages: name -> (their parameters, description).
STAGE_ENTRY_POINTS: dict[str, tuple[type[Any], str]] = {
    "pretrain_w2v1": (Phase1Entry, "P-TAPT phase 1: train the wav2vec 1.0 emotion model."),
    "cluster": (ClusterEntry, "P-TAPT: k-means pseudo-labels from phase-1 frame features."),
    "pretrain_w2v2": (Phase2Entry, "P-TAPT phase 2: wav2vec 2.0 on frame pseudo-labels."),
    "tapt_pretrain": (TaptEntry, "TAPT: continued wav2vec 2.0 pretraining on Train audio."),
    "finetune": (FinetuneEntry, "Fine-tune wav2vec 2.0 on emotion labels (all folds)."),
    "probe_head": (ProbeEntry, "Probe: a linear head on the frozen backbone's weighted layers."),
}
