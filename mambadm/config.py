"""Typed configuration: dataclasses merged with YAML files and ``key=value`` overrides (OmegaConf).

Order of precedence, lowest first::

    dataclass defaults < size preset (configs/model/<family>-<size>.yaml) < YAML file(s) < command line

except that a size (or family) named on the command line puts its preset above the YAML file's model keys.

Unknown keys are errors that name the key and where it came from. A YAML file may list other YAML files under
``include:`` (paths relative to that file); they are merged first, in order.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

CONFIGS_DIR = Path(os.environ.get("MAMBADM_CONFIGS", Path(__file__).resolve().parents[1] / "configs"))


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the source."""


ENV_SPEC_TYPES = {"obs_kind": str, "obs_shape": lambda v: [int(x) for x in v], "act_dim": int, "discrete": bool,
                  "max_timestep": int}  # EnvSpec.from_dict: each field and how a plain value becomes it


@dataclass
class EnvSpec:
    """What the model must know about the task; comes from a dataset's index.json, saved with every export."""

    obs_kind: str = "atari"  # atari: (frame_stack, 84, 84) uint8 frames | vector: (obs_dim,) float states
    obs_shape: list[int] = field(default_factory=lambda: [4, 84, 84])
    act_dim: int = 4  # number of discrete actions, or the dimension of a continuous action
    discrete: bool = True  # discrete -> cross-entropy on logits; continuous -> tanh output + MSE
    max_timestep: int = 4096  # size of the timestep embedding table (timesteps are clamped to it)

    @classmethod
    def from_dict(cls, d: Any, source: str = "env_spec") -> "EnvSpec":
        """The spec from a plain mapping (index.json's ``env_spec``, an export's env_spec.json, a policy payload):
        every field required, typed here, other keys ignored. A missing key or a bad value is a ConfigError naming
        ``source``, the key, and what was expected."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a mapping with keys {list(ENV_SPEC_TYPES)}, got {d!r}")
        missing = [k for k in ENV_SPEC_TYPES if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing key(s) {missing} (an env spec needs {list(ENV_SPEC_TYPES)}; "
                              f"found {sorted(d)})")
        try:
            return cls(**{k: convert(d[k]) for k, convert in ENV_SPEC_TYPES.items()})
        except (TypeError, ValueError):
            bad = {k: d[k] for k in ENV_SPEC_TYPES}
            raise ConfigError(f"{source}: expected obs_kind: str, obs_shape: list of int, act_dim: int, "
                              f"discrete: bool, max_timestep: int; got {bad}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelConfig:
    family: str = "mambadm"  # mambadm | dt
    size: str = ""  # preset name: loads configs/model/<family>-<size>.yaml under the explicit keys
    n_layer: int = 3
    d_model: int = 128
    dropout: float = 0.1
    ffn_mult: int = 4  # FFN hidden = ffn_mult * d_model
    # MambaDM / Mamba mixer (mamba_ssm defaults)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    local_window: int = 4  # timesteps per local window: the local Mamba sees 3*local_window tokens
    fusion: str = "add"  # one of mambadm.model.gloma.FUSIONS: add | gate | concat
    backend: str = "auto"  # one of mambadm.ssm.backends.BACKENDS: auto | ref | fast | cpp | cuda | triton
    # Decision Transformer
    n_head: int = 4
    activation: str = "gelu"  # the DT's FFN activation: gelu (DT's Atari code) | relu (DT's gym code)
    # Reference switches (docs/protocol.md)
    timestep_encoding: str = "per_token"  # per_token | dt_global (DT Atari: one timestep per window + positions)
    position_tokens: int = 0  # dt_global: rows of the learned per-token position table (DT Atari: 3K + 1)
    token_norm: bool = True  # LayerNorm over every token (DT's gym code; its Atari code has only dropout)
    init: str = "project"  # project | dt: the reference's initialisation (mambadm/model/embeddings.py)
    grad_checkpoint: bool = False  # recompute each block's activations in the backward (large presets, docs/training.md)


@dataclass
class DataConfig:
    shards: str = "data/shards/breakout"  # directory holding index.json and the tar shards
    context_len: int = 30  # K timesteps per training window (also the window for mode=window acting)
    batch_size: int = 64  # per process
    num_workers: int = 2  # DataLoader workers per process
    subset_transitions: int = 0  # dataset-size axis: 0 = all; else the nested subset with at least this many
    subset_fraction: float = 1.0  # dataset-size axis as a fraction (used when subset_transitions == 0)
    subset_seed: int = 0  # permutation seed of the nested subsets
    val_shards: int = 1  # shards held out for validation (never part of any training subset)
    rtg_scale: float = 1.0  # returns-to-go are divided by this (1 for Atari, 1000 for MuJoCo)
    frame_stack: int = 4  # Atari frames stacked at load time
    shuffle_buffer: int = 2000  # samples kept for shuffling in the training stream
    val_stride: int = 1  # validation: a window starts at every val_stride-th step of each episode (1: every step)
    window_cut: str = "padded"  # training windows at an episode end: padded (+ masked) | shifted back (DT Atari)


@dataclass
class OptimConfig:
    lr: float = 6e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    grad_accum: int = 1
    fused: bool = True  # torch's fused AdamW kernel (CPU and CUDA): one pass over all parameters per step
    decay: str = "groups"  # groups: no decay on biases, norms, embeddings | all (DT's gym code)
    schedule: str = "cosine"  # cosine: warmup_steps, then down to min_lr_ratio at train.steps | dt_tokens (DT Atari)
    tokens_per_update: int = 0  # dt_tokens: action tokens per update = data.batch_size x data.context_len x grad_accum
    warmup_tokens: int = 10_240  # dt_tokens: linear warmup (DT: 512 x 20)
    final_tokens: int = 0  # dt_tokens: where the cosine meets its floor; 0 = 6/5 of the run (DT: 6 epochs' tokens)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 1000  # optimizer updates
    seed: int = 0
    log_every: int = 10
    val_every: int = 200
    val_batches: int = 20
    ckpt_every: int = 200
    keep_last: int = 2
    resume: str = "auto"  # auto | never | <checkpoint dir>
    mixed_precision: str = "auto"  # auto (bf16 on GPU, no on CPU) | no | bf16
    compile: bool = False  # torch.compile the model in place (module.compile(); checkpoints keep their keys)
    tensorboard: bool = True  # false leaves tensorboard out of `trackers`
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # + mlflow, wandb, ... (docs/training.md)
    project: str = "mambadm"  # MLflow experiment / W&B project of the run (a grid uses its own name)
    run_name: str = ""  # the tracker run's name; empty = the run directory's name
    tracking_uri: str = ""  # MLflow store (sqlite:///runs/mlflow.db, http://host:5000); empty = $MLFLOW_TRACKING_URI
    progress: bool = True


@dataclass
class EvalConfig:
    episodes: int = 10  # per target return
    actors: int = 2
    envs_per_actor: int = 1
    targets: list[float] = field(default_factory=list)  # empty = the protocol's default targets for the env
    mode: str = "recurrent"  # recurrent (O(1) per action) | window (re-run the last K steps)
    sample: bool = True  # sample actions from the softmax (Atari protocol) or act greedily
    seed: int = 0
    repeat_action_probability: float = 0.0  # sticky actions (DQN-Replay data was collected with 0.25)
    noop_max: int = 30
    noop_min: int = 1  # no-op starts draw from [noop_min, noop_max] (gymnasium: 1..30; DT: 0..29)
    frame_processing: str = "dopamine"  # dopamine: max-pool, then INTER_AREA (as the data) | dt: INTER_LINEAR, then max
    max_episode_frames: int = 108_000  # Atari cap in emulator frames
    max_episode_steps: int = 1000  # MuJoCo episode length
    mujoco_version: str = "v5"  # v5 | v4
    device: str = "cpu"
    frame_skip: int = 4  # Atari action repeat (max-pool of the last two frames)
    frame_padding: str = "zero"  # zero | reset: what fills the frame stack before the first frame (DT/Dopamine: zero)
    terminal_on_life_loss: bool = False
    full_action_space: bool = False  # False = the game's minimal action set
    state_std_eps: float = 1e-6  # MuJoCo states: (s - mean) / (std + eps), as in Decision Transformer
    env_backend: str = "gymnasium"  # gymnasium (the reference protocol) | envpool (Atari, MuJoCo; docs/evaluation.md)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {  # keys with a fixed set of values; model.fusion and model.backend: see `choices`
    "model.family": ("mambadm", "dt"),
    "train.mixed_precision": ("auto", "no", "bf16"),
    "eval.mode": ("recurrent", "window"),
    "eval.mujoco_version": ("v4", "v5"),
    "eval.frame_padding": ("zero", "reset"),
    "eval.frame_processing": ("dopamine", "dt"),
    "data.window_cut": ("padded", "shifted"),
    "model.activation": ("gelu", "relu"),
    "model.timestep_encoding": ("per_token", "dt_global"),
    "model.init": ("project", "dt"),
    "optim.decay": ("groups", "all"),
    "optim.schedule": ("cosine", "dt_tokens"),
    "eval.env_backend": ("gymnasium", "envpool"),  # evaluation.batch.ENV_BACKENDS
}


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Reads a YAML file, resolving its ``include:`` list (paths relative to the file) first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"include cycle through {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors come in several types
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(raw).__name__}")
    includes = raw.pop("include", None) or []
    merged = OmegaConf.create()
    for inc in [includes] if isinstance(includes, str) else includes:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / inc, seen + (path.resolve(),)))
    return OmegaConf.merge(merged, raw)


def _merge_strict(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        raise ConfigError(f"{source}: unknown config key '{e.full_key}'") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{source}: bad value for '{key}': {e.msg if hasattr(e, 'msg') else e}") from None


def preset_path(family: str, size: str) -> Path:
    return CONFIGS_DIR / "model" / f"{family}-{size}.yaml"


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                schema: type = RunConfig) -> Any:
    """Builds a typed config: defaults < preset < YAML ``path`` < ``overrides`` (``key=value`` strings; a size
    chosen there puts its preset above the YAML).

    Returns an OmegaConf object typed by ``schema`` (attribute access, struct mode: unknown keys raise).
    """
    overrides = list(overrides or [])
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"command line: expected key=value, got '{o}'")
    user = _read_yaml(Path(path)) if path else OmegaConf.create()
    source = str(path) if path else "config"
    try:
        cli = OmegaConf.from_dotlist(overrides)
    except Exception as e:
        raise ConfigError(f"command line: cannot parse overrides {overrides}: {e}") from None
    cfg = OmegaConf.structured(schema)
    preset = None
    if schema is RunConfig:
        probe = _merge_strict(_merge_strict(cfg, user, source), cli, "command line")
        if probe.model.size:
            p = preset_path(probe.model.family, probe.model.size)
            if not p.is_file():
                known = sorted(x.stem for x in (CONFIGS_DIR / "model").glob(f"{probe.model.family}-*.yaml"))
                raise ConfigError(f"model.size='{probe.model.size}': no preset {p.name}; known: {known}")
            preset = (OmegaConf.create({"model": _read_yaml(p)}), str(p))
    # A preset sits right under the layer that chose it: a size named on the command line beats the YAML's model
    # keys; a size named in the YAML yields to the YAML's own model keys. The command line always wins.
    size_from_cli = OmegaConf.select(cli, "model.size") is not None or OmegaConf.select(cli, "model.family") is not None
    if preset and not size_from_cli:
        cfg = _merge_strict(cfg, *preset)
    cfg = _merge_strict(cfg, user, source)
    if preset and size_from_cli:
        cfg = _merge_strict(cfg, *preset)
    cfg = _merge_strict(cfg, cli, "command line")
    validate(cfg)
    return cfg


def choices() -> dict[str, tuple[str, ...]]:
    """Every key with a fixed set of values. The fusion and backend lists live beside their code and are imported
    here, when a config is validated, so that importing this module stays free of torch."""
    from mambadm.model.gloma import FUSIONS
    from mambadm.ssm.backends import BACKENDS

    return {**CHOICES, "model.fusion": tuple(FUSIONS), "model.backend": tuple(BACKENDS)}


def validate(cfg: Any) -> None:
    for key, allowed in choices().items():
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except Exception:
            continue
        if value == "False" and "no" in allowed:  # YAML reads a bare `no` as false, which a str field keeps as 'False'
            OmegaConf.update(cfg, key, "no")
            value = "no"
        if value is not None and value not in allowed:
            raise ConfigError(f"'{key}' must be one of {list(allowed)}, got '{value}'")
    if OmegaConf.select(cfg, "optim.schedule") == "dt_tokens":  # tokens are counted per process, as on DT's one GPU
        tokens = cfg.data.batch_size * cfg.data.context_len * cfg.optim.grad_accum
        if cfg.optim.tokens_per_update != tokens:
            raise ConfigError(f"optim.tokens_per_update must equal data.batch_size x data.context_len x "
                              f"optim.grad_accum = {tokens} with optim.schedule=dt_tokens, got "
                              f"{cfg.optim.tokens_per_update}")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def from_yaml_text(text: str, schema: type = RunConfig) -> Any:
    """Rebuilds a typed config from a saved (resolved) YAML text, e.g. a checkpoint's config.yaml."""
    return _merge_strict(OmegaConf.structured(schema), OmegaConf.create(text), "saved config")


def to_object(cfg: Any) -> Any:
    """The plain dataclass instance behind an OmegaConf config."""
    return OmegaConf.to_object(cfg)
