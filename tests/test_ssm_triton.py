"""The `triton` backend against the reference scan: compiled on a GPU, in Triton's interpreter on a CPU. Both
kernel pairs (scan_triton.KERNELS: chunked, and serial, the default until a GPU session has timed chunked) at
chunk-boundary edge cases: rows shorter than a chunk, a multiple of it, one past it, restarts on and across chunk
boundaries, a returned last state."""
import pytest
import torch

from mambadm.ssm import Mamba
from mambadm.ssm.backends import BackendUnavailableError, resolve_backend, selective_scan
from mambadm.ssm.scan_ref import selective_scan_ref

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a CPU, conftest.py selects Triton's interpreter
KERNELS = ("chunked", "serial")


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    from mambadm.ssm import scan_triton

    monkeypatch.setitem(scan_triton.LAUNCH, "kernel", request.param)
    return request.param


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def inputs(batch, d_inner, d_state, length, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE).requires_grad_()

    A = (-torch.rand(d_inner, d_state, generator=g) * 4 - 0.1).to(DEVICE).requires_grad_()
    return dict(u=rand(batch, d_inner, length), delta=rand(batch, d_inner, length, scale=0.5), A=A,
                B=rand(batch, d_state, length), C=rand(batch, d_state, length), D=rand(d_inner),
                z=rand(batch, d_inner, length), delta_bias=rand(d_inner, scale=0.5))


def windows_ref(x: dict, segment: int | None, **kw) -> torch.Tensor:
    """The reference scan over each window of `segment` steps on its own (the whole row when None)."""
    length = x["u"].shape[-1]
    segment = segment or length
    outs = []
    for s in range(0, length, segment):
        w = slice(s, min(length, s + segment))
        outs.append(selective_scan_ref(x["u"][..., w], x["delta"][..., w], x["A"], x["B"][..., w], x["C"][..., w],
                                       kw.get("D"), None if kw.get("z") is None else kw["z"][..., w],
                                       kw.get("delta_bias"), kw.get("delta_softplus", False)))
    return torch.cat(outs, -1)


@pytest.mark.parametrize("d_state, length, segment, optional", [
    (16, 37, None, True),  # several chunks (8 and 16 tokens) and a partial last one, everything fused
    (16, 37, 6, True),  # restarts inside and across chunks
    (5, 20, None, False),  # d_state not a power of two; no D, z, bias or softplus
    (16, 33, 15, False),  # one token past a chunk multiple
    (16, 5, None, True),  # a row shorter than one chunk
    (16, 32, 8, True),  # rows of whole chunks; every restart on a chunk boundary
])
def test_outputs_and_gradients_match_ref(kernel, d_state, length, segment, optional):
    x = inputs(2, 24, d_state, length)  # 24 channels: a partial channel block (16 + 8 or 24 of 32)
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True) if optional else {}
    out = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="triton", segment=segment, **kw)
    ref = windows_ref(x, segment, **kw)
    assert rel(out, ref) < 1e-5
    leaves = [x[k] for k in ("u", "delta", "A", "B", "C")] + ([x[k] for k in ("D", "z", "delta_bias")] if optional
                                                               else [])
    grad = torch.randn_like(out)
    for name, a, b in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"),
                          torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        assert rel(a, b) < 1e-4, name


@pytest.mark.parametrize("length", [21, 16])
def test_last_state_and_its_gradient(kernel, length):
    x = inputs(2, 8, 16, length, seed=1)
    args = [x[k] for k in ("u", "delta", "A", "B", "C")]
    out, last = selective_scan(*args, backend="triton", return_last_state=True)
    out_r, last_r = selective_scan_ref(*args, return_last_state=True)
    assert rel(out, out_r) < 1e-5 and rel(last, last_r) < 1e-5
    g_out, g_last = torch.randn_like(out), torch.randn_like(last)
    mine = torch.autograd.grad((out * g_out).sum() + (last * g_last).sum(), args)
    theirs = torch.autograd.grad((out_r * g_out).sum() + (last_r * g_last).sum(), args)
    for a, b in zip(mine, theirs):
        assert rel(a, b) < 1e-4


