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
    A = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    Dv = tl.load(d_ptr + d, mask=dm, other=0.0).to(tl.float32) if HAS_D else tl.zeros((BD,), tl.float32)
    bias = tl.load(bias_ptr + d, mask=dm, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros((BD,), tl.float32)
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
    A = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    Dv = tl.load(d_ptr + d, mask=dm, other=0.0).to(tl.float32) if HAS_D else tl.zeros((BD,), tl.float32)
    bias = tl.load(bias_ptr + d, mask=dm, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros((BD,), tl.float32)
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

