"""Training entry point: Accelerate (DDP) or DeepSpeed via Accelerate; atomic checkpoints; metrics; export.

    accelerate launch [--config_file configs/accelerate/X.yaml] -m mambadm.train CONFIG.yaml [key=value ...]
    python -m mambadm.train CONFIG.yaml [key=value ...]          # one process

The run directory (``train.run_dir``) receives ``config.yaml`` (resolved), ``metrics.jsonl``, TensorBoard logs,
``checkpoints/step-XXXXXXXX`` (see mambadm/checkpoint.py), ``ranks/rank-XX.json`` (what each process saw, for
checking a distributed run) and, at the end, ``export/`` (mambadm/export.py). Design notes: docs/training.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from mambadm import data as data_lib
from mambadm.checkpoint import TrainerState, prune, resolve_resume, save_checkpoint
from mambadm.config import ConfigError, load_config, to_yaml
from mambadm.export import dataset_info, save_export, spec_from_dict
from mambadm.metrics import MetricsLogger
from mambadm.optim import make_optimizer, make_scheduler

TOKENS_PER_STEP = 3  # return-to-go, state, action


class Objective(nn.Module):
    """Routes ``model.loss`` through ``forward`` so DDP / DeepSpeed see (and synchronise) the training call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss, _ = self.model.loss(batch)
        return loss


def build_accelerator(cfg: Any):
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import ProjectConfiguration

    on_gpu = torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if on_gpu else "no"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by accelerate launch / torchrun
    kwargs = [InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=10))] if distributed and not on_gpu \
        else []
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(
        cpu=not on_gpu and not deepspeed,  # cpu=True would drop DeepSpeed (which then uses its CPU accelerator)
        mixed_precision=precision, gradient_accumulation_steps=cfg.optim.grad_accum,
        log_with="tensorboard" if cfg.train.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=cfg.train.run_dir, logging_dir=cfg.train.run_dir),
        step_scheduler_with_optimizer=False, kwargs_handlers=kwargs)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # no dataloader goes through prepare(), so fill DeepSpeed's "auto" values here
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        ds["gradient_accumulation_steps"] = cfg.optim.grad_accum
        ds["train_batch_size"] = cfg.data.batch_size * cfg.optim.grad_accum * accelerator.num_processes
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = cfg.optim.grad_clip
    return accelerator


