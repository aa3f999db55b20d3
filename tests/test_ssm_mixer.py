"""The Mamba mixer: mamba_ssm's parameter layout and init, forward == recurrent steps, backend resolution."""
from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from mambadm.config import ModelConfig
from mambadm.ssm import BackendUnavailableError, Mamba, MambaCache, SegmentMasks, available_backends
from mambadm.kernels.build import cpp_missing
from mambadm.ssm.conv import causal_depthwise_conv
from mambadm.ssm.scan_cpp import causal_conv_silu_cpp
from mambadm.ssm.scan_cuda import cuda_missing

CUDA_REASON = cuda_missing()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_state_dict_layout_matches_mamba_ssm():
    m = Mamba(64, d_state=16, d_conv=4, expand=2)  # d_inner 128, dt_rank ceil(64 / 16) = 4
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "A_log": (128, 16),
        "D": (128,),
        "in_proj.weight": (256, 64),
        "conv1d.weight": (128, 1, 4),
        "conv1d.bias": (128,),
        "x_proj.weight": (4 + 32, 128),
        "dt_proj.weight": (128, 4),
        "dt_proj.bias": (128,),
        "out_proj.weight": (64, 128),
    }
    with_bias = Mamba(32, bias=True, conv_bias=False, dt_rank=3).state_dict()
    assert "in_proj.bias" in with_bias and "out_proj.bias" in with_bias and "conv1d.bias" not in with_bias
    assert with_bias["dt_proj.weight"].shape == (64, 3)
    assert m.A_log._no_weight_decay and m.D._no_weight_decay and m.dt_proj.bias._no_weight_decay


def test_initialisation_statistics():
    torch.manual_seed(0)
    dt_min, dt_max, dt_scale = 2e-3, 0.05, 1.5
    m = Mamba(256, d_state=8, dt_min=dt_min, dt_max=dt_max, dt_scale=dt_scale)
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 9, dtype=torch.float32)).repeat(512, 1))
    assert torch.allclose(m.A_continuous(), -torch.arange(1, 9, dtype=torch.float32).repeat(512, 1), rtol=1e-6)
    assert torch.equal(m.D, torch.ones(512))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= dt_min * (1 - 1e-4) and dt.max() <= dt_max * (1 + 1e-4)
    log_dt = dt.log()  # log-uniform: mean of log dt is the midpoint
    assert abs(log_dt.mean().item() - (math.log(dt_min) + math.log(dt_max)) / 2) < 0.15
    bound = m.dt_rank**-0.5 * dt_scale
    w = m.dt_proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    floored = Mamba(16, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-3)
    assert torch.allclose(torch.nn.functional.softplus(floored.dt_proj.bias), torch.full((32,), 1e-3), rtol=1e-4)


@pytest.mark.parametrize("backend", ["ref", "fast", "cpp"])
def test_forward_equals_successive_steps(backend):
    torch.manual_seed(1)
    m = Mamba(24, d_state=8, backend=backend)
    x = torch.randn(3, 21, 24)
    with torch.no_grad():
        y = m(x)
        cache = m.allocate_cache(3)
        ys = torch.stack([m.step(x[:, t], cache) for t in range(x.shape[1])], dim=1)
    assert y.shape == ys.shape == (3, 21, 24)
    assert (y - ys).abs().max() < 1e-5
    assert isinstance(cache, MambaCache)
    assert cache.conv_state.shape == (3, 48, 4) and cache.ssm_state.shape == (3, 48, 8)
    cache.reset(torch.tensor([0, 2]))
    assert cache.ssm_state[[0, 2]].abs().sum() == 0 and cache.ssm_state[1].abs().sum() > 0


