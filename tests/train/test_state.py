"""save_state / load_state: stable bytes, exact resumption, and refusal of bad payloads."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load, save
from train_helpers import SIGNATURE, WARM_UP, make_data

from mint.errors import InvalidAdapter
from mint.models.base import ResidentBase
from mint.models.lora import LoraSignature
from mint.train import AdamParams, Trainer

PARAMS = AdamParams(learning_rate=5e-3, weight_decay=0.01, grad_clip_norm=1.0)


def _metadata(payload: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", payload[:8])
    return json.loads(payload[8 : 8 + length])["__metadata__"]


def _train(trainer: Trainer, steps: range) -> None:
    for step in steps:
        trainer.forward_backward("p", make_data(30 + step, [5, 7]), "cross_entropy")
        trainer.optim_step("p", PARAMS)


def test_saved_layout_and_metadata(tiny_base: ResidentBase) -> None:
    trainer = Trainer(tiny_base)
    trainer.create_policy("p", LoraSignature(rank=2, alpha=3, target_modules=("v_proj",)))
    payload = trainer.save_state("p")
    assert payload == trainer.save_state("p")
    assert _metadata(payload) == {
        "alpha": "3.0",
        "base_fingerprint": tiny_base.fingerprint,
        "base_id": "mint-test/tiny-llama",
        "format": "mint.training_state",
        "format_version": "1",
        "rank": "2",
        "step": "0",
        "target_modules": '["v_proj"]',
    }
    tensors = load(payload)
    expected = []
    for layer in (0, 1):
        for part in ("A", "B"):
            name = f"model.layers.{layer}.self_attn.v_proj.{part}"
            expected += [f"lora.{name}", f"adam.{name}.exp_avg", f"adam.{name}.exp_avg_sq"]
    assert sorted(tensors) == sorted(expected)
    assert tensors["lora.model.layers.0.self_attn.v_proj.A"].shape == (2, 64)
    assert tensors["lora.model.layers.0.self_attn.v_proj.B"].shape == (32, 2)
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_saving_is_stable_across_training_and_gradients(tiny_base: ResidentBase) -> None:
    trainer = Trainer(tiny_base)
    trainer.create_policy("p", SIGNATURE)
    _train(trainer, range(2))
    first = trainer.save_state("p")
    trainer.forward_backward("p", make_data(40, [4]), "cross_entropy")  # gradients are not saved
    assert trainer.save_state("p") == first
    assert _metadata(first)["step"] == "2"


def test_resuming_with_optimizer_continues_exactly(tiny_base: ResidentBase) -> None:
    uninterrupted = Trainer(tiny_base)
    uninterrupted.create_policy("p", SIGNATURE, seed=5)
    _train(uninterrupted, range(2))
    checkpoint = uninterrupted.save_state("p")
    _train(uninterrupted, range(2, 4))
    resumed = Trainer(tiny_base)
    resumed.load_state("p", checkpoint, with_optimizer=True)  # creates the policy
    assert resumed.signature("p") == SIGNATURE and resumed.step("p") == 2
    _train(resumed, range(2, 4))
    assert resumed.save_state("p") == uninterrupted.save_state("p")


def test_loading_without_optimizer_resets_moments(tiny_base: ResidentBase) -> None:
    trainer = Trainer(tiny_base)
    trainer.create_policy("p", SIGNATURE)
    _train(trainer, range(2))
    saved = load(trainer.save_state("p"))
    trainer.forward_backward("p", make_data(41, [3]), "cross_entropy")
    trainer.load_state("p", trainer.save_state("p"), with_optimizer=False)
    assert trainer.step("p") == 2
    assert all(not a.any() and not b.any() for a, b in trainer.gradients("p").values())
    loaded = load(trainer.save_state("p"))
    for name, tensor in saved.items():
        if name.startswith("lora."):
            assert torch.equal(loaded[name], tensor)
        else:
            assert tensor.any() and not loaded[name].any()


def test_garbage_payload_is_refused(tiny_base: ResidentBase) -> None:
    with pytest.raises(InvalidAdapter) as caught:
        Trainer(tiny_base).load_state("p", b"not a checkpoint", with_optimizer=True)
    (problem,) = caught.value.problems
    # The middle is safetensors' own wording, which changes between its versions.
    assert problem.startswith("payload is not a safetensors file (Error while deserializing")
    assert problem.endswith("header too large); pass bytes from save_state")


def test_foreign_or_mismatched_state_lists_every_problem(tiny_base: ResidentBase) -> None:
    trainer = Trainer(tiny_base)
    trainer.create_policy("p", SIGNATURE)
    tensors = load(trainer.save_state("p"))
    del tensors["lora.model.layers.1.mlp.up_proj.B"]
    tensors["lora.model.layers.0.mlp.up_proj.A"] = torch.zeros(4, 3)
    metadata = {**_metadata(trainer.save_state("p")), "base_fingerprint": "f00d", "rank": "8"}
    with pytest.raises(InvalidAdapter) as caught:
        trainer.load_state("p", save(tensors, metadata=metadata), with_optimizer=False)
    problems = caught.value.problems
    assert problems[0] == (
        f"base_fingerprint is 'f00d', this trainer's base has {tiny_base.fingerprint!r}"
    )
    assert problems[1].startswith("signature LoraSignature(rank=8, ")
    assert "tensor 'lora.model.layers.1.mlp.up_proj.B' is missing" in problems
    assert len(problems) == 2 + 28  # rank 8 makes every A and B the wrong shape


def test_wrong_shapes_are_refused(tiny_base: ResidentBase) -> None:
    trainer = Trainer(tiny_base)
    trainer.create_policy("p", SIGNATURE)
    tensors = load(trainer.save_state("p"))
    del tensors["lora.model.layers.1.mlp.up_proj.B"]
    tensors["lora.model.layers.0.mlp.up_proj.A"] = torch.zeros(4, 3)
    tensors["lora.extra.A"] = torch.zeros(1)
    with pytest.raises(InvalidAdapter) as caught:
        trainer.load_state("q", save(tensors, metadata=_metadata(trainer.save_state("p"))), True)
    assert caught.value.problems == [
        "tensor 'lora.model.layers.1.mlp.up_proj.B' is missing",
        "tensor 'lora.extra.A' is unexpected",
        "tensor 'lora.model.layers.0.mlp.up_proj.A' is torch.float32 (4, 3), "
        "expected torch.float32 (4, 64)",
    ]
    assert not trainer.has_policy("q")


def test_one_step_moves_every_b_off_zero(tiny_base: ResidentBase) -> None:
    trainer = Trainer(tiny_base)
    trainer.create_policy("p", SIGNATURE)
    trainer.forward_backward("p", make_data(42, [4]), "cross_entropy")
    trainer.optim_step("p", WARM_UP)
    assert all(b.abs().max() > 1e-3 for _, b in trainer.adapter_tensors("p").values())
