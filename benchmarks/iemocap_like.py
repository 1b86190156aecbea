"""An IEMOCAP-sized synthetic corpus for cost benchmarks: the lengths, classes and sessions of
IEMOCAP's four-class set, with noise for audio (it measures cost, not accuracy).

- 5,531 utterances (``--utterances`` scales every count below proportionally);
- lengths log-normal with median 3.5 s and mean about 4.5 s, clipped to 0.6-34 s;
- classes as IEMOCAP's (happy with excited merged): neutral 1708, happy 1636, anger 1103,
  sad 1084;
- 5 sessions of 2 speakers (F, M) with IEMOCAP's session sizes (1085, 1023, 1151, 1031, 1241);
- 16 kHz mono 16-bit wavs of uniform noise in ``Audio_16k/``, and five leave-one-session-out
  fold files ``labels_sess/label_<i>.json`` in ser's label format (fold *i* tests on session
  *i*, trains on the other four, empty ``Val``), as ``ser-prepare-iemocap`` writes them;
- ``metadata.json`` (written last, so its presence marks a complete corpus): the parameters and
  every file's session, speaker, label and length in samples.

    python benchmarks/iemocap_like.py --output_dir data/paper_scale/n5531-seed0   # about 30 s

A folder that already holds a complete corpus made with the same parameters is reused.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16_000
IEMOCAP_UTTERANCES = 5_531
CLASS_COUNTS = {"neutral": 1708, "happy": 1636, "anger": 1103, "sad": 1084}
SESSION_COUNTS = (1085, 1023, 1151, 1031, 1241)
MEDIAN_SECONDS = 3.5
MEAN_SECONDS = 4.5
MIN_SECONDS = 0.6
MAX_SECONDS = 34.0
AUDIO_DIR = "Audio_16k"
LABEL_DIR = "labels_sess"
METADATA = "metadata.json"
VERSION = 1  # bump when the corpus a set of parameters gives changes


@dataclass(frozen=True)
class Utterance:
    name: str
    session: int
    speaker: str
    label: str
    samples: int


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder), each at least 1."""
    raw = [total * w / sum(weights) for w in weights]
    counts = [max(int(math.floor(r)), 1) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
    for i in order[: max(total - sum(counts), 0)]:
        counts[i] += 1
    return counts


def lengths_in_samples(n: int, rng: np.random.Generator) -> np.ndarray:
    """Log-normal lengths with IEMOCAP's median and mean, clipped to its range."""
    sigma = math.sqrt(2 * math.log(MEAN_SECONDS / MEDIAN_SECONDS))  # mean = median e^(s^2/2)
    seconds = np.clip(rng.lognormal(math.log(MEDIAN_SECONDS), sigma, n), MIN_SECONDS, MAX_SECONDS)
    return np.round(seconds * SAMPLE_RATE).astype(np.int64)


def plan(utterances: int = IEMOCAP_UTTERANCES, seed: int = 0) -> list[Utterance]:
    """Every utterance's name, session, speaker, label and length (deterministic in ``seed``)."""
    if utterances < 2 * len(SESSION_COUNTS) * len(CLASS_COUNTS):
        raise ValueError(f"need at least {2 * len(SESSION_COUNTS) * len(CLASS_COUNTS)} utterances")
    rng = np.random.default_rng(seed)
    labels = [c for c, k in zip(CLASS_COUNTS, apportion(utterances, list(CLASS_COUNTS.values())),
                                strict=True) for _ in range(k)]  # fmt: skip
    rng.shuffle(labels)
    sessions = apportion(utterances, list(SESSION_COUNTS))
    lengths = lengths_in_samples(utterances, rng)
    out: list[Utterance] = []
    index = 0
    for session, count in enumerate(sessions, start=1):
        for i in range(count):
            speaker = "F" if i % 2 == 0 else "M"
            name = f"Ses{session:02d}{speaker}_bench_{speaker}{i:04d}.wav"
            out.append(Utterance(name, session, speaker, labels[index], int(lengths[index])))
            index += 1
    return out


def fold_splits(items: Sequence[Utterance], test_session: int) -> dict[str, dict[str, str]]:
    """Leave-one-session-out: Test is ``test_session``, Train the rest, Val empty."""
    return {
        "Train": {u.name: u.label for u in items if u.session != test_session},
        "Val": {},
        "Test": {u.name: u.label for u in items if u.session == test_session},
    }


def _params(utterances: int, seed: int) -> dict[str, Any]:
    return {"version": VERSION, "utterances": utterances, "seed": seed}


def read_metadata(folder: Path) -> dict[str, Any] | None:
    path = folder / METADATA
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def ensure_corpus(folder: str | Path, utterances: int = IEMOCAP_UTTERANCES, seed: int = 0,
                  log: bool = True) -> dict[str, Any]:
    """The corpus in ``folder``: reused when complete and made with the same parameters, else
    written (a folder holding another corpus is refused). Returns its metadata."""
    from ser.data.labels import write_label_file  # only when writing: keeps imports light

    root = Path(folder)
    meta = read_metadata(root)
    wanted = _params(utterances, seed)
    if meta is not None:
        if meta["params"] != wanted:
            raise SystemExit(
                f"{root} holds a corpus made with {meta['params']}, not {wanted}; pass another "
                "--corpus folder"
            )
        if log:
            print(f"corpus: reusing {root} ({len(meta['files'])} utterances)", flush=True)
        return meta
    began = time.perf_counter()
    items = plan(utterances, seed)
    audio = root / AUDIO_DIR
    if audio.exists():  # an interrupted earlier write
        shutil.rmtree(audio)
    audio.mkdir(parents=True)
    rng = np.random.default_rng([seed, 1])
    for u in items:
        noise = rng.integers(-3000, 3000, size=u.samples, dtype=np.int16)
        sf.write(str(audio / u.name), noise, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    labels = root / LABEL_DIR
    labels.mkdir(parents=True, exist_ok=True)
    for session in range(1, len(SESSION_COUNTS) + 1):
        write_label_file(labels / f"label_{session}.json", fold_splits(items, session))
    meta = {"params": wanted, "files": [asdict(u) for u in items]}
    (root / METADATA).write_text(json.dumps(meta), encoding="utf-8")
    if log:
        seconds = np.array([u.samples for u in items]) / SAMPLE_RATE
        print(
            f"corpus: wrote {len(items)} utterances ({seconds.sum() / 3600:.1f} h, median "
            f"{np.median(seconds):.2f} s, mean {seconds.mean():.2f} s) to {root} in "
            f"{time.perf_counter() - began:.0f} s",
            flush=True,
        )
    return meta


def utterances_of(meta: dict[str, Any]) -> list[Utterance]:
    return [Utterance(**row) for row in meta["files"]]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="folder of the corpus")
    parser.add_argument("--utterances", type=int, default=IEMOCAP_UTTERANCES,
                        help="number of utterances (IEMOCAP's four-class set: 5531)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    ensure_corpus(args.output_dir, args.utterances, args.seed)


if __name__ == "__main__":
    main()
