"""The trainer against PEFT: the same adapter gives the same logprobs and gradients."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from train_helpers import SIGNATURE, make_data
from transformers import AutoModelForCausalLM

from mint.models.base import ResidentBase
from mint.train import TrainDatum, Trainer


@pytest.fixture(scope="module")
def peft_model(tiny_base: ResidentBase) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(tiny_base.folder, dtype=torch.float32)
    config = LoraConfig(
        r=SIGNATURE.rank,
        lora_alpha=SIGNATURE.alpha,
        target_modules=list(SIGNATURE.target_modules),
        lora_dropout=0.0,
    )
    return get_peft_model(model, config)


def _peft_weights(model: torch.nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    module = model.get_submodule(f"base_model.model.{path}")
    return module.lora_A["default"].weight, module.lora_B["default"].weight


def _copy_adapter(trainer: Trainer, model: torch.nn.Module) -> None:
    for path, (a, b) in trainer.adapter_tensors("p").items():
        peft_a, peft_b = _peft_weights(model, path)
        with torch.no_grad():
            peft_a.copy_(a)
            peft_b.copy_(b)
        peft_a.grad = peft_b.grad = None


def _peft_logprobs(model: torch.nn.Module, datum: TrainDatum) -> torch.Tensor:
    ids = torch.from_numpy(datum.input_tokens)[None]
    logits = model(input_ids=ids).logits[0].float()
    targets = torch.from_numpy(datum.loss_inputs["target_tokens"])
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]


def _assert_relatively_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = float(theirs.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale)


def _check_gradients(trainer: Trainer, model: torch.nn.Module) -> None:
    for path, (a_grad, b_grad) in trainer.gradients("p").items():
        peft_a, peft_b = _peft_weights(model, path)
        _assert_relatively_close(a_grad, peft_a.grad)
        _assert_relatively_close(b_grad, peft_b.grad)


def test_cross_entropy_matches_peft(warm: Trainer, peft_model: torch.nn.Module) -> None:
    _copy_adapter(warm, peft_model)
    data = make_data(200, [8, 3, 6])
    result = warm.forward_backward("p", data, "cross_entropy")
    total = torch.zeros(())
    for datum, out in zip(data, result.outputs, strict=True):
        logprobs = _peft_logprobs(peft_model, datum)
        torch.testing.assert_close(
            torch.from_numpy(out["logprobs"]), logprobs.detach(), rtol=0, atol=1e-5
        )
        total = total - (torch.from_numpy(datum.loss_inputs["weights"]) * logprobs).sum()
    total.backward()
    assert result.metrics["loss:sum"] == pytest.approx(float(total.detach()), rel=1e-6)
    _check_gradients(warm, peft_model)


def test_importance_sampling_gradients_match_peft(
    warm: Trainer, peft_model: torch.nn.Module
) -> None:
    _copy_adapter(warm, peft_model)
    data = make_data(201, [5, 7], weights=False, sampler=True)
    total = torch.zeros(())
    for datum in data:
        logprobs = _peft_logprobs(peft_model, datum)
        # Sampler logprobs close to the policy's, so ratios are near one as in a real rollout.
        sampler = logprobs.detach() + torch.linspace(-0.3, 0.3, len(logprobs))
        datum.loss_inputs["logprobs"] = sampler.numpy()
        advantages = torch.from_numpy(datum.loss_inputs["advantages"])
        total = total - (torch.exp(logprobs - sampler) * advantages).sum()
    total.backward()
    result = warm.forward_backward("p", data, "importance_sampling")
    assert result.metrics["loss:sum"] == pytest.approx(float(total.detach()), rel=1e-5)
    _check_gradients(warm, peft_model)
