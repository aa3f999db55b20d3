"""A scaling grid's typed config and its expansion into cells: overrides, steps, tokens, FLOPs, time estimates.

Step rules (`step_rule`; the paper does not say how its grid was budgeted, so each is a documented choice):
- `equal_steps`: every cell trains `steps` optimizer updates.
- `equal_epochs`: every cell sees its training subset `epochs` times:
  steps = ceil(epochs · transitions / global_batch). One sample is a window starting at an owned transition, so an
  epoch is one window start per transition.
- `equal_compute`: every cell gets the FLOPs of the reference cell (first family, first size) trained `steps`
  updates (or `flops_budget` when > 0): steps = round(budget / (flops_per_token · tokens_per_step)).
- `isoflop`: an isoFLOP grid, several budgets at once: for each of `flops_budgets` every model size trains the steps
  that budget buys (the same rounding, so each cell's FLOPs are within half a step of its budget); the cell key gets
  the budget, e.g. `mambadm-s-t20000-c1e12-s0`.

global_batch = batch size (per process) · grad_accum · processes; tokens_per_step = global_batch · K · 3 (a
timestep is TOKENS_PER_STEP = 3 tokens: return-to-go, state, action); estimated FLOPs = flops_per_token(K) · tokens.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from mambadm.config import ConfigError, EnvSpec, load_config, preset_path
from mambadm.model.base import TOKENS_PER_STEP

STEP_RULES = ("equal_steps", "equal_epochs", "equal_compute", "isoflop")


@dataclass
class GridEval:
    episodes: int = 10  # evaluation episodes per target return
    actors: int = 2  # Ray actors of the evaluation
    args: list[str] = field(default_factory=list)  # further flags passed to `python -m evaluation.evaluate`


@dataclass
class GridSlurm:
    """One Slurm job per cell (--parallel slurm; mambadm/study/slurm.py); per node of a cell's allocation."""
    partition: str = ""  # sbatch --partition (empty: the cluster's default)
    account: str = ""  # sbatch --account (empty: the user's default)
    time: str = "4:00:00"  # sbatch --time of one attempt (a requeued attempt gets it again)
    nodes: int = 1  # sbatch --nodes; > 1: Accelerate's multi-node launch on every node (srun)
    gpus_per_node: int = 0  # sbatch --gpus-per-node; nodes × gpus_per_node must equal resources.num_processes
    cpus_per_node: int = 2  # sbatch --cpus-per-task (one task per node)
    mem_per_node: str = ""  # sbatch --mem, e.g. 64G (empty: the partition's default)
    max_running: int = 0  # cells running at once (the job array's %N throttle; 0 = no limit)
    requeues: int = 2  # times a cell requeues itself when its time limit is near (0 = never)
    requeue_grace_s: int = 300  # how long before the time limit it does (sbatch --signal=B:USR1@N)
    sbatch_args: list[str] = field(default_factory=list)  # further sbatch options, e.g. [--qos=high, --constraint=a100]
    setup: list[str] = field(default_factory=list)  # shell lines a task runs in the checkout first (module load ...)
    poll_s: float = 30.0  # --wait: seconds between two looks at the queue


@dataclass
class GridResources:
    gpus_per_cell: float = 0.0  # Ray resources of one cell (--parallel ray)
    cpus_per_cell: float = 2.0
    num_processes: int = 1  # accelerate launch --num_processes (data-parallel ranks per cell)
    accelerate_config: str = ""  # accelerate launch --config_file (relative to the grid file); empty = flags only
    slurm: GridSlurm = field(default_factory=GridSlurm)


@dataclass
class GridConfig:
    name: str = "grid"
    base: str = ""  # training config YAML, relative to the grid file
    out: str = "runs/grid"  # output folder (relative to the working directory); --out overrides
    families: list[str] = field(default_factory=lambda: ["mambadm", "dt"])
    sizes: list[str] = field(default_factory=lambda: ["xs", "s", "m"])  # presets configs/model/<family>-<size>.yaml
    transitions: list[int] = field(default_factory=list)  # dataset sizes in owned transitions (nested subsets) ...
    fractions: list[float] = field(default_factory=list)  # ... or as fractions of the training shards (one of the two)
    seeds: list[int] = field(default_factory=lambda: [0])
    step_rule: str = "equal_steps"  # equal_steps | equal_epochs | equal_compute (see the module docstring)
    steps: int = 1000  # equal_steps: every cell; equal_compute: the reference cell's steps
    epochs: float = 1.0  # equal_epochs: passes over each cell's subset
    flops_budget: float = 0.0  # equal_compute: FLOPs per cell (0 = from the reference cell)
    flops_budgets: list[float] = field(default_factory=list)  # isoflop: the FLOP budgets, each one for every size
    batch_size: int = 0  # per-process batch size of every cell (0 = the base config's)
    batch_size_by_size: dict[str, int] = field(default_factory=dict)  # per model size, overrides batch_size
    overrides: list[str] = field(default_factory=list)  # key=value applied to every cell's training config
    eval: GridEval = field(default_factory=GridEval)
    resources: GridResources = field(default_factory=GridResources)
    launcher: str = "accelerate"  # accelerate (accelerate launch) | python (python -m, one process)
    flops_per_second: float = 0.0  # dry-run time estimate: FLOP rate constant; 0 = measure a training step here
    subset_tolerance: float = 0.0  # max relative excess of a selected subset over its request (0 = no limit)


