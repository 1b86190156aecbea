"""The ``predict`` entry point: emotion labels for every audio file of a folder or a list.

Input is a folder (searched recursively for what soundfile reads), a ``.csv`` with a ``path``
column or a Kaldi ``wav.scp`` (``<key> <path>`` lines); relative paths in a list are relative
to the list. Every file is read at its own rate and channel count and converted to 16 kHz mono
(channels averaged). A file longer than ``window`` seconds is scored in windows ``hop`` seconds
apart, the last one ending with the file; its row holds the mean of the window probabilities
and the class with the highest mean (``per_window`` adds one row per window, with ``start`` and
``end`` seconds). Files that cannot be scored are skipped, listed in ``<output>.errors.txt`` and
counted in one warning; the output (``.csv`` or ``.jsonl``) is written atomically.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from tqdm.auto import tqdm

from ser import artifacts
from ser.atomic import atomic_write_text
from ser.audio import MIN_SAMPLES, PROBLEM_KINDS, error_summary, resample
from ser.config import SAMPLE_RATE, PredictConfig
from ser.errors import SerInputError

log = logging.getLogger(__name__)

# What soundfile (libsndfile) reads, as file name suffixes; "oga"/"opus" are Ogg containers.
AUDIO_SUFFIXES = frozenset({f.lower() for f in sf.available_formats()} | {"aif", "oga", "opus"})
# <name>/<version> or <name>@<alias> of a registered model.
REGISTERED = re.compile(r"[^/@\s]+(/\d+|@[A-Za-z0-9_-]+)")
SHOWN_ERRORS = 5
# What reading a broken file can raise; any of them skips the file, never the batch.
READ_ERRORS = (sf.SoundFileError, RuntimeError, ValueError, OSError, EOFError)


@dataclass(frozen=True)
class Item:
    """One file to score: ``name`` as the output shows it, ``file`` where it is read."""

    name: str
    file: Path
    key: str = ""  # the wav.scp key


@dataclass
class Scored:
    item: Item
    probs: np.ndarray  # [windows, classes]
    spans: list[tuple[int, int]]  # sample ranges of the windows


def predict(config: PredictConfig) -> Path:
    """Score every file of ``config.input`` and write ``config.output``; return its path."""
    config.check()
    output = Path(config.output)
    items = list_inputs(Path(config.input))
    device = _device(config.device)
    model, classes = load_model(config.model, output)
    model.to(device)
    scored, errors = score_all(model, items, config)
    frame = table(scored, classes, config.per_window, any(i.key for i in items))
    write_table(frame, output)
    write_errors(errors, output)
    log.info("predict: scored %d of %d file(s) into %s", len(scored), len(items), output)
    return output


# --- inputs -----------------------------------------------------------------------------------


def list_inputs(source: Path) -> list[Item]:
    """The files to score; SerInputError for a missing or unusable list, before any work."""
    if not source.exists():
        raise SerInputError(f"input={source}: no such file or folder")
    if source.is_dir():
        items = _folder(source)
    elif source.suffix.lower() == ".csv":
        items = _csv(source)
    elif source.suffix.lower() == ".scp":
        items = _scp(source)
    else:
        raise SerInputError(f"input={source}: pass a folder of audio, a .csv or a wav.scp")
    if not items:
        raise SerInputError(f"input={source}: lists no audio file")
    return items


def _folder(root: Path) -> list[Item]:
    files = (p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in AUDIO_SUFFIXES)
    return [Item(str(p), p) for p in sorted(files) if p.is_file()]


def _csv(source: Path) -> list[Item]:
    try:
        frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as err:  # pandas' parser errors are ValueErrors
        raise SerInputError(f"input={source}: not readable as CSV ({error_summary(err)})") from err
    if "path" not in frame.columns:
        raise SerInputError(f"input={source}: has no 'path' column (columns: "
                            f"{', '.join(map(str, frame.columns))})")
    return [Item(p, source.parent / p) for p in frame["path"]]


def _scp(source: Path) -> list[Item]:
    items = []
    for number, line in enumerate(source.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        where = f"input={source} line {number}"
        if len(parts) < 2:
            raise SerInputError(f"{where}: expected '<key> <path>', got {line.strip()!r}")
        key, path = parts[0], parts[1].strip()
        if path.endswith("|"):
            raise SerInputError(f"{where}: piped commands are not run ({path!r}); write the "
                                "audio to files first and list those")
        if re.search(r"\.ark:\d+$", path):
            raise SerInputError(f"{where}: archive offsets are not read ({path!r}); list audio "
                                "files (e.g. Kaldi's wav-copy to wav files)")
        items.append(Item(path, source.parent / path, key))
    return items


# --- model ------------------------------------------------------------------------------------


def load_model(value: str, output: Path) -> tuple[torch.nn.Module, list[str]]:
    """The fine-tuned classifier and its classes, from a directory or downloaded with MLflow."""
    from ser.models.finetuned import load_finetuned

    local = Path(value)
    if local.is_dir():
        return load_finetuned(_exported_dir(local, value))
    uri = model_uri(value)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Beside the output, not in TMPDIR: a model is large, and TMPDIR may be memory.
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.model.", dir=output.parent) as tmp:
        from ser import tracking

        return load_finetuned(_exported_dir(tracking.download_model(uri, Path(tmp)), value))


def model_uri(value: str) -> str:
    """``value`` as an MLflow model URI (a registered name/version or name@alias gains
    ``models:/``)."""
    from ser import tracking

    if tracking.is_uri(value):
        return value
    if REGISTERED.fullmatch(value):
        return f"models:/{value}"
    raise SerInputError(
        f"model={value}: no such directory, and not a models:/ or runs:/ URI nor a registered "
        "<name>/<version> or <name>@<alias>"
    )


def _exported_dir(directory: Path, value: str) -> Path:
    """The exported model: ``directory`` itself, or the one inside a logged pyfunc model
    (MLflow keeps it as ``artifacts/<the exported folder's name>``)."""
    if (directory / artifacts.MODEL_JSON).is_file():
        return directory
    inside = sorted(directory.glob(f"artifacts/*/{artifacts.MODEL_JSON}"))
    if len(inside) == 1:
        return inside[0].parent
    raise SerInputError(f"model={value}: holds no {artifacts.MODEL_JSON}; pass a model logged "
                        "by fine-tuning or the model/ directory it exported")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SerInputError("device='cuda' but no CUDA GPU is visible; pass device=cpu")
    return torch.device(name)


# --- scoring ----------------------------------------------------------------------------------


def read_mono_16k(file: Path) -> np.ndarray:
    """A file at any rate and channel count as 16 kHz mono float32; SerInputError naming what
    is wrong with it otherwise."""
    if not file.is_file():
        raise SerInputError(PROBLEM_KINDS["missing"][0])
    try:
        data, rate = sf.read(str(file), dtype="float32", always_2d=True)
    except READ_ERRORS as err:
        raise SerInputError(f"{PROBLEM_KINDS['unreadable'][0]} [{error_summary(err)}]") from err
    wav = resample(data.mean(axis=1), rate, SAMPLE_RATE) if data.size else np.zeros(0, "float32")
    if len(wav) < MIN_SAMPLES:
        raise SerInputError(PROBLEM_KINDS["too_short"][0])
    if not np.isfinite(wav).all():
        raise SerInputError(PROBLEM_KINDS["non_finite"][0])
    return wav


def windows(length: int, window: float, hop: float) -> list[tuple[int, int]]:
    """Sample ranges of equal windows ``hop`` apart, the last one ending with the audio, so that
    every sample is scored; the whole audio when it fits one window or ``window`` is 0."""
    size, step = round(window * SAMPLE_RATE), max(1, round(hop * SAMPLE_RATE))
    if size <= 0 or length <= size:
        return [(0, length)]
    starts = list(range(0, length - size + 1, step))
    if starts[-1] + size < length:
        starts.append(length - size)
    return [(s, s + size) for s in starts]


def score_all(
    model: torch.nn.Module, items: list[Item], config: PredictConfig
) -> tuple[list[Scored], list[tuple[str, str]]]:
    """Window probabilities per readable file, and (name, reason) of the others."""
    scored: list[Scored] = []
    errors: list[tuple[str, str]] = []
    pending: list[tuple[Item, np.ndarray, list[tuple[int, int]]]] = []
    with tqdm(total=len(items), desc="predict", unit="file") as bar:
        for item in items:
            try:
                wav = read_mono_16k(item.file)
            except SerInputError as err:
                errors.append((item.name, str(err)))
                bar.update(1)
                continue
            pending.append((item, wav, windows(len(wav), config.window, config.hop)))
            # Windows of several short files go to the model together: fewer, fuller batches.
            if sum(len(spans) for _, _, spans in pending) >= config.batch_size:
                scored += _score(model, pending)
                bar.update(len(pending))
                pending = []
        scored += _score(model, pending)
        bar.update(len(pending))
    return scored, errors


def _score(
    model: torch.nn.Module, pending: list[tuple[Item, np.ndarray, list[tuple[int, int]]]]
) -> list[Scored]:
    from ser.models.finetuned import predict as predict_waves

    if not pending:
        return []
    cuts = [wav[s:e] for _, wav, spans in pending for s, e in spans]
    _, probs = predict_waves(model, cuts)
    out, at = [], 0
    for item, _, spans in pending:
        out.append(Scored(item, probs[at : at + len(spans)], spans))
        at += len(spans)
    return out


# --- outputs ----------------------------------------------------------------------------------


def table(scored: list[Scored], classes: list[str], per_window: bool, keys: bool) -> pd.DataFrame:
    """One row per file (the mean of its window probabilities), each followed by its window
    rows when ``per_window``."""
    columns = ["path", *(["key"] if keys else []), "label", *(f"prob_{c}" for c in classes)]
    columns += ["start", "end"] if per_window else []
    rows = []
    for result in scored:
        rows.append(_row(result.item, result.probs.mean(axis=0), classes, keys))
        if per_window:
            for probs, (start, end) in zip(result.probs, result.spans, strict=True):
                rows.append({**_row(result.item, probs, classes, keys),
                             "start": start / SAMPLE_RATE, "end": end / SAMPLE_RATE})
    return pd.DataFrame(rows, columns=columns)


def _row(item: Item, probs: np.ndarray, classes: list[str], keys: bool) -> dict[str, object]:
    row: dict[str, object] = {"path": item.name, **({"key": item.key} if keys else {})}
    row["label"] = classes[int(np.argmax(probs))]
    row.update({f"prob_{c}": float(p) for c, p in zip(classes, probs, strict=True)})
    return row


def write_table(frame: pd.DataFrame, output: Path) -> None:
    if output.suffix.lower() == ".jsonl":
        text = frame.to_json(orient="records", lines=True) if len(frame) else ""
        atomic_write_text(output, text if text.endswith("\n") or not text else text + "\n")
    else:
        atomic_write_text(output, frame.to_csv(index=False))


def errors_path(output: Path) -> Path:
    return output.with_name(output.name + ".errors.txt")


def write_errors(errors: list[tuple[str, str]], output: Path) -> None:
    """``<output>.errors.txt`` (one ``name<TAB>reason`` line per file) and one warning; a list
    left by an earlier run is removed when every file was scored."""
    target = errors_path(output)
    if not errors:
        target.unlink(missing_ok=True)
        return
    atomic_write_text(target, "".join(f"{name}\t{reason}\n" for name, reason in errors))
    shown = ", ".join(name for name, _ in errors[:SHOWN_ERRORS])
    more = f" and {len(errors) - SHOWN_ERRORS} more" if len(errors) > SHOWN_ERRORS else ""
    log.warning("predict: %d file(s) could not be scored and were skipped: %s%s (reasons in %s)",
                len(errors), shown, more, target)
