"""The AdamW both training stages build: weight decay on matrices only (nanoGPT's grouping by rank)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw_decaying_matrices(
    params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad: group 0 (rank >= 2: conv/linear weights, embeddings) decays
    by `weight_decay`, group 1 (norms and biases) never decays."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)
