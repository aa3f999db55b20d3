"""Token embeddings shared by MambaDM and the Decision Transformer, and the action head.

Every timestep t contributes three tokens, in this order: return-to-go R_t, state s_t, action a_t. Each is embedded
to d_model, a learned timestep embedding (timesteps clamped to the table) is added to all three, and the tokens are
interleaved into (B, 3K, d) = [R_1, s_1, a_1, R_2, s_2, a_2, ...], then LayerNorm and dropout. Predictions are read
at the state tokens, so a_t is predicted from R_<=t, s_<=t, a_<t.

Atari initialisation follows the Decision Transformer's Atari code (minGPT's ``_init_weights``): Linear and Embedding
weights N(0, 0.02), Linear biases 0, the timestep table zeros (its ``global_pos_emb``); the CNN's convolutions keep
PyTorch's default. With PyTorch's defaults instead, the N(0, 1) timestep rows (norm ~8 at d=64) swamp the state token
(norm ~0.1 out of the CNN), and training sits on a plateau before any visual feature is learnt (docs/model.md).
Vector-state models keep PyTorch's defaults, as the Decision Transformer's gym code does.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from mambadm.config import EnvSpec

ATARI_FEATURES = 64 * 7 * 7  # the CNN's flattened output for an 84x84 input
DT_INIT_STD = 0.02  # the Decision Transformer's (minGPT's) std for Linear / Embedding weights


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

    def __init__(self, spec: EnvSpec, d_model: int, dropout: float) -> None:
        super().__init__()
        self.spec = spec
        atari = spec.obs_kind == "atari"
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
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        if atari:
            dt_init(self)
            nn.init.zeros_(self.timestep.weight)

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
        """Embeddings (B, K, d) of the R, s and a tokens with the timestep embedding added (before norm/dropout)."""
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
        return self.finish(tokens)


class ActionHead(nn.Module):
    """Hidden state at a state token -> logits (discrete) or a tanh-squashed action (continuous)."""

    def __init__(self, spec: EnvSpec, d_model: int) -> None:
        super().__init__()
        self.discrete = spec.discrete
        self.proj = nn.Linear(d_model, spec.act_dim)
        if spec.obs_kind == "atari":
            dt_init(self)

    def forward(self, h: Tensor) -> Tensor:
        out = self.proj(h)
        return out if self.discrete else torch.tanh(out)
