"""Write tiny fairseq HuBERT checkpoints and fairseq's outputs for them, for the parity tests.

Runs in the same separate fairseq environment as ``make_fixtures.py`` (its docstring says how to
build it), and reuses that script's helpers::

    /work/fairseq-venv/bin/python tests/parity/make_hubert_fixtures.py

HuBERT's pretraining task reads a label dictionary (``dict.km.txt``) from its label directory
when the model is built; the script writes one with 10 k-means units to a temporary directory,
and the checkpoints name ``/data/librispeech/labels`` instead (what a real run would), so the
files do not depend on where the script ran. fairseq's reload check points it back at the
temporary one.

Everything is seeded: running the script twice writes the same tensors. What each file holds is
described in ``tests/parity/README.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

from fairseq import checkpoint_utils, options, tasks  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from make_fixtures import (  # noqa: E402
    FIXTURES,
    W2V2_COMMON,
    _padded_batch,
    _perturb,
    _save_checkpoint,
    _unsafe_torch_load,
    _waveforms,
)
from omegaconf import OmegaConf  # noqa: E402

LABEL_DIR = "/data/librispeech/labels"  # what the checkpoints name; never read
UNITS = 10  # k-means clusters; fairseq's Dictionary adds 4 special symbols
# The w2v2 fixtures' tiny sizes (24 conv channels, 2 layers x 32 dims, conv_pos 16 in 4 groups,
# final_dim 16), minus the quantizer options HuBERT does not have.
HUBERT_COMMON = [arg for pair in zip(W2V2_COMMON[::2], W2V2_COMMON[1::2], strict=True)
                 if not pair[0].startswith("--latent") for arg in pair]
HUBERT_VARIANTS = {
    # base-like: group norm in the first conv layer, post-LN transformer
    "fairseq_hubert_tiny": ["--extractor-mode", "default"],
    # large-like: layer norm in every conv layer, pre-LN transformer with a final layer norm
    "fairseq_hubert_tiny_lnf": [
        "--extractor-mode",
        "layer_norm",
        "--layer-norm-first",
        "--conv-bias",
    ],  # fmt: skip
}


def main() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as labels:
        (Path(labels) / "dict.km.txt").write_text("".join(f"{u} 1\n" for u in range(UNITS)))
        for name, extra in HUBERT_VARIANTS.items():
            # Released checkpoints are often stripped of the optimizer state; keep one.
            written += make_hubert(name, extra, labels, keep_optimizer=name.endswith("_tiny"))
    total = 0
    for path in written:
        size = path.stat().st_size
        total += size
        print(f"wrote {path.relative_to(FIXTURES.parents[1])}: {size / 1024:.1f} KiB")
    print(f"total {total / 1024:.1f} KiB in {len(written)} files")


def make_hubert(name: str, extra: list[str], labels: str, keep_optimizer: bool) -> list[Path]:
    """Both checkpoint shapes of one seeded tiny HuBERT, and fairseq's outputs for it."""
    args = _hubert_training_args([*HUBERT_COMMON, *extra], labels)
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(5)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    _perturb(model)
    optimizer_state = _one_hubert_step(model)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}

    args.label_dir = LABEL_DIR
    cfg.task.label_dir = LABEL_DIR
    cfg_dict = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    path = FIXTURES / f"{name}.pt"
    kept_optimizer = optimizer_state if keep_optimizer else None
    _save_checkpoint(path, {"args": None, "cfg": cfg_dict}, state, kept_optimizer, "hubert")
    args_path = FIXTURES / f"{name}_args.pt"
    _save_checkpoint(args_path, {"args": args}, state, None, "hubert")
    paths = [path, args_path]

    wav, padding_mask = _padded_batch(seed=4)
    model.eval()
    arrays = _hubert_outputs(model, wav, padding_mask)
    for checkpoint in paths:
        _check_fairseq_reloads_hubert(checkpoint, labels, wav, padding_mask, arrays)
    out = FIXTURES / f"{name}_outputs.npz"
    np.savez_compressed(out, **arrays)
    return [*paths, out]


def _hubert_training_args(model_args: list[str], labels: str) -> argparse.Namespace:
    """A Namespace as fairseq-train's parser makes it for HuBERT pretraining on k-means labels."""
    parser = options.get_training_parser()
    common = [
        "/data/librispeech", "--task", "hubert_pretraining", "--labels", '["km"]',
        "--label-dir", labels, "--label-rate", "50", "--seed", "1",
        "--arch", "hubert", "--criterion", "hubert", "--optimizer", "adam", "--lr", "0.0005",
        "--lr-scheduler", "polynomial_decay", "--max-update", "400000",
        "--total-num-update", "400000",
    ]  # fmt: skip
    return options.parse_args_and_arch(parser, input_args=common + model_args)


