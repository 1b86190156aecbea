"""Safe loading of PyTorch and fairseq checkpoints: no pickle may run arbitrary code."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ser.atomic import atomic_path
from ser.errors import SerInputError

# fairseq checkpoints hold plain containers and tensors, plus an argparse.Namespace of options
# in the older format (wav2vec_large.pt, wav2vec_small.pt). Nothing else is needed to read them.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+)")


def safe_torch_load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and only :data:`SAFE_GLOBALS` allowed."""
    file = Path(path)
    if not file.is_file():
        raise SerInputError(f"checkpoint {file}: no such file; pass the path of a .pt/.ckpt file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not _UNSAFE_GLOBAL.search(str(err)):
            raise _not_a_checkpoint(file, err) from err
        raise SerInputError(
            f"checkpoint {file} needs objects that are not safe to unpickle "
            f"({_unsafe_global(err)}); only tensors, plain containers and argparse.Namespace are "
            "accepted. Re-save it with plain types, e.g. "
            "torch.save({'model': model.state_dict()}, path)."
        ) from err
    except Exception as err:  # torch raises KeyError, RuntimeError, ... on non-checkpoints
        raise _not_a_checkpoint(file, err) from err
    if not isinstance(obj, dict):
        raise SerInputError(
            f"checkpoint {file} holds a {type(obj).__name__}, expected a dict "
            "(a fairseq checkpoint with 'model', or a Lightning checkpoint with 'state_dict')."
        )
    return obj


def save_state_dict(module: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``module``'s state dict to ``path`` atomically, every tensor detached on the CPU.

    Only plain tensors in a dict are written, so :func:`safe_torch_load` (``weights_only=True``)
    reads the file back on any machine, whatever device the module was trained on.
    """
    target = Path(path)
    state = {key: value.detach().cpu() for key, value in module.state_dict().items()}
    with atomic_path(target) as tmp:
        torch.save(state, tmp)
    return target


def _not_a_checkpoint(file: Path, err: BaseException) -> SerInputError:
    return SerInputError(
        f"checkpoint {file} is not a PyTorch checkpoint ({type(err).__name__}: "
        f"{_first_line(err)}); expected a file written by torch.save "
        "(a fairseq .pt or a Lightning .ckpt)."
    )


def _unsafe_global(err: BaseException) -> str:
    match = _UNSAFE_GLOBAL.search(str(err))
    return f"global {match.group(1)}" if match else _first_line(err)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else "no message"


def fairseq_model_options(checkpoint: dict[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """The model options of a fairseq checkpoint, from either of its two formats.

    Older checkpoints carry ``args`` (an argparse.Namespace of every training and model option);
    newer ones carry ``cfg``, a plain dict whose ``model`` section holds the model options.
    """
    cfg = checkpoint.get("cfg")
    for options in (cfg.get("model") if isinstance(cfg, dict) else None, checkpoint.get("args")):
        if isinstance(options, argparse.Namespace):
            return dict(vars(options))
        if isinstance(options, dict):
            return dict(options)
    raise SerInputError(
        f"{source} has neither 'args' nor 'cfg' with model options (keys: {sorted(checkpoint)}); "
        "expected a fairseq checkpoint as written by fairseq-train."
    )


def read_saved_config(
    directory: str | os.PathLike[str], files: tuple[str, str], format_tag: str, what: str,
    remedy: str,
) -> dict[str, Any]:
    """The ``config.json`` object of a model directory saved by ser, checked.

    ``files``: the config and weights file names, both required; ``format_tag``: the
    ``"format"`` the config must carry; ``what``/``remedy`` finish the error messages.
    """
    folder = Path(directory)
    config_file, weights_file = files
    config_path = folder / config_file
    if not config_path.is_file() or not (folder / weights_file).is_file():
        raise SerInputError(
            f"{folder} is not a saved {what}: it lacks {config_file} or {weights_file}; {remedy}"
        )
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SerInputError(f"{config_path} is not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != format_tag:
        raise SerInputError(
            f'{config_path} is not a saved {what} config (expected "format": "{format_tag}")'
        )
    return meta
