"""AdamW with weight-decay groups and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

NO_DECAY_MODULES = (nn.LayerNorm, nn.Embedding, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for weight matrices / conv kernels; none for biases, norms, embeddings and any
    parameter flagged ``_no_weight_decay`` (the Mamba mixer flags ``A_log``, ``D`` and ``dt_proj.bias``)."""
    no_decay: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            is_norm = isinstance(module, NO_DECAY_MODULES) or "norm" in type(module).__name__.lower()
            if name.endswith("bias") or is_norm or p.ndim < 2 or getattr(p, "_no_weight_decay", False):
                no_decay.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if id(p) not in no_decay]
    rest = [p for p in params if id(p) in no_decay]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, optim_cfg: Any) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr,
                             betas=tuple(optim_cfg.betas), fused=bool(optim_cfg.fused))


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 down to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: Any, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, optim_cfg.warmup_steps, total_steps, optim_cfg.min_lr_ratio))
