"""The stage contract and the seams around it: declarations, imports, checks before any work."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ser import artifacts, checks
from ser.cli import ENTRY_POINTS, build_parser
from ser.config import (
    METHOD_CONFIGS,
    METHOD_STAGES,
    ClusterConfig,
    Phase2Config,
    PtaptMethodConfig,
    SearchConfig,
    TaptMethodConfig,
)
from ser.pipelines import STAGES

ROOT = Path(__file__).resolve().parents[1]
STAGE_FILES = sorted((ROOT / "ser" / "stages").glob("*.py"))
NOT_STAGES = {"__init__", "contract"}
# Method parameters that concern the method run itself, not one of its stages.
METHOD_ONLY = {"output_root", "force", "register_as", "recipe"}


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_stage_module_imports_another_stage() -> None:
    stages = {p.stem for p in STAGE_FILES} - NOT_STAGES
    assert stages == {"finetune", "tapt", "ptapt_phase1", "cluster", "ptapt_phase2", "probe"}
    for path in STAGE_FILES:
        imported = _imported_modules(path)
        others = {f"ser.stages.{s}" for s in stages - {path.stem}}
        assert not imported & others, f"{path.name} imports {sorted(imported & others)}"


def test_mlflow_is_called_from_the_tracking_module_only() -> None:
    # serving defines the pyfunc model class and its signature types; nothing else imports MLflow.
    allowed = {"tracking.py", "serving.py", "pyfunc_model.py"}
    for path in sorted((ROOT / "ser").rglob("*.py")):
        if path.name in allowed:
            continue
        imported = {n for n in _imported_modules(path) if n == "mlflow" or n.startswith("mlflow.")}
        assert not imported, f"{path.relative_to(ROOT)} imports {sorted(imported)}"


def test_every_stage_declares_fields_its_config_has() -> None:
    names = {v for k, v in vars(artifacts).items() if k.isupper() and isinstance(v, str)}
    for name, stage in STAGES.items():
        fields = {f.name for f in dataclasses.fields(stage.config_cls)}
        assert name == stage.name and name in ENTRY_POINTS
        assert set(stage.inputs) <= fields, name
        assert set(stage.outputs) | set(stage.top_level) <= names, name


def test_every_method_parameter_sets_a_stage_and_every_mapping_is_real() -> None:
    for method, steps in METHOD_STAGES.items():
        used: set[str] = set()
        params = {f.name for f in dataclasses.fields(METHOD_CONFIGS[method])}
        for step in steps:
            assert step.stage in STAGES and STAGES[step.stage].config_cls is step.config_cls
            fields = {f.name for f in dataclasses.fields(step.config_cls)}
            assert set(step.renames) <= fields and set(step.chained) <= fields
            assert set(step.renames.values()) <= params, (method, step.stage)
            for stage, output in step.chained.values():
                assert output in STAGES[stage].outputs
            used |= {step.renames.get(f, f) for f in fields} & params
        assert params - used == METHOD_ONLY, method


def test_a_method_builds_each_stage_from_its_own_parameters() -> None:
    config = PtaptMethodConfig(lr=0.5, batch_size=3, phase1_lr=0.25, phase2_lr=0.125,
                               phase2_training_step=7, phase2_warmup_step=2)  # fmt: skip
    built = {s.stage: s.build(config, {f: "runs:/x/y" for f in s.chained})
             for s in METHOD_STAGES["ptapt"]}  # fmt: skip
    assert (built["finetune"].lr, built["finetune"].batch_size) == (0.5, 3)
    assert built["pretrain_w2v1"].lr == 0.25
    assert (built["pretrain_w2v2"].lr, built["pretrain_w2v2"].training_step) == (0.125, 7)
    assert built["pretrain_w2v2"].clusterpath == "runs:/x/y"
    assert built["finetune"].pretrained_path == "runs:/x/y"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (PtaptMethodConfig(phase2_warmup_step=500),
         "phase2_warmup_step=500 must be between 0 and phase2_training_step=100"),
        (PtaptMethodConfig(phase1_lr=float("nan")), "phase1_lr=nan must be a finite number > 0"),
        (PtaptMethodConfig(lr=float("inf")), "lr=inf must be a finite number > 0"),
        (PtaptMethodConfig(num_clusters=(1, 8)), "num_clusters=(1, 8) must list"),
        (TaptMethodConfig(tapt_batch_size=0), "tapt_batch_size=0 must be an integer >= 1"),
        (PtaptMethodConfig(precision="fp8"), "precision='fp8' is not one of: 32, 16-mixed"),
        (PtaptMethodConfig(devices="two"), "devices='two' is not a device count"),
        (SearchConfig(method="ptapt", phase2_lr=-1.0), "phase2_lr=-1.0 must be"),
        (SearchConfig(lr_min=1.0, lr_max=0.1), "lr_min=1.0 must be <= lr_max=0.1"),
        (SearchConfig(sampler="grid"), "sampler='grid' is not one of: tpe, random"),
        (SearchConfig(devices="2"), "devices='2' must be 1: a trial runs in its worker's"),
    ],
)  # fmt: skip
def test_method_checks_name_the_parameter_the_user_typed(config: object, message: str) -> None:
    with pytest.raises(checks.ConfigError) as caught:
        config.check()  # type: ignore[attr-defined]
    assert str(caught.value).startswith(message)


def test_stage_checks_take_every_default_and_refuse_bad_values() -> None:
    for stage in STAGES.values():
        values = {"pretrained_path": "x", "clusterpath": "x"}
        names = {f.name for f in dataclasses.fields(stage.config_cls)}
        stage.check(stage.config_cls(**{k: v for k, v in values.items() if k in names}))
    with pytest.raises(checks.ConfigError, match=r"^mask_time_prob=0.0 must be in \(0, 1\]"):
        Phase2Config(clusterpath="x", mask_time_prob=0.0).check()
    with pytest.raises(checks.ConfigError, match="pretrained_path='' is empty"):
        ClusterConfig().check()


def test_help_of_every_entry_point_describes_every_parameter() -> None:
    for name, entry in ENTRY_POINTS.items():
        text = " ".join(build_parser(entry.config_cls, entry.description).format_help().split())
        for field in dataclasses.fields(entry.config_cls):
            description = field.metadata.get("help", "")
            assert description, f"{name}: {field.name} has no description"
            assert " ".join(description.split()[:4]) in text, (name, field.name)


def test_a_bad_last_stage_parameter_stops_a_method_before_its_first_stage(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "entrypoints" / "ptapt.py"), "--phase2_warmup_step", "-5",
         "--datadir", str(tmp_path / "none"), "--output_root", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: ptapt: phase2_warmup_step=-5 must be between 0 and "
                     "phase2_training_step=100"]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run, no output, no database
