"""The fine-tuned emotion classifier as a self-contained model directory: export, load, predict.

Fine-tuning (``ser.stages.finetune``) exports one run's checkpoint here; serving
(``ser.serving``) and anyone with the directory load it back::

    model/
      backbone/      the backbone, any family (save_pretrained of its base model)
      head.pt        the output layer's state dict
      model.json     classes, sample rate, evaluation batch size, where it came from; written
                     last, so a directory with one is complete

Evaluation batches: every model reads :data:`EVAL_BATCH_SIZE` utterances at a time (sorted by
length), and an utterance's logits are those it gets alone, as the original evaluated it. With a
group-norm feature encoder (wav2vec2-base, the ``tiny`` preset) the first conv layer would
normalise over the whole padded time axis, so in eval mode the classifier runs its conv feature
encoder on each utterance's own samples and only the rest of the backbone batched
(``ser.models.heads.UtteranceClassifier.features``; tests/test_eval_batching.py). Directories
exported before this say ``eval_batch_size`` 1 in model.json; they load and batch the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ser import artifacts
from ser.atomic import atomic_path, atomic_write_json
from ser.audio import MIN_SAMPLES
from ser.checkpoints import safe_torch_load
from ser.config import SAMPLE_RATE
from ser.data.datasets import collate_audio
from ser.errors import SerInputError
from ser.models.backbones import load_backbone, save_backbone
from ser.models.heads import UtteranceClassifier

MODEL_FORMAT = "ser-finetuned-classifier/1"
HEAD_FILE = "head.pt"
EVAL_BATCH_SIZE = 8  # utterances per evaluation batch; padding does not change the logits


def eval_batch_size() -> int:
    """Utterances per evaluation batch, for every feature encoder (see the module docstring)."""
    return EVAL_BATCH_SIZE



def export_model(
    checkpoint: Path, classes: Sequence[str], directory: Path, source: Mapping[str, Any]
) -> Path:
    """Write a fine-tuning checkpoint as a self-contained model directory: ``backbone/``
    (``save_pretrained``), ``head.pt`` (the output layer) and ``model.json``. ``model.json`` is
    removed first and written last, so a directory with one is complete."""
    classifier = _classifier_from_checkpoint(checkpoint, len(classes))
    manifest = directory / artifacts.MODEL_JSON
    manifest.unlink(missing_ok=True)
    save_backbone(classifier.backbone, directory / artifacts.BACKBONE)
    with atomic_path(directory / HEAD_FILE) as tmp:
        torch.save(classifier.output.state_dict(), tmp)
    atomic_write_json(manifest, {
        "format": MODEL_FORMAT,
        "classes": list(classes),
        "backbone": artifacts.BACKBONE,
        "head": HEAD_FILE,
        "sample_rate": SAMPLE_RATE,
        "eval_batch_size": eval_batch_size(),  # what predict batches; the logits do not vary
        "source": dict(source),
        "rebuild": "ser.models.finetuned.load_finetuned('<this directory>') -> (model, classes);"
                   " ser.models.finetuned.predict(model, wavs) -> (class indices, probabilities)",
    })
    return directory


def _classifier_from_checkpoint(checkpoint: Path, num_classes: int) -> UtteranceClassifier:
    # The backbone loads through the checkpoint convention (model.json beside it); the head is
    # the state dict's model.output.* entries.
    classifier = UtteranceClassifier(load_backbone(str(checkpoint)), num_classes,
                                     time_mask_prob=0.0, feature_mask_prob=0.0)
    state = safe_torch_load(checkpoint)["state_dict"]
    prefix = "model.output."
    head = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    classifier.output.load_state_dict(head)
    return classifier.eval()


def load_finetuned(directory: str | Path) -> tuple[UtteranceClassifier, list[str]]:
    """The exported classifier (eval mode) and its classes, from ``output_dir/model``."""
    root = Path(directory)
    manifest = root / artifacts.MODEL_JSON
    if not manifest.is_file():
        raise SerInputError(
            f"{root} has no {artifacts.MODEL_JSON}; pass the model directory fine-tuning "
            f"exported (<output_dir>/{artifacts.MODEL})"
        )
    try:
        data = json.loads(manifest.read_text())
        classes = [str(c) for c in data["classes"]]
        backbone_dir, head_file = root / data["backbone"], root / data["head"]
    except (ValueError, KeyError, TypeError) as err:
        raise SerInputError(f"{manifest} is not a fine-tuned model description: {err}") from err
    classifier = UtteranceClassifier(load_backbone(str(backbone_dir)), len(classes),
                                     time_mask_prob=0.0, feature_mask_prob=0.0)
    try:
        classifier.output.load_state_dict(safe_torch_load(head_file))
    except RuntimeError as err:
        raise SerInputError(f"{head_file} does not fit {len(classes)} classes: {err}") from err
    return classifier.eval(), classes


def predict(
    model: UtteranceClassifier, wavs: Sequence[np.ndarray | torch.Tensor]
) -> tuple[list[int], np.ndarray]:
    """Class indices (``classes[i]`` names them) and probabilities ``[N, classes]`` of 16 kHz
    mono waveforms, each evaluated whole and batched, with the probabilities it gets alone."""
    tensors = [torch.as_tensor(np.asarray(w), dtype=torch.float32) for w in wavs]
    bad = [i for i, t in enumerate(tensors) if t.dim() != 1 or len(t) < MIN_SAMPLES]
    if bad:
        raise SerInputError(
            f"predict: waveforms {bad[:5]} are not 1-D or shorter than {MIN_SAMPLES} samples; "
            f"pass mono {SAMPLE_RATE} Hz audio of at least {1000 * MIN_SAMPLES // SAMPLE_RATE} ms"
        )
    num_classes = model.output.out_features
    probs = np.zeros((len(tensors), num_classes), dtype=np.float32)
    order = sorted(range(len(tensors)), key=lambda i: len(tensors[i]))  # little padding
    batch = eval_batch_size()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            padded = collate_audio([{"input_values": tensors[i], "name": str(i)} for i in chunk])
            logits = model(padded["input_values"].to(device), padded["attention_mask"].to(device))
            probs[chunk] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    model.train(was_training)
    return probs.argmax(axis=1).tolist(), probs
