"""The EnvPool evaluation backend against the gymnasium reference: bit-identical Atari episodes where the protocol is
deterministic (in a pool made once and reused across groups), matching return distributions where it is not
(two-sample Kolmogorov-Smirnov and Welch tests at alpha = 0.01), one pool per Ray actor across its groups,
reproducible results for a given seed and schedule, the protocol switches EnvPool cannot express refused at start-up,
and no Ray warning about constructor arguments in the object store."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats

from evaluation.batch import make_batch
from evaluation.policy import RandomPolicy, build_policy, payload_from_export
from evaluation.rollout import make_tasks, run_group
from mambadm.config import EvalConfig

pytest.importorskip("envpool")
# the parity tests run small MuJoCo pools on purpose; the warning they draw is tested on its own
pytestmark = pytest.mark.filterwarnings("ignore::evaluation.envpool_envs.SmallMuJoCoPoolWarning")

BREAKOUT = {"kind": "atari", "game": "Breakout"}
HOPPER = {"kind": "mujoco", "task": "hopper"}
ALPHA = 0.01  # the statistical tests' tolerance: parity is rejected only when p < 1%
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(**kw):
    return OmegaConf.merge(OmegaConf.structured(EvalConfig), kw)


def test_atari_episodes_are_bit_identical_where_the_protocol_is_deterministic():
    """One no-op frame (EnvPool's least; gymnasium draws 1..1 too) and no sticky actions: nothing is random, so the
    same actions give the same zero-padded frame stacks, rewards and episode ends on both backends. The one frame
    that differs is an episode's last (ALE's game over cuts the frame skip: EnvPool then skips the max-pool); no
    policy ever sees it. Three groups run in one pool (made once, reset per episode), the last with fewer episodes
    than envs, so reused envs and unused slots are covered too (Breakout's reset is history-independent)."""
    cfg = config(noop_max=1, max_episode_frames=2000)
    reference = make_batch(BREAKOUT, cfg, None, 3)
    fast = make_batch(BREAKOUT, OmegaConf.merge(cfg, {"env_backend": "envpool"}), None, 3)
    rng = np.random.default_rng(0)
    for seeds in ([1, 2, 3], [4, 5, 6], [7, 8]):
        n = len(seeds)
        obs_ref, obs_fast = reference.reset(seeds), fast.reset(seeds)
        np.testing.assert_array_equal(obs_ref, obs_fast)
        assert obs_ref[:, :3].max() == 0 and obs_ref[:, 3].max() > 0  # the stack before the first frame is zeros
        done, steps, total = np.zeros(n, bool), 0, np.zeros(n)
        while not done.all():
            actions = rng.integers(0, 4, n)
            o_ref, r_ref, term_ref, trunc_ref = reference.step(actions, ~done)
            o_fast, r_fast, term_fast, trunc_fast = fast.step(actions, ~done)
            active = ~done
            np.testing.assert_array_equal(r_ref[active], r_fast[active])
            np.testing.assert_array_equal((term_ref | trunc_ref)[active], (term_fast | trunc_fast)[active])
            going = active & ~(term_ref | trunc_ref)  # a last frame is never acted on (the two max-pool it apart)
            np.testing.assert_array_equal(o_ref[going], o_fast[going])
            total += np.where(active, r_ref, 0)
            done |= active & (term_ref | trunc_ref)
            steps += 1
        assert steps > 100 and total.sum() > 0  # long enough to score: the comparison covers real play
    assert fast.pools_made == 1 and fast.env_seeds == [1, 2, 3]  # made at the first group, with its seeds


def test_life_loss_ends_the_episode_and_a_reused_env_starts_a_new_game():
    """terminal_on_life_loss: the batch ends the episode at the first life lost, at the same step and with the same
    return as the reference, and the env's next episode is a new game with every life (EnvPool's own episodic_life
    would continue the old game in a reused env)."""
    cfg = config(noop_max=1, terminal_on_life_loss=True)
    reference = make_batch(BREAKOUT, cfg, None, 2)
    fast = make_batch(BREAKOUT, OmegaConf.merge(cfg, {"env_backend": "envpool"}), None, 2)
    for group in range(3):
        tasks = make_tasks([90.0], 2, group)
        policy = RandomPolicy(reference.action_space)
        expected = [(r["return"], r["length"]) for r in run_group(reference, policy, tasks)]
        fast.reset([0, 1])
        assert list(fast.lives) == [5, 5]  # a new game in every reused env
        got = [(r["return"], r["length"]) for r in run_group(fast, RandomPolicy(fast.action_space), tasks)]
        assert list(fast.lives) == [4, 4]  # one life lost each
        assert got == expected
        assert all(length < 100 for _, length in got), got  # the first life, not the game (~180 steps)
    assert fast.pools_made == 1


def test_a_reused_pool_gives_the_same_results_for_the_same_seeds_and_schedule():
    """A random protocol (no-op starts 1..30, sticky actions): every episode after the first group draws from its
    env's continuing generator, so two batches fed the same groups in the same order give identical episodes, and a
    batch made at another first group gives other no-op counts for the same later group."""
    cfg = config(env_backend="envpool", max_episode_frames=2000, repeat_action_probability=0.25)
    tasks = make_tasks([90.0], 12, 0)

    def run(groups):
        batch = make_batch(BREAKOUT, cfg, None, 4)
        out = [[(r["return"], r["length"]) for r in run_group(batch, RandomPolicy(batch.action_space), tasks[g:g + 4])]
               for g in groups]
        assert batch.pools_made == 1
        return out

    first, again = run([0, 4, 8]), run([0, 4, 8])
    assert first == again
    assert run([4, 8])[1] != first[2]  # group 8 on a pool made at group 4: other env histories


def test_the_batch_steps_as_envpools_own_gymnasium_api_does():
    """The batch calls EnvPool's C++ send / recv directly (without its Python wrapper): on a pool made with the same
    seeds, the same float32 actions, stepping ever fewer running slots, give exactly what EnvPool's gymnasium
    ``step(action, env_id)`` gives, slot for slot (observations, rewards, terminated, truncated), through the
    episodes' ends (Hopper, normalised states)."""
    import envpool

    info = {"state_mean": np.linspace(-0.5, 0.5, 11).tolist(), "state_std": np.linspace(0.5, 2, 11).tolist()}
    cfg = config(env_backend="envpool", max_episode_steps=40)
    batch = make_batch(HOPPER, cfg, info, 4)
    seeds = [11, 12, 13, 14]
    obs = batch.reset(seeds)
    own = envpool.make("Hopper-v5", env_type="gymnasium", num_envs=4, batch_size=4, num_threads=1,
                       env_seed=batch.env_seeds, max_episode_steps=40)
    mean, scale = np.array(info["state_mean"]), np.array(info["state_std"]) + cfg.state_std_eps
    own_obs = own.reset()[0]
    np.testing.assert_array_equal(obs, ((own_obs - mean) / scale).astype(np.float32))
    rng, active, ends = np.random.default_rng(0), np.ones(4, bool), 0
    while active.any():
        actions = rng.uniform(-1, 1, (4, 3)).astype(np.float32)
        ids = np.flatnonzero(active).astype(np.int32)
        got = batch.step(actions, active)
        o, r, term, trunc, out = own.step(actions[ids].astype(np.float64), env_id=ids)
        np.testing.assert_array_equal(out["env_id"], ids)
        expected = (((o - mean) / scale).astype(np.float32), r, term, trunc)
        for got_field, expected_field in zip(got, expected):
            np.testing.assert_array_equal(got_field[ids], expected_field)
        assert got[1].dtype == np.float64 and got[0].dtype == np.float32
        ended = got[2] | got[3]
        ends += int((active & ended).sum())
        active &= ~ended
    assert ends == 4 and batch.pools_made == 1


def returns(eval_env, cfg, episodes, n_envs, policy_of=RandomPolicy, seed=0):
    batch = make_batch(eval_env, cfg, None, n_envs)
    tasks = make_tasks([90.0], episodes, seed)
    out = []
    for i in range(0, episodes, n_envs):
        out += [r["return"] for r in run_group(batch, policy_of(batch.action_space), tasks[i:i + n_envs])]
    return np.array(out)


@pytest.mark.parametrize("eval_env, episodes, kw", [
    (BREAKOUT, 40, {"max_episode_frames": 4000}),  # no-op starts: the seeds draw different no-op counts
    (BREAKOUT, 40, {"max_episode_frames": 4000, "repeat_action_probability": 0.25}),  # sticky actions
    (HOPPER, 60, {}),  # EnvPool's MuJoCo build and its own initial-state noise
])
def test_random_policy_returns_have_the_same_distribution(eval_env, episodes, kw):
    reference = returns(eval_env, config(**kw), episodes, 8)
    fast = returns(eval_env, config(env_backend="envpool", **kw), episodes, 8)
    assert stats.ks_2samp(reference, fast).pvalue > ALPHA, (reference.mean(), fast.mean())
    assert stats.ttest_ind(reference, fast, equal_var=False).pvalue > ALPHA, (reference.mean(), fast.mean())


def test_a_model_policy_scores_the_same_within_error(tmp_path):
    """An exported (untrained, deterministic) MambaDM on Hopper: normalised states, tanh actions; same statistics."""
    from test_eval_policy import make_export

    payload = payload_from_export(make_export(tmp_path))

    def model(space):
        return build_policy(payload, space)

    cfg = {"state_mean": payload["dataset_info"]["state_mean"], "state_std": payload["dataset_info"]["state_std"]}
    out = {}
    for backend in ("gymnasium", "envpool"):
        batch = make_batch(HOPPER, config(env_backend=backend), cfg, 8)
        tasks = make_tasks([3600.0], 32, 0)
        out[backend] = np.array([r["return"] for i in range(0, 32, 8)
                                 for r in run_group(batch, model(batch.action_space), tasks[i:i + 8])])
    assert stats.ttest_ind(out["gymnasium"], out["envpool"], equal_var=False).pvalue > ALPHA, out
    assert stats.ks_2samp(out["gymnasium"], out["envpool"]).pvalue > ALPHA, out


def test_envpool_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="noop_max"):
        make_batch(BREAKOUT, config(env_backend="envpool", noop_max=0), None, 1)
    with pytest.raises(ValueError, match=r"eval.frame_processing=dt.*eval.env_backend=gymnasium"):
        make_batch(BREAKOUT, config(env_backend="envpool", frame_processing="dt"), None, 1)
    with pytest.raises(ValueError, match=r"eval.noop_min=0.*eval.env_backend=gymnasium"):
        make_batch(BREAKOUT, config(env_backend="envpool", noop_min=0, noop_max=29), None, 1)
    with pytest.raises(ValueError, match="max_episode_frames"):
        make_batch(BREAKOUT, config(env_backend="envpool", max_episode_frames=1001), None, 1)
    dt = make_batch(BREAKOUT, config(frame_processing="dt", noop_min=0, noop_max=29), None, 1)  # the backend named
    assert dt.reset([0]).shape == (1, 4, 84, 84)


