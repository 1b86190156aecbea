"""Read, check and resample audio with soundfile and scipy.

torchaudio is deliberately not used: the registry's builds are CUDA-only and break imports on
CPU machines (see FACTS.md). Every model in this project takes 16 kHz mono float32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile as sf

from ser.atomic import atomic_path
from ser.config import SAMPLE_RATE
from ser.errors import SerInputError

# wav2vec 2.0's convolutional encoder has a receptive field of 400 samples (25 ms at 16 kHz):
# a shorter input yields no frame at all.
MIN_SAMPLES = 400

PathLike = str | os.PathLike[str]

# kind -> (what is wrong, what to do), in the order the kinds are reported.
PROBLEM_KINDS: dict[str, tuple[str, str]] = {
    "missing": (
        "missing (no such file)",
        "check the audio directory and the file names in the label file",
    ),
    "unreadable": (
        "not readable as audio (corrupt, truncated or not an audio file)",
        "re-export the file(s) or remove them from the label file",
    ),
    "too_short": (
        f"empty or shorter than {MIN_SAMPLES} samples "
        f"({1000 * MIN_SAMPLES / SAMPLE_RATE:.0f} ms, the shortest input wav2vec 2.0 accepts)",
        "remove the file(s) from the label file",
    ),
    "wrong_rate": (
        f"not sampled at {SAMPLE_RATE} Hz",
        "for IEMOCAP run `ser-prepare-iemocap`; otherwise convert each file, "
        f"e.g. `sox in.wav -r {SAMPLE_RATE} out.wav`",
    ),
    "non_finite": (
        "holding NaN or infinite samples (training on them makes every weight NaN)",
        "re-export the file(s) from their source, or remove them from the label file",
    ),
    "multichannel": (
        "not mono",
        "pass `--downmix` to average the channels, or convert to mono, "
        "e.g. `sox in.wav -c 1 out.wav`",
    ),
}


@dataclass(frozen=True)
class AudioHeader:
    """What a file's header says, read without decoding the samples."""

    frames: int
    sample_rate: int
    channels: int
    subtype: str = "PCM_16"  # soundfile's sample format: PCM_16, FLOAT, DOUBLE...


class AudioProblems:
    """Problems of many audio files, grouped by kind, turned into one readable error."""

    def __init__(self) -> None:
        self._by_kind: dict[str, list[str]] = {kind: [] for kind in PROBLEM_KINDS}
        self._files: set[str] = set()

    def add(self, kind: str, path: PathLike, detail: str = "") -> None:
        if kind not in PROBLEM_KINDS:
            raise KeyError(f"unknown audio problem kind {kind!r}; one of {list(PROBLEM_KINDS)}")
        self._by_kind[kind].append(f"{path} ({detail})" if detail else str(path))
        self._files.add(str(path))

    def __bool__(self) -> bool:
        return bool(self._files)

    @property
    def num_files(self) -> int:
        return len(self._files)

    def kinds(self) -> dict[str, int]:
        """Number of files per kind, for kinds that occurred."""
        return {kind: len(items) for kind, items in self._by_kind.items() if items}

    def describe(self, advice: Mapping[str, str] | None = None, shown: int = 5) -> str:
        """One block per kind: what is wrong, how many files, the first ``shown``, what to do.

        ``advice`` replaces the default advice of some kinds, for callers that know better
        (e.g. the IEMOCAP preparation, where a missing file means an incomplete release).
        """
        blocks = []
        for kind, items in self._by_kind.items():
            if not items:
                continue
            what, todo = PROBLEM_KINDS[kind]
            todo = (advice or {}).get(kind, todo)
            lines = [f"  {what}: {len(items)} file(s)"]
            lines += [f"    {item}" for item in items[:shown]]
            if len(items) > shown:
                lines.append(f"    ... and {len(items) - shown} more")
            lines.append(f"    -> {todo}")
            blocks.append("\n".join(lines))
        return "\n".join(blocks)


def header_problems(header: AudioHeader, *, downmix: bool) -> list[tuple[str, str]]:
    """(kind, detail) of everything that makes a file unusable as model input."""
    problems = []
    if header.frames < MIN_SAMPLES:
        detail = "empty" if header.frames == 0 else f"{header.frames} samples"
        problems.append(("too_short", detail))
    if header.sample_rate != SAMPLE_RATE:
        problems.append(("wrong_rate", f"{header.sample_rate} Hz"))
    if header.channels > 1 and not downmix:
        problems.append(("multichannel", f"{header.channels} channels"))
    return problems


def read_header(path: PathLike) -> AudioHeader:
    """The header of one audio file (``soundfile.info``: no decoding).

    Raises SerInputError when the file is missing or not readable as audio.
    """
    file = Path(path)
    if not file.is_file():
        what, todo = PROBLEM_KINDS["missing"]
        raise SerInputError(f"audio file {file} is {what}: {todo}")
    try:
        info = sf.info(str(file))
    except (sf.SoundFileError, RuntimeError) as err:
        raise _unreadable(file, err) from err
    return AudioHeader(frames=info.frames, sample_rate=info.samplerate, channels=info.channels,
                       subtype=info.subtype)


# Only floating-point samples can be NaN or infinite: integer PCM (IEMOCAP's, and the demo
# corpus's) is never read for this check, so it costs nothing on the usual corpora.
FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})


