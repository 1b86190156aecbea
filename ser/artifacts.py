"""Names of what stages write and read: one place for producers, consumers and the pipelines.

A stage's output folder (``output_dir``) holds one folder per fold (the fold file's name without
``.json``), and in each the stage's per-fold outputs below; MLflow stores each output of every
fold as ``<output>/<fold>/`` of the stage's run, so the next stage takes ``runs:/<id>/<output>``.
"""

from __future__ import annotations

# Per-fold outputs: a fold's folder holds these, and the run's artifacts ``<output>/<fold>/``.
BACKBONE = "backbone"  # a wav2vec 2.0 backbone (save_pretrained): TAPT, phase 2
W2V1 = "w2v1"  # the phase-1 wav2vec 1.0 emotion model
CLUSTERS = "clusters"  # the clustering stage's label files

# Top-level outputs of a stage's output folder.
MODEL = "model"  # the fine-tuned classifier fine-tuning exports, for serving
CONFIG_JSON = "config.json"  # the resolved config of a stage run

# Inside the folders above.
CHECKPOINTS = "checkpoints"  # Lightning checkpoints of a fold (or a fine-tuning run)
LAST_CKPT = "last.ckpt"
MODEL_JSON = "model.json"  # beside checkpoints: makes a .ckpt a backbone spec
CLUSTERS_JSON = "clusters.json"  # merged labels: {"<file>.wav": [[labels for k1], ...]}
CLUSTER_STATS_JSON = "cluster_stats.json"  # holds "num_clusters": [k1, k2, ...] in head order

# Fine-tuning's files.
RESULTS_JSON = "results.json"  # one run's scores and predictions
SUMMARY_JSON = "summary.json"
SUMMARY_TXT = "summary.txt"
CONFUSION_PNG = "confusion_matrix.png"


def labels_file(k: int) -> str:
    """One cluster count's label file, beside :data:`CLUSTERS_JSON`."""
    return f"clusters_k{k}.json"


def centroids_file(k: int) -> str:
    return f"centroids_k{k}.npy"
