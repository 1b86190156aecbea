"""The fine-tuned emotion model as an MLflow pyfunc model, for `mlflow models predict/serve`.

Input: a table with a ``path`` column (16 kHz mono audio files) or an ``audio`` column (16 kHz
waveforms as lists of floats), one utterance per row. Output: ``label`` and one ``prob_<class>``
column per class. The ``ser`` source travels inside the model (``code_paths``), so a machine with
the pinned dependencies can load it without installing ser.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema

from ser.atomic import temp_files_beside
from ser.audio import read_audio
from ser.errors import SerInputError

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "finetuned"
EXAMPLE_SECONDS = 0.1


class EmotionModel(mlflow.pyfunc.PythonModel):
    """Loads an exported model directory (``ser.models.finetuned``) and predicts emotions."""

    def load_context(self, context: Any) -> None:
        from ser.models.finetuned import load_finetuned

        self.model, self.classes = load_finetuned(context.artifacts[MODEL_ARTIFACT])

    # model_input is left unannotated: MLflow would read a hint as the input schema, and the
    # signature logged with the model already says what goes in.
    def predict(self, context, model_input, params=None) -> pd.DataFrame:  # noqa: ANN001
        from ser.models.finetuned import predict

        waves = waveforms(_as_frame(model_input))
        indices, probs = predict(self.model, waves)
        table = {"label": [self.classes[i] for i in indices]}
        table.update({f"prob_{c}": probs[:, j].astype(float) for j, c in enumerate(self.classes)})
        return pd.DataFrame(table)


def waveforms(frame: pd.DataFrame) -> list[np.ndarray]:
    """One waveform per row, read from ``path`` or taken from ``audio``."""
    rows = []
    for index, row in frame.iterrows():
        path, audio = row.get("path"), row.get("audio")
        if isinstance(path, str) and path:
            rows.append(read_audio(path))
        elif audio is not None and len(np.asarray(audio)) > 0:
            rows.append(np.asarray(audio, dtype=np.float32))
        else:
            raise SerInputError(
                f"row {index}: give a 'path' to a 16 kHz mono audio file or an 'audio' list of "
                "16 kHz samples"
            )
    return rows


def _as_frame(model_input: Any) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict):
        return pd.DataFrame(model_input)
    if isinstance(model_input, list | tuple) and all(isinstance(p, str) for p in model_input):
        return pd.DataFrame({"path": list(model_input)})
    raise SerInputError(
        "model input must be a table with a 'path' or 'audio' column, or a list of file paths"
    )


def signature(classes: list[str]) -> ModelSignature:
    inputs = Schema(
        [
            ColSpec("string", "path", required=False),
            ColSpec(Array("double"), "audio", required=False),
        ]
    )
    probabilities = [ColSpec("double", f"prob_{c}") for c in classes]
    outputs = Schema([ColSpec("string", "label"), *probabilities])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    wave = (0.01 * rng.standard_normal(int(EXAMPLE_SECONDS * 16_000))).astype(np.float32)
    return pd.DataFrame({"path": [""], "audio": [wave.tolist()]})


def requirements() -> list[str]:
    """ser's own runtime dependencies, as installed (torch stays pinned)."""
    try:
        declared = importlib.metadata.requires("ser") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [r for r in declared if "extra ==" not in r]


def log_model(model_dir: Path, classes: list[str], register_as: str = "") -> str:
    """Log the exported model under the active run as ``model``; return its model URI."""
    import ser
    from ser import tracking

    # MLflow copies the model into a temporary folder before logging it: beside the model, so
    # that a kill cannot leave a model-sized copy in TMPDIR.
    with temp_files_beside(model_dir):
        uri = tracking.log_pyfunc_model(
            python_model=Path(__file__).with_name("pyfunc_model.py"),
            artifacts={MODEL_ARTIFACT: model_dir},
            code_paths=[Path(ser.__file__).parent],
            requirements=requirements(),
            signature=signature(classes),
            input_example=input_example(),
            register_as=register_as,
        )
    log.info("logged the fine-tuned model as %s", uri)
    return uri
