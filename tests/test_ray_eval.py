"""Ray evaluation on an embedded local Ray: scheduling independence, the object-store payload, fault recovery."""
import os

import pytest
import ray
import torch
from omegaconf import OmegaConf

from evaluation.actors import KillOnce
from evaluation.evaluate import evaluate, start_ray
from evaluation.policy import payload_from_export, random_payload
from mambadm.config import EnvSpec, EvalConfig, load_config
from mambadm.export import save_export
from mambadm.model import build_model

HOPPER = {"kind": "mujoco", "task": "hopper"}


@pytest.fixture(scope="module")
def local_ray():
    start_ray(num_cpus=2)
    yield
    ray.shutdown()


def cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(EvalConfig), {"episodes": 4, "targets": [3600.0, 1800.0]} | kw)


def outcome(results):
    return sorted((e["target"], e["index"], e["seed"], e["return"], e["length"]) for e in results["episodes"])


def model_payload(tmp_path):
    """An export of an untrained MambaDM for Hopper, as the evaluation ships it."""
    torch.manual_seed(0)
    run = load_config(overrides=["model.n_layer=1", "model.d_model=32", "data.rtg_scale=1000"])
    spec = EnvSpec("vector", [11], 3, False, 1000)
    info = {"env": "hopper-medium-v2", "eval_env": HOPPER, "state_mean": [0.0] * 11, "state_std": [1.0] * 11}
    return payload_from_export(save_export(tmp_path / "export", build_model(run.model, spec), run, spec, info))


def test_results_do_not_depend_on_the_number_of_actors(local_ray, tmp_path):
    payload = model_payload(tmp_path)
    one = evaluate(payload, cfg(actors=1, sample=False), progress=False)
    two = evaluate(payload, cfg(actors=2, sample=False), progress=False)
    assert len(one["episodes"]) == 8 and outcome(one) == outcome(two)
    assert len({e["pid"] for e in two["episodes"]}) == 2  # both actors ran episodes
    assert [r["episodes"] for r in two["targets"]] == [4, 4]
    assert two["protocol"]["env_id"] == "Hopper-v5" and two["protocol"]["mode"] == "recurrent"
    assert two["policy"] == "model" and two["seeds"]["eval_seed"] == 0


def test_killed_actor_is_restarted_and_every_episode_runs_once(local_ray, tmp_path):
    marker = tmp_path / "killed"
    clean = evaluate(random_payload(HOPPER), cfg(actors=2, envs_per_actor=2), progress=False)
    faulty = evaluate(random_payload(HOPPER), cfg(actors=2, envs_per_actor=2), progress=False,
                      fault_hook=KillOnce(str(marker), step=3))
    killed_pid = int(marker.read_text())  # the hook really killed a worker process (SIGKILL, mid-episode)
    with pytest.raises(ProcessLookupError):
        os.kill(killed_pid, 0)
    keys = [(e["target"], e["index"]) for e in faulty["episodes"]]
    assert len(keys) == len(set(keys)) == 8
    assert outcome(faulty) == outcome(clean)
    assert killed_pid not in {e["pid"] for e in faulty["episodes"]}


def test_groups_are_rerun_on_a_fresh_actor_when_restarts_are_spent(local_ray, tmp_path):
    marker = tmp_path / "killed"
    res = evaluate(random_payload(HOPPER), cfg(actors=1, episodes=2, targets=[3600.0]), progress=False,
                   max_restarts=0, max_task_retries=0, fault_hook=KillOnce(str(marker), step=2))
    assert marker.exists() and res["actors_replaced"] == 1
    assert sorted(e["index"] for e in res["episodes"]) == [0, 1]
