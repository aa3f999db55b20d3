"""Each reference switch (docs/protocol.md) changes what it claims: MuJoCo version, Atari frame order and no-op range,
timestep encoding, token norm, initialisation, activation, weight-decay groups and DT's token-counted schedule."""
from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from evaluation.atari_frames import AtariFrames
from evaluation.envs import make_env
from mambadm.config import ConfigError, EnvSpec, EvalConfig, ModelConfig, OptimConfig, load_config
from mambadm.model import build_model
from mambadm.optim import make_optimizer, make_scheduler, param_groups

ATARI = EnvSpec("atari", [4, 84, 84], 4, True, 1000)


def eval_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(EvalConfig), kw)


def model_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"family": "dt", "n_layer": 2, "d_model": 64, "n_head": 4, "dropout": 0.0, **kw})


# ------------------------------------------------------------------------------------------- MuJoCo version
def test_walker2d_v4_keeps_the_v3_right_foot_friction_and_v5_changes_it():
    friction = {}
    for version in ("v4", "v5"):
        env = make_env({"kind": "mujoco", "task": "walker2d"}, eval_cfg(mujoco_version=version))
        model = env.unwrapped.model
        friction[version] = {name: float(model.geom(name).friction[0]) for name in ("foot_geom", "foot_left_geom")}
        env.close()
    assert friction["v4"] == {"foot_geom": 0.9, "foot_left_geom": 1.9}  # walker2d.xml, as the v3 env
    assert friction["v5"] == {"foot_geom": 1.9, "foot_left_geom": 1.9}  # walker2d_v5.xml


def test_hopper_v4_pays_the_healthy_reward_on_the_falling_step_and_v5_does_not():
    last = {}
    for version in ("v4", "v5"):
        env = make_env({"kind": "mujoco", "task": "hopper"}, eval_cfg(mujoco_version=version))
        env.reset(seed=0)
        action = np.array([1.0, -1.0, 1.0])  # falls within a few dozen steps
        for _ in range(1000):
            _, reward, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
        assert terminated
        ctrl = 1e-3 * float(np.square(action).sum())
        last[version] = reward - info["x_velocity"] + ctrl  # what is left: the healthy reward
        env.close()
    assert last["v4"] == pytest.approx(1.0, abs=1e-6) and last["v5"] == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------- Atari frames