def test_small_mujoco_pools_are_named_at_start_up_and_still_run_on_envpool():
    """Below the measured crossover EnvPool steps MuJoCo slower than gymnasium: the protocol (what the CLI checks
    before Ray starts) warns, naming the crossover and the option to raise; the backend is not switched. At the
    crossover, on Atari and on gymnasium: no warning."""
    import warnings

    from evaluation.envpool_envs import MUJOCO_CROSSOVER_ENVS, SmallMuJoCoPoolWarning
    from evaluation.envs import protocol

    few = config(env_backend="envpool", envs_per_actor=MUJOCO_CROSSOVER_ENVS - 1)
    with pytest.warns(SmallMuJoCoPoolWarning, match=rf"envs_per_actor={MUJOCO_CROSSOVER_ENVS - 1}.*"
                                                    rf"--envs-per-actor to {MUJOCO_CROSSOVER_ENVS}"):
        assert protocol(HOPPER, few)["env_backend"] == "envpool"
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallMuJoCoPoolWarning)
        protocol(HOPPER, config(env_backend="envpool", envs_per_actor=MUJOCO_CROSSOVER_ENVS))
        protocol(BREAKOUT, config(env_backend="envpool", envs_per_actor=1))
        protocol(HOPPER, config(envs_per_actor=1))


