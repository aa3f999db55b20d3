"""Which GLoMa fusion (add | gate | concat) learns best: held-out loss after a short training run, side by side.

    python benchmarks/bench_fusion.py [--steps 300] [--seeds 3]

Task (synthetic, continuous control shaped like MuJoCo): states follow s_{t+1} = tanh(M s_t + N a_t) + noise and the
behaviour policy is a_t = tanh(P s_t + Q a_{t-1} + R s_{t-3}) + noise, so predicting a_t needs the current state
(local) and a few steps of history. Each model sees fresh training batches and is scored on a fixed held-out set.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mambadm.config import EnvSpec, ModelConfig
from mambadm.model import build_model

OBS, ACT, K = 11, 3, 20
SPEC = EnvSpec("vector", [OBS], ACT, False, 1000)


def make_task(seed: int):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(*shape, generator=g) / shape[1] ** 0.5
            for shape in ((OBS, OBS), (OBS, ACT), (ACT, OBS), (ACT, ACT), (ACT, OBS))]

    def sample(batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        M, N, P, Q, R = mats
        s = torch.randn(batch, OBS, generator=gen)
        a = torch.zeros(batch, ACT)
        states, actions, history = [], [], [s] * 3
        for _ in range(K):
            a = torch.tanh(s @ P.T + a @ Q.T + history[-3] @ R.T + 0.05 * torch.randn(batch, ACT, generator=gen))
            states.append(s)
            actions.append(a)
            s = torch.tanh(s @ M.T + a @ N.T) + 0.1 * torch.randn(batch, OBS, generator=gen)
            history.append(s)
        start = torch.randint(0, 900, (batch, 1), generator=gen)
        return {"rtg": torch.randn(batch, K, generator=gen), "states": torch.stack(states, 1),
                "actions": torch.stack(actions, 1), "timesteps": start + torch.arange(K),
                "mask": torch.ones(batch, K, dtype=torch.bool)}

    return sample


def run(fusion: str, seed: int, steps: int) -> float:
    torch.manual_seed(seed)
    sample = make_task(1000 + seed)
    held_out = sample(256, torch.Generator().manual_seed(1))
    model = build_model(ModelConfig(family="mambadm", n_layer=2, d_model=32, fusion=fusion, dropout=0.1), SPEC)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(2 + seed)
    for _ in range(steps):
        loss, _ = model.loss(sample(16, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return model.loss(held_out)[1]["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    start = time.perf_counter()
    for seed in range(args.seeds):  # seeds outermost: the fusions share the machine's conditions
        for fusion in ("add", "gate", "concat"):
            results.setdefault(fusion, []).append(run(fusion, seed, args.steps))
    base = statistics.mean(results["add"])
    took = time.perf_counter() - start
    print(f"{args.steps} steps x {args.seeds} seeds, MambaDM 2 layers d=32, batch 16, held-out MSE ({took:.0f} s)\n")
    print("| fusion | held-out MSE per seed | mean | mean / add |")
    print("|---|---|---|---|")
    for fusion, losses in results.items():
        mean = statistics.mean(losses)
        print(f"| {fusion} | {' '.join(f'{x:.4f}' for x in losses)} | {mean:.4f} | {mean / base:.3f} |")


if __name__ == "__main__":
    main()
