"""Evaluation env protocols on the real ALE and MuJoCo envs: frame stack, no-op starts, sticky actions, caps,
state normalisation."""
import numpy as np
import pytest
from omegaconf import OmegaConf

from evaluation.envs import make_env, protocol
from mambadm.config import EvalConfig

BREAKOUT = {"kind": "atari", "game": "Breakout"}
HOPPER = {"kind": "mujoco", "task": "hopper"}


def cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(EvalConfig), kw)


def test_atari_frame_stack_shape_and_zero_padding():
    env = make_env(BREAKOUT, cfg(), frame_stack=4)
    obs, _ = env.reset(seed=3)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    assert not obs[:3].any() and obs[3].any()  # DT/Dopamine: zeros before the first frame
    obs2, *_ = env.step(1)
    assert np.array_equal(obs2[2], obs[3]) and not obs2[:2].any()
    assert env.action_space.n == 4  # Breakout's minimal action set
    env_reset_pad = make_env(BREAKOUT, cfg(frame_padding="reset"), frame_stack=4)
    obs, _ = env_reset_pad.reset(seed=3)
    assert all(np.array_equal(obs[i], obs[3]) for i in range(3))


def test_atari_noop_starts_vary_with_seed_and_can_be_disabled():
    env = make_env(BREAKOUT, cfg(noop_max=30))
    frames = {env.reset(seed=s)[1]["episode_frame_number"] for s in range(12)}
    assert len(frames) > 3 and max(frames) <= 30  # frameskip=1 underneath: one no-op = one frame
    env0 = make_env(BREAKOUT, cfg(noop_max=0))
    assert {env0.reset(seed=s)[1]["episode_frame_number"] for s in range(3)} == {0}


def plain_ale_stack(game: str, sticky: float):
    """The same protocol built directly from gymnasium's wrappers: its seeded reset is ALE's own (ROM reload)."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=sticky)
    env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84, grayscale_obs=True)
    return gym.wrappers.FrameStackObservation(env, 4, padding_type=np.zeros((84, 84), np.uint8))


def seeded_episode(env, seed: int, steps: int):
    obs, _ = env.reset(seed=seed)
    actions = np.random.default_rng(seed).integers(env.action_space.n, size=steps)
    frames, rewards = [obs], []
    for a in actions:
        obs, r, terminated, truncated, _ = env.step(int(a))
        frames.append(obs)
        rewards.append(r)
        if terminated or truncated:
            break
    return np.stack(frames), np.array(rewards)


@pytest.mark.parametrize("game,sticky", [("Breakout", 0.0), ("Assault", 0.0), ("Breakout", 0.25)])
def test_seeded_reset_matches_ale_reload_whatever_ran_before(game, sticky):
    # Assault's plain reset_game depends on what ran before it; the snapshot restore must not.
    ours = make_env({"kind": "atari", "game": game}, cfg(repeat_action_probability=sticky))
    plain = plain_ale_stack(game, sticky)
    loads = []
    ale_env = ours.unwrapped
    real_load = ale_env.load_game
    ale_env.load_game = lambda: (loads.append(1), real_load())[1]
    seeded_episode(ours, 123, 300)  # history the next episodes must not see
    for seed in (5, 6):
        frames, rewards = seeded_episode(ours, seed, 250)
        ref_frames, ref_rewards = seeded_episode(plain, seed, 250)
        assert frames.shape == ref_frames.shape and np.array_equal(frames, ref_frames)
        assert np.array_equal(rewards, ref_rewards)
    assert len(loads) == (3 if sticky else 1)  # sticky actions reseed ALE's generator: a full reload each time


def test_atari_settings_reach_the_emulator():
    env = make_env(BREAKOUT, cfg(repeat_action_probability=0.25, max_episode_frames=5000))
    ale = env.unwrapped.ale
    assert ale.getFloat("repeat_action_probability") == pytest.approx(0.25)
    assert ale.getInt("max_num_frames_per_episode") == 5000
    assert ale.getInt("frame_skip") == 1  # action repeat happens in AtariPreprocessing (max-pool of two frames)
    default = make_env(BREAKOUT, cfg()).unwrapped.ale
    assert default.getFloat("repeat_action_probability") == 0.0
    assert default.getInt("max_num_frames_per_episode") == 108_000
    assert protocol(BREAKOUT, cfg())["noop_max"] == 30


def test_atari_frame_cap_truncates():
    env = make_env(BREAKOUT, cfg(max_episode_frames=400, noop_max=0))
    env.reset(seed=0)
    for step in range(1, 200):
        _, _, terminated, truncated, info = env.step(1)
        if terminated or truncated:
            break
    assert truncated and not terminated and info["episode_frame_number"] <= 404 and step <= 100


def test_mujoco_normalisation_uses_dataset_stats():
    mean, std = np.linspace(-1, 1, 11), np.linspace(0.5, 2, 11)
    raw = make_env(HOPPER, cfg())
    norm = make_env(HOPPER, cfg(), {"state_mean": mean.tolist(), "state_std": std.tolist()})
    o_raw, _ = raw.reset(seed=5)
    o_norm, _ = norm.reset(seed=5)
    assert o_norm.dtype == np.float32
    np.testing.assert_allclose(o_norm, (o_raw - mean) / (std + 1e-6), rtol=1e-5, atol=1e-6)
    a = np.full(3, 0.3, np.float32)
    np.testing.assert_allclose(norm.step(a)[0], (raw.step(a)[0] - mean) / (std + 1e-6), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="observation shape"):
        make_env(HOPPER, cfg(), {"state_mean": [0.0] * 3, "state_std": [1.0] * 3})


def test_mujoco_version_and_episode_length():
    assert make_env(HOPPER, cfg()).spec.id == "Hopper-v5"
    env = make_env(HOPPER, cfg(mujoco_version="v4", max_episode_steps=7))
    assert env.spec.id == "Hopper-v4"
    env.reset(seed=0)
    for step in range(1, 20):
        _, _, terminated, truncated, _ = env.step(np.zeros(3, np.float32))
        if terminated or truncated:
            break
    assert truncated and step == 7
