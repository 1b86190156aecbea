"""The first command works: the demo corpus is built where the default data paths point.

A new user's first command is ``mlflow run . -e ptapt`` with no parameters. Its ``datadir`` and
``labeldir`` default to the demo corpus (``data/demo``); when that is missing, it is built there
(a few seconds) rather than refused. Data folders the user named are never made up: a missing
one is refused before any work, with the entry point that makes it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ser import distributed
from ser.config import DataConfig, DemoCorpusConfig
from ser.data.synthetic import AUDIO_SUBDIR, LABEL_SUBDIR, METADATA_NAME, generate_corpus
from ser.errors import SerInputError

log = logging.getLogger(__name__)


def ensure_data(config: Any, entry_point: str) -> None:
    """Build the demo corpus when ``config`` reads the default data paths and they are missing;
    refuse a missing data folder the user chose. Rank 0 builds; the other ranks wait."""
    if not hasattr(config, "datadir"):
        return
    if _uses_defaults(config):
        if distributed.is_zero() and not _complete(Path(config.datadir), Path(config.labeldir)):
            build_default_corpus(entry_point)
        distributed.barrier()
        return
    _require_folder(Path(config.datadir), "datadir", entry_point)
    if not config.labelpath:
        _require_folder(Path(config.labeldir), "labeldir", entry_point)


def build_default_corpus(entry_point: str) -> Path:
    """The demo corpus with its default settings, where ``DataConfig``'s defaults point."""
    defaults = DataConfig()
    root = Path(defaults.datadir).parent
    log.info("%s: no datadir given and %s is missing: building the demo corpus there (a few "
             "seconds; `mlflow run . -e demo_corpus` builds it explicitly)", entry_point, root)
    generate_corpus(DemoCorpusConfig(output_dir=str(root)))
    return root


def _uses_defaults(config: Any) -> bool:
    defaults = DataConfig()
    return (config.datadir == defaults.datadir and config.labeldir == defaults.labeldir
            and not config.labelpath)  # fmt: skip


def _complete(datadir: Path, labeldir: Path) -> bool:
    # The corpus record is written last, so its presence means every file is there.
    return datadir.is_dir() and labeldir.is_dir() and (datadir.parent / METADATA_NAME).is_file()


def _require_folder(path: Path, parameter: str, entry_point: str) -> None:
    if path.is_dir():
        return
    what = AUDIO_SUBDIR if parameter == "datadir" else LABEL_SUBDIR
    raise SerInputError(
        f"{parameter}={str(path)!r} is not a directory. Make it first: `mlflow run . -e "
        f"demo_corpus -P output_dir=<folder>` writes the synthetic corpus (<folder>/{what}), "
        f"`mlflow run . -e prepare_iemocap` converts IEMOCAP; or leave datadir and labeldir "
        f"unset and {entry_point} builds the demo corpus in data/demo"
    )
