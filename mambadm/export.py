"""The self-describing export directory (contract: docs/architecture.md, "Export").

``RUN/export/`` holds ``model.pt`` (a plain state dict), ``config.yaml`` (the resolved RunConfig), ``env_spec.json``
and ``dataset.json`` (the index fields evaluation needs). Neither writing nor reading it needs Accelerate or
DeepSpeed: the trainer gathers the full state dict first (also from a ZeRO-3 run) and hands it over.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from mambadm.config import EnvSpec, from_yaml_text, to_yaml

DATASET_KEYS = ("env", "eval_env", "source", "state_mean", "state_std", "returns", "env_spec", "totals")


def dataset_info(index: dict) -> dict:
    """The fields of a shard index that evaluation needs (env, normalisation, return stats)."""
    return {k: index.get(k) for k in DATASET_KEYS}


def spec_from_dict(d: dict) -> EnvSpec:
    known = {f.name for f in dataclasses.fields(EnvSpec)}
    return EnvSpec(**{k: v for k, v in d.items() if k in known})


def save_export(out_dir: str | Path, model: nn.Module, cfg: Any, spec: EnvSpec, info: dict,
                state_dict: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Writes the export atomically (temp dir, then rename over any older export). ``state_dict`` overrides
    ``model.state_dict()`` (pass the gathered one for sharded models)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    torch.save({k: v.detach().to("cpu").clone() for k, v in state.items()}, tmp / "model.pt")
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    spec_dict = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(spec)
    (tmp / "env_spec.json").write_text(json.dumps(spec_dict, indent=2))
    (tmp / "dataset.json").write_text(json.dumps(info, indent=2))
    old = out_dir.parent / f".{out_dir.name}.old"
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def load_export(export_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, EnvSpec, dict]:
    """``(model, cfg, spec, dataset_info)`` rebuilt from an export directory; the model is in eval mode."""
    from mambadm.model import build_model

    export_dir = Path(export_dir)
    for name in ("model.pt", "config.yaml", "env_spec.json", "dataset.json"):
        if not (export_dir / name).is_file():
            raise FileNotFoundError(f"{export_dir / name}: missing; not an export directory (see docs/training.md)")
    cfg = from_yaml_text((export_dir / "config.yaml").read_text())
    spec = spec_from_dict(json.loads((export_dir / "env_spec.json").read_text()))
    info = json.loads((export_dir / "dataset.json").read_text())
    model = build_model(cfg.model, spec)
    state = torch.load(export_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, spec, info
