"""IEMOCAP release -> 16 kHz mono wavs in one folder, their metadata and session-wise folds.

Writes, under the output directory ``OUT``::

    OUT/Audio_16k/<utterance>.wav        every kept utterance, 16 kHz mono
    OUT/metalabel.json                   <utterance>.wav -> label, session, speaker, source, ...
    OUT/labels_sess/label_<N>.json       fold N: Test = session N, Train = the others, Val = {}
    OUT/.prepared.json                   what was converted from what (makes reruns cheap)

Kept emotions follow the original recipe: ang -> anger, hap and exc -> happy, sad, neu ->
neutral; every other label (fru, sur, fea, dis, oth, xxx) is dropped. ``classes_setup`` picks
another of ``CLASS_SETUPS`` and ``label_map`` any mapping (IEMOCAP code -> class); unmapped codes
are dropped. ``folds=speaker`` writes ten leave-one-speaker-out folds instead, to
``OUT/labels_spk/label_<speaker>.json`` (e.g. ``label_Ses01F.json``), also with an empty Val.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf
from tqdm.auto import tqdm

from ser.atomic import atomic_path, atomic_write_json
from ser.audio import (
    MIN_SAMPLES,
    AudioHeader,
    AudioProblems,
    error_summary,
    read_header,
    resample,
    write_wav,
)
from ser.config import SAMPLE_RATE, PrepareIemocapConfig
from ser.data.labels import write_label_file
from ser.errors import SerInputError

logger = logging.getLogger(__name__)

LABEL_MAP = {"ang": "anger", "hap": "happy", "exc": "happy", "sad": "sad", "neu": "neutral"}
_NO_EXC = {"ang": "anger", "hap": "happy", "sad": "sad", "neu": "neutral"}
# The setups papers compare; "4" (exc merged into happy) is the original recipe's.
CLASS_SETUPS: dict[str, dict[str, str]] = {
    "4": LABEL_MAP,
    "4-no-exc": _NO_EXC,
    "5": {**_NO_EXC, "exc": "excited"},
    "6": {**_NO_EXC, "exc": "excited", "fru": "frustrated"},
}
AUDIO_DIR = "Audio_16k"
LABEL_DIR = "labels_sess"
SPEAKER_LABEL_DIR = "labels_spk"
METALABEL = "metalabel.json"
MANIFEST = ".prepared.json"
# Bump when the conversion itself changes, so that older outputs are redone.
MANIFEST_VERSION = 1
_SHOW = 5

EXPECTED_LAYOUT = """\
Expected iemocap_dir to be the IEMOCAP_full_release folder, laid out as:
  IEMOCAP_full_release/
    Session1/
      sentences/wav/<dialog>/<utterance>.wav
        e.g. sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav
      dialog/EmoEvaluation/<dialog>.txt
        e.g. dialog/EmoEvaluation/Ses01F_impro01.txt
    Session2/ ... Session5/   (the same)"""

# "[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]"
_EVAL_LINE = re.compile(
    r"^\[\s*(?P<start>\d+(?:\.\d*)?)\s*-\s*(?P<end>\d+(?:\.\d*)?)\s*\]\s+"
    r"(?P<utt>\S+)\s+(?P<emo>\S+)\s+\["
)
_SESSION_DIR = re.compile(r"^Session(\d+)$")
# Ses01F_impro01_F000 and Ses01F_script01_1_M012: the speaker is the letter of the last part;
# the dialog's letter only says who wore the motion-capture markers.
_SPEAKER = re.compile(r"^(Ses\d+)[FM]_.*_([FM])\d+$")


@dataclass(frozen=True)
class Utterance:
    """One kept line of an evaluation file."""

    name: str
    emotion: str  # IEMOCAP's code, e.g. "exc"
    session: int
    dialog: str
    source: Path
    start: float
    end: float
    label: str = ""  # the class, set once the label map keeps the utterance

    @property
    def file_name(self) -> str:
        return f"{self.name}.wav"

    @property
    def speaker(self) -> str | None:
        match = _SPEAKER.match(self.name)
        return f"{match.group(1)}{match.group(2)}" if match else None


@dataclass
class PreparedCorpus:
    """Where the prepared corpus is and what this run did."""

    output_dir: Path
    audio_dir: Path
    metalabel_path: Path
    label_files: list[Path]
    num_utterances: int
    num_converted: int  # audio files written by this run
    num_up_to_date: int  # audio files a previous run had already written
    class_counts: dict[str, int]


def prepare_iemocap(config: PrepareIemocapConfig) -> PreparedCorpus:
    """Convert an IEMOCAP release; everything is validated before the first file is written."""
    root, out = _check_config(config)
    label_map = _label_map(config)
    sessions = find_sessions(root)
    utterances = read_evaluations(root, sessions, label_map)
    folds = config.folds
    if folds == "speaker":
        _check_speakers(root, utterances)
    headers = _check_sources(root, utterances)
    return _write_corpus(root, out, utterances, headers, folds)


def _label_map(config: PrepareIemocapConfig) -> Mapping[str, str]:
    option = config.label_map
    if not option:
        return CLASS_SETUPS[config.classes_setup]
    # Imported here: ser.data.emobox builds on this module.
    from ser.data.emobox import load_label_map

    return load_label_map(option, Path(option))


def _check_speakers(root: Path, utterances: list[Utterance]) -> None:
    unnamed = [utt.name for utt in utterances if utt.speaker is None]
    if unnamed:
        raise SerInputError(
            f"IEMOCAP directory {root}: folds=speaker needs the speaker in every utterance name "
            f"(Ses01F_impro01_F000: speaker Ses01F), but {len(unnamed)} do not name one: "
            f"{_preview(unnamed)}; use folds=session"
        )


def find_sessions(root: Path) -> dict[int, Path]:
    """Session number -> folder, for every ``SessionN`` with the two folders we read."""
    sessions = {
        int(match.group(1)): entry
        for entry in root.iterdir()
        if entry.is_dir() and (match := _SESSION_DIR.match(entry.name))
    }
    if not sessions:
        raise SerInputError(
            f"IEMOCAP directory {root} has no Session<N> folders"
            f" (it holds: {_listing(root)}){_nested_release_hint(root)}.\n{EXPECTED_LAYOUT}"
        )
    missing = [
        str(folder / part)
        for _, folder in sorted(sessions.items())
        for part in ("sentences/wav", "dialog/EmoEvaluation")
        if not (folder / part).is_dir()
    ]
    missing += [
        f"{folder / 'dialog/EmoEvaluation'}/*.txt"
        for _, folder in sorted(sessions.items())
        if (folder / "dialog/EmoEvaluation").is_dir() and not _evaluation_files(folder)
    ]
    if missing:
        raise SerInputError(
            f"IEMOCAP directory {root} is incomplete; not found: {_preview(missing)}.\n"
            f"{EXPECTED_LAYOUT}"
        )
    return dict(sorted(sessions.items()))


def read_evaluations(
    root: Path, sessions: dict[int, Path], label_map: Mapping[str, str] = LABEL_MAP
) -> list[Utterance]:
    """The kept utterances of every session's evaluation files, sorted by name."""
    kept: dict[str, Utterance] = {}
    duplicates: list[str] = []
    seen: Counter[str] = Counter()
    for number, folder in sessions.items():
        for evaluation in _evaluation_files(folder):
            for utt in _parse_evaluation(evaluation, number, folder):
                seen[utt.emotion] += 1
                if utt.emotion not in label_map:
                    continue
                utt = dataclasses.replace(utt, label=label_map[utt.emotion])
                if utt.name in kept:
                    duplicates.append(f"{utt.name} ({kept[utt.name].dialog}, {utt.dialog})")
                kept[utt.name] = utt
    if duplicates:
        raise SerInputError(
            f"IEMOCAP directory {root}: {len(duplicates)} utterances appear in more than one "
            f"evaluation file: {_preview(duplicates)}; each utterance must be labelled once. "
            f"Remove the stray copies.\n{EXPECTED_LAYOUT}"
        )
    if not kept:
        found = ", ".join(f"{emo} x{n}" for emo, n in seen.most_common()) or "no labelled lines"
        raise SerInputError(
            f"IEMOCAP directory {root}: no utterance with a kept emotion "
            f"({', '.join(sorted(label_map))}) in the dialog/EmoEvaluation/*.txt files (found: "
            f"{found}). Lines must read '[start - end]<TAB>utterance<TAB>emotion<TAB>[v, a, d]'."
            f"\n{EXPECTED_LAYOUT}"
        )
    with_data = sorted({utt.session for utt in kept.values()})
    empty = sorted(set(sessions) - set(with_data))
    if empty:
        logger.warning(
            "Session(s) %s have no utterance with a kept emotion and get no fold; check their "
            "dialog/EmoEvaluation/*.txt files",
            empty,
        )
    if len(with_data) < 2:
        raise SerInputError(
            f"IEMOCAP directory {root}: only session(s) {with_data} have kept utterances; "
            "leave-one-session-out folds need at least two sessions to train on one and test "
            f"on another.\n{EXPECTED_LAYOUT}"
        )
    return [kept[name] for name in sorted(kept)]


