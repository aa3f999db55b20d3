"""AdamW with weight-decay groups and the learning-rate schedules.

``optim.decay``: ``groups`` (no decay on biases, norms, embeddings; DT's Atari code) or ``all`` (DT's gym code:
``AdamW(model.parameters(), weight_decay=...)``). ``optim.schedule``: ``cosine`` (warmup over ``warmup_steps``, then a
cosine rescaled to reach ``min_lr_ratio`` exactly at ``train.steps``) or ``dt_tokens``, DT's Atari schedule
(kzl/decision-transformer atari/mingpt/trainer_atari.py:115-127), counted in action tokens: the first update runs at
the full rate (DT sets the rate after each update), update s > 0 at ``tokens / warmup_tokens`` during the warmup, then
``max(min_lr_ratio, cos_half(progress))`` with ``progress`` reaching 1 at ``final_tokens``: a clamp at the floor, not
a rescale. DT's ``final_tokens`` is ``2 * len(dataset) * 3K``, 6 epochs' tokens for a run of 5, so the floor is
reached near epoch 4.8; ``final_tokens: 0`` takes 6/5 of the run's tokens.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

NO_DECAY_MODULES = (nn.LayerNorm, nn.Embedding, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def param_groups(model: nn.Module, weight_decay: float, decay: str = "groups") -> list[dict]:
    """Two AdamW groups: decay for weight matrices / conv kernels; none for biases, norms, embeddings and any
    parameter flagged ``_no_weight_decay`` (the Mamba mixer flags ``A_log``, ``D`` and ``dt_proj.bias``).
    ``decay="all"``: one group, every parameter decayed."""
    if decay not in ("groups", "all"):
        raise ValueError(f"optim.decay must be 'groups' or 'all', got {decay!r}")
    if decay == "all":
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
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
    return torch.optim.AdamW(param_groups(model, optim_cfg.weight_decay, optim_cfg.decay), lr=optim_cfg.lr,
                             betas=tuple(optim_cfg.betas), fused=bool(optim_cfg.fused))


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 down to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


DT_FINAL_OVER_RUN = 6 / 5  # DT's final_tokens: 6 epochs' worth, for a run of 5


def dt_token_lr_factor(step: int, tokens_per_update: int, warmup_tokens: int, final_tokens: int,
                       floor: float) -> float:
    """DT's Atari multiplier for update ``step`` (0-based), whose rate DT set after ``step`` updates of
    ``tokens_per_update`` action tokens each (trainer_atari.py:115-127)."""
    if step == 0:
        return 1.0
    tokens = step * tokens_per_update
    if tokens < warmup_tokens:
        return tokens / max(1, warmup_tokens)
    progress = (tokens - warmup_tokens) / max(1, final_tokens - warmup_tokens)
    return max(floor, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: Any, total_steps: int):
    if optim_cfg.schedule == "dt_tokens":
        per_update = int(optim_cfg.tokens_per_update)
        if per_update < 1:
            raise ValueError(f"optim.tokens_per_update must be positive with optim.schedule=dt_tokens, got "
                             f"{per_update}")
        final = int(optim_cfg.final_tokens) or round(DT_FINAL_OVER_RUN * total_steps * per_update)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: dt_token_lr_factor(
            s, per_update, int(optim_cfg.warmup_tokens), final, optim_cfg.min_lr_ratio))
    if optim_cfg.schedule != "cosine":
        raise ValueError(f"optim.schedule must be 'cosine' or 'dt_tokens', got {optim_cfg.schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, optim_cfg.warmup_steps, total_steps, optim_cfg.min_lr_ratio))