def test_envpool_returns_the_emulators_raw_screens_at_frame_skip_1():
    """What the refusal of DT's frame order rests on (evaluation/envpool_envs.py): EnvPool has no resize-first
    option, but at frame_skip=1 and 210x160 it hands out ALE's raw gray screens, the same as ale-py's."""
    import ale_py
    import envpool
    import gymnasium as gym

    pool = envpool.make("Breakout-v5", env_type="gymnasium", num_envs=1, batch_size=1, num_threads=1, frame_skip=1,
                        noop_max=1, use_fire_reset=False, img_height=210, img_width=160, stack_num=1)
    gym.register_envs(ale_py)
    env = gym.make("ALE/Breakout-v5", frameskip=1, repeat_action_probability=0.0, obs_type="grayscale")
    obs, _ = pool.reset()
    env.reset(seed=0)
    screen = env.step(0)[0]  # EnvPool's reset takes one no-op frame
    np.testing.assert_array_equal(obs[0, 0], screen)
    for action in [1] + [2, 3] * 20:
        obs = pool.step(np.array([action]))[0]
        screen = env.step(action)[0]
        np.testing.assert_array_equal(obs[0, 0], screen)
    with pytest.raises(ValueError, match="Atari and MuJoCo"):
        make_batch({"kind": "gymnasium", "id": "CartPole-v1"}, config(env_backend="envpool"), None, 1)
    with pytest.raises(ValueError, match="--record"):
        make_batch(BREAKOUT, config(env_backend="envpool"), None, 1, render=True)


