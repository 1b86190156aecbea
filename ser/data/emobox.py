"""An EmoBox corpus (its metadata as shipped, audio as downloaded) -> 16 kHz mono wavs and folds.

EmoBox (github.com/emo-box/EmoBox) ships, per corpus, under ``data/<corpus>/``::

    <corpus>.jsonl                                  one utterance a line (optional here)
    label_map.json                                  raw label -> class, e.g. {"exc": "Happy"}
    fold_<k>/<corpus>_train_fold_<k>.jsonl          the utterances of fold k's Train
    fold_<k>/<corpus>_test_fold_<k>.jsonl           ... and Test
    fold_<k>/<corpus>_valid_fold_<k>.jsonl          ... and Val, for a few corpora

A line is an object with at least ``key``, ``wav`` (relative to the download root, e.g.
``downloads/cremad/AudioWAV/1001_DFA_ANG_XX.wav``) and ``emo`` (the raw label); ``speaker`` or
``spk`` name the speaker where present, ``start_time``/``end_time`` (seconds) cut a segment.

Writes, under the output directory ``OUT``::

    OUT/Audio_16k/<key>.wav          every utterance of any fold, 16 kHz mono
    OUT/labels/fold_<k>.json         Train / Val / Test of fold k, <key>.wav -> class
    OUT/metalabel.json               <key>.wav -> class, raw label, speaker, source, duration
    OUT/.prepared.json               what was converted from what (makes reruns cheap)

Val is EmoBox's valid file where it ships one; else it is carved from Train by ``val``: one Train
speaker picked with ``seed`` (speaker-disjoint), or a seeded ``val_fraction`` of Train's
utterances, or nothing. Everything is validated before the first file is written.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import soundfile as sf
from tqdm.auto import tqdm

from ser.atomic import atomic_write_json
from ser.audio import (
    MIN_SAMPLES,
    AudioHeader,
    AudioProblems,
    error_summary,
    read_header,
    resample,
    write_wav,
)
from ser.config import SAMPLE_RATE, PrepareEmoboxConfig
from ser.data import iemocap  # its manifest and conversion, so both preparations rerun alike
from ser.data.labels import write_label_file
from ser.errors import SerInputError

logger = logging.getLogger(__name__)

AUDIO_DIR = "Audio_16k"
LABEL_DIR = "labels"
METALABEL = "metalabel.json"
LABEL_MAP_FILE = "label_map.json"
SPEAKER_FIELDS = ("speaker", "spk")
_SPLIT_FILES = {"Train": "train", "Val": "valid", "Test": "test"}
_FOLD_DIR = re.compile(r"^fold_(\d+)$")
_UNSAFE = re.compile(r"[^\w.-]")
_SHOW = 5


@dataclass(frozen=True)
class Record:
    """One utterance as EmoBox's metadata lists it."""

    key: str
    wav: str  # relative to audio_root
    emotion: str  # the raw label
    speaker: str | None
    start: float | None
    end: float | None
    where: str  # file:line, for messages

    @property
    def file_name(self) -> str:
        return f"{_UNSAFE.sub('_', self.key)}.wav"


@dataclass
class Fold:
    number: int
    splits: dict[str, list[Record]]  # Train, Val (possibly empty), Test


@dataclass(frozen=True)
class Source:
    """Where an utterance's audio is; quacks like iemocap.Utterance for its converter."""

    source: Path


@dataclass
class PreparedEmobox:
    """Where the prepared corpus is and what this run did."""

    output_dir: Path
    audio_dir: Path
    label_files: list[Path]
    num_utterances: int
    num_converted: int
    class_counts: dict[str, int]


def prepare_emobox(config: PrepareEmoboxConfig) -> PreparedEmobox:
    """Convert one EmoBox corpus; everything is validated before the first file is written."""
    corpus_dir, audio_root, out = _check_paths(config)
    label_map = load_label_map(config.label_map, corpus_dir / LABEL_MAP_FILE)
    folds = read_folds(corpus_dir, config.corpus)
    records = _unique_records(folds)
    _check_labels(records, label_map, config)
    sources = {r.key: _resolve(audio_root, r.wav) for r in records}
    headers = _check_sources(audio_root, records, sources)
    for fold in folds:
        _carve_val(fold, config)
    return _write_corpus(out, records, sources, headers, folds, label_map, config.corpus)


