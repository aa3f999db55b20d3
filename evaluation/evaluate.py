"""Evaluate an exported policy in its real environment with Ray rollout actors.

    python -m evaluation.evaluate --checkpoint RUN/export [--episodes N --actors M --envs-per-actor E
        --targets T [T ...] --mode {recurrent,window} --greedy --record --output results.json --address auto]
    ray submit cluster/eval.yaml evaluation/evaluate.py -- --checkpoint RUN/export --address auto ...

Without ``--address`` an embedded local Ray is started (``--num-cpus``, default = actors); ``--address auto`` joins a
running cluster. ``--random-env NAME`` evaluates a uniform random policy instead of a checkpoint. Protocol fields of
the export's ``eval`` config can be overridden with ``--set key=value`` (e.g. ``--set repeat_action_probability=0.25``).
Writes results.json (per episode and per target, with the protocol and seeds), prints a Markdown table; with
``--record`` a GIF of the first episode of each target is written next to results.json.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PYTHON_FILE = "~/.mambadm-python"  # written by cluster/eval.yaml's setup: the project's interpreter on that node


def _reexec_under_project_python() -> None:
    """``ray submit`` runs ``python ~/evaluate.py`` in a login shell whose ``python`` is not the project's venv:
    re-run this file under the interpreter that the cluster's setup recorded in ``~/.mambadm-python``."""
    if importlib.util.find_spec("ray") and importlib.util.find_spec("evaluation"):
        return
    marker = Path(os.environ.get("MAMBADM_PYTHON_FILE", PYTHON_FILE)).expanduser()
    if marker.is_file() and not os.environ.get("MAMBADM_REEXEC"):  # the variable guards against a loop
        python = marker.read_text().strip()
        os.environ["MAMBADM_REEXEC"] = "1"
        os.execv(python, [python, os.path.abspath(__file__), *sys.argv[1:]])
    sys.exit(f"evaluate.py: {sys.executable} cannot import the project (ray, evaluation); run it with the project's "
             f"venv python, or write that interpreter's path into {marker}")


if __name__ == "__main__":
    _reexec_under_project_python()

import argparse  # noqa: E402
import json  # noqa: E402
import secrets  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import ray  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data_pipeline.atomic import atomic_write_bytes, atomic_write_json  # noqa: E402
from data_pipeline.sources.mujoco_tasks import TASKS  # noqa: E402
from evaluation.actors import ActorFleet, run_groups  # noqa: E402
from evaluation.envs import protocol  # noqa: E402
from evaluation.policy import acting_mode  # noqa: E402
from evaluation.results import markdown_table, summarize  # noqa: E402
from evaluation.rollout import groups_of, make_tasks  # noqa: E402
from evaluation.scores import default_targets, env_name  # noqa: E402
from mambadm.config import CHOICES, EvalConfig, from_yaml_text  # noqa: E402

RANDOM_ENVS = {**{game.lower(): {"kind": "atari", "game": game} for game in ("Breakout", "Pong", "Qbert", "Seaquest")},
               **{task: {"kind": "mujoco", "task": task} for task in TASKS}}


def start_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Joins ``address`` (e.g. ``auto``), or starts an embedded local Ray with ``num_cpus``.

    Ray ≥ 2.52 turns token authentication on for a new local cluster and writes a token into ~/.ray when none
    exists. The embedded cluster keeps authentication on; when no token is configured anywhere, it uses a fresh
    per-run token passed to its own processes through the environment instead of writing one into the home folder.
    """
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        return
    if os.environ.get("RAY_AUTH_MODE", "token").lower() == "token":  # unset: Ray turns token mode on itself
        has_token = (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                     or (Path.home() / ".ray" / "auth_token").is_file())
        if not has_token:
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             configure_logging=True)


def eval_env_of(dataset_info: dict, spec: Optional[dict] = None) -> dict:
    """The export's ``eval_env``; older exports without one are recognised from ``env``."""
    if dataset_info.get("eval_env"):
        return dict(dataset_info["eval_env"])
    name = str(dataset_info.get("env", ""))
    from data_pipeline.sources.mujoco_tasks import task_from_name

    task = task_from_name(name)
    if task is not None and (spec is None or spec.get("obs_kind") == "vector"):
        return {"kind": "mujoco", "task": task}
    game = name.split("/")[-1].split("-")[0]
    if not game:
        raise ValueError("dataset info has neither 'eval_env' nor 'env': cannot tell which env to evaluate in")
    return {"kind": "atari", "game": game[:1].upper() + game[1:]}


