"""Lean recurrent acting for MambaDM: both mixers of a GLoMa layer stepped as one, on a leading branch axis.

At one env per call the cost of a recurrent step is the number of PyTorch ops, not their size. Both branches of a
layer read the same normed input and have the same shapes, so their weights are stacked once (`PairWeights`,
snapshotted when the acting state is made) and every projection, the conv, the scan and the gating run once for
both (branch 0 = global, 1 = local). The result equals `GLoMaBlock.step` (the readable per-branch path) and
`GLoMaBlock.forward`; tests/test_model.py checks both. When the mixers run on the `cpp` backend, the chunk's
softplus, recurrence (decays, states, <h, C>), D skip and gate are one call of the fused CPU kernel over both
branches (A, D and the dt bias grouped per branch) instead of the tensor ops of `_recurrence` and around it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mambadm.model.gloma import GLoMaBlock, SegmentMasks
from mambadm.ssm.scan_cpp import scan_rows


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
    fused_kernel: bool  # the mixers run on the `cpp` backend: step the recurrence with its kernel

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
            dt_rank=g.dt_rank, d_state=g.d_state, fused_kernel=g.backend_in_use == "cpp",
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
    delta_pre = torch.einsum("bclr,crd->bcld", dt, w.dt_w)  # (B, 2, L, d_inner), before bias and softplus
    if w.fused_kernel:  # bias, softplus, recurrence, D skip and gate in one call
        y = _mixer_kernel(w, cache, u, delta_pre, Bm, C, z, masks)
    else:
        delta = F.softplus(delta_pre + w.dt_b)
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


def _mixer_kernel(w: PairWeights, cache: PairCache, u: Tensor, delta_pre: Tensor, Bm: Tensor, C: Tensor, z: Tensor,
                  masks: Optional[SegmentMasks]) -> Tensor:
    """softplus(delta_pre + dt bias), `_recurrence`, the D skip and the silu(z) gate as one call of the fused CPU
    kernel: rows (env, branch), row r using branch r % 2's A, D and dt bias."""
    B, _, L, d_inner = delta_pre.shape
    rows = B * 2
    keep = masks.ssm_keep.reshape(rows, L) if masks is not None else None
    y, last = scan_rows(u.reshape(rows, L, d_inner), delta_pre.reshape(rows, L, d_inner), w.A[:, 0],
                        Bm.reshape(rows, L, -1), C.reshape(rows, L, -1), D=w.D[:, 0], z=z.reshape(rows, L, d_inner),
                        delta_bias=w.dt_b[:, 0], delta_softplus=True, h0=cache.ssm.view(rows, d_inner, -1), keep=keep,
                        check=False)  # shapes fixed by the snapshotted weights and the cache
    cache.ssm.copy_(last.view_as(cache.ssm))
    return y.view(B, 2, L, d_inner)


def layer_step(block: GLoMaBlock, w: PairWeights, cache: PairCache, x: Tensor,
               masks: Optional[SegmentMasks]) -> Tensor:
    """One GLoMa layer over the chunk x (B, L, d): `GLoMaBlock.step` with both mixers fused."""
    h = block.norm1(x)
    g, l = pair_mixer_step(w, cache, h, masks)
    x = x + block.drop1(block.fuse(g, l, h))
    return x + block.ffn(block.norm2(x))