def test_bfloat16_inputs_as_under_autocast(kernel):
    """bf16 activations with float32 A, D, bias (the mixer under autocast): float32 inside, dtypes kept outside."""
    x = inputs(2, 24, 16, 21, seed=2)
    low = {k: x[k].detach().to(torch.bfloat16).requires_grad_() for k in ("u", "delta", "B", "C", "z")}
    params = {k: x[k] for k in ("A", "D", "delta_bias")}
    out = selective_scan(low["u"], low["delta"], params["A"], low["B"], low["C"], params["D"], low["z"],
                         params["delta_bias"], delta_softplus=True, backend="triton", segment=6)
    ref = windows_ref({**{k: v.float() for k, v in low.items()}, "A": params["A"]}, 6, D=params["D"],
                      z=low["z"].float(), delta_bias=params["delta_bias"], delta_softplus=True)
    assert out.dtype == torch.bfloat16 and rel(out.float(), ref) < 1e-2
    leaves = [*low.values(), *params.values()]
    grad = torch.randn_like(ref)
    mine = torch.autograd.grad(out, leaves, grad.to(torch.bfloat16))
    theirs = torch.autograd.grad(ref, leaves, grad)
    for leaf, a, b in zip(leaves, mine, theirs):
        assert a.dtype == leaf.dtype and rel(a.float(), b.float()) < 2e-2


def test_mixer_local_windows_in_place_match_folded_ref(kernel):
    """Mamba(segment=...) on triton restarts conv and state in place; ref folds the windows into the batch."""
    torch.manual_seed(0)
    ref = Mamba(24, backend="ref").to(DEVICE)
    tri = Mamba(24, backend="triton").to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 29, 24, device=DEVICE)
    for segment in (None, 6):
        xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yt = ref(xr, segment=segment), tri(xt, segment=segment)
        grad = torch.randn_like(yr)
        yr.backward(grad)
        yt.backward(grad)
        assert rel(yt, yr) < 1e-5 and rel(xt.grad, xr.grad) < 1e-4
        for (name, p), q in zip(tri.named_parameters(), ref.parameters()):
            assert rel(p.grad, q.grad) < 1e-4, name
        ref.zero_grad()
        tri.zero_grad()


def test_unavailable_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="backend='triton' requested but the triton kernels need CUDA"):
        resolve_backend("triton", "cpu")


@pytest.mark.parametrize("given_by", ["LAUNCH", "environment"])
def test_chunk_length_is_a_launch_choice(monkeypatch, given_by):
    """Chunks of 4 tokens over 10 tokens restarted every 3 (8 channels in blocks of 4, 2 warps; set in LAUNCH or in
    $MAMBADM_TRITON_LAUNCH, as bench_triton_scan.py --pick writes it): the same outputs and gradients."""
    from mambadm.ssm import scan_triton

    monkeypatch.setitem(scan_triton.LAUNCH, "kernel", "chunked")
    if given_by == "LAUNCH":
        for key, value in (("chunk", 4), ("block_channels", 4), ("num_warps", 2)):
            monkeypatch.setitem(scan_triton.LAUNCH, key, value)
    else:
        monkeypatch.setenv("MAMBADM_TRITON_LAUNCH", "chunk=4, block=4,warps=2")
    assert (scan_triton._chunk("chunked"), scan_triton._block(8, "chunked"), scan_triton._warps()) == (4, 4, 2)
    x = inputs(1, 8, 4, 10, seed=3)
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)
    out = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="triton", segment=3, **kw)
    ref = windows_ref(x, 3, **kw)
    assert rel(out, ref) < 1e-5
    leaves = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    grad = torch.randn_like(out)
    for name, a, b in zip("u delta A B C D z delta_bias".split(), torch.autograd.grad(out, leaves, grad),
                          torch.autograd.grad(ref, leaves, grad)):
        assert rel(a, b) < 1e-4, name


