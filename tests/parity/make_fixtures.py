"""Write tiny fairseq checkpoints and fairseq's outputs for them, for the parity tests.

The tests compare ``ser``'s fairseq-free ports and loaders against these files, so fairseq is
needed only here, once, in a separate virtual environment outside the repository::

    python3 -m venv /work/fairseq-venv
    /work/fairseq-venv/bin/pip install torch==2.13.0            # CPU wheel; always pin torch
    /work/fairseq-venv/bin/pip install -c <(echo torch==2.13.0) fairseq-fixed==0.12.3.1
    /work/fairseq-venv/bin/pip uninstall -y torchaudio          # its CUDA build does not import
    /work/fairseq-venv/bin/python -c "import torch; print(torch.__version__)"   # 2.13.0+cpu
    /work/fairseq-venv/bin/python tests/parity/make_fixtures.py

(fairseq 0.12.2 itself does not import on Python 3.11; fairseq-fixed builds from source in about
three minutes and pulls a CUDA torchaudio that breaks imports, hence the uninstall. The constraint
keeps pip from replacing the CPU torch.)

fairseq's ``checkpoint_utils`` calls ``torch.load`` without ``weights_only``, and torch 2.13 loads
safely by default, so fairseq cannot read an ``args`` checkpoint (it holds an
``argparse.Namespace``). The cross-check at the end of this script therefore forces
``weights_only=False`` while fairseq reads the files this script has just written; ``ser`` itself
always loads them with ``weights_only=True``.

``make_hubert_fixtures.py`` writes the HuBERT fixtures with the same environment and helpers.

Everything is seeded: running the script twice writes the same tensors. What each file holds is
described in ``tests/parity/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

from fairseq import checkpoint_utils, options, tasks  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SAMPLE_RATE = 16_000
W2V1_DIM = 16
# wav2vec_large.pt's structure, with 16 channels instead of 512.
W2V1_FEATURE_LAYERS = (
    [(W2V1_DIM, 10, 5), (W2V1_DIM, 8, 4)] + [(W2V1_DIM, 4, 2)] * 3 + [(W2V1_DIM, 1, 1)] * 2
)
W2V1_AGGREGATOR_LAYERS = [(W2V1_DIM, k, 1) for k in range(2, 14)]
# The same layers written the way old fairseq defaults were: list arithmetic in a string.
W2V1_FEATURE_EXPR = (
    f"[({W2V1_DIM}, 10, 5), ({W2V1_DIM}, 8, 4)]"
    f" + [({W2V1_DIM}, 4, 2)] * 3 + [({W2V1_DIM}, 1, 1)] * 2"
)
W2V1_AGGREGATOR_EXPR = " + ".join(f"[({W2V1_DIM}, {k}, 1)]" for k in range(2, 14))
# Model options that wav2vec 1.0 gained after wav2vec_large.pt was trained (vq-wav2vec, 2019-20).
W2V1_LATER_OPTIONS = (
    "activation",
    "vq_type",
    "vq_vars",
    "vq_groups",
    "vq_dim",
    "vq_depth",
    "combine_groups",
    "vq_temp",
    "vq_gamma",
    "infonce",
)

# wav2vec 2.0's full conv stack (320x downsampling) with few channels and a 2-layer encoder;
# conv channels differ from the encoder width so that the feature projection exists.
W2V2_CONV = "[(24, 10, 5)] + [(24, 3, 2)] * 4 + [(24, 2, 2)] * 2"
W2V2_COMMON = [
    "--encoder-layers", "2",
    "--encoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "4",
    "--conv-feature-layers", W2V2_CONV,
    "--conv-pos", "16",
    "--conv-pos-groups", "4",
    "--final-dim", "16",
    "--latent-vars", "8",
    "--latent-groups", "2",
]  # fmt: skip
W2V2_VARIANTS = {
    # base-like: group norm in the first conv layer, post-LN transformer
    "fairseq_w2v2_tiny": ["--extractor-mode", "default"],
    # large-like: layer norm in every conv layer, pre-LN transformer with a final layer norm
    "fairseq_w2v2_tiny_lnf": [
        "--extractor-mode",
        "layer_norm",
        "--layer-norm-first",
        "--conv-bias",
    ],  # fmt: skip
}


def main() -> None:
    np.random.seed(0)  # fairseq draws masks and negatives with numpy and torch
    FIXTURES.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    written += make_w2v1()
    for name, extra in W2V2_VARIANTS.items():
        written += make_w2v2(name, extra, also_args_format=name == "fairseq_w2v2_tiny")
    total = 0
    for path in written:
        size = path.stat().st_size
        total += size
        print(f"wrote {path.relative_to(FIXTURES.parents[1])}: {size / 1024:.1f} KiB")
    print(f"total {total / 1024:.1f} KiB in {len(written)} files")


# --- wav2vec 1.0 --------------------------------------------------------------------------


def make_w2v1() -> list[Path]:
    args = _training_args(
        [
            "--arch", "wav2vec", "--criterion", "wav2vec",
            "--conv-feature-layers", str(W2V1_FEATURE_LAYERS),
            "--conv-aggregator-layers", str(W2V1_AGGREGATOR_LAYERS),
            "--num-negatives", "10", "--prediction-steps", "12",
            "--lr", "1e-06", "--optimizer", "adam", "--lr-scheduler", "cosine",
            "--max-sample-size", "150000", "--max-tokens", "1500000",
        ]
    )  # fmt: skip
    # Set directly: fairseq 0.12 turns a flag whose default is True into store_false, so
    # "--log-compression" would switch it off; the 2019 parser used store_true flags.
    args.skip_connections_feat = True
    args.skip_connections_agg = True
    args.log_compression = True
    args.residual_scale = 0.5
    _fill_2019_wav2vec_options(args)
    for option, value in _later_wav2vec_defaults().items():
        setattr(args, option, value)

    torch.manual_seed(1)
    model = _build_from_args(args)
    optimizer_state = _one_training_step(model, lambda m, wav: _w2v1_loss(m, wav))
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}

    old_args = argparse.Namespace(**vars(args))
    for option in W2V1_LATER_OPTIONS:
        delattr(old_args, option)
    old_args.conv_feature_layers = W2V1_FEATURE_EXPR
    old_args.conv_aggregator_layers = W2V1_AGGREGATOR_EXPR

    full_path = FIXTURES / "fairseq_w2v1_tiny.pt"
    old_path = FIXTURES / "fairseq_w2v1_tiny_oldargs.pt"
    _save_checkpoint(full_path, {"args": args}, state, optimizer_state, "wav2vec")
    _save_checkpoint(old_path, {"args": old_args}, state, None, "wav2vec")

    wav = _waveforms(2, 8000, seed=2)
    model.eval()
    with torch.no_grad():
        z = model.feature_extractor(wav)
        c = model.feature_aggregator(z)
    for path in (full_path, old_path):
        _check_fairseq_reloads_w2v1(path, wav, z, c)
    out = FIXTURES / "fairseq_w2v1_tiny_outputs.npz"
    np.savez_compressed(out, input=wav.numpy(), z=z.numpy(), c=c.numpy())
    return [full_path, old_path, out]


def _fill_2019_wav2vec_options(args: argparse.Namespace) -> None:
    """Set every model option the 2019 fairseq (wav2vec_large.pt's) wrote, with its defaults."""
    defaults_2019: dict[str, Any] = {
        "prediction_steps": 12,
        "num_negatives": 1,
        "sample_distance": None,
        "cross_sample_negatives": 0,
        "dropout": 0.0,
        "dropout_features": 0.0,
        "dropout_agg": 0.0,
        "encoder": "cnn",
        "aggregator": "cnn",
        "skip_connections_feat": False,
        "skip_connections_agg": False,
        "residual_scale": 0.5,
        "gru_dim": 512,
        "no_conv_bias": False,
        "agg_zero_pad": False,
        "log_compression": False,
        "balanced_classes": False,
        "project_features": "none",
        "non_affine_group_norm": False,
        "offset": "auto",
    }
    for option, value in defaults_2019.items():
        if not hasattr(args, option):
            setattr(args, option, value)


def _later_wav2vec_defaults() -> dict[str, Any]:
    from fairseq.models.wav2vec.wav2vec import Wav2VecConfig

    fields = Wav2VecConfig.__dataclass_fields__
    values = {name: fields[name].default for name in W2V1_LATER_OPTIONS if name != "infonce"}
    values["vq_temp"] = str(tuple(values["vq_temp"]))  # argparse kept it as a string
    values["infonce"] = False
    return values


def _w2v1_loss(model: torch.nn.Module, wav: torch.Tensor) -> torch.Tensor:
    out = model(wav)
    logits, targets = out["cpc_logits"], out["cpc_targets"]
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float())