def _check_config(config: PrepareIemocapConfig) -> tuple[Path, Path]:
    if not config.iemocap_dir:
        raise SerInputError(f"iemocap_dir is not set.\n{EXPECTED_LAYOUT}")
    if not config.output_dir:
        raise SerInputError("output_dir is not set; give a folder for the prepared corpus")
    root = Path(config.iemocap_dir).expanduser()
    out = Path(config.output_dir).expanduser()
    if not root.exists():
        raise SerInputError(f"IEMOCAP directory {root} does not exist.\n{EXPECTED_LAYOUT}")
    if not root.is_dir():
        raise SerInputError(f"IEMOCAP directory {root} is not a directory.\n{EXPECTED_LAYOUT}")
    if out.exists() and not out.is_dir():
        raise SerInputError(f"output_dir {out} exists and is not a directory; choose a folder")
    return root, out


def _evaluation_files(session: Path) -> list[Path]:
    folder = session / "dialog" / "EmoEvaluation"
    # "._*" are macOS resource forks that some copies of the release carry.
    return sorted(p for p in folder.glob("*.txt") if p.is_file() and not p.name.startswith("."))


def _parse_evaluation(path: Path, session: int, session_dir: Path) -> list[Utterance]:
    dialog = path.stem
    utterances = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _EVAL_LINE.match(line)
        if match is None:  # headers, "C-E1:" annotator lines, blank lines
            continue
        name = match.group("utt")
        utterances.append(
            Utterance(
                name=name,
                emotion=match.group("emo"),
                session=session,
                dialog=dialog,
                source=session_dir / "sentences" / "wav" / dialog / f"{name}.wav",
                start=float(match.group("start")),
                end=float(match.group("end")),
            )
        )
    return utterances


