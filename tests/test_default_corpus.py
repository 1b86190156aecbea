"""The first command works: default data paths get the demo corpus; chosen ones are never made
up."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ser.config import DataConfig, FinetuneEntry, PtaptMethodConfig
from ser.data import default_corpus
from ser.data.synthetic import METADATA_NAME
from ser.errors import SerInputError


def test_missing_default_data_is_built_where_the_defaults_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # the defaults are relative: data/demo/...
    with caplog.at_level(logging.INFO, logger="ser"):
        default_corpus.ensure_data(PtaptMethodConfig(), "ptapt")
    defaults = DataConfig()
    assert (tmp_path / defaults.datadir).is_dir()
    assert sorted(p.name for p in (tmp_path / defaults.labeldir).iterdir()) == [
        f"fold_{k}.json" for k in range(1, 5)]
    assert "ptapt: no datadir given and data/demo is missing: building" in caplog.text
    record = (tmp_path / "data" / "demo" / METADATA_NAME).stat().st_mtime_ns

    default_corpus.ensure_data(FinetuneEntry(), "finetune")  # there now: left as it is
    assert (tmp_path / "data" / "demo" / METADATA_NAME).stat().st_mtime_ns == record


def test_an_incomplete_default_corpus_is_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill while it was built leaves files but no record: the next command builds again."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / DataConfig().datadir).mkdir(parents=True)
    (tmp_path / DataConfig().labeldir).mkdir(parents=True)
    built: list[str] = []
    monkeypatch.setattr(default_corpus, "generate_corpus", lambda c: built.append(c.output_dir))
    default_corpus.ensure_data(PtaptMethodConfig(), "ptapt")
    assert built == ["data/demo"]


@pytest.mark.parametrize(("given", "message"), [
    ({"datadir": "elsewhere/Audio_16k"}, "datadir='elsewhere/Audio_16k' is not a directory"),
    ({"labeldir": "elsewhere/labels"}, "labeldir='elsewhere/labels' is not a directory"),
])
def test_a_missing_folder_the_user_named_is_refused_with_the_entry_point_that_makes_it(
    given: dict[str, str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "demo" / "Audio_16k").mkdir(parents=True)
    with pytest.raises(SerInputError, match=message) as raised:
        default_corpus.ensure_data(PtaptMethodConfig(**given), "ptapt")
    assert "-e demo_corpus" in str(raised.value) and "-e prepare_iemocap" in str(raised.value)
    assert not (tmp_path / "data" / "demo" / "labels").exists()  # nothing made up
