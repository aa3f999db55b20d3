"""What MambaDM and the Decision Transformer share: embeddings, action head, loss, window acting, counting.

A subclass provides `backbone(tokens) -> hidden` ((B, T, d) -> (B, T, d), final norm included), its own per-token
forward FLOPs (`backbone_flops_per_token`) and, where it has one, a recurrent `act`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mambadm.config import EnvSpec, ModelConfig
from mambadm.model.embeddings import ActionHead, TokenEmbedding, atari_encoder_flops

BATCH_KEYS = ("rtg", "states", "actions", "timesteps")  # "frames" may stand in for "states", see batch_states
TOKENS_PER_STEP = 3  # a timestep is three tokens: return-to-go, state, action


def batch_states(batch: dict[str, Tensor], frame_stack: int) -> Tensor:
    """The states (B, K, *obs_shape) of a batch: batch["states"], or the frame stacks of an Atari loader batch.

    The loader ships Atari frames unstacked, batch["frames"] (B, K + frame_stack - 1, H, W) uint8, 1/frame_stack of
    the bytes of the stacks; here they become (B, K, frame_stack, H, W) as a view, on whatever device they are:
    stack t holds frames t .. t + frame_stack - 1 of the strip.
    """
    if "states" in batch or "frames" not in batch:
        return batch["states"]
    return batch["frames"].unfold(1, frame_stack, 1).permute(0, 1, 4, 2, 3)


@dataclass
class WindowState:
    """The last K steps of every env (newest in the last slot) and how many of them belong to the current episode."""

    rtg: Tensor  # (B, K)
    obs: Tensor  # (B, K, *obs_shape)
    actions: Tensor  # (B, K) or (B, K, act_dim)
    timesteps: Tensor  # (B, K)
    length: Tensor  # (B,) valid steps at the end of the buffers

    def advance(self, model: "DecisionModel", rtg: Tensor, obs: Tensor, prev_action: Tensor, t: Tensor) -> Tensor:
        return model.act_window(self, rtg, obs, prev_action, t)[0]


@dataclass
class TokenWindow:
    """The last K steps of every env as embedded tokens, newest last: (B, K, 3, d) holding R, s, a per step (the
    newest step's a token is a placeholder until the next call supplies a_t), and how many steps belong to the
    current episode. Each call embeds only its new step, where `WindowState` re-encodes the whole window."""

    tokens: Tensor  # (B, K, 3, d)
    length: Tensor  # (B,)

    def advance(self, model: "DecisionModel", rtg: Tensor, obs: Tensor, prev_action: Tensor, t: Tensor) -> Tensor:
        return model.act_token_window(self, rtg, obs, prev_action, t)[0]


class DecisionModel(nn.Module):
    """Return-conditioned sequence model over (R, s, a) tokens; subclasses supply the backbone."""

    def __init__(self, cfg: ModelConfig, spec: EnvSpec) -> None:
        super().__init__()
        self.cfg, self.spec = cfg, spec
        self.embed = TokenEmbedding.from_config(spec, cfg)
        self.head = ActionHead(spec, cfg.d_model, cfg.init)

    # ------------------------------------------------------------------------------------------- training
    def backbone(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def run_layers(self, tokens: Tensor) -> Tensor:
        """tokens through `self.layers` in order. With ``model.grad_checkpoint`` (training, gradients on) each block
        keeps only its input and recomputes its activations in the backward (torch.utils.checkpoint, RNG state
        restored, so dropout masks and gradients are those of the plain run): one block's activations in memory
        at a time, for about one more forward of compute."""
        if not (self.cfg.grad_checkpoint and self.training and torch.is_grad_enabled()):
            for layer in self.layers:
                tokens = layer(tokens)
            return tokens
        for layer in self.layers:
            tokens = checkpoint(layer, tokens, use_reentrant=False)
        return tokens

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Action predictions (B, K, act_dim) read at each step's state token."""
        self.check_batch(batch)
        states = batch_states(batch, self.spec.obs_shape[0])
        tokens = self.embed(batch["rtg"], states, batch["actions"], batch["timesteps"])  # (B, 3K, d)
        return self.head(self.backbone(tokens)[:, 1::3])

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Masked cross-entropy (discrete) or MSE (continuous) over the steps with mask == True."""
        preds = self(batch)
        mask = batch["mask"].bool()
        target = batch["actions"][mask]
        if self.spec.discrete:
            loss = F.cross_entropy(preds[mask], target.long())
            stats = {"accuracy": (preds[mask].argmax(-1) == target).float().mean().item()}
        else:
            loss = F.mse_loss(preds[mask], target.float())
            stats = {}
        return loss, {"loss": loss.item(), "steps": int(mask.sum().item()), **stats}

    def check_batch(self, batch: dict[str, Any]) -> None:
        """Raises ValueError naming the key and the expected vs the actual shape."""
        missing = [k for k in BATCH_KEYS if k not in batch and not (k == "states" and "frames" in batch)]
        if missing:
            raise ValueError(f"batch lacks {missing}; expected keys {list(BATCH_KEYS)} (+ 'mask' for loss)")
        B, K = batch["rtg"].shape[:2] if batch["rtg"].dim() == 2 else (None, None)
        if B is None:
            raise ValueError(f"batch['rtg'] must be (B, K), got {tuple(batch['rtg'].shape)}")
        act = (B, K) if self.spec.discrete else (B, K, self.spec.act_dim)
        expected = {"actions": act, "timesteps": (B, K)}
        if "states" in batch:
            expected["states"] = (B, K, *self.spec.obs_shape)
        else:  # unstacked Atari frames, see batch_states
            fs, *frame = self.spec.obs_shape
            expected["frames"] = (B, K + fs - 1, *frame)
        if "mask" in batch:
            expected["mask"] = (B, K)
        for key, shape in expected.items():
            if tuple(batch[key].shape) != tuple(shape):
                raise ValueError(f"batch['{key}'] must have shape {tuple(shape)}, got {tuple(batch[key].shape)}")

    # ------------------------------------------------------------------------------------------- parallelism
    def zero3_leaf_modules(self) -> list[type[nn.Module]]:
        """Module classes DeepSpeed ZeRO-3 must gather whole (their forward reads a sub-module's weight directly
        instead of calling it, which per-module gathering would leave empty); none in the shared parts."""
        return []

    # ------------------------------------------------------------------------------------------- acting
    def init_state(self, batch_size: int, mode: str = "window", context_len: int = 30, reencode: bool = False) -> Any:
        """Acting state for `batch_size` envs. The base class (DT) has no recurrence: both modes re-run the last
        `context_len` steps, so a config's eval.mode=recurrent works for either family.

        The window keeps each step's embedded tokens (`TokenWindow`): a call embeds its new step only (one frame per
        env through the Atari CNN) and re-runs the backbone over the window. `reencode=True` keeps the raw steps
        instead and re-embeds the whole window every call, as the reference Decision Transformer code does (the
        acting benchmark's baseline); both give the same actions."""
        if mode not in ("recurrent", "window"):
            raise ValueError(f"acting mode must be 'recurrent' or 'window', got {mode!r}")
        p = next(self.parameters())
        if not reencode:
            return TokenWindow(tokens=torch.zeros(batch_size, context_len, 3, self.cfg.d_model, device=p.device,
                                                  dtype=p.dtype),
                               length=torch.zeros(batch_size, dtype=torch.long, device=p.device))
        obs_dtype = torch.uint8 if self.spec.obs_kind == "atari" else torch.float32
        act_shape = (batch_size, context_len) + (() if self.spec.discrete else (self.spec.act_dim,))
        return WindowState(
            rtg=torch.zeros(batch_size, context_len, device=p.device),
            obs=torch.zeros(batch_size, context_len, *self.spec.obs_shape, dtype=obs_dtype, device=p.device),
            actions=torch.zeros(act_shape, dtype=torch.long if self.spec.discrete else torch.float32, device=p.device),
            timesteps=torch.zeros(batch_size, context_len, dtype=torch.long, device=p.device),
            length=torch.zeros(batch_size, dtype=torch.long, device=p.device),
        )

    @torch.inference_mode()
    def act(self, state: Any, rtg: Tensor, obs: Tensor, prev_action: Tensor, t: Tensor) -> tuple[Tensor, Any]:
        """preds (B, act_dim) for step t of each env; `prev_action` is a_{t-1} (ignored where t == 0)."""
        return self.act_window(state, rtg, obs, prev_action, t)

    def act_window(self, state: WindowState | TokenWindow, rtg: Tensor, obs: Tensor, prev_action: Tensor,
                   t: Tensor) -> tuple[Tensor, WindowState | TokenWindow]:
        """Appends step t to the window and re-runs the model on the episode's last (up to) K steps."""
        if isinstance(state, TokenWindow):
            return self.act_token_window(state, rtg, obs, prev_action, t)
        new_episode = t == 0
        keep = ~new_episode
        state.actions[keep, -1] = prev_action[keep].to(state.actions.dtype)  # a_{t-1} fills the previous slot
        for buf in (state.rtg, state.obs, state.actions, state.timesteps):
            buf.copy_(torch.roll(buf, shifts=-1, dims=1))
        state.rtg[:, -1] = rtg
        state.obs[:, -1] = obs.to(state.obs.dtype)
        state.actions[:, -1] = 0  # a_t is not known yet; causality makes its value irrelevant to the prediction
        state.timesteps[:, -1] = t
        K = state.rtg.shape[1]
        state.length = torch.where(new_episode, torch.ones_like(state.length), (state.length + 1).clamp(max=K))
        preds = torch.empty(rtg.shape[0], self.spec.act_dim, device=rtg.device)
        for n in state.length.unique().tolist():  # one forward per distinct episode length (usually one)
            rows = state.length == n
            batch = {"rtg": state.rtg[rows, K - n:], "states": state.obs[rows, K - n:],
                     "actions": state.actions[rows, K - n:], "timesteps": state.timesteps[rows, K - n:]}
            preds[rows] = self(batch)[:, -1].float()
        return preds, state

    def act_token_window(self, state: TokenWindow, rtg: Tensor, obs: Tensor, prev_action: Tensor,
                         t: Tensor) -> tuple[Tensor, TokenWindow]:
        """`act_window` on cached tokens: embeds step t ([a_{t-1}, R_t, s_t], as recurrent acting does), completes
        the previous step with a_{t-1}, shifts the window and runs the backbone on the episode's last (up to) K
        steps, reading the action at s_t."""
        new_episode = t == 0
        step = self.embed.step_tokens(rtg, obs, prev_action, t).to(state.tokens.dtype)  # (B, 3, d)
        tokens, K = state.tokens, state.tokens.shape[1]
        tokens[:, -1, 2] = torch.where(new_episode[:, None], tokens[:, -1, 2], step[:, 0])
        tokens.copy_(torch.roll(tokens, shifts=-1, dims=1))
        tokens[:, -1, :2] = step[:, 1:]
        tokens[:, -1, 2] = 0  # a_t is not known yet; causality makes its value irrelevant to the prediction
        state.length = torch.where(new_episode, torch.ones_like(state.length), (state.length + 1).clamp(max=K))
        preds = torch.empty(rtg.shape[0], self.spec.act_dim, device=rtg.device)
        for n in state.length.unique().tolist():  # one backbone run per distinct episode length (usually one)
            rows = state.length == n
            hidden = self.backbone(tokens[rows, K - n:].flatten(1, 2))  # (b, 3n, d)
            preds[rows] = self.head(hidden[:, -2]).float()  # the s_t token
        return preds, state

    # ------------------------------------------------------------------------------------------- counting
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; `non_embedding` leaves out the token embedding module (R/s/a/timestep + state encoder)."""
        n = sum(p.numel() for p in self.parameters())
        return n - sum(p.numel() for p in self.embed.parameters()) if non_embedding else n

    def backbone_flops_per_token(self, context_len: int) -> float:
        raise NotImplementedError

    def flops_per_token(self, context_len: int) -> float:
        """Analytic training FLOPs per token (3x the forward matmul FLOPs), see docs/model.md."""
        d, spec = self.cfg.d_model, self.spec
        if spec.obs_kind == "atari":
            state = atari_encoder_flops(d, spec.obs_shape[0])
        else:
            state = 2 * spec.obs_shape[0] * d
        action = 0 if spec.discrete else 2 * spec.act_dim * d
        per_step = 2 * d + state + action + 2 * d * spec.act_dim  # rtg, state, action embeddings + head
        return 3.0 * (self.backbone_flops_per_token(context_len) + per_step / 3.0)