@dataclass
class Cell:
    """One training + evaluation run of the grid."""

    key: str
    family: str
    size: str
    seed: int
    data_label: str
    data_override: str
    transitions: int  # owned transitions of the training subset, as selected from index.json
    requested: int  # the transitions asked for (a fraction's share of the training shards, rounded up)
    steps: int
    batch_size: int
    global_batch: int
    context_len: int
    tokens: int
    params: int
    non_embedding_params: int
    flops_per_token: float
    flops: float
    est_seconds: float
    est_source: str
    overrides: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_grid(path: Path, overrides: list[str] | None = None) -> Any:
    """Typed GridConfig from YAML (+ key=value overrides), strict about unknown keys; checks the axes."""
    g = load_config(path, overrides, schema=GridConfig)
    if not g.base:
        raise ConfigError(f"{path}: 'base' (the training config) is required")
    if bool(g.transitions) == bool(g.fractions):
        raise ConfigError(f"{path}: give exactly one of 'transitions' or 'fractions' (the dataset-size axis)")
    if any(t <= 0 for t in g.transitions) or any(not 0 < f <= 1 for f in g.fractions):
        raise ConfigError(f"{path}: transitions must be > 0 and fractions in (0, 1]")
    if g.step_rule not in STEP_RULES:
        raise ConfigError(f"{path}: 'step_rule' must be one of {list(STEP_RULES)}, got '{g.step_rule}'")
    if (g.step_rule == "isoflop") != bool(g.flops_budgets) or any(not c > 0 for c in g.flops_budgets):
        raise ConfigError(f"{path}: 'flops_budgets' (FLOPs > 0) goes with step_rule isoflop and only with it; "
                          f"got step_rule '{g.step_rule}', flops_budgets {list(g.flops_budgets)}")
    if g.launcher not in ("accelerate", "python"):
        raise ConfigError(f"{path}: 'launcher' must be accelerate or python, got '{g.launcher}'")
    for name in ("families", "sizes", "seeds"):
        if not g[name]:
            raise ConfigError(f"{path}: '{name}' is empty")
    check_slurm(g, path)
    return g


def check_slurm(g: Any, path: Path) -> None:
    """resources.slurm: counts in range, and the allocation consistent with the cell's processes."""
    s, processes = g.resources.slurm, g.resources.num_processes
    for key, least in (("nodes", 1), ("cpus_per_node", 1), ("gpus_per_node", 0), ("max_running", 0),
                       ("requeues", 0), ("requeue_grace_s", 0), ("poll_s", 0.1)):
        if s[key] < least:
            raise ConfigError(f"{path}: resources.slurm.{key} must be >= {least}, got {s[key]}")
    if s.nodes > 1 and g.launcher != "accelerate":
        raise ConfigError(f"{path}: resources.slurm.nodes={s.nodes} needs launcher accelerate, got '{g.launcher}'")
    if s.gpus_per_node and processes != s.nodes * s.gpus_per_node:
        raise ConfigError(f"{path}: resources.num_processes must be resources.slurm.nodes × gpus_per_node = "
                          f"{s.nodes * s.gpus_per_node} (one process per GPU), got {processes}")
    if processes % s.nodes:
        raise ConfigError(f"{path}: resources.num_processes must be a multiple of resources.slurm.nodes={s.nodes}, "
                          f"got {processes}")


def budget_axis(grid: Any) -> list[tuple[str, float]]:
    """The isoflop rule's budget axis: (cell-key suffix, FLOPs) per budget; one empty entry for the other rules."""
    if grid.step_rule != "isoflop":
        return [("", 0.0)]
    return [("-c" + f"{float(c):.3g}".replace("+", ""), float(c)) for c in grid.flops_budgets]


def budget_steps(budget: float, flops_per_token: float, tokens_per_step: int) -> int:
    """The optimizer steps a FLOP budget buys: the nearest whole step (at least 1), so within half a step."""
    return max(1, round(budget / (flops_per_token * tokens_per_step)))


