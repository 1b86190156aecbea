from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser.config import SAMPLE_RATE, PrepareIemocapConfig
from ser.data import iemocap
from ser.data.iemocap import prepare_iemocap
from ser.data.labels import read_label_dir
from ser.errors import SerInputError


@dataclass(frozen=True)
class Utt:
    name: str
    emotion: str
    seconds: float
    rate: int = SAMPLE_RATE
    channels: int = 1

    @property
    def session(self) -> int:
        return int(self.name[3:5])

    @property
    def dialog(self) -> str:
        return self.name.rsplit("_", 1)[0]


# Three sessions; sources at 16 kHz, 44.1 kHz and one stereo; labels to merge (exc) and to drop.
UTTERANCES = [
    Utt("Ses01F_impro01_F000", "neu", 0.50),
    Utt("Ses01F_impro01_M000", "ang", 0.55),
    Utt("Ses01F_impro01_F001", "exc", 0.60),
    Utt("Ses01F_impro01_M001", "fru", 0.50),
    Utt("Ses01F_impro01_F002", "xxx", 0.50),
    Utt("Ses02M_script01_1_F000", "hap", 0.50),
    Utt("Ses02M_script01_1_M000", "sad", 0.45, rate=44_100),
    Utt("Ses02M_script01_1_M001", "neu", 0.50, channels=2),
    Utt("Ses03F_impro02_F000", "sad", 0.50, rate=44_100),
    Utt("Ses03F_impro02_M000", "neu", 0.40),
    Utt("Ses03F_impro02_M001", "sur", 0.50),
]
KEPT = {"neu": "neutral", "ang": "anger", "exc": "happy", "hap": "happy", "sad": "sad"}
EXPECTED = {f"{u.name}.wav": KEPT[u.emotion] for u in UTTERANCES if u.emotion in KEPT}


def _evaluation_text(utts: list[Utt]) -> str:
    lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
    start = 6.2901
    for utt in utts:
        end = start + utt.seconds
        lines += [
            f"[{start:.4f} - {end:.4f}]\t{utt.name}\t{utt.emotion}\t[2.5000, 3.0000, 2.0000]",
            "C-E2:\tNeutral;\t()",
            "C-E3:\tFrustration; Anger;\t(mildly aggravated)",
            "C-F1:\tNeutral;\t(curious)",
            "A-E3:\tval 3; act 2; dom  2;\t()",
            "",
        ]
        start = end + 1.0
    return "\n".join(lines) + "\n"


def _source(root: Path, utt: Utt) -> Path:
    return root / f"Session{utt.session}" / "sentences" / "wav" / utt.dialog / f"{utt.name}.wav"


def make_release(root: Path, utterances: list[Utt] = UTTERANCES) -> Path:
    """A small IEMOCAP_full_release: wavs, evaluation files and the clutter real copies carry."""
    rng = np.random.default_rng(0)
    for utt in utterances:
        frames = int(round(utt.seconds * utt.rate))
        data = (0.1 * rng.standard_normal((frames, utt.channels))).astype(np.float32)
        _source(root, utt).parent.mkdir(parents=True, exist_ok=True)
        sf.write(_source(root, utt), data, utt.rate, subtype="PCM_16")
    dialogs: dict[tuple[int, str], list[Utt]] = {}
    for utt in utterances:
        dialogs.setdefault((utt.session, utt.dialog), []).append(utt)
    for (session, dialog), utts in dialogs.items():
        folder = root / f"Session{session}" / "dialog" / "EmoEvaluation"
        (folder / "Categorical").mkdir(parents=True, exist_ok=True)
        (folder / f"{dialog}.txt").write_text(_evaluation_text(utts))
        (folder / f"._{dialog}.txt").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
        (folder / "Categorical" / f"{dialog}_e1_cat.txt").write_text(f"{utts[0].name} :Neutral;\n")
    (root / "Documentation").mkdir(exist_ok=True)
    return root


@pytest.fixture()
def release(tmp_path: Path) -> Path:
    return make_release(tmp_path / "IEMOCAP_full_release")


def _config(root: Path, out: Path) -> PrepareIemocapConfig:
    return PrepareIemocapConfig(iemocap_dir=str(root), output_dir=str(out))


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*.*")}


# --- a good release -------------------------------------------------------------------------


