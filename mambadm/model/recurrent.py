"""Lean recurrent acting for MambaDM: both mixers of a GLoMa layer stepped as one, or the whole stack in one C++ call.

At one env per call the cost of a recurrent step is the number of PyTorch ops, not their size. Two paths:

- `layer_step` (readable, any device): both branches of a layer read the same normed input and have the same shapes,
  so their weights are stacked once (`PairWeights`, snapshotted when the acting state is made) and every
  projection, the conv, the scan and the gating run once for both (branch 0 = global, 1 = local). It equals
  `GLoMaBlock.step` and `GLoMaBlock.forward`.
- `StackStep` (CPU, `cpp` backend): the same computation for all layers in one call of the C++ class in
  mambadm/model/csrc/gloma_step.cpp, whose matmuls are ATen calls and whose conv, masks and norms are loops around
  the fused scan kernel; an action costs a fraction of the ~40 Python-level ops per layer of `layer_step`.

tests/test_model.py checks both against `forward` and against each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mambadm.model.gloma import GLoMaBlock, SegmentMasks
from mambadm.ssm.scan_cpp import cpp_missing


@dataclass
class PairWeights:
    """One layer's two mixers' parameters stacked on a branch axis, float32, in the layouts the step uses."""

    in_w: Tensor  # (4 d_inner, d): rows [u_g, z_g, u_l, z_l]
    in_b: Optional[Tensor]
    conv_w: Tensor  # (2, 1, d_inner, d_conv)
    conv_b: Tensor  # (2, 1, d_inner)
    x_w: Tensor  # (2, d_inner, dt_rank + 2 d_state)
    dt_w: Tensor  # (2, dt_rank, d_inner)
    dt_b: Tensor  # (2, 1, d_inner)
    A: Tensor  # (2, 1, d_inner, d_state)
    D: Tensor  # (2, 1, d_inner)
    out_w: Tensor  # (2, d_inner, d)
    out_b: Optional[Tensor]  # (2, 1, d)
    dt_rank: int
    d_state: int

    @staticmethod
    @torch.no_grad()
    def of(block: GLoMaBlock) -> "PairWeights":
        g, l = block.global_mamba, block.local_mamba
        both = (g, l)

        def stack(fn):
            return torch.stack([fn(m).float() for m in both]).contiguous()

        return PairWeights(
            in_w=torch.cat([g.in_proj.weight, l.in_proj.weight]).float(),
            in_b=None if g.in_proj.bias is None else torch.cat([g.in_proj.bias, l.in_proj.bias]).float(),
            conv_w=stack(lambda m: m.conv1d.weight[:, 0, :])[:, None],
            conv_b=stack(lambda m: m.conv1d.bias if m.conv1d.bias is not None else torch.zeros_like(m.D))[:, None],
            x_w=stack(lambda m: m.x_proj.weight.t()),
            dt_w=stack(lambda m: m.dt_proj.weight.t()),
            dt_b=stack(lambda m: m.dt_proj.bias)[:, None],
            A=stack(lambda m: m.A_continuous())[:, None],
            D=stack(lambda m: m.D)[:, None],
            out_w=stack(lambda m: m.out_proj.weight.t()),
            out_b=None if g.out_proj.bias is None else stack(lambda m: m.out_proj.bias)[:, None],
            dt_rank=g.dt_rank, d_state=g.d_state,
        )


@dataclass
class PairCache:
    conv: Tensor  # (B, 2, d_inner, d_conv), newest input last
    ssm: Tensor  # (B, 2, d_inner, d_state)
    # Work buffers of a chunk's (B, 2, L, d_inner, d_state) terms, kept per shape and overwritten by every step: a
    # fresh tensor of that size costs more in page faults than the arithmetic that fills it (16 Atari envs).
    scratch: dict = field(default_factory=dict)

    def buffers(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        key = (shape, dtype)
        if key not in self.scratch:
            self.scratch[key] = tuple(torch.empty(shape, dtype=dtype, device=self.ssm.device) for _ in range(3))
        return self.scratch[key]


def allocate_pair_cache(block: GLoMaBlock, batch_size: int, device: torch.device) -> PairCache:
    m = block.global_mamba
    return PairCache(torch.zeros(batch_size, 2, m.d_inner, m.d_conv, device=device),
                     torch.zeros(batch_size, 2, m.d_inner, m.d_state, device=device))


def pair_mixer_step(w: PairWeights, cache: PairCache, h: Tensor,
                    masks: Optional[SegmentMasks]) -> tuple[Tensor, Tensor]:
    """Both mixers over the chunk h (B, L, d) from `cache` (updated in place) -> (global, local) (B, L, d) each.

    `masks` are built from starts of shape (B, 2, L).
    """
    B, L, _ = h.shape
    k = cache.conv.shape[-1]
    xz = F.linear(h.float(), w.in_w, w.in_b).view(B, L, 2, 2, -1).transpose(1, 2)  # (B, 2, L, 2, d_inner)
    u, z = xz[:, :, :, 0], xz[:, :, :, 1]  # (B, 2, L, d_inner)
    xs = torch.cat([cache.conv[..., 1:], u.transpose(2, 3)], dim=-1)  # (B, 2, d_inner, k - 1 + L)
    windows = xs.unfold(-1, k, 1).transpose(2, 3)  # (B, 2, L, d_inner, k)
    if masks is not None:
        windows = windows * masks.conv[:, :, :, None, :]
    u = F.silu((windows * w.conv_w).sum(-1) + w.conv_b)  # (B, 2, L, d_inner)
    new_conv = xs[..., -k:]
    cache.conv.copy_(new_conv * masks.conv_keep[:, :, None, :] if masks is not None else new_conv)

    dt, Bm, C = torch.split(torch.einsum("bcld,cdr->bclr", u, w.x_w), [w.dt_rank, w.d_state, w.d_state], dim=-1)
    delta = F.softplus(torch.einsum("bclr,crd->bcld", dt, w.dt_w) + w.dt_b)  # (B, 2, L, d_inner)
    y = _recurrence(w, cache, u, delta, Bm, C, masks)  # (B, 2, L, d_inner): y_j = <h_j, C_j>
    y = (y + w.D * u) * F.silu(z)
    out = torch.einsum("bcle,ced->bcld", y, w.out_w)  # (B, 2, L, d); no weight copies per env
    if w.out_b is not None:
        out = out + w.out_b
    out = out.to(h.dtype)
    return out[:, 0], out[:, 1]


def _recurrence(w: PairWeights, cache: PairCache, u: Tensor, delta: Tensor, Bm: Tensor, C: Tensor,
                masks: Optional[SegmentMasks]) -> Tensor:
    """h_j = exp(delta_j A) h_{j-1} + delta_j u_j B_j over the chunk from cache.ssm (updated); y_j = <h_j, C_j>."""
    dA, dBu, states = cache.buffers(delta.shape + (w.d_state,), delta.dtype)  # states: h_j for every token
    torch.mul(delta[..., None], w.A, out=dA).exp_()  # (B, 2, L, d_inner, d_state)
    if masks is not None:
        dA.mul_(masks.ssm_keep[..., None, None])
    torch.mul((delta * u)[..., None], Bm[..., None, :], out=dBu)
    state = cache.ssm
    for j in range(delta.shape[2]):
        state = torch.addcmul(dBu[:, :, j], dA[:, :, j], state, out=states[:, :, j])
    cache.ssm.copy_(state)
    return torch.matmul(states, C[..., None])[..., 0]


def layer_step(block: GLoMaBlock, w: PairWeights, cache: PairCache, x: Tensor,
               masks: Optional[SegmentMasks]) -> Tensor:
    """One GLoMa layer over the chunk x (B, L, d): `GLoMaBlock.step` with both mixers fused."""
    h = block.norm1(x)
    g, l = pair_mixer_step(w, cache, h, masks)
    x = x + block.drop1(block.fuse(g, l, h))
    return x + block.ffn(block.norm2(x))


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
    """One layer's weights in gloma_step.cpp's `Weight` order and layouts, float32."""
    g, l = block.global_mamba, block.local_mamba

    def pair(fn) -> Tensor:  # both branches stacked: (2, ...)
        return torch.stack([fn(g), fn(l)])

    fuse = {"add": None, "gate": getattr(block, "gate", None), "concat": getattr(block, "merge", None)}[block.fusion]
    weights = [
        block.norm1.weight, block.norm1.bias,
        torch.cat([g.in_proj.weight, l.in_proj.weight]),
        None if g.in_proj.bias is None else torch.cat([g.in_proj.bias, l.in_proj.bias]),
        pair(lambda m: m.conv1d.weight[:, 0, :].t()),  # (2, d_conv, d_inner)
        pair(lambda m: m.conv1d.bias if m.conv1d.bias is not None else torch.zeros_like(m.D)),
        pair(lambda m: m.x_proj.weight.t()), pair(lambda m: m.dt_proj.weight.t()), pair(lambda m: m.dt_proj.bias),
        pair(lambda m: m.A_continuous()), pair(lambda m: m.D),
        pair(lambda m: m.out_proj.weight.t()), None if g.out_proj.bias is None else pair(lambda m: m.out_proj.bias),
        None if fuse is None else fuse.weight, None if fuse is None else fuse.bias,
        block.norm2.weight, block.norm2.bias,
        block.ffn[0].weight, block.ffn[0].bias, block.ffn[2].weight, block.ffn[2].bias,
    ]
    return [None if t is None else t.detach().float().contiguous() for t in weights]


@dataclass
class StackStep:
    """All GLoMa layers stepped by one call of the C++ class `GLoMaStack` (mambadm/model/csrc/gloma_step.cpp): the
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
        missing = cpp_missing()
        if missing is not None:
            raise RuntimeError(f"StackStep needs the CPU extension: {missing}")
        self.kernel = torch.classes.mambadm_cpu.GLoMaStack(self.weights, self.eps, self.fusion, self.approximate,
                                                           self.window_tokens, self.conv, self.ssm)

    def __call__(self, x: Tensor, token_index: Tensor) -> Tensor:
        """The stack over the chunk x (B, L, d) whose first token has index token_index (B,) -> (B, L, d)."""
        envs, d = self.conv.shape[2], self.weights[0].shape[0]
        if (x.dim() != 3 or x.shape[0] != envs or x.shape[2] != d or token_index.shape != (envs,)
                or token_index.dtype != torch.long):
            raise ValueError(f"StackStep holds the states of {envs} envs: x must be ({envs}, L, {d}) and token_index "
                             f"({envs},) int64, got {tuple(x.shape)} and {tuple(token_index.shape)} "
                             f"{token_index.dtype}")
        return self.kernel.step(x.float(), token_index.contiguous()).to(x.dtype)
