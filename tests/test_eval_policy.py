"""Policies rebuilt from real export directories (untrained MambaDM / DT) acting in real envs."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from evaluation.envs import make_env
from evaluation.policy import build_policy, payload_from_export
from evaluation.rollout import make_tasks, run_group
from mambadm.config import EnvSpec, EvalConfig, load_config
from mambadm.export import save_export
from mambadm.model import build_model

REPO = Path(__file__).resolve().parents[1]
HOPPER = {"kind": "mujoco", "task": "hopper"}
BREAKOUT = {"kind": "atari", "game": "Breakout"}


def make_export(tmp_path, family="mambadm", atari=False, name="export"):
    torch.manual_seed(0)
    cfg = load_config(overrides=[f"model.family={family}", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
                                 "data.context_len=8", f"data.rtg_scale={1 if atari else 1000}",
                                 "eval.episodes=2", "eval.actors=2"])
    if atari:
        spec = EnvSpec("atari", [4, 84, 84], 4, True, 4096)
        info = {"env": "Breakout", "eval_env": BREAKOUT, "state_mean": None, "state_std": None}
    else:
        spec = EnvSpec("vector", [11], 3, False, 1000)
        info = {"env": "hopper-medium-v2", "eval_env": HOPPER,
                "state_mean": np.linspace(-0.5, 0.5, 11).tolist(), "state_std": np.linspace(0.5, 2, 11).tolist()}
    model = build_model(cfg.model, spec)
    return save_export(tmp_path / name, model, cfg, spec, info)


def eval_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(EvalConfig), kw)


def test_payload_rebuilds_the_exported_weights(tmp_path):
    export = make_export(tmp_path)
    payload = payload_from_export(export)
    env = make_env(HOPPER, eval_cfg(), payload["dataset_info"])
    policy = build_policy(payload, env.action_space)
    saved = torch.load(export / "model.pt", weights_only=True)
    assert all(torch.equal(policy.model.state_dict()[k], v) for k, v in saved.items())
    assert policy.rtg_scale == 1000.0 and policy.mode == "recurrent"


def test_return_to_go_is_decremented_by_raw_rewards(tmp_path):
    payload = payload_from_export(make_export(tmp_path))
    env = make_env(HOPPER, eval_cfg(), payload["dataset_info"])
    policy = build_policy(payload, env.action_space, sample=False)
    obs, _ = env.reset(seed=0)
    policy.start([3600.0], [0])
    total = 0.0
    for _ in range(5):
        action = policy.act(obs[None])
        assert action.shape == (1, 3) and np.all(np.abs(action) <= 1)
        obs, r, terminated, truncated, _ = env.step(action[0])
        policy.observe(np.array([r]))
        total += r
        if terminated or truncated:
            break
    assert policy.rtg[0] == pytest.approx(3600.0 - total) and int(policy.t[0]) == 5


@pytest.mark.parametrize("family,mode", [("mambadm", "recurrent"), ("mambadm", "window"), ("dt", "recurrent")])
def test_atari_policy_runs_a_group_of_real_episodes(tmp_path, family, mode):
    payload = payload_from_export(make_export(tmp_path, family=family, atari=True))
    cfg = eval_cfg(max_episode_frames=320)
    envs = [make_env(BREAKOUT, cfg, payload["dataset_info"]) for _ in range(2)]
    policy = build_policy(payload, envs[0].action_space, mode=mode, sample=True)
    assert policy.mode == ("window" if family == "dt" else mode)
    first = run_group(envs, policy, make_tasks([90.0], 2, eval_seed=0))
    again = run_group(envs, policy, make_tasks([90.0], 2, eval_seed=0))
    assert [(r["return"], r["length"]) for r in first] == [(r["return"], r["length"]) for r in again]
    assert all(r["length"] > 0 and r["end"] for r in first)


def test_act_dim_mismatch_is_reported(tmp_path):
    payload = payload_from_export(make_export(tmp_path, atari=True))
    env = make_env({"kind": "atari", "game": "Pong"}, eval_cfg())
    with pytest.raises(ValueError, match="act_dim 4"):
        build_policy(payload, env.action_space)


@pytest.mark.slow
def test_cli_evaluates_an_export_with_ray(tmp_path):
    export = make_export(tmp_path)
    out = tmp_path / "eval" / "results.json"
    proc = subprocess.run([sys.executable, "-m", "evaluation.evaluate", "--checkpoint", str(export), "--episodes", "2",
                           "--actors", "2", "--targets", "3600", "1800", "--record", "--output", str(out),
                           "--set", "max_episode_steps=50"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["checkpoint"] == str(export.resolve()) and res["protocol"]["max_episode_steps"] == 50
    assert [r["target"] for r in res["targets"]] == [3600.0, 1800.0]
    assert len(res["episodes"]) == 4 and all(e["length"] <= 50 for e in res["episodes"])
    assert res["targets"][0]["normalized_mean"] is not None
    assert "| hopper | 3600 | 2 |" in proc.stdout
    gifs = [e["gif"] for e in res["episodes"] if e.get("gif")]
    assert len(gifs) == 2 and all(Path(g).stat().st_size > 1000 for g in gifs)
    bad = subprocess.run([sys.executable, "-m", "evaluation.evaluate", "--checkpoint", str(tmp_path / "nope")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not found" in bad.stderr
