"""Ray rollout actors and the scheduler that hands episode groups out to them.

Each ``RolloutActor`` owns a batch of ``envs_per_actor`` envs (evaluation/batch.py, ``eval.env_backend``) and one
policy rebuilt from a payload that the driver stored once with ``ray.put``. The payload's reference travels with
every ``run`` call, never in the constructor's arguments: an actor fetches and builds the policy on its first call,
and an actor that Ray restarts (``max_restarts``) does the same on the call it re-runs (``max_task_retries``), so a
restart never depends on constructor arguments kept in the object store. ``run_groups`` hands groups out
dynamically with ``ray.wait``; if a group still fails (retries spent, actor gone), it replaces the actor and queues
the group again, so every episode is returned exactly once.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Callable, Optional

import ray

from evaluation.rollout import EpisodeTask, run_group


BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


class KillOnce:
    """Test hook: SIGKILLs the worker process at ``step`` of its first group, once per ``marker`` file."""

    def __init__(self, marker: str, step: int = 5):
        self.marker, self.step = marker, step

    def __call__(self, step: int) -> None:
        if step == self.step:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)


def actor_setting(payload: dict) -> dict:
    """What an actor needs to build its envs: the payload without its weights (a few kB, passed inline)."""
    return {k: v for k, v in payload.items() if k != "state_dict"}


class RolloutWorker:
    """Owns a batch of envs and a policy copy; runs one group of episodes per call. Wrapped by ``ray.remote`` below.

    ``setting`` is ``actor_setting(payload)``; the policy is built from the payload itself on the first ``run``."""

    def __init__(self, setting: dict, eval_cfg: dict, n_envs: int, mode: str, sample: bool, render: bool = False,
                 fault_hook: Optional[Callable[[int], None]] = None, threads: int = 1):
        import torch
        from omegaconf import OmegaConf

        from evaluation.batch import make_batch
        from evaluation.envs import headless_gl
        from mambadm.config import EvalConfig

        torch.set_num_threads(threads)
        if render:
            headless_gl()
        self.cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), eval_cfg)
        info = setting["dataset_info"]
        atari = info["eval_env"]["kind"] == "atari"
        frame_stack = int(setting.get("spec", {}).get("obs_shape", [4])[0]) if atari else 1
        self.envs = make_batch(info["eval_env"], self.cfg, info, n_envs, frame_stack=frame_stack, render=render)
        self.mode, self.sample = mode, sample
        self.policy = None  # built from the payload on the first run (after a restart too)
        self.fault_hook = fault_hook

    def load(self, payload: dict) -> None:
        from evaluation.policy import build_policy

        self.policy = build_policy(payload, self.envs.action_space, mode=self.mode, sample=self.sample,
                                   device=self.cfg.device)

    def where(self) -> dict:
        """This worker's pid, node and the node's custom resources (how a cluster's nodes are told apart)."""
        if not hasattr(self, "_where"):
            node_id = ray.get_runtime_context().get_node_id()
            resources = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id), {})
            custom = sorted(k for k in resources if k not in BUILTIN_RESOURCES and not k.startswith("node:")
                            and not k.startswith("accelerator_type:"))
            self._where = {"pid": os.getpid(), "node_id": node_id, "node_ip": ray.util.get_node_ip_address(),
                           "node_resources": custom}
        return self._where

    def env_stats(self) -> dict:
        """The env batch's backend and, for EnvPool, how many pools this actor has made (one per actor)."""
        return {"env_backend": str(self.cfg.env_backend), "pools_made": getattr(self.envs, "pools_made", None)}

    def run(self, tasks: list[EpisodeTask], payload_box: list) -> list[dict]:
        """``payload_box``: ``[payload_ref]`` (nested, so Ray hands the reference over unresolved and the payload is
        fetched once per actor process), or ``[payload]`` in-process."""
        if self.policy is None:
            payload = payload_box[0]
            self.load(ray.get(payload) if isinstance(payload, ray.ObjectRef) else payload)
        results = run_group(self.envs, self.policy, tasks, self.fault_hook)
        place = self.where()
        return [r | place for r in results]


RolloutActor = ray.remote(RolloutWorker)


class ActorFleet:
    """Creates, tracks and replaces rollout actors. ``payload`` is stored once (``ray.put``); its reference goes
    with every group handed out (``payload_box``), the actors' constructors get only ``actor_setting(payload)``."""

    def __init__(self, payload: dict, eval_cfg: dict, n_actors: int, envs_per_actor: int, mode: str,
                 sample: bool, render: bool = False, max_restarts: int = 2, max_task_retries: int = 2,
                 num_cpus: float = 1, resources: Optional[dict] = None, fault_hook: Optional[Any] = None):
        self.payload_box = [ray.put(payload)]  # the only copy of the weights, for every actor and restart
        self.args = (actor_setting(payload), eval_cfg, envs_per_actor, mode, sample, render, fault_hook)
        self.options = {"max_restarts": max_restarts, "max_task_retries": max_task_retries, "num_cpus": num_cpus}
        if resources:
            self.options["resources"] = dict(resources)
        self.actors = [self._new() for _ in range(n_actors)]
        self.replaced = 0

    def _new(self):
        return RolloutActor.options(**self.options).remote(*self.args)

    def replace(self, actor) -> Any:
        i = self.actors.index(actor)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already dead
            pass
        self.actors[i] = self._new()
        self.replaced += 1
        return self.actors[i]

    def where(self) -> list[dict]:
        return ray.get([a.where.remote() for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)


def run_groups(fleet: ActorFleet, groups: list[list[EpisodeTask]], on_done: Optional[Callable[[list[dict]], None]] = None,
               max_requeues: int = 3) -> list[dict]:
    """Runs every group on the fleet, handing a group to whichever actor is free; returns all episode results."""
    queue = list(range(len(groups)))
    requeues = [0] * len(groups)
    idle = list(fleet.actors)
    running: dict[ray.ObjectRef, tuple[Any, int]] = {}
    done: dict[int, list[dict]] = {}
    while queue or running:
        while queue and idle:
            actor, g = idle.pop(), queue.pop(0)
            running[actor.run.remote(groups[g], fleet.payload_box)] = (actor, g)
        ready, _ = ray.wait(list(running), num_returns=1)
        actor, g = running.pop(ready[0])
        try:
            results = ray.get(ready[0])
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            requeues[g] += 1
            if requeues[g] > max_requeues:
                raise RuntimeError(f"episode group {g} failed {requeues[g]} times; last error: {e}") from e
            queue.insert(0, g)
            idle.append(fleet.replace(actor))
            continue
        if g in done:
            raise RuntimeError(f"episode group {g} returned twice")
        done[g] = results
        idle.append(actor)
        if on_done is not None:
            on_done(results)
    return [r for g in range(len(groups)) for r in done[g]]
