"""Trainer: time-slicing policies between device and host, isolation, lifecycle errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load
from train_helpers import SIGNATURE, WARM_UP, make_data

from mint.errors import Conflict, NotFound, UserError
from mint.models.base import ResidentBase, load_base
from mint.models.lora import LoraSignature
from mint.train import AdamParams, Trainer


def _snapshot(trainer: Trainer, policy_id: str) -> dict[str, torch.Tensor]:
    """Every tensor of the policy's training state plus its pending gradients."""
    tensors = load(trainer.save_state(policy_id))
    for path, (a, b) in trainer.gradients(policy_id).items():
        tensors[f"grad.{path}.A"], tensors[f"grad.{path}.B"] = a, b
    return tensors


def _assert_equal(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name


def test_swapping_out_and_in_changes_no_bit(tiny_base: ResidentBase) -> None:
    trainer = Trainer(tiny_base, max_live_policies=1)
    trainer.create_policy("a", SIGNATURE, seed=1)
    trainer.create_policy("b", SIGNATURE, seed=2)
    assert trainer.live_policies == []
    trainer.forward_backward("a", make_data(50, [5, 3]), "cross_entropy")
    trainer.optim_step("a", WARM_UP)
    trainer.forward_backward("a", make_data(51, [4]), "cross_entropy")  # pending gradients
    assert trainer.live_policies == ["a"]
    live_weight = trainer._policies["a"].weights["model.layers.0.self_attn.q_proj.A"]
    before = _snapshot(trainer, "a")
    trainer.forward_backward("b", make_data(52, [6]), "cross_entropy")
    assert trainer.live_policies == ["b"]  # a was swapped out to host
    swapped = trainer._policies["a"].weights["model.layers.0.self_attn.q_proj.A"]
    assert swapped.data_ptr() != live_weight.data_ptr()  # really copied, even on CPU
    _assert_equal(before, _snapshot(trainer, "a"))
    trainer.optim_step("a", WARM_UP)
    assert trainer.live_policies == ["a"]


def test_time_sliced_training_equals_training_alone(tiny_base: ResidentBase) -> None:
    sliced = Trainer(tiny_base, max_live_policies=1)
    alone = Trainer(tiny_base, max_live_policies=4)
    for trainer in (sliced, alone):
        trainer.create_policy("a", SIGNATURE, seed=1)
    sliced.create_policy("b", SIGNATURE, seed=2)
    for step in range(3):
        for trainer in (sliced, alone):
            trainer.forward_backward("a", make_data(60 + step, [5, 2]), "cross_entropy")
        sliced.forward_backward("b", make_data(70 + step, [4]), "cross_entropy")
        for trainer in (sliced, alone):
            trainer.optim_step("a", WARM_UP)
        sliced.optim_step("b", WARM_UP)
    assert sliced.save_state("a") == alone.save_state("a")


def test_least_recently_used_policy_is_swapped_out(tiny_base: ResidentBase) -> None:
    trainer = Trainer(tiny_base, max_live_policies=2)
    for policy_id in ("a", "b", "c"):
        trainer.create_policy(policy_id, SIGNATURE)
    data = make_data(80, [3])
    trainer.forward_backward("a", data, "cross_entropy", forward_only=True)
    trainer.forward_backward("b", data, "cross_entropy", forward_only=True)
    assert trainer.live_policies == ["a", "b"]
    trainer.optim_step("a", AdamParams())
    assert trainer.live_policies == ["b", "a"]
    trainer.forward_backward("c", data, "cross_entropy", forward_only=True)
    assert trainer.live_policies == ["a", "c"]
    trainer.drop_policy("a")
    assert trainer.live_policies == ["c"]
    assert not trainer.has_policy("a")


def test_training_one_policy_leaves_another_untouched(tiny_base: ResidentBase) -> None:
    trainer = Trainer(tiny_base)
    trainer.create_policy("a", SIGNATURE, seed=1)
    trainer.create_policy("b", SIGNATURE, seed=1)  # same seed: identical starting tensors
    trainer.forward_backward("a", make_data(90, [5]), "cross_entropy")
    trainer.optim_step("a", WARM_UP)
    trainer.forward_backward("a", make_data(91, [4]), "cross_entropy")
    before = _snapshot(trainer, "a")
    for step in range(2):
        trainer.forward_backward("b", make_data(92 + step, [6, 3]), "cross_entropy")
        trainer.optim_step("b", AdamParams(learning_rate=0.1, weight_decay=0.5))
    _assert_equal(before, _snapshot(trainer, "a"))
    assert trainer.save_state("a") != trainer.save_state("b")


def test_seed_decides_the_initial_adapter(tiny_base: ResidentBase) -> None:
    trainer = Trainer(tiny_base)
    for policy_id, seed in (("x", 3), ("y", 3), ("z", 4)):
        trainer.create_policy(policy_id, SIGNATURE, seed=seed)
    assert trainer.save_state("x") == trainer.save_state("y")
    x, z = trainer.adapter_tensors("x"), trainer.adapter_tensors("z")
    path = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(x[path][0], z[path][0])
    assert x[path][0].dtype == torch.float32 and x[path][0].device.type == "cpu"
    assert not x[path][1].any()


def test_lifecycle_errors(tiny_base: ResidentBase) -> None:
    trainer = Trainer(tiny_base)
    trainer.create_policy("p", SIGNATURE)
    with pytest.raises(Conflict) as conflict:
        trainer.create_policy("p", SIGNATURE)
    assert str(conflict.value) == (
        "policy 'p' already exists on this trainer; pick another id or drop_policy it first"
    )
    with pytest.raises(NotFound) as missing:
        trainer.step("q")
    assert str(missing.value) == (
        "policy 'q' is not on this trainer; create it with create_policy or load_state first"
    )
    for call in (
        lambda: trainer.forward_backward("q", make_data(1, [2]), "cross_entropy"),
        lambda: trainer.optim_step("q", AdamParams()),
        lambda: trainer.save_state("q"),
        lambda: trainer.drop_policy("q"),
    ):
        with pytest.raises(NotFound):
            call()
    with pytest.raises(UserError) as targets:
        trainer.create_policy("r", LoraSignature(rank=2, alpha=2, target_modules=("c_attn",)))
    assert str(targets.value) == (
        "target modules ['c_attn'] do not exist on base mint-test/tiny-llama; choose from "
        "['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"
    )
    with pytest.raises(UserError, match="max_live_policies=0 must be at least 1"):
        Trainer(tiny_base, max_live_policies=0)


def test_bf16_base_trains_float32_masters(bases_dir: Path) -> None:
    base = load_base("tiny-llama", bases_dir, device="cpu", dtype="bfloat16")
    trainer = Trainer(base)
    trainer.create_policy("p", SIGNATURE)
    trainer.forward_backward("p", make_data(95, [4]), "cross_entropy")
    trainer.optim_step("p", WARM_UP)
    result = trainer.forward_backward("p", make_data(96, [5, 2]), "cross_entropy")
    assert [out["logprobs"].dtype for out in result.outputs] == [np.float32, np.float32]
    assert all(np.isfinite(out["logprobs"]).all() for out in result.outputs)
    tensors = trainer.adapter_tensors("p")
    assert all(b.dtype == torch.float32 and b.any() for _, b in tensors.values())
    assert all(a.dtype == torch.float32 and a.any() for a, _ in trainer.gradients("p").values())


def test_a_swap_is_one_copy_per_buffer(tiny_base: ResidentBase) -> None:
    """Weights, both moments and a pending gradient each move as one flat copy, however many
    modules the policy adapts."""
    trainer = Trainer(tiny_base, max_live_policies=1)
    trainer.create_policy("a", SIGNATURE, seed=1)
    trainer.forward_backward("a", make_data(50, [5, 3]), "cross_entropy")
    copies: list[int] = []
    original = trainer._mover.copy

    def counted(source: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, object]:
        copies.append(source.numel())
        return original(source, device)

    trainer._mover.copy = counted  # type: ignore[method-assign]
    numel = trainer.device_bytes() // 4 // 4  # weights, 2 moments, gradient; float32
    trainer.swap_out("a")
    assert copies == [numel] * 4
    trainer.optim_step("a", WARM_UP)  # swaps back in: 4 copies, then the gradient is spent
    trainer.swap_out("a")
    assert copies == [numel] * 11
