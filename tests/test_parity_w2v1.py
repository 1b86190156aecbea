"""ser's wav2vec 1.0 port against fairseq's own outputs (tests/parity/make_fixtures.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ser.models.wav2vec1 import load_wav2vec1

FIXTURES = Path(__file__).parent / "fixtures"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def fairseq_outputs() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "fairseq_w2v1_tiny_outputs.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.mark.parametrize(
    "checkpoint",
    [
        "fairseq_w2v1_tiny.pt",  # every option present
        "fairseq_w2v1_tiny_oldargs.pt",  # later options missing, layer specs as list arithmetic
    ],
)
def test_port_matches_fairseq(checkpoint: str, fairseq_outputs: dict[str, np.ndarray]) -> None:
    model = load_wav2vec1(FIXTURES / checkpoint).eval()
    with torch.no_grad():
        z, c = model(torch.from_numpy(fairseq_outputs["input"]))
    assert "fairseq" not in sys.modules
    assert z.shape == fairseq_outputs["z"].shape
    assert c.shape == fairseq_outputs["c"].shape
    assert np.abs(z.numpy() - fairseq_outputs["z"]).max() <= TOLERANCE
    assert np.abs(c.numpy() - fairseq_outputs["c"]).max() <= TOLERANCE


def test_fixture_outputs_are_not_degenerate(fairseq_outputs: dict[str, np.ndarray]) -> None:
    # A comparison against near-constant arrays would prove little.
    for key in ("z", "c"):
        values = fairseq_outputs[key]
        assert values.std() > 0.1
        assert np.abs(values[0] - values[1]).max() > 0.1
