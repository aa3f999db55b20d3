"""Triton kernels of the `triton` selective-scan backend (mambadm/ssm/scan_triton.py holds their launchers, the
autograd wrapper and the docs).

Imported only when that backend runs: importing this module needs triton.
"""
import triton
import triton.language as tl


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _channel_params(a_ptr, d_ptr, bias_ptr, d, n, N, dm, dn_mask, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BD: tl.constexpr):
    """A (BD, NP), D and the dt bias (BD,) of a block of channels, in float32 (zeros where the scan has none)."""
    A = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    Dv = tl.load(d_ptr + d, mask=dm, other=0.0).to(tl.float32) if HAS_D else tl.zeros((BD,), tl.float32)
    bias = tl.load(bias_ptr + d, mask=dm, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros((BD,), tl.float32)
    return A, Dv, bias


@triton.jit
def _chunk_decay(dl, A, t, tm, segment):
    """exp(Δ·A) of a chunk's tokens (CHUNK, BD, NP): 0 at a restart (it drops the state before it), 1 past the
    row's end (the state is carried unchanged)."""
    a = tl.exp(dl[:, :, None] * A[None, :, :])
    a = tl.where((t % segment == 0)[:, None, None], 0.0, a)
    return tl.where(tm[:, None, None], a, 1.0)


@triton.jit
def scan_fwd(u_ptr, dl_ptr, z_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, out_ptr, ckpt_ptr, last_ptr,
             L, Dn, N, segment, n_chunks, su_r, su_t, sd_r, sd_t, sz_r, sz_t, sb_r, sb_t, sc_r, sc_t,
             HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
             SAVE_CKPT: tl.constexpr, SAVE_LAST: tl.constexpr,
             NP: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    dm, nm = d < Dn, n < N
    dn_mask = dm[:, None] & nm[None, :]
    A, Dv, bias = _channel_params(a_ptr, d_ptr, bias_ptr, d, n, N, dm, dn_mask, HAS_D, HAS_BIAS, BD)
    h = tl.zeros((BD, NP), tl.float32)
    for t in range(L):
        if SAVE_CKPT:
            if t % CHUNK == 0:
                tl.store(ckpt_ptr + ((r * n_chunks + t // CHUNK) * Dn + d[:, None]) * N + n[None, :], h,
                         mask=dn_mask)
        h = tl.where(t % segment == 0, 0.0, h)
        uu = tl.load(u_ptr + r * su_r + t * su_t + d, mask=dm, other=0.0).to(tl.float32)
        dl = tl.load(dl_ptr + r * sd_r + t * sd_t + d, mask=dm, other=0.0).to(tl.float32) + bias
        if SOFTPLUS:
            dl = _softplus(dl)
        Bt = tl.load(b_ptr + r * sb_r + t * sb_t + n, mask=nm, other=0.0).to(tl.float32)
        Ct = tl.load(c_ptr + r * sc_r + t * sc_t + n, mask=nm, other=0.0).to(tl.float32)
        h = tl.exp(dl[:, None] * A) * h + (dl * uu)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1) + Dv * uu
        if HAS_Z:
            zz = tl.load(z_ptr + r * sz_r + t * sz_t + d, mask=dm, other=0.0).to(tl.float32)
            y = y * zz / (1.0 + tl.exp(-zz))
        tl.store(out_ptr + (r * L + t) * Dn + d, y, mask=dm)
    if SAVE_LAST:
        tl.store(last_ptr + (r * Dn + d[:, None]) * N + n[None, :], h, mask=dn_mask)


@triton.jit
def scan_bwd(u_ptr, dl_ptr, z_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, ckpt_ptr, g_ptr, glast_ptr,
             du_ptr, ddl_ptr, dz_ptr, db_ptr, dc_ptr, da_ptr, dd_ptr, dbias_ptr, scratch_ptr,
             L, Dn, N, segment, n_chunks, n_dblocks, su_r, su_t, sd_r, sd_t, sz_r, sz_t, sb_r, sb_t, sc_r, sc_t,
             HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
             HAS_GLAST: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    d = pd * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    dm, nm = d < Dn, n < N
    dn_mask = dm[:, None] & nm[None, :]
    tile = tl.arange(0, BD)[:, None] * NP + n[None, :]  # offsets inside one scratch slot
    scratch = scratch_ptr + (r * n_dblocks + pd) * (CHUNK * BD * NP)
    A, Dv, bias = _channel_params(a_ptr, d_ptr, bias_ptr, d, n, N, dm, dn_mask, HAS_D, HAS_BIAS, BD)
    if HAS_GLAST:  # gradient of the returned last state: dL/dh_{L-1}
        carry = tl.load(glast_ptr + (r * Dn + d[:, None]) * N + n[None, :], mask=dn_mask, other=0.0)
    else:
        carry = tl.zeros((BD, NP), tl.float32)
    dA_acc = tl.zeros((BD, NP), tl.float32)
    dD_acc = tl.zeros((BD,), tl.float32)
    dbias_acc = tl.zeros((BD,), tl.float32)
    for cc in range(n_chunks):
        t0 = (n_chunks - 1 - cc) * CHUNK
        steps = tl.minimum(L - t0, CHUNK)
        # 1. recompute the chunk forward from its saved start, keeping h_prev (after any restart) per step
        h = tl.load(ckpt_ptr + ((r * n_chunks + t0 // CHUNK) * Dn + d[:, None]) * N + n[None, :],
                    mask=dn_mask, other=0.0)
        for i in range(steps):
            t = t0 + i
            h = tl.where(t % segment == 0, 0.0, h)
            tl.store(scratch + i * (BD * NP) + tile, h)
            uu = tl.load(u_ptr + r * su_r + t * su_t + d, mask=dm, other=0.0).to(tl.float32)
            dl = tl.load(dl_ptr + r * sd_r + t * sd_t + d, mask=dm, other=0.0).to(tl.float32) + bias
            if SOFTPLUS:
                dl = _softplus(dl)
            Bt = tl.load(b_ptr + r * sb_r + t * sb_t + n, mask=nm, other=0.0).to(tl.float32)
            h = tl.exp(dl[:, None] * A) * h + (dl * uu)[:, None] * Bt[None, :]
        # 2. the adjoint backwards through the chunk: carry = dL/dh_t from the steps after t
        for i in range(steps):
            t = t0 + steps - 1 - i
            h_prev = tl.load(scratch + (steps - 1 - i) * (BD * NP) + tile)
            uu = tl.load(u_ptr + r * su_r + t * su_t + d, mask=dm, other=0.0).to(tl.float32)
            raw = tl.load(dl_ptr + r * sd_r + t * sd_t + d, mask=dm, other=0.0).to(tl.float32) + bias
            dl = _softplus(raw) if SOFTPLUS else raw
            Bt = tl.load(b_ptr + r * sb_r + t * sb_t + n, mask=nm, other=0.0).to(tl.float32)
            Ct = tl.load(c_ptr + r * sc_r + t * sc_t + n, mask=nm, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + (r * L + t) * Dn + d, mask=dm, other=0.0).to(tl.float32)
            a = tl.exp(dl[:, None] * A)
            x = dl * uu
            h = a * h_prev + x[:, None] * Bt[None, :]
            if HAS_Z:
                zz = tl.load(z_ptr + r * sz_r + t * sz_t + d, mask=dm, other=0.0).to(tl.float32)
                sz = 1.0 / (1.0 + tl.exp(-zz))
                y = tl.sum(h * Ct[None, :], axis=1) + Dv * uu
                tl.store(dz_ptr + (r * L + t) * Dn + d, g * y * sz * (1.0 + zz * (1.0 - sz)), mask=dm)
                gy = g * zz * sz
            else:
                gy = g
            dD_acc += gy * uu
            tl.store(dc_ptr + ((r * L + t) * n_dblocks + pd) * N + n, tl.sum(gy[:, None] * h, axis=0), mask=nm)
            lam = carry + gy[:, None] * Ct[None, :]  # dL/dh_t
            tl.store(db_ptr + ((r * L + t) * n_dblocks + pd) * N + n, tl.sum(lam * x[:, None], axis=0),
                     mask=nm)
            dx = tl.sum(lam * Bt[None, :], axis=1)
            da = lam * h_prev * a  # dL/d(delta A) per state, through the decay
            dA_acc += da * dl[:, None]
            ddl = dx * uu + tl.sum(da * A, axis=1)
            if SOFTPLUS:
                ddl = ddl / (1.0 + tl.exp(-raw))
            dbias_acc += ddl
            tl.store(du_ptr + (r * L + t) * Dn + d, dx * dl + gy * Dv, mask=dm)
            tl.store(ddl_ptr + (r * L + t) * Dn + d, ddl, mask=dm)
            carry = tl.where(t % segment == 0, 0.0, a * lam)  # a restart cuts the path to earlier steps
    tl.store(da_ptr + (r * Dn + d[:, None]) * N + n[None, :], dA_acc, mask=dn_mask)
    tl.store(dd_ptr + r * Dn + d, dD_acc, mask=dm)
    tl.store(dbias_ptr + r * Dn + d, dbias_acc, mask=dm)



# ------------------------------------------------------------------------------------------------ chunked kernels
# A chunk of CHUNK tokens at a time as (CHUNK, BD, NP) tiles in registers: the recurrence h_t = a_t h_{t-1} + b_t
# runs as an associative scan over the chunk's tokens, and the backward's adjoint lam_t = dL/dh_t as a reverse
# one, so the backward recomputes a chunk's states from its saved start in registers (no scratch buffer, no
# token-by-token pass before the adjoint).


@triton.jit
def _affine(a1, b1, a2, b2):  # x -> a2 (a1 x + b1) + b2: two steps of h = a h + b composed
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _row(tile, i, k):  # row k of a (CHUNK, BD, NP) tile, i = arange(CHUNK)
    return tl.sum(tl.where((i == k)[:, None, None], tile, 0.0), axis=0)


@triton.jit
def _tile_scan(a, b, i, CHUNK: tl.constexpr, REVERSE: tl.constexpr, SEQUENTIAL: tl.constexpr):
    """(prod, acc) over the tokens (axis 0) of (CHUNK, BD, NP) tiles: acc_t = a_t acc_{t-1} + b_t from 0 (REVERSE:
    acc_t = a_t acc_{t+1} + b_t), prod_t the product of the a's it took. tl.associative_scan, or (SEQUENTIAL) the
    same as CHUNK row steps: what Triton's interpreter runs fast (it calls an associative scan's combine function
    once per element), and a fallback where a compiler refuses the scan."""
    if SEQUENTIAL:
        prod, acc = tl.zeros_like(a), tl.zeros_like(b)
        p = tl.full(a.shape[1:], 1.0, tl.float32)
        h = tl.zeros(b.shape[1:], tl.float32)
        for kk in tl.static_range(CHUNK):
            k = CHUNK - 1 - kk if REVERSE else kk
            ak = _row(a, i, k)
            p, h = p * ak, ak * h + _row(b, i, k)
            here = (i == k)[:, None, None]
            prod, acc = tl.where(here, p[None, :, :], prod), tl.where(here, h[None, :, :], acc)
    else:
        prod, acc = tl.associative_scan((a, b), 0, _affine, reverse=REVERSE)
    return prod, acc


@triton.jit
def scan_fwd_chunked(u_ptr, dl_ptr, z_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, out_ptr, ckpt_ptr, last_ptr,
                     L, Dn, N, segment, n_chunks, su_r, su_t, sd_r, sd_t, sz_r, sz_t, sb_r, sb_t, sc_r, sc_t,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     SAVE_CKPT: tl.constexpr, SAVE_LAST: tl.constexpr, SEQUENTIAL: tl.constexpr,
                     NP: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    i = tl.arange(0, CHUNK)
    dm, nm = d < Dn, n < N
    dn_mask = dm[:, None] & nm[None, :]
    A, Dv, bias = _channel_params(a_ptr, d_ptr, bias_ptr, d, n, N, dm, dn_mask, HAS_D, HAS_BIAS, BD)
    h = tl.zeros((BD, NP), tl.float32)  # the state before the chunk
    for c in range(n_chunks):
        if SAVE_CKPT:
            tl.store(ckpt_ptr + ((r * n_chunks + c) * Dn + d[:, None]) * N + n[None, :], h, mask=dn_mask)
        t = c * CHUNK + i
        tm = t < L
        td, tn = tm[:, None] & dm[None, :], tm[:, None] & nm[None, :]
        uu = tl.load(u_ptr + r * su_r + t[:, None] * su_t + d[None, :], mask=td, other=0.0).to(tl.float32)
        dl = tl.load(dl_ptr + r * sd_r + t[:, None] * sd_t + d[None, :], mask=td, other=0.0).to(tl.float32)
        dl += bias[None, :]
        if SOFTPLUS:
            dl = _softplus(dl)
        Bt = tl.load(b_ptr + r * sb_r + t[:, None] * sb_t + n[None, :], mask=tn, other=0.0).to(tl.float32)
        Ct = tl.load(c_ptr + r * sc_r + t[:, None] * sc_t + n[None, :], mask=tn, other=0.0).to(tl.float32)
        a = _chunk_decay(dl, A, t, tm, segment)
        prod, acc = _tile_scan(a, (dl * uu)[:, :, None] * Bt[:, None, :], i, CHUNK, False, SEQUENTIAL)
        hs = prod * h[None, :, :] + acc  # (CHUNK, BD, NP): the state after each token
        y = tl.sum(hs * Ct[:, None, :], axis=2) + Dv[None, :] * uu
        if HAS_Z:
            zz = tl.load(z_ptr + r * sz_r + t[:, None] * sz_t + d[None, :], mask=td, other=0.0).to(tl.float32)
            y = y * zz / (1.0 + tl.exp(-zz))
        tl.store(out_ptr + (r * L + t[:, None]) * Dn + d[None, :], y, mask=td)
        h = _row(hs, i, CHUNK - 1)
    if SAVE_LAST:
        tl.store(last_ptr + (r * Dn + d[:, None]) * N + n[None, :], h, mask=dn_mask)


@triton.jit
def scan_bwd_chunked(u_ptr, dl_ptr, z_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, ckpt_ptr, g_ptr, glast_ptr,
                     du_ptr, ddl_ptr, dz_ptr, db_ptr, dc_ptr, da_ptr, dd_ptr, dbias_ptr,
                     L, Dn, N, segment, n_chunks, n_dblocks, su_r, su_t, sd_r, sd_t, sz_r, sz_t, sb_r, sb_t,
                     sc_r, sc_t, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_GLAST: tl.constexpr, SEQUENTIAL: tl.constexpr, NP: tl.constexpr,
                     BD: tl.constexpr, CHUNK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    d = pd * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    i = tl.arange(0, CHUNK)
    dm, nm = d < Dn, n < N
    dn_mask = dm[:, None] & nm[None, :]
    A, Dv, bias = _channel_params(a_ptr, d_ptr, bias_ptr, d, n, N, dm, dn_mask, HAS_D, HAS_BIAS, BD)
    if HAS_GLAST:  # gradient of the returned last state: dL/dh after the row's last token
        lam_next = tl.load(glast_ptr + (r * Dn + d[:, None]) * N + n[None, :], mask=dn_mask, other=0.0)
    else:
        lam_next = tl.zeros((BD, NP), tl.float32)  # dL/dh at the first token after the chunk
    dA_acc = tl.zeros((BD, NP), tl.float32)
    dD_acc = tl.zeros((BD,), tl.float32)
    dbias_acc = tl.zeros((BD,), tl.float32)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        t = c * CHUNK + i
        tm, t1m = t < L, t + 1 < L
        td, tn = tm[:, None] & dm[None, :], tm[:, None] & nm[None, :]
        # 1. the chunk's states from its saved start, as in the forward
        h0 = tl.load(ckpt_ptr + ((r * n_chunks + c) * Dn + d[:, None]) * N + n[None, :], mask=dn_mask, other=0.0)
        uu = tl.load(u_ptr + r * su_r + t[:, None] * su_t + d[None, :], mask=td, other=0.0).to(tl.float32)
        raw = tl.load(dl_ptr + r * sd_r + t[:, None] * sd_t + d[None, :], mask=td, other=0.0).to(tl.float32)
        raw += bias[None, :]
        dl = _softplus(raw) if SOFTPLUS else raw
        Bt = tl.load(b_ptr + r * sb_r + t[:, None] * sb_t + n[None, :], mask=tn, other=0.0).to(tl.float32)
        Ct = tl.load(c_ptr + r * sc_r + t[:, None] * sc_t + n[None, :], mask=tn, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + (r * L + t[:, None]) * Dn + d[None, :], mask=td, other=0.0).to(tl.float32)
        a = _chunk_decay(dl, A, t, tm, segment)
        x = dl * uu
        bx = x[:, :, None] * Bt[:, None, :]
        prod, acc = _tile_scan(a, bx, i, CHUNK, False, SEQUENTIAL)
        hs = prod * h0[None, :, :] + acc
        if HAS_Z:
            zz = tl.load(z_ptr + r * sz_r + t[:, None] * sz_t + d[None, :], mask=td, other=0.0).to(tl.float32)
            sz = 1.0 / (1.0 + tl.exp(-zz))
            y = tl.sum(hs * Ct[:, None, :], axis=2) + Dv[None, :] * uu
            tl.store(dz_ptr + (r * L + t[:, None]) * Dn + d[None, :], g * y * sz * (1.0 + zz * (1.0 - sz)), mask=td)
            gy = g * zz * sz
        else:
            gy = g
        # 2. the adjoint lam_t = gy_t C_t + a_{t+1} lam_{t+1} as a reverse scan; a_{t+1} from the next token's
        #    inputs (0 across a restart, 1 past the row's end, where lam_next holds the last state's gradient)
        raw1 = tl.load(dl_ptr + r * sd_r + (t[:, None] + 1) * sd_t + d[None, :], mask=t1m[:, None] & dm[None, :],
                       other=0.0).to(tl.float32) + bias[None, :]
        dl1 = _softplus(raw1) if SOFTPLUS else raw1
        a1 = _chunk_decay(dl1, A, t + 1, t1m, segment)
        prod1, acc1 = _tile_scan(a1, gy[:, :, None] * Ct[:, None, :], i, CHUNK, True, SEQUENTIAL)
        lam = prod1 * lam_next[None, :, :] + acc1
        # 3. the gradients of the chunk's tokens; parameter gradients summed over them
        tl.store(dc_ptr + ((r * L + t[:, None]) * n_dblocks + pd) * N + n[None, :],
                 tl.sum(gy[:, :, None] * hs, axis=1), mask=tn)
        tl.store(db_ptr + ((r * L + t[:, None]) * n_dblocks + pd) * N + n[None, :],
                 tl.sum(lam * x[:, :, None], axis=1), mask=tn)
        dx = tl.sum(lam * Bt[:, None, :], axis=2)
        da = tl.where(tm[:, None, None], lam * (hs - bx), 0.0)  # lam_t a_t h_{t-1}: through the decay
        dA_acc += tl.sum(da * dl[:, :, None], axis=0)
        ddl = dx * uu + tl.sum(da * A[None, :, :], axis=2)
        if SOFTPLUS:
            ddl = ddl / (1.0 + tl.exp(-raw))
        ddl = tl.where(td, ddl, 0.0)
        dbias_acc += tl.sum(ddl, axis=0)
        dD_acc += tl.sum(gy * uu, axis=0)
        tl.store(du_ptr + (r * L + t[:, None]) * Dn + d[None, :], dx * dl + gy * Dv[None, :], mask=td)
        tl.store(ddl_ptr + (r * L + t[:, None]) * Dn + d[None, :], ddl, mask=td)
        lam_next = _row(lam, i, 0)
    tl.store(da_ptr + (r * Dn + d[:, None]) * N + n[None, :], dA_acc, mask=dn_mask)
    tl.store(dd_ptr + r * Dn + d, dD_acc, mask=dm)
    tl.store(dbias_ptr + r * Dn + d, dbias_acc, mask=dm)
