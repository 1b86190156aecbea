"""IEMOCAP's class setups, label maps and speaker folds (the default is tests/test_iemocap.py's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_iemocap import UTTERANCES, make_release

from ser.config import PrepareIemocapConfig
from ser.data.iemocap import CLASS_SETUPS, prepare_iemocap
from ser.data.labels import read_label_dir
from ser.errors import SerInputError

SETUPS = {
    "4": {"neu": "neutral", "ang": "anger", "exc": "happy", "hap": "happy", "sad": "sad"},
    "4-no-exc": {"neu": "neutral", "ang": "anger", "hap": "happy", "sad": "sad"},
    "5": {"neu": "neutral", "ang": "anger", "exc": "excited", "hap": "happy", "sad": "sad"},
    "6": {
        "neu": "neutral", "ang": "anger", "exc": "excited", "hap": "happy", "sad": "sad",
        "fru": "frustrated",
    },
}  # fmt: skip


@pytest.fixture()
def release(tmp_path: Path) -> Path:
    return make_release(tmp_path / "IEMOCAP_full_release")


def _config(root: Path, out: Path, **kwargs: str) -> PrepareIemocapConfig:
    return PrepareIemocapConfig(iemocap_dir=str(root), output_dir=str(out), **kwargs)


def _expected(mapping: dict[str, str]) -> dict[str, str]:
    return {f"{u.name}.wav": mapping[u.emotion] for u in UTTERANCES if u.emotion in mapping}


def _all_labels(out: Path, folder: str = "labels_sess") -> dict[str, str]:
    labels: dict[str, str] = {}
    for path in (out / folder).glob("*.json"):
        labels.update(json.loads(path.read_text())["Test"])
    return labels


def test_setups_are_the_documented_ones() -> None:
    assert CLASS_SETUPS == SETUPS


@pytest.mark.parametrize("setup", list(SETUPS))
def test_class_setup(release: Path, tmp_path: Path, setup: str) -> None:
    out = tmp_path / "out"
    result = prepare_iemocap(_config(release, out, classes_setup=setup))
    assert _all_labels(out) == _expected(SETUPS[setup])
    assert sorted(p.name for p in result.audio_dir.iterdir()) == sorted(_expected(SETUPS[setup]))
    assert sorted(result.class_counts) == sorted(set(SETUPS[setup].values()))


def test_default_is_setup_4_with_session_folds(release: Path, tmp_path: Path) -> None:
    prepare_iemocap(_config(release, tmp_path / "default"))
    prepare_iemocap(_config(release, tmp_path / "four", classes_setup="4", folds="session"))
    for name in ("labels_sess/label_1.json", "labels_sess/label_3.json", "metalabel.json"):
        default = (tmp_path / "default" / name).read_bytes()
        assert default == (tmp_path / "four" / name).read_bytes()


def test_inline_label_map_replaces_the_setup(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_iemocap(_config(release, out, classes_setup="6", label_map="ang=neg, sad=neg, hap=pos"))
    assert _all_labels(out) == _expected({"ang": "neg", "sad": "neg", "hap": "pos"})


def test_label_map_file(release: Path, tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    mapping = {"neu": "calm", "sur": "surprise", "ang": "anger"}
    path.write_text(json.dumps(mapping))
    prepare_iemocap(_config(release, tmp_path / "out", label_map=str(path)))
    assert _all_labels(tmp_path / "out") == _expected(mapping)


def test_label_map_file_that_is_missing(release: Path, tmp_path: Path) -> None:
    with pytest.raises(SerInputError, match="label_map file"):
        prepare_iemocap(_config(release, tmp_path / "out", label_map=str(tmp_path / "no.json")))
    assert not (tmp_path / "out").exists()


def test_speaker_folds(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = prepare_iemocap(_config(release, out, folds="speaker"))
    speakers = ["Ses01F", "Ses01M", "Ses02F", "Ses02M", "Ses03F", "Ses03M"]
    assert [p.name for p in result.label_files] == [f"label_{s}.json" for s in speakers]
    assert not (out / "labels_sess").exists()
    folds = read_label_dir(out / "labels_spk", audio_dir=result.audio_dir)
    expected = _expected(SETUPS["4"])
    for speaker, fold in zip(speakers, folds, strict=True):
        mine = {k for k in expected if k[:5] == speaker[:5] and k.split("_")[-1][0] == speaker[-1]}
        assert set(fold.test) == mine and set(fold.train) == set(expected) - mine
        assert fold.val == {}
    assert _all_labels(out, "labels_spk") == expected


def test_switching_folds_in_one_output_keeps_one_setup(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_iemocap(_config(release, out))
    prepare_iemocap(_config(release, out, folds="speaker"))
    assert list((out / "labels_sess").glob("*.json")) == []
    assert len(list((out / "labels_spk").glob("*.json"))) == 6
    again = prepare_iemocap(_config(release, out))
    assert again.num_converted == 0
    assert list((out / "labels_spk").glob("*.json")) == []
    assert len(list((out / "labels_sess").glob("*.json"))) == 3


@pytest.mark.parametrize(("field", "value"), [("classes_setup", "7"), ("folds", "dialog")])
def test_bad_options_are_refused(field: str, value: str) -> None:
    config = PrepareIemocapConfig(iemocap_dir="x", output_dir="y", **{field: value})
    with pytest.raises(SerInputError, match=field):
        config.check()
