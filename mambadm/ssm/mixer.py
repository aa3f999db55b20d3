"""The Mamba mixer block with mamba_ssm's parameter layout, a parallel forward and an O(1) recurrent step.

Parameter names, shapes and initialisation follow mamba_ssm's `Mamba` (modules/mamba_simple.py), so a state dict
moves between the two unchanged. The selective scan runs on the backend resolved once per module (backends.py).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mambadm.ssm.backends import BACKENDS, SEGMENTED, resolve_backend, selective_scan
from mambadm.ssm.scan_cpp import causal_conv_silu_cpp, io_dtype, scan_rows, segment_keep
from mambadm.ssm.scan_cuda import causal_conv1d_cuda
from mambadm.ssm.scan_ref import compute_dtype, project_delta

logger = logging.getLogger(__name__)
_logged_choices: set[tuple[str, str, str]] = set()


def _at_least_f32(t: Tensor) -> Tensor:
    """float32 for low-precision tensors (the SSM parameters stay float32 under bf16), unchanged otherwise."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


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
    """(b, L, d) -> (b * ceil(L / segment), segment, d): windows from the start, the last right-padded with zeros."""
    b, length, d = x.shape
    n = -(-length // segment)
    return F.pad(x, (0, 0, 0, n * segment - length)).reshape(b * n, segment, d)


@dataclass
class MambaCache:
    """Recurrent state of one Mamba mixer for `step()`.

    conv_state (batch, d_inner, d_conv): the last d_conv conv inputs, newest in the last column (mamba_ssm's order).
    ssm_state  (batch, d_inner, d_state): the SSM hidden state h_t.
    """

    conv_state: Tensor
    ssm_state: Tensor

    def reset(self, index: Tensor | slice | int | None = None) -> None:
        """Zero the state of the batch rows `index` (all rows when None), e.g. when an episode restarts."""
        index = slice(None) if index is None else index
        self.conv_state[index] = 0
        self.ssm_state[index] = 0


class Mamba(nn.Module):
    """Mamba mixer: in_proj -> causal depthwise conv -> SiLU -> selective SSM (gated by SiLU(z)) -> out_proj."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.backend = backend
        self._backend_in_use: str | None = None
        self._resolved_for: str | None = None  # device type the backend was resolved for
        if backend not in BACKENDS:
            raise ValueError(f"unknown Mamba backend {backend!r}; expected one of {BACKENDS}")

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1,
            bias=conv_bias, **factory,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        self._init_dt_proj(dt_init, dt_scale, dt_min, dt_max, dt_init_floor)

        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # kept in float32 whatever the module dtype, as mamba_ssm does
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def _init_dt_proj(self, dt_init: str, dt_scale: float, dt_min: float, dt_max: float, floor: float) -> None:
        """dt_proj weight ~ U(+-dt_rank^-0.5 * dt_scale); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]."""
        std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        log_min, log_max = math.log(dt_min), math.log(dt_max)
        dt = torch.exp(torch.rand(self.d_inner) * (log_max - log_min) + log_min).clamp(min=floor)
        inv_softplus_dt = dt + torch.log(-torch.expm1(-dt))
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_softplus_dt)
        self.dt_proj.bias._no_reinit = True
        self.dt_proj.bias._no_weight_decay = True

    # ----------------------------------------------------------------------------------------------- backend
    @property
    def backend_in_use(self) -> str:
        """The concrete backend (ref | fast | cpp | cuda), resolved on first use from `backend` and the parameters'
        device, and again only if the module has moved to another kind of device since (`cpp` runs on CPUs only)."""
        device_type = self.in_proj.weight.device.type
        if self._backend_in_use is None or self._resolved_for != device_type:
            name, reason = resolve_backend(self.backend, self.in_proj.weight.device)
            self._backend_in_use, self._resolved_for = name, device_type
            key = (self.backend, name, reason)
            log = logger.debug if key in _logged_choices else logger.info
            _logged_choices.add(key)
            log("Mamba mixer selective-scan backend: %s (%s)", name, reason)
        return self._backend_in_use

    # ----------------------------------------------------------------------------------------------- forward
    def A_continuous(self) -> Tensor:
        """A = -exp(A_log) in float32 (float64 for a float64 module), (d_inner, d_state)."""
        return -torch.exp(_at_least_f32(self.A_log))

    def _conv(self, u: Tensor, backend: str, segment: int | None = None) -> Tensor:
        """SiLU(causal depthwise conv) over the time axis of u (batch, L, d_inner) -> (batch, L, d_inner).

        `cuda`: causal_conv1d_fn when installed, else nn.Conv1d, on a contiguous (batch, d_inner, L) copy, the layout
        of the GPU kernels; `cpp`: the fused CPU kernel; `ref` / `fast` / `triton`: `causal_depthwise_conv` in the
        batch-first layout, with no copy. `segment` (cpp and triton, see `forward`): windows convolved on their own.
        """
        if backend == "cuda":
            x = u.transpose(1, 2).contiguous()
            causal_conv1d_fn = causal_conv1d_cuda()
            if causal_conv1d_fn is not None:
                out = causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
            else:
                out = F.silu(self.conv1d(x)[..., : x.shape[-1]])
            return out.transpose(1, 2)
        if backend == "cpp":
            return causal_conv_silu_cpp(u, self.conv1d.weight, self.conv1d.bias, segment)
        return F.silu(causal_depthwise_conv(u, self.conv1d.weight, self.conv1d.bias, segment))

    def _in_proj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """u, z (b, L, d_inner) = in_proj(x) split in two, computed as two products with the halves of its weight: the
        gradient of x is then a sum of two products instead of a copy of both halves into one (b, L, 2 d_inner)
        tensor (the backward of a split), 2.5-3.4% of a K=30 MambaDM training step on CPU (benchmarks/RESULTS.md)."""
        w, b, d = self.in_proj.weight, self.in_proj.bias, self.d_inner
        return F.linear(x, w[:d], None if b is None else b[:d]), F.linear(x, w[d:], None if b is None else b[d:])

    def _ssm_inputs(self, x: Tensor, backend: str, segment: int | None = None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """From x (batch, L, d_model): u, z (batch, L, d_inner), dt (batch, L, dt_rank), B, C (batch, L, d_state),
        batch-first, the layout the projections produce and read; dt are the step sizes before dt_proj (its weight
        is the scan's `delta_proj`, its bias the scan's `delta_bias`)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Mamba expects x of shape (batch, L, d_model={self.d_model}), got {tuple(x.shape)}")
        u, z = self._in_proj(x)
        u = self._conv(u, backend, segment)
        dt, B, C = torch.split(self.x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return u, z, dt, B, C

    def forward(self, x: Tensor, segment: int | None = None) -> Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model).

        `segment`: cut the sequence into windows of `segment` tokens from its start and run each as its own
        sequence (conv and state start from zero at every window start; the GLoMa local branch). The `cpp` and
        `triton` kernels restart in place; the other backends run the windows folded into the batch (the last one
        right-padded, which, being causal, changes no real token).
        """
        if segment is not None and (isinstance(segment, bool) or not isinstance(segment, int) or segment < 1):
            raise ValueError(f"Mamba: segment must be a positive number of tokens or None, got {segment!r}")
        backend = self.backend_in_use
        if segment is not None and backend not in SEGMENTED:
            b, length, d = x.shape
            return self.forward(fold_windows(x, segment)).reshape(b, -1, d)[:, :length]
        u, z, dt, B, C = self._ssm_inputs(x, backend, segment)
        if backend == "cpp":
            y = self._scan_cpp(u, z, dt, B, C, segment)
        else:  # selective_scan's (b, channels, L) layout as views: no full-length transposed copy on the way
            y = selective_scan(
                *(t.transpose(1, 2) for t in (u, dt)), self.A_continuous(), *(t.transpose(1, 2) for t in (B, C)),
                _at_least_f32(self.D), z=z.transpose(1, 2), delta_bias=_at_least_f32(self.dt_proj.bias),
                delta_softplus=True, backend=backend, segment=segment, delta_proj=self.dt_proj.weight,
            ).transpose(1, 2)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast out_proj casts y itself
            y = y.to(x.dtype)
        return self.out_proj(y)

    def _scan_cpp(self, u: Tensor, z: Tensor, dt: Tensor, B: Tensor, C: Tensor, segment: int | None) -> Tensor:
        """The `cpp` scan on the batch-first tensors as they are (the kernel's own layout): no transposed views in
        and out, so autograd adds the two gradients of u (from x_proj and from the scan) in place, and no argument
        checks (the tensors are the module's own): ~4% of a K=8 training step at d_model 64, 0-2.6% at K=30, nothing
        measurable at d_model 128, against the `selective_scan` entry point (A/B in one process,
        benchmarks/RESULTS.md). bfloat16 tensors (bf16 autocast) go in and come out as they are."""
        io, dtype = io_dtype(u), compute_dtype(u)
        y, _ = scan_rows(
            u.to(io), dt.to(io), self.A_continuous().to(dtype)[None], B.to(io), C.to(io),
            self.D.to(dtype), z.to(io), self.dt_proj.bias.to(dtype), delta_softplus=True,
            keep=segment_keep(u.shape[0], u.shape[1], segment, u.device), check=False,
            delta_proj=self.dt_proj.weight.to(dtype),
        )
        return y

    def delta(self, x: Tensor, segment: int | None = None) -> Tensor:
        """The step sizes softplus(dt_proj(...) + bias) for input x (batch, L, d_model), float32: (batch, d_inner,
        L), or with `segment` per window as `forward` sees them, (batch * windows, d_inner, segment)."""
        x = x if segment is None else fold_windows(x, segment)
        _, _, dt, _, _ = self._ssm_inputs(x, "ref")
        delta = project_delta(dt.transpose(1, 2), self.dt_proj.weight)  # the bias added in float32, as the scans do
        return F.softplus(_at_least_f32(delta) + _at_least_f32(self.dt_proj.bias)[:, None])

    def A_discrete(self, x: Tensor, segment: int | None = None) -> Tensor:
        """exp(delta * A) for input x (batch, L, d_model): (batch, L, d_inner, d_state), float32; with `segment`
        per window, (batch * windows, segment, d_inner, d_state)."""
        return torch.exp(self.delta(x, segment).transpose(1, 2)[..., None] * self.A_continuous())

    # ----------------------------------------------------------------------------------------------- recurrence
    def allocate_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> MambaCache:
        """Zero state for `step()`: conv_state in `dtype` (default: the weights'), ssm_state in float32 (float64 if asked)."""
        weight = self.conv1d.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        ssm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return MambaCache(
            conv_state=torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype),
        )

    def step(self, x_t: Tensor, cache: MambaCache) -> Tensor:
        """One token: x_t (batch, d_model) -> (batch, d_model); updates `cache` in place."""
        conv_state, ssm_state = cache.conv_state, cache.ssm_state
        u, z = F.linear(x_t, self.in_proj.weight, self.in_proj.bias).chunk(2, dim=-1)  # (b, d_inner) each
        for k in range(self.d_conv - 1):  # shift left without allocating (column k <- k+1)
            conv_state[:, :, k].copy_(conv_state[:, :, k + 1])
        conv_state[:, :, -1].copy_(u)
        u = torch.einsum("bdk,dk->bd", conv_state, self.conv1d.weight[:, 0, :])
        if self.conv1d.bias is not None:
            u = u + self.conv1d.bias
        u = F.silu(u)
        dt, B, C = torch.split(self.x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(F.linear(dt, self.dt_proj.weight, self.dt_proj.bias).to(ssm_state.dtype))  # (b, d_inner)
        dA = torch.exp(dt[:, :, None] * self.A_continuous().to(ssm_state.dtype))  # (b, d_inner, d_state)
        ssm_state.mul_(dA).add_((dt * u.to(ssm_state.dtype))[:, :, None] * B.to(ssm_state.dtype)[:, None, :])
        y = torch.bmm(ssm_state, C.to(ssm_state.dtype)[:, :, None]).squeeze(-1)  # (b, d_inner)
        y = (y + self.D.to(y.dtype) * u.to(y.dtype)) * F.silu(z.to(y.dtype))
        return self.out_proj(y.to(x_t.dtype))
