"""The built-in demo corpus: synthetic emotional speech, generated here, no download needed.

Utterances are made by source-filter synthesis. A glottal pulse train (Rosenberg pulse shape,
with jitter, shimmer, aspiration noise and a spectral-tilt filter) at a time-varying F0 excites a
cascade of five formant resonators that move between vowel targets; fricative-like filtered
noise, pauses and a little background noise complete the signal. Speakers alternate between
female-like and male-like voices (pitch and vocal-tract length differ). The four classes differ
the way acted emotion does (pitch level, range and contour, speaking rate, loudness and its
variation, voice quality), and every parameter is drawn per utterance from distributions that
overlap the neighbouring classes, so the task is learnable but not trivial.

Everything is deterministic from the seed: each speaker and each utterance has its own generator
seeded by (seed, speaker, class, index), so a file does not depend on the generation order.

Output (``OUT`` = ``config.output_dir``)::

    OUT/Audio_16k/spk01_anger_000.wav ...      16 kHz mono PCM_16
    OUT/labels/fold_<k>.json                   leave speaker k out: Test = k, Val = next speaker
    OUT/metadata.json                          config, and per file the parameters drawn

With ``config.iemocap_layout_dir``, the same utterances (plus a few whose IEMOCAP labels the
preparation must drop) are also written in the IEMOCAP_full_release layout.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import signal
from tqdm.auto import tqdm

from ser.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from ser.audio import write_wav
from ser.config import EMOTIONS_4, SAMPLE_RATE, DemoCorpusConfig
from ser.data.labels import write_label_file
from ser.errors import SerInputError

logger = logging.getLogger(__name__)

# Bump when the synthesis changes: a corpus made by another version is not "the same corpus".
GENERATOR_VERSION = 1
AUDIO_SUBDIR = "Audio_16k"
LABEL_SUBDIR = "labels"
METADATA_NAME = "metadata.json"
LAYOUT_MARKER = "demo_corpus.json"
MIN_SECONDS_FLOOR = 0.5  # shorter clips hold no full syllable
MAX_SECONDS_CEIL = 60.0
MAX_SPEAKERS = 99  # two-digit speaker and session numbers

_HOP = 80  # 5 ms control frames: F0, formants and loudness are set per frame
_PEAK_LIMIT = 0.5  # -6 dBFS: well below clipping
_NOMINAL_RMS_DB = -30.0  # speech level of a neutral utterance, dBFS

Range = tuple[float, float]  # (mean, standard deviation) of a normal draw


@dataclass(frozen=True)
class _Profile:
    """How one emotion shapes speech; every entry is drawn per utterance, so classes overlap."""

    pitch_shift_st: Range  # mean F0 relative to the speaker's neutral, semitones
    accent_st: Range  # size of pitch accents, semitones
    accent_prob: float  # share of syllables that carry an accent
    accent_shapes: Mapping[str, float]  # contour of an accent: fall, rise, risefall
    declination_st: Range  # F0 drop from the start to the end of the utterance
    rate_sps: Range  # syllables per second
    pause_prob: float  # chance of a pause after a word
    pause_s: tuple[float, float]  # pause length range, seconds
    level_db: Range  # loudness relative to neutral
    level_var_db: Range  # syllable-to-syllable loudness variation
    jitter: Range  # relative period perturbation
    shimmer: Range  # relative amplitude perturbation
    breathiness: Range  # aspiration noise relative to the pulses
    tilt: Range  # one-pole low-pass coefficient: larger = steeper spectral tilt
    closing_quotient: Range  # share of the period in which the glottis closes
    centralisation: Range  # vowel reduction towards schwa (0 none, 1 full)
    f1_scale: Range  # jaw opening


_PROFILES: dict[str, _Profile] = {
    "anger": _Profile(
        pitch_shift_st=(3.5, 1.6),
        accent_st=(4.5, 1.5),
        accent_prob=0.6,
        accent_shapes={"fall": 0.65, "risefall": 0.25, "rise": 0.10},
        declination_st=(3.0, 1.0),
        rate_sps=(4.9, 0.6),
        pause_prob=0.25,
        pause_s=(0.06, 0.2),
        level_db=(5.0, 2.0),
        level_var_db=(3.5, 1.0),
        jitter=(0.018, 0.005),
        shimmer=(0.10, 0.03),
        breathiness=(0.08, 0.04),
        tilt=(0.25, 0.10),
        closing_quotient=(0.09, 0.02),
        centralisation=(0.1, 0.05),
        f1_scale=(1.10, 0.04),
    ),
    "happy": _Profile(
        pitch_shift_st=(4.0, 1.6),
        accent_st=(5.0, 1.5),
        accent_prob=0.6,
        accent_shapes={"rise": 0.6, "risefall": 0.3, "fall": 0.1},
        declination_st=(0.5, 1.2),
        rate_sps=(4.8, 0.6),
        pause_prob=0.25,
        pause_s=(0.06, 0.2),
        level_db=(3.0, 2.0),
        level_var_db=(3.0, 1.0),
        jitter=(0.010, 0.004),
        shimmer=(0.06, 0.02),
        breathiness=(0.15, 0.06),
        tilt=(0.40, 0.10),
        closing_quotient=(0.13, 0.03),
        centralisation=(0.1, 0.05),
        f1_scale=(1.06, 0.04),
    ),
    "neutral": _Profile(
        pitch_shift_st=(0.0, 1.3),
        accent_st=(2.2, 0.8),
        accent_prob=0.4,
        accent_shapes={"risefall": 0.6, "fall": 0.3, "rise": 0.1},
        declination_st=(2.0, 0.8),
        rate_sps=(4.2, 0.5),
        pause_prob=0.3,
        pause_s=(0.08, 0.25),
        level_db=(0.0, 2.0),
        level_var_db=(2.0, 0.7),
        jitter=(0.008, 0.003),
        shimmer=(0.05, 0.02),
        breathiness=(0.15, 0.06),
        tilt=(0.50, 0.10),
        closing_quotient=(0.16, 0.03),
        centralisation=(0.2, 0.08),
        f1_scale=(1.0, 0.04),
    ),
    "sad": _Profile(
        pitch_shift_st=(-1.5, 1.1),
        accent_st=(1.2, 0.5),
        accent_prob=0.3,
        accent_shapes={"fall": 0.7, "risefall": 0.3, "rise": 0.0},
        declination_st=(2.5, 1.0),
        rate_sps=(3.3, 0.5),
        pause_prob=0.45,
        pause_s=(0.15, 0.4),
        level_db=(-4.0, 2.0),
        level_var_db=(1.5, 0.5),
        jitter=(0.014, 0.004),
        shimmer=(0.08, 0.03),
        breathiness=(0.35, 0.10),
        tilt=(0.65, 0.08),
        closing_quotient=(0.22, 0.04),
        centralisation=(0.4, 0.1),
        f1_scale=(0.95, 0.04),
    ),
}

# Adult male vowel formants F1-F3 (Hz), after Peterson & Barney; F4, F5 fixed.
_VOWELS = np.array(
    [
        [270, 2290, 3010],  # i
        [530, 1840, 2480],  # e
        [660, 1720, 2410],  # ae
        [730, 1090, 2440],  # a
        [570, 840, 2410],  # o
        [300, 870, 2240],  # u
        [640, 1190, 2390],  # uh
    ],
    dtype=float,
)
_SCHWA = np.array([500.0, 1500.0, 2500.0])
_HIGH_FORMANTS = np.array([3300.0, 4200.0])
_BANDWIDTHS = np.array([70.0, 100.0, 130.0, 200.0, 260.0])
# Fricative noise bands (Hz): s-like, sh-like, f-like.
_FRICATIVE_BANDS = ((4000.0, 7500.0), (2200.0, 5000.0), (1200.0, 7200.0))


@dataclass(frozen=True)
class DemoCorpus:
    """What :func:`generate_corpus` wrote (or found already written)."""

    output_dir: Path
    audio_dir: Path
    label_dir: Path
    metadata_path: Path
    label_files: tuple[Path, ...]
    num_files: int
    classes: tuple[str, ...]
    speakers: tuple[str, ...]
    iemocap_layout_dir: Path | None


@dataclass(frozen=True)
class _Speaker:
    name: str
    gender: str  # "F" or "M"
    f0_hz: float  # neutral speaking pitch
    vtl_scale: float  # formant scaling: shorter vocal tract -> higher formants
    expressiveness: float  # how strongly this speaker's emotions depart from neutral
    rate_offset: float  # syllables per second
    level_offset_db: float
    breathiness_offset: float


@dataclass(frozen=True)
class _Syllable:
    start: float  # seconds; the unvoiced (fricative) onset runs from start to voice_start
    voice_start: float
    end: float
    vowel: int  # row of _VOWELS
    fricative: int  # row of _FRICATIVE_BANDS
    gain_db: float
    accent: str  # a key of _ACCENT_SHAPES, or "" for none
    accent_st: float


@dataclass(frozen=True)
class _Utterance:
    name: str  # file name without extension
    speaker: _Speaker
    emotion: str  # a profile name
    index: int
    key: tuple[int, ...]  # seeds this utterance's generator (with the corpus seed)


# --------------------------------------------------------------------------- public entry point


def generate_corpus(config: DemoCorpusConfig) -> DemoCorpus:
    """Write the demo corpus described by ``config`` (see the module docstring); idempotent."""
    _validate(config)
    out = Path(config.output_dir)
    layout = Path(config.iemocap_layout_dir) if config.iemocap_layout_dir else None
    out_done = _existing_state(out, out / METADATA_NAME, config, {AUDIO_SUBDIR, LABEL_SUBDIR})
    layout_done = layout is None or _existing_state(
        layout, layout / LAYOUT_MARKER, config, _session_dirs(config.num_speakers)
    )
    if out_done and layout_done:
        logger.info("demo corpus already in %s; nothing to do", out)
        return _describe(config)
    speakers = [_draw_speaker(config.seed, i) for i in range(config.num_speakers)]
    if out_done:
        logger.info("demo corpus already in %s; writing only the IEMOCAP layout", out)
    else:
        _write_corpus(config, speakers)
    if layout is not None and not layout_done:
        _write_iemocap_layout(config, speakers, layout)
    return _describe(config)


# --------------------------------------------------------------------------- validation


def _validate(config: DemoCorpusConfig) -> None:
    """Check every field before any work, so a bad value fails at once with its name."""
    if not isinstance(config.output_dir, str) or not config.output_dir.strip():
        raise SerInputError("output_dir must be a non-empty path for the demo corpus")
    _require_int(
        "num_speakers",
        config.num_speakers,
        3,
        MAX_SPEAKERS,
        "leave-one-speaker-out folds need a test, a validation and a training speaker",
    )
    _require_int("utterances_per_class", config.utterances_per_class, 1, 10_000, "")
    _require_int("seed", config.seed, 0, 2**63 - 1, "")
    low, high = config.min_seconds, config.max_seconds
    _require_real("min_seconds", low, MIN_SECONDS_FLOOR, MAX_SECONDS_CEIL)
    _require_real("max_seconds", high, MIN_SECONDS_FLOOR, MAX_SECONDS_CEIL)
    if low > high:
        raise SerInputError(
            f"min_seconds ({low}) is larger than max_seconds ({high}); "
            "choose 0 < min_seconds <= max_seconds"
        )
    if not isinstance(config.iemocap_layout_dir, str):
        raise SerInputError("iemocap_layout_dir must be a path or the empty string (no layout)")
    if config.iemocap_layout_dir:
        a, b = Path(config.output_dir).resolve(), Path(config.iemocap_layout_dir).resolve()
        if a == b or a in b.parents or b in a.parents:
            raise SerInputError(
                f"iemocap_layout_dir ({config.iemocap_layout_dir}) must lie outside output_dir "
                f"({config.output_dir}) and not contain it; choose separate folders"
            )


def _require_int(name: str, value: object, low: int, high: int, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SerInputError(f"{name} must be a whole number, got {value!r}")
    if not low <= int(value) <= high:
        reason = f" ({why})" if why else ""
        raise SerInputError(f"{name} must be between {low} and {high}{reason}; got {value}")


def _require_real(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SerInputError(f"{name} must be a number of seconds, got {value!r}")
    if not (math.isfinite(float(value)) and low <= float(value) <= high):
        raise SerInputError(f"{name} must be between {low} and {high} seconds; got {value}")


# --------------------------------------------------------------------------- idempotence


def _identity(config: DemoCorpusConfig) -> dict[str, Any]:
    """The fields that decide the audio and labels (not where they are written)."""
    return {
        "generator_version": GENERATOR_VERSION,
        "num_speakers": int(config.num_speakers),
        "utterances_per_class": int(config.utterances_per_class),
        "min_seconds": float(config.min_seconds),
        "max_seconds": float(config.max_seconds),
        "seed": int(config.seed),
    }


def _existing_state(
    folder: Path, marker: Path, config: DemoCorpusConfig, own_entries: set[str]
) -> bool:
    """True if ``folder`` holds a complete corpus of this config; False if it may be written.

    Raises SerInputError for a corpus of another config or a folder holding other things.
    """
    if folder.exists() and not folder.is_dir():
        raise SerInputError(f"{folder} exists and is not a folder; choose another output folder")
    if marker.is_file():
        record = _read_json(marker)
        if record.get("identity") != _identity(config):
            raise SerInputError(
                f"{folder} already holds a demo corpus generated with another configuration "
                f"({record.get('identity')}, now {_identity(config)}); choose another output "
                "folder or delete it"
            )
        return all((folder / rel).is_file() for rel in record.get("files", []))
    if folder.is_dir():
        # Temporary files of an interrupted atomic write are ours too.
        foreign = sorted(
            p.name
            for p in folder.iterdir()
            if p.name not in own_entries and not (p.name.startswith(".") and p.suffix == ".tmp")
        )
        if foreign:
            raise SerInputError(
                f"{folder} is not empty ({', '.join(foreign[:5])}) and holds no demo corpus; "
                "choose another output folder or delete it"
            )
    return False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SerInputError(
            f"{path} is not a readable demo-corpus record ({err}); delete the folder and rerun"
        ) from err
    if not isinstance(data, dict):
        raise SerInputError(f"{path} is not a demo-corpus record; delete the folder and rerun")
    return data


def _describe(config: DemoCorpusConfig) -> DemoCorpus:
    out = Path(config.output_dir)
    speakers = tuple(_speaker_name(i) for i in range(config.num_speakers))
    return DemoCorpus(
        output_dir=out,
        audio_dir=out / AUDIO_SUBDIR,
        label_dir=out / LABEL_SUBDIR,
        metadata_path=out / METADATA_NAME,
        label_files=tuple(out / LABEL_SUBDIR / f"fold_{k + 1}.json" for k in range(len(speakers))),
        num_files=len(speakers) * len(EMOTIONS_4) * int(config.utterances_per_class),
        classes=tuple(EMOTIONS_4),
        speakers=speakers,
        iemocap_layout_dir=Path(config.iemocap_layout_dir) if config.iemocap_layout_dir else None,
    )


# --------------------------------------------------------------------------- the corpus


def _speaker_name(index: int) -> str:
    return f"spk{index + 1:02d}"


def _utterances(config: DemoCorpusConfig, speakers: list[_Speaker]) -> list[_Utterance]:
    return [
        _Utterance(f"{spk.name}_{emotion}_{i:03d}", spk, emotion, i, (1, n, c, i))
        for n, spk in enumerate(speakers)
        for c, emotion in enumerate(EMOTIONS_4)
        for i in range(int(config.utterances_per_class))
    ]


def _write_corpus(config: DemoCorpusConfig, speakers: list[_Speaker]) -> None:
    out = Path(config.output_dir)
    audio_dir = out / AUDIO_SUBDIR
    files: dict[str, dict[str, Any]] = {}
    total_seconds = 0.0
    for utt in tqdm(_utterances(config, speakers), desc="demo corpus", unit="utt"):
        wav, params = _synthesize_utterance(config, utt)
        write_wav(audio_dir / f"{utt.name}.wav", wav)
        files[f"{utt.name}.wav"] = params
        total_seconds += params["duration"]
    label_files = _write_label_files(out / LABEL_SUBDIR, files, [s.name for s in speakers])
    metadata = {
        "identity": _identity(config),
        "config": asdict(config),
        "sample_rate": SAMPLE_RATE,
        "classes": list(EMOTIONS_4),
        "speakers": {s.name: asdict(s) for s in speakers},
        "utterances": files,
        # Everything written, relative to OUT: all must exist for the corpus to be complete.
        "files": [f"{AUDIO_SUBDIR}/{name}" for name in files]
        + [f"{LABEL_SUBDIR}/{p.name}" for p in label_files],
    }
    atomic_write_json(out / METADATA_NAME, metadata)  # last: its presence marks completion
    logger.info(
        "wrote demo corpus: %d utterances (%.0f s of audio) of %d speakers x %d classes to %s, "
        "%d leave-one-speaker-out folds in %s",
        len(files),
        total_seconds,
        len(speakers),
        len(EMOTIONS_4),
        audio_dir,
        len(label_files),
        out / LABEL_SUBDIR,
    )


def _write_label_files(
    label_dir: Path, files: Mapping[str, Mapping[str, Any]], speakers: list[str]
) -> list[Path]:
    """Fold k: Test = speaker k, Val = the next speaker (cyclically), Train = the rest."""
    written = []
    for k, test_speaker in enumerate(speakers):
        val_speaker = speakers[(k + 1) % len(speakers)]
        splits: dict[str, dict[str, str]] = {"Train": {}, "Val": {}, "Test": {}}
        for name, params in files.items():
            split = {test_speaker: "Test", val_speaker: "Val"}.get(params["speaker"], "Train")
            splits[split][name] = params["label"]
        path = label_dir / f"fold_{k + 1}.json"
        write_label_file(path, splits)
        written.append(path)
    return written


# --------------------------------------------------------------------------- drawing parameters


def _draw_speaker(seed: int, index: int) -> _Speaker:
    rng = np.random.default_rng([int(seed), 0, index])
    female = index % 2 == 0
    return _Speaker(
        name=_speaker_name(index),
        gender="F" if female else "M",
        f0_hz=float(rng.uniform(185, 235) if female else rng.uniform(100, 135)),
        vtl_scale=float(rng.uniform(1.12, 1.22) if female else rng.uniform(0.95, 1.05)),
        expressiveness=float(rng.uniform(0.75, 1.25)),
        rate_offset=float(rng.normal(0.0, 0.3)),
        level_offset_db=float(rng.normal(0.0, 1.5)),
        breathiness_offset=float(rng.uniform(0.0, 0.08) if female else rng.uniform(-0.04, 0.04)),
    )


def _draw_length(rng: np.random.Generator, config: DemoCorpusConfig) -> int:
    """Samples in the utterance: uniform in seconds, rounded inside the bounds."""
    seconds = float(rng.uniform(config.min_seconds, config.max_seconds))
    low = math.ceil(config.min_seconds * SAMPLE_RATE)
    high = math.floor(config.max_seconds * SAMPLE_RATE)
    return int(np.clip(round(seconds * SAMPLE_RATE), low, high))


def _draw(rng: np.random.Generator, spec: Range, low: float, high: float) -> float:
    return float(np.clip(rng.normal(spec[0], spec[1]), low, high))


def _draw_expressive(
    rng: np.random.Generator, spec: Range, neutral: Range, speaker: _Speaker
) -> float:
    """Draw a parameter whose distance from neutral scales with the speaker's expressiveness."""
    mean = neutral[0] + speaker.expressiveness * (spec[0] - neutral[0])
    return float(rng.normal(mean, spec[1]))


