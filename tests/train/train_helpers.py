"""Shared helpers for trainer tests: small seeded datums for the tiny base's byte vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mint.models.base import ResidentBase
from mint.models.lora import BoundAdapter, LoraSignature, bound
from mint.train import AdamParams, TrainDatum, Trainer

SIGNATURE = LoraSignature(rank=4, alpha=8)
#: A learning rate big enough that one step moves B visibly away from zero.
WARM_UP = AdamParams(learning_rate=1e-2)


def make_data(
    seed: int, lengths: Sequence[int], weights: bool = True, sampler: bool = False
) -> list[TrainDatum]:
    """Random token sequences; `weights` adds signed weights, `sampler` adds IS inputs."""
    rng = np.random.default_rng(seed)
    data = []
    for length in lengths:
        inputs: dict[str, np.ndarray] = {
            "target_tokens": rng.integers(0, 256, length, dtype=np.int64)
        }
        if weights:
            inputs["weights"] = rng.uniform(-1.0, 2.0, length).astype(np.float32)
        if sampler:
            inputs["logprobs"] = rng.uniform(-8.0, -1.0, length).astype(np.float32)
            inputs["advantages"] = rng.normal(0.0, 1.0, length).astype(np.float32)
        data.append(TrainDatum(rng.integers(0, 256, length, dtype=np.int64), inputs))
    return data


def warmed_trainer(base: ResidentBase, policy_id: str = "p", **kwargs: int) -> Trainer:
    """A trainer whose policy took one step, so both A and B are non-zero."""
    trainer = Trainer(base, **kwargs)
    trainer.create_policy(policy_id, SIGNATURE, seed=7)
    trainer.forward_backward(policy_id, make_data(100, [6, 4]), "cross_entropy")
    trainer.optim_step(policy_id, WARM_UP)
    return trainer


def reference_logprobs(
    base: ResidentBase, trainer: Trainer, policy_id: str, datum: TrainDatum
) -> torch.Tensor:
    """Target logprobs of one datum, unpadded, via a plain forward of the bound adapter."""
    tensors = trainer.adapter_tensors(policy_id)
    scale = trainer.signature(policy_id).scale
    ids = torch.from_numpy(datum.input_tokens)[None]
    with torch.no_grad(), bound(base.binding, [BoundAdapter(tensors, scale)]):
        logits = base.model(input_ids=ids).logits[0].float()
    targets = torch.from_numpy(datum.loss_inputs["target_tokens"])
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