def _check_sources(root: Path, utterances: list[Utterance]) -> dict[str, AudioHeader]:
    """Headers of every kept source wav; all problems at once, before anything is written."""
    problems = AudioProblems()
    headers: dict[str, AudioHeader] = {}
    for utt in utterances:
        if not utt.source.is_file():
            problems.add("missing", utt.source, f"named in {utt.dialog}.txt")
            continue
        try:
            header = read_header(utt.source)
        except SerInputError as err:
            problems.add("unreadable", utt.source, error_summary(err.__cause__))
            continue
        if _samples_at_target(header) < MIN_SAMPLES:
            detail = f"{header.frames} samples at {header.sample_rate} Hz"
            problems.add("too_short", utt.source, detail)
            continue
        headers[utt.name] = header
    if problems:
        raise SerInputError(
            f"{problems.num_files} of {len(utterances)} kept IEMOCAP utterances in {root} cannot "
            "be prepared; nothing was written:\n"
            + problems.describe(
                advice={
                    "missing": "every utterance of dialog/EmoEvaluation/<dialog>.txt needs "
                    "sentences/wav/<dialog>/<utterance>.wav: re-extract the release",
                    "unreadable": "re-extract these files from the release",
                    "too_short": "re-extract these files from the release",
                }
            )
            + f"\n{EXPECTED_LAYOUT}"
        )
    return headers


def _samples_at_target(header: AudioHeader) -> int:
    return header.frames * SAMPLE_RATE // header.sample_rate


