"""Loss functions the trainer supports, as one dispatch table.

Each loss maps per-token logprobs of the targets under the current policy (and the datum's
loss inputs) to a per-token `elementwise_loss`; the job's loss is its plain sum over tokens
and datums, as in the Tinker API: no normalisation, the caller's weights decide. Adding a
loss (ppo, cispo, dro) is one function and one row in `LOSSES`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from mint.errors import UnsupportedLoss, UserError

log = logging.getLogger(__name__)

#: (logprobs [B, T], loss inputs by name [B, T], loss_fn_config) -> elementwise loss [B, T].
LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]], torch.Tensor]

#: Every loss reads the targets; they pick the logprobs, so they are integer token ids.
TARGET_TOKENS = "target_tokens"


@dataclass(frozen=True)
class LossSpec:
    """A loss and the inputs it reads, so bad requests are refused before any compute."""

    compute: LossFn
    #: Float loss inputs a datum must carry (besides `target_tokens`).
    required: tuple[str, ...] = ()
    #: Float loss inputs a datum may carry, with the per-token value used when absent.
    optional: Mapping[str, float] = field(default_factory=dict)
    #: Accepted `loss_fn_config` keys with their defaults.
    config: Mapping[str, float] = field(default_factory=dict)

    @property
    def float_inputs(self) -> tuple[str, ...]:
        return self.required + tuple(self.optional)


def cross_entropy(
    logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> torch.Tensor:
    """-weights * logprob; negative weights are allowed (REINFORCE-style updates)."""
    return -inputs["weights"] * logprobs


def importance_sampling(
    logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> torch.Tensor:
    """-(p_policy / p_sampler) * advantage; the sampler's logprobs are constants."""
    ratio = torch.exp(logprobs - inputs["logprobs"])
    return -ratio * inputs["advantages"]


LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, optional={"weights": 1.0}),
    "importance_sampling": LossSpec(importance_sampling, required=("logprobs", "advantages")),
}


def loss_spec(name: str) -> LossSpec:
    """The table row for loss `name`, or `UnsupportedLoss` naming what is supported."""
    spec = LOSSES.get(name)
    if spec is None:
        supported = ", ".join(sorted(LOSSES))
        raise UnsupportedLoss(
            f"loss function {name!r} is not supported by this trainer; use one of: {supported}"
        )
    return spec


def resolve_config(
    name: str, spec: LossSpec, given: Mapping[str, float] | None
) -> dict[str, float]:
    """The loss's config with defaults filled in; unknown keys are refused, not ignored."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(spec.config))
    if unknown:
        accepted = ", ".join(sorted(spec.config)) or "none"
        raise UserError(
            f"loss_fn_config keys {unknown} are not accepted by loss {name!r} "
            f"(accepted keys: {accepted}); remove them"
        )
    return {**spec.config, **{key: float(value) for key, value in given.items()}}
