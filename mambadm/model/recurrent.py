"""MambaDM's recurrent acting states: each advances itself by one env step (`advance`), so `MambaDM.act` needs to know
none of them. At one env per call the cost of a recurrent step is the number of PyTorch ops, not their size. Two:

- `BlockSteps` (readable, any device, dropout allowed): every layer's `GLoMaBlock.step` from its cache, each branch
  through `Mamba.step`; the GPU acting path, and the CPU path without a C++ compiler.
- `StackStep` (CPU, `cpp` backend): the same computation for all layers in one call of the C++ class `GLoMaStack`
  (mambadm/kernels/csrc/gloma_step.cpp), whose matmuls are ATen calls and whose conv, masks and norms are loops
  around the fused scan kernel; an action costs a fraction of the Python-level ops of `BlockSteps`.

tests/test_model.py checks both against `forward` and against each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from mambadm.kernels.build import gloma_stack_class
from mambadm.model.gloma import GLoMaBlock, GLoMaCache

if TYPE_CHECKING:
    from mambadm.model.mambadm import MambaDM


class RecurrentActing:
    """What the recurrent states share: embed the env step's three tokens [a_{t-1}, R_t, s_t], run them through the
    stack (`run`, from each env's state) and read the action at s_t."""

    def advance(self, model: "MambaDM", rtg: Tensor, obs: Tensor, prev_action: Tensor, t: Tensor) -> Tensor:
        """preds (B, act_dim) for step t of each env; the state is updated in place."""
        x = model.embed.step_tokens(rtg, obs, prev_action, t)  # (B, 3, d): a_{t-1}, R_t, s_t
        # Token indices: a_{t-1} is 3t - 1, R_t is 3t. At t == 0 the dummy a token at index -1 is wiped by the
        # sequence start at index 0; window starts fall on R tokens with t % w == 0.
        x = self.run(x, 3 * t - 1)
        return model.head(model.norm_f(x[:, -1])).float()

    def run(self, x: Tensor, token_index: Tensor) -> Tensor:
        """The stack over the chunk x (B, L, d) whose first token has index token_index (B,) -> (B, L, d)."""
        raise NotImplementedError


@dataclass
class BlockSteps(RecurrentActing):
    """The layers (live modules, not a snapshot of their weights) and each one's conv / SSM states."""

    layers: Sequence[GLoMaBlock]
    caches: list[GLoMaCache]

    @staticmethod
    def of(layers: Sequence[GLoMaBlock], batch_size: int, device: torch.device) -> "BlockSteps":
        return BlockSteps(layers, [layer.allocate_cache(batch_size, device) for layer in layers])

    def run(self, x: Tensor, token_index: Tensor) -> Tensor:
        masks = self.layers[0].segment_masks(token_index, x.shape[1])  # the same starts in every layer
        for layer, cache in zip(self.layers, self.caches):
            x = layer.step(x, cache, masks=masks)
        return x


# ----------------------------------------------------------------------------------------------- the C++ stack step
FUSION_CODES = {"add": 0, "gate": 1, "concat": 2}  # gloma_step.cpp's `Fusion`


def stack_step_usable(layers: Sequence[GLoMaBlock], device: torch.device) -> bool:
    """Whether `StackStep` can run these layers: on the CPU with the `cpp` backend, with dropout inactive (the C++
    step applies none) and an FFN of Linear, GELU, Linear."""
    if device.type != "cpu" or not all(b.global_mamba.backend_in_use == "cpp" for b in layers):
        return False
    dropping = any(m.training and m.p > 0 for b in layers for m in b.modules() if isinstance(m, nn.Dropout))
    return not dropping and all(isinstance(b.ffn[1], nn.GELU) for b in layers)


def _stack_layer_weights(block: GLoMaBlock) -> list[Optional[Tensor]]:
    """One layer's weights in gloma_step.cpp's `Weight` order and layouts, float32 (the one packer of the mixers'
    weights for a fused step)."""
    g, l = block.global_mamba, block.local_mamba

    def pair(fn) -> Tensor:  # both branches stacked: (2, ...)
        return torch.stack([fn(g), fn(l)])

    fuse = {"add": None, "gate": getattr(block, "gate", None), "concat": getattr(block, "merge", None)}[block.fusion]
    weights = [
        block.norm1.weight, block.norm1.bias,
        torch.cat([g.in_proj.weight, l.in_proj.weight]),
        None if g.in_proj.bias is None else torch.cat([g.in_proj.bias, l.in_proj.bias]),
        pair(lambda m: m.conv_taps().t()), pair(lambda m: m.conv_bias()),  # (2, d_conv, d_inner), (2, d_inner)
        pair(lambda m: m.x_proj.weight.t()), pair(lambda m: m.dt_proj.weight.t()), pair(lambda m: m.dt_proj.bias),
        pair(lambda m: m.A_continuous()), pair(lambda m: m.D),
        pair(lambda m: m.out_proj.weight.t()), None if g.out_proj.bias is None else pair(lambda m: m.out_proj.bias),
        None if fuse is None else fuse.weight, None if fuse is None else fuse.bias,
        block.norm2.weight, block.norm2.bias,
        block.ffn[0].weight, block.ffn[0].bias, block.ffn[2].weight, block.ffn[2].bias,
    ]
    return [None if t is None else t.detach().float().contiguous() for t in weights]


@dataclass
class StackStep(RecurrentActing):
    """All GLoMa layers stepped by one call of the C++ class `GLoMaStack` (mambadm/kernels/csrc/gloma_step.cpp): the
    weights snapshotted in its layouts, and the conv and SSM states of every layer, updated in place by each call."""

    weights: list[Optional[Tensor]]  # per layer, gloma_step.cpp's `Weight` order
    eps: list[float]  # per layer: norm1's, norm2's
    fusion: int
    approximate: str  # the FFN's GELU
    window_tokens: int
    conv: Tensor  # (n_layer, 2, B, d_conv, d_inner), newest input last; branch 0 = global, 1 = local
    ssm: Tensor  # (n_layer, 2, B, d_inner, d_state)
    kernel: object = field(init=False, repr=False)  # the GLoMaStack holding the above

    @staticmethod
    @torch.no_grad()
    def of(layers: Sequence[GLoMaBlock], batch_size: int) -> "StackStep":
        m = layers[0].global_mamba
        state = lambda *shape: torch.zeros(len(layers), 2, batch_size, *shape, device=m.D.device)  # noqa: E731
        return StackStep(
            weights=[w for block in layers for w in _stack_layer_weights(block)],
            eps=[eps for block in layers for eps in (block.norm1.eps, block.norm2.eps)],
            fusion=FUSION_CODES[layers[0].fusion], approximate=layers[0].ffn[1].approximate,
            window_tokens=layers[0].window_tokens,
            conv=state(m.d_conv, m.d_inner), ssm=state(m.d_inner, m.d_state),
        )

    def __post_init__(self) -> None:
        try:
            stack_class = gloma_stack_class()
        except RuntimeError as exc:
            raise RuntimeError(f"StackStep needs the CPU extension: {exc}") from exc
        self.kernel = stack_class(self.weights, self.eps, self.fusion, self.approximate, self.window_tokens,
                                  self.conv, self.ssm)

    def run(self, x: Tensor, token_index: Tensor) -> Tensor:
        envs, d = self.conv.shape[2], self.weights[0].shape[0]
        if (x.dim() != 3 or x.shape[0] != envs or x.shape[2] != d or token_index.shape != (envs,)
                or token_index.dtype != torch.long):
            raise ValueError(f"StackStep holds the states of {envs} envs: x must be ({envs}, L, {d}) and token_index "
                             f"({envs},) int64, got {tuple(x.shape)} and {tuple(token_index.shape)} "
                             f"{token_index.dtype}")
        return self.kernel.step(x.float(), token_index.contiguous()).to(x.dtype)
