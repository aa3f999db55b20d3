"""configs/paper/*.yaml: every file loads, holds the reference's settings, and dry-runs: the model, optimiser and
schedule it describes take one update on a batch of its shape, and its evaluation env resets and steps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.envs import make_env
from mambadm.config import EnvSpec, load_config
from mambadm.model import build_model
from mambadm.optim import make_optimizer, make_scheduler

REPO = Path(__file__).resolve().parents[1]
PAPER = sorted((REPO / "configs" / "paper").glob("*.yaml"))
MUJOCO = {"hopper": (11, 3), "halfcheetah": (17, 6), "walker2d": (17, 6)}


def eval_env_of(path: Path) -> dict:
    name = path.stem.split("-", 1)[1]
    task = name.split("-")[0]
    if task in MUJOCO:
        return {"kind": "mujoco", "task": task}
    return {"kind": "atari", "game": {"qbert": "Qbert"}.get(task, task.capitalize())}


def spec_of(eval_env: dict, frame_stack: int) -> EnvSpec:
    if eval_env["kind"] == "atari":
        return EnvSpec("atari", [frame_stack, 84, 84], 6, True, 3000)
    obs_dim, act_dim = MUJOCO[eval_env["task"]]
    return EnvSpec("vector", [obs_dim], act_dim, False, 1000)


def batch_of(spec: EnvSpec, k: int, b: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if spec.discrete:
        states = torch.randint(0, 256, (b, k, *spec.obs_shape), generator=g, dtype=torch.uint8)
        actions = torch.randint(0, spec.act_dim, (b, k), generator=g)
    else:
        states = torch.randn(b, k, *spec.obs_shape, generator=g)
        actions = torch.rand(b, k, spec.act_dim, generator=g) * 2 - 1
    return {"rtg": torch.rand(b, k, generator=g), "states": states, "actions": actions,
            "timesteps": torch.arange(k).repeat(b, 1) + 17, "mask": torch.ones(b, k, dtype=torch.bool)}


def test_every_method_and_dataset_has_a_paper_config():
    names = {p.stem for p in PAPER}
    for family in ("dt", "mambadm"):
        for game in ("breakout", "pong", "qbert", "seaquest"):
            assert f"{family}-{game}" in names
        for task in MUJOCO:
            for dataset in ("medium", "medium-replay", "medium-expert"):
                assert f"{family}-{task}-{dataset}" in names


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_config_loads_and_dry_runs(path):
    cfg = load_config(path)
    eval_env = eval_env_of(path)
    assert cfg.model.family == path.stem.split("-")[0]
    if eval_env["kind"] == "atari":  # DT's Atari protocol (run.sh, run_dt_atari.py, trainer_atari.py)
        pong = eval_env["game"] == "Pong"
        assert (cfg.data.context_len, cfg.data.batch_size) == ((50, 512) if pong else (30, 128))
        assert cfg.optim.schedule == "dt_tokens" and cfg.optim.min_lr_ratio == 0.1
        assert (cfg.eval.noop_min, cfg.eval.noop_max, cfg.eval.frame_processing) == (0, 29, "dt")
        assert "-dt" in cfg.data.shards  # shards of DT's data selection
        if cfg.model.family == "dt":
            assert cfg.model.timestep_encoding == "dt_global" and not cfg.model.token_norm
            assert cfg.model.position_tokens == 3 * cfg.data.context_len + 1
    else:  # DT's gym protocol (experiment.py)
        assert (cfg.data.context_len, cfg.data.batch_size, cfg.eval.episodes) == (20, 64, 100)
        assert cfg.eval.mujoco_version == "v4" and cfg.optim.decay == "all"
        if cfg.model.family == "dt":
            assert (cfg.model.n_head, cfg.model.activation, cfg.model.n_layer) == (1, "relu", 3)

    spec = spec_of(eval_env, cfg.data.frame_stack)
    torch.manual_seed(0)
    model = build_model(cfg.model, spec)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.steps)
    before = [p.detach().clone() for p in model.parameters()]
    loss, stats = model.loss(batch_of(spec, cfg.data.context_len))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    scheduler.step()
    assert np.isfinite(stats["loss"]) and any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))

    env = make_env(eval_env, cfg.eval, frame_stack=cfg.data.frame_stack)
    obs, _ = env.reset(seed=0)
    assert tuple(np.asarray(obs).shape) == tuple(spec.obs_shape)
    env.step(env.action_space.sample())
    env.close()