class CountSteps(gym.Wrapper):
    """Counts the emulator steps taken under it."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.steps = 0

    def step(self, action):
        self.steps += 1
        return self.env.step(action)


def breakout(order: str | None, noop_min: int = 1, noop_max: int = 30):
    import ale_py

    gym.register_envs(ale_py)
    env = CountSteps(gym.make("ALE/Breakout-v5", frameskip=1, repeat_action_probability=0.0))
    if order is None:  # gymnasium's own wrapper, the reference for the dopamine order
        return gym.wrappers.AtariPreprocessing(env, noop_max=noop_max, frame_skip=4, screen_size=84)
    return AtariFrames(env, order, 4, noop_min, noop_max)


def recorded_episode(env, actions: np.ndarray) -> np.ndarray:
    frames = [env.reset(seed=5)[0]]
    for a in actions:
        obs, _, terminated, truncated, _ = env.step(int(a))
        frames.append(obs)
        if terminated or truncated:
            break
    env.close()
    return np.stack(frames)


@pytest.fixture(scope="module")
def episodes() -> dict[str, np.ndarray]:
    actions = np.random.default_rng(0).integers(0, 4, 400)
    return {name: recorded_episode(breakout(order), actions) for name, order in
            (("gymnasium", None), ("dopamine", "dopamine"), ("dt", "dt"))}


def test_dopamine_order_is_gymnasiums_atari_preprocessing(episodes):
    np.testing.assert_array_equal(episodes["dopamine"], episodes["gymnasium"])


def test_dt_order_differs_by_the_documented_amount(episodes):
    """docs/protocol.md: INTER_LINEAR then max vs max then INTER_AREA differ by ~1-2 grey levels per pixel on
    average and by tens of levels on thin objects (ball, paddle edges)."""
    dopamine, dt = episodes["dopamine"].astype(int), episodes["dt"].astype(int)
    assert dopamine.shape == dt.shape and len(dt) > 150
    diff = np.abs(dopamine - dt)
    assert 0.5 < diff.mean() < 4.0, diff.mean()
    assert diff.max() >= 40, diff.max()
    assert (diff.reshape(len(diff), -1).max(axis=1) > 0).all()  # every frame differs somewhere


def noops_drawn(noop_min: int, noop_max: int, seeds: range) -> list[int]:
    counts = []
    for seed in seeds:
        env = breakout("dt", noop_min, noop_max)
        env.reset(seed=seed)
        counts.append(env.env.steps)
        env.close()
    return counts


def test_noop_range_switch():
    dt, gymnasium = noops_drawn(0, 2, range(30)), noops_drawn(1, 3, range(30))
    assert set(dt) == {0, 1, 2} and set(gymnasium) == {1, 2, 3}
    assert noops_drawn(0, 0, range(3)) == [0, 0, 0]


# ------------------------------------------------------------------------------------------- model switches
def test_dt_global_timestep_uses_the_windows_first_step_in_training_and_the_current_step_when_acting():
    torch.manual_seed(0)
    model = build_model(model_cfg(timestep_encoding="dt_global", position_tokens=3 * 5 + 1), ATARI).eval()
    with torch.no_grad():
        model.embed.timestep.weight.normal_()  # zero-initialised, as DT's; give the timesteps an effect
        model.embed.position.normal_()
    g = torch.Generator().manual_seed(1)
    batch = {"rtg": torch.rand(1, 5, generator=g), "states": torch.randint(0, 255, (1, 5, 4, 84, 84), generator=g,
                                                                          dtype=torch.uint8),
             "actions": torch.randint(0, 4, (1, 5), generator=g), "timesteps": torch.arange(10, 15)[None]}
    out = model(batch)
    later_steps = dict(batch, timesteps=torch.tensor([[10, 99, 98, 97, 96]]))
    torch.testing.assert_close(model(later_steps), out)  # only the first step's timestep counts
    assert not torch.allclose(model(dict(batch, timesteps=batch["timesteps"] + 1)), out)
    with pytest.raises(ValueError, match="position_tokens=16"):
        model(dict(batch, **{k: torch.cat([v, v], 1) for k, v in batch.items()}))

    state = model.init_state(1, context_len=5)
    for t in range(5):  # acting: the window's timestep is the current step
        preds, state = model.act(state, batch["rtg"][:, t], batch["states"][:, t], batch["actions"][:, t - 1],
                                 torch.tensor([t + 10]))
    now = dict(batch, timesteps=torch.full((1, 5), 14))
    torch.testing.assert_close(preds, model(now)[:, -1])
    assert not torch.allclose(preds, out[:, -1])
    with pytest.raises(ValueError, match="dt_global"):
        model.embed.step_tokens(batch["rtg"][:, 0], batch["states"][:, 0], batch["actions"][:, 0], torch.tensor([0]))


def test_token_norm_and_activation_switches():
    plain, ref = build_model(model_cfg(), ATARI), build_model(model_cfg(token_norm=False, activation="relu"), ATARI)
    assert isinstance(plain.embed.norm, torch.nn.LayerNorm) and isinstance(ref.embed.norm, torch.nn.Identity)
    kinds = [{type(m) for m in model.layers.modules()} for model in (plain, ref)]
    assert torch.nn.GELU in kinds[0] and torch.nn.ReLU not in kinds[0]
    assert torch.nn.ReLU in kinds[1] and torch.nn.GELU not in kinds[1]


def test_init_switch_statistics():
    """dt: as DT's Atari code (its apply(_init_weights) runs before the CNN and the return embedding exist)."""
    torch.manual_seed(0)
    ours, ref = build_model(model_cfg(d_model=128), ATARI), build_model(model_cfg(d_model=128, init="dt"), ATARI)
    enc_linear = lambda m: m.embed.state[-2]  # noqa: E731 - Linear(3136, d)
    assert enc_linear(ours).weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert enc_linear(ref).weight.std().item() == pytest.approx(1 / math.sqrt(3 * 3136), rel=0.05)  # PyTorch default
    assert ours.embed.rtg[0].weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert ref.embed.rtg[0].weight.abs().max().item() > 0.2  # default: U(-1, 1) for one input
    for model in (ours, ref):
        assert model.embed.action[0].weight.std().item() == pytest.approx(0.02, rel=0.15)  # 4 x 128 draws
        assert not model.embed.timestep.weight.any()
    qkv = ours.layers[0].attn.qkv.weight, ref.layers[0].attn.qkv.weight
    assert qkv[0].std().item() == pytest.approx(1 / math.sqrt(3 * 128), rel=0.05)  # PyTorch default
    assert qkv[1].std().item() == pytest.approx(0.02, rel=0.05) and not ref.layers[0].attn.qkv.bias.any()
    assert ours.head.proj.bias is not None and ref.head.proj.bias is None
    assert ref.head.proj.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_decay_all_puts_every_parameter_in_one_decayed_group():
    model = build_model(model_cfg(), ATARI)
    groups, single = param_groups(model, 0.1), param_groups(model, 0.1, "all")
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0 and groups[1]["params"]
    assert len(single) == 1 and single[0]["weight_decay"] == 0.1
    assert len(single[0]["params"]) == len(list(model.parameters()))


