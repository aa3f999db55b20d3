"""MambaDM and Decision Transformer: recurrent == parallel, causality, window acting, overfitting, counting."""
from __future__ import annotations

import pytest
import torch

from mambadm.config import EnvSpec, ModelConfig
from mambadm.model import build_model
from mambadm.model.gloma import GLoMaBlock
from mambadm.model.recurrent import BlockSteps, StackStep

ATARI = EnvSpec("atari", [4, 84, 84], 4, True, 64)
MUJOCO = EnvSpec("vector", [11], 3, False, 1000)
DISCRETE_VECTOR = EnvSpec("vector", [5], 4, True, 100)


def tiny(family: str, spec: EnvSpec, **kw) -> torch.nn.Module:
    cfg = ModelConfig(family=family, n_layer=2, d_model=32, d_state=8, local_window=3, n_head=2, dropout=0.0, **kw)
    return build_model(cfg, spec).eval()


def random_batch(spec: EnvSpec, B: int, K: int, start: int = 0) -> dict[str, torch.Tensor]:
    if spec.obs_kind == "atari":
        states = torch.randint(0, 256, (B, K, *spec.obs_shape), dtype=torch.uint8)
    else:
        states = torch.randn(B, K, *spec.obs_shape)
    actions = torch.randint(0, spec.act_dim, (B, K)) if spec.discrete else torch.rand(B, K, spec.act_dim) * 2 - 1
    return {"rtg": torch.randn(B, K), "states": states, "actions": actions,
            "timesteps": torch.arange(start, start + K).repeat(B, 1), "mask": torch.ones(B, K, dtype=torch.bool)}


def step_inputs(batch: dict[str, torch.Tensor], t: int, t_offset: int = 0):
    """act() arguments for step t of the batch's episode (prev_action is a_{t-1}; garbage at t == 0)."""
    prev = batch["actions"][:, t - 1] if t > 0 else batch["actions"][:, 0] + 1
    B = batch["rtg"].shape[0]
    return batch["rtg"][:, t], batch["states"][:, t], prev, torch.full((B,), t + t_offset, dtype=torch.long)


def act_episode(model, batch, mode: str, K: int, **kw) -> torch.Tensor:
    state = model.init_state(batch["rtg"].shape[0], mode=mode, context_len=K, **kw)
    preds = []
    for t in range(batch["rtg"].shape[1]):
        p, state = model.act(state, *step_inputs(batch, t))
        preds.append(p)
    return torch.stack(preds, 1)


# ----------------------------------------------------------------------------------------------- recurrence
@pytest.mark.parametrize("backend", ["fast", "cpp"])  # the acting recurrence: tensor ops, or the fused kernel
@pytest.mark.parametrize("spec", [ATARI, MUJOCO], ids=["atari", "mujoco"])
def test_recurrent_acting_equals_forward(spec, backend, seed):
    model = tiny("mambadm", spec, backend=backend)
    batch = random_batch(spec, B=2, K=8)  # 8 steps, windows of 3: local resets at t = 3, 6, K not a multiple
    with torch.no_grad():
        full = model(batch)
    rec = act_episode(model, batch, "recurrent", K=8)
    torch.testing.assert_close(rec, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["fast", "cpp"])
@pytest.mark.parametrize("fusion", ["add", "gate", "concat"])
def test_recurrent_per_env_episode_starts(fusion, backend, seed):
    """Envs at different episode steps in one call: env 1 restarts its episode (t = 0) two calls after env 0."""
    model = tiny("mambadm", MUJOCO, fusion=fusion, backend=backend)
    ep = random_batch(MUJOCO, B=2, K=7)
    with torch.no_grad():
        full = model(ep)
    junk = random_batch(MUJOCO, B=2, K=2)
    state = model.init_state(2, mode="recurrent")
    for t in range(2):  # env 1 plays steps 5 and 6 of some older episode
        feed = step_inputs(junk, t, t_offset=5)
        feed[3][0] = t
        rtg, obs, prev, tt = feed
        rtg, obs, prev = rtg.clone(), obs.clone(), prev.clone()
        rtg[0], obs[0], prev[0] = ep["rtg"][0, t], ep["states"][0, t], ep["actions"][0, t - 1] if t else 0
        p, state = model.act(state, rtg, obs, prev, tt)
        if t == 1:
            torch.testing.assert_close(p[0], full[0, 1], atol=1e-5, rtol=0)
    for t in range(7):  # env 1 starts its new episode now: its predictions must match a fresh forward
        rtg, obs, prev, _ = step_inputs(ep, t)
        p, state = model.act(state, rtg, obs, prev, torch.tensor([t + 2, t]))
        torch.testing.assert_close(p[1], full[1, t], atol=1e-5, rtol=0)


