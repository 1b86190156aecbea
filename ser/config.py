"""Typed configuration: one dataclass per job, the only source of defaults.

The command line (``ser.cli``), the MLproject file and the Optuna search space all read their
defaults from these classes, so a default changed here changes everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
