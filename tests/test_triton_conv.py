"""The fused Triton conv + SiLU (conv_triton.py) against the PyTorch conv it replaces (conv.py), forward and
gradients in float32: compiled on a GPU, in Triton's interpreter on a CPU (conftest.py sets TRITON_INTERPRET=1
before triton is imported). Shapes cross the kernel's token and channel blocks (32 x 64): odd lengths, L = 90 (a
K = 30 context) and a longer row, windows restarting on and off block edges, fewer steps than taps."""
import pytest
import torch
import torch.nn.functional as F

from mambadm.config import EnvSpec, ModelConfig
from mambadm.model import build_model
from mambadm.ssm import Mamba
from mambadm.ssm.conv import causal_depthwise_conv
from mambadm.ssm.conv_triton import FUSED, causal_conv_silu_triton, fused_conv_enabled

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def reference(u, weight, bias, segment):
    return F.silu(causal_depthwise_conv(u, weight, bias, segment))


def conv_params(channels: int, bias: bool, seed: int, taps: int = 4):
    torch.manual_seed(seed)
    conv = torch.nn.Conv1d(channels, channels, kernel_size=taps, groups=channels, padding=taps - 1, bias=bias)
    return conv.weight.detach().to(DEVICE).requires_grad_(), conv.bias.detach().to(DEVICE).requires_grad_() if bias \
        else None


@pytest.mark.parametrize("batch, length, channels, segment, bias, taps", [
    (2, 90, 24, None, True, 4),  # a K = 30 context, the global branch: three token blocks, the last partial
    (2, 90, 24, 15, True, 4),  # the local branch of w = 5: restarts inside token blocks
    (3, 37, 70, 6, False, 4),  # odd length, two channel blocks (64 + 6), no bias
    (2, 200, 16, 32, True, 4),  # a longer row, every restart on a token-block edge
    (2, 3, 8, None, True, 4),  # fewer steps than taps
    (1, 11, 8, 1, True, 4),  # every token its own window: only the current tap
    (2, 19, 8, 5, True, 3),  # model.d_conv 3
])
def test_outputs_and_gradients_match_the_pytorch_conv(batch, length, channels, segment, bias, taps):
    weight, b = conv_params(channels, bias, seed=length, taps=taps)
    u = torch.randn(batch, length, channels, device=DEVICE, requires_grad=True)
    out, ref = causal_conv_silu_triton(u, weight, b, segment), reference(u, weight, b, segment)
    assert out.dtype == torch.float32 and rel(out, ref) < 1e-6
    leaves = [u, weight] + ([b] if bias else [])
    grad = torch.randn_like(ref)
    for name, mine, theirs in zip(("u", "weight", "bias"), torch.autograd.grad(out, leaves, grad),
                                  torch.autograd.grad(ref, leaves, grad)):
        assert rel(mine, theirs) < 1e-5, name


def test_windows_restart_as_separate_sequences():
    """With segment, each window equals the conv of that window alone (taps never reach across its start)."""
    weight, b = conv_params(12, True, seed=1)
    u = torch.randn(2, 29, 12, device=DEVICE)
    out = causal_conv_silu_triton(u, weight, b, 7)
    alone = torch.cat([causal_conv_silu_triton(u[:, s:s + 7], weight, b) for s in range(0, 29, 7)], dim=1)
    assert (out - alone).abs().max() < 1e-6


def test_reads_in_proj_half_in_place_and_keeps_bfloat16():
    """u as the mixer's in_proj half (row stride 2 x channels) is read without a copy; bfloat16 in, bfloat16 out,
    float32 inside: the float32 result rounded, gradients in the inputs' dtypes."""
    weight, b = conv_params(20, True, seed=2)
    both = torch.randn(2, 45, 40, device=DEVICE)
    u = both[..., :20].requires_grad_()
    out, ref = causal_conv_silu_triton(u, weight, b, 15), reference(u, weight, b, 15)
    assert rel(out, ref) < 1e-6
    low = u.detach().to(torch.bfloat16).requires_grad_()
    out_low = causal_conv_silu_triton(low, weight, b, 15)
    ref_low = reference(low.float(), weight, b, 15)
    assert out_low.dtype == torch.bfloat16 and (out_low.float() - ref_low.to(torch.bfloat16).float()).abs().max() \
        <= 1e-2 * ref_low.abs().max()
    grad = torch.randn_like(ref_low)
    mine = torch.autograd.grad(out_low, [low, weight, b], grad.to(torch.bfloat16))
    theirs = torch.autograd.grad(ref_low, [low, weight, b], grad)
    for leaf, a, c in zip((low, weight, b), mine, theirs):
        assert a.dtype == leaf.dtype and rel(a, c) < 2e-2


