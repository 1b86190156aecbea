from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

from ser.atomic import atomic_path, atomic_write_json
from ser.checkpoints import fairseq_model_options, safe_torch_load, save_state_dict
from ser.errors import SerInputError


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo unpickled-code-ran",))


def test_fairseq_style_checkpoint_with_namespace_loads(tmp_path: Path) -> None:
    path = tmp_path / "w2v.pt"
    torch.save({"args": argparse.Namespace(arch="wav2vec"), "model": {"w": torch.ones(2)}}, path)
    checkpoint = safe_torch_load(path)
    assert checkpoint["args"].arch == "wav2vec"
    assert torch.equal(checkpoint["model"]["w"], torch.ones(2))


def test_arbitrary_global_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": _Payload()}, path)
    with pytest.raises(SerInputError, match=r"evil\.pt needs objects .*global posix\.system"):
        safe_torch_load(path)
    assert "unpickled-code-ran" not in capfd.readouterr().out


@pytest.mark.parametrize(
    "content", [b"hello", b"", b"PK\x03\x04broken zip", b"not a checkpoint", b"\x00\x01\x02"]
)
def test_not_a_checkpoint(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(SerInputError, match=r"x\.pt is not a PyTorch checkpoint"):
        safe_torch_load(path)


def test_missing_file_and_non_dict(tmp_path: Path) -> None:
    with pytest.raises(SerInputError, match="no such file"):
        safe_torch_load(tmp_path / "none.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(SerInputError, match="holds a list, expected a dict"):
        safe_torch_load(tmp_path / "list.pt")


def test_fairseq_options_from_both_formats() -> None:
    old = {"args": argparse.Namespace(arch="wav2vec", log_compression=True)}
    new = {"cfg": {"model": {"_name": "wav2vec2", "encoder_layers": 2}, "task": {}}, "args": None}
    assert fairseq_model_options(old)["log_compression"] is True
    assert fairseq_model_options(new)["encoder_layers"] == 2
    with pytest.raises(SerInputError, match="neither 'args' nor 'cfg'"):
        fairseq_model_options({"model": {}}, "ckpt.pt")


def test_atomic_path_keeps_old_content_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"ua": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("killed")
    assert target.read_text().strip() == '{\n  "ua": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_atomic_writes_get_ordinary_permissions(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "summary.json", {})
    finally:
        os.umask(previous)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644


def test_saved_state_dict_loads_back_safely_and_leaves_no_temp_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    module(torch.randn(4, 3))  # moves the BatchNorm running statistics off their initial values
    target = tmp_path / "new_dir" / "model.pt"
    assert save_state_dict(module, target) == target
    loaded = safe_torch_load(target)
    expected = module.state_dict()
    assert list(loaded) == list(expected)
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)
    assert [p.name for p in target.parent.iterdir()] == ["model.pt"]
