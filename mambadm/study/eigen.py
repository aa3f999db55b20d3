"""Eigenvalues of the SSM state matrices A of every layer's global and local Mamba branch (the paper's Figure 4).

    python -m mambadm.study.eigen RUN/export [--out DIR] [--delta bias|data] [--batches 1] [--threshold 0.99]

In Mamba, A is diagonal per channel (d_inner × d_state real entries, A = -exp(A_log)), so its eigenvalues are its
entries, all real and negative. The discretised transition is exp(Δ·A) with a per-token step Δ = softplus(dt_proj(x)
+ dt_bias); its entries lie in (0, 1) and say how much of the state survives one token: |exp(Δ·A)| near 1 is long
memory (a timescale of -1 / log|λ| tokens).

Δ comes from one of two sources (`--delta`):
- `bias`: Δ = softplus(dt_bias), the input-independent part (no data needed), one Δ per channel;
- `data`: Δ from running the model on batches of the export's own validation shards (`data.shards` in its
  config.yaml, or `--shards`); every token of the batch gives one exp(Δ·A) per channel and state.

The baseline: A and Δ start from a fixed initialisation (A = -[1..d_state] per channel, dt log-uniform), so a
trained spectrum is read against the one training started from. That model is rebuilt from the export's config the
way training builds it (`torch.manual_seed(train.seed)`, then `build_model`), analysed the same way, and every layer
and branch gets a change-from-init statistic: the median |Δ log|A|| and the share of eigenvalues whose |A| moved by
more than MOVED (5%), the median |Δ log Δ|, and the long-memory share at initialisation beside the trained one.

Writes `eigen.png` (per branch: trained vs initial histograms, and trained vs initial |A| per eigenvalue),
`eigen.json` (per layer and branch: shapes, statistics, the initial statistics and the change) and `eigen.md` into
DIR (default: the export directory's parent).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.atomic import atomic_write_text
from mambadm.study.plots import eigen_figure
from mambadm.ssm.mixer import Mamba

THRESHOLDS = (0.9, 0.99, 0.999)
DELTA_SOURCES = {"bias": "softplus(dt_bias), one Δ per channel", "data": "every token of real validation batches"}
MAX_PLOTTED = 200_000  # discrete eigenvalues drawn per branch (a random subset beyond this)
MOVED = 0.05  # an eigenvalue "moved" when |A| changed by more than 5% from its initial value


def _branch_of(name: str) -> str:
    low = name.lower()
    for branch in ("global", "local"):
        if branch in low:
            return branch
    return name.rsplit(".", 1)[-1] or "mamba"


def _layer_of(name: str) -> int:
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else 0


def mamba_modules(model: nn.Module) -> list[tuple[int, str, str, Mamba]]:
    """(layer, branch, module name, mixer) for every Mamba mixer in `model`, in module order."""
    found = [(_layer_of(n), _branch_of(n), n, m) for n, m in model.named_modules() if isinstance(m, Mamba)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no Mamba mixer (a Decision Transformer has no A matrices)")
    return found


@torch.no_grad()
def eigenvalues(model: nn.Module, batches: list[dict] | None = None) -> list[dict[str, Any]]:
    """Per mixer: continuous eigenvalues (d_inner, d_state) and exp(Δ·A) — (d_inner, d_state) from the dt bias when
    `batches` is None, else (tokens, d_inner, d_state) over every unmasked-or-not token the mixers saw."""
    mods = mamba_modules(model)
    inputs: dict[str, list[tuple[torch.Tensor, int | None]]] = {n: [] for _, _, n, _ in mods}  # (x, segment)
    if batches:
        def keep_input(name):
            return lambda mod, args, kwargs: inputs[name].append((args[0].detach(), kwargs.get("segment")))

        hooks = [m.register_forward_pre_hook(keep_input(n), with_kwargs=True) for _, _, n, m in mods]
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                model(batch)
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
    out = []
    for layer, branch, name, m in mods:
        A = m.A_continuous().float()  # (d_inner, d_state)
        if batches:
            if not inputs[name]:
                raise RuntimeError(f"mixer {name} was not called by the model's forward")
            disc = torch.cat([m.A_discrete(x, seg).reshape(-1, *A.shape) for x, seg in inputs[name]]).float()
            delta = torch.cat([m.delta(x, seg).transpose(1, 2).reshape(-1) for x, seg in inputs[name]])
        else:
            delta = F.softplus(m.dt_proj.bias.float())  # (d_inner,)
            disc = torch.exp(delta[:, None] * A)
        out.append({"layer": layer, "branch": branch, "module": name, "continuous": A.cpu().numpy(),
                    "discrete": disc.cpu().numpy(), "delta": delta.cpu().numpy()})
    return out


def statistics(entry: dict[str, Any], thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, Any]:
    """Summary of one mixer's eigenvalues: shapes, ranges, Δ statistics, long-memory shares and timescales."""
    cont, disc, delta = entry["continuous"], np.abs(entry["discrete"]), entry["delta"]
    timescale = -1.0 / np.log(np.clip(disc, 1e-30, 1 - 1e-12))
    return {
        "layer": entry["layer"], "branch": entry["branch"], "module": entry["module"],
        "continuous_shape": list(cont.shape), "discrete_shape": list(disc.shape), "n_eigenvalues": int(cont.size),
        "A_min": float(cont.min()), "A_median": float(np.median(cont)), "A_max": float(cont.max()),
        "delta_mean": float(delta.mean()), "delta_median": float(np.median(delta)),
        "delta_min": float(delta.min()), "delta_max": float(delta.max()),
        "abs_discrete_mean": float(disc.mean()), "abs_discrete_median": float(np.median(disc)),
        "timescale_median_tokens": float(np.median(timescale)),
        **{f"share_above_{t}": float(np.mean(disc > t)) for t in thresholds},
    }


