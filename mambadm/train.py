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
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from mambadm import data as data_lib
from mambadm.checkpoint import TrainerState, prune, resolve_resume, save_checkpoint
from mambadm.config import ConfigError, EnvSpec, load_config, to_yaml
from mambadm.export import dataset_info, save_export
from mambadm.metrics import MetricsLogger, check_trackers, flat_params, log_export, start_trackers
from mambadm.model import DecisionModel, build_model
from mambadm.model.base import TOKENS_PER_STEP
from mambadm.optim import make_optimizer, make_scheduler


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


def zero_stage(accelerator: Any) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0) if plugin is not None else 0


def mark_zero3_leaf_modules(model: DecisionModel, accelerator: Any) -> None:
    """Under ZeRO-3, the module classes the model declares (``zero3_leaf_modules``) are gathered as one unit."""
    leaves = model.zero3_leaf_modules()
    if zero_stage(accelerator) == 3 and leaves:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, leaves)


@dataclass(frozen=True)
class Boundary:
    """What the end of a step triggers. A checkpoint implies validation, and validation implies a log row."""

    log: bool
    validate: bool
    checkpoint: bool


def boundary_at(step: int, train_cfg: Any) -> Boundary:
    """The cadences ``train.log_every`` / ``val_every`` / ``ckpt_every`` at ``step`` (1-based: the updates done);
    the final step (``train.steps``) always checkpoints."""
    checkpoint = step % train_cfg.ckpt_every == 0 or step == train_cfg.steps
    validate = step % train_cfg.val_every == 0 or checkpoint
    return Boundary(log=step % train_cfg.log_every == 0 or validate, validate=validate, checkpoint=checkpoint)


