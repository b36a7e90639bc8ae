"""The optimizer and learning-rate schedule shared by the distillation stages."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def adamw_with_cosine(
    parameters: Iterable[torch.nn.Parameter],
    learning_rate: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int = 0,
) -> dict:
    """Return Lightning's optimizer dict: AdamW, linear warm-up, then cosine decay to 0, stepped per batch."""
    parameters = [parameter for parameter in parameters if parameter.requires_grad]
    if not parameters:
        raise ValueError("no trainable parameters: every parameter of the stage is frozen")
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
