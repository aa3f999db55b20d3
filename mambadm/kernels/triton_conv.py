"""Triton kernels of the `triton` backend's fused causal depthwise conv + bias + SiLU (mambadm/ssm/conv_triton.py
holds their launcher, the autograd wrapper and the docs).

One program owns a row, a block of BT tokens and a block of BD channels of the batch-first (rows, L, channels)
layout. Tap k of token t reads the input K - 1 - k steps back unless that crosses the start of the row or of the
token's window (t % segment < K - 1 - k): window restarts are a comparison in registers, not a mask tensor or a
padded copy. Imported only when that backend runs: importing this module needs triton.
"""
import triton
import triton.language as tl


@triton.jit
def _preactivation(u_ptr, w_ptr, b_ptr, r, t, d, dm, L, segment, su_r, su_t, HAS_BIAS: tl.constexpr,
                   K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """bias + sum_k w[:, k] u_{t - (K - 1 - k)} over the taps that stay inside t's row and window: (BT, BD) in
    float32, zero for tokens t >= L."""
    tm = t < L
    pos = t % segment  # steps since the token's window started
    acc = tl.zeros((BT, BD), tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + d, mask=dm, other=0.0).to(tl.float32)
        acc = tl.where(tm[:, None], acc + bias[None, :], 0.0)
    for k in tl.static_range(K):
        back = K - 1 - k
        reads = tm & (pos >= back)  # pos <= t, so this also keeps t - back >= 0
        w = tl.load(w_ptr + d * K + k, mask=dm, other=0.0)
        x = tl.load(u_ptr + r * su_r + (t - back)[:, None] * su_t + d[None, :], mask=reads[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)
        acc += w[None, :] * x
    return acc


@triton.jit
def _preactivation_grad(u_ptr, w_ptr, b_ptr, g_ptr, r, t, d, dm, L, Dn, segment, su_r, su_t,
                        HAS_BIAS: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """dL/d(preactivation) = g_t SiLU'(pre_t) at tokens t, the preactivation recomputed; zero for t >= L."""
    pre = _preactivation(u_ptr, w_ptr, b_ptr, r, t, d, dm, L, segment, su_r, su_t, HAS_BIAS, K, BT, BD)
    g = tl.load(g_ptr + (r * L + t[:, None]) * Dn + d[None, :], mask=(t < L)[:, None] & dm[None, :],
                other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-pre))
    return g * s * (1.0 + pre * (1.0 - s))


@triton.jit
def conv_silu_fwd(u_ptr, w_ptr, b_ptr, out_ptr, L, Dn, segment, su_r, su_t, HAS_BIAS: tl.constexpr,
                  K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    dm = d < Dn
    pre = _preactivation(u_ptr, w_ptr, b_ptr, r, t, d, dm, L, segment, su_r, su_t, HAS_BIAS, K, BT, BD)
    tl.store(out_ptr + (r * L + t[:, None]) * Dn + d[None, :], pre / (1.0 + tl.exp(-pre)),
             mask=(t < L)[:, None] & dm[None, :])


@triton.jit
def conv_silu_bwd(u_ptr, w_ptr, b_ptr, g_ptr, du_ptr, dw_ptr, db_ptr, L, Dn, segment, su_r, su_t,
                  HAS_BIAS: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """du of the program's tokens; the weight and bias gradients summed over its tokens into its own slot of
    dw (rows * token blocks, Dn, K) and db (rows * token blocks, Dn), summed by the launcher (no atomics)."""
    r = tl.program_id(0).to(tl.int64)
    pt = tl.program_id(1)
    t = pt * BT + tl.arange(0, BT)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    tm, dm = t < L, d < Dn
    pos = t % segment
    slot = r * tl.num_programs(1) + pt
    gp = _preactivation_grad(u_ptr, w_ptr, b_ptr, g_ptr, r, t, d, dm, L, Dn, segment, su_r, su_t, HAS_BIAS, K,
                             BT, BD)
    for k in tl.static_range(K):  # tap k read u_{t - back} for the tokens whose window reaches that far back
        back = K - 1 - k
        reads = tm & (pos >= back)
        x = tl.load(u_ptr + r * su_r + (t - back)[:, None] * su_t + d[None, :], mask=reads[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)
        tl.store(dw_ptr + (slot * Dn + d) * K + k, tl.sum(gp * x, axis=0), mask=dm)
    if HAS_BIAS:
        tl.store(db_ptr + slot * Dn + d, tl.sum(gp, axis=0), mask=dm)
    # u_t feeds tap K - 1 - j of token t + j, when that token's window reaches j steps back
    du = gp * tl.load(w_ptr + d * K + (K - 1), mask=dm, other=0.0)[None, :]
    for j in tl.static_range(1, K):
        tj = t + j
        gj = _preactivation_grad(u_ptr, w_ptr, b_ptr, g_ptr, r, tj, d, dm, L, Dn, segment, su_r, su_t, HAS_BIAS,
                                 K, BT, BD)
        reaches = (tj < L) & (tj % segment >= j)
        w = tl.load(w_ptr + d * K + (K - 1 - j), mask=dm, other=0.0)
        du += tl.where(reaches[:, None], gj, 0.0) * w[None, :]
    tl.store(du_ptr + (r * L + t[:, None]) * Dn + d[None, :], du, mask=tm[:, None] & dm[None, :])