class Throughput:
    """Samples and tokens since the last restart (after a log row or a checkpoint), for samples/s and tokens/s."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.start, self.samples, self.tokens = time.time(), 0, 0

    def add(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens

    def rates(self) -> tuple[float, float]:
        elapsed = max(time.time() - self.start, 1e-9)
        return self.samples / elapsed, self.tokens / elapsed


@dataclass
class StepResult:
    loss: torch.Tensor  # mean over the step's micro-batches, this rank
    grad_norm: Optional[torch.Tensor]  # of the synchronised gradients, before clipping


class Trainer:
    """One run: the constructor sets up data, model, optimizer and resume; ``fit`` runs ``train_step`` and
    ``on_boundary`` (log / validate / checkpoint) until ``train.steps``, then ``export``. ``state`` (step, samples,
    transitions and tokens seen, validation losses) is checkpointed with the model and restored on resume."""

    def __init__(self, cfg: Any, accelerator: Any):
        self.cfg, self.accelerator = cfg, accelerator
        self.run_dir = Path(cfg.train.run_dir)
        self.config_yaml = to_yaml(cfg)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.setup_data()
        self.setup_model()
        self.state = self.resume()
        self.announce()
        start_trackers(accelerator, cfg, self.run_dir, flat_params(OmegaConf.to_container(cfg, resolve=True)))
        self.metrics = MetricsLogger(accelerator, self.run_dir, self.state.step, cfg.train.steps, cfg.train.progress)
        self.throughput = Throughput()
        self.first_batch: Optional[str] = None  # fingerprint, for ranks/
        self.micro_batches = 0

    # ------------------------------------------------------------------------------------------- setup
    def setup_data(self) -> None:
        self.index = data_lib.read_index(self.cfg.data.shards)
        self.train_shards, self.val_shards = data_lib.select_shards(self.index, self.cfg.data)
        if self.val_shards and len(self.val_shards) < self.world:
            raise ConfigError(f"data.val_shards={len(self.val_shards)}: the exact validation pass needs at least "
                              f"one held-out shard per process ({self.world})")
        index_path = Path(self.cfg.data.shards) / "index.json"
        self.spec = EnvSpec.from_dict(self.index.get("env_spec"), f"{index_path}: env_spec")

    def setup_model(self) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, self.spec)
        self.n_params = model.num_params()
        self.flops_per_token = model.flops_per_token(cfg.data.context_len)
        mark_zero3_leaf_modules(model, accelerator)
        if cfg.train.compile:  # in place: the state dict keeps its keys, so checkpoints and exports are unchanged
            model.compile()
            accelerator.print("train.compile: the model is compiled with torch.compile (first steps are slow)")
        optimizer = make_optimizer(model, cfg.optim)
        scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.steps)
        self.objective, self.optimizer, self.scheduler = accelerator.prepare(Objective(model), optimizer, scheduler)

    def resume(self) -> TrainerState:
        resume_from = resolve_resume(self.run_dir, self.cfg.train.resume)
        if resume_from is None:
            return TrainerState()
        self.accelerator.load_state(str(resume_from))
        state = TrainerState.load(resume_from)
        self.accelerator.print(f"resumed from {resume_from} at step {state.step}")
        return state

    def announce(self) -> None:
        """The resolved config into the run directory and one startup line (main process)."""
        accelerator, train_shards = self.accelerator, self.train_shards
        if not accelerator.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(self.config_yaml)
        accelerator.print(f"{self.cfg.model.family}: {self.n_params:,} parameters; {len(train_shards)} training "
                          f"shards ({data_lib.transitions_of(train_shards):,} transitions), {len(self.val_shards)} "
                          f"validation shards; {self.world} process(es), {accelerator.distributed_type}, precision "
                          f"{accelerator.mixed_precision}")

    def new_segment(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """The training stream from ``step`` on, a pure function of (seed, rank, step)."""
        seed = data_lib.stream_seed(self.cfg.train.seed, step)
        return iter(data_lib.make_loader(self.train_shards, self.index, self.cfg.data, self.rank, self.world,
                                         seed=seed, exact=False))

    # ------------------------------------------------------------------------------------------- the loop
    def fit(self) -> TrainerState:
        if self.state.step == 0 and self.val_shards:  # the starting point of the validation curve
            self.metrics.log({"step": 0, "val_loss": self.val_loss(), "params": self.n_params, "tokens_seen": 0,
                              "flops": 0.0})
        self.batches = self.new_segment(self.state.step)
        self.throughput.restart()
        self.objective.train()
        while self.state.step < self.cfg.train.steps:
            result = self.train_step()
            self.on_boundary(boundary_at(self.state.step, self.cfg.train), result)
        self.metrics.close()
        self.export()
        return self.state

    def train_step(self) -> StepResult:
        """One optimizer update over ``optim.grad_accum`` micro-batches; advances the state's step and counts."""
        device, accum = self.accelerator.device, self.cfg.optim.grad_accum
        loss_sum = torch.zeros((), device=device)
        seen = torch.zeros(2, device=device)  # windows, unpadded steps (this rank)
        grad_norm = None
        for _ in range(accum):
            batch = data_lib.to_device(next(self.batches), device)
            self.first_batch = self.first_batch or data_fingerprint(batch)
            self.micro_batches += 1
            loss, norm = self.micro_step(batch)
            grad_norm = grad_norm if norm is None else norm
            loss_sum += loss / accum
            seen += torch.stack([torch.tensor(float(batch["mask"].shape[0]), device=device),
                                 batch["mask"].sum().float()])
        self.count(seen)
        return StepResult(loss=loss_sum, grad_norm=grad_norm)

    def micro_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Forward and backward of one micro-batch; the update (clip, AdamW, schedule) at the accumulation's end."""
        accelerator, grad_norm = self.accelerator, None
        with accelerator.accumulate(self.objective):
            loss = self.objective(batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(self.objective.parameters(), self.cfg.optim.grad_clip)
            self.optimizer.step()
            if accelerator.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm

    def count(self, seen: torch.Tensor) -> None:
        """One more update; its windows and unpadded steps, summed over ranks, into the state and the throughput."""
        samples, transitions = (int(v) for v in self.accelerator.reduce(seen, reduction="sum").tolist())
        state = self.state
        state.step += 1
        state.samples_seen += samples
        state.transitions_seen += transitions
        state.tokens_seen = TOKENS_PER_STEP * state.transitions_seen
        self.throughput.add(samples, TOKENS_PER_STEP * transitions)

    # ------------------------------------------------------------------------------------------- boundaries
    def on_boundary(self, boundary: Boundary, result: StepResult) -> None:
        if boundary.log:
            self.log(result, validate=boundary.validate)
        if boundary.checkpoint:
            self.checkpoint()

    def log(self, result: StepResult, validate: bool) -> None:
        """A metrics.jsonl row (and TensorBoard scalars, progress bar) for the step just done."""
        state = self.state
        loss = self.accelerator.reduce(result.loss, reduction="mean").item()
        samples_per_s, tokens_per_s = self.throughput.rates()
        row = {"step": state.step, "loss": loss, "val_loss": None, "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": None if result.grad_norm is None else float(result.grad_norm),
               "samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s, "params": self.n_params,
               "tokens_seen": state.tokens_seen, "transitions_seen": state.transitions_seen,
               "samples_seen": state.samples_seen, "flops": self.flops_per_token * state.tokens_seen}
        if validate:
            state.last_val = row["val_loss"] = self.val_loss()
        self.metrics.log(row)
        self.metrics.progress(state.step, loss, samples_per_s, tokens_per_s)
        self.throughput.restart()

    def val_loss(self) -> float:
        if not self.val_shards:
            return float("nan")
        workers = min(self.cfg.data.num_workers, len(self.val_shards) // self.world)
        loader = data_lib.make_loader(self.val_shards, self.index, self.cfg.data, self.rank, self.world, seed=0,
                                      exact=True, num_workers=workers)
        return validate(self.accelerator, self.objective, loader, self.cfg.train.val_batches)

    def checkpoint(self) -> None:
        """Notes the best validation loss among checkpoints, saves atomically, prunes, and restarts the data
        stream at this step (so a run resumed here reads the same batches)."""
        state, accelerator = self.state, self.accelerator
        val = state.last_val
        if val is not None and math.isfinite(val) and (state.best_val is None or val < state.best_val):
            state.best_val, state.best_step = val, state.step
        save_checkpoint(accelerator, self.run_dir, state, self.config_yaml)
        if accelerator.is_main_process:
            prune(self.run_dir, self.cfg.train.keep_last, state.best_step)
        accelerator.wait_for_everyone()
        if state.step < self.cfg.train.steps:
            self.batches = self.new_segment(state.step)
        self.throughput.restart()

    # ------------------------------------------------------------------------------------------- the end
    def export(self) -> None:
        """The full weights (gathered from ZeRO-3 shards: a collective) into RUN/export; each rank's record."""
        accelerator, export_dir = self.accelerator, self.run_dir / "export"
        full_state = accelerator.get_state_dict(self.objective)
        if accelerator.is_main_process:
            weights = {k.removeprefix("model."): v for k, v in full_state.items()}
            save_export(export_dir, accelerator.unwrap_model(self.objective).model, self.cfg, self.spec,
                        dataset_info(self.index), state_dict=weights)
            accelerator.print(f"export written to {export_dir}")
            log_export(accelerator, export_dir)
        write_rank_record(self.run_dir, accelerator, self.objective, self.first_batch, self.micro_batches)
        accelerator.wait_for_everyone()


def train(cfg: Any, accelerator: Any) -> TrainerState:
    return Trainer(cfg, accelerator).fit()


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML run config (configs/train/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_trackers(cfg.train)  # an unknown tracker or a missing package: an error before anything starts
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