def change(trained: dict[str, Any], init: dict[str, Any], threshold: float) -> dict[str, float]:
    """How far one mixer moved from its initialisation: |Δ log|A|| (median, max), the share of eigenvalues whose |A|
    changed by more than MOVED, |Δ log Δ| (median), and the long-memory share at initialisation and trained."""
    d_log_a = np.abs(np.log(-trained["continuous"]) - np.log(-init["continuous"]))
    d_log_delta = np.abs(np.log(trained["delta"]) - np.log(init["delta"]))  # same channels (and tokens)
    shares = [float(np.mean(np.abs(e["discrete"]) > threshold)) for e in (init, trained)]
    return {"log_abs_A_change_median": float(np.median(d_log_a)), "log_abs_A_change_max": float(d_log_a.max()),
            f"share_A_moved_over_{MOVED:g}": float(np.mean(np.abs(np.expm1(d_log_a)) > MOVED)),
            "log_delta_change_median": float(np.median(d_log_delta)),
            f"share_above_{threshold}_init": shares[0], f"share_above_{threshold}_trained": shares[1]}


def pooled_by_branch(entries: list[dict[str, Any]], rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    """Eigenvalues of all layers pooled per branch (discrete ones subsampled to MAX_PLOTTED for the figure)."""
    pooled: dict[str, dict[str, list]] = {}
    for e in entries:
        p = pooled.setdefault(e["branch"], {"continuous": [], "discrete": []})
        p["continuous"].append(e["continuous"].ravel())
        p["discrete"].append(e["discrete"].ravel())
    out = {}
    for branch, p in pooled.items():
        disc = np.concatenate(p["discrete"])
        if disc.size > MAX_PLOTTED:
            disc = rng.choice(disc, size=MAX_PLOTTED, replace=False)
        out[branch] = {"continuous": np.concatenate(p["continuous"]), "discrete": disc}
    return out


def initial_model(cfg: Any, spec: Any) -> nn.Module:
    """The untrained model training started from: `torch.manual_seed(train.seed)`, then `build_model`, as the
    trainer does (the caller's random state is left as it was)."""
    from mambadm.model import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.train.seed))
        return build_model(cfg.model, spec).eval()


