"""Ray rollout actors and the scheduler that hands episode groups out to them.

Each ``RolloutActor`` owns ``envs_per_actor`` envs and one policy rebuilt from a payload that the driver stored once
with ``ray.put``; Ray restarts a dead actor (``max_restarts``) and re-runs its interrupted call (``max_task_retries``)
with the same payload. ``run_groups`` hands groups out dynamically with ``ray.wait``; if a group still fails (retries
spent, actor gone), it replaces the actor and queues the group again, so every episode is returned exactly once.
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


class RolloutWorker:
    """Owns envs and a policy copy; runs one group of episodes per call. Wrapped by ``ray.remote`` below."""

    def __init__(self, payload: dict, eval_cfg: dict, n_envs: int, mode: str, sample: bool, render: bool = False,
                 fault_hook: Optional[Callable[[int], None]] = None, threads: int = 1):
        import torch
        from omegaconf import OmegaConf

        from evaluation.envs import headless_gl, make_env
        from evaluation.policy import build_policy
        from mambadm.config import EvalConfig

        torch.set_num_threads(threads)
        if render:
            headless_gl()
        cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), eval_cfg)
        info = payload["dataset_info"]
        frame_stack = int(payload.get("spec", {}).get("obs_shape", [4])[0]) if info["eval_env"]["kind"] == "atari" else 1
        self.envs = [make_env(info["eval_env"], cfg, info, frame_stack=frame_stack, render=render)
                     for _ in range(n_envs)]
        self.policy = build_policy(payload, self.envs[0].action_space, mode=mode, sample=sample, device=cfg.device)
        self.fault_hook = fault_hook

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

    def run(self, tasks: list[EpisodeTask]) -> list[dict]:
        results = run_group(self.envs, self.policy, tasks, self.fault_hook)
        place = self.where()
        return [r | place for r in results]


RolloutActor = ray.remote(RolloutWorker)


class ActorFleet:
    """Creates, tracks and replaces rollout actors; ``payload_ref`` is the one object-store copy of the policy."""

    def __init__(self, payload_ref: ray.ObjectRef, eval_cfg: dict, n_actors: int, envs_per_actor: int, mode: str,
                 sample: bool, render: bool = False, max_restarts: int = 2, max_task_retries: int = 2,
                 num_cpus: float = 1, resources: Optional[dict] = None, fault_hook: Optional[Any] = None):
        self.args = (payload_ref, eval_cfg, envs_per_actor, mode, sample, render, fault_hook)
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
            running[actor.run.remote(groups[g])] = (actor, g)
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
