"""Policies that act in batches of envs: a model rebuilt from an export, or uniform random actions.

A policy is shipped to Ray actors as a *payload*: a plain dict (state dict, resolved config YAML, env spec, dataset
info) that ``ray.put`` stores once; ``build_policy(payload, ...)`` rebuilds it on the worker, so a worker never needs
the export directory itself.

Acting protocol for one group of episodes run in lockstep (``start`` → repeated ``act`` / ``observe``):
return-to-go starts at the target, is decremented by each observed *raw* reward, and is divided by
``data.rtg_scale`` when fed to the model; timesteps count agent decisions from 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import gymnasium as gym
import numpy as np
import torch


def payload_from_export(export_dir: str | Path) -> dict:
    """Everything a worker needs to rebuild the policy of an export directory, as plain picklable data."""
    from mambadm.config import to_yaml
    from mambadm.export import load_export

    model, cfg, spec, dataset_info = load_export(export_dir)
    return {"kind": "model", "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": to_yaml(cfg), "spec": spec.to_dict(), "dataset_info": dict(dataset_info),
            "source": str(Path(export_dir).resolve())}


def random_payload(eval_env: dict, dataset_info: Optional[dict] = None) -> dict:
    """A uniform random policy for ``eval_env`` (baselines, smoke tests, benchmarks)."""
    info = {"eval_env": dict(eval_env)} | dict(dataset_info or {})
    return {"kind": "random", "dataset_info": info, "source": "random"}


class RandomPolicy:
    """Uniform random actions from each slot's own generator (reproducible per episode seed)."""

    def __init__(self, action_space: gym.Space):
        self.space = action_space

    def start(self, targets: Sequence[float], seeds: Sequence[int]) -> None:
        self.rngs = [np.random.default_rng([int(s), 1]) for s in seeds]

    def act(self, obs: np.ndarray) -> np.ndarray:
        if isinstance(self.space, gym.spaces.Discrete):
            return np.array([r.integers(self.space.n) for r in self.rngs], np.int64)
        low, high = self.space.low, self.space.high
        return np.stack([r.uniform(low, high) for r in self.rngs]).astype(np.float32)

    def observe(self, rewards: np.ndarray) -> None:
        pass


def acting_mode(family: str, requested: str) -> str:
    """The Decision Transformer has no recurrent form: it always re-runs its window."""
    return "window" if family == "dt" else requested


class ModelPolicy:
    """A MambaDM / Decision Transformer acting through ``model.init_state`` / ``model.act``."""

    def __init__(self, model: torch.nn.Module, cfg: Any, spec: dict, action_space: gym.Space, mode: str = "recurrent",
                 sample: bool = True, device: str = "cpu", reencode: bool = False):
        self.model = model.to(device).eval()
        self.cfg, self.spec, self.space, self.device = cfg, spec, action_space, torch.device(device)
        self.mode = acting_mode(cfg.model.family, mode)
        self.sample = sample
        self.reencode = reencode  # window acting: re-encode the whole window each step (the reference DT's way)
        self.rtg_scale = float(cfg.data.rtg_scale)
        self.discrete = bool(spec["discrete"])
        if self.discrete != isinstance(action_space, gym.spaces.Discrete):
            raise ValueError(f"model is {'discrete' if self.discrete else 'continuous'} but the env's action space is "
                             f"{action_space}")
        n_env = action_space.n if self.discrete else action_space.shape[0]
        if int(spec["act_dim"]) != int(n_env):
            raise ValueError(f"model act_dim {spec['act_dim']} != env action dimension {n_env} ({action_space})")

    def start(self, targets: Sequence[float], seeds: Sequence[int]) -> None:
        n = len(targets)
        self.rtg = np.asarray(targets, np.float64).copy()
        self.t = torch.zeros(n, dtype=torch.long, device=self.device)
        shape = (n,) if self.discrete else (n, int(self.spec["act_dim"]))
        self.prev = torch.zeros(shape, dtype=torch.long if self.discrete else torch.float32, device=self.device)
        self.rngs = [np.random.default_rng([int(s), 2]) for s in seeds]
        self.state = self.model.init_state(n, mode=self.mode, context_len=int(self.cfg.data.context_len),
                                           reencode=self.reencode)

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        rtg = torch.as_tensor(self.rtg / self.rtg_scale, dtype=torch.float32, device=self.device)
        obs_t = torch.as_tensor(obs, device=self.device)
        preds, self.state = self.model.act(self.state, rtg, obs_t, self.prev, self.t)
        preds = preds.float().cpu()
        if self.discrete:
            if self.sample:
                probs = torch.softmax(preds.double(), dim=-1).numpy()
                actions = np.array([min(int(np.searchsorted(np.cumsum(p), r.random(), side="right")), len(p) - 1)
                                    for p, r in zip(probs, self.rngs)], np.int64)
            else:
                actions = preds.argmax(-1).numpy().astype(np.int64)
            self.prev = torch.as_tensor(actions, device=self.device)
        else:
            actions = np.clip(preds.numpy(), self.space.low, self.space.high).astype(np.float32)
            self.prev = torch.as_tensor(actions, device=self.device)
        return actions

    def observe(self, rewards: np.ndarray) -> None:
        self.rtg = self.rtg - np.asarray(rewards, np.float64)
        self.t = self.t + 1


def build_policy(payload: dict, action_space: gym.Space, mode: str = "recurrent", sample: bool = True,
                 device: str = "cpu"):
    """Rebuilds the policy a payload describes, for envs with ``action_space``."""
    if payload["kind"] == "random":
        return RandomPolicy(action_space)
    if payload["kind"] != "model":
        raise ValueError(f"unknown policy payload kind '{payload['kind']}' (expected 'model' or 'random')")
    from mambadm.config import EnvSpec, from_yaml_text
    from mambadm.model import build_model

    cfg = from_yaml_text(payload["config"])
    model = build_model(cfg.model, EnvSpec.from_dict(payload["spec"], "the policy payload's spec"))
    model.load_state_dict(payload["state_dict"])
    return ModelPolicy(model, cfg, payload["spec"], action_space, mode=mode, sample=sample, device=device)