@pytest.mark.parametrize("segment", [None, 15])
def test_mixer_on_triton_with_the_fused_conv_matches_ref(monkeypatch, segment):
    """Mamba on `triton` with $MAMBADM_TRITON_FUSED=1 (fused conv, in place windows) against `ref` (PyTorch conv,
    windows folded into the batch): outputs, input and parameter gradients, L = 90 as in a K = 30 context."""
    monkeypatch.setenv("MAMBADM_TRITON_FUSED", "1")
    torch.manual_seed(0)
    ref = Mamba(24, backend="ref").to(DEVICE)
    fused = Mamba(24, backend="triton").to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 90, 24, device=DEVICE)
    grad = torch.randn(2, 90, 24, device=DEVICE)
    results = []
    for mixer in (ref, fused):
        xi = x.clone().requires_grad_()
        y = mixer(xi, segment=segment)
        y.backward(grad)
        results.append((y, xi.grad, {k: p.grad for k, p in mixer.named_parameters()}))
    (y_ref, gx_ref, g_ref), (y, gx, g) = results
    assert rel(y, y_ref) < 1e-5 and rel(gx, gx_ref) < 1e-4
    for name in g_ref:
        assert rel(g[name], g_ref[name]) < 1e-4, name


def test_mambadm_with_the_fused_conv_matches_ref(monkeypatch):
    """A whole MambaDM (two GLoMa blocks; K = 11 steps: rows of 33 tokens, local windows of 3w = 9, the last partial)
    on `triton` with the fused conv against the same weights on `ref`: loss and every parameter gradient."""
    monkeypatch.setenv("MAMBADM_TRITON_FUSED", "1")
    spec = EnvSpec("vector", [5], 4, True, 100)
    torch.manual_seed(0)
    models = [build_model(ModelConfig(family="mambadm", n_layer=2, d_model=16, d_state=8, local_window=3,
                                      dropout=0.0, backend=backend), spec).to(DEVICE) for backend in ("ref", "triton")]
    models[1].load_state_dict(models[0].state_dict())
    batch = {"rtg": torch.randn(2, 11), "states": torch.randn(2, 11, 5), "actions": torch.randint(0, 4, (2, 11)),
             "timesteps": torch.arange(11).repeat(2, 1), "mask": torch.ones(2, 11, dtype=torch.bool)}
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    losses = []
    for model in models:
        loss, _ = model.loss(batch)
        loss.backward()
        losses.append(loss.detach())
    assert rel(losses[1], losses[0]) < 1e-5
    for (name, p_ref), p in zip(models[0].named_parameters(), models[1].parameters()):
        assert rel(p.grad, p_ref.grad) < 1e-4, name


def test_the_switch_selects_the_kernel(monkeypatch):
    """Off by default; $MAMBADM_TRITON_FUSED=1 (or FUSED["conv"]) routes the triton backend's conv through it; a
    bad value is refused by name."""
    from mambadm.ssm import backends

    calls = []
    monkeypatch.setattr(backends, "causal_conv_silu_triton", lambda *a: calls.append(a) or reference(*a))
    mixer = Mamba(16, backend="triton").to(DEVICE)
    x = torch.randn(1, 9, 16, device=DEVICE)
    monkeypatch.delenv("MAMBADM_TRITON_FUSED", raising=False)
    assert not fused_conv_enabled()
    mixer(x)
    assert calls == []
    monkeypatch.setenv("MAMBADM_TRITON_FUSED", "1")
    mixer(x, segment=3)
    assert len(calls) == 1 and calls[0][-1] == 3
    monkeypatch.setitem(FUSED, "conv", False)
    mixer(x)
    assert len(calls) == 1
    monkeypatch.setitem(FUSED, "conv", None)
    monkeypatch.setenv("MAMBADM_TRITON_FUSED", "yes")
    with pytest.raises(ValueError, match=r"MAMBADM_TRITON_FUSED must be 0 or 1, got 'yes'"):
        mixer(x)


def test_bad_arguments_are_refused():
    weight, b = conv_params(8, True, seed=3)
    u = torch.randn(1, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="segment must be a positive number"):
        causal_conv_silu_triton(u, weight, b, 0)
    with pytest.raises(ValueError, match=r"needs weight \(8, 1, K\)"):
        causal_conv_silu_triton(u, weight[:4], b)