def test_the_launch_environment_variable_is_checked_and_yields_to_launch(monkeypatch):
    from mambadm.ssm import scan_triton

    monkeypatch.setenv("MAMBADM_TRITON_LAUNCH", "block=32,warps=8,tile_scan=sequential")
    assert (scan_triton._block(1024, "chunked"), scan_triton._warps(), scan_triton._chunk("chunked")) == (32, 8, 8)
    assert scan_triton._chunked_flags("chunked") == {"SEQUENTIAL": True}
    assert scan_triton._chunk("serial") == scan_triton.CHUNK  # the serial pair's checkpoint spacing stays
    monkeypatch.setitem(scan_triton.LAUNCH, "block_channels", 64)  # set in-process (a benchmark's sweep): it wins
    assert (scan_triton._block(1024, "chunked"), scan_triton._warps()) == (64, 8)
    for bad, message in (("block=24", r"block must be a power of two in \[1, 256\], got '24'"),
                         ("warps=four", r"warps must be a power of two in \[1, 32\], got 'four'"),
                         ("chunk=1", r"chunk must be a power of two in \[2, 64\], got '1'"),
                         ("threads=4", r"'threads=4' is not KEY=VALUE with KEY one of \['block', 'warps'"),
                         ("tile_scan=parallel", r"tile_scan must be one of \['associative', 'sequential'\]")):
        monkeypatch.setenv("MAMBADM_TRITON_LAUNCH", bad)
        with pytest.raises(ValueError, match=r"\$MAMBADM_TRITON_LAUNCH: " + message):
            scan_triton._setting("chunk")  # any key: the whole variable is read


@pytest.mark.parametrize("tile_scan", ["associative", "sequential"])
def test_both_tile_scans_match_ref(monkeypatch, tile_scan):
    """The chunked kernels' scan over a chunk's tokens both ways: tl.associative_scan (what a GPU compiles; slow in
    the interpreter, hence one small case) and the row-by-row form (the interpreter's default): forward, reverse
    (the adjoint), chunk-crossing restarts and the last state's gradient."""
    from mambadm.ssm import scan_triton

    monkeypatch.setitem(scan_triton.LAUNCH, "kernel", "chunked")
    monkeypatch.setitem(scan_triton.LAUNCH, "tile_scan", tile_scan)
    x = inputs(1, 4, 2, 11, seed=4)
    args = [x[k] for k in ("u", "delta", "A", "B", "C")]
    out, last = selective_scan(*args, backend="triton", return_last_state=True, segment=5)
    out_r = windows_ref(x, 5)
    _, last_r = selective_scan_ref(*[a[..., 10:] if a.dim() == 3 else a for a in args], return_last_state=True)
    assert rel(out, out_r) < 1e-5 and rel(last, last_r) < 1e-5  # the last window holds only token 10
    g_out, g_last = torch.randn_like(out), torch.randn_like(last)
    mine = torch.autograd.grad((out * g_out).sum() + (last * g_last).sum(), args)
    theirs = torch.autograd.grad((out_r * g_out).sum() + (last_r * g_last).sum(), args)
    for name, a, b in zip("u delta A B C".split(), mine, theirs):
        assert rel(a, b) < 1e-4, name
    monkeypatch.setitem(scan_triton.LAUNCH, "tile_scan", "parallel")
    with pytest.raises(ValueError, match="tile_scan.*'associative', 'sequential'.*'parallel'"):
        selective_scan(*args, backend="triton")


def test_an_unknown_kernel_is_refused_by_name(monkeypatch):
    from mambadm.ssm import scan_triton

    monkeypatch.setenv("MAMBADM_TRITON_SCAN", "parallel")
    x = inputs(1, 8, 4, 5)
    with pytest.raises(ValueError, match=r"one of \['chunked', 'serial'\].*MAMBADM_TRITON_SCAN.*'parallel'"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="triton")
    assert scan_triton.LAUNCH["kernel"] is None


def test_a_failing_launch_says_how_to_run_without_triton(monkeypatch):
    from mambadm.ssm import scan_triton

    monkeypatch.setitem(scan_triton.LAUNCH, "block_channels", 24)  # not a power of two: the compiler refuses it
    x = inputs(1, 8, 4, 5)
    with pytest.raises(RuntimeError, match="triton selective scan failed on this device .*model.backend=cuda"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="triton")