# ------------------------------------------------------------------------------------------- schedule
def lrs(optim_cfg: OptimConfig, total: int, steps: list[int]) -> dict[int, float]:
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([p], lr=optim_cfg.lr)
    scheduler = make_scheduler(optimizer, optim_cfg, total)
    out = {}
    for s in range(max(steps) + 1):
        if s in steps:
            out[s] = optimizer.param_groups[0]["lr"]  # the rate update s runs at
        optimizer.step()
        scheduler.step()
    return out


def test_dt_token_schedule_at_chosen_token_counts():
    """trainer_atari.py:115-127 with B=128, K=30 (3840 tokens an update), warmup 10240, DT's final_tokens for
    N = 500,000 rows: 2 * (N - 90) * 90; the rate is set after each update, so update 0 runs at the full rate."""
    final = 2 * (500_000 - 90) * 90
    cfg = OptimConfig(schedule="dt_tokens", tokens_per_update=3840, warmup_tokens=10240, final_tokens=final)
    got = lrs(cfg, 19530, [0, 1, 2, 3, 10_000, 18_000, 19_000, 19_529])

    def dt(tokens: int) -> float:  # the reference's formula, transcribed
        if tokens < 10240:
            return tokens / 10240
        return max(0.1, 0.5 * (1.0 + math.cos(math.pi * (tokens - 10240) / (final - 10240))))
    assert got[0] == pytest.approx(6e-4)
    assert [got[s] / 6e-4 for s in (1, 2)] == pytest.approx([0.375, 0.75])
    for s in (3, 10_000, 18_000, 19_000, 19_529):
        assert got[s] / 6e-4 == pytest.approx(dt(s * 3840))
    assert got[18_000] / 6e-4 > 0.1 and got[19_000] / 6e-4 == pytest.approx(0.1)  # the floor from epoch ~4.77
    cosine = lrs(OptimConfig(warmup_steps=3), 19530, [18_000, 19_529])  # the project's rescaled cosine
    assert cosine[18_000] / 6e-4 > 0.1 and cosine[19_529] / 6e-4 == pytest.approx(0.1, abs=1e-6)
    default_final = lrs(OptimConfig(schedule="dt_tokens", tokens_per_update=3840), 19530, [15_000])
    assert default_final[15_000] / 6e-4 == pytest.approx(dt(15_000 * 3840), rel=1e-3)  # final_tokens 0: 6/5 of run


def test_dt_token_schedule_checks_tokens_per_update(tmp_path):
    with pytest.raises(ConfigError, match="tokens_per_update must equal .* = 3840"):
        load_config(None, ["optim.schedule=dt_tokens", "data.batch_size=128", "data.context_len=30"])
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="tokens_per_update must be positive"):
        make_scheduler(make_optimizer(model, OptimConfig(schedule="dt_tokens", fused=False)),
                       OptimConfig(schedule="dt_tokens"), 10)
