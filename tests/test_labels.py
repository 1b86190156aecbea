from __future__ import annotations

import json
from pathlib import Path

import pytest

from ser.data.labels import read_label_dir, read_label_file, write_label_file
from ser.errors import SerInputError


@pytest.fixture()
def audio_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "audio"
    folder.mkdir()
    for name in ("a.wav", "b.wav", "c.wav", "d.wav"):
        (folder / name).write_bytes(b"")
    return folder


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_round_trip_and_empty_split_skipped(tmp_path: Path, audio_dir: Path) -> None:
    path = tmp_path / "fold.json"
    write_label_file(path, {"Train": {"a.wav": "sad", "b.wav": "happy"}, "Test": {"c.wav": "sad"}})
    fold = read_label_file(path, audio_dir, classes=["happy", "sad"])
    assert fold.train == {"a.wav": "sad", "b.wav": "happy"}
    assert fold.val == {}
    assert fold.test == {"c.wav": "sad"}
    assert fold.classes() == ["happy", "sad"]
    assert json.loads(path.read_text())["Val"] == {}


def test_write_is_atomic_and_keeps_old_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "fold.json"
    write_label_file(path, {"Train": {"a.wav": "sad"}})
    before = path.read_text()
    with pytest.raises(TypeError):
        write_label_file(path, {"Train": {"a.wav": object()}})  # type: ignore[dict-item]
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["fold.json"]  # no temp file left behind


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"Train": {"a.wav": "sad",}')
    with pytest.raises(SerInputError, match=r"bad\.json is not valid JSON \(line 1"):
        read_label_file(path)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ([1, 2], "holds a JSON list"),
        ({"train": {"a.wav": "sad"}}, r"unknown keys \['train'\]"),
        ({"Train": {}, "Test": {"a.wav": "sad"}}, "'Train' is empty"),
        ({"Train": ["a.wav"]}, "'Train' is a list"),
        ({"Train": {"a.wav": 3}}, "not a non-empty string, e.g. a.wav"),
    ],
)
def test_bad_structure(tmp_path: Path, content: object, pattern: str) -> None:
    with pytest.raises(SerInputError, match=pattern):
        read_label_file(_write(tmp_path / "f.json", content))


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.wav", "sub/../../x.wav"])
def test_path_escaping_audio_dir(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / "f.json", {"Train": {name: "sad", "a.wav": "sad"}})
    with pytest.raises(SerInputError, match="absolute or leave the audio directory") as info:
        read_label_file(path)
    assert name in str(info.value)


def test_label_outside_classes(tmp_path: Path) -> None:
    path = _write(tmp_path / "f.json", {"Train": {"a.wav": "sad", "b.wav": "bored"}})
    with pytest.raises(SerInputError, match=r"b\.wav=bored"):
        read_label_file(path, classes=["sad", "happy"])


def test_file_in_two_splits(tmp_path: Path) -> None:
    path = _write(tmp_path / "f.json", {"Train": {"a.wav": "sad"}, "Test": {"a.wav": "sad"}})
    with pytest.raises(SerInputError, match="in both 'Train' and 'Test', e.g. a.wav"):
        read_label_file(path)


def test_missing_audio_lists_first_few_and_count(tmp_path: Path, audio_dir: Path) -> None:
    train = {f"missing{i}.wav": "sad" for i in range(8)} | {"a.wav": "sad"}
    path = _write(tmp_path / "f.json", {"Train": train})
    with pytest.raises(SerInputError) as info:
        read_label_file(path, audio_dir)
    message = str(info.value)
    assert "8 audio files are missing" in message
    assert "missing0.wav" in message and "(and 3 more)" in message
    assert "missing7.wav" not in message


def test_label_dir_sorted_naturally(tmp_path: Path) -> None:
    folder = tmp_path / "labels"
    for i in (10, 2, 1):
        write_label_file(folder / f"label_{i}.json", {"Train": {f"{i}.wav": "sad"}})
    assert [f.name for f in read_label_dir(folder)] == ["label_1", "label_2", "label_10"]


def test_label_dir_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(SerInputError, match="does not exist"):
        read_label_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SerInputError, match="no \\*.json label files"):
        read_label_dir(tmp_path / "empty")