def non_finite_samples(path: PathLike, header: AudioHeader) -> int:
    """How many samples of a floating-point file are NaN or infinite (0 for integer PCM)."""
    if header.subtype not in FLOAT_SUBTYPES:
        return 0
    bad = 0
    for block in sf.blocks(str(path), blocksize=1 << 20, dtype="float32", always_2d=True):
        bad += int(block.size - np.count_nonzero(np.isfinite(block)))
    return bad


def read_audio(path: PathLike, *, downmix: bool = False) -> np.ndarray:
    """Read a file as 1-D float32 at 16 kHz; averages the channels only when ``downmix``.

    Never resamples: a file at another rate is an error, since a silent resample on every read
    would cost time in every epoch; convert the corpus once instead.
    """
    file = Path(path)
    if not file.is_file():
        what, todo = PROBLEM_KINDS["missing"]
        raise SerInputError(f"audio file {file} is {what}: {todo}")
    try:
        with sf.SoundFile(str(file)) as handle:
            header = AudioHeader(handle.frames, handle.samplerate, handle.channels)
            _raise_if_unusable(file, header, downmix=downmix)
            data = handle.read(dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as err:
        raise _unreadable(file, err) from err
    if data.shape[0] < MIN_SAMPLES:  # the header promised more than the file holds
        _raise_if_unusable(file, AudioHeader(data.shape[0], header.sample_rate, 1), downmix=True)
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return np.ascontiguousarray(wav, dtype=np.float32)


def check_audio_files(paths: Iterable[PathLike], *, downmix: bool = False) -> dict[str, int]:
    """Check many files from their headers (and the samples of floating-point files, which
    alone can be NaN or infinite); return the number of samples per path.

    Runs before any long job: every problem of every file is collected and raised as one
    SerInputError grouped by kind, so a user fixes the corpus in one go, not file by file.
    Keys are the paths as given, converted to ``str``.
    """
    problems = AudioProblems()
    samples: dict[str, int] = {}
    total = 0
    for path in paths:
        total += 1
        key = str(path)
        if not Path(path).is_file():
            problems.add("missing", key)
            continue
        try:
            header = read_header(path)
        except SerInputError as err:
            problems.add("unreadable", key, error_summary(err.__cause__))
            continue
        for kind, detail in header_problems(header, downmix=downmix):
            problems.add(kind, key, detail)
        bad = non_finite_samples(path, header)
        if bad:
            problems.add("non_finite", key, f"{bad} of {header.frames * header.channels} samples")
        samples[key] = header.frames
    if problems:
        raise SerInputError(
            f"{problems.num_files} of {total} audio files cannot be used; nothing was started:\n"
            + problems.describe()
        )
    return samples


def crop(wav: np.ndarray, max_samples: int, rng: np.random.Generator | None) -> np.ndarray:
    """Cut ``wav`` to at most ``max_samples`` samples (``max_samples <= 0``: no limit).

    With ``rng`` (training) a window at a random offset is taken, so that over the epochs the
    model sees every part of a long utterance. Without ``rng`` (evaluation) the whole utterance
    is returned unchanged, however long: the original recipe tests whole utterances one at a
    time (batch 1), and cutting test audio would change the task being measured.

    The original crops at random in TAPT and P-TAPT phase 2 but keeps the start of each clip
    when fine-tuning; a random window is used for every training stage here.
    """
    if max_samples <= 0 or len(wav) <= max_samples or rng is None:
        return wav
    start = int(rng.integers(0, len(wav) - max_samples + 1))
    return wav[start : start + max_samples]


def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling along the first axis; float32 out, the input itself when rates match."""
    if orig_sr <= 0 or target_sr <= 0:
        raise SerInputError(
            f"sample rates must be positive, got orig_sr={orig_sr} and target_sr={target_sr}"
        )
    if orig_sr == target_sr:
        return np.asarray(wav, dtype=np.float32)
    divisor = math.gcd(orig_sr, target_sr)
    out = scipy.signal.resample_poly(wav, target_sr // divisor, orig_sr // divisor, axis=0)
    return np.asarray(out, dtype=np.float32)


def write_wav(path: PathLike, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write 16-bit PCM wav atomically: a reader never sees a half-written file."""
    # Samples beyond +-1 (resampling can overshoot near full scale) are clipped by soundfile,
    # which turns libsndfile's clipping on for every file it opens for writing.
    data = np.asarray(wav, dtype=np.float32)
    with atomic_path(path) as tmp:
        # The temporary name ends in .tmp, so the format cannot be guessed from it.
        sf.write(str(tmp), data, sample_rate, subtype="PCM_16", format="WAV")


def _raise_if_unusable(file: Path, header: AudioHeader, *, downmix: bool) -> None:
    problems = header_problems(header, downmix=downmix)
    if problems:
        reasons = "; ".join(
            f"it is {PROBLEM_KINDS[kind][0]} ({detail}): {PROBLEM_KINDS[kind][1]}"
            for kind, detail in problems
        )
        raise SerInputError(f"audio file {file} cannot be used: {reasons}")


def _unreadable(file: Path, err: BaseException) -> SerInputError:
    what, todo = PROBLEM_KINDS["unreadable"]
    return SerInputError(f"audio file {file} is {what} [{error_summary(err)}]: {todo}")


def error_summary(err: BaseException | None) -> str:
    """A one-line reason for a failure to open audio, for lists of files."""
    if isinstance(err, sf.LibsndfileError):  # its str() repeats the file name we already show
        return err.error_string
    lines = str(err).strip().splitlines() if err is not None else []
    return lines[0] if lines else "no message"
