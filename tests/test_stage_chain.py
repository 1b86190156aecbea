"""The P-TAPT stages chained through their local output directories (no MLflow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ser.config import (
    ClusterConfig,
    FinetuneConfig,
    Phase1Config,
    Phase2Config,
)
from ser.data.synthetic import DemoCorpus
from ser.stages import cluster, finetune, ptapt_phase1, ptapt_phase2


@pytest.mark.slow
def test_each_stage_takes_the_previous_output_dir(corpus: DemoCorpus, tmp_path: Path) -> None:
    data = {"datadir": str(corpus.audio_dir), "labeldir": str(corpus.label_dir)}
    out = {name: tmp_path / name for name in ("phase1", "cluster", "phase2", "finetune")}
    ptapt_phase1.run(
        Phase1Config(**data, output_dir=str(out["phase1"]), training_step=2, batch_size=4)
    )
    cluster.run(
        ClusterConfig(
            **data, output_dir=str(out["cluster"]), pretrained_path=str(out["phase1"]),
            num_clusters=(2, 3),
        )
    )  # fmt: skip
    ptapt_phase2.run(
        Phase2Config(
            **data, output_dir=str(out["phase2"]), clusterpath=str(out["cluster"]),
            training_step=2, warmup_step=1,
        )
    )  # fmt: skip
    finetune.run(
        FinetuneConfig(
            **data, output_dir=str(out["finetune"]), pretrained_path=str(out["phase2"]),
            max_epochs=1, batch_size=8,
        )
    )  # fmt: skip
    folds = sorted(p.stem for p in corpus.label_dir.glob("*.json"))
    # Finished folds and runs keep their outputs, not their resume points.
    assert not [p for p in tmp_path.rglob("*.ckpt")]
    for fold in folds:
        assert (out["phase2"] / fold / "backbone" / "config.json").is_file()
        result = json.loads((out["finetune"] / fold / "run_0" / "results.json").read_text())
        assert result["fold"] == fold
    config = json.loads((out["finetune"] / "config.json").read_text())
    assert config["pretrained_path"] == str(out["phase2"])
    assert json.loads((out["finetune"] / "summary.json").read_text())["num_runs"] == len(folds)
