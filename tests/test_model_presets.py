"""Size presets: the sizes CLI's counts are the real models' parameter counts; the ladder spans >= 100x."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mambadm.config import load_config
from mambadm.model import build_model
from mambadm.model.sizes import SPECS, preset_sizes


def cli_table(spec: str) -> dict[tuple[str, str], dict[str, int]]:
    out = subprocess.run([sys.executable, "-m", "mambadm.model.sizes", "--spec", spec], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    rows = {}
    for line in out.splitlines()[2:]:
        family, size, _, _, total, emb, non_emb, _ = line.split()
        rows[(family, size)] = {"total": int(total), "embedding": int(emb), "non_embedding": int(non_emb)}
    return rows


def test_presets_load_and_override_order():
    cfg = load_config(None, ["model.family=dt", "model.size=m", "model.n_layer=2"])
    assert (cfg.model.d_model, cfg.model.n_layer) == (128, 2)  # the preset sits under explicit keys


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["mujoco", "atari"])
def test_sizes_cli_counts_equal_built_models(spec):
    table = cli_table(spec)
    for family in ("mambadm", "dt"):
        sizes = preset_sizes(family)
        assert len(sizes) >= 6, sizes
        totals = []
        for size in sizes:
            cfg = load_config(None, [f"model.family={family}", f"model.size={size}"]).model
            model = build_model(cfg, SPECS[spec])  # real tensors, unlike the CLI's meta-device build
            total = sum(p.numel() for p in model.parameters())
            embedding = sum(p.numel() for p in model.embed.parameters())
            assert table[(family, size)] == {"total": total, "embedding": embedding,
                                             "non_embedding": total - embedding}
            totals.append(total)
            del model
        assert totals == sorted(totals) and len(set(totals)) == len(totals), totals  # monotonic in size
        if spec == "mujoco":
            assert totals[-1] >= 100 * totals[0], totals
    for size in preset_sizes("mambadm"):  # families matched in size
        ratio = table[("dt", size)]["total"] / table[("mambadm", size)]["total"]
        assert 0.85 < ratio < 1.15, (size, ratio)


def test_flops_grow_along_the_ladder():
    with torch.device("meta"):
        flops = [build_model(load_config(None, [f"model.family={f}", f"model.size={s}"]).model, SPECS["mujoco"])
                 .flops_per_token(20) for f in ("mambadm", "dt") for s in preset_sizes(f)]
    half = len(flops) // 2
    assert flops[:half] == sorted(flops[:half]) and flops[half:] == sorted(flops[half:])
