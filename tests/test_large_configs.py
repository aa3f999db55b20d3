"""The configs for training the large presets (configs/train/atari-1b*.yaml, configs/accelerate/gpu-1.yaml,
deepspeed-zero3-*.yaml, configs/deepspeed/zero3-large.json): each loads through its own tool's loader (ours,
Accelerate's, DeepSpeed's), names the 1B presets of both families, keeps one global batch across GPU counts, fits
its memory plan, and dry-runs: the optimiser, schedule and checkpointed blocks it describes take one bf16 update."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mambadm.config import EnvSpec, load_config
from mambadm.model import build_model
from mambadm.optim import make_optimizer, make_scheduler

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"single": REPO / "configs/train/atari-1b.yaml", "multi": REPO / "configs/train/atari-1b-multi.yaml"}
ACCELERATE = {"single": "gpu-1", "multi": "deepspeed-zero3-gpus", "nodes": "deepspeed-zero3-nodes"}
FILLED_BY_TRAINER = {"train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                     "gradient_clipping"}  # mambadm/train.py build_accelerator; bf16.enabled: Accelerate
ATARI = EnvSpec("atari", [4, 84, 84], 18, True, 4096)
GPU_BYTES = 80e9


def accelerate_config(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(REPO / "configs/accelerate" / f"{name}.yaml"))  # unknown keys raise


def deepspeed_json(accel) -> dict:
    path = REPO / accel.deepspeed_config["deepspeed_config_file"]  # relative to the repository root, as launched
    assert path.is_file(), path
    return json.loads(path.read_text())


@pytest.mark.parametrize("kind", sorted(ACCELERATE))
def test_accelerate_configs_load_and_match_their_machines(kind):
    accel = accelerate_config(ACCELERATE[kind])
    if kind == "single":
        assert (accel.distributed_type.value, accel.num_processes, accel.mixed_precision) == ("NO", 1, "bf16")
        return
    assert accel.distributed_type.value == "DEEPSPEED" and accel.num_processes == 8 * accel.num_machines
    ds = deepspeed_json(accel)
    autos = {k for k, v in ds.items() if v == "auto"}
    assert autos == FILLED_BY_TRAINER and ds["bf16"]["enabled"] == "auto"
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]  # the export gathers the weights


def test_zero3_json_passes_deepspeeds_own_validation():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = deepspeed_json(accelerate_config(ACCELERATE["multi"]))
    cfg = load_config(TRAIN["multi"])
    ds.update(train_micro_batch_size_per_gpu=cfg.data.batch_size, gradient_accumulation_steps=cfg.optim.grad_accum,
              train_batch_size=cfg.data.batch_size * cfg.optim.grad_accum, gradient_clipping=cfg.optim.grad_clip)
    ds["bf16"]["enabled"] = True
    parsed = DeepSpeedConfig(ds)  # pydantic: an unknown or mistyped zero key raises
    assert parsed.zero_optimization_stage == 3
    with pytest.raises(Exception):
        DeepSpeedConfig({**ds, "zero_optimization": {**ds["zero_optimization"], "stage3_bogus": 1}})


@pytest.mark.parametrize("family", ["mambadm", "dt"])
def test_train_configs_name_the_1b_presets_and_one_global_batch(family):
    extra = [] if family == "mambadm" else ["model.family=dt"]
    preset = load_config(None, [f"model.family={family}", "model.size=1b"]).model
    batches = {}
    for kind, path in TRAIN.items():
        cfg = load_config(path, extra)
        assert (cfg.model.family, cfg.model.size) == (family, "1b")
        assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head) == \
            (preset.n_layer, preset.d_model, preset.n_head), kind  # no model key of the file overrides the preset
        assert cfg.train.mixed_precision == "bf16" and cfg.optim.fused
        processes = accelerate_config(ACCELERATE[kind]).num_processes
        batches[kind] = cfg.data.batch_size * cfg.optim.grad_accum * processes
    assert load_config(TRAIN["single"]).model.grad_checkpoint  # one GPU: the blocks are checkpointed
    assert batches["single"] == batches["multi"] == 512, batches


def test_memory_plan_of_the_1b_presets():
    """Weights, gradients and AdamW moments (float32: 16 bytes a parameter) take well under half of one 80 GB GPU,
    and a ZeRO-3 shard over 8 GPUs an eighth of that: the rest is for activations (measured in gpu_session.sh)."""
    for family in ("mambadm", "dt"):
        cfg = load_config(TRAIN["single"], [f"model.family={family}"])
        with torch.device("meta"):
            params = build_model(cfg.model, ATARI).num_params()
        assert 1e9 <= params and 16 * params < 0.25 * GPU_BYTES, (family, params)


@pytest.mark.parametrize("kind", sorted(TRAIN))
def test_train_config_dry_runs_one_bf16_update(kind):
    """The file's optimiser, schedule, precision and checkpointing on the smallest preset of each family (the 1B
    weights are built on the meta device only, above): one update under bf16 autocast moves the weights."""
    for family in ("mambadm", "dt"):
        cfg = load_config(TRAIN[kind], [f"model.family={family}", "model.size=xs", "model.backend=fast"])
        assert cfg.model.grad_checkpoint == (kind == "single")
        torch.manual_seed(0)
        model = build_model(cfg.model, ATARI).train()
        opt = make_optimizer(model, cfg.optim)
        sched = make_scheduler(opt, cfg.optim, cfg.train.steps)
        g = torch.Generator().manual_seed(0)
        b, k = 2, cfg.data.context_len
        batch = {"rtg": torch.rand(b, k, generator=g),
                 "states": torch.randint(0, 256, (b, k, 4, 84, 84), generator=g, dtype=torch.uint8),
                 "actions": torch.randint(0, 18, (b, k), generator=g), "timesteps": torch.arange(k).repeat(b, 1),
                 "mask": torch.ones(b, k, dtype=torch.bool)}
        before = [p.detach().clone() for p in model.parameters()]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        assert torch.isfinite(loss)
        moved = sum(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert moved > 0.9 * len(before), (family, moved, len(before))