@pytest.mark.parametrize("segment", [None, 6])
def test_step_over_chunks_with_resets_equals_forward(segment):
    """Mamba.step over chunks of uneven sizes from a cache that carries an older sequence, the segment starts (the
    sequence start, window starts) as masks, equals `forward` on the windows: outputs and the final states."""
    torch.manual_seed(4)
    m = Mamba(24, d_state=8, backend="ref")
    x = torch.randn(3, 21, 24)
    history = torch.randn(3, 5, 24)
    with torch.no_grad():
        whole = m(x, segment=segment)
        cache = m.allocate_cache(3)
        m.step(history[:, :5], cache)  # a history every row carries into the chunks below
        outs, start = [], 0
        for size in (4, 5, 1, 3, 8):
            index = start + torch.arange(size)  # token index within x
            starts = (index == 0) if segment is None else (index % segment == 0)
            starts = starts.expand(3, size).clone()
            outs.append(m.step(x[:, start:start + size], cache, SegmentMasks.build(starts, m.d_conv)))
            start += size
        stepped = torch.cat(outs, dim=1)
    torch.testing.assert_close(stepped, whole, atol=1e-5, rtol=0)
    tail = segment or x.shape[1]
    last = x[:, -(x.shape[1] - (x.shape[1] - 1) // tail * tail):]  # the last window
    fresh = m.allocate_cache(3)
    with torch.no_grad():
        m.step(last, fresh)
    torch.testing.assert_close(cache.ssm_state, fresh.ssm_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache.conv_state, fresh.conv_state, atol=1e-6, rtol=0)


def test_A_discrete_shape_and_range():
    torch.manual_seed(3)
    m = Mamba(16, d_state=4)
    a = m.A_discrete(torch.randn(2, 7, 16))
    assert a.shape == (2, 7, 32, 4)
    assert (a > 0).all() and (a < 1).all()
    assert (a[..., 0] > a[..., 3]).all()  # larger |A| decays faster at init


def test_cpp_kernel_builds_here():
    """This project's CI machines have a C++ compiler: the fused CPU kernel must build (else auto falls back)."""
    assert cpp_missing() is None


def test_auto_resolves_to_cpp_on_cpu_logged_once(caplog):
    cfg = ModelConfig()
    m = Mamba(cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, backend=cfg.backend)
    with caplog.at_level(logging.DEBUG, logger="mambadm.ssm.mixer"):
        m(torch.randn(1, 5, cfg.d_model))
        m(torch.randn(1, 3, cfg.d_model))
        m.step(torch.randn(1, cfg.d_model), m.allocate_cache(1))
        assert m.backend_in_use == "cpp"
    records = [r for r in caplog.records if "backend" in r.getMessage()]
    assert len(records) == 1 and "cpp" in records[0].getMessage()
    assert cfg.backend == "auto"  # the caller's config is never rewritten
    assert available_backends("cpu") == ["ref", "fast", "cpp"]
    m.to("meta")  # moved to another kind of device: resolved again (the CPU kernels cannot run there)
    assert m.backend_in_use == "fast" and m.backend == "auto"


def test_without_the_cpp_kernel_auto_falls_back_to_fast_and_cpp_is_a_clear_error():
    """A machine that cannot build the kernel (here: told not to) trains on `fast`; asking for `cpp` says why not."""
    code = textwrap.dedent("""
        import torch
        from mambadm.ssm import BackendUnavailableError, Mamba, available_backends
        m = Mamba(16)
        m(torch.randn(1, 4, 16))
        print("auto ->", m.backend_in_use, available_backends("cpu"))
        try:
            Mamba(16, backend="cpp")(torch.randn(1, 4, 16))
        except BackendUnavailableError as exc:
            print("cpp ->", exc)
    """)
    env = {**os.environ, "MAMBADM_NO_CPP_KERNELS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "auto -> fast ['ref', 'fast']" in out
    assert "cpp -> backend='cpp' requested but MAMBADM_NO_CPP_KERNELS is set" in out


def test_unavailable_or_unknown_backend_raises_clearly():
    if CUDA_REASON is None:
        pytest.skip("cuda backend is available here")
    m = Mamba(16, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="backend='cuda' requested but"):
        m(torch.randn(1, 4, 16))
    assert m.backend == "cuda"
    with pytest.raises(ValueError, match="unknown Mamba backend 'mamba2'"):
        Mamba(16, backend="mamba2")


@pytest.mark.skipif(CUDA_REASON is not None, reason=f"needs CUDA and mamba_ssm: {CUDA_REASON}")
def test_state_dict_round_trip_with_mamba_ssm():
    from mamba_ssm.modules.mamba_simple import Mamba as MambaSSM

    torch.manual_seed(4)
    ours = Mamba(64, backend="cuda").cuda()
    theirs = MambaSSM(64).cuda()
    x = torch.randn(2, 40, 64, device="cuda")
    theirs.load_state_dict(ours.state_dict())
    assert _rel(theirs(x), ours(x)) < 1e-3
    theirs2 = MambaSSM(64).cuda()
    ours.load_state_dict(theirs2.state_dict())
    assert _rel(ours(x), theirs2(x)) < 1e-3
    fast = Mamba(64, backend="fast").cuda()
    fast.load_state_dict(theirs2.state_dict())
    assert _rel(fast(x), theirs2(x)) < 1e-3


@pytest.mark.parametrize("bias", [True, False])
def test_causal_depthwise_conv_equals_conv1d(bias):
    """The batch-first shifted multiply-add conv is nn.Conv1d(groups=C, padding=K-1) cut to the first L outputs."""
    torch.manual_seed(5)
    conv = torch.nn.Conv1d(6, 6, kernel_size=4, groups=6, padding=3, bias=bias)
    u = torch.randn(3, 11, 6, requires_grad=True)
    ours = causal_depthwise_conv(u, conv.weight, conv.bias)
    theirs = conv(u.transpose(1, 2))[..., :11].transpose(1, 2)
    assert (ours - theirs).abs().max() < 1e-6
    grad = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, [u, conv.weight], grad)
    g_theirs = torch.autograd.grad(theirs, [u, conv.weight], grad)
    for a, b in zip(g_ours, g_theirs):
        assert (a - b).abs().max() < 1e-5
    short = torch.randn(2, 2, 6)  # fewer steps than taps
    assert torch.allclose(causal_depthwise_conv(short, conv.weight, conv.bias),
                          conv(short.transpose(1, 2))[..., :2].transpose(1, 2), atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("length", [1, 2, 23])  # fewer steps than taps, and many
def test_cpp_conv_silu_equals_reference(bias, length):
    """The fused CPU conv + SiLU == SiLU(causal_depthwise_conv), with gradients, on a strided view like in_proj's."""
    torch.manual_seed(6)
    conv = torch.nn.Conv1d(20, 20, kernel_size=4, groups=20, padding=3, bias=bias)
    u = torch.randn(3, length, 40)[..., :20].requires_grad_()  # channel-contiguous, row stride 40
    grad = torch.randn(3, length, 20)
    outs = []
    for fn in (lambda x: torch.nn.functional.silu(causal_depthwise_conv(x, conv.weight, conv.bias)),
               lambda x: causal_conv_silu_cpp(x, conv.weight, conv.bias)):
        y = fn(u)
        params = [u, conv.weight] + ([conv.bias] if bias else [])
        outs.append((y, torch.autograd.grad(y, params, grad)))
    (y_ref, g_ref), (y_cpp, g_cpp) = outs
    assert (y_cpp - y_ref).abs().max() < 1e-6
    for a, b in zip(g_cpp, g_ref):
        assert (a - b).abs().max() < 1e-5
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(lambda *a: causal_conv_silu_cpp(*a, b), (x, w))


@pytest.mark.parametrize("segment,length", [(5, 23), (12, 12), (4, 3), (1, 6)])
def test_cpp_conv_silu_segments_equal_windows_run_separately(segment, length):
    """segment: each window of `segment` steps convolved as its own sequence, gradients included."""
    torch.manual_seed(7)
    conv = torch.nn.Conv1d(20, 20, kernel_size=4, groups=20, padding=3)
    u = torch.randn(3, length, 20, requires_grad=True)
    grad = torch.randn(3, length, 20)
    y = causal_conv_silu_cpp(u, conv.weight, conv.bias, segment)
    g = torch.autograd.grad(y, [u, conv.weight, conv.bias], grad)
    windows = [(s, min(s + segment, length)) for s in range(0, length, segment)]
    y_ref = torch.cat([causal_conv_silu_cpp(u[:, a:b], conv.weight, conv.bias) for a, b in windows], dim=1)
    g_ref = torch.autograd.grad(y_ref, [u, conv.weight, conv.bias], grad)
    assert (y - y_ref).abs().max() < 1e-6
    for a, b in zip(g, g_ref):
        assert (a - b).abs().max() < 1e-5
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: causal_conv_silu_cpp(*a, None, 3), (x, w))
    with pytest.raises(ValueError, match="segment"):
        causal_conv_silu_cpp(u, conv.weight, conv.bias, 0)


def _cpu_backends() -> list[str]:
    """Every backend that runs on this CPU: ref, fast, cpp where it builds, triton in its interpreter."""
    names = available_backends("cpu")
    try:
        import triton  # noqa: F401
    except ImportError:
        return names
    return names + ["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else names


def _windows_by_hand(m: Mamba, x: torch.Tensor, segment: int | None) -> torch.Tensor:
    """The mixer on each window of `segment` tokens as its own sequence, on the reference scan (scan_ref.py)."""
    segment = segment or x.shape[1]
    return torch.cat([m(x[:, i:i + segment]) for i in range(0, x.shape[1], segment)], dim=1)


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("segment,length", [(None, 45), (12, 45), (12, 36), (9, 5)])
def test_every_cpu_backend_through_the_mixer_equals_the_reference_scan(backend, segment, length):
    """Mamba.forward on each backend (its own conv and scan route: in place or windows folded into the batch) against
    the reference scan run window by window by hand: outputs, input and parameter gradients (the GLoMa local branch
    with `segment`)."""
    torch.manual_seed(8)
    ref, m = Mamba(32, d_state=16, backend="ref"), Mamba(32, d_state=16, backend=backend)
    m.load_state_dict(ref.state_dict())
    assert m.backend_in_use == backend
    x, grad = torch.randn(2, length, 32), torch.randn(2, length, 32)
    results = []
    for run in (lambda xi: _windows_by_hand(ref, xi, segment), lambda xi: m(xi, segment=segment)):
        xi = x.clone().requires_grad_()
        y = run(xi)
        y.backward(grad)
        results.append((y, xi.grad))
    (y_ref, gx_ref), (y, gx) = results
    assert _rel(y, y_ref) < 1e-5 and _rel(gx, gx_ref) < 1e-4
    for (name, p_ref), p in zip(ref.named_parameters(), m.parameters()):
        assert _rel(p.grad, p_ref.grad) < 1e-4, name
    if segment is not None and length > segment:  # later windows restart: not the whole sequence's output
        assert (y[:, segment:] - ref(x)[:, segment:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="segment must be a positive number of tokens"):
        m(x, segment=0)


def test_a_stale_build_lock_is_removed_and_a_fresh_one_waited_for(tmp_path, monkeypatch):
    """A build killed mid-way leaves torch's lock file, which would make every later process wait forever: a stale
    lock is removed at once, a fresh one (a build running now) is waited for until its builder removes it."""
    from torch.utils import cpp_extension

    from mambadm.kernels import build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = Path(cpp_extension._get_build_directory("mambadm_cpu_test", verbose=False)) / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    builder = threading.Timer(0.4, lock.unlink)  # another process finishing its build
    builder.start()
    started = time.perf_counter()
    build._wait_for_build_lock("mambadm_cpu_test", poll_s=0.05)
    builder.join()
    assert time.perf_counter() - started >= 0.35 and not lock.exists()
    lock.touch()
    old = time.time() - build.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    started = time.perf_counter()
    build._wait_for_build_lock("mambadm_cpu_test", poll_s=0.05)
    assert not lock.exists() and time.perf_counter() - started < 0.3


def test_build_name_follows_the_sources_and_flags(tmp_path):
    """Two source trees or flag sets never share a build directory (they would rebuild over each other in turn)."""
    from mambadm.kernels import build

    source = tmp_path / "k.cpp"
    source.write_text("int f() { return 1; }")
    first = build.build_name("avx2", ["-O3"], (source,))
    assert first.startswith("mambadm_cpu_avx2_") and first == build.build_name("avx2", ["-O3"], (source,))
    assert build.build_name("avx2", ["-O2"], (source,)) != first
    source.write_text("int f() { return 2; }")
    assert build.build_name("avx2", ["-O3"], (source,)) != first


@pytest.mark.skipif(cpp_missing() is not None, reason="no C++ compiler for the CPU kernels")
@pytest.mark.parametrize("segment", [None, 4])
def test_cpp_conv_bfloat16_returns_the_float32_result_rounded(segment):
    """A bfloat16 x is convolved in float32 and the result returned as bfloat16 (and so is x's gradient): the float32
    call's result on the same values, rounded; weight and bias stay float32, with float32 gradients."""
    g = torch.Generator().manual_seed(2)
    conv = torch.nn.Conv1d(24, 24, 4, groups=24, padding=3)
    x = torch.randn(3, 19, 24, generator=g).bfloat16()
    grad_out = torch.randn(3, 19, 24, generator=g).bfloat16()
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        xi = x.detach().to(dtype).requires_grad_()
        conv.zero_grad()
        y = causal_conv_silu_cpp(xi, conv.weight, conv.bias, segment)
        y.backward(grad_out.to(dtype))
        results[dtype] = (y, xi.grad, conv.weight.grad.clone(), conv.bias.grad.clone())
    (y_bf, gx_bf, gw_bf, gb_bf), (y_f, gx_f, gw_f, gb_f) = results[torch.bfloat16], results[torch.float32]
    assert y_bf.dtype == gx_bf.dtype == torch.bfloat16 and gw_bf.dtype == torch.float32
    for got, want in ((y_bf, y_f), (gx_bf, gx_f)):  # rounded to nearest even, give or take one bfloat16 step
        slack = want.abs() * 2.0**-7 + want.abs().max() * 1e-6  # where the two builds' float32 results round apart
        assert bool(((got.float() - want).abs() <= slack).all())
        assert (got == want.bfloat16()).float().mean().item() >= 0.99  # a truncating cast would miss ~half
    torch.testing.assert_close(gw_bf, gw_f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb_bf, gb_f, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(cpp_missing() is not None, reason="no C++ compiler for the CPU kernels")
def test_cpp_mixer_under_bf16_autocast_passes_bfloat16_and_is_as_accurate_as_ref(monkeypatch):
    """Under bf16 autocast the projections' bfloat16 outputs go into the kernels without casts; the result is as
    close to the float32 computation as the reference backend's under the same autocast, and the parameters get
    float32 gradients."""
    import mambadm.ssm.backends as backends_module

    seen = []
    real_scan_rows = backends_module.scan_rows

    def spy(u, *args, **kwargs):
        seen.append(u.dtype)
        return real_scan_rows(u, *args, **kwargs)

    monkeypatch.setattr(backends_module, "scan_rows", spy)
    torch.manual_seed(5)
    models = {name: Mamba(48, d_state=16, backend=name) for name in ("ref", "cpp")}
    models["cpp"].load_state_dict(models["ref"].state_dict())
    x, grad = torch.randn(3, 40, 48), torch.randn(3, 40, 48)
    results = {}
    for name, m in models.items():
        for bf16 in (False, True):
            m.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = m(x, segment=12)
            y.float().backward(grad)
            results[name, bf16] = (y.float(), {k: p.grad.clone() for k, p in m.named_parameters()})
    assert seen == [torch.float32, torch.bfloat16]
    assert all(p.grad.dtype == torch.float32 for p in models["cpp"].parameters())
    exact_y, exact_grads = results["ref", False]
    for name in ("ref", "cpp"):
        assert _rel(results[name, False][0], exact_y) < 1e-5
    err = {name: _rel(results[name, True][0], exact_y) for name in ("ref", "cpp")}
    assert 0 < err["cpp"] < 2e-2 and err["cpp"] < 2 * err["ref"], err
    for k, g in exact_grads.items():
        g_err = {name: _rel(results[name, True][1][k], g) for name in ("ref", "cpp")}
        assert g_err["cpp"] < 5e-2 and g_err["cpp"] < 2 * g_err["ref"] + 1e-3, (k, g_err)