def _write_corpus(
    root: Path,
    out: Path,
    utterances: list[Utterance],
    headers: dict[str, AudioHeader],
    folds: str = "session",
) -> PreparedCorpus:
    audio_dir = out / AUDIO_DIR
    previous = _load_manifest(out)
    entries = {
        utt.file_name: previous["files"][utt.file_name]
        for utt in utterances
        if _up_to_date(previous["files"].get(utt.file_name), utt.source, audio_dir / utt.file_name)
    }
    todo = [utt for utt in utterances if utt.file_name not in entries]
    _announce(todo, headers)
    label_files = _label_paths(out, utterances, folds)
    label_names = [_manifest_name(out, p) for p in label_files]
    try:
        for utt in tqdm(todo, desc="IEMOCAP -> 16 kHz", unit="file", disable=not todo):
            entries[utt.file_name] = _convert(utt, headers[utt.name], audio_dir / utt.file_name)
    finally:
        # An interrupted run keeps what it finished, so the next one resumes there; the old
        # folds stay listed until the new ones replace them, so stale ones are still removed.
        _save_manifest(out, entries, sorted({*previous["label_files"], *label_names}))
    changed = _write_metadata(root, out, utterances, headers)
    changed |= _write_folds(out, utterances, previous["label_files"], folds)
    _save_manifest(out, entries, label_names)
    counts = dict(sorted(Counter(utt.label for utt in utterances).items()))
    _log_result(out, len(utterances), len(todo), changed, counts, label_files, folds)
    return PreparedCorpus(
        output_dir=out,
        audio_dir=audio_dir,
        metalabel_path=out / METALABEL,
        label_files=label_files,
        num_utterances=len(utterances),
        num_converted=len(todo),
        num_up_to_date=len(utterances) - len(todo),
        class_counts=counts,
    )


def _load_manifest(out: Path) -> dict[str, Any]:
    empty: dict[str, Any] = {"version": MANIFEST_VERSION, "files": {}, "label_files": []}
    path = out / MANIFEST
    if not path.is_file():
        return empty
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("Ignoring unreadable %s; every file will be converted again", path)
        return empty
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return empty
    files, labels = manifest.get("files"), manifest.get("label_files")
    return {
        "version": MANIFEST_VERSION,
        "files": files if isinstance(files, dict) else {},
        "label_files": labels if isinstance(labels, list) else [],
    }


def _save_manifest(out: Path, entries: dict[str, dict[str, int]], label_files: list[str]) -> None:
    manifest = {"version": MANIFEST_VERSION, "files": entries, "label_files": label_files}
    _write_json_if_changed(out / MANIFEST, manifest, _write_compact_json)


def _write_compact_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, indent=None)


def _up_to_date(entry: object, source: Path, output: Path) -> bool:
    """Same source (size and mtime) and our output untouched since we wrote it."""
    if not isinstance(entry, dict) or not output.is_file():
        return False
    src, dst = source.stat(), output.stat()
    return (
        entry.get("source_size") == src.st_size
        and entry.get("source_mtime_ns") == src.st_mtime_ns
        and entry.get("output_size") == dst.st_size
        and entry.get("output_mtime_ns") == dst.st_mtime_ns
    )


def _announce(todo: list[Utterance], headers: dict[str, AudioHeader]) -> None:
    multi = [u for u in todo if headers[u.name].channels > 1]
    if multi:
        logger.warning(
            "%d IEMOCAP source files have more than one channel and are averaged to mono, e.g. "
            "%s; the official release is mono, so check that your copy is the original",
            len(multi),
            _preview([str(u.source) for u in multi]),
        )
    rates = Counter(headers[u.name].sample_rate for u in todo)
    rates.pop(SAMPLE_RATE, None)
    if rates:
        logger.info(
            "Resampling %d source files to %d Hz (found %s)",
            sum(rates.values()),
            SAMPLE_RATE,
            ", ".join(f"{rate} Hz x{n}" for rate, n in sorted(rates.items())),
        )


def _convert(utt: Utterance, header: AudioHeader, target: Path) -> dict[str, int]:
    """Write one output wav; the manifest entry that proves it up to date later."""
    source_stat = utt.source.stat()
    if header.sample_rate == SAMPLE_RATE and header.channels == 1:
        with atomic_path(target) as tmp:  # already what we need: the bytes as they are
            shutil.copyfile(utt.source, tmp)
    else:
        try:
            data, rate = sf.read(str(utt.source), dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError) as err:
            raise SerInputError(
                f"IEMOCAP source {utt.source} could not be decoded ({err}); re-extract it"
            ) from err
        write_wav(target, resample(data.mean(axis=1), rate, SAMPLE_RATE))
    output_stat = target.stat()
    return {
        "source_size": source_stat.st_size,
        "source_mtime_ns": source_stat.st_mtime_ns,
        "output_size": output_stat.st_size,
        "output_mtime_ns": output_stat.st_mtime_ns,
    }