def _draw_parameters(rng: np.random.Generator, utt: _Utterance) -> dict[str, Any]:
    prof, neu, spk = _PROFILES[utt.emotion], _PROFILES["neutral"], utt.speaker
    return {
        "pitch_shift_st": _draw_expressive(rng, prof.pitch_shift_st, neu.pitch_shift_st, spk),
        "accent_st": max(0.3, _draw_expressive(rng, prof.accent_st, neu.accent_st, spk)),
        "declination_st": _draw(rng, prof.declination_st, -2.0, 6.0),
        "rate_sps": max(1.5, _draw(rng, prof.rate_sps, 2.2, 7.0) + spk.rate_offset),
        "level_db": _draw_expressive(rng, prof.level_db, neu.level_db, spk) + spk.level_offset_db,
        "level_var_db": _draw(rng, prof.level_var_db, 0.3, 8.0),
        "jitter": _draw(rng, prof.jitter, 0.002, 0.05),
        "shimmer": _draw(rng, prof.shimmer, 0.01, 0.3),
        "breathiness": max(0.0, _draw(rng, prof.breathiness, 0.01, 0.8) + spk.breathiness_offset),
        "tilt": _draw(rng, prof.tilt, 0.05, 0.9),
        "closing_quotient": _draw(rng, prof.closing_quotient, 0.04, 0.35),
        "centralisation": _draw(rng, prof.centralisation, 0.0, 0.8),
        "f1_scale": _draw(rng, prof.f1_scale, 0.8, 1.3),
    }


