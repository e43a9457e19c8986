"""Rotation at scale: 100 policies time-sliced over 4 device places on the tiny base."""

from __future__ import annotations

import pytest
from train_helpers import SIGNATURE, make_data

from mint.models.base import ResidentBase
from mint.train import AdamParams, TrainDatum, Trainer

POLICIES = 100
LIVE = 4
ROUNDS = 2
ADAM = AdamParams(learning_rate=1e-2, weight_decay=0.01)


def _policy_bytes(base: ResidentBase, with_grads: bool) -> int:
    """One policy's state size from its signature's shapes: weights and two moments, float32,
    plus a gradient per weight while one is pending."""
    numel = sum(a[0] * a[1] + b[0] * b[1] for a, b in base.shapes(SIGNATURE).values())
    return numel * 4 * (4 if with_grads else 3)


def _job_data(index: int, round_: int) -> list[TrainDatum]:
    return make_data(1000 * round_ + index, [3 + index % 5, 2 + index % 3])


def _check_memory(trainer: Trainer, base: ResidentBase, with_grads: bool) -> None:
    live = trainer.live_policies
    assert len(live) == LIVE
    size = _policy_bytes(base, with_grads)
    assert trainer.device_bytes() == LIVE * size
    assert trainer.device_bytes() <= 1.1 * LIVE * size
    # Swapped-out policies hold either a pending gradient (this phase) or none.
    assert trainer.host_bytes() == (POLICIES - LIVE) * size


@pytest.mark.usefixtures("one_thread")
def test_hundred_policies_in_rotation_equal_training_each_alone(tiny_base: ResidentBase) -> None:
    rotating = Trainer(tiny_base, max_live_policies=LIVE)
    ids = [f"p{index:03d}" for index in range(POLICIES)]
    for index, policy_id in enumerate(ids):
        rotating.create_policy(policy_id, SIGNATURE, seed=index)
    assert rotating.device_bytes() == 0
    assert rotating.host_bytes() == POLICIES * _policy_bytes(tiny_base, with_grads=False)
    for round_ in range(ROUNDS):
        # Every job swaps: gradients stay pending while their policy visits the host.
        for index, policy_id in enumerate(ids):
            rotating.forward_backward(policy_id, _job_data(index, round_), "cross_entropy")
        _check_memory(rotating, tiny_base, with_grads=True)
        for policy_id in ids:
            rotating.optim_step(policy_id, ADAM)
        _check_memory(rotating, tiny_base, with_grads=False)

    for index, policy_id in enumerate(ids):
        alone = Trainer(tiny_base, max_live_policies=1)
        alone.create_policy(policy_id, SIGNATURE, seed=index)
        for round_ in range(ROUNDS):
            alone.forward_backward(policy_id, _job_data(index, round_), "cross_entropy")
            alone.optim_step(policy_id, ADAM)
        assert rotating.save_state(policy_id) == alone.save_state(policy_id), policy_id
