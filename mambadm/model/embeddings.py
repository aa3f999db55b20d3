"""Token embeddings shared by MambaDM and the Decision Transformer, and the action head.

Every timestep t contributes three tokens, in this order: return-to-go R_t, state s_t, action a_t. Each is embedded
to d_model, a learned timestep embedding (timesteps clamped to the table) is added to all three, and the tokens are
interleaved into (B, 3K, d) = [R_1, s_1, a_1, R_2, s_2, a_2, ...], then LayerNorm and dropout. Predictions are read
at the state tokens, so a_t is predicted from R_<=t, s_<=t, a_<t.

Switches (ModelConfig; the reference's file and line for each in docs/protocol.md):

- ``timestep_encoding``: ``per_token`` (above; DT's gym code) or ``dt_global`` (DT's Atari code): one timestep per
  window, that of its first step in training and the current step when acting, added to all 3K tokens, plus a
  learned table of ``position_tokens`` per-token positions (both zero-initialised).
- ``token_norm``: the LayerNorm over every token (DT's gym code has it; its Atari code only dropout).
- ``init``: ``project`` or ``dt``. Atari, ``project``: every Linear / Embedding weight of the embeddings and the head
  N(0, 0.02), Linear biases 0, the timestep table zeros; the CNN's convolutions keep PyTorch's default. With
  PyTorch's defaults instead, the N(0, 1) timestep rows (norm ~8 at d=64) swamp the state token (norm ~0.1 out of
  the CNN), and training sits on a plateau before any visual feature is learnt (docs/model.md). Atari, ``dt``: as
  DT's Atari code, whose ``apply(_init_weights)`` runs before the CNN and the return embedding exist: only the
  action embedding N(0, 0.02) (set explicitly), the timestep and position tables zeros, the CNN (its Linear
  included) and the return Linear PyTorch's default, and a head N(0, 0.02) without bias. Vector states keep
  PyTorch's defaults under both, as DT's gym code does. The backbone's part of ``dt`` is the backbone's (dt.py).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from mambadm.config import EnvSpec

ATARI_FEATURES = 64 * 7 * 7  # the CNN's flattened output for an 84x84 input
DT_INIT_STD = 0.02  # the Decision Transformer's (minGPT's) std for Linear / Embedding weights
TIMESTEP_ENCODINGS = ("per_token", "dt_global")
INITS = ("project", "dt")


def dt_init(module: nn.Module) -> None:
    """The Decision Transformer's Atari init of ``module``'s Linear and Embedding layers: N(0, 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=DT_INIT_STD)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def atari_encoder(d_model: int, in_channels: int = 4) -> nn.Sequential:
    """The Decision Transformer's (= DQN's) Atari encoder: (N, C, 84, 84) float in [0, 1] -> (N, d_model)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 8, stride=4), nn.ReLU(),  # -> (32, 20, 20)
        nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),  # -> (64, 9, 9)
        nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),  # -> (64, 7, 7)
        nn.Flatten(), nn.Linear(ATARI_FEATURES, d_model), nn.Tanh(),
    )


def atari_encoder_flops(d_model: int, in_channels: int = 4) -> int:
    """Forward multiply-add FLOPs (2 per MAC) of `atari_encoder` for one state."""
    convs = [(in_channels, 32, 8, 20), (32, 64, 4, 9), (64, 64, 3, 7)]  # (c_in, c_out, kernel, output side)
    return sum(2 * ci * co * k * k * side * side for ci, co, k, side in convs) + 2 * ATARI_FEATURES * d_model


class TokenEmbedding(nn.Module):
    """(rtg, states, actions, timesteps) -> interleaved tokens (B, 3K, d), or the three token kinds separately."""

    def __init__(self, spec: EnvSpec, d_model: int, dropout: float, timestep_encoding: str = "per_token",
                 position_tokens: int = 0, token_norm: bool = True, init: str = "project") -> None:
        super().__init__()
        self.spec = spec
        atari = spec.obs_kind == "atari"
        if timestep_encoding not in TIMESTEP_ENCODINGS or init not in INITS:
            raise ValueError(f"model.timestep_encoding must be one of {TIMESTEP_ENCODINGS} and model.init one of "
                             f"{INITS}; got {timestep_encoding!r}, {init!r}")
        if atari and list(spec.obs_shape[1:]) != [84, 84]:
            raise ValueError(f"EnvSpec.obs_shape: the Atari encoder needs (C, 84, 84), got {list(spec.obs_shape)}")
        if not atari and (spec.obs_kind != "vector" or len(spec.obs_shape) != 1):
            raise ValueError(f"EnvSpec: obs_kind 'vector' needs obs_shape (obs_dim,), got {spec.obs_kind!r} "
                             f"{list(spec.obs_shape)}")
        self.rtg = nn.Sequential(nn.Linear(1, d_model), nn.Tanh()) if atari else nn.Linear(1, d_model)
        self.state = atari_encoder(d_model, spec.obs_shape[0]) if atari else nn.Linear(spec.obs_shape[0], d_model)
        if spec.discrete:
            self.action = nn.Sequential(nn.Embedding(spec.act_dim, d_model), nn.Tanh())
        else:
            self.action = nn.Linear(spec.act_dim, d_model)
        self.timestep = nn.Embedding(spec.max_timestep, d_model)
        self.global_timestep = timestep_encoding == "dt_global"
        if self.global_timestep:
            if position_tokens < 1:
                raise ValueError(f"model.position_tokens must be >= 1 with model.timestep_encoding=dt_global (DT's "
                                 f"Atari code: 3K + 1), got {position_tokens}")
            self.position = nn.Parameter(torch.zeros(position_tokens, d_model))  # DT's pos_emb
            self.position._no_weight_decay = True
        self.norm = nn.LayerNorm(d_model) if token_norm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        if atari and init == "project":
            dt_init(self)
        elif atari:  # DT's Atari code: only its action embedding is set explicitly (model_atari.py:157)
            nn.init.normal_(self.action[0].weight, std=DT_INIT_STD)
        if atari:
            nn.init.zeros_(self.timestep.weight)

    @classmethod
    def from_config(cls, spec: EnvSpec, cfg: Any) -> "TokenEmbedding":
        return cls(spec, cfg.d_model, cfg.dropout, cfg.timestep_encoding, cfg.position_tokens, cfg.token_norm,
                   cfg.init)

    # Frames go to the CNN channels-last on a GPU: cuDNN's bf16 convolutions run NHWC, and NCHW input made it
    # convert every activation first (17% of a DT training step's GPU time on an H200, benchmarks/RESULTS.md).
    channels_last_on_cuda = True

    def embed_states(self, states: Tensor) -> Tensor:
        """(B, K, *obs_shape) -> (B, K, d); uint8 frames are scaled to [0, 1]."""
        lead = states.shape[:2]
        x = states.reshape(-1, *states.shape[2:])
        x = x.float() / 255.0 if self.spec.obs_kind == "atari" else x.float()
        if x.is_cuda and x.dim() == 4 and self.channels_last_on_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.state(x).reshape(*lead, -1)

    def parts(self, rtg: Tensor, states: Tensor, actions: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Embeddings (B, K, d) of the R, s and a tokens with the timestep embedding added (before norm/dropout);
        with ``dt_global`` every step gets the embedding of the window's first timestep."""
        if self.global_timestep:
            timesteps = timesteps[:, :1]
        t = self.timestep(timesteps.clamp(0, self.spec.max_timestep - 1))
        actions = actions if self.spec.discrete else actions.float()
        return self.rtg(rtg.float()[..., None]) + t, self.embed_states(states) + t, self.action(actions) + t

    def finish(self, tokens: Tensor) -> Tensor:
        """LayerNorm + dropout over tokens (..., d); applied per token, so recurrent acting can call it per step."""
        return self.drop(self.norm(tokens))

    def step_tokens(self, rtg: Tensor, obs: Tensor, prev_action: Tensor, t: Tensor) -> Tensor:
        """The tokens one env step adds when acting recurrently: [a_{t-1}, R_t, s_t] (B, 3, d), norm + dropout.

        At t == 0 there is no previous action; the a token is still built (from action 0 / zeros) so that the
        shape stays fixed, and the recurrent model discards its effect (see GLoMa's segment starts).
        """
        if self.global_timestep:
            raise ValueError("model.timestep_encoding=dt_global gives a whole window one timestep, so a step cannot "
                             "be embedded on its own: act by re-encoding the window (the DT family does), or use "
                             "per_token")
        first = t == 0 if self.spec.discrete else (t == 0)[:, None].expand_as(prev_action)
        prev_action = prev_action.masked_fill(first, 0)
        time_now = self.timestep(t.clamp(0, self.spec.max_timestep - 1))
        time_prev = self.timestep((t - 1).clamp(0, self.spec.max_timestep - 1))
        a = self.action(prev_action if self.spec.discrete else prev_action.float()) + time_prev
        r = self.rtg(rtg.float()[:, None]) + time_now
        s = self.embed_states(obs[:, None])[:, 0] + time_now
        return self.finish(torch.stack([a, r, s], dim=1))

    def forward(self, rtg: Tensor, states: Tensor, actions: Tensor, timesteps: Tensor) -> Tensor:
        r, s, a = self.parts(rtg, states, actions, timesteps)
        tokens = torch.stack([r, s, a], dim=2).flatten(1, 2)  # (B, 3K, d): R_1 s_1 a_1 R_2 ...
        if self.global_timestep:
            if tokens.shape[1] > len(self.position):
                raise ValueError(f"model.position_tokens={len(self.position)} is less than the {tokens.shape[1]} "
                                 f"tokens of a {tokens.shape[1] // 3}-step window (DT's Atari code: 3K + 1)")
            tokens = tokens + self.position[:tokens.shape[1]]
        return self.finish(tokens)


class ActionHead(nn.Module):
    """Hidden state at a state token -> logits (discrete) or a tanh-squashed action (continuous)."""

    def __init__(self, spec: EnvSpec, d_model: int, init: str = "project") -> None:
        super().__init__()
        self.discrete = spec.discrete
        atari = spec.obs_kind == "atari"
        self.proj = nn.Linear(d_model, spec.act_dim, bias=not (atari and init == "dt"))  # DT Atari: bias=False
        if atari:
            dt_init(self)

    def forward(self, h: Tensor) -> Tensor:
        out = self.proj(h)
        return out if self.discrete else torch.tanh(out)
