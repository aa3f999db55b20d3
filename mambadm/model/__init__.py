"""Decision makers: MambaDM (GLoMa blocks) and the Decision Transformer baseline, built from a ModelConfig."""
from __future__ import annotations

from typing import Any

from mambadm.config import EnvSpec, ModelConfig
from mambadm.model.base import DecisionModel
from mambadm.model.dt import DecisionTransformer
from mambadm.model.mambadm import MambaDM

FAMILIES = {"mambadm": MambaDM, "dt": DecisionTransformer}


def build_model(model_cfg: Any, spec: Any) -> DecisionModel:
    """`model_cfg`: ModelConfig (dataclass or OmegaConf); `spec`: EnvSpec (dataclass, OmegaConf or dict)."""
    cfg = _as(ModelConfig, model_cfg)
    spec = _as(EnvSpec, spec)
    if cfg.family not in FAMILIES:
        raise ValueError(f"model.family must be one of {list(FAMILIES)}, got {cfg.family!r}")
    return FAMILIES[cfg.family](cfg, spec)


def _as(cls: type, value: Any) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    from omegaconf import OmegaConf

    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else cls(**vars(value))


__all__ = ["DecisionModel", "DecisionTransformer", "MambaDM", "build_model"]
