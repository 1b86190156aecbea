"""``recipe=paper``: every value of the paper's recipe in one parameter, explicit values winning."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from ser import recipes
from ser.cli import ENTRY_POINTS
from ser.config import (
    METHOD_STAGES,
    ClusterEntry,
    FinetuneEntry,
    Phase1Entry,
    Phase2Entry,
    PtaptMethodConfig,
    SearchConfig,
    TaptEntry,
    TaptMethodConfig,
)
from ser.data.synthetic import DemoCorpus

ROOT = Path(__file__).resolve().parents[1]

# RECIPE.md, written out here by hand (not read from ser.recipes), stage by stage.
FROM_RECIPE_MD = {
    "finetune": {"lr": 1e-4, "batch_size": 64, "max_epochs": 15, "num_exps": 5,
                 "maxseqlen": 10.0, "precision": "16-mixed", "mask_time_prob": 0.08,
                 "mask_feature_prob": 0.05, "batching": "random", "time_masking": "batch"},
    "tapt_pretrain": {"lr": 1e-4, "batch_size": 64, "training_step": 20_000,
                      "warmup_step": 100, "maxseqlen": 10.0, "precision": "16-mixed"},
    "pretrain_w2v1": {"lr": 1e-4, "batch_size": 64, "training_step": 10_000,
                      "warmup_fraction": 0.05, "valid_fraction": 0.1, "precision": "16-mixed"},
    "cluster": {"num_clusters": (64, 512, 4096), "sample_ratio": 1.0,
                "sample_cap_per_centroid": 1000, "niter": 20},
    "pretrain_w2v2": {"lr": 1e-4, "batch_size": 64, "training_step": 20_000,
                      "warmup_step": 100, "mask_time_prob": 0.06, "precision": "16-mixed"},
}  # fmt: skip
ENTRIES = {"finetune": FinetuneEntry, "tapt_pretrain": TaptEntry, "pretrain_w2v1": Phase1Entry,
           "cluster": ClusterEntry, "pretrain_w2v2": Phase2Entry}  # fmt: skip


def _values(config: object, names: dict[str, object]) -> dict[str, object]:
    return {name: getattr(config, name) for name in names}


@pytest.mark.parametrize("stage", sorted(FROM_RECIPE_MD))
def test_a_stage_entry_point_at_recipe_paper_takes_the_papers_values(stage: str) -> None:
    expected = FROM_RECIPE_MD[stage]
    resolved = recipes.resolve(ENTRIES[stage](recipe="paper"))
    assert _values(resolved, expected) == expected
    assert _values(recipes.resolve(ENTRIES[stage]()), expected) != expected  # demo: untouched


def test_every_stage_of_a_method_gets_the_papers_values_and_explicit_ones_win() -> None:
    for method_cls in (TaptMethodConfig, PtaptMethodConfig):
        config = recipes.resolve(method_cls(recipe="paper"))
        config.check()
        for step in METHOD_STAGES[config.METHOD]:
            stage = step.build(config, {field: "runs:/x/y" for field in step.chained})
            expected = FROM_RECIPE_MD[step.stage]
            assert _values(stage, expected) == expected, (config.METHOD, step.stage)
    mine = recipes.resolve(PtaptMethodConfig(recipe="paper", phase2_lr=3e-5, num_exps=2,
                                             datadir="/my/audio"))  # fmt: skip
    assert (mine.phase2_lr, mine.num_exps, mine.datadir) == (3e-5, 2, "/my/audio")
    assert (mine.phase1_lr, mine.lr, mine.phase2_training_step) == (1e-4, 1e-4, 20_000)
    assert mine.backbone == "tiny"  # a recipe sets no data, backbone or hardware


def test_a_search_at_recipe_paper_centres_its_space_on_the_papers_values() -> None:
    search = recipes.resolve(SearchConfig(recipe="paper"))
    assert (search.lr_min, search.lr_max, search.batch_sizes) == (1e-5, 1e-3, (32, 64, 128))
    assert search.num_clusters_choices == "64,512,4096;128,1024,8192"
    assert search.phase1_training_step == 10_000 and search.tapt_training_step == 20_000


def test_every_method_and_stage_entry_point_takes_recipe() -> None:
    for name, entry in ENTRY_POINTS.items():
        fields = {f.name for f in dataclasses.fields(entry.config_cls)}
        methods = ("vft", "tapt", "ptapt", "probe", "probe_head", "search")
        wanted = name in ENTRIES or name in methods
        assert ("recipe" in fields) == wanted, name


def test_recipe_paper_on_the_command_line_logs_what_the_run_used(
    tracking_uri: str, corpus: DemoCorpus, tmp_path: Path
) -> None:
    # One short run of one fold: the values typed win, the paper's fill in the rest.
    result = subprocess.run(
        [sys.executable, str(ROOT / "entrypoints" / "finetune.py"), "--recipe", "paper",
         "--datadir", str(corpus.audio_dir), "--labelpath", str(corpus.label_files[0]),
         "--max_epochs", "1", "--num_exps", "2", "--precision", "32", "--batch_size", "4",
         "--output_dir", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    params = run.data.params
    # explicit values win; the others are the paper's
    assert (params["max_epochs"], params["batch_size"], params["num_exps"]) == ("1", "4", "2")
    assert (params["lr"], params["maxseqlen"]) == ("0.0001", "10.0")
