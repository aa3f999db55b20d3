"""The Mamba mixer block with mamba_ssm's parameter layout, a parallel forward and a recurrent step over chunks.

Parameter names, shapes and initialisation follow mamba_ssm's `Mamba` (modules/mamba_simple.py), so a state dict
moves between the two unchanged. `forward` runs the conv and the selective scan on the backend object resolved once
per module (backends.py); `step` is the readable recurrence over a chunk of tokens from a cache, with optional
segment starts (segments.py), the fast acting kernels' reference.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mambadm.ssm.backends import BACKEND_OBJECTS, BACKENDS, Backend, resolve_backend
from mambadm.ssm.conv import fold_windows
from mambadm.ssm.scan_ref import project_delta
from mambadm.ssm.segments import SegmentMasks

logger = logging.getLogger(__name__)
_logged_choices: set[tuple[str, str, str]] = set()


def _at_least_f32(t: Tensor) -> Tensor:
    """float32 for low-precision tensors (the SSM parameters stay float32 under bf16), unchanged otherwise."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


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
        """The concrete backend's name (ref | fast | cpp | cuda | triton), see `kernels`."""
        return self.kernels.name

    @property
    def kernels(self) -> Backend:
        """The concrete backend object, resolved on first use from `backend` and the parameters' device, and again
        only if the module has moved to another kind of device since (`cpp` runs on CPUs only)."""
        device_type = self.in_proj.weight.device.type
        if self._backend_in_use is None or self._resolved_for != device_type:
            name, reason = resolve_backend(self.backend, self.in_proj.weight.device)
            self._backend_in_use, self._resolved_for = BACKEND_OBJECTS[name], device_type
            key = (self.backend, name, reason)
            log = logger.debug if key in _logged_choices else logger.info
            _logged_choices.add(key)
            log("Mamba mixer selective-scan backend: %s (%s)", name, reason)
        return self._backend_in_use

    # ----------------------------------------------------------------------------------------------- parameters
    def A_continuous(self) -> Tensor:
        """A = -exp(A_log) in float32 (float64 for a float64 module), (d_inner, d_state)."""
        return -torch.exp(_at_least_f32(self.A_log))

    def conv_taps(self) -> Tensor:
        """The depthwise conv's weight as (d_inner, d_conv), tap d_conv - 1 multiplying the newest input."""
        return self.conv1d.weight[:, 0, :]

    def conv_bias(self) -> Tensor:
        """The conv's bias (d_inner,), zeros when the module has none."""
        return self.conv1d.bias if self.conv1d.bias is not None else torch.zeros_like(self.D)

    # ----------------------------------------------------------------------------------------------- forward
    def _in_proj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """u, z (b, L, d_inner) = in_proj(x) split in two, computed as two products with the halves of its weight: the
        gradient of x is then a sum of two products instead of a copy of both halves into one (b, L, 2 d_inner)
        tensor (the backward of a split), 2.5-3.4% of a K=30 MambaDM training step on CPU (benchmarks/RESULTS.md)."""
        w, b, d = self.in_proj.weight, self.in_proj.bias, self.d_inner
        return F.linear(x, w[:d], None if b is None else b[:d]), F.linear(x, w[d:], None if b is None else b[d:])

    def _ssm_inputs(self, x: Tensor, kernels: Backend, segment: int | None = None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """From x (batch, L, d_model): u, z (batch, L, d_inner), dt (batch, L, dt_rank), B, C (batch, L, d_state),
        batch-first, the layout the projections produce and read; dt are the step sizes before dt_proj (its weight
        is the scan's `delta_proj`, its bias the scan's `delta_bias`)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Mamba expects x of shape (batch, L, d_model={self.d_model}), got {tuple(x.shape)}")
        u, z = self._in_proj(x)
        u = kernels.conv(u, self.conv1d.weight, self.conv1d.bias, segment)
        dt, B, C = torch.split(self.x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return u, z, dt, B, C

    def forward(self, x: Tensor, segment: int | None = None) -> Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model).

        `segment`: cut the sequence into windows of `segment` tokens from its start and run each as its own
        sequence (conv and state start from zero at every window start; the GLoMa local branch). The backend
        restarts in place where it can, else runs the windows folded into the batch (backends.py).
        """
        if segment is not None and (isinstance(segment, bool) or not isinstance(segment, int) or segment < 1):
            raise ValueError(f"Mamba: segment must be a positive number of tokens or None, got {segment!r}")
        kernels = self.kernels
        u, z, dt, B, C = self._ssm_inputs(x, kernels, segment)
        y = kernels.scan(u, dt, self.A_continuous(), B, C, _at_least_f32(self.D), z, _at_least_f32(self.dt_proj.bias),
                         delta_softplus=True, delta_proj=self.dt_proj.weight, segment=segment)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast out_proj casts y itself
            y = y.to(x.dtype)
        return self.out_proj(y)

    def delta(self, x: Tensor, segment: int | None = None) -> Tensor:
        """The step sizes softplus(dt_proj(...) + bias) for input x (batch, L, d_model), float32: (batch, d_inner,
        L), or with `segment` per window as `forward` sees them, (batch * windows, d_inner, segment)."""
        x = x if segment is None else fold_windows(x, segment)
        _, _, dt, _, _ = self._ssm_inputs(x, BACKEND_OBJECTS["ref"])
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
        """Zero state for `step()`: conv_state in `dtype` (default: the weights'), ssm_state in float32 (float64 if
        asked)."""
        weight = self.conv1d.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        ssm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return MambaCache(
            conv_state=torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype),
        )

    def step(self, x: Tensor, cache: MambaCache, masks: SegmentMasks | None = None) -> Tensor:
        """The mixer over a chunk x (batch, L, d_model), or one token (batch, d_model), continuing from `cache`
        (updated in place) -> the same shape. `masks` (built from starts of shape (batch, L)): where a token starts
        a segment, the state before it is dropped and the conv reads nothing from before it, as `forward` does at
        the start of a sequence or window. One matmul per projection for the whole chunk; the recurrence

            h_j = exp(delta_j A) h_{j-1} + delta_j u_j B_j,    y_j = <h_j, C_j> + D u_j

        runs token by token in the SSM state's dtype (float32, float64 for a float64 cache)."""
        single = x.dim() == 2
        x = x[:, None] if single else x
        k, h = self.d_conv, cache.ssm_state  # h (batch, d_inner, d_state)
        u, z = F.linear(x, self.in_proj.weight, self.in_proj.bias).chunk(2, dim=-1)  # (batch, L, d_inner) each
        history = torch.cat([cache.conv_state[:, :, 1:], u.transpose(1, 2)], dim=2)  # (batch, d_inner, k - 1 + L)
        windows = history.unfold(2, k, 1)  # (batch, d_inner, L, k): the inputs each token's taps read
        if masks is not None:
            windows = windows * masks.conv[:, None]
        u = F.silu(torch.einsum("bdlk,dk->bld", windows, self.conv_taps()) + self.conv_bias())
        newest = history[:, :, -k:]
        cache.conv_state.copy_(newest * masks.conv_keep[:, None] if masks is not None else newest)

        dt, B, C = torch.split(self.x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(F.linear(dt, self.dt_proj.weight, self.dt_proj.bias)).to(h.dtype)  # (batch, L, d_inner)
        dA = torch.exp(delta[..., None] * self.A_continuous().to(h.dtype))  # (batch, L, d_inner, d_state)
        if masks is not None:
            dA = dA * masks.ssm_keep[..., None, None]
        dBu = (delta * u.to(h.dtype))[..., None] * B.to(h.dtype)[:, :, None, :]  # (batch, L, d_inner, d_state)
        states = []
        for j in range(x.shape[1]):
            h = torch.addcmul(dBu[:, j], dA[:, j], h)
            states.append(h)
        cache.ssm_state.copy_(h)
        y = torch.matmul(torch.stack(states, 1), C.to(h.dtype)[..., None])[..., 0]  # (batch, L, d_inner)
        y = (y + self.D.to(y.dtype) * u.to(y.dtype)) * F.silu(z.to(y.dtype))
        out = self.out_proj(y.to(x.dtype))
        return out[:, 0] if single else out