# --------------------------------------------------------------------------- synthesis


def _synthesize_utterance(
    config: DemoCorpusConfig, utt: _Utterance
) -> tuple[np.ndarray, dict[str, Any]]:
    """One utterance (float32 waveform) and the parameters drawn for it."""
    rng = np.random.default_rng([int(config.seed), *utt.key])
    n = _draw_length(rng, config)
    params = _draw_parameters(rng, utt)
    wav, summary = _synthesize(rng, utt, params, n)
    record = {
        "speaker": utt.speaker.name,
        "gender": utt.speaker.gender,
        "label": utt.emotion,
        "index": utt.index,
        "duration": n / SAMPLE_RATE,
    }
    return wav, record | {k: round(float(v), 6) for k, v in (params | summary).items()}


def _synthesize(
    rng: np.random.Generator, utt: _Utterance, params: Mapping[str, float], n: int
) -> tuple[np.ndarray, dict[str, float]]:
    plan = _plan_syllables(rng, _PROFILES[utt.emotion], params, n)
    frames = math.ceil(n / _HOP)
    f0_frames = _f0_contour(rng, utt, params, plan, frames)
    envelope, voiced = _envelopes(plan, frames)
    f0 = _frames_to_samples(f0_frames, n)
    source = _glottal_source(rng, f0, params, n) * _frames_to_samples(envelope * voiced, n)
    source = signal.lfilter([1.0 - params["tilt"]], [1.0, -params["tilt"]], source)
    speech = _vocal_tract(source, _formant_tracks(rng, utt.speaker, params, plan, frames))
    speech += _fricatives(rng, plan, envelope, speech, n)
    active = _frames_to_samples((envelope > 0).astype(float), n) > 0
    wav = _calibrate(rng, speech, active, params["level_db"])
    voiced_f0 = f0_frames[voiced > 0.5]
    summary = {
        "f0_mean_hz": float(np.mean(voiced_f0)) if voiced_f0.size else 0.0,
        "voiced_fraction": float(np.mean(voiced > 0.5)),
        "num_syllables": float(len(plan)),
    }
    return wav, summary