def evaluate(payload: dict, cfg: Any, *, checkpoint: str = "", record_dir: Optional[str | Path] = None,
             max_restarts: int = 2, max_task_retries: int = 2, actor_resources: Optional[dict] = None,
             actor_cpus: float = 1, fault_hook: Optional[Callable[[int], None]] = None, progress: bool = True) -> dict:
    """Runs ``cfg.episodes`` episodes per target on ``cfg.actors`` actors (Ray must be initialised); returns the
    results dict written to results.json. ``cfg`` is an ``EvalConfig``."""
    eval_env = eval_env_of(payload["dataset_info"], payload.get("spec"))
    payload = payload | {"dataset_info": payload["dataset_info"] | {"eval_env": eval_env}}
    targets = [float(t) for t in cfg.targets] or default_targets(eval_env)
    if cfg.episodes < 1 or cfg.actors < 1 or cfg.envs_per_actor < 1:
        raise ValueError(f"episodes, actors and envs_per_actor must be >= 1, got {cfg.episodes}, {cfg.actors}, "
                         f"{cfg.envs_per_actor}")
    frame_stack = int(payload.get("spec", {}).get("obs_shape", [4])[0])
    protocol(eval_env, cfg, frame_stack)  # refuses what the backend cannot run, before any actor starts
    record = record_dir is not None
    tasks = make_tasks(targets, int(cfg.episodes), int(cfg.seed), record=record)
    groups = groups_of(tasks, int(cfg.envs_per_actor))
    eval_dict = OmegaConf.to_container(cfg, resolve=True)
    started = time.time()
    n_envs = max(len(g) for g in groups)  # fewer episodes than envs_per_actor: no envs (ROM loads) left unused
    fleet = ActorFleet(payload, eval_dict, min(int(cfg.actors), len(groups)), n_envs,
                       str(cfg.mode), bool(cfg.sample), render=record, max_restarts=max_restarts,
                       max_task_retries=max_task_retries, num_cpus=actor_cpus, resources=actor_resources,
                       fault_hook=fault_hook)
    try:
        with tqdm(total=len(tasks), unit="episode", desc=f"eval {env_name(eval_env)}", disable=not progress,
                  file=sys.stderr) as bar:
            episodes = run_groups(fleet, groups, on_done=lambda res: bar.update(len(res)))
    finally:
        fleet.shutdown()
    for e in episodes:
        gif = e.pop("gif", None)
        if gif is not None:
            path = Path(record_dir) / f"{env_name(eval_env)}-target{e['target']:g}-episode{e['index']}.gif"
            atomic_write_bytes(path, gif)
            e["gif"] = str(path)
    mode = acting_mode(from_yaml_text(payload["config"]).model.family, cfg.mode) if payload["kind"] == "model" else "-"
    return {
        "checkpoint": checkpoint, "policy": payload["kind"], "env": eval_env,
        "protocol": protocol(eval_env, cfg, frame_stack) | {"mode": mode, "sample": bool(cfg.sample)},
        "eval": eval_dict, "targets": summarize(episodes, targets, eval_env), "episodes": episodes,
        "seeds": {"eval_seed": int(cfg.seed), "episode_seed": "SeedSequence([eval_seed, crc32(target), index])"},
        "actors_replaced": fleet.replaced, "wall_seconds": time.time() - started,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def build_config(base: Any, args: argparse.Namespace) -> Any:
    """The export's eval config, then ``--set`` overrides, then the explicit flags."""
    cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), base or {})
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.set))
    except Exception as e:
        raise SystemExit(f"evaluate: bad --set {args.set}: {e}")
    for key in ("episodes", "actors", "envs_per_actor", "mode", "seed"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.targets:
        cfg.targets = [float(t) for t in args.targets]
    if args.greedy:
        cfg.sample = False
    if cfg.episodes < 1 or cfg.actors < 1 or cfg.envs_per_actor < 1:
        raise SystemExit(f"evaluate: episodes, actors and envs_per_actor must be >= 1, got {cfg.episodes}, "
                         f"{cfg.actors}, {cfg.envs_per_actor}")
    for key in ("mode", "mujoco_version", "frame_padding", "env_backend"):
        allowed = CHOICES[f"eval.{key}"]
        if cfg[key] not in allowed:
            raise SystemExit(f"evaluate: {key} must be one of {list(allowed)}, got '{cfg[key]}'")
    return cfg


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="export directory (model.pt, config.yaml, env_spec.json, dataset.json)")
    src.add_argument("--random-env", choices=sorted(RANDOM_ENVS), help="evaluate a uniform random policy instead")
    p.add_argument("--episodes", type=int, help="episodes per target return (default: the config's eval.episodes)")
    p.add_argument("--actors", type=int, help="Ray rollout actors")
    p.add_argument("--envs-per-actor", dest="envs_per_actor", type=int, help="envs (and batch size) per actor")
    p.add_argument("--targets", type=float, nargs="+", help="target returns (default: the protocol's)")
    p.add_argument("--mode", choices=CHOICES["eval.mode"])
    p.add_argument("--greedy", action="store_true", help="argmax actions instead of sampling from the softmax")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an eval config field")
    p.add_argument("--record", action="store_true", help="save a GIF of one episode per target")
    p.add_argument("--output", default="results.json", help="results file (GIFs go next to it)")
    p.add_argument("--address", help="Ray address to join (e.g. auto); default: start an embedded local Ray")
    p.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray (default: the number of actors)")
    p.add_argument("--max-restarts", type=int, default=2, help="restarts of a dead actor")
    p.add_argument("--max-task-retries", type=int, default=2, help="retries of an interrupted episode group")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.checkpoint:
        from evaluation.policy import payload_from_export

        if not Path(args.checkpoint).is_dir():
            raise SystemExit(f"evaluate: checkpoint directory not found: {args.checkpoint}")
        payload = payload_from_export(args.checkpoint)
        base = from_yaml_text(payload["config"]).eval
    else:
        from evaluation.policy import random_payload

        payload, base = random_payload(RANDOM_ENVS[args.random_env]), None
    cfg = build_config(base, args)
    try:  # a protocol the backend cannot run stops here, before Ray starts
        protocol(eval_env_of(payload["dataset_info"], payload.get("spec")), cfg,
                 int(payload.get("spec", {}).get("obs_shape", [4])[0]))
    except ValueError as e:
        raise SystemExit(f"evaluate: {e}")
    output = Path(args.output)
    start_ray(args.address, args.num_cpus or (None if args.address else max(1, int(cfg.actors))))
    try:
        results = evaluate(payload, cfg, checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else "",
                           record_dir=output.parent if args.record else None, max_restarts=args.max_restarts,
                           max_task_retries=args.max_task_retries, progress=not args.no_progress)
    finally:
        ray.shutdown()
    atomic_write_json(output, results)
    print(markdown_table(results))
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