def preset_overrides(family: str, size: str) -> list[str]:
    """The size preset's keys as `model.key=value` overrides. A preset ranks *below* the YAML file in load_config,
    so a base config that sets e.g. model.d_model would silently make every size equal; as command-line overrides
    the preset's keys win."""
    path = preset_path(family, size)
    if not path.is_file():
        raise ConfigError(f"model size '{size}': no preset {path}")
    preset = OmegaConf.to_container(OmegaConf.load(path))
    return [f"model.{k}={json.dumps(v)}" for k, v in (preset or {}).items()]


def base_path(grid: Any, grid_file: Path) -> Path:
    p = Path(grid.base)
    return p if p.is_absolute() else (Path(grid_file).parent / p)


def env_spec(shards: str) -> EnvSpec:
    """The dataset's EnvSpec from its index.json; the error training would give when the shards are not there."""
    from mambadm.data import DataError, read_index

    try:
        index = read_index(shards)
    except DataError as e:
        raise ConfigError(str(e)) from None
    return EnvSpec.from_dict(index["env_spec"], f"{Path(shards) / 'index.json'}: env_spec")


def synthetic_batch(spec: EnvSpec, batch: int, k: int) -> dict[str, torch.Tensor]:
    """A batch with the contract's shapes and dtypes (random content), for timing a training step."""
    if spec.obs_kind == "atari":
        states = torch.randint(0, 256, (batch, k, *spec.obs_shape), dtype=torch.uint8)
    else:
        states = torch.randn(batch, k, *spec.obs_shape)
    actions = (torch.randint(0, spec.act_dim, (batch, k)) if spec.discrete
               else torch.rand(batch, k, spec.act_dim) * 2 - 1)
    return {"rtg": torch.rand(batch, k), "states": states, "actions": actions,
            "timesteps": torch.arange(k).repeat(batch, 1), "mask": torch.ones(batch, k, dtype=torch.bool)}


def measure_seconds_per_token(model: torch.nn.Module, spec: EnvSpec, k: int, batch: int, repeats: int = 2) -> float:
    """Wall seconds per token of a forward + backward + AdamW step at the cell's per-process batch size on this
    machine: the fastest of `repeats` steps after one warm-up step (data loading, validation, start-up excluded)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = synthetic_batch(spec, batch, k)
    model.train()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss, _ = model.loss(data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return min(times) / (batch * k * TOKENS_PER_STEP)


def subset_transitions(cfg: Any) -> tuple[int, int]:
    """(selected, requested): owned transitions of the training subset the run will use, and those it asked for
    (`data.subset_fraction` as its share of the training shards, rounded up). Errors are the ones training gives."""
    from mambadm.data import DataError, read_index, select_shards, transitions_of

    try:
        index = read_index(cfg.data.shards)
        selected = transitions_of(select_shards(index, cfg.data)[0])
        if cfg.data.subset_transitions > 0:
            return selected, int(cfg.data.subset_transitions)
        whole = cfg.data.copy()
        whole.subset_fraction = 1.0
        return selected, math.ceil(cfg.data.subset_fraction * transitions_of(select_shards(index, whole)[0]))
    except DataError as e:
        raise ConfigError(str(e)) from None


def check_subset(grid: Any, grid_file: Path, label: str, selected: int, requested: int) -> None:
    """Refuses a subset that overshoots its request by more than `subset_tolerance` (shards are coarse)."""
    excess = selected / requested - 1
    if grid.subset_tolerance and excess > grid.subset_tolerance:
        raise ConfigError(f"{grid_file}: dataset size {label}: the shards give {selected:,} transitions for the "
                          f"{requested:,} requested (+{100 * excess:.1f}%, subset_tolerance is "
                          f"{100 * grid.subset_tolerance:g}%); request whole shards' worth or reshard with a "
                          f"--shard-transitions that divides the requests (docs/scaling.md, 'Exact data steps')")


def check_overrides(grid: Any, grid_file: Path, base: Path) -> None:
    """The grid's `overrides` against the training config, so that a typo names the grid file and the key."""
    try:
        load_config(base, list(grid.overrides))
    except ConfigError as e:
        raise ConfigError(f"{grid_file}: overrides: {str(e).removeprefix('command line: ')}") from None


