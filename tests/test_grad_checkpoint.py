"""model.grad_checkpoint: the same loss and gradients as the plain run (dropout included), for both families, and
the recompute really happens (the blocks run twice per step)."""
from __future__ import annotations

import pytest
import torch

from mambadm.config import EnvSpec, load_config
from mambadm.model import build_model

SPEC = EnvSpec("vector", [5], 3, False, 100)


def batch(b: int = 2, k: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"rtg": torch.rand(b, k, generator=g), "states": torch.randn(b, k, 5, generator=g),
            "actions": torch.rand(b, k, 3, generator=g) * 2 - 1, "timesteps": torch.arange(k).repeat(b, 1),
            "mask": torch.ones(b, k, dtype=torch.bool)}


def loss_and_grads(family: str, checkpointed: bool, calls: list | None = None):
    cfg = load_config(None, [f"model.family={family}", "model.size=xs", "model.dropout=0.2", "model.backend=fast",
                             f"model.grad_checkpoint={checkpointed}"]).model
    torch.manual_seed(0)
    model = build_model(cfg, SPEC).train()
    if calls is not None:
        model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(5)  # the dropout masks
    loss, _ = model.loss(batch())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["mambadm", "dt"])
def test_checkpointed_blocks_give_the_plain_gradients(family):
    plain_calls, ckpt_calls = [], []
    loss0, grads0 = loss_and_grads(family, False, plain_calls)
    loss1, grads1 = loss_and_grads(family, True, ckpt_calls)
    assert (len(plain_calls), len(ckpt_calls)) == (1, 2)  # the first block ran again in the backward (a pre-hook:
    # the recompute stops as soon as it has the saved tensors, before a forward hook would fire)
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and len(grads0) > 10
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_eval_and_no_grad_run_the_blocks_once():
    cfg = load_config(None, ["model.size=xs", "model.backend=fast", "model.grad_checkpoint=true"]).model
    model = build_model(cfg, SPEC).eval()
    calls = []
    model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(batch())
    assert len(calls) == 1
