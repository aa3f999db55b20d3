"""MambaDM: a stack of GLoMa blocks over (R, s, a) tokens, acting recurrently in O(1) per env step.

Training runs `forward` on windows of K timesteps. Acting (mode="recurrent") feeds, per env step t, the chunk
[a_{t-1}, R_t, s_t] through every layer's `step` and reads the action at s_t; the global state carries the whole
episode, the local state restarts every w timesteps as in training. mode="window" re-runs the last K steps instead
(what the model saw in training; see docs/model.md on this train/test difference).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from mambadm.config import EnvSpec, ModelConfig
from mambadm.model.base import DecisionModel, batch_states
from mambadm.model.gloma import GLoMaBlock
from mambadm.model.recurrent import BlockSteps, StackStep, stack_step_usable
from mambadm.ssm import Mamba


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
        return self.norm_f(self.run_layers(tokens))

    # ------------------------------------------------------------------------------------------- acting
    def init_state(self, batch_size: int, mode: str = "recurrent", context_len: int = 30,
                   reencode: bool = False) -> Any:
        if mode == "window":
            return super().init_state(batch_size, "window", context_len, reencode)
        if mode != "recurrent":
            raise ValueError(f"MambaDM acting mode must be 'recurrent' or 'window', got {mode!r}")
        device = self.norm_f.weight.device
        if stack_step_usable(self.layers, device):  # the whole stack in one C++ call per action
            # StackStep snapshots the weights in its layouts: make a new state after the weights change.
            return StackStep.of(self.layers, batch_size)
        return BlockSteps.of(self.layers, batch_size, device)

    @torch.inference_mode()
    def act(self, state: Any, rtg: Tensor, obs: Tensor, prev_action: Tensor, t: Tensor) -> tuple[Tensor, Any]:
        """preds (B, act_dim) for step t of each env: the state (recurrent or window) advances itself."""
        return state.advance(self, rtg, obs, prev_action, t), state

    def zero3_leaf_modules(self) -> list[type[nn.Module]]:
        """The mixer, whose forward reads its parameters in custom autograd functions (the fused scans): DeepSpeed
        ZeRO-3 must gather its parameters as a whole rather than hook into its submodules."""
        return [Mamba]

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

