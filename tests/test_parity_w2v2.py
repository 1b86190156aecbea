"""Our fairseq loader against fairseq itself: checkpoints and outputs written by real fairseq
(tests/parity/make_fixtures.py) must be reproduced by transformers' Wav2Vec2Model, every layer.

Layout of ``<name>_outputs.npz``: ``input`` [B, samples] (padding zeroed), ``attention_mask``
[B, samples], ``frame_padding_mask`` [B, T] (True = padding), ``extract_features`` (after the
feature layer norm), ``layer_0`` .. ``layer_L`` (encoder input, then each layer's output) and
``last_hidden_state``. For layer-norm-first models ``layer_L`` is the last layer's output
without the encoder's final layer norm, as transformers 5 returns ``hidden_states[L]`` (4.x put
the normed tensor there); ``last_hidden_state`` has the norm. tests/parity/README.md has more.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ser.models.backbones import load_backbone

FIXTURES = Path(__file__).parent / "fixtures"
CASES = {
    "fairseq_w2v2_tiny.pt": "fairseq_w2v2_tiny_outputs.npz",  # new format (cfg dict)
    "fairseq_w2v2_tiny_args.pt": "fairseq_w2v2_tiny_outputs.npz",  # old format (Namespace)
    "fairseq_w2v2_tiny_lnf.pt": "fairseq_w2v2_tiny_lnf_outputs.npz",  # large-like
}
TOLERANCE = 1e-4


def _fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: generate it with tests/parity/make_fixtures.py")
    return path


@pytest.mark.parametrize("checkpoint", CASES)
def test_every_layer_matches_fairseq(checkpoint: str) -> None:
    model = load_backbone(str(_fixture(checkpoint))).eval()
    expected = np.load(_fixture(CASES[checkpoint]))
    wav = torch.from_numpy(expected["input"])
    attention_mask = torch.from_numpy(expected["attention_mask"])
    with torch.no_grad():
        out = model(wav, attention_mask=attention_mask, output_hidden_states=True)
    layers = model.config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1
    got = {f"layer_{i}": h for i, h in enumerate(out.hidden_states)}
    got["extract_features"] = out.extract_features
    got["last_hidden_state"] = out.last_hidden_state
    for name, tensor in got.items():
        reference = torch.from_numpy(expected[name])
        assert tensor.shape == reference.shape, name
        # Padded frames included: both implementations compute them the same way.
        diff = (tensor - reference).abs().max().item()
        assert diff < TOLERANCE, f"{checkpoint} {name}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("checkpoint", CASES)
def test_frame_mask_matches_fairseq(checkpoint: str) -> None:
    model = load_backbone(str(_fixture(checkpoint)))
    expected = np.load(_fixture(CASES[checkpoint]))
    padding = torch.from_numpy(expected["frame_padding_mask"])
    frame_mask = model._get_feature_vector_attention_mask(
        padding.shape[1], torch.from_numpy(expected["attention_mask"])
    )
    assert torch.equal(frame_mask, ~padding)