def _write_metadata(
    root: Path, out: Path, utterances: list[Utterance], headers: dict[str, AudioHeader]
) -> bool:
    metalabel = {
        utt.file_name: {
            "label": utt.label,
            "emotion": utt.emotion,
            "session": utt.session,
            "speaker": utt.speaker,
            "dialog": utt.dialog,
            "source": utt.source.relative_to(root).as_posix(),
            "start": utt.start,
            "end": utt.end,
            "duration": round(headers[utt.name].frames / headers[utt.name].sample_rate, 4),
        }
        for utt in utterances
    }
    return _write_json_if_changed(out / METALABEL, metalabel, atomic_write_json)


def _label_paths(out: Path, utterances: list[Utterance], folds: str = "session") -> list[Path]:
    if folds == "speaker":
        speakers = sorted({str(utt.speaker) for utt in utterances})
        return [out / SPEAKER_LABEL_DIR / f"label_{speaker}.json" for speaker in speakers]
    sessions = sorted({utt.session for utt in utterances})
    return [out / LABEL_DIR / f"label_{session}.json" for session in sessions]


def _fold_of(utt: Utterance, folds: str) -> str:
    return str(utt.speaker) if folds == "speaker" else str(utt.session)


def _manifest_name(out: Path, path: Path) -> str:
    # Session folds keep the bare names of older manifests; others are paths under OUT.
    return path.name if path.parent.name == LABEL_DIR else path.relative_to(out).as_posix()


def _write_folds(
    out: Path, utterances: list[Utterance], previous: list[str], folds: str = "session"
) -> bool:
    """One fold per session (or speaker) with kept utterances; stale folds of an earlier run
    (of either kind) are removed, so OUT holds one setup's folds."""
    changed = False
    paths = _label_paths(out, utterances, folds)
    for path in paths:
        held_out = path.stem.split("_", 1)[1]
        splits = {
            "Train": {u.file_name: u.label for u in utterances if _fold_of(u, folds) != held_out},
            "Val": {},
            "Test": {u.file_name: u.label for u in utterances if _fold_of(u, folds) == held_out},
        }
        changed |= _write_json_if_changed(path, splits, write_label_file)
    for name in sorted(set(previous) - {_manifest_name(out, p) for p in paths}):
        stale = out / name if "/" in name else out / LABEL_DIR / name
        if stale.is_file():
            logger.warning("Removing %s: its fold is no longer in this setup", stale)
            stale.unlink()
            changed = True
    return changed


def _write_json_if_changed(path: Path, obj: Any, writer: Callable[[Path, Any], None]) -> bool:
    # An unchanged file keeps its mtime, so data fingerprints of later stages stay valid.
    if path.is_file():
        try:
            if json.loads(path.read_text(encoding="utf-8")) == obj:
                return False
        except (OSError, ValueError):
            pass
    writer(path, obj)
    return True


def _log_result(
    out: Path,
    total: int,
    converted: int,
    changed: bool,
    counts: dict[str, int],
    label_files: list[Path],
    folds: str = "session",
) -> None:
    if not converted and not changed:
        logger.info(
            "IEMOCAP already prepared in %s (%d files up to date); nothing to do", out, total
        )
        return
    logger.info(
        "Prepared IEMOCAP in %s: %d utterances (%s) in %s/ (%d converted, %d already up to date), "
        "metadata in %s, %d %s folds in %s/",
        out,
        total,
        ", ".join(f"{label} {n}" for label, n in counts.items()),
        AUDIO_DIR,
        converted,
        total - converted,
        METALABEL,
        len(label_files),
        folds,
        label_files[0].parent.name if label_files else LABEL_DIR,
    )


def _listing(folder: Path) -> str:
    names = sorted(entry.name for entry in folder.iterdir())
    return _preview(names) if names else "nothing"


def _nested_release_hint(root: Path) -> str:
    nested = root / "IEMOCAP_full_release"
    return f"; did you mean {nested}?" if nested.is_dir() else ""


def _preview(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else "")
