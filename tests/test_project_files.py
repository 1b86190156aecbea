"""The files that tie the project together agree with the configs (one source of defaults)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from ser import cli, mlproject
from ser.config import DemoCorpusConfig, PrepareIemocapConfig
from ser.errors import SerInputError

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the project itself runs on 3.10


def test_mlproject_is_generated_from_configs() -> None:
    assert (ROOT / "MLproject").read_text() == mlproject.render(), (
        "MLproject is stale: run `python -m ser.mlproject`"
    )


def test_mlproject_defaults_match_config_defaults() -> None:
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    for name, config_cls in mlproject.ENTRY_POINTS.items():
        params = spec["entry_points"][name]["parameters"]
        assert (ROOT / "entrypoints" / f"{name}.py").is_file()
        for field in dataclasses.fields(config_cls):
            if field.metadata.get("required"):
                assert params[field.name] == "string"
            else:
                assert params[field.name]["default"] == mlproject._default_text(field.default)


def test_conda_env_lists_the_same_dependencies_as_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    listed = [d for d in pip_deps if not d.startswith("-")]
    assert listed == project["dependencies"]
    assert "torch==2.13.0" in listed


def test_ci_runs_the_readme_test_command() -> None:
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert "make test" in (ROOT / "README.md").read_text()


def test_cli_defaults_and_types_come_from_config() -> None:
    config = cli.parse_config(DemoCorpusConfig, [], "x")
    assert config == DemoCorpusConfig()
    config = cli.parse_config(DemoCorpusConfig, ["--num_speakers", "5", "--min_seconds", "2"], "x")
    assert config.num_speakers == 5 and config.min_seconds == 2.0


def test_cli_required_fields(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.parse_config(PrepareIemocapConfig, ["--output_dir", "x"], "x")
    assert "--iemocap_dir" in capsys.readouterr().err


def test_cli_value_parsers() -> None:
    assert cli.parse_bool("True") is True and cli.parse_bool("off") is False
    assert cli.parse_int_tuple("64, 512,4096") == (64, 512, 4096)
    with pytest.raises(Exception, match="true or false"):
        cli.parse_bool("maybe")
    with pytest.raises(Exception, match="comma-separated integers"):
        cli.parse_int_tuple("64,lots")


def test_run_cli_turns_input_errors_into_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def bad() -> None:
        raise SerInputError("label file x.json: 'Train' is empty")

    assert cli.run_cli(bad) == 2
    assert capsys.readouterr().err.strip() == "error: label file x.json: 'Train' is empty"
    assert cli.run_cli(lambda: None) == 0