def _plan_syllables(
    rng: np.random.Generator, prof: _Profile, params: Mapping[str, float], n: int
) -> list[_Syllable]:
    """Syllables (with an unvoiced onset in 40 % of them) in words, and pauses between words."""
    total = n / SAMPLE_RATE
    t = float(rng.uniform(0.05, 0.2))
    end = total - float(rng.uniform(0.05, 0.2))
    shapes, weights = list(prof.accent_shapes), np.array(list(prof.accent_shapes.values()))
    plan: list[_Syllable] = []
    while end - t > 0.08:
        for _ in range(int(rng.integers(1, 4))):  # a word of one to three syllables
            length = min(float(rng.lognormal(0.0, 0.2)) / params["rate_sps"], end - t)
            if length < 0.08:
                break
            onset = length * float(rng.uniform(0.2, 0.4)) if rng.random() < 0.4 else 0.0
            accented = rng.random() < prof.accent_prob
            plan.append(
                _Syllable(
                    start=t,
                    voice_start=t + onset,
                    end=t + length,
                    vowel=int(rng.integers(len(_VOWELS))),
                    fricative=int(rng.integers(len(_FRICATIVE_BANDS))),
                    gain_db=float(rng.normal(0.0, params["level_var_db"])),
                    accent=str(rng.choice(shapes, p=weights / weights.sum())) if accented else "",
                    accent_st=float(params["accent_st"] * rng.lognormal(0.0, 0.25)),
                )
            )
            t += length
        t += float(rng.uniform(*prof.pause_s)) if rng.random() < prof.pause_prob else 0.02
    return plan