def with_every_option(model: torch.nn.Module, tanh_gelu: bool) -> torch.nn.Module:
    """The model with biases on both projections of every mixer, no conv bias, optionally the tanh GELU, and every
    parameter redrawn large enough that each one moves the output."""
    for layer in model.layers:
        for m in (layer.global_mamba, layer.local_mamba):
            m.in_proj.bias = torch.nn.Parameter(torch.randn(m.in_proj.out_features))
            m.out_proj.bias = torch.nn.Parameter(torch.randn(m.out_proj.out_features))
            m.conv1d.bias = None
        if tanh_gelu:
            layer.ffn[1] = torch.nn.GELU(approximate="tanh")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(-1.0, 1.5)
            elif not name.startswith("embed"):
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("fusion,tanh_gelu", [("add", False), ("gate", True), ("concat", False)])
def test_cpp_stack_step_equals_the_readable_step(fusion, tanh_gelu, seed):
    """The whole stack in one C++ call (`StackStep`) against the readable step (`GLoMaBlock.step` over `Mamba.step`),
    outputs and both states, over 10 actions of 3 envs whose episodes start at different calls (local windows of 3
    steps)."""
    model = with_every_option(tiny("mambadm", MUJOCO, fusion=fusion, backend="cpp"), tanh_gelu)
    stack = model.init_state(3)
    assert isinstance(stack, StackStep)
    python = BlockSteps.of(model.layers, 3, torch.device("cpu"))
    ep = random_batch(MUJOCO, B=3, K=10)
    starts = torch.tensor([0, 2, 7])  # env b starts its episode at call starts[b]; before that, steps 4, 5, ...
    for call in range(10):
        t = torch.where(call >= starts, call - starts, call + 4)
        rtg, obs, prev, _ = step_inputs(ep, call)
        p_stack, stack = model.act(stack, rtg, obs, prev, t)
        p_python, python = model.act(python, rtg, obs, prev, t)
        torch.testing.assert_close(p_stack, p_python, atol=1e-5, rtol=1e-5)
    for i, cache in enumerate(python.caches):  # per branch (B, d_inner, k) / (B, d_inner, d_state) there
        for branch, mixer_cache in enumerate((cache.global_, cache.local)):
            torch.testing.assert_close(stack.conv[i, branch].transpose(1, 2), mixer_cache.conv_state, atol=1e-5,
                                       rtol=1e-5)
            torch.testing.assert_close(stack.ssm[i, branch], mixer_cache.ssm_state, atol=1e-5, rtol=1e-5)
    assert stack.ssm.abs().max() > 0.1  # the states carry something


def test_cpp_stack_step_is_used_where_it_applies(seed):
    cpp, fast = tiny("mambadm", MUJOCO, backend="cpp"), tiny("mambadm", MUJOCO, backend="fast")
    assert isinstance(cpp.init_state(2), StackStep)
    assert isinstance(fast.init_state(2), BlockSteps)  # no C++: the readable step
    assert isinstance(cpp.train().init_state(2), StackStep)  # dropout 0: nothing the C++ step leaves out
    dropping = build_model(ModelConfig(family="mambadm", n_layer=2, d_model=32, d_state=8, dropout=0.1,
                                       backend="cpp"), MUJOCO).train()
    assert isinstance(dropping.init_state(2), BlockSteps)  # dropout active: only the Python step applies it
    stack = cpp.eval().init_state(2)
    with pytest.raises(ValueError, match=r"2 envs.*\(3, 3, 32\)"):
        stack.run(torch.zeros(3, 3, 32), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"int64, got \(2, 3, 32\) and \(2,\) torch.int32"):
        stack.run(torch.zeros(2, 3, 32), torch.zeros(2, dtype=torch.int32))


