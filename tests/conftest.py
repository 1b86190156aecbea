from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from ser.config import DemoCorpusConfig
from ser.data.synthetic import DemoCorpus, generate_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> DemoCorpus:
    """The small corpus most tests train on: 3 speakers (3 leave-one-speaker-out folds, each
    with a Val speaker) x 4 classes x 2 utterances of 1.0-2.0 s. Shared by every test module:
    a test that needs other files copies what it needs elsewhere, never writes here."""
    return generate_corpus(DemoCorpusConfig(
        output_dir=str(tmp_path_factory.mktemp("shared") / "corpus"), num_speakers=3,
        utterances_per_class=2, min_seconds=1.0, max_seconds=2.0,
    ))  # fmt: skip


@pytest.fixture()
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh SQLite tracking store with its artifacts under tmp_path."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)  # the default artifact root ./mlruns lands in tmp_path
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
