"""The selective-scan backends: `fast` and `cpp` against the sequential `ref`, all against finite differences."""
from __future__ import annotations

import pytest
import torch

from mambadm.ssm import selective_scan
from mambadm.ssm.backends import CppBackend, FastBackend
from mambadm.ssm.scan_cpp import scan_rows

CHUNKED = {"fast": FastBackend, "cpp": CppBackend}  # both take chunk=


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(batch: int, d_inner: int, d_state: int, length: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    return {
        "u": rand(batch, d_inner, length),
        "delta": rand(batch, d_inner, length, scale=0.5),
        "A": (-torch.rand(d_inner, d_state, generator=g, dtype=dtype) * 4 - 0.1).requires_grad_(),
        "B": rand(batch, d_state, length),
        "C": rand(batch, d_state, length),
        "D": rand(d_inner),
        "z": rand(batch, d_inner, length),
        "delta_bias": rand(d_inner, scale=0.5),
    }


SHAPES = [  # batch, d_inner, d_state, L, chunk (None: automatic)
    (2, 8, 4, 1, None),
    (3, 5, 16, 37, 8),  # L not a multiple of the chunk
    (2, 16, 16, 64, 16),  # exact multiple
    (1, 12, 3, 101, None),  # odd length, one chunk
    (4, 6, 7, 130, 32),
]


@pytest.mark.parametrize("backend", ["fast", "cpp"])
@pytest.mark.parametrize("batch,d_inner,d_state,length,chunk", SHAPES)
def test_chunked_backends_match_ref_outputs_and_grads(backend, batch, d_inner, d_state, length, chunk):
    x = _inputs(batch, d_inner, d_state, length, seed=length)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(batch, d_inner, length, generator=g)
    grad_last = torch.randn(batch, d_inner, d_state, generator=g)
    results = []
    chunked = CHUNKED[backend]
    for fn in (lambda **k: selective_scan(**k, backend="ref"),
               lambda **k: selective_scan(**k, backend=chunked(chunk=chunk or 64))):
        out, last = fn(**x, delta_softplus=True, return_last_state=True)
        loss = (out * grad_out).sum() + (last * grad_last).sum()
        results.append((out, last, torch.autograd.grad(loss, list(x.values()))))
    (out_ref, last_ref, grads_ref), (out_fast, last_fast, grads_fast) = results
    assert _rel(out_fast, out_ref) < 1e-5
    assert _rel(last_fast, last_ref) < 1e-5
    for name, g_fast, g_ref in zip(x, grads_fast, grads_ref):
        if g_ref.norm() == 0:  # dL/dA is exactly zero at L == 1 (h_{-1} = 0)
            assert g_fast.norm() == 0, name
        else:
            assert _rel(g_fast, g_ref) < 1e-4, name


@pytest.mark.parametrize("backend", ["fast", "cpp"])
def test_without_optional_inputs_and_large_decay(backend):
    """No D / z / bias, and delta * A summing to ~ -1e4 over the sequence: nothing overflows."""
    x = _inputs(2, 4, 16, 200, seed=3)
    args = dict(u=x["u"], delta=(x["delta"].detach().abs() * 5).requires_grad_(), A=x["A"], B=x["B"], C=x["C"])
    ref = selective_scan(**args, backend="ref")
    fast = selective_scan(**args, backend=backend)
    assert torch.isfinite(fast).all()
    assert _rel(fast, ref) < 1e-5
    g_ref = torch.autograd.grad(ref.square().sum(), list(args.values()))
    g_fast = torch.autograd.grad(fast.square().sum(), list(args.values()))
    for g_f, g_r in zip(g_fast, g_ref):
        assert torch.isfinite(g_f).all() and _rel(g_f, g_r) < 1e-4


@pytest.mark.parametrize("backend", ["ref", "fast", "cpp"])
def test_gradcheck_float64(backend):
    x = _inputs(2, 3, 2, 5, dtype=torch.float64, seed=7)
    fn = lambda *a: selective_scan(*a, delta_softplus=True, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(x.values()), eps=1e-6, atol=1e-6)


def test_output_dtype_follows_input():
    x = {k: v.detach().to(torch.bfloat16) for k, v in _inputs(1, 4, 4, 9).items()}
    for backend in ("ref", "fast", "cpp"):
        assert selective_scan(**x, backend=backend).dtype == torch.bfloat16


def test_bad_shapes_are_named():
    x = _inputs(2, 4, 3, 6)
    x["B"] = torch.randn(2, 5, 6)
    with pytest.raises(ValueError, match=r"B must have shape \(2, 3, 6\)"):
        selective_scan(**x, backend="ref")
    x = _inputs(2, 4, 3, 6)
    with pytest.raises(ValueError, match="'fast' backend runs windows folded into the batch and has no last state"):
        selective_scan(**x, backend="fast", segment=2, return_last_state=True)
    with pytest.raises(ValueError, match="segment must be a positive number of steps or None, got 0"):
        selective_scan(**x, backend="cpp", segment=0)
    with pytest.raises(ValueError, match="chunk must be a positive number of steps or None, got 0"):
        CppBackend(chunk=0)


@pytest.mark.parametrize("backend", ["fast", "cpp"])
def test_gradients_for_a_subset_of_inputs(backend):
    """Only delta and C require grad (the others are constants): those two match ref, the rest get none."""
    x = {k: v.detach() for k, v in _inputs(2, 6, 4, 19, seed=11).items()}
    grads = []
    for backend in ("ref", backend):
        delta, C = x["delta"].clone().requires_grad_(), x["C"].clone().requires_grad_()
        args = {**x, "delta": delta, "C": C}
        out = selective_scan(**args, delta_softplus=True, backend=backend)
        grads.append(torch.autograd.grad(out.square().sum(), [delta, C]))
    for g_ref, g_fast in zip(*grads):
        assert _rel(g_fast, g_ref) < 1e-4


def _low_rank_delta(x: dict, rank: int, seed: int) -> dict:
    """x with delta replaced by low-rank step sizes (batch, rank, L) and their projection delta_proj (d_inner, rank),
    the mixer's dt and dt_proj weight."""
    g = torch.Generator().manual_seed(seed)
    batch, d_inner, length = x["u"].shape
    dtype = x["u"].dtype
    dt = (torch.randn(batch, rank, length, generator=g, dtype=dtype) * 0.5).requires_grad_()
    proj = (torch.randn(d_inner, rank, generator=g, dtype=dtype) * 0.5).requires_grad_()
    return {**{k: v for k, v in x.items() if k != "delta"}, "delta": dt, "delta_proj": proj}


@pytest.mark.parametrize("backend", ["fast", "cpp"])
@pytest.mark.parametrize("segment", [None, 4])
def test_delta_proj_equals_projecting_first(backend, segment):
    """delta_proj: every backend (cpp inside its kernels) gives what ref gives on the projected step sizes, with the
    gradients of the low-rank delta and of delta_proj; with and without windows (cpp restarts in place, fast runs
    them folded into the batch; ref here runs each window by hand)."""
    x = _low_rank_delta(_inputs(3, 20, 16, 23, seed=5), rank=3, seed=6)
    grad_out = torch.randn(3, 20, 23, generator=torch.Generator().manual_seed(2))
    results = []
    for name in ("ref", backend):
        args = dict(x)
        if name == "ref":  # the product taken here, by hand; windows as separate sequences
            args["delta"] = torch.einsum("dr,brl->bdl", args.pop("delta_proj"), args["delta"])
        if segment is not None and name == "ref":
            out = torch.cat([selective_scan(**{k: v[..., i:i + segment] if v.dim() == 3 and k != "delta_proj" else v
                                               for k, v in args.items()}, delta_softplus=True, backend=name)
                             for i in range(0, 23, segment)], dim=-1)
        else:
            out = selective_scan(**args, delta_softplus=True, backend=name,
                                 **({"segment": segment} if segment is not None else {}))
        results.append((out, torch.autograd.grad((out * grad_out).sum(), list(x.values()))))
    (out_ref, grads_ref), (out_b, grads_b) = results
    assert _rel(out_b, out_ref) < 1e-5
    for name, g_b, g_ref in zip(x, grads_b, grads_ref):
        assert _rel(g_b, g_ref) < 1e-4, name


def test_delta_proj_gradcheck_float64_and_bad_shapes():
    x = _low_rank_delta(_inputs(2, 3, 2, 5, dtype=torch.float64, seed=7), rank=2, seed=8)
    names = list(x)
    fn = lambda *a: selective_scan(**dict(zip(names, a)), delta_softplus=True, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(x.values()), eps=1e-6, atol=1e-6)
    x = {k: v.detach() for k, v in x.items()}
    with pytest.raises(ValueError, match=r"delta must have shape \(2, 2, 5\)"):
        selective_scan(**{**x, "delta": torch.randn(2, 3, 5, dtype=torch.float64)}, backend="cpp")
    with pytest.raises(ValueError, match=r"delta_proj must be \(d_inner=3, R\)"):
        selective_scan(**{**x, "delta_proj": torch.randn(4, 2, dtype=torch.float64)}, backend="fast")


def _rows_reference(u, delta, A, B, C, h0, keep):
    """The recurrence scan_rows computes, as a loop: the rows in consecutive blocks, one per group of A; keep == 0
    drops the state."""
    rows, length, _ = u.shape
    A_rows = A.repeat_interleave(rows // A.shape[0], dim=0)  # (rows, d, n)
    h, ys = h0, []
    for t in range(length):
        a = torch.exp(delta[:, t, :, None] * A_rows) * keep[:, t, None, None]
        h = a * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1), h


def test_cpp_rows_with_groups_start_state_and_resets():
    """The acting entry point: two A groups (the GLoMa branches), a start state, and state resets mid-sequence."""
    g = torch.Generator().manual_seed(5)
    rows, length, d, n = 6, 11, 5, 16
    u, B, C = (torch.randn(rows, length, k, generator=g, dtype=torch.float64) for k in (d, n, n))
    delta = torch.rand(rows, length, d, generator=g, dtype=torch.float64)
    A = -torch.rand(2, d, n, generator=g, dtype=torch.float64) * 3
    h0 = torch.randn(rows, d, n, generator=g, dtype=torch.float64)
    keep = torch.ones(rows, length, dtype=torch.float64)
    keep[1, 4] = keep[4, 0] = keep[5, 7] = 0
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C, h0)]
    y, last = scan_rows(u, delta, A, B, C, h0=h0, keep=keep, chunk=4)
    y_ref, last_ref = _rows_reference(u, delta, A, B, C, h0, keep)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, last_ref, rtol=1e-10, atol=1e-10)
    assert not torch.equal(y[5, 7], _rows_reference(u, delta, A, B, C, h0, torch.ones_like(keep))[0][5, 7])

    def fn(*args):
        return scan_rows(*args[:5], h0=args[5], keep=keep, chunk=4)

    small = [t[:2, :5, :3].detach().clone().requires_grad_() if t.dim() == 3 and t.shape[0] == rows else t
             for t in inputs]
    small[2] = A[:, :3].detach().clone().requires_grad_()
    small[3], small[4] = (t[:2, :5].detach().clone().requires_grad_() for t in (B, C))
    small[5] = h0[:2, :3].detach().clone().requires_grad_()
    keep = keep[:2, :5]
    assert torch.autograd.gradcheck(fn, tuple(small), eps=1e-6, atol=1e-6)


