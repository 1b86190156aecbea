"""Named recipes: ``recipe=paper`` sets every value of the paper's recipe in one parameter.

The paper's values (``../shared/RECIPE.md``, read from the original scripts) are written once per
stage config below; a method's and a search's values follow from them through the method's own
parameter names (``ser.config.METHOD_STAGES``: fine-tuning's ``lr``, phase 2's ``phase2_lr``).

A value the user set wins over the recipe. "Set" means: different from the config's default
(``mlflow run`` passes every parameter, so the command line cannot tell a typed default from an
untyped one). A recipe never sets data, backbones, outputs or hardware.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ser.config import (
    METHOD_CONFIGS,
    METHOD_STAGES,
    ClusterConfig,
    FinetuneConfig,
    Phase1Config,
    Phase2Config,
    ProbeConfig,
    SearchConfig,
    TaptConfig,
    _scaled_sets,
)

# The paper's recipe, stage by stage (RECIPE.md). Checkpoint intervals are ours: sized so that
# a 20,000-step run writes its resume point 20 times, not 200.
PAPER: dict[type[Any], dict[str, Any]] = {
    FinetuneConfig: {
        "lr": 1e-4, "batch_size": 64, "max_epochs": 15, "num_exps": 5, "maxseqlen": 10.0,
        "precision": "16-mixed", "mask_time_prob": 0.08, "mask_feature_prob": 0.05,
        "time_masking": "batch", "batching": "random", "train_mask_embedding": False,
    },
    TaptConfig: {
        "lr": 1e-4, "batch_size": 64, "training_step": 20_000, "warmup_step": 100,
        "maxseqlen": 10.0, "precision": "16-mixed", "checkpoint_every": 1_000,
        "diversity_weighting": "original", "dynamic_batch_rule": "sum",
    },
    Phase1Config: {
        "lr": 1e-4, "batch_size": 64, "training_step": 10_000, "warmup_fraction": 0.05,
        "valid_fraction": 0.1, "maxseqlen": 10.0, "precision": "16-mixed",
        "checkpoint_every": 500,
    },
    ClusterConfig: {
        "num_clusters": (64, 512, 4096), "sample_ratio": 1.0, "sample_cap_per_centroid": 1_000,
        "niter": 20,
    },
    Phase2Config: {
        "lr": 1e-4, "batch_size": 64, "training_step": 20_000, "warmup_step": 100,
        "mask_time_prob": 0.06, "maxseqlen": 10.0, "precision": "16-mixed",
        "checkpoint_every": 1_000, "train_mask_embedding": False, "dynamic_batch_rule": "sum",
    },
    # The paper has no probe: only its protocol applies (5 repeats per fold, as fine-tuning's),
    # not its learning rate or batch, which were chosen for a backbone that trains.
    ProbeConfig: {"num_exps": 5},
}


def _method_values(method: str) -> dict[str, Any]:
    """The paper's values under a method's parameter names."""
    values: dict[str, Any] = {}
    for step in METHOD_STAGES[method]:
        for field, value in PAPER[step.config_cls].items():
            values.setdefault(step.renames.get(field, field), value)
    return values


def _search_values() -> dict[str, Any]:
    values: dict[str, Any] = {}
    for method in METHOD_STAGES:
        for name, value in _method_values(method).items():
            values.setdefault(name, value)
    lr, batch = PAPER[FinetuneConfig]["lr"], PAPER[FinetuneConfig]["batch_size"]
    values.update(
        lr_min=lr / 10, lr_max=lr * 10, batch_sizes=(batch // 2, batch, batch * 2),
        num_clusters_choices=_scaled_sets(PAPER[ClusterConfig]["num_clusters"], (1, 2)),
    )
    return values


def paper_values(config_cls: type[Any]) -> dict[str, Any]:
    """What ``recipe=paper`` sets on a config of ``config_cls`` (a stage's, its entry point's,
    a method's or the search's), by field name."""
    for stage_cls, values in PAPER.items():
        if issubclass(config_cls, stage_cls):
            return dict(values)
    for method, method_cls in METHOD_CONFIGS.items():
        if config_cls is method_cls:
            return _method_values(method)
    if issubclass(config_cls, SearchConfig):
        return _search_values()
    raise TypeError(f"no recipe values for {config_cls.__name__}")


def resolve(config: Any) -> Any:
    """``config`` with its recipe's values in every field the user left at its default."""
    if getattr(config, "recipe", "demo") == "demo":
        return config
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    fields = set(defaults)
    chosen = {
        name: value for name, value in paper_values(type(config)).items()
        if name in fields and getattr(config, name) == defaults[name]
    }  # fmt: skip
    return dataclasses.replace(config, **chosen)