def _frame_times(frames: int) -> np.ndarray:
    return (np.arange(frames) + 0.5) * _HOP / SAMPLE_RATE


def _f0_contour(
    rng: np.random.Generator,
    utt: _Utterance,
    params: Mapping[str, float],
    plan: list[_Syllable],
    frames: int,
) -> np.ndarray:
    """F0 per frame (Hz): level and declination, accents per syllable, slow drift, smoothed."""
    times = _frame_times(frames)
    span = max(plan[-1].end - plan[0].start, 1e-3) if plan else 1.0
    start = plan[0].start if plan else 0.0
    st = params["pitch_shift_st"] + params["declination_st"] * (0.5 - (times - start) / span)
    for syl in plan:
        inside = (times >= syl.voice_start) & (times < syl.end)
        u = (times[inside] - syl.voice_start) / max(syl.end - syl.voice_start, 1e-3)
        st[inside] += _ACCENT_SHAPES.get(syl.accent, _no_accent)(u) * syl.accent_st
    drift = np.cumsum(rng.normal(0.0, 0.08, frames))
    st += drift - np.linspace(drift[0], drift[-1], frames)
    st = np.convolve(np.pad(st, 4, mode="edge"), np.ones(9) / 9, mode="valid")
    return np.clip(utt.speaker.f0_hz * 2.0 ** (st / 12.0), 60.0, 450.0)


