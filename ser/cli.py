"""Command lines built from the config dataclasses, so flags and defaults never drift apart.

Every flag is a config field (``--output_dir``), its default is the field's default, and its type
is the field's type. The console scripts in pyproject.toml and the thin scripts in
``entrypoints/`` (which MLproject runs) both call the ``*_main`` functions here.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ser.config import (
    STAGE_ENTRY_POINTS,
    CompareConfig,
    DemoCorpusConfig,
    MethodConfig,
    PredictConfig,
    PrepareEmoboxConfig,
    PrepareIemocapConfig,
    ProbeMethodConfig,
    PtaptMethodConfig,
    SearchConfig,
    TaptMethodConfig,
)
from ser.errors import SerInputError
from ser.recipes import resolve as resolve_recipe

ConfigT = TypeVar("ConfigT")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE | _FALSE:
        return value in _TRUE
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_int_tuple(text: str) -> tuple[int, ...]:
    """``"64,512,4096"`` -> ``(64, 512, 4096)`` (MLflow passes lists as strings)."""
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 64,512,4096, got {text!r}"
        ) from None


def _field_parser(annotation: Any) -> Callable[[str], Any]:
    parsers: dict[Any, Callable[[str], Any]] = {
        bool: parse_bool,
        int: int,
        float: float,
        str: str,
        tuple[int, ...]: parse_int_tuple,
    }
    if annotation not in parsers:
        raise TypeError(f"no command-line parser for config type {annotation!r}")
    return parsers[annotation]


def build_parser(config_cls: type[Any], description: str) -> argparse.ArgumentParser:
    """An argparse parser with one ``--field`` per dataclass field of ``config_cls``."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        required = bool(field.metadata.get("required"))
        parser.add_argument(
            f"--{field.name}",
            type=_field_parser(hints[field.name]),
            default=None if required else default,
            required=required,
            metavar=hints[field.name].__name__ if isinstance(hints[field.name], type) else "LIST",
            help=field.metadata.get("help", ""),
        )
    return parser


def parse_config(
    config_cls: type[ConfigT], argv: Sequence[str] | None, description: str
) -> ConfigT:
    args = build_parser(config_cls, description).parse_args(argv)
    return config_cls(**vars(args))


def run_cli(job: Callable[[], object], name: str = "") -> int:
    """Run ``job``; a :class:`SerInputError` becomes one clear line naming the entry point
    ``name``, and exit status 2."""
    from ser import console

    console.configure()
    try:
        job()
    except SerInputError as err:
        print(f"error: {name + ': ' if name else ''}{err}", file=sys.stderr)
        return 2
    return 0


@dataclass(frozen=True)
class EntryPoint:
    """One MLproject entry point: its parameters (a config dataclass) and what it runs."""

    config_cls: type[Any]
    job: Callable[[Any], object]
    description: str


def _demo_corpus(config: DemoCorpusConfig) -> object:
    from ser.data.synthetic import generate_corpus

    return generate_corpus(config)


def _prepare_iemocap(config: PrepareIemocapConfig) -> object:
    from ser.data.iemocap import prepare_iemocap

    return prepare_iemocap(config)


def _prepare_emobox(config: PrepareEmoboxConfig) -> object:
    from ser.data.emobox import prepare_emobox

    return prepare_emobox(config)


def _compare(config: CompareConfig) -> object:
    from ser.compare import compare

    return compare(config)


def _predict(config: PredictConfig) -> object:
    from ser.predict import predict

    return predict(config)


def _search(config: Any) -> object:
    from ser.search import search

    return search(config)


def _stage_job(name: str) -> Callable[[Any], object]:
    def job(config: Any) -> object:
        from ser.pipelines import STAGES, execute_stage

        stage_cls = STAGES[name].config_cls
        fields = {f.name for f in dataclasses.fields(stage_cls)}
        stage_config = stage_cls(
            **{k: v for k, v in dataclasses.asdict(config).items() if k in fields}
        )
        return execute_stage(
            name, stage_config, force=config.force, register_as=getattr(config, "register_as", "")
        )

    return job


def _method_job(config: Any) -> object:
    from ser.pipelines import run_method

    return run_method(config)


