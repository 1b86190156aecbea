"""EmoBox corpora as shipped (jsonl metadata, fold files, label_map.json) -> our corpus layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser.audio import resample
from ser.config import SAMPLE_RATE, PrepareEmoboxConfig
from ser.data.emobox import parse_inline_label_map, prepare_emobox
from ser.data.labels import read_label_dir
from ser.errors import SerInputError

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Utt:
    key: str
    emo: str
    speaker: str
    seconds: float = 0.1
    rate: int = SAMPLE_RATE
    channels: int = 1

    @property
    def wav(self) -> str:
        return f"downloads/toy/{self.speaker}/{self.key}.wav"

    @property
    def out_name(self) -> str:
        return f"{self.key}.wav"


# Four speakers; two raw labels (H, E) merge into one class; one source at 44.1 kHz stereo.
UTTS = [
    Utt("toy-s1-a", "A", "s1"),
    Utt("toy-s1-b", "H", "s1"),
    Utt("toy-s2-a", "A", "s2"),
    Utt("toy-s2-b", "N", "s2"),
    Utt("toy-s3-a", "E", "s3", seconds=0.2, rate=44_100, channels=2),
    Utt("toy-s3-b", "N", "s3"),
    Utt("toy-s4-a", "H", "s4"),
    Utt("toy-s4-b", "A", "s4"),
]
LABEL_MAP = {"A": "Angry", "H": "Happy", "E": "Happy", "N": "Neutral"}
TEST_SPEAKER = {1: "s1", 2: "s2"}  # fold k tests on this speaker, trains on the others


def _line(utt: Utt, speaker: bool) -> str:
    record = {
        "key": utt.key, "dataset": "toy", "wav": utt.wav, "type": "raw", "sample_rate": utt.rate,
        "num_frame": float(round(utt.seconds * utt.rate)), "task": "category",
        "length": utt.seconds, "emo": utt.emo, "channel": utt.channels,
    }  # fmt: skip
    if speaker:
        record["speaker"] = utt.speaker
    return json.dumps(record)


def _write_jsonl(path: Path, utts: list[Utt], speaker: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(_line(u, speaker) + "\n" for u in utts))


def make_emobox(root: Path, speakers: bool = True) -> tuple[Path, Path]:
    """An EmoBox checkout with corpus "toy" (speakers only in toy.jsonl, as the fold files of
    EmoBox carry the same fields) and its download root."""
    data = root / "EmoBox" / "data" / "toy"
    _write_jsonl(data / "toy.jsonl", UTTS, speaker=speakers)
    (data / "label_map.json").write_text(json.dumps(LABEL_MAP, indent=4))
    for k, speaker in TEST_SPEAKER.items():
        fold = data / f"fold_{k}"
        _write_jsonl(fold / f"toy_train_fold_{k}.jsonl", [u for u in UTTS if u.speaker != speaker])
        _write_jsonl(fold / f"toy_test_fold_{k}.jsonl", [u for u in UTTS if u.speaker == speaker])
    (root / "EmoBox" / "data" / "other").mkdir()
    (root / "EmoBox" / "data" / "other" / "label_map.json").write_text("{}")
    rng = np.random.default_rng(0)
    for utt in UTTS:
        source = root / "audio" / utt.wav
        source.parent.mkdir(parents=True, exist_ok=True)
        frames = round(utt.seconds * utt.rate)
        data_ = (0.1 * rng.standard_normal((frames, utt.channels))).astype(np.float32)
        sf.write(source, data_, utt.rate, subtype="PCM_16")
    return root / "EmoBox", root / "audio"


@pytest.fixture()
def emobox(tmp_path: Path) -> tuple[Path, Path]:
    return make_emobox(tmp_path / "src")


def _config(emobox: tuple[Path, Path], out: Path, **kwargs: object) -> PrepareEmoboxConfig:
    base = {"emobox_dir": str(emobox[0]), "corpus": "toy", "audio_root": str(emobox[1])}
    return PrepareEmoboxConfig(**{**base, "output_dir": str(out), **kwargs})  # type: ignore[arg-type]


def _fold(out: Path, k: int) -> dict[str, dict[str, str]]:
    return json.loads((out / "labels" / f"fold_{k}.json").read_text())


def _expected(utts: list[Utt], label_map: dict[str, str] = LABEL_MAP) -> dict[str, str]:
    return {u.out_name: label_map[u.emo] for u in utts}


# --- a good corpus ----------------------------------------------------------------------------


def test_folds_follow_emobox_with_labels_mapped(emobox: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = prepare_emobox(_config(emobox, out, val="none"))
    assert [p.name for p in result.label_files] == ["fold_1.json", "fold_2.json"]
    for k, speaker in TEST_SPEAKER.items():
        fold = _fold(out, k)
        assert fold["Test"] == _expected([u for u in UTTS if u.speaker == speaker])
        assert fold["Train"] == _expected([u for u in UTTS if u.speaker != speaker])
        assert fold["Val"] == {}
    assert _fold(out, 1)["Train"]["toy-s3-a.wav"] == "Happy"  # E merged into Happy
    folds = read_label_dir(out / "labels", audio_dir=out / "Audio_16k")
    assert folds[0].classes() == ["Angry", "Happy", "Neutral"]
    assert result.class_counts == {"Angry": 3, "Happy": 3, "Neutral": 2}
    meta = json.loads((out / "metalabel.json").read_text())
    assert meta["toy-s3-a.wav"]["emotion"] == "E" and meta["toy-s3-a.wav"]["speaker"] == "s3"


def test_audio_is_16k_mono(emobox: tuple[Path, Path], tmp_path: Path) -> None:
    result = prepare_emobox(_config(emobox, tmp_path / "out"))
    assert sorted(p.name for p in result.audio_dir.iterdir()) == sorted(u.out_name for u in UTTS)
    for utt in UTTS:
        target = result.audio_dir / utt.out_name
        info = sf.info(target)
        assert (info.samplerate, info.channels) == (SAMPLE_RATE, 1)
        assert abs(info.frames - utt.seconds * SAMPLE_RATE) <= 1
        if utt.rate == SAMPLE_RATE and utt.channels == 1:  # copied as it is
            assert target.read_bytes() == (emobox[1] / utt.wav).read_bytes()
    stereo, _ = sf.read(emobox[1] / UTTS[4].wav, dtype="float32")
    mono, _ = sf.read(result.audio_dir / UTTS[4].out_name, dtype="float32")
    np.testing.assert_allclose(mono, resample(stereo.mean(axis=1), 44_100, SAMPLE_RATE), atol=1e-3)


def test_audio_root_may_be_the_folder_inside_the_placeholder(
    emobox: tuple[Path, Path], tmp_path: Path
) -> None:
    inner = (emobox[0], emobox[1] / "downloads")  # wav paths start with downloads/
    result = prepare_emobox(_config(inner, tmp_path / "out"))
    assert result.num_utterances == len(UTTS)


def test_rerun_converts_nothing_and_touches_nothing(
    emobox: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    prepare_emobox(_config(emobox, out))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = prepare_emobox(_config(emobox, out))
    assert again.num_converted == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


# --- Val ----------------------------------------------------------------------------------------


def test_val_is_one_seeded_train_speaker(emobox: tuple[Path, Path], tmp_path: Path) -> None:
    chosen = set()
    for seed in range(6):
        out = tmp_path / f"out{seed}"
        prepare_emobox(_config(emobox, out, seed=seed))
        fold = _fold(out, 1)
        val_speakers = {name.split("-")[1] for name in fold["Val"]}
        train_speakers = {name.split("-")[1] for name in fold["Train"]}
        assert len(val_speakers) == 1 and not val_speakers & train_speakers
        assert val_speakers <= {"s2", "s3", "s4"}  # from Train, never the Test speaker
        assert len(fold["Val"]) == 2  # all of that speaker's utterances
        chosen |= val_speakers
        assert fold["Test"] == _expected([u for u in UTTS if u.speaker == "s1"])
    assert len(chosen) > 1  # the seed picks
    prepare_emobox(_config(emobox, tmp_path / "again", seed=5))
    assert _fold(tmp_path / "again", 1) == _fold(tmp_path / "out5", 1)


def test_val_without_speakers_is_a_seeded_tenth(tmp_path: Path) -> None:
    emobox = make_emobox(tmp_path / "src", speakers=False)
    first = prepare_emobox(_config(emobox, tmp_path / "a", seed=3))
    prepare_emobox(_config(emobox, tmp_path / "b", seed=3))
    fold = _fold(tmp_path / "a", 1)
    assert len(fold["Val"]) == 1  # 10 % of 6, at least one
    assert {**fold["Train"], **fold["Val"]} == _expected([u for u in UTTS if u.speaker != "s1"])
    assert _fold(tmp_path / "b", 1) == fold
    assert first.num_utterances == len(UTTS)


def test_val_speaker_needs_speakers(tmp_path: Path) -> None:
    emobox = make_emobox(tmp_path / "src", speakers=False)
    with pytest.raises(SerInputError, match="val=speaker"):
        prepare_emobox(_config(emobox, tmp_path / "out", val="speaker"))
    assert not (tmp_path / "out").exists()


def test_emobox_valid_file_is_the_val(emobox: tuple[Path, Path], tmp_path: Path) -> None:
    fold = emobox[0] / "data" / "toy" / "fold_1"
    train = [u for u in UTTS if u.speaker in ("s2", "s3")]
    _write_jsonl(fold / "toy_train_fold_1.jsonl", train)
    _write_jsonl(fold / "toy_valid_fold_1.jsonl", [u for u in UTTS if u.speaker == "s4"])
    prepare_emobox(_config(emobox, tmp_path / "out"))
    assert _fold(tmp_path / "out", 1)["Val"] == _expected([u for u in UTTS if u.speaker == "s4"])
    assert _fold(tmp_path / "out", 1)["Train"] == _expected(train)


# --- label maps ---------------------------------------------------------------------------------


def test_inline_label_map(emobox: tuple[Path, Path], tmp_path: Path) -> None:
    inline = "A=anger, H=happy, E=excited, N=neutral"
    prepare_emobox(_config(emobox, tmp_path / "out", val="none", label_map=inline))
    expected = {"A": "anger", "H": "happy", "E": "excited", "N": "neutral"}
    assert _fold(tmp_path / "out", 2)["Train"] == _expected(
        [u for u in UTTS if u.speaker != "s2"], expected
    )


def test_label_map_file(emobox: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"A": "neg", "H": "pos", "E": "pos", "N": "neu"}))
    prepare_emobox(_config(emobox, tmp_path / "out", label_map=str(path)))
    assert set(_fold(tmp_path / "out", 1)["Test"].values()) == {"neg", "pos"}


@pytest.mark.parametrize("text", ["A=anger,H", "A=anger,,N=neutral", "=x", "A=x,A=y"])
def test_malformed_inline_label_map(text: str) -> None:
    with pytest.raises(SerInputError, match="raw=class"):
        parse_inline_label_map(text)


# --- errors, all before anything is written -----------------------------------------------------


def _break_missing_audio(emobox: tuple[Path, Path]) -> None:
    for utt in (UTTS[0], UTTS[5]):
        (emobox[1] / utt.wav).unlink()


def _break_label(emobox: tuple[Path, Path]) -> None:
    labels = dict(LABEL_MAP)
    del labels["E"]
    (emobox[0] / "data" / "toy" / "label_map.json").write_text(json.dumps(labels))


def _break_overlap(emobox: tuple[Path, Path]) -> None:
    path = emobox[0] / "data" / "toy" / "fold_2" / "toy_train_fold_2.jsonl"
    _write_jsonl(path, UTTS)  # the test speaker s2 is in train too


def _break_line(emobox: tuple[Path, Path]) -> None:
    path = emobox[0] / "data" / "toy" / "fold_1" / "toy_test_fold_1.jsonl"
    path.write_text(path.read_text() + '{"key": "toy-x", "wav": "downloads/x.wav"}\n')


def _break_json(emobox: tuple[Path, Path]) -> None:
    path = emobox[0] / "data" / "toy" / "fold_1" / "toy_test_fold_1.jsonl"
    path.write_text(path.read_text() + '{"key": "toy-x", \n')


BREAKS = {
    "missing audio": (_break_missing_audio, r"2 of 8 .*toy-s1-a\.wav.*toy-s3-b\.wav"),
    "unknown label": (_break_label, r"raw labels 'E' x1 are not in the label map"),
    "overlap": (_break_overlap, r"fold_2: toy-s2-a \(Train, Test\)"),
    "missing field": (_break_line, r"toy_test_fold_1\.jsonl:3: field 'emo'"),
    "bad json": (_break_json, r"toy_test_fold_1\.jsonl:3 is not a JSON object"),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_bad_input_is_refused_before_writing(
    emobox: tuple[Path, Path], tmp_path: Path, name: str
) -> None:
    breaker, message = BREAKS[name]
    breaker(emobox)
    with pytest.raises(SerInputError, match=f"(?s){message}"):
        prepare_emobox(_config(emobox, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unknown_corpus_lists_the_corpora(emobox: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(SerInputError, match="corpus 'tyo' is not in .*: other, toy$"):
        prepare_emobox(_config(emobox, tmp_path / "out", corpus="tyo"))
    assert not (tmp_path / "out").exists()


def test_a_broken_rerun_keeps_the_earlier_output(
    emobox: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    prepare_emobox(_config(emobox, out))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _break_label(emobox)
    with pytest.raises(SerInputError):
        prepare_emobox(_config(emobox, out))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --- the entry point ------------------------------------------------------------------------------


def _script(emobox: tuple[Path, Path], out: Path, corpus: str) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable, str(ROOT / "entrypoints" / "prepare_emobox.py"),
        "--emobox_dir", str(emobox[0]), "--corpus", corpus, "--audio_root", str(emobox[1]),
        "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=out.parent, env=env, capture_output=True, text=True)


def test_entry_point(emobox: tuple[Path, Path], tmp_path: Path) -> None:
    result = _script(emobox, tmp_path / "out", "toy")
    assert result.returncode == 0, result.stderr
    assert "Prepared EmoBox toy" in result.stderr
    bad = _script(emobox, tmp_path / "bad", "nope")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: prepare_emobox: corpus 'nope'")
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
