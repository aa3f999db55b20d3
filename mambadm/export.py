"""The self-describing export directory (contract: docs/architecture.md, "Export").

``RUN/export/`` holds ``model.pt`` (a plain state dict), ``config.yaml`` (the resolved RunConfig), ``env_spec.json``
and ``dataset.json`` (the index fields evaluation needs). Neither writing nor reading it needs Accelerate or
DeepSpeed: the trainer gathers the full state dict first (also from a ZeRO-3 run) and hands it over.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from data_pipeline.atomic import atomic_path
from mambadm.config import EnvSpec, from_yaml_text, to_yaml

DATASET_KEYS = ("env", "eval_env", "source", "state_mean", "state_std", "returns", "env_spec", "totals")


def dataset_info(index: dict) -> dict:
    """The fields of a shard index that evaluation needs (env, normalisation, return stats)."""
    return {k: index.get(k) for k in DATASET_KEYS}


def save_export(out_dir: str | Path, model: nn.Module, cfg: Any, spec: EnvSpec, info: dict,
                state_dict: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Writes the export atomically (temp dir, then rename over any older export). ``state_dict`` overrides
    ``model.state_dict()`` (pass the gathered one for sharded models)."""
    out_dir = Path(out_dir)
    state = state_dict if state_dict is not None else model.state_dict()
    spec = spec if isinstance(spec, EnvSpec) else EnvSpec.from_dict(spec, "save_export's spec")
    with atomic_path(out_dir, directory=True) as tmp:
        torch.save({k: v.detach().to("cpu").clone() for k, v in state.items()}, tmp / "model.pt")
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        (tmp / "env_spec.json").write_text(json.dumps(spec.to_dict(), indent=2))
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2))
    return out_dir


def load_export(export_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, EnvSpec, dict]:
    """``(model, cfg, spec, dataset_info)`` rebuilt from an export directory; the model is in eval mode."""
    from mambadm.model import build_model

    export_dir = Path(export_dir)
    for name in ("model.pt", "config.yaml", "env_spec.json", "dataset.json"):
        if not (export_dir / name).is_file():
            raise FileNotFoundError(f"{export_dir / name}: missing; not an export directory (see docs/training.md)")
    cfg = from_yaml_text((export_dir / "config.yaml").read_text())
    spec = EnvSpec.from_dict(json.loads((export_dir / "env_spec.json").read_text()), str(export_dir / "env_spec.json"))
    info = json.loads((export_dir / "dataset.json").read_text())
    model = build_model(cfg.model, spec)
    state = torch.load(export_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, spec, info