def _check_fairseq_reloads_w2v1(
    path: Path, wav: torch.Tensor, z: torch.Tensor, c: torch.Tensor
) -> None:
    """fairseq's own loader must read the file and give the same z and c."""
    with _unsafe_torch_load():
        models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    model = models[0].eval()
    with torch.no_grad():
        z2 = model.feature_extractor(wav)
        c2 = model.feature_aggregator(z2)
    assert torch.equal(z, z2) and torch.equal(c, c2), f"fairseq reload of {path} differs"


# --- wav2vec 2.0 --------------------------------------------------------------------------


def make_w2v2(name: str, extra: list[str], also_args_format: bool) -> list[Path]:
    args = _training_args(
        ["--arch", "wav2vec2", "--criterion", "wav2vec", "--infonce", "--lr", "0.0005",
         "--optimizer", "adam", "--lr-scheduler", "polynomial_decay", "--max-update", "400000",
         "--total-num-update", "400000",
         *W2V2_COMMON, *extra]
    )  # fmt: skip
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(3)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    _perturb(model)
    optimizer_state = _one_training_step(model, _w2v2_loss)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}

    cfg_dict = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    path = FIXTURES / f"{name}.pt"
    # Released checkpoints are often stripped of the optimizer state; keep one of each kind.
    kept_optimizer = optimizer_state if also_args_format else None
    _save_checkpoint(path, {"args": None, "cfg": cfg_dict}, state, kept_optimizer, "wav2vec")
    paths = [path]
    if also_args_format:
        args_path = FIXTURES / f"{name}_args.pt"
        _save_checkpoint(args_path, {"args": args}, state, None, "wav2vec")
        paths.append(args_path)

    wav, padding_mask = _padded_batch(seed=4)
    model.eval()
    arrays = _w2v2_outputs(model, wav, padding_mask)
    for checkpoint in paths:
        _check_fairseq_reloads_w2v2(checkpoint, wav, padding_mask, arrays["last_hidden_state"])
    out = FIXTURES / f"{name}_outputs.npz"
    np.savez_compressed(out, **arrays)
    return [*paths, out]