def _no_accent(u: np.ndarray) -> np.ndarray:
    return np.zeros_like(u)


_ACCENT_SHAPES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "fall": lambda u: 1.0 - 1.3 * u,  # starts high, ends below the line
    "rise": lambda u: -0.3 + 1.3 * u,
    "risefall": lambda u: np.sin(np.pi * u),
}


def _envelopes(plan: list[_Syllable], frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame loudness (linear) over whole syllables, and the voiced (vowel) mask."""
    times = _frame_times(frames)
    envelope = np.zeros(frames)
    voiced = np.zeros(frames)
    for syl in plan:
        inside = (times >= syl.start) & (times < syl.end)
        attack, release = times[inside] - syl.start, syl.end - times[inside]
        ramp = np.minimum(attack / 0.025, release / 0.04)
        u = (times[inside] - syl.start) / (syl.end - syl.start)
        envelope[inside] = 10 ** (syl.gain_db / 20) * np.clip(ramp, 0, 1) * (1 - 0.3 * u)
        voiced[(times >= syl.voice_start) & (times < syl.end)] = 1.0
    return envelope, voiced


def _frames_to_samples(values: np.ndarray, n: int) -> np.ndarray:
    return np.interp(np.arange(n) / _HOP - 0.5, np.arange(len(values)), values)


def _glottal_source(
    rng: np.random.Generator, f0: np.ndarray, params: Mapping[str, float], n: int
) -> np.ndarray:
    """Rosenberg pulses (flow derivative) with jitter and shimmer, plus aspiration noise."""
    phase = np.concatenate([[0.0], np.cumsum(f0 / SAMPLE_RATE)])
    periods = np.arange(math.floor(phase[-1]) + 2)
    bounds = np.interp(periods, phase, np.arange(n + 1), right=np.nan)
    lengths = np.diff(bounds)
    lengths = np.where(np.isnan(lengths), SAMPLE_RATE / f0[-1], lengths)
    lengths *= np.clip(1.0 + params["jitter"] * rng.standard_normal(lengths.size), 0.7, 1.3)
    starts = np.concatenate([[0.0], np.cumsum(lengths)])
    t = np.arange(n, dtype=float)
    k = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, lengths.size - 1)
    frac = np.clip((t - starts[k]) / lengths[k], 0.0, 1.0)
    amp = np.clip(1.0 + params["shimmer"] * rng.standard_normal(lengths.size), 0.3, 2.0)
    flow = _rosenberg(frac, 0.4, params["closing_quotient"]) * amp[k]
    pulses = np.diff(flow, prepend=0.0)
    noise = rng.standard_normal(n) * (0.4 + 0.6 * flow)  # aspiration is strongest when open
    scale = float(np.sqrt(np.mean(pulses**2))) or 1.0
    return pulses + params["breathiness"] * scale * noise


def _rosenberg(frac: np.ndarray, opening: float, closing: float) -> np.ndarray:
    rising = 0.5 * (1.0 - np.cos(np.pi * frac / opening))
    falling = np.cos(0.5 * np.pi * np.clip((frac - opening) / closing, 0.0, 1.0))
    return np.where(frac < opening, rising, np.where(frac < opening + closing, falling, 0.0))


def _formant_tracks(
    rng: np.random.Generator,
    speaker: _Speaker,
    params: Mapping[str, float],
    plan: list[_Syllable],
    frames: int,
) -> np.ndarray:
    """Five formant frequencies per frame (Hz), gliding between the syllables' vowel targets."""
    targets = _VOWELS[[syl.vowel for syl in plan]] if plan else _SCHWA[None, :]
    targets = targets + params["centralisation"] * (_SCHWA - targets)
    targets[:, 0] *= params["f1_scale"]
    targets = targets * rng.normal(1.0, 0.03, targets.shape)  # token-to-token variation
    centres = [0.5 * (s.voice_start + s.end) for s in plan] or [0.0]
    times = _frame_times(frames)
    low = np.stack([np.interp(times, centres, targets[:, i]) for i in range(3)], axis=1)
    high = np.broadcast_to(_HIGH_FORMANTS, (frames, 2))
    return np.concatenate([low, high], axis=1) * speaker.vtl_scale


def _vocal_tract(source: np.ndarray, formants: np.ndarray) -> np.ndarray:
    """Cascade of second-order resonators, coefficients updated every control frame."""
    radius = np.exp(-np.pi * _BANDWIDTHS / SAMPLE_RATE)
    theta = 2 * np.pi * np.minimum(formants, 0.45 * SAMPLE_RATE) / SAMPLE_RATE
    a1, a2 = -2 * radius * np.cos(theta), np.broadcast_to(radius**2, theta.shape)
    sos = np.zeros(theta.shape + (6,))
    sos[..., 0] = 1 + a1 + a2  # unity gain at DC, so formant moves do not change loudness
    sos[..., 3], sos[..., 4], sos[..., 5] = 1.0, a1, a2
    out = np.empty_like(source)
    state = np.zeros((formants.shape[1], 2))
    for f in range(formants.shape[0]):
        block = slice(f * _HOP, (f + 1) * _HOP)
        out[block], state = signal.sosfilt(sos[f], source[block], zi=state)
    return out


def _fricatives(
    rng: np.random.Generator,
    plan: list[_Syllable],
    envelope: np.ndarray,
    speech: np.ndarray,
    n: int,
) -> np.ndarray:
    """Band-passed noise in each syllable's unvoiced onset, scaled to the voiced speech."""
    out = np.zeros(n)
    reference = float(np.sqrt(np.mean(speech**2))) or 1.0
    for syl in plan:
        a, b = int(syl.start * SAMPLE_RATE), int(syl.voice_start * SAMPLE_RATE)
        if b - a < 16:
            continue
        noise = signal.sosfilt(_fricative_filter(syl.fricative), rng.standard_normal(b - a))
        level = reference * 10 ** ((syl.gain_db + rng.normal(-6.0, 2.0)) / 20)
        out[a:b] = noise / (np.sqrt(np.mean(noise**2)) + 1e-12) * level * np.hanning(b - a)
    return out


_FILTERS: dict[int, np.ndarray] = {}


def _fricative_filter(kind: int) -> np.ndarray:
    if kind not in _FILTERS:
        _FILTERS[kind] = signal.butter(
            2, _FRICATIVE_BANDS[kind], btype="bandpass", fs=SAMPLE_RATE, output="sos"
        )
    return _FILTERS[kind]


def _calibrate(
    rng: np.random.Generator, speech: np.ndarray, active: np.ndarray, level_db: float
) -> np.ndarray:
    """Set the speech level (emotion-dependent), cap the peak, add a quiet noise floor."""
    rms = float(np.sqrt(np.mean(speech[active] ** 2))) if active.any() else 0.0
    gain = 10 ** ((_NOMINAL_RMS_DB + level_db) / 20) / rms if rms > 0 else 0.0
    wav = speech * gain
    peak = float(np.max(np.abs(wav))) if wav.size else 0.0
    if peak > _PEAK_LIMIT:
        wav *= _PEAK_LIMIT / peak
    noise_db = float(rng.uniform(-68.0, -60.0))
    noise = signal.lfilter([1.0], [1.0, -0.6], rng.standard_normal(wav.size)) * 0.8
    return (wav + noise * 10 ** (noise_db / 20)).astype(np.float32)


# --------------------------------------------------------------------------- IEMOCAP layout

_IEMOCAP_CODES = {"anger": "ang", "happy": "hap", "neutral": "neu", "sad": "sad"}
# Utterances that exist only in the release layout, with labels the preparation must drop, and
# the emotion profile their audio is made with.
_DROPPED_CODES = {"fru": "anger", "xxx": "neutral", "sur": "happy"}
_CATEGORIES = {
    "ang": "Anger",
    "hap": "Happiness",
    "exc": "Excited",
    "sad": "Sadness",
    "neu": "Neutral",
    "fru": "Frustration",
    "sur": "Surprise",
}
_VAD = {  # typical valence, activation, dominance (1-5) per code
    "ang": (2, 4, 4),
    "hap": (4, 3, 3),
    "exc": (4, 4, 3),
    "sad": (2, 2, 2),
    "neu": (3, 2, 3),
    "fru": (2, 3, 3),
    "sur": (3, 4, 3),
    "xxx": (3, 3, 3),
}
_DIALOG_KINDS = (("F", "impro01"), ("M", "impro02"), ("F", "script01_1"), ("M", "script02_2"))


@dataclass(frozen=True)
class _Turn:
    """One utterance of the release layout."""

    name: str  # e.g. Ses01F_impro01_F000
    dialog: str  # e.g. Ses01F_impro01
    session: int
    code: str  # the IEMOCAP emotion code
    duration: float
    source: str  # the corpus file it copies, or "" for an extra (dropped-label) utterance
    audio: np.ndarray | None  # an extra utterance's waveform


def _session_dirs(num_speakers: int) -> set[str]:
    return {f"Session{s + 1}" for s in range(math.ceil(num_speakers / 2))} | {LAYOUT_MARKER}


def _write_iemocap_layout(config: DemoCorpusConfig, speakers: list[_Speaker], root: Path) -> None:
    """The same corpus as IEMOCAP_full_release: two speakers (F, M) per session."""
    corpus = _read_json(Path(config.output_dir) / METADATA_NAME)["utterances"]
    turns = _layout_turns(config, speakers, corpus)
    audio_dir = Path(config.output_dir) / AUDIO_SUBDIR
    utterances: dict[str, dict[str, str]] = {}
    for turn in tqdm(turns, desc="IEMOCAP layout", unit="utt"):
        rel = f"Session{turn.session}/sentences/wav/{turn.dialog}/{turn.name}.wav"
        if turn.audio is None:
            atomic_write_bytes(root / rel, (audio_dir / turn.source).read_bytes())
        else:
            write_wav(root / rel, turn.audio)
        utterances[turn.name] = {"path": rel, "code": turn.code, "source": turn.source}
    evaluations = _write_evaluations(config, turns, root)
    marker = {
        "identity": _identity(config),
        "config": asdict(config),
        "utterances": utterances,
        "files": [u["path"] for u in utterances.values()] + evaluations,
    }
    atomic_write_json(root / LAYOUT_MARKER, marker)  # last: its presence marks completion
    logger.info(
        "wrote the demo corpus in the IEMOCAP_full_release layout to %s: %d utterances in %d "
        "sessions (%d with labels the preparation drops)",
        root,
        len(turns),
        math.ceil(len(speakers) / 2),
        sum(not t.source for t in turns),
    )


def _layout_turns(
    config: DemoCorpusConfig, speakers: list[_Speaker], corpus: Mapping[str, Mapping[str, Any]]
) -> list[_Turn]:
    """Spread each speaker's utterances over its session's dialogs, counting per dialog."""
    turns: list[_Turn] = []
    counters: dict[tuple[str, str], int] = {}
    for n, spk in enumerate(speakers):
        session = n // 2 + 1
        dialogs = [f"Ses{session:02d}{lead}_{kind}" for lead, kind in _DIALOG_KINDS]
        items = _speaker_items(config, n, spk, corpus)
        for position, (code, duration, source, audio) in enumerate(items):
            dialog = dialogs[position % len(dialogs)]
            count = counters.get((dialog, spk.gender), 0)
            counters[(dialog, spk.gender)] = count + 1
            name = f"{dialog}_{spk.gender}{count:03d}"
            turns.append(_Turn(name, dialog, session, code, duration, source, audio))
    return turns


def _speaker_items(
    config: DemoCorpusConfig, n: int, spk: _Speaker, corpus: Mapping[str, Mapping[str, Any]]
) -> list[tuple[str, float, str, np.ndarray | None]]:
    """(code, duration, source file, extra audio) for one speaker, corpus files first."""
    items: list[tuple[str, float, str, np.ndarray | None]] = []
    for name, info in sorted(corpus.items()):
        if info["speaker"] == spk.name:
            code = _IEMOCAP_CODES[info["label"]]
            if code == "hap" and info["index"] % 2 == 1:
                code = "exc"  # IEMOCAP's excited, which the preparation merges into happy
            items.append((code, info["duration"], name, None))
    for j, (code, profile) in enumerate(_DROPPED_CODES.items()):
        extra = _Utterance(f"{spk.name}_{code}_{j:03d}", spk, profile, j, (2, n, j))
        audio, params = _synthesize_utterance(config, extra)
        items.append((code, params["duration"], "", audio))
    return items


def _write_evaluations(config: DemoCorpusConfig, turns: list[_Turn], root: Path) -> list[str]:
    """One EmoEvaluation file per dialog, in the release's format."""
    written = []
    for dialog in sorted({t.dialog for t in turns}):
        # Turns alternate between the two speakers, as in a conversation.
        mine = sorted((t for t in turns if t.dialog == dialog), key=lambda t: t.name[-3:])
        rng = np.random.default_rng([int(config.seed), 3, mine[0].session, len(written)])
        lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        clock = float(rng.uniform(1.0, 6.0))
        for turn in mine:
            lines += _evaluation_block(rng, turn, clock) + [""]
            clock += turn.duration + float(rng.uniform(0.3, 2.0))
        rel = f"Session{mine[0].session}/dialog/EmoEvaluation/{dialog}.txt"
        atomic_write_text(root / rel, "\n".join(lines) + "\n")
        written.append(rel)
    return written


def _evaluation_block(rng: np.random.Generator, turn: _Turn, start: float) -> list[str]:
    """The summary line, three categorical and three dimensional annotator lines."""
    self_id = f"{turn.name.rsplit('_', 1)[1][0]}{turn.session}"  # the speaker's own rating
    raters = ("E1", "E2", self_id)
    if turn.code == "xxx":  # no majority: the annotators disagree
        categories = ["Anger", "Frustration", "Neutral"]
    else:
        categories = [_CATEGORIES[turn.code]] * 3
        if rng.random() < 0.3:
            categories[2] = "Neutral" if turn.code != "neu" else "Frustration"
    votes = np.clip(np.array(_VAD[turn.code]) + rng.integers(-1, 2, size=(3, 3)), 1, 5)
    v, a, d = votes.mean(axis=0)
    end = start + turn.duration
    lines = [f"[{start:.4f} - {end:.4f}]\t{turn.name}\t{turn.code}\t[{v:.4f}, {a:.4f}, {d:.4f}]"]
    lines += [f"C-{r}:\t{c};\t()" for r, c in zip(raters, categories, strict=True)]
    lines += [
        f"A-{r}:\tval {val}; act {act}; dom  {dom};\t()"
        for r, (val, act, dom) in zip(raters, votes.tolist(), strict=True)
    ]
    return lines