def _one_hubert_step(model: torch.nn.Module) -> dict[str, Any]:
    """One Adam step on HuBERT's masked prediction loss, so norms and heads move off their
    initial values like a trained model's."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    wav = _waveforms(2, 16000, seed=9)
    frames = int(model.feature_extractor(wav[:1]).size(2))
    gen = torch.Generator().manual_seed(10)
    # Label ids past fairseq's 4 special symbols; 50 Hz labels for 50 Hz frames.
    targets = torch.randint(4, 4 + UNITS, (2, frames), generator=gen)
    no_padding = torch.zeros(wav.shape, dtype=torch.bool)  # fairseq HuBERT needs a mask here
    model.apply_mask = _fixed_mask(model)  # instance attribute: shadows the method
    out = model(wav, target_list=[targets], padding_mask=no_padding, mask=True)
    del model.apply_mask
    logits = model.get_logits(out, is_masked=True) + model.get_logits(out, is_masked=False)
    targets_list = model.get_targets(out, is_masked=True) + model.get_targets(out, is_masked=False)
    pairs = zip(logits, targets_list, strict=True)
    loss = sum(torch.nn.functional.cross_entropy(lo, ta) for lo, ta in pairs)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer.state_dict()


def _fixed_mask(model: torch.nn.Module) -> Any:
    """HuBERT's apply_mask with fixed spans: fairseq draws them from an unseeded numpy
    generator (np.random.default_rng(None)), which would make every run's weights differ."""

    def apply_mask(x: torch.Tensor, _padding: Any, _targets: Any) -> tuple[torch.Tensor, Any]:
        mask = torch.zeros(x.shape[:2], dtype=torch.bool)
        mask[:, 5:15] = True
        mask[:, 25:35] = True
        x[mask] = model.mask_emb
        return x, mask

    return apply_mask


def _hubert_outputs(
    model: torch.nn.Module, wav: torch.Tensor, padding_mask: torch.Tensor
) -> dict[str, np.ndarray]:
    """fairseq's outputs, laid out as transformers' HubertModel would return them."""
    encoder = model.encoder
    captured: dict[str, torch.Tensor] = {}

    def grab_input(_module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        captured["layer_0"] = inputs[0]  # time-first, maybe padded to required_seq_len_multiple

    def grab_output(index: int) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            captured[f"layer_{index + 1}"] = output[0]

        return hook

    hooks = [encoder.layers[0].register_forward_pre_hook(grab_input)]
    hooks += [layer.register_forward_hook(grab_output(i)) for i, layer in enumerate(encoder.layers)]
    with torch.no_grad():
        conv = model.feature_extractor(wav).transpose(1, 2)
        res = model(wav, padding_mask=padding_mask, mask=False, features_only=True)
    for hook in hooks:
        hook.remove()

    x = res["x"]
    frames = x.size(1)
    layers = {key: value[:frames].transpose(0, 1) for key, value in captured.items()}
    last = layers[f"layer_{len(encoder.layers)}"]
    # Layer-norm-first models apply a final layer norm to the last layer's output; transformers
    # 5 leaves it out of hidden_states[-1] and returns it as last_hidden_state.
    with torch.no_grad():
        normed = encoder.layer_norm(last) if encoder.layer_norm_first else last
    assert torch.equal(normed, x)
    return {
        "input": wav.numpy(),
        "padding_mask": padding_mask.numpy(),
        "attention_mask": (~padding_mask).to(torch.int64).numpy(),
        "frame_padding_mask": res["padding_mask"].numpy(),
        "conv_features": conv.numpy(),
        "last_hidden_state": x.numpy(),
        **{key: layers[key].numpy() for key in sorted(layers)},
    }


def _check_fairseq_reloads_hubert(
    path: Path, labels: str, wav: torch.Tensor, padding_mask: torch.Tensor,
    expected: dict[str, np.ndarray],
) -> None:
    """fairseq's own loader must read the file and give the same outputs, model name and all."""
    with _unsafe_torch_load():
        models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task(
            [str(path)], arg_overrides={"label_dir": labels}
        )
    model = models[0].eval()
    assert type(model).__name__ == "HubertModel" and cfg.model._name == "hubert", path
    with torch.no_grad():
        x, frame_padding = model.extract_features(wav, padding_mask, mask=False)
    assert np.array_equal(x.numpy(), expected["last_hidden_state"]), f"reload of {path} differs"
    assert np.array_equal(frame_padding.numpy(), expected["frame_padding_mask"]), path


if __name__ == "__main__":
    sys.exit(main())
