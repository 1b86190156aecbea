"""The original's learning-rate schedule: linear warmup, a short plateau, then linear decay to 0."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_flat_decay_factor(step: int, warmup: int, total: int, flat_fraction: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based) of ``total`` steps."""
    if total <= 0:
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    flat_end = warmup + int(flat_fraction * total)
    if step < flat_end:
        return 1.0
    remaining = max(total - flat_end, 1)
    return max(0.0, (total - step) / remaining)


def warmup_flat_decay(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, flat_fraction: float = 0.05
) -> LambdaLR:
    """Stepped every optimizer step (Lightning ``interval="step"``)."""
    def factor(step: int) -> float:
        return warmup_flat_decay_factor(step, warmup, total, flat_fraction)

    return LambdaLR(optimizer, factor)