def _w2v2_loss(model: torch.nn.Module, wav: torch.Tensor) -> torch.Tensor:
    # fairseq draws time masks from an unseeded numpy generator: pass fixed ones instead.
    frames = model._get_feat_extract_output_lengths(torch.tensor(wav.size(1))).item()
    mask = torch.zeros(wav.size(0), int(frames), dtype=torch.bool)
    mask[:, 5:15] = True
    mask[:, 25:35] = True
    out = model(wav, mask_indices=mask)
    logits = out["x"]  # [copies, B, T] similarities, positive first
    logits = logits.transpose(0, 2).reshape(-1, logits.size(0))
    target = torch.zeros(logits.size(0), dtype=torch.long)
    return torch.nn.functional.cross_entropy(logits, target)


def _w2v2_outputs(
    model: torch.nn.Module, wav: torch.Tensor, padding_mask: torch.Tensor
) -> dict[str, np.ndarray]:
    """fairseq's outputs, laid out as transformers' Wav2Vec2Model would return them."""
    encoder = model.encoder
    captured: dict[str, torch.Tensor] = {}

    def grab_encoder_input(_module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        captured["layer_0"] = inputs[0]  # time-first, maybe padded to required_seq_len_multiple

    hook = encoder.layers[0].register_forward_pre_hook(grab_encoder_input)
    with torch.no_grad():
        res = model.extract_features(wav, padding_mask, mask=False)
    hook.remove()

    x = res["x"]
    frames = x.size(1)
    layers = [captured["layer_0"][:frames].transpose(0, 1)]
    layers += [result[0].transpose(0, 1) for result in res["layer_results"]]
    # Layer-norm-first models apply a final layer norm to the last layer's output; transformers
    # 5 leaves it out of hidden_states[-1] (4.x put it in) and returns it as last_hidden_state.
    with torch.no_grad():
        last = encoder.layer_norm(layers[-1]) if encoder.layer_norm_first else layers[-1]
    assert torch.equal(last, x)
    frame_padding = res["padding_mask"]
    arrays: dict[str, np.ndarray] = {
        "input": wav.numpy(),
        "padding_mask": padding_mask.numpy(),
        "attention_mask": (~padding_mask).to(torch.int64).numpy(),
        "frame_padding_mask": frame_padding.numpy(),
        "extract_features": res["features"].numpy(),
        "last_hidden_state": x.numpy(),
    }
    for index, layer in enumerate(layers):
        arrays[f"layer_{index}"] = layer.numpy()
    return arrays


def _check_fairseq_reloads_w2v2(
    path: Path, wav: torch.Tensor, padding_mask: torch.Tensor, expected: np.ndarray
) -> None:
    with _unsafe_torch_load():
        models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    model = models[0].eval()
    with torch.no_grad():
        x = model.extract_features(wav, padding_mask, mask=False)["x"]
    assert np.array_equal(x.numpy(), expected), f"fairseq reload of {path} differs"


# --- shared helpers -----------------------------------------------------------------------


def _training_args(model_args: list[str]) -> argparse.Namespace:
    """A Namespace as fairseq-train's argument parser makes it (what ``args`` checkpoints hold)."""
    parser = options.get_training_parser()
    common = ["/data/librispeech", "--task", "audio_pretraining", "--seed", "1"]
    return options.parse_args_and_arch(parser, input_args=common + model_args)


def _build_from_args(args: argparse.Namespace) -> torch.nn.Module:
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    _perturb(model)
    return model


def _perturb(model: torch.nn.Module) -> None:
    """Move every parameter off its initial value, so norms' scales and biases matter."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))


def _one_training_step(model: torch.nn.Module, loss_fn: Any) -> dict[str, Any]:
    """One Adam step, so the checkpoint carries a real optimizer state like a trained one."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss = loss_fn(model, _waveforms(2, 16000, seed=9))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer.state_dict()


def _save_checkpoint(
    path: Path,
    options_entry: dict[str, Any],
    state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    criterion_name: str,
) -> None:
    checkpoint: dict[str, Any] = {
        **options_entry,
        "model": state,
        "optimizer_history": [
            {
                "criterion_name": criterion_name,
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": 2.345},
                "num_updates": 1,
            }
        ],
        "extra_state": {
            "epoch": 1,
            "train_iterator": {"epoch": 1, "iterations_in_epoch": 1, "shuffle": True},
            "val_loss": 2.345,
        },
    }
    if optimizer_state is not None:
        checkpoint["last_optimizer_state"] = optimizer_state
    torch.save(checkpoint, path)


def _waveforms(batch: int, samples: int, seed: int) -> torch.Tensor:
    """Speech-like test signals: a few harmonics with a slow envelope, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(samples, dtype=torch.float64) / SAMPLE_RATE
    rows = []
    for _ in range(batch):
        f0 = 100 + 150 * torch.rand(1, generator=gen, dtype=torch.float64)
        wave = sum(torch.sin(2 * math.pi * f0 * h * t) / h for h in range(1, 6)) * (
            0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t)
        )
        wave = wave + 0.05 * torch.randn(samples, generator=gen, dtype=torch.float64)
        rows.append(0.3 * wave / wave.abs().max())
    return torch.stack(rows).to(torch.float32)


def _padded_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two clips of 8000 and 5600 samples, zero-padded; True in the mask marks padding."""
    wav = _waveforms(2, 8000, seed=seed)
    padding_mask = torch.zeros(2, 8000, dtype=torch.bool)
    padding_mask[1, 5600:] = True
    wav[padding_mask] = 0.0
    return wav, padding_mask


@contextlib.contextmanager
def _unsafe_torch_load() -> Iterator[None]:
    """fairseq reads checkpoints with torch.load's old unsafe default; only our own files here."""
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = False
        return original(*args, **kwargs)

    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


if __name__ == "__main__":
    sys.exit(main())
