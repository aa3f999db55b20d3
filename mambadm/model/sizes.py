"""Exact parameter counts of the size presets (configs/model/<family>-<size>.yaml).

    python -m mambadm.model.sizes [--spec atari|mujoco] [--family mambadm|dt] [--context-len K]

Models are built on the meta device (no memory, no init time) and counted with sum(p.numel()). "embedding" is the
token embedding module (return-to-go, state encoder, action, timestep tables); "non-embedding" is the rest.

The ladder xs .. xxl (28M at most) serves the grids; 100m, 300m and 1b are the large presets whose names state their
nominal size (`nominal_params`): each family's total lies in NOMINAL_BAND times it on both specs, and the pairs are
matched as the small ones are (tests/test_model_presets.py).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from mambadm.config import CONFIGS_DIR, EnvSpec, load_config
from mambadm.model import FAMILIES, build_model

SIZES = ("xs", "s", "m", "l", "xl", "xxl", "100m", "300m", "1b")
NOMINAL_BAND = (0.9, 1.25)  # a named size's presets hold 0.9x to 1.25x the parameters their name says (both specs)
SPECS = {
    "atari": EnvSpec("atari", [4, 84, 84], 18, True, 4096),  # full action set
    "mujoco": EnvSpec("vector", [17], 6, False, 1000),  # halfcheetah / walker2d
}


def preset_sizes(family: str) -> list[str]:
    """Preset names of a family present in configs/model, in SIZES order (then any others, sorted)."""
    found = {p.stem.split("-", 1)[1] for p in (CONFIGS_DIR / "model").glob(f"{family}-*.yaml")}
    return [s for s in SIZES if s in found] + sorted(found - set(SIZES))


def nominal_params(size: str) -> int | None:
    """The parameter count a preset's name states ('100m' -> 100e6, '1b' -> 1e9), None for the letter sizes."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(size[-1:].lower())
    number = size[:-1]
    if scale is None or not number.replace(".", "", 1).isdigit():
        return None
    return round(float(number) * scale)


def count(family: str, size: str, spec: EnvSpec, context_len: int = 30) -> dict[str, Any]:
    """Parameter counts and training FLOPs per token of one preset."""
    cfg = load_config(None, [f"model.family={family}", f"model.size={size}"]).model
    with torch.device("meta"):
        model = build_model(cfg, spec)
    total = sum(p.numel() for p in model.parameters())
    non_emb = model.num_params(non_embedding=True)
    return {"family": family, "size": size, "n_layer": cfg.n_layer, "d_model": cfg.d_model, "total": total,
            "embedding": total - non_emb, "non_embedding": non_emb,
            "flops_per_token": model.flops_per_token(context_len)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", choices=sorted(SPECS), default="mujoco")
    parser.add_argument("--family", choices=sorted(FAMILIES), action="append", help="default: all families")
    parser.add_argument("--context-len", type=int, default=30, help="K for the FLOPs column")
    args = parser.parse_args(argv)
    spec = SPECS[args.spec]
    rows = [count(f, s, spec, args.context_len) for f in (args.family or list(FAMILIES)) for s in preset_sizes(f)]
    if not rows:
        print(f"no presets found in {CONFIGS_DIR / 'model'}", file=sys.stderr)
        return 1
    print(f"spec {args.spec}: {spec}")
    print(f"{'family':<8} {'size':<5} {'layers':>6} {'d':>5} {'total':>12} {'embedding':>11} {'non_embedding':>14} "
          f"{'train_flops/token':>18}")
    for r in rows:
        print(f"{r['family']:<8} {r['size']:<5} {r['n_layer']:>6} {r['d_model']:>5} {r['total']:>12} "
              f"{r['embedding']:>11} {r['non_embedding']:>14} {r['flops_per_token']:>18.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