def test_cpp_rows_with_grouped_D_and_delta_bias():
    """D and delta_bias grouped like A (one per GLoMa branch) == each group's rows scanned with its own, with the
    softplus and the silu(z) gate inside the kernel; gradients of the grouped parameters included."""
    g = torch.Generator().manual_seed(6)
    rows, length, d, n = 4, 7, 5, 16
    u, z, B, C = (torch.randn(rows, length, k, generator=g, dtype=torch.float64) for k in (d, d, n, n))
    delta = torch.randn(rows, length, d, generator=g, dtype=torch.float64)
    A = -torch.rand(2, d, n, generator=g, dtype=torch.float64) * 3
    D, bias = (torch.randn(2, d, generator=g, dtype=torch.float64) for _ in range(2))
    params = [t.requires_grad_() for t in (A, D, bias)]
    y, _ = scan_rows(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    grad = torch.randn_like(y)
    g_grouped = torch.autograd.grad(y, params, grad)
    for group in (0, 1):
        r = slice(2 * group, 2 * group + 2)  # rows 0-1 use group 0, rows 2-3 group 1
        y_g, _ = scan_rows(u[r], delta[r], A[group:group + 1], B[r], C[r], D=D[group], z=z[r],
                           delta_bias=bias[group], delta_softplus=True)
        torch.testing.assert_close(y[r], y_g, rtol=1e-10, atol=1e-10)
        g_one = torch.autograd.grad(y_g, params, grad[r])
        for a, b in zip(g_grouped, g_one):
            torch.testing.assert_close(a[group], b[group], rtol=1e-9, atol=1e-10)
    with torch.no_grad():  # acting calls the kernel without the autograd function: same result
        torch.testing.assert_close(scan_rows(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)[0], y)
    with pytest.raises(ValueError, match=r"D must have shape \(5\) or \(2, 5\)"):
        scan_rows(u, delta, A, B, C, D=torch.ones(3, d, dtype=torch.float64))


def test_cpp_rows_bad_arguments_are_value_errors_naming_them():
    """Checked in Python before the kernel (a C++ exception crashed the process on one machine)."""
    u = torch.randn(4, 7, 5)
    n = torch.randn(4, 7, 16)
    A = -torch.rand(2, 5, 16)
    cases = [
        (dict(delta=torch.randn(4, 6, 5)), r"delta must have shape \(4, 7, 5\), got \(4, 6, 5\)"),
        (dict(A=-torch.rand(3, 5, 16)), r"A must be \(groups dividing rows, d_inner, d_state\), got \(3, 5, 16\)"),
        (dict(B=n.double()), r"B has dtype torch.float64, expected u's torch.float32"),
        (dict(u=u.bfloat16(), delta=u.bfloat16(), B=n.bfloat16(), C=n.bfloat16(), A=A.bfloat16()),
         r"A has dtype torch.bfloat16, expected torch.float32 \(the compute dtype of u's torch.bfloat16\)"),
        (dict(u=u.half()), r"u must be float32, float64 or bfloat16, got torch.float16"),
        (dict(keep=torch.ones(4, 6)), r"keep must have shape \(4, 7\)"),
        (dict(chunk=0), r"chunk must be positive, got 0"),
    ]
    for change, message in cases:
        args = dict(u=u, delta=u, A=A, B=n, C=n) | change
        with pytest.raises(ValueError, match=message):
            scan_rows(**args)


def test_cpp_results_do_not_depend_on_the_thread_count():
    """The kernels split rows over torch's intra-op threads (OpenMP); per-row partial sums keep every output and
    gradient bit-identical to a one-thread run."""
    x = _low_rank_delta(_inputs(12, 40, 16, 57, seed=9), rank=4, seed=10)
    grad_out = torch.randn(12, 40, 57, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = selective_scan(**x, delta_softplus=True, backend="cpp", segment=6)
            results.append((out, *torch.autograd.grad((out * grad_out).sum(), list(x.values()))))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def _rounded_from(got: torch.Tensor, want_f32: torch.Tensor, exact_share: float = 0.0) -> bool:
    """got (bfloat16) is want (float32) rounded to bfloat16, give or take one bfloat16 step where the two float32
    computations, compiled separately, differ in the last bit and so round apart; with exact_share, at least that
    share of the elements must be the rounded value exactly (a truncating cast would miss about half)."""
    assert got.dtype == torch.bfloat16
    slack = want_f32.abs() * 2.0**-7 + want_f32.abs().max() * 1e-6
    exact = (got == want_f32.bfloat16()).float().mean().item()
    return bool(((got.float() - want_f32).abs() <= slack).all()) and exact >= exact_share


@pytest.mark.parametrize("segment", [None, 9])
def test_cpp_bfloat16_sequences_return_the_float32_results_rounded(segment):
    """bf16 autocast hands the kernels bfloat16 u, delta, B, C, z: read exactly, computed in float32, results and
    sequence gradients written as bfloat16 (round to nearest even); parameters (float32) get float32 gradients. So
    a bfloat16 call returns what a float32 call on the same (upcast) values returns, rounded (see _rounded_from)."""
    rows, length, d_inner = 6, 37, 40
    x = _low_rank_delta(_inputs(rows, d_inner, 16, length, seed=4), rank=5, seed=5)
    seq = ("u", "delta", "B", "C", "z")
    rowwise = {k: x[k].detach().transpose(1, 2).bfloat16() for k in seq}  # (rows, L, channels), bf16 values
    params = {k: x[k].detach() for k in ("D", "delta_bias", "delta_proj")} | {"A": x["A"].detach()[None]}
    keep = None if segment is None else (torch.arange(length) % segment != 0).expand(rows, length)
    grad_out = torch.randn(rows, length, d_inner, generator=torch.Generator().manual_seed(6)).bfloat16()

    def run(seq_dtype):
        s = {k: v.detach().to(seq_dtype).requires_grad_() for k, v in rowwise.items()}
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        out, last = scan_rows(s["u"], s["delta"], p["A"], s["B"], s["C"], p["D"], s["z"], p["delta_bias"],
                              delta_softplus=True, keep=keep, delta_proj=p["delta_proj"], chunk=16)
        out.backward(grad_out.to(seq_dtype))
        return out, last, s, p

    out_bf, last_bf, s_bf, p_bf = run(torch.bfloat16)
    out_f, last_f, s_f, p_f = run(torch.float32)
    assert out_bf.dtype == torch.bfloat16 and last_bf.dtype == torch.float32
    assert _rounded_from(out_bf, out_f, exact_share=0.99)
    torch.testing.assert_close(last_bf, last_f, rtol=1e-6, atol=1e-6)
    for k in seq:
        assert s_bf[k].grad.dtype == torch.bfloat16, k
        assert _rounded_from(s_bf[k].grad, s_f[k].grad, exact_share=0.99), k
    for k in params:
        assert p_bf[k].grad.dtype == torch.float32, k
        scale = p_f[k].grad.abs().max().item()  # sums over rows and steps, some near-cancelling
        torch.testing.assert_close(p_bf[k].grad, p_f[k].grad, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{k}: {m}")
