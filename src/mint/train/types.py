"""Plain data the trainer takes and returns: training datums, Adam settings, results.

These mirror the Tinker SDK's types (`Datum`, `AdamParams`, `ForwardBackwardOutput`) in numpy
form, so the control layer converts wire payloads into them and back without the trainer
knowing about the wire.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from mint.errors import UserError

log = logging.getLogger(__name__)

#: Reductions a metric key may name after its colon ("loss:sum"), as Tinker aggregates them.
METRIC_REDUCTIONS = ("mean", "sum", "min", "max")


@dataclass
class TrainDatum:
    """One training sequence: position i of `input_tokens` predicts `target_tokens[i]`."""

    #: int64 [N]: the model input.
    input_tokens: np.ndarray
    #: Per-token loss inputs of length N, e.g. target_tokens (int64), weights, logprobs (the
    #: sampler's), advantages (float32). Which ones a loss needs is in `losses.LOSSES`.
    loss_inputs: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class AdamParams:
    """AdamW settings with the Tinker SDK's field names, defaults and meaning."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    #: Decoupled (AdamW) weight decay: each step does `p -= learning_rate * weight_decay * p`.
    weight_decay: float = 0.0
    #: Clip the global L2 norm of the policy's gradients to this value; 0 turns clipping off.
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        problems = [
            f"{name}={value!r} must be {rule}"
            for name, value, rule, ok in (
                ("learning_rate", self.learning_rate, ">= 0", self.learning_rate >= 0),
                ("beta1", self.beta1, "in [0, 1)", 0 <= self.beta1 < 1),
                ("beta2", self.beta2, "in [0, 1)", 0 <= self.beta2 < 1),
                ("eps", self.eps, ">= 0", self.eps >= 0),
                ("weight_decay", self.weight_decay, ">= 0", self.weight_decay >= 0),
                ("grad_clip_norm", self.grad_clip_norm, ">= 0", self.grad_clip_norm >= 0),
            )
            # `not ok` alone would let NaN through: every comparison with NaN is False.
            if not ok or not math.isfinite(value)
        ]
        if problems:
            raise UserError(
                "invalid AdamParams: " + "; ".join(problems) + "; fix these fields and retry"
            )


@dataclass
class ForwardBackwardResult:
    """What one forward_backward (or forward) job returns."""

    #: Per datum, in input order: "logprobs" and "elementwise_loss", float32 [N].
    outputs: list[dict[str, np.ndarray]]
    #: Keys are "name:reduction" with a reduction from `METRIC_REDUCTIONS`.
    metrics: dict[str, float]


def check_metric_key(key: str) -> None:
    """Refuse a metric key that Tinker clients could not aggregate."""
    name, colon, reduction = key.partition(":")
    if not name or not colon or ":" in reduction or reduction not in METRIC_REDUCTIONS:
        raise ValueError(
            f"metric key {key!r} must read 'name:reduction' with one colon and a reduction "
            f"from {METRIC_REDUCTIONS}"
        )
