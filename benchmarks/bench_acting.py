"""Acting latency per action: MambaDM recurrent (O(1) per step) vs the Decision Transformer re-running its last K
steps (as the reference DT code does: re-encoding every frame of the window), at episode steps t in {30, 1000,
10000}. Also DT as this project acts by default, on cached tokens (each call embeds only its new step).

    python benchmarks/bench_acting.py [--steps 20] [--threads 1] [--window] [--python-step]

Atari: 6 layers, d=128, K=30 (the DT Atari setting; DT 8 heads); MuJoCo (hopper spec): 3 layers, d=128, K=20 (the DT
MuJoCo setting). Random weights and inputs: the cost of a step does not depend on their values. To time step t the
models are first stepped through the window before t (DT: K steps; MambaDM: a few), so DT's context is full.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mambadm.config import EnvSpec, ModelConfig
from mambadm.model import build_model
from mambadm.model.recurrent import BlockSteps

SETTINGS = {  # name: (spec, n_layer, n_head, K, envs)
    "atari, 1 env": (EnvSpec(), 6, 8, 30, 1),
    "atari, 16 envs": (EnvSpec(), 6, 8, 30, 16),
    "mujoco, 1 env": (EnvSpec("vector", [11], 3, False, 1000), 3, 1, 20, 1),
}
T_VALUES = (30, 1000, 10000)


def inputs(spec: EnvSpec, envs: int, t: int):
    obs = (torch.randint(0, 256, (envs, *spec.obs_shape), dtype=torch.uint8) if spec.obs_kind == "atari"
           else torch.randn(envs, *spec.obs_shape))
    act = torch.randint(0, spec.act_dim, (envs,)) if spec.discrete else torch.rand(envs, spec.act_dim) * 2 - 1
    return torch.rand(envs), obs, act, torch.full((envs,), t, dtype=torch.long)


def prepared(model, mode: str, spec: EnvSpec, K: int, envs: int, t: int, reencode: bool = False):
    """An acting state that has played the steps just before t (DT: a full window of K; MambaDM: a few). mode
    "python": MambaDM's recurrent state for the readable step (`GLoMaBlock.step`), where `init_state` would pick the
    C++ stack step."""
    if mode == "python":
        state = BlockSteps.of(model.layers, envs, torch.device("cpu"))
    else:
        state = model.init_state(envs, mode=mode, context_len=K, reencode=reencode)
    for s in range(max(0, t - (K if mode == "window" else 3)), t):
        _, state = model.act(state, *inputs(spec, envs, s))
    return state


def ms_per_action(model, state, spec: EnvSpec, envs: int, t: int, steps: int) -> float:
    feeds = [inputs(spec, envs, t + i) for i in range(steps)]
    start = time.perf_counter()
    for feed in feeds:
        _, state = model.act(state, *feed)
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed actions per cell and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--window", action="store_true", help="also time MambaDM mode='window'")
    parser.add_argument("--python-step", action="store_true",
                        help="also time MambaDM's recurrent step through the readable GLoMaBlock.step (no C++ "
                             "stack step)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.rounds} alternating rounds of "
          f"{args.steps} actions; ms per call (one call acts for all envs)\n")
    print("| setting | t | DT (re-encode K steps) ms | MambaDM recurrent ms | DT / recurrent | DT, cached tokens ms "
          "| DT cached / recurrent |" + (" MambaDM window ms |" if args.window else "")
          + (" MambaDM Python step ms | Python step / recurrent |" if args.python_step else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if args.window else "") + ("---|---|" if args.python_step else ""))
    for name, (spec, n_layer, n_head, K, envs) in SETTINGS.items():
        dt = build_model(ModelConfig(family="dt", n_layer=n_layer, d_model=128, n_head=n_head), spec)
        models = {"dt": (dt, "window"), "dt_cached": (dt, "window")}
        mdm = build_model(ModelConfig(family="mambadm", n_layer=n_layer, d_model=128), spec)
        models["recurrent"] = (mdm, "recurrent")
        if args.window:
            models["window"] = (mdm, "window")
        if args.python_step:
            models["python"] = (mdm, "python")
        for model, _ in models.values():
            model.eval()
        for t in T_VALUES:
            states = {k: prepared(m, mode, spec, K, envs, t, reencode=k == "dt") for k, (m, mode) in models.items()}
            times = {k: [] for k in models}
            for _ in range(args.rounds):
                for k, (m, _) in models.items():
                    times[k].append(ms_per_action(m, states[k], spec, envs, t, args.steps))
            med = {k: statistics.median(v) for k, v in times.items()}
            row = (f"| {name} | {t} | {med['dt']:.2f} | {med['recurrent']:.2f} | {med['dt'] / med['recurrent']:.1f}x "
                   f"| {med['dt_cached']:.2f} | {med['dt_cached'] / med['recurrent']:.1f}x |")
            row += f" {med['window']:.2f} |" if args.window else ""
            row += f" {med['python']:.2f} | {med['python'] / med['recurrent']:.1f}x |" if args.python_step else ""
            print(row, flush=True)


if __name__ == "__main__":
    main()
