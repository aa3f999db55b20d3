"""Size presets: the sizes CLI's counts are the real models' parameter counts; the ladder spans >= 100x; the large
presets (100m, 300m, 1b) hold what their names say, match across families, and the ~100M pair trains."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from mambadm.config import load_config
from mambadm.model import build_model
from mambadm.model.sizes import NOMINAL_BAND, SPECS, nominal_params, preset_sizes
from mambadm.optim import make_optimizer

LARGE = ("100m", "300m", "1b")


def cli_table(spec: str) -> dict[tuple[str, str], dict[str, int]]:
    out = subprocess.run([sys.executable, "-m", "mambadm.model.sizes", "--spec", spec], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    rows = {}
    for line in out.splitlines()[2:]:
        family, size, layers, d, total, emb, non_emb, _ = line.split()
        rows[(family, size)] = {"n_layer": int(layers), "d_model": int(d), "total": int(total),
                                "embedding": int(emb), "non_embedding": int(non_emb)}
    return rows


def preset(family: str, size: str, *extra: str):
    return load_config(None, [f"model.family={family}", f"model.size={size}", *extra]).model


def test_presets_load_and_override_order():
    cfg = load_config(None, ["model.family=dt", "model.size=m", "model.n_layer=2"])
    assert (cfg.model.d_model, cfg.model.n_layer) == (128, 2)  # the preset sits under explicit keys


def test_nominal_size_of_a_name():
    assert [nominal_params(s) for s in ("100m", "300m", "1b", "1.5b", "xxl", "m", "b")] == \
        [10**8, 3 * 10**8, 10**9, 15 * 10**8, None, None, None]


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["mujoco", "atari"])
def test_sizes_cli_counts_equal_built_models(spec):
    table = cli_table(spec)
    for family in ("mambadm", "dt"):
        sizes = [s for s in preset_sizes(family) if nominal_params(s) is None]  # the ladder; large ones below
        assert len(sizes) >= 6, sizes
        totals = []
        for size in sizes:
            model = build_model(preset(family, size), SPECS[spec])  # real tensors, unlike the CLI's meta build
            total = sum(p.numel() for p in model.parameters())
            embedding = sum(p.numel() for p in model.embed.parameters())
            assert {k: table[(family, size)][k] for k in ("total", "embedding", "non_embedding")} == \
                {"total": total, "embedding": embedding, "non_embedding": total - embedding}
            totals.append(total)
            del model
        assert totals == sorted(totals) and len(set(totals)) == len(totals), totals  # monotonic in size
        if spec == "mujoco":
            assert totals[-1] >= 100 * totals[0], totals
    for size in preset_sizes("mambadm"):  # families matched in size
        ratio = table[("dt", size)]["total"] / table[("mambadm", size)]["total"]
        assert 0.85 < ratio < 1.15, (size, ratio)


def mamba_layer_params(d: int, n: int = 16, d_conv: int = 4, expand: int = 2, ffn: int = 4) -> int:
    """One GLoMa block (fusion add), counted by hand from mamba_ssm's layout: two mixers, two norms, the FFN."""
    di, r = expand * d, math.ceil(d / 16)
    mixer = (d * 2 * di  # in_proj (no bias)
             + di * d_conv + di  # depthwise conv + bias
             + di * (r + 2 * n)  # x_proj (no bias)
             + r * di + di  # dt_proj + bias
             + di * n + di  # A_log, D
             + di * d)  # out_proj (no bias)
    return 2 * mixer + 2 * 2 * d + (d * ffn * d + ffn * d + ffn * d * d + d)


def dt_layer_params(d: int, ffn: int = 4) -> int:
    """One GPT block counted by hand: qkv + proj with biases, two norms, the FFN."""
    return (d * 3 * d + 3 * d) + (d * d + d) + 2 * 2 * d + (d * ffn * d + ffn * d + ffn * d * d + d)


@pytest.mark.parametrize("spec", ["mujoco", "atari"])
def test_large_presets_in_the_table_hold_their_nominal_size_and_match_in_pairs(spec):
    table = cli_table(spec)
    head = SPECS[spec].act_dim  # the action head's bias (Atari, default init: bias kept)
    lo, hi = NOMINAL_BAND
    for size in LARGE:
        totals = {}
        for family, per_layer in (("mambadm", mamba_layer_params), ("dt", dt_layer_params)):
            row = table[(family, size)]
            d, layers = row["d_model"], row["n_layer"]
            cfg = preset(family, size)
            assert (cfg.d_model, cfg.n_layer) == (d, layers)
            # the backbone by hand (blocks, final norm, action head) equals the table's non-embedding count
            assert row["non_embedding"] == layers * per_layer(d) + 2 * d + d * head + head, (family, size)
            with torch.device("meta"):  # the built model (no memory): the table's total
                assert build_model(cfg, SPECS[spec]).num_params() == row["total"]
            assert lo * nominal_params(size) <= row["total"] <= hi * nominal_params(size), (family, size, row)
            totals[family] = row["total"]
        assert abs(totals["dt"] / totals["mambadm"] - 1) < 0.05, (size, totals)  # a parameter-matched pair
    assert table[("mambadm", "1b")]["total"] >= 10**9 and table[("dt", "1b")]["total"] >= 10**9
    order = [table[("mambadm", s)]["total"] for s in preset_sizes("mambadm")]
    assert order == sorted(order) and preset_sizes("mambadm")[-3:] == list(LARGE)


@pytest.mark.parametrize("family", ["mambadm", "dt"])
def test_100m_preset_takes_two_training_steps_on_cpu(family):
    """The real ~100M model (not meta): forward + backward + AdamW on a tiny batch, twice on the same batch; every
    parameter that gets a gradient moves, and the loss goes down."""
    cfg = preset(family, "100m", "model.backend=fast", "model.dropout=0.0")
    torch.manual_seed(0)
    model = build_model(cfg, SPECS["mujoco"]).train()
    assert 10**8 <= model.num_params() <= 1.25 * 10**8
    opt = make_optimizer(model, load_config(None, ["optim.lr=1e-6"]).optim)
    g = torch.Generator().manual_seed(0)
    b, k = 2, 4
    batch = {"rtg": torch.rand(b, k, generator=g), "states": torch.randn(b, k, 17, generator=g),
             "actions": torch.rand(b, k, 6, generator=g) * 2 - 1, "timesteps": torch.arange(k).repeat(b, 1),
             "mask": torch.ones(b, k, dtype=torch.bool)}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("layers.0.")}
    losses = []
    for _ in range(2):
        loss, _ = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[1] < losses[0], losses
    unchanged = [n for n, p in model.named_parameters() if n in before and torch.equal(p, before[n])]
    assert not unchanged, unchanged
