"""What people read on the terminal: one line per stage and fold, a progress bar on training,
warnings that say what to do, and none of the libraries' tips and banners.

Lightning prints a device banner and a "try litlogger" tip for every Trainer (so once per fold
and per run of a stage), transformers a progress bar for every one-shard save, and its Rich bar
counts epochs as ``Epoch 0/-2`` when a stage trains for a number of steps. :func:`configure`
silences the first three (without importing them: a bad parameter must fail in a second);
:class:`ser.progress.TrainingProgress` is the bar every ser Trainer uses.
"""

from __future__ import annotations

import logging
import os
import warnings

# Lightning's per-Trainer lines that say nothing a ser log line does not (accelerator and
# devices are the stage's own parameters; a stage says how many steps it trained). Lightning's
# warnings (an unused GPU, say) still show.
_LIGHTNING_NOISE = (
    "💡 Tip",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "`Trainer.fit` stopped:",
    "LOCAL_RANK:",
    "Restoring states from the checkpoint",  # each test of a checkpoint; ser says when it resumes
    "Loaded model weights from the checkpoint",
)
_LIGHTNING_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
)


class _DropLines(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def configure() -> None:
    """Log format for people, and the third-party noise off (idempotent)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # lists CPU variants it skips
    for name in _LIGHTNING_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in target.filters):
            target.addFilter(_DropLines(_LIGHTNING_NOISE))
    # A deprecation inside Lightning's own code, raised on every fit: nothing a user can change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # MLflow's own pyfunc classes raise it when mlflow.pyfunc is imported: not about our model,
    # whose logged signature says what goes in.
    warnings.filterwarnings("ignore", message=r".*Add type hints to the .predict. method")
    # Said when a run resumes into its own checkpoint folder, which is what resuming is.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # transformers' "Writing model shards 1/1" bar on every save (read when it is imported).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # MLflow's bar for copying a few small files, and its note on every logged model.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)
