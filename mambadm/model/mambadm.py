"""MambaDM: a stack of GLoMa blocks over (R, s, a) tokens, acting recurrently in O(1) per env step.

Training runs `forward` on windows of K timesteps. Acting (mode="recurrent") feeds, per env step t, the chunk
[a_{t-1}, R_t, s_t] through every layer's `step` and reads the action at s_t; the global state carries the whole
episode, the local state restarts every w timesteps as in training. mode="window" re-runs the last K steps instead
(what the model saw in training; see docs/model.md on this train/test difference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from mambadm.config import EnvSpec, ModelConfig
from mambadm.model.base import DecisionModel, batch_states
from mambadm.model.gloma import GLoMaBlock, SegmentMasks
from mambadm.model.recurrent import (PairCache, PairWeights, StackStep, allocate_pair_cache, layer_step,
                                     stack_step_usable)


@dataclass
class RecurrentState:
    """Per layer: both mixers' stacked weights (snapshotted by `init_state`) and their conv / SSM states."""

    weights: list[PairWeights]
    caches: list[PairCache]


class MambaDM(DecisionModel):
    def __init__(self, cfg: ModelConfig, spec: EnvSpec) -> None:
        super().__init__(cfg, spec)
        self.layers = nn.ModuleList(
            GLoMaBlock(cfg.d_model, cfg.d_state, cfg.d_conv, cfg.expand, cfg.local_window, cfg.fusion,
                       cfg.ffn_mult, cfg.dropout, cfg.backend)
            for _ in range(cfg.n_layer)
        )
        self.norm_f = nn.LayerNorm(cfg.d_model)

    def backbone(self, tokens: Tensor) -> Tensor:
        for layer in self.layers:
            tokens = layer(tokens)
        return self.norm_f(tokens)

    # ------------------------------------------------------------------------------------------- acting
    def init_state(self, batch_size: int, mode: str = "recurrent", context_len: int = 30,
                   reencode: bool = False) -> Any:
        if mode == "window":
            return super().init_state(batch_size, "window", context_len, reencode)
        if mode != "recurrent":
            raise ValueError(f"MambaDM acting mode must be 'recurrent' or 'window', got {mode!r}")
        # The state snapshots the weights in a stacked layout: make a new state after the weights change.
        device = self.norm_f.weight.device
        if stack_step_usable(self.layers, device):  # the whole stack in one C++ call per action
            return StackStep.of(self.layers, batch_size)
        return RecurrentState([PairWeights.of(layer) for layer in self.layers],
                              [allocate_pair_cache(layer, batch_size, device) for layer in self.layers])

    @torch.inference_mode()
    def act(self, state: Any, rtg: Tensor, obs: Tensor, prev_action: Tensor, t: Tensor) -> tuple[Tensor, Any]:
        if not isinstance(state, (RecurrentState, StackStep)):
            return self.act_window(state, rtg, obs, prev_action, t)
        x = self.embed.step_tokens(rtg, obs, prev_action, t)  # (B, 3, d): a_{t-1}, R_t, s_t
        # Token indices: a_{t-1} is 3t - 1, R_t is 3t. At t == 0 the dummy a token at index -1 is wiped by the
        # sequence start at index 0; window starts fall on R tokens with t % w == 0.
        token_index = 3 * t - 1
        if isinstance(state, StackStep):
            x = state(x, token_index)
        else:
            starts = torch.stack(self.layers[0].segment_starts(token_index, 3), dim=1)  # (B, 2, 3): global, local
            masks = SegmentMasks.build(starts, self.cfg.d_conv)
            for layer, weights, cache in zip(self.layers, state.weights, state.caches):
                x = layer_step(layer, weights, cache, x, masks)
        return self.head(self.norm_f(x[:, -1])).float(), state

    # ------------------------------------------------------------------------------------------- analysis
    @torch.no_grad()
    def a_matrices(self, batch: dict[str, Tensor] | None = None) -> list[dict[str, Any]]:
        """Per layer and branch ("global" | "local"): the continuous A (d_inner, d_state) and, given a batch, the
        discretised exp(delta * A) (B, L, d_inner, d_state) at the inputs that branch sees (local: per window)."""
        out = []
        x = self.embed(batch["rtg"], batch_states(batch, self.spec.obs_shape[0]), batch["actions"],
                       batch["timesteps"]) if batch else None
        for i, layer in enumerate(self.layers):
            h = layer.norm1(x) if x is not None else None
            for branch, m in (("global", layer.global_mamba), ("local", layer.local_mamba)):
                entry = {"layer": i, "branch": branch, "A": m.A_continuous()}
                if h is not None:
                    entry["A_discrete"] = m.A_discrete(h, None if branch == "global" else layer.window_tokens)
                out.append(entry)
            if x is not None:
                x = layer(x)
        return out

    # ------------------------------------------------------------------------------------------- counting
    def backbone_flops_per_token(self, context_len: int) -> float:
        c = self.cfg
        d, di, n = c.d_model, c.expand * c.d_model, c.d_state
        r = self.layers[0].global_mamba.dt_rank
        mamba = (2 * d * 2 * di  # in_proj
                 + 2 * di * c.d_conv  # depthwise conv
                 + 2 * di * (r + 2 * n)  # x_proj
                 + 2 * r * di  # dt_proj
                 + 9 * di * n  # scan: exp(delta A), delta u B, A h + x, <h, C>
                 + 2 * di * d)  # out_proj
        fusion = {"add": 0, "gate": 2 * d * d, "concat": 2 * 2 * d * d}[c.fusion]
        ffn = 2 * 2 * d * c.ffn_mult * d
        return c.n_layer * (2 * mamba + fusion + ffn)