def summary_markdown(result: dict[str, Any]) -> str:
    stats, threshold = result["layers"], result["threshold"]
    lines = [f"# Eigenvalues of the A matrices: `{result['source']}`", "",
             f"Δ source: **{result['delta_source']}** ({DELTA_SOURCES[result['delta_source']]}). "
             "Continuous A is diagonal (eigenvalues = entries, real, negative); "
             "the discretised transition is exp(Δ·A) in (0, 1); values near 1 keep the state for long.", "",
             f"Baseline: {result['baseline']}.", "",
             "| layer | branch | eigenvalues | A range (init) | Δ median | median \\|exp(ΔA)\\| | "
             f"> {threshold} (init) | median \\|Δ log\\|A\\|\\| | \\|A\\| moved > {100 * MOVED:g}% | median \\|Δ log Δ\\| | "
             "median timescale (tokens) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in stats:
        i, c = s.get("init"), s.get("change")
        a_init = f" ({i['A_min']:.3g}, {i['A_max']:.3g})" if i else ""
        share_init = f" ({100 * i[f'share_above_{threshold}']:.1f}%)" if i else ""
        moved = (f"{c['log_abs_A_change_median']:.2e} | {100 * c[f'share_A_moved_over_{MOVED:g}']:.1f}% | "
                 f"{c['log_delta_change_median']:.2e}") if c else "— | — | —"
        lines.append(f"| {s['layer']} | {s['branch']} | {s['n_eigenvalues']} | [{s['A_min']:.3g}, {s['A_max']:.3g}]"
                     f"{a_init} | {s['delta_median']:.4f} | {s['abs_discrete_median']:.4f} | "
                     f"{100 * s[f'share_above_{threshold}']:.1f}%{share_init} | {moved} | "
                     f"{s['timescale_median_tokens']:.1f} |")
    by_branch: dict[str, list[dict]] = {}
    for s in stats:
        by_branch.setdefault(s["branch"], []).append(s)
    lines += ["", f"Share of |exp(Δ·A)| > {threshold} per branch (mean over layers): " + ", ".join(
        f"{b}: {100 * np.mean([s[f'share_above_{threshold}'] for s in v]):.1f}%" for b, v in by_branch.items()), ""]
    if result.get("unchanged"):
        lines += ["The export's A and Δ equal their initialisation: the spectrum above is the initialisation's, not "
                  "something training learned.", ""]
    return "\n".join(lines)


def data_batches(cfg: Any, shards: str | None, n: int) -> list[dict]:
    """`n` batches of the run's validation shards through the project's loader (imported only when needed)."""
    from mambadm.data import make_loader, read_index, select_shards

    data_cfg = cfg.data.copy()
    if shards:
        data_cfg.shards = shards
    index = read_index(data_cfg.shards)
    _, val = select_shards(index, data_cfg)
    if not val:
        raise ValueError(f"{data_cfg.shards}: the run holds out no validation shard (data.val_shards=0)")
    batches = []
    for batch in make_loader(val, index, data_cfg, rank=0, world_size=1, seed=0, exact=True, num_workers=0):
        batches.append(batch)
        if len(batches) >= n:
            break
    if not batches:
        raise ValueError(f"no validation batch in {data_cfg.shards}")
    return batches


def analyse(model: nn.Module, out: Path, source: str, batches: list[dict] | None = None,
            threshold: float = 0.99, baseline: nn.Module | None = None,
            baseline_note: str = "none given") -> dict[str, Any]:
    """Computes, writes eigen.{png,json,md} into `out` and returns the JSON dict. `baseline` (the untrained model,
    see `initial_model`) is analysed on the same batches and compared layer by layer."""
    entries = eigenvalues(model, batches)
    stats = [statistics(e) for e in entries]
    init = eigenvalues(baseline, batches) if baseline is not None else None
    if init is not None:
        if [(e["module"], e["continuous"].shape) for e in init] != [(e["module"], e["continuous"].shape)
                                                                     for e in entries]:
            raise ValueError(f"{source}: the baseline's Mamba mixers differ from the export's")
        for s, e, i in zip(stats, entries, init):
            s["init"] = statistics(i)
            s["change"] = change(e, i, threshold)
    delta_source = "data" if batches else "bias"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    eigen_figure(pooled_by_branch(entries, rng), pooled_by_branch(init, rng) if init else None, out / "eigen.png",
                 threshold)
    result = {"source": source, "delta_source": delta_source, "threshold": threshold, "baseline": baseline_note,
              "moved_threshold": MOVED, "layers": stats, "figure": "eigen.png",
              "unchanged": bool(init) and all(s["change"]["log_abs_A_change_max"] == 0
                                              and s["change"]["log_delta_change_median"] == 0 for s in stats)}
    atomic_write_text(out / "eigen.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "eigen.md", summary_markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="export directory written by training (RUN/export)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the export's parent)")
    parser.add_argument("--delta", choices=("bias", "data"), default="bias", help="where Δ comes from")
    parser.add_argument("--shards", default=None, help="shard folder for --delta data (default: the run's data.shards)")
    parser.add_argument("--batches", type=int, default=1, help="validation batches for --delta data")
    parser.add_argument("--threshold", type=float, default=0.99, choices=THRESHOLDS,
                        help="|exp(ΔA)| above this counts as long memory in the figure")
    args = parser.parse_args(argv)
    from mambadm.export import load_export

    try:
        model, cfg, spec, _ = load_export(args.export)
        batches = data_batches(cfg, args.shards, args.batches) if args.delta == "data" else None
        note = (f"the initialisation rebuilt from the export's config as training builds it "
                f"(torch.manual_seed(train.seed={int(cfg.train.seed)}), then build_model)")
        result = analyse(model, args.out or args.export.resolve().parent, str(args.export), batches, args.threshold,
                         initial_model(cfg, spec), note)
    except (FileNotFoundError, ValueError) as e:
        print(f"eigen: {e}", file=sys.stderr)
        return 2
    print(summary_markdown(result))
    return 0 if all(math.isfinite(s["abs_discrete_mean"]) for s in result["layers"]) else 1


if __name__ == "__main__":
    sys.exit(main())