@pytest.mark.parametrize("backend, runs", [("gymnasium", (1, 2)), ("envpool", (1, 1))])
def test_evaluation_cli_records_its_backend_without_ray_constructor_warnings(tmp_path, backend, runs):
    """gymnasium: 1 vs 2 actors give the same episodes. EnvPool: one actor's pool, reused for its second group,
    gives the same episodes for the same seed on a second run (with several actors an episode's initial noise
    depends on which groups its actor ran before: docs/evaluation.md), and says at start-up that 2 envs per actor is
    below its MuJoCo crossover. The output never shows Ray's error line about actor constructor arguments in the
    object store (the payload travels by reference with each group)."""
    from test_eval_policy import make_export

    export = make_export(tmp_path)
    results = {}
    for run, actors in enumerate(runs):
        output = tmp_path / f"results-{backend}-{run}.json"
        done = subprocess.run([sys.executable, "-m", "evaluation.evaluate", "--checkpoint", str(export), "--episodes",
                               "4", "--actors", str(actors), "--envs-per-actor", "2", "--targets", "3600", "--set",
                               f"env_backend={backend}", "--set", "max_episode_steps=60", "--output", str(output),
                               "--max-restarts", "2"],
                              cwd=REPO, capture_output=True, text=True, timeout=300,
                              env=os.environ | {"PYTHONPATH": REPO})
        assert done.returncode == 0, done.stderr[-2000:]
        assert "constructor arguments in the object store" not in done.stdout + done.stderr
        assert ("SmallMuJoCoPoolWarning" in done.stderr) == (backend == "envpool")  # 2 envs per actor on Hopper
        results[run] = json.loads(output.read_text())
        assert results[run]["protocol"]["env_backend"] == backend
        assert results[run]["eval"]["env_backend"] == backend
    assert [(e["return"], e["length"]) for e in results[0]["episodes"]] == \
        [(e["return"], e["length"]) for e in results[1]["episodes"]]


def test_evaluation_cli_refuses_envpool_switches_before_ray_starts(monkeypatch, capsys):
    """DT's frame order and no-op range on EnvPool stop the command at start-up with the key, the value and the
    backend that runs them; Ray is never started."""
    from evaluation import evaluate

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(evaluate, "start_ray", no_ray)
    for setting, message in ((["frame_processing=dt"], "eval.frame_processing=dt"),
                             (["noop_min=0", "noop_max=29"], "eval.noop_min=0")):
        sets = [a for kv in ["env_backend=envpool", *setting] for a in ("--set", kv)]
        with pytest.raises(SystemExit, match=rf"{message}.*eval.env_backend=gymnasium"):
            evaluate.main(["--random-env", "breakout", "--episodes", "1", *sets])


def test_one_pool_per_ray_actor_across_groups(tmp_path):
    """Two real Ray actors (EnvPool inside, 2 envs each) run five groups of a deterministic Breakout protocol
    (one no-op frame, no sticky actions): each actor makes one pool and reuses it for every group it runs, and every
    episode equals the gymnasium reference's for its seed, whichever actor ran it."""
    import ray

    from evaluation.actors import ActorFleet, run_groups
    from evaluation.evaluate import start_ray
    from evaluation.policy import random_payload
    from evaluation.rollout import groups_of

    cfg = config(env_backend="envpool", noop_max=1, max_episode_frames=1200)
    tasks = make_tasks([90.0], 10, 3)
    start_ray(num_cpus=2)
    try:
        fleet = ActorFleet(random_payload(BREAKOUT), OmegaConf.to_container(cfg), 2, 2, "recurrent", True)
        episodes = run_groups(fleet, groups_of(tasks, 2))
        stats = ray.get([a.env_stats.remote() for a in fleet.actors])
        fleet.shutdown()
    finally:
        ray.shutdown()
    assert [s["pools_made"] for s in stats] == [1, 1], stats
    assert len({e["pid"] for e in episodes}) == 2  # both actors ran groups
    reference = make_batch(BREAKOUT, config(noop_max=1, max_episode_frames=1200), None, 2)
    expected = [(r["return"], r["length"]) for g in groups_of(tasks, 2)
                for r in run_group(reference, RandomPolicy(reference.action_space), g)]
    assert [(e["return"], e["length"]) for e in episodes] == expected