def validate(accelerator: Any, objective: nn.Module, loader: Any, max_batches: int) -> float:
    """Masked-step-weighted validation loss over up to ``max_batches`` batches per rank, in lockstep: every rank
    runs the same number of forwards (a rank that runs out stops all), so sharded models never hang."""
    model = accelerator.unwrap_model(objective).model
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    batches = iter(loader)
    with torch.no_grad(), accelerator.autocast():
        for _ in range(max_batches):
            batch = next(batches, None)
            have = torch.tensor([0.0 if batch is None else 1.0], device=accelerator.device)
            if accelerator.reduce(have, reduction="sum").item() < accelerator.num_processes:
                break
            batch = data_lib.to_device(batch, accelerator.device)
            loss, _ = model.loss(batch)
            n = batch["mask"].sum()
            total += torch.stack([loss.double() * n, n.double()])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def data_fingerprint(batch: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in ("rtg", "timesteps"):
        h.update(batch[key].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def write_rank_record(run_dir: Path, accelerator: Any, objective: nn.Module, first_batch: Optional[str],
                      micro_batches: int) -> None:
    params = accelerator.unwrap_model(objective).model.parameters()
    checksum = float(sum(p.detach().double().sum().item() for p in params))
    record = {"rank": accelerator.process_index, "world_size": accelerator.num_processes,
              "first_batch": first_batch, "micro_batches": micro_batches, "param_checksum": checksum,
              "distributed_type": str(accelerator.distributed_type)}
    out = run_dir / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{accelerator.process_index:02d}.json").write_text(json.dumps(record, indent=2))


def train(cfg: Any, accelerator: Any) -> TrainerState:
    from mambadm.model import build_model

    run_dir = Path(cfg.train.run_dir)
    config_yaml = to_yaml(cfg)
    index = data_lib.read_index(cfg.data.shards)
    train_shards, val_shards = data_lib.select_shards(index, cfg.data)
    rank, world = accelerator.process_index, accelerator.num_processes
    if val_shards and len(val_shards) < world:
        raise ConfigError(f"data.val_shards={len(val_shards)}: the exact validation pass needs at least one "
                          f"held-out shard per process ({world})")
    spec = spec_from_dict(index["env_spec"])
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, spec)
    n_params = model.num_params()
    flops_per_token = model.flops_per_token(cfg.data.context_len)
    zero_stage = (accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
                  if accelerator.state.deepspeed_plugin is not None else 0)
    if zero_stage == 3:  # the mixer reads dt_proj.weight directly (F.linear): gather its params as one unit
        from deepspeed.utils import set_z3_leaf_modules

        from mambadm.ssm import Mamba
        if any(isinstance(m, Mamba) for m in model.modules()):
            set_z3_leaf_modules(model, [Mamba])
    if cfg.train.compile:  # in place: the state dict keeps its keys, so checkpoints and exports are unchanged
        model.compile()
        accelerator.print("train.compile: the model is compiled with torch.compile (first steps are slow)")
    objective = Objective(model)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.steps)
    objective, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)

    state = TrainerState()
    resume_from = resolve_resume(run_dir, cfg.train.resume)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = TrainerState.load(resume_from)
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
        accelerator.print(f"{cfg.model.family}: {n_params:,} parameters; {len(train_shards)} training shards "
                          f"({data_lib.transitions_of(train_shards):,} transitions), {len(val_shards)} validation "
                          f"shards; {world} process(es), {accelerator.distributed_type}, precision "
                          f"{accelerator.mixed_precision}")
    if cfg.train.tensorboard:
        accelerator.init_trackers("tensorboard")
    metrics = MetricsLogger(accelerator, run_dir, state.step, cfg.train.steps, cfg.train.progress)

    def val_loss() -> float:
        if not val_shards:
            return float("nan")
        loader = data_lib.make_loader(val_shards, index, cfg.data, rank, world, seed=0, exact=True,
                                      num_workers=min(cfg.data.num_workers, len(val_shards) // world))
        return validate(accelerator, objective, loader, cfg.train.val_batches)

    def new_segment(step: int):  # the stream from `step` on is a pure function of (seed, rank, step)
        seed = data_lib.stream_seed(cfg.train.seed, step)
        return iter(data_lib.make_loader(train_shards, index, cfg.data, rank, world, seed=seed, exact=False))

    if state.step == 0 and val_shards:  # the starting point of the validation curve
        metrics.log({"step": 0, "val_loss": val_loss(), "params": n_params, "tokens_seen": 0, "flops": 0.0})
    batches = new_segment(state.step)
    first_batch, micro_batches = None, 0
    window = {"t": time.time(), "samples": 0, "tokens": 0}
    objective.train()
    while state.step < cfg.train.steps:
        loss_sum = torch.zeros((), device=accelerator.device)
        seen = torch.zeros(2, device=accelerator.device)  # windows, unpadded steps (this rank)
        grad_norm = None
        for _ in range(cfg.optim.grad_accum):
            batch = data_lib.to_device(next(batches), accelerator.device)
            first_batch = first_batch or data_fingerprint(batch)
            micro_batches += 1
            with accelerator.accumulate(objective):
                loss = objective(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(objective.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                scheduler.step() if accelerator.sync_gradients else None
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach() / cfg.optim.grad_accum
            seen += torch.stack([torch.tensor(float(batch["mask"].shape[0]), device=accelerator.device),
                                 batch["mask"].sum().float()])
        state.step += 1
        seen = accelerator.reduce(seen, reduction="sum")
        state.samples_seen += int(seen[0].item())
        state.transitions_seen += int(seen[1].item())
        state.tokens_seen = TOKENS_PER_STEP * state.transitions_seen
        window["samples"] += int(seen[0].item())
        window["tokens"] += TOKENS_PER_STEP * int(seen[1].item())

        at_ckpt = state.step % cfg.train.ckpt_every == 0 or state.step == cfg.train.steps
        at_val = state.step % cfg.train.val_every == 0 or at_ckpt
        at_log = state.step % cfg.train.log_every == 0 or at_val
        if at_log:
            loss_mean = accelerator.reduce(loss_sum, reduction="mean").item()
            elapsed = max(time.time() - window["t"], 1e-9)
            row = {"step": state.step, "loss": loss_mean, "val_loss": None, "lr": scheduler.get_last_lr()[0],
                   "grad_norm": None if grad_norm is None else float(grad_norm),
                   "samples_per_s": window["samples"] / elapsed, "tokens_per_s": window["tokens"] / elapsed,
                   "params": n_params, "tokens_seen": state.tokens_seen,
                   "transitions_seen": state.transitions_seen, "samples_seen": state.samples_seen,
                   "flops": flops_per_token * state.tokens_seen}
            if at_val:
                state.last_val = val_loss()
                row["val_loss"] = state.last_val
            better = state.best_val is None or (state.last_val or math.inf) < state.best_val
            if at_ckpt and state.last_val is not None and math.isfinite(state.last_val) and better:
                state.best_val, state.best_step = state.last_val, state.step  # best among checkpoints
            metrics.log(row)
            metrics.progress(state.step, loss_mean, row["samples_per_s"], row["tokens_per_s"])
            window = {"t": time.time(), "samples": 0, "tokens": 0}
        if at_ckpt:
            save_checkpoint(accelerator, run_dir, state, config_yaml)
            if accelerator.is_main_process:
                prune(run_dir, cfg.train.keep_last, state.best_step)
            accelerator.wait_for_everyone()
            if state.step < cfg.train.steps:
                batches = new_segment(state.step)
            window["t"] = time.time()
    metrics.close()

    full_state = accelerator.get_state_dict(objective)  # collective: gathers ZeRO-3 shards
    if accelerator.is_main_process:
        weights = {k.removeprefix("model."): v for k, v in full_state.items()}
        save_export(run_dir / "export", accelerator.unwrap_model(objective).model, cfg, spec, dataset_info(index),
                    state_dict=weights)
        accelerator.print(f"export written to {run_dir / 'export'}")
    write_rank_record(run_dir, accelerator, objective, first_batch, micro_batches)
    accelerator.wait_for_everyone()
    return state


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML run config (configs/train/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"mambadm.train: error: {e}", file=sys.stderr)
        return 2
    accelerator = build_accelerator(cfg)
    try:
        train(cfg, accelerator)
    except (ConfigError, data_lib.DataError, FileNotFoundError) as e:
        print(f"mambadm.train: error: {e}", file=sys.stderr)
        return 2
    finally:
        accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # DeepSpeed on CPU aborts at exit otherwise
    return 0


if __name__ == "__main__":
    sys.exit(main())
