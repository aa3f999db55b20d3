"""The mixer's causal depthwise conv in PyTorch ops (the `ref`, `fast` and `triton` backends' conv), and the
folding of windows into the batch (the shared path of backends that cannot restart at window starts in place)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_depthwise_conv(u: Tensor, weight: Tensor, bias: Tensor | None, segment: int | None = None) -> Tensor:
    """nn.Conv1d(groups=channels, padding=K-1) over the time axis of u (batch, L, channels), first L outputs.

    out_t = bias + sum_k weight[:, 0, k] * u_{t-K+1+k} (zeros before the start), as K shifted multiply-adds in the
    batch-first layout: no transposed copy of u in or out, and its gradient comes back in the same layout.
    `segment`: windows of `segment` steps from the start, each convolved on its own (taps never reach back across a
    window start).
    """
    K, length = weight.shape[-1], u.shape[1]
    padded = F.pad(u, (0, 0, K - 1, 0))  # (b, K - 1 + L, c)
    w = weight[:, 0, :]  # (c, K); tap K - 1 multiplies the current input
    out = padded[:, K - 1 :] * w[:, K - 1] if bias is None else torch.addcmul(bias, padded[:, K - 1 :], w[:, K - 1])
    position = None if segment is None else torch.arange(length, device=u.device)[:, None] % segment  # (L, 1)
    for k in range(K - 1):
        wk = w[:, k]
        if position is not None:  # tap k reaches K - 1 - k steps back: its weight is zero where that crosses a start
            wk = wk * (position >= K - 1 - k).to(w.dtype)  # (L, c): the mask rides on the weight, not on the input
        out = torch.addcmul(out, padded[:, k : k + length], wk)
    return out


def fold_windows(x: Tensor, segment: int) -> Tensor:
    """(b, L, d) -> (b * ceil(L / segment), segment, d): windows from the start, the last right-padded with zeros (a
    view when `segment` divides L)."""
    b, length, d = x.shape
    n = -(-length // segment)
    if n * segment != length:
        x = F.pad(x, (0, 0, 0, n * segment - length))
    return x.reshape(b * n, segment, d)


def per_window(fn: Callable[..., Tensor], segment: int, *seqs: Tensor | None) -> Tensor:
    """fn over the windows of `segment` steps of the sequences seqs (b, L, .) folded into the batch, its result
    (b * windows, segment, c) unfolded to (b, L, c). Being causal, the zero padding of the last window changes no
    real step."""
    b, length = seqs[0].shape[:2]
    out = fn(*(None if t is None else fold_windows(t, segment) for t in seqs))
    return out.reshape(b, -1, out.shape[-1])[:, :length]