# --- label maps ---------------------------------------------------------------------------


def load_label_map(option: str, default: Path) -> dict[str, str]:
    """``raw=class,raw=class``, a JSON file of raw -> class, or (empty) the ``default`` file."""
    text = option.strip()
    if text and "=" in text and not Path(text).expanduser().is_file():
        return parse_inline_label_map(text)
    path = Path(text).expanduser() if text else default
    if not path.is_file():
        raise SerInputError(
            f"label_map file {path} does not exist; give a JSON file of raw label -> class, "
            "or inline raw=class,raw=class"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SerInputError(f"label_map file {path} is not readable JSON: {err}") from err
    bad = not isinstance(raw, dict) or not raw
    if bad or any(not isinstance(v, str) or not v.strip() for v in raw.values()):
        raise SerInputError(
            f"label_map file {path} must be a non-empty JSON object of raw label -> class name, "
            'e.g. {"exc": "happy", "hap": "happy"}'
        )
    return {str(k): v.strip() for k, v in raw.items()}


def parse_inline_label_map(text: str) -> dict[str, str]:
    """``"ang=anger, exc=happy"`` -> ``{"ang": "anger", "exc": "happy"}``."""
    mapping: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        raw, sep, cls = (s.strip() for s in part.partition("="))
        if not part or not sep or not raw or not cls or raw in mapping:
            raise SerInputError(
                f"label_map {text!r}: {part!r} is not raw=class (or repeats a raw label); "
                "write e.g. label_map=ang=anger,hap=happy,exc=happy"
            )
        mapping[raw] = cls
    return mapping


# --- reading EmoBox's metadata ------------------------------------------------------------


def find_data_dir(emobox_dir: Path) -> Path:
    """The ``data/`` folder, whether given the checkout or the folder itself."""
    return emobox_dir / "data" if (emobox_dir / "data").is_dir() else emobox_dir


def list_corpora(data_dir: Path) -> list[str]:
    return sorted(
        d.name
        for d in data_dir.iterdir()
        if d.is_dir() and ((d / LABEL_MAP_FILE).is_file() or any(d.glob("fold_*")))
    )


def read_folds(corpus_dir: Path, corpus: str) -> list[Fold]:
    """Every ``fold_<k>`` of the corpus, in order, with overlapping splits refused."""
    matches = (_FOLD_DIR.match(d.name) for d in corpus_dir.iterdir() if d.is_dir())
    numbers = sorted(int(m.group(1)) for m in matches if m)
    if not numbers:
        raise SerInputError(
            f"EmoBox corpus {corpus_dir} has no fold_<k> folders; expected "
            f"fold_1/{corpus}_train_fold_1.jsonl and fold_1/{corpus}_test_fold_1.jsonl"
        )
    extra = _corpus_records(corpus_dir / f"{corpus}.jsonl")
    folds = [_read_fold(corpus_dir, corpus, k, extra) for k in numbers]
    _check_overlap(folds, corpus_dir)
    return folds


def _read_fold(corpus_dir: Path, corpus: str, k: int, extra: dict[str, dict[str, Any]]) -> Fold:
    splits: dict[str, list[Record]] = {}
    for split, stem in _SPLIT_FILES.items():
        path = corpus_dir / f"fold_{k}" / f"{corpus}_{stem}_fold_{k}.jsonl"
        if split == "Val" and not path.is_file():
            splits[split] = []
            continue
        if not path.is_file():
            raise SerInputError(
                f"EmoBox fold file {path} does not exist; each fold_<k> needs "
                f"{corpus}_train_fold_<k>.jsonl and {corpus}_test_fold_<k>.jsonl"
            )
        splits[split] = [_record(obj, where, extra) for obj, where in _read_jsonl(path)]
        if not splits[split] and split != "Val":
            raise SerInputError(f"EmoBox fold file {path} lists no utterance")
    return Fold(k, splits)


def _corpus_records(path: Path) -> dict[str, dict[str, Any]]:
    # The corpus-wide file may name speakers that the fold files leave out.
    if not path.is_file():
        return {}
    return {str(obj.get("key")): obj for obj, _ in _read_jsonl(path)}


def _read_jsonl(path: Path) -> list[tuple[dict[str, Any], str]]:
    objects = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise SerInputError(
                f"{where} is not a JSON object ({err}); each line of an EmoBox .jsonl file is "
                "one utterance, e.g. {\"key\": ..., \"wav\": ..., \"emo\": ...}; fix or re-fetch it"
            ) from err
        if not isinstance(obj, dict):
            raise SerInputError(f"{where} holds a JSON {type(obj).__name__}, not an object")
        objects.append((obj, where))
    return objects


def _record(obj: dict[str, Any], where: str, extra: dict[str, dict[str, Any]]) -> Record:
    merged = {**extra.get(str(obj.get("key")), {}), **obj}
    for name in ("key", "wav", "emo"):
        if not isinstance(merged.get(name), str) or not merged[name].strip():
            raise SerInputError(
                f"{where}: field {name!r} is missing or not a non-empty string; EmoBox lines "
                "need key, wav and emo; fix or re-fetch the file"
            )
    named = [str(merged[f]) for f in SPEAKER_FIELDS if merged.get(f) not in (None, "")]
    speaker = named[0] if named else None
    return Record(
        key=merged["key"],
        wav=merged["wav"],
        emotion=merged["emo"],
        speaker=speaker,
        start=_seconds(merged, "start_time", where),
        end=_seconds(merged, "end_time", where),
        where=where,
    )


def _seconds(obj: dict[str, Any], name: str, where: str) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise SerInputError(f"{where}: field {name!r} must be a number of seconds >= 0")
    return float(value)


def _check_overlap(folds: list[Fold], corpus_dir: Path) -> None:
    clashes = []
    for fold in folds:
        names = list(fold.splits)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                keys = {r.key for r in fold.splits[first]} & {r.key for r in fold.splits[second]}
                clashes += [f"fold_{fold.number}: {k} ({first}, {second})" for k in sorted(keys)]
    if clashes:
        raise SerInputError(
            f"EmoBox corpus {corpus_dir}: {len(clashes)} utterances are in two splits of one "
            f"fold: {_preview(clashes)}; a fold's train and test files must not share a key. "
            "Re-fetch the fold files"
        )


def _unique_records(folds: list[Fold]) -> list[Record]:
    """Each utterance once; the same key must mean the same audio in every fold."""
    by_key: dict[str, Record] = {}
    by_name: dict[str, str] = {}
    for record in (r for fold in folds for split in fold.splits.values() for r in split):
        seen = by_key.setdefault(record.key, record)
        other = by_name.setdefault(record.file_name, record.key)
        if (seen.wav, seen.emotion, seen.start, seen.end) != (
            record.wav, record.emotion, record.start, record.end
        ):  # fmt: skip
            raise SerInputError(
                f"{record.where}: key {record.key} names other audio or another label than at "
                f"{seen.where}; a key must mean one utterance. Re-fetch the metadata"
            )
        if other != record.key:
            raise SerInputError(
                f"{record.where}: keys {other!r} and {record.key!r} would both be written as "
                f"{record.file_name}; rename one key"
            )
    return [by_key[k] for k in sorted(by_key)]


def _check_labels(records: list[Record], label_map: dict[str, str], config: Any) -> None:
    unknown = Counter(r.emotion for r in records if r.emotion not in label_map)
    if unknown:
        found = ", ".join(f"{emo!r} x{n}" for emo, n in unknown.most_common())
        source = config.label_map or f"{config.corpus}/{LABEL_MAP_FILE}"
        raise SerInputError(
            f"EmoBox corpus {config.corpus}: raw labels {found} are not in the label map "
            f"({source}: {', '.join(sorted(label_map))}); add them, e.g. "
            f"--label_map {','.join(f'{k}={v}' for k, v in label_map.items())},"
            f"{next(iter(unknown))}=<class>"
        )


# --- audio --------------------------------------------------------------------------------


def _resolve(audio_root: Path, wav: str) -> Path:
    """``audio_root/wav``; else without wav's first folder (the placeholder ``downloads/``),
    so audio_root may be the download root or the folder inside it."""
    full = audio_root / wav
    parts = PurePosixPath(wav.replace("\\", "/")).parts
    if full.is_file() or len(parts) < 2 or PurePosixPath(wav).is_absolute():
        return full
    stripped = audio_root.joinpath(*parts[1:])
    return stripped if stripped.is_file() else full


def _check_sources(
    audio_root: Path, records: list[Record], sources: dict[str, Path]
) -> dict[str, AudioHeader]:
    """Headers of every source; all problems at once, before anything is written."""
    problems = AudioProblems()
    headers: dict[str, AudioHeader] = {}
    for record in records:
        path = sources[record.key]
        if not path.is_file():
            problems.add("missing", path, f"named at {record.where}")
            continue
        try:
            header = read_header(path)
        except SerInputError as err:
            problems.add("unreadable", path, error_summary(err.__cause__))
            continue
        frames = _segment_frames(record, header)
        if frames * SAMPLE_RATE // header.sample_rate < MIN_SAMPLES:
            problems.add("too_short", path, f"{frames} samples at {header.sample_rate} Hz")
            continue
        headers[record.key] = header
    if problems:
        raise SerInputError(
            f"{problems.num_files} of {len(records)} EmoBox utterances under {audio_root} cannot "
            "be prepared; nothing was written:\n"
            + problems.describe(
                advice={
                    "missing": "download the corpus and pass its download root as audio_root "
                    "(the folder the metadata's wav paths start from)",
                    "unreadable": "re-download these files, or extract their audio to wav "
                    "(e.g. ffmpeg -i in.mp4 -ac 1 -ar 16000 out.wav) and point the metadata "
                    "at it",
                }
            )
        )
    return headers


def _segment_frames(record: Record, header: AudioHeader) -> int:
    start, stop = _segment(record, header)
    return stop - start


def _segment(record: Record, header: AudioHeader) -> tuple[int, int]:
    start = round((record.start or 0.0) * header.sample_rate)
    stop = header.frames if record.end is None else round(record.end * header.sample_rate)
    return min(start, header.frames), min(max(stop, start), header.frames)


def _convert(record: Record, source: Path, header: AudioHeader, target: Path) -> dict[str, int]:
    if record.start is None and record.end is None:
        # Whole files convert exactly as IEMOCAP's do (a copy when already 16 kHz mono).
        return iemocap._convert(Source(source), header, target)  # type: ignore[arg-type]
    start, stop = _segment(record, header)
    try:
        data, rate = sf.read(str(source), start=start, stop=stop, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as err:
        raise SerInputError(f"EmoBox source {source} could not be decoded ({err})") from err
    write_wav(target, resample(data.mean(axis=1), rate, SAMPLE_RATE))
    src, dst = source.stat(), target.stat()
    return {
        "source_size": src.st_size,
        "source_mtime_ns": src.st_mtime_ns,
        "output_size": dst.st_size,
        "output_mtime_ns": dst.st_mtime_ns,
    }


# --- Val ----------------------------------------------------------------------------------


def _carve_val(fold: Fold, config: PrepareEmoboxConfig) -> None:
    """Move part of Train to Val by ``config.val``, unless EmoBox ships this fold's Val."""
    if config.val == "none":
        fold.splits["Val"] = []
        return
    if fold.splits["Val"]:
        return
    train = fold.splits["Train"]
    speakers = sorted({r.speaker for r in train if r.speaker is not None})
    named = len(speakers) >= 2 and all(r.speaker is not None for r in train)
    if config.val == "speaker" and not named:
        raise SerInputError(
            f"val=speaker: fold_{fold.number}'s Train does not name at least two speakers in "
            f"every line (fields {', '.join(SPEAKER_FIELDS)}); use val=utterance or val=none"
        )
    # A string seed hashes the same on every machine and Python (unlike hash()).
    rng = random.Random(f"{config.seed}:{fold.number}")
    if named and config.val in ("auto", "speaker"):
        chosen = rng.choice(speakers)
        picked = {r.key for r in train if r.speaker == chosen}
    else:
        keys = [r.key for r in train]
        count = min(max(1, round(config.val_fraction * len(keys))), len(keys) - 1)
        picked = set(rng.sample(keys, count))
    fold.splits["Val"] = [r for r in train if r.key in picked]
    fold.splits["Train"] = [r for r in train if r.key not in picked]


# --- writing ------------------------------------------------------------------------------


def _check_paths(config: PrepareEmoboxConfig) -> tuple[Path, Path, Path]:
    emobox = Path(config.emobox_dir).expanduser()
    if not emobox.is_dir():
        raise SerInputError(
            f"emobox_dir {emobox} is not a directory; give an EmoBox checkout or its data/ folder"
        )
    data_dir = find_data_dir(emobox)
    corpus_dir = data_dir / config.corpus
    if not config.corpus or "/" in config.corpus or not corpus_dir.is_dir():
        names = list_corpora(data_dir)
        raise SerInputError(
            f"corpus {config.corpus!r} is not in {data_dir}; the corpora there are: "
            f"{', '.join(names) if names else 'none (is this EmoBox data/?)'}"
        )
    audio_root = Path(config.audio_root).expanduser()
    if not audio_root.is_dir():
        raise SerInputError(
            f"audio_root {audio_root} is not a directory; give the folder the metadata's wav "
            "paths (e.g. downloads/<corpus>/...) are relative to"
        )
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise SerInputError(f"output_dir {out} exists and is not a directory; choose a folder")
    return corpus_dir, audio_root, out


def _write_corpus(
    out: Path,
    records: list[Record],
    sources: dict[str, Path],
    headers: dict[str, AudioHeader],
    folds: list[Fold],
    label_map: dict[str, str],
    corpus: str,
) -> PreparedEmobox:
    audio_dir = out / AUDIO_DIR
    previous = iemocap._load_manifest(out)
    done = previous["files"]
    entries = {
        r.file_name: done[r.file_name]
        for r in records
        if iemocap._up_to_date(done.get(r.file_name), sources[r.key], audio_dir / r.file_name)
    }
    todo = [r for r in records if r.file_name not in entries]
    label_names = [f"fold_{fold.number}.json" for fold in folds]
    try:
        for r in tqdm(todo, desc=f"{corpus} -> 16 kHz", unit="file", disable=not todo):
            target = audio_dir / r.file_name
            entries[r.file_name] = _convert(r, sources[r.key], headers[r.key], target)
    finally:
        # An interrupted run keeps what it finished, so the next one resumes there.
        iemocap._save_manifest(out, entries, sorted({*previous["label_files"], *label_names}))
    _write_metadata(out, records, sources, headers, label_map)
    label_files = _write_folds(out, folds, label_map, previous["label_files"])
    iemocap._save_manifest(out, entries, label_names)
    counts = dict(sorted(Counter(label_map[r.emotion] for r in records).items()))
    logger.info(
        "Prepared EmoBox %s in %s: %d utterances (%s) in %s/ (%d converted, %d up to date), "
        "%d folds in %s/, metadata in %s",
        corpus, out, len(records), ", ".join(f"{c} {n}" for c, n in counts.items()), AUDIO_DIR,
        len(todo), len(records) - len(todo), len(label_files), LABEL_DIR, METALABEL,
    )  # fmt: skip
    return PreparedEmobox(out, audio_dir, label_files, len(records), len(todo), counts)


def _write_metadata(
    out: Path,
    records: list[Record],
    sources: dict[str, Path],
    headers: dict[str, AudioHeader],
    label_map: dict[str, str],
) -> None:
    metalabel = {
        r.file_name: {
            "label": label_map[r.emotion],
            "emotion": r.emotion,
            "key": r.key,
            "speaker": r.speaker,
            "source": str(sources[r.key]),
            "duration": round(_segment_frames(r, headers[r.key]) / headers[r.key].sample_rate, 4),
        }
        for r in records
    }
    iemocap._write_json_if_changed(out / METALABEL, metalabel, atomic_write_json)


def _write_folds(
    out: Path, folds: list[Fold], label_map: dict[str, str], previous: list[str]
) -> list[Path]:
    paths = []
    for fold in folds:
        path = out / LABEL_DIR / f"fold_{fold.number}.json"
        splits = {
            split: {r.file_name: label_map[r.emotion] for r in fold.splits[split]}
            for split in ("Train", "Val", "Test")
        }
        iemocap._write_json_if_changed(path, splits, write_label_file)
        paths.append(path)
    for name in sorted(set(previous) - {p.name for p in paths}):
        stale = out / LABEL_DIR / name
        if stale.is_file():
            logger.warning("Removing %s: its fold is no longer in the EmoBox metadata", stale)
            stale.unlink()
    return paths


def _preview(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else "")
