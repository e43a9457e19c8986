"""optim_step: AdamW equal to torch.optim.AdamW, clipping, metrics and validation."""

from __future__ import annotations

import pytest
import torch
from train_helpers import SIGNATURE, make_data

from mint.errors import UserError
from mint.models.base import ResidentBase
from mint.train import AdamParams, Trainer
from mint.train.optimizer import adamw_step_


def _flat(tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    return [t for path in sorted(tensors) for t in tensors[path]]


def test_adamw_update_equals_torch_adamw() -> None:
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(3, 5, generator=generator), torch.randn(7, generator=generator)]
    reference = [torch.nn.Parameter(w.clone()) for w in weights]
    params = AdamParams(learning_rate=3e-2, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.1)
    torch_adam = torch.optim.AdamW(
        reference, lr=3e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1
    )
    exp_avg = [torch.zeros_like(w) for w in weights]
    exp_avg_sq = [torch.zeros_like(w) for w in weights]
    for step in range(1, 6):
        grads = [torch.randn(w.shape, generator=generator) for w in weights]
        for parameter, grad in zip(reference, grads, strict=True):
            parameter.grad = grad.clone()
        torch_adam.step()
        adamw_step_(weights, grads, exp_avg, exp_avg_sq, step, params)
        for ours, theirs in zip(weights, reference, strict=True):
            torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=1e-6)
    for ours, key in zip(exp_avg_sq, reference, strict=True):
        torch.testing.assert_close(ours, torch_adam.state[key]["exp_avg_sq"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_optim_step_equals_torch_with_clipping(tiny_base: ResidentBase, clip: float) -> None:
    trainer = Trainer(tiny_base)
    trainer.create_policy("p", SIGNATURE, seed=3)
    reference = [torch.nn.Parameter(t.clone()) for t in _flat(trainer.adapter_tensors("p"))]
    params = AdamParams(learning_rate=1e-2, weight_decay=0.05, grad_clip_norm=clip)
    torch_adam = torch.optim.AdamW(
        reference, lr=1e-2, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.05
    )
    for step in range(1, 4):
        trainer.forward_backward("p", make_data(10 + step, [6, 3]), "cross_entropy")
        for parameter, grad in zip(reference, _flat(trainer.gradients("p")), strict=True):
            parameter.grad = grad
        # clip_grad_norm_ with an infinite limit only measures the norm.
        norm = torch.nn.utils.clip_grad_norm_(reference, clip or float("inf"))
        torch_adam.step()
        metrics = trainer.optim_step("p", params)
        assert sorted(metrics) == ["grad_norm:mean", "learning_rate:mean"]
        assert metrics["grad_norm:mean"] == pytest.approx(float(norm), rel=1e-6)
        assert metrics["learning_rate:mean"] == 1e-2
        assert trainer.step("p") == step
        for ours, theirs in zip(_flat(trainer.adapter_tensors("p")), reference, strict=True):
            torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=1e-6)
    assert float(norm) > 0.5  # the clipped case really clipped


def test_optim_step_zeroes_gradients(tiny_base: ResidentBase) -> None:
    trainer = Trainer(tiny_base)
    trainer.create_policy("p", SIGNATURE)
    trainer.forward_backward("p", make_data(20, [5]), "cross_entropy")
    assert any(b.any() for _, b in trainer.gradients("p").values())  # A gets none: B = 0
    trainer.optim_step("p", AdamParams())
    assert all(not a.any() and not b.any() for a, b in trainer.gradients("p").values())
    # With nothing accumulated the norm is 0 and the step still counts.
    assert trainer.optim_step("p", AdamParams())["grad_norm:mean"] == 0.0
    assert trainer.step("p") == 2


def test_adam_params_are_validated() -> None:
    with pytest.raises(UserError) as caught:
        AdamParams(learning_rate=-1.0, beta2=1.0, grad_clip_norm=float("nan"))
    assert str(caught.value) == (
        "invalid AdamParams: learning_rate=-1.0 must be >= 0; beta2=1.0 must be in [0, 1); "
        "grad_clip_norm=nan must be >= 0; fix these fields and retry"
    )