ENTRY_POINTS: dict[str, EntryPoint] = {
    "demo_corpus": EntryPoint(
        DemoCorpusConfig, _demo_corpus, "Generate the built-in synthetic emotional speech corpus."
    ),
    "prepare_iemocap": EntryPoint(
        PrepareIemocapConfig,
        _prepare_iemocap,
        "Convert an IEMOCAP_full_release directory into 16 kHz wavs and session-wise label files.",
    ),
    "prepare_emobox": EntryPoint(
        PrepareEmoboxConfig,
        _prepare_emobox,
        "Convert one EmoBox corpus (its metadata and downloaded audio) into 16 kHz wavs and "
        "its folds as label files, with Val carved from Train.",
    ),
    **{
        name: EntryPoint(cls, _stage_job(name), description)
        for name, (cls, description) in STAGE_ENTRY_POINTS.items()
    },
    "vft": EntryPoint(MethodConfig, _method_job, "V-FT: fine-tune wav2vec 2.0."),
    "tapt": EntryPoint(
        TaptMethodConfig, _method_job, "TAPT: continued pretraining, then fine-tuning."
    ),
    "ptapt": EntryPoint(
        PtaptMethodConfig,
        _method_job,
        "P-TAPT: wav2vec 1.0 emotion model, k-means pseudo-labels, wav2vec 2.0, fine-tuning.",
    ),
    "probe": EntryPoint(
        ProbeMethodConfig,
        _method_job,
        "Probe: a softmax-weighted sum of the frozen backbone's layers into a linear classifier.",
    ),
    "compare": EntryPoint(CompareConfig, _compare, "Compare finished method runs."),
    "predict": EntryPoint(
        PredictConfig,
        _predict,
        "Label every audio file of a folder, .csv or wav.scp with a fine-tuned model.",
    ),
    "search": EntryPoint(
        SearchConfig,
        _search,
        "Optuna search over a method's fine-tuning lr, batch size (and P-TAPT's cluster counts) "
        "on validation UA, every trial a nested MLflow run.",
    ),
}


def entry_main(name: str, argv: Sequence[str] | None = None) -> int:
    """Parse the entry point's parameters and run it; input errors exit 2 with one line."""
    entry = ENTRY_POINTS[name]
    parsed = parse_config(entry.config_cls, argv, entry.description)

    def job() -> object:
        config = resolve_recipe(parsed)
        config.check()  # every value, before any import of the heavy machinery or any work
        _check_machine(config)
        _join_or_launch(config, name, argv)
        try:
            from ser.data.default_corpus import ensure_data

            ensure_data(config, name)
            return entry.job(config)
        finally:
            from ser import distributed

            distributed.stop()

    return run_cli(job, name)


def _check_machine(config: Any) -> None:
    """The values only this machine can judge (devices are checked as processes start)."""
    if hasattr(config, "num_workers"):
        from ser import cores

        cores.check_workers(config.num_workers)


def _join_or_launch(config: Any, name: str, argv: Sequence[str] | None) -> None:
    """Hand over to torchrun when ``devices`` asks for several processes and no launcher
    started this one; else join the launcher's process group (a no-op for one process)."""
    from ser import distributed

    accelerator = getattr(config, "accelerator", "cpu")
    if hasattr(config, "devices") and distributed.cluster_environment() is None:
        processes = distributed.requested_processes(accelerator, config.devices)
        if processes > 1:
            args = list(sys.argv[1:] if argv is None else argv)
            command = distributed.relaunch_command(processes, [_script(name), *args])
            os.environ.update(distributed.relaunch_environment(
                config.devices, processes, getattr(config, "num_workers", -1)))
            logging.getLogger(__name__).info(
                "%s: devices=%s: starting %d processes with torchrun", name, config.devices,
                processes,
            )
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(command[0], command)
    distributed.start(accelerator, getattr(config, "num_workers", -1))


def _script(name: str) -> str:
    """This entry point's script, which every rank runs."""
    return str(Path(__file__).resolve().parents[1] / "entrypoints" / f"{name}.py")


def demo_corpus_main(argv: Sequence[str] | None = None) -> int:
    return entry_main("demo_corpus", argv)


def prepare_iemocap_main(argv: Sequence[str] | None = None) -> int:
    return entry_main("prepare_iemocap", argv)


def prepare_emobox_main(argv: Sequence[str] | None = None) -> int:
    return entry_main("prepare_emobox", argv)


def predict_main(argv: Sequence[str] | None = None) -> int:
    return entry_main("predict", argv)