def test_audio_is_16k_mono_with_the_source_duration(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = prepare_iemocap(_config(release, out))
    assert result.audio_dir == out / "Audio_16k"
    assert sorted(p.name for p in result.audio_dir.iterdir()) == sorted(EXPECTED)
    for utt in UTTERANCES:
        if utt.emotion not in KEPT:
            continue
        target = result.audio_dir / f"{utt.name}.wav"
        info = sf.info(target)
        assert (info.samplerate, info.channels) == (SAMPLE_RATE, 1)
        assert abs(info.frames - utt.seconds * SAMPLE_RATE) <= 1
        if utt.rate == SAMPLE_RATE and utt.channels == 1:  # copied as it is
            assert target.read_bytes() == _source(release, utt).read_bytes()


def test_stereo_source_is_averaged_with_a_warning(release: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="ser.data.iemocap"):
        result = prepare_iemocap(_config(release, tmp_path / "out"))
    stereo = next(u for u in UTTERANCES if u.channels == 2)
    assert "1 IEMOCAP source files have more than one channel" in caplog.text
    assert stereo.name in caplog.text
    source, _ = sf.read(_source(release, stereo), dtype="float32")
    mono, _ = sf.read(result.audio_dir / f"{stereo.name}.wav", dtype="float32")
    np.testing.assert_allclose(mono, source.mean(axis=1), atol=1e-4)


def test_session_folds(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = prepare_iemocap(_config(release, out))
    assert [p.name for p in result.label_files] == ["label_1.json", "label_2.json", "label_3.json"]
    folds = read_label_dir(out / "labels_sess", audio_dir=result.audio_dir)
    assert [fold.name for fold in folds] == ["label_1", "label_2", "label_3"]
    for session, fold in enumerate(folds, start=1):
        assert fold.val == {}
        assert fold.test == {k: v for k, v in EXPECTED.items() if k.startswith(f"Ses0{session}")}
        assert fold.train == {
            k: v for k, v in EXPECTED.items() if not k.startswith(f"Ses0{session}")
        }
        assert fold.classes() == ["anger", "happy", "neutral", "sad"]
    assert folds[0].test["Ses01F_impro01_F001.wav"] == "happy"  # exc merged into happy
    assert "Ses01F_impro01_M001.wav" not in folds[1].train  # fru dropped
    assert json.loads(result.label_files[0].read_text())["Val"] == {}
    assert result.num_utterances == len(EXPECTED) == 8
    assert result.class_counts == {"anger": 1, "happy": 2, "neutral": 3, "sad": 2}


def test_metalabel(release: Path, tmp_path: Path) -> None:
    result = prepare_iemocap(_config(release, tmp_path / "out"))
    meta = json.loads(result.metalabel_path.read_text())
    assert sorted(meta) == sorted(EXPECTED)
    entry = meta["Ses01F_impro01_M000.wav"]
    assert entry == {
        "label": "anger",
        "emotion": "ang",
        "session": 1,
        "speaker": "Ses01M",  # the speaker, not the dialog's marker wearer (F)
        "dialog": "Ses01F_impro01",
        "source": "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_M000.wav",
        "start": 7.7901,
        "end": 8.3401,
        "duration": 0.55,
    }
    assert meta["Ses02M_script01_1_M000.wav"]["speaker"] == "Ses02M"
    assert meta["Ses02M_script01_1_M000.wav"]["duration"] == pytest.approx(0.45, abs=1e-4)
    assert meta["Ses01F_impro01_F001.wav"]["emotion"] == "exc"


def test_output_dir_may_exist(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    prepare_iemocap(_config(release, out))
    assert (out / "notes.txt").read_text() == "mine"


def test_missing_wav_of_a_dropped_utterance_is_fine(release: Path, tmp_path: Path) -> None:
    dropped = next(u for u in UTTERANCES if u.emotion == "xxx")
    _source(release, dropped).unlink()
    result = prepare_iemocap(_config(release, tmp_path / "out"))
    assert result.num_utterances == len(EXPECTED)


# --- reruns ---------------------------------------------------------------------------------


def test_second_run_converts_nothing(release: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    first = prepare_iemocap(_config(release, out))
    assert (first.num_converted, first.num_up_to_date) == (8, 0)
    before = _mtimes(out)
    with caplog.at_level(logging.INFO, logger="ser.data.iemocap"):
        second = prepare_iemocap(_config(release, out))
    assert (second.num_converted, second.num_up_to_date) == (0, 8)
    assert _mtimes(out) == before  # not a single file rewritten, label files included
    assert f"IEMOCAP already prepared in {out} (8 files up to date); nothing to do" in caplog.text


def test_stale_outputs_are_redone(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_iemocap(_config(release, out))
    audio = out / "Audio_16k"
    (audio / "Ses01F_impro01_F000.wav").unlink()  # output deleted
    (audio / "Ses03F_impro02_M000.wav").write_bytes(b"overwritten by someone")  # output changed
    edited = next(u for u in UTTERANCES if u.name == "Ses02M_script01_1_M000")
    sf.write(_source(release, edited), np.zeros(22_050, np.float32), 44_100)  # source changed
    untouched = audio / "Ses01F_impro01_M000.wav"
    before = untouched.stat().st_mtime_ns

    result = prepare_iemocap(_config(release, out))

    assert (result.num_converted, result.num_up_to_date) == (3, 5)
    assert untouched.stat().st_mtime_ns == before
    assert sf.info(audio / "Ses03F_impro02_M000.wav").frames == 6400
    assert sf.info(audio / f"{edited.name}.wav").frames == 8000
    meta = json.loads((out / "metalabel.json").read_text())
    assert meta[f"{edited.name}.wav"]["duration"] == 0.5


def test_interrupted_run_resumes(release: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    real_convert = iemocap._convert
    calls = []

    def fail_on_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_convert(*args)

    monkeypatch.setattr(iemocap, "_convert", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_iemocap(_config(release, out))
    assert not (out / "labels_sess").exists()  # folds only once all their audio is there
    monkeypatch.setattr(iemocap, "_convert", real_convert)
    result = prepare_iemocap(_config(release, out))
    assert (result.num_converted, result.num_up_to_date) == (6, 2)


def test_folds_of_removed_sessions_are_removed(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_iemocap(_config(release, out))
    shutil.rmtree(release / "Session3")
    result = prepare_iemocap(_config(release, out))
    assert sorted(p.name for p in (out / "labels_sess").iterdir()) == [
        "label_1.json",
        "label_2.json",
    ]
    assert result.num_converted == 0
    fold = json.loads((out / "labels_sess" / "label_1.json").read_text())
    assert not any(name.startswith("Ses03") for name in fold["Train"])


# --- bad layouts: clear errors, nothing written ---------------------------------------------


def _no_release(root: Path) -> Path:
    shutil.rmtree(root)
    return root


def _a_file(root: Path) -> Path:
    shutil.rmtree(root)
    root.write_text("not a folder")
    return root


def _no_sessions(root: Path) -> Path:
    for session in root.glob("Session*"):
        shutil.rmtree(session)
    return root


def _parent_of_release(root: Path) -> tuple[Path, Path]:
    return root.parent, root.parent  # a common mistake: the folder that holds the release


def _no_sentences(root: Path) -> Path:
    shutil.rmtree(root / "Session2" / "sentences")
    return root / "Session2" / "sentences" / "wav"


def _no_evaluation(root: Path) -> Path:
    shutil.rmtree(root / "Session3" / "dialog" / "EmoEvaluation")
    return root / "Session3" / "dialog" / "EmoEvaluation"


def _empty_evaluation(root: Path) -> Path:
    for path in (root / "Session1" / "dialog" / "EmoEvaluation").glob("*.txt"):
        path.unlink()
    return root / "Session1" / "dialog" / "EmoEvaluation"


def _missing_wavs(root: Path) -> Path:
    shutil.rmtree(root / "Session1" / "sentences" / "wav" / "Ses01F_impro01")
    return _source(root, UTTERANCES[0])


def _corrupt_wav(root: Path) -> Path:
    path = _source(root, UTTERANCES[5])
    path.write_bytes(b"RIFF....WAVE but nothing sensible after it")
    return path


def _too_short_wav(root: Path) -> Path:
    path = _source(root, UTTERANCES[6])
    sf.write(path, np.zeros(1000, np.float32), 44_100)  # 362 samples at 16 kHz
    return path


def _nothing_kept(root: Path) -> Path:
    for path in root.glob("Session*/dialog/EmoEvaluation/Ses*.txt"):
        text = path.read_text()
        for code in KEPT:
            text = text.replace(f"\t{code}\t", "\tfru\t")
        path.write_text(text)
    return root


def _one_session(root: Path) -> Path:
    shutil.rmtree(root / "Session2")
    shutil.rmtree(root / "Session3")
    return root


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (_no_release, "does not exist"),
        (_a_file, "is not a directory"),
        (_no_sessions, r"has no Session<N> folders \(it holds: Documentation\)"),
        (_parent_of_release, "did you mean .*IEMOCAP_full_release"),
        (_no_sentences, "is incomplete; not found"),
        (_no_evaluation, "is incomplete; not found"),
        (_empty_evaluation, r"is incomplete; not found: .*EmoEvaluation/\*\.txt"),
        (_missing_wavs, r"3 of 8 kept IEMOCAP utterances .* cannot be prepared"),
        (_corrupt_wav, "not readable as audio"),
        (_too_short_wav, r"(?s)shorter than 400 samples.*\(1000 samples at 44100 Hz\)"),
        (_nothing_kept, r"no utterance with a kept emotion .*found: fru x9, xxx x1, sur x1"),
        (_one_session, r"only session\(s\) \[1\] have kept utterances"),
    ],
)
def test_bad_layout(release: Path, tmp_path: Path, damage, pattern: str) -> None:
    # A damage returns the path the message must name, or (folder to pass, path to name).
    damaged = damage(release)
    given, named = damaged if isinstance(damaged, tuple) else (release, damaged)
    out = tmp_path / "out"
    with pytest.raises(SerInputError, match=pattern) as info:
        prepare_iemocap(_config(given, out))
    message = str(info.value)
    assert str(named) in message
    assert "IEMOCAP_full_release/\n    Session1/" in message  # the expected tree
    assert "sentences/wav/<dialog>/<utterance>.wav" in message
    assert not out.exists()


def test_missing_wavs_are_listed_with_count(release: Path, tmp_path: Path) -> None:
    removed = [u for u in UTTERANCES if u.emotion in KEPT and u.session > 1]
    for utt in removed:
        _source(release, utt).unlink()
    with pytest.raises(SerInputError) as info:
        prepare_iemocap(_config(release, tmp_path / "out"))
    message = str(info.value)
    assert "missing (no such file): 5 file(s)" in message
    assert "named in Ses02M_script01_1.txt" in message
    assert "re-extract the release" in message
    assert all(str(_source(release, utt)) in message for utt in removed)
    assert "Ses01F_impro01_M000" not in message


def test_unset_directories(release: Path, tmp_path: Path) -> None:
    with pytest.raises(SerInputError, match="iemocap_dir is not set"):
        prepare_iemocap(PrepareIemocapConfig(iemocap_dir="", output_dir=str(tmp_path)))
    with pytest.raises(SerInputError, match="output_dir is not set"):
        prepare_iemocap(PrepareIemocapConfig(iemocap_dir=str(release), output_dir=""))


def test_output_dir_that_is_a_file(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("x")
    with pytest.raises(SerInputError, match=f"output_dir {out} exists and is not a directory"):
        prepare_iemocap(_config(release, out))


def test_utterance_in_two_evaluation_files(release: Path, tmp_path: Path) -> None:
    folder = release / "Session1" / "dialog" / "EmoEvaluation"
    (folder / "copy_of_impro01.txt").write_text((folder / "Ses01F_impro01.txt").read_text())
    with pytest.raises(SerInputError, match=r"3 utterances appear in more than one") as info:
        prepare_iemocap(_config(release, tmp_path / "out"))
    assert "Ses01F_impro01_F000 (Ses01F_impro01, copy_of_impro01)" in str(info.value)


def test_errors_come_before_any_write(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_iemocap(_config(release, out))
    before = _mtimes(out)
    os.remove(_source(release, UTTERANCES[0]))
    with pytest.raises(SerInputError):
        prepare_iemocap(_config(release, out))
    assert _mtimes(out) == before


def test_removed_session_fold_goes_even_after_an_interruption(
    release: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "out"
    prepare_iemocap(_config(release, out))
    shutil.rmtree(release / "Session3")
    (out / "Audio_16k" / "Ses01F_impro01_F000.wav").unlink()  # some work for the next run
    real_convert = iemocap._convert

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(iemocap, "_convert", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_iemocap(_config(release, out))
    monkeypatch.setattr(iemocap, "_convert", real_convert)
    result = prepare_iemocap(_config(release, out))
    assert result.num_converted == 1
    assert sorted(p.name for p in (out / "labels_sess").iterdir()) == [
        "label_1.json",
        "label_2.json",
    ]