def expand(grid: Any, grid_file: Path, out: Path, measure: bool = False) -> list[Cell]:
    """All cells of the grid, in run order (family, size, data size, seed), with their cost estimates."""
    from mambadm.model import build_model  # the model box is only needed to count parameters and FLOPs

    base = base_path(grid, grid_file)
    check_overrides(grid, grid_file, base)
    data_axis = ([(f"t{t}", f"data.subset_transitions={t}", t, None) for t in grid.transitions] if grid.transitions
                 else [(f"f{f:g}", f"data.subset_fraction={f}", None, f) for f in grid.fractions])
    models: dict[tuple[str, str], tuple[int, int, float, float]] = {}
    cells: list[Cell] = []
    budget: float | None = None
    for family in grid.families:
        for size in grid.sizes:
            batch_size = int(grid.batch_size_by_size.get(size, grid.batch_size))
            common = [f"model.family={family}", f"model.size={size}", *preset_overrides(family, size),
                      *grid.overrides]
            if batch_size:
                common.append(f"data.batch_size={batch_size}")
            cfg = load_config(base, common)
            k = int(cfg.data.context_len)
            global_batch = int(cfg.data.batch_size) * int(cfg.optim.grad_accum) * int(grid.resources.num_processes)
            tokens_per_step = global_batch * k * TOKENS_PER_STEP
            if (family, size) not in models:
                spec = env_spec(cfg.data.shards)
                model = build_model(cfg.model, spec)
                fpt = float(model.flops_per_token(k))
                timed = measure and not grid.flops_per_second
                sec_per_token = measure_seconds_per_token(model, spec, k, int(cfg.data.batch_size)) if timed else 0.0
                models[(family, size)] = (int(model.num_params()), int(model.num_params(non_embedding=True)), fpt,
                                          sec_per_token)
                del model
            params, non_emb, fpt, sec_per_token = models[(family, size)]
            if budget is None:
                budget = grid.flops_budget or fpt * tokens_per_step * grid.steps
            for (label, data_override, requested, _), (c_label, c_budget) in product(data_axis, budget_axis(grid)):
                transitions, requested = subset_transitions(load_config(base, [*common, data_override]))
                check_subset(grid, grid_file, label, transitions, requested)
                if grid.step_rule == "equal_steps":
                    steps = int(grid.steps)
                elif grid.step_rule == "equal_epochs":
                    steps = max(1, math.ceil(grid.epochs * transitions / global_batch))
                else:
                    steps = budget_steps(c_budget if c_label else budget, fpt, tokens_per_step)
                tokens = steps * tokens_per_step
                flops = fpt * tokens
                if grid.flops_per_second:
                    est, src = flops / grid.flops_per_second, f"FLOP rate constant {grid.flops_per_second:.3g}/s"
                elif measure:
                    est, src = sec_per_token * tokens, "measured training step on this machine (excl. eval)"
                else:
                    est, src = float("nan"), "not estimated"
                for seed in grid.seeds:
                    key = f"{family}-{size}-{label}{c_label}-s{seed}"
                    overrides = [*common, data_override, f"train.steps={steps}", f"train.seed={seed}",
                                 f"train.run_dir={out / 'cells' / key / 'run'}"]
                    cells.append(Cell(key=key, family=family, size=size, seed=int(seed), data_label=label,
                                      data_override=data_override, transitions=int(transitions),
                                      requested=int(requested), steps=steps,
                                      batch_size=int(cfg.data.batch_size), global_batch=global_batch, context_len=k,
                                      tokens=tokens, params=params, non_embedding_params=non_emb, flops_per_token=fpt,
                                      flops=flops, est_seconds=est, est_source=src, overrides=overrides))
    return cells


def format_table(cells: list[Cell]) -> str:
    """The dry-run table: one line per cell (the subset selected from the shards and its ratio to the request),
    a total, and the data steps as requested vs as selected."""
    head = (f"{'cell':<28} {'params':>11} {'non-emb':>11} {'requested':>10} {'selected':>10} {'ratio':>6} "
            f"{'steps':>7} {'batch':>5} {'tokens':>12} {'FLOPs':>10} {'est. time':>10}")
    lines = [head, "-" * len(head)]
    for c in cells:
        lines.append(f"{c.key:<28} {c.params:>11,} {c.non_embedding_params:>11,} {c.requested:>10,} "
                     f"{c.transitions:>10,} {c.transitions / c.requested:>6.3f} {c.steps:>7,} "
                     f"{c.global_batch:>5} {c.tokens:>12,} {c.flops:>10.3e} {_duration(c.est_seconds):>10}")
    total_s = sum(c.est_seconds for c in cells)
    lines += ["-" * len(head),
              f"{len(cells)} cells, {sum(c.tokens for c in cells):,} tokens, {sum(c.flops for c in cells):.3e} FLOPs, "
              f"estimated training time {_duration(total_s)} run one after another "
              f"({cells[0].est_source if cells else ''})"]
    return "\n".join(lines + data_steps(cells))


def data_steps(cells: list[Cell]) -> list[str]:
    """One line per step between neighbouring dataset sizes: the requested and the selected ratio."""
    sizes = sorted({(c.requested, c.transitions, c.data_label) for c in cells})
    return [f"data step {a[2]} -> {b[2]}: requested {b[0] / a[0]:.2f}x, selected {b[1] / a[1]:.2f}x "
            f"({a[1]:,} -> {b[1]:,} transitions)" for a, b in zip(sizes, sizes[1:])]


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min" if s < 7200 else f"{s / 3600:.1f}h"