def test_gloma_block_step_token_by_token_equals_forward(seed):
    block = GLoMaBlock(16, d_state=4, d_conv=4, expand=2, local_window=2, fusion="gate", ffn_mult=2,
                       dropout=0.0).eval()
    x = torch.randn(3, 17, 16)  # 17 tokens: windows of 6, the last one partial
    with torch.no_grad():
        full = block(x)
        cache = block.allocate_cache(3)
        steps = [block.step(x[:, i], cache, torch.full((3,), i)) for i in range(17)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("family", ["mambadm", "dt"])
@pytest.mark.parametrize("spec", [ATARI, MUJOCO], ids=["atari", "mujoco"])
def test_causality(family, spec, seed):
    model = tiny(family, spec)
    batch = random_batch(spec, B=1, K=7)
    with torch.no_grad():
        base = model(batch)
        for j in (0, 2, 4, 6):
            for key in ("rtg", "states", "actions"):
                changed = {k: v.clone() for k, v in batch.items()}
                if key == "states" and spec.obs_kind == "atari":
                    changed[key][:, j] = 255 - changed[key][:, j]
                elif key == "actions" and spec.discrete:
                    changed[key][:, j] = (changed[key][:, j] + 1) % spec.act_dim
                else:
                    changed[key][:, j] = changed[key][:, j] + 3.0
                out = model(changed)
                last_same = j + 1 if key == "actions" else j  # a_j never informs the prediction of a_j
                torch.testing.assert_close(out[:, :last_same], base[:, :last_same], atol=1e-6, rtol=0)
                if last_same < 7:
                    assert not torch.allclose(out[:, last_same:], base[:, last_same:], atol=1e-6), (key, j)


# ----------------------------------------------------------------------------------------------- window acting
@pytest.mark.parametrize("reencode", [False, True], ids=["cached-tokens", "reencode"])
@pytest.mark.parametrize("family", ["mambadm", "dt"])
@pytest.mark.parametrize("spec", [ATARI, MUJOCO], ids=["atari", "mujoco"])
def test_window_acting_equals_forward_on_last_k_steps(family, spec, reencode, seed):
    model, K, T = tiny(family, spec), 4, 9
    batch = random_batch(spec, B=2, K=T)
    acted = act_episode(model, batch, "window", K=K, reencode=reencode)
    with torch.no_grad():
        for t in range(T):
            lo = max(0, t - K + 1)
            ref = model({k: v[:, lo:t + 1] for k, v in batch.items()})[:, -1]
            torch.testing.assert_close(acted[:, t], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["mambadm", "dt"])
def test_cached_token_window_equals_reencoding_with_staggered_episodes(family, seed):
    """Three envs whose episodes (re)start at different calls, windows of K = 4: the cached tokens give the actions
    that re-encoding the window gives, call by call."""
    model = tiny(family, DISCRETE_VECTOR)
    ep = random_batch(DISCRETE_VECTOR, B=3, K=12)
    cached = model.init_state(3, mode="window", context_len=4)
    reencoded = model.init_state(3, mode="window", context_len=4, reencode=True)
    starts = torch.tensor([0, 3, 6])  # env b (re)starts at call starts[b]; before that, steps 7, 8, ... of another
    for call in range(12):
        t = torch.where(call >= starts, call - starts, call + 7)
        rtg, obs, prev, _ = step_inputs(ep, call)
        prev = prev if call else torch.zeros_like(prev)  # a valid action for the envs in mid-episode
        p_cached, cached = model.act(cached, rtg, obs, prev, t)
        p_reencoded, reencoded = model.act(reencoded, rtg, obs, prev, t)
        torch.testing.assert_close(p_cached, p_reencoded, atol=1e-5, rtol=1e-5)
    assert cached.length.tolist() == [4, 4, 4]


# ----------------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("family", ["mambadm", "dt"])
@pytest.mark.parametrize("spec", [DISCRETE_VECTOR, MUJOCO], ids=["discrete", "continuous"])
def test_tiny_model_overfits_a_fixed_batch(family, spec, seed):
    model = tiny(family, spec).train()
    batch = random_batch(spec, B=4, K=6)
    batch["mask"][0, -2:] = False  # padded steps are excluded from the loss
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss, stats = model.loss(batch)
        first = first if first is not None else stats["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert stats["steps"] == 22
    assert stats["loss"] < 0.1 * first, (first, stats["loss"])


# ----------------------------------------------------------------------------------------------- interface
def test_bad_batch_names_the_key():
    model = tiny("dt", MUJOCO)
    batch = random_batch(MUJOCO, B=2, K=3)
    batch["states"] = batch["states"][..., :5]
    with pytest.raises(ValueError, match=r"batch\['states'\].*\(2, 3, 11\)"):
        model(batch)


@pytest.mark.parametrize("family", ["mambadm", "dt"])
def test_unstacked_atari_frames_read_as_their_stacks(family, seed):
    """A loader batch ships a strip of K + 3 frames ("frames"); the model reads it as the K stacks of 4."""
    model = tiny(family, ATARI)
    batch = random_batch(ATARI, B=2, K=5)
    frames = torch.randint(0, 256, (2, 8, 84, 84), dtype=torch.uint8)
    stacked = {**batch, "states": torch.stack([frames[:, t:t + 4] for t in range(5)], dim=1)}
    unstacked = {k: v for k, v in batch.items() if k != "states"} | {"frames": frames}
    with torch.no_grad():
        torch.testing.assert_close(model(unstacked), model(stacked), rtol=0, atol=0)
    if family == "mambadm":
        for a, b in zip(model.a_matrices(unstacked), model.a_matrices(stacked)):
            torch.testing.assert_close(a["A_discrete"], b["A_discrete"], rtol=0, atol=0)
    unstacked["frames"] = frames[:, :7]
    with pytest.raises(ValueError, match=r"batch\['frames'\] must have shape \(2, 8, 84, 84\)"):
        model(unstacked)


def test_a_matrices_per_layer_and_branch(seed):
    model = tiny("mambadm", MUJOCO)
    batch = random_batch(MUJOCO, B=2, K=5)
    entries = model.a_matrices(batch)
    assert [(e["layer"], e["branch"]) for e in entries] == [(0, "global"), (0, "local"), (1, "global"), (1, "local")]
    for e in entries:
        assert e["A"].shape == (64, 8) and bool((e["A"] < 0).all())
        windows = 1 if e["branch"] == "global" else 2  # 15 tokens in windows of 9
        assert e["A_discrete"].shape == (2 * windows, 15 if e["branch"] == "global" else 9, 64, 8)
        assert bool(((e["A_discrete"] > 0) & (e["A_discrete"] < 1)).all())
    assert "A_discrete" not in model.a_matrices()[0]


def test_flops_per_token_grows_with_size_and_context():
    small, big = tiny("dt", MUJOCO), build_model(ModelConfig(family="dt", n_layer=4, d_model=64, n_head=2), MUJOCO)
    assert 0 < small.flops_per_token(20) < big.flops_per_token(20) < big.flops_per_token(60)
    mdm = tiny("mambadm", ATARI)
    assert mdm.flops_per_token(30) > tiny("mambadm", MUJOCO).flops_per_token(30) > 0  # the CNN counts
    assert mdm.flops_per_token(30) == mdm.flops_per_token(60)  # no context term for the SSM
    assert mdm.num_params(non_embedding=True) < mdm.num_params()


def test_each_family_declares_its_zero3_leaf_modules():
    """MambaDM's mixers run their parameters through fused autograd functions: ZeRO-3 gathers each mixer whole."""
    from mambadm.ssm import Mamba

    mdm = tiny("mambadm", MUJOCO)
    assert mdm.zero3_leaf_modules() == [Mamba]
    assert any(isinstance(m, Mamba) for m in mdm.modules())
    assert tiny("dt", MUJOCO).zero3_leaf_modules() == []
