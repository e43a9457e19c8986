"""Loss functions the trainer supports, as one dispatch table, and IcePop rollout correction.

Each loss maps per-token logprobs of the targets under the current policy (`lp`), the
datum's loss inputs and the job's `loss_fn_config` to a per-token `elementwise_loss`; the
job's loss is its plain sum over tokens and datums, as in the Tinker API: no normalisation,
the caller's weights and advantages decide. Inputs are named as the Tinker SDK sends them:
`target_tokens`, `weights`, `logprobs` (the sampler's, written `lp_old` below), `advantages`
(`A`) and, for gspo, `sequence_ratio_mask`. With `r = exp(lp - lp_old)` and
`clip(x) = min(max(x, clip_low_threshold), clip_high_threshold)`:

    cross_entropy        -weights * lp
    importance_sampling  -r * A
    ppo                  -min(r * A, clip(r) * A)
    cispo                -stopgrad(clip(r)) * A * lp
    dro                  -(A * lp - 0.5 * beta * (lp - lp_old)^2)
    gspo                 -min(s * A, clip(s) * A), s = exp(mean of (lp - lp_old) over the
                         datum's sequence tokens)

ppo, cispo and gspo take `clip_low_threshold` (default 0.8) and `clip_high_threshold`
(default 1.2); dro takes `beta` (default 0.05). gspo's *sequence tokens* are the datum's
tokens whose advantage is non-zero and whose `sequence_ratio_mask` (optional, default 1) is
non-zero; its other tokens carry no loss. A datum without sequence tokens has s = 1.

IcePop: every loss that reads the sampler's `logprobs` also accepts `icepop_low` and
`icepop_high` (both or neither). A token with a non-zero advantage whose ratio r lies
outside [icepop_low, icepop_high] gets zero weight: its elementwise loss and gradient are 0
and gspo leaves it out of the sequence mean. The ratio is judged, not clipped. Positions
with advantage 0 (prompt positions in Tinker's datum layout, whose `logprobs` are
placeholders) are neither masked nor counted; `icepop_masked_fraction:mean` is the masked
share of the counted tokens.

Log-ratios are only ever formed where the token mask is on, so a padded position (or a
masked-out one) can never overflow `exp` or put NaN into a gradient.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from mint.errors import UnsupportedLoss, UserError

log = logging.getLogger(__name__)

#: Every loss reads the targets; they pick the logprobs, so they are integer token ids.
TARGET_TOKENS = "target_tokens"
#: The sampler's logprobs; a loss that reads them gets the IcePop config keys.
SAMPLER_LOGPROBS = "logprobs"
ICEPOP_KEYS = ("icepop_low", "icepop_high")
CLIP_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


@dataclass(frozen=True)
class LossArgs:
    """What a loss function reads; every tensor is [B, T] on the base's device."""

    #: Logprob of each target under the policy (carries the gradient).
    logprobs: torch.Tensor
    #: Float loss inputs by name (the datum's, or the spec's defaults; zero at padding).
    inputs: Mapping[str, torch.Tensor]
    #: True at the tokens the loss acts on: real tokens not zeroed by IcePop.
    mask: torch.Tensor
    config: Mapping[str, float]

    def log_ratio(self, where: torch.Tensor | None = None) -> torch.Tensor:
        """lp - lp_old at `where` (default: the mask), exactly 0 elsewhere.

        Both operands are selected before the subtraction, so an extreme value at an
        excluded position never reaches the result or its gradient.
        """
        keep = self.mask if where is None else where
        policy = torch.where(keep, self.logprobs, 0.0)
        sampler = torch.where(keep, self.inputs[SAMPLER_LOGPROBS], 0.0)
        return policy - sampler

    def clip(self, ratio: torch.Tensor) -> torch.Tensor:
        low, high = self.config["clip_low_threshold"], self.config["clip_high_threshold"]
        return ratio.clamp(min=low, max=high)


#: (loss args) -> elementwise loss [B, T]; the trainer zeroes it outside `args.mask`.
LossFn = Callable[[LossArgs], torch.Tensor]


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

    @property
    def reads_sampler(self) -> bool:
        return SAMPLER_LOGPROBS in self.float_inputs


def cross_entropy(args: LossArgs) -> torch.Tensor:
    """-weights * lp; negative weights are allowed (REINFORCE-style updates)."""
    return -args.inputs["weights"] * args.logprobs


def importance_sampling(args: LossArgs) -> torch.Tensor:
    """-r * A; the sampler's logprobs are constants."""
    return -torch.exp(args.log_ratio()) * args.inputs["advantages"]


def ppo(args: LossArgs) -> torch.Tensor:
    """-min(r * A, clip(r) * A): the pessimistic of the plain and the clipped objective."""
    ratio = torch.exp(args.log_ratio())
    advantages = args.inputs["advantages"]
    return -torch.minimum(ratio * advantages, args.clip(ratio) * advantages)


def cispo(args: LossArgs) -> torch.Tensor:
    """-stopgrad(clip(r)) * A * lp: clipping bounds the weight, every token keeps a gradient."""
    weight = args.clip(torch.exp(args.log_ratio())).detach()
    return -weight * args.inputs["advantages"] * args.logprobs


def dro(args: LossArgs) -> torch.Tensor:
    """-(A * lp - 0.5 * beta * (lp - lp_old)^2): a quadratic pull toward the sampler."""
    penalty = 0.5 * args.config["beta"] * args.log_ratio() ** 2
    return -(args.inputs["advantages"] * args.logprobs - penalty)


def gspo(args: LossArgs) -> torch.Tensor:
    """-min(s * A, clip(s) * A) on the sequence tokens, with one ratio s per datum (row)."""
    advantages = args.inputs["advantages"]
    tokens = args.mask & (advantages != 0) & (args.inputs["sequence_ratio_mask"] != 0)
    counts = tokens.sum(dim=1, keepdim=True).clamp(min=1)
    sequence_ratio = torch.exp(args.log_ratio(tokens).sum(dim=1, keepdim=True) / counts)
    objective = torch.minimum(sequence_ratio * advantages, args.clip(sequence_ratio) * advantages)
    return torch.where(tokens, -objective, 0.0)


_SAMPLER_INPUTS = ("logprobs", "advantages")

LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, optional={"weights": 1.0}),
    "importance_sampling": LossSpec(importance_sampling, required=_SAMPLER_INPUTS),
    "ppo": LossSpec(ppo, required=_SAMPLER_INPUTS, config=CLIP_DEFAULTS),
    "cispo": LossSpec(cispo, required=_SAMPLER_INPUTS, config=CLIP_DEFAULTS),
    "dro": LossSpec(dro, required=_SAMPLER_INPUTS, config={"beta": 0.05}),
    "gspo": LossSpec(
        gspo,
        required=_SAMPLER_INPUTS,
        optional={"sequence_ratio_mask": 1.0},
        config=CLIP_DEFAULTS,
    ),
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
    """The loss's config with defaults filled in; unknown or bad values are refused."""
    given = dict(given or {})
    accepted = set(spec.config) | (set(ICEPOP_KEYS) if spec.reads_sampler else set())
    unknown = sorted(set(given) - accepted)
    if unknown:
        listing = ", ".join(sorted(accepted)) or "none"
        raise UserError(
            f"loss_fn_config keys {unknown} are not accepted by loss {name!r} "
            f"(accepted keys: {listing}); remove them"
        )
    config = {**spec.config, **{key: float(value) for key, value in given.items()}}
    problems = _config_problems(config)
    if problems:
        raise UserError(
            f"loss_fn_config for loss {name!r} is invalid: " + "; ".join(problems) + "; fix it"
        )
    return config


def _config_problems(config: Mapping[str, float]) -> list[str]:
    problems = [
        f"{key}={value!r} must be a finite number"
        for key, value in sorted(config.items())
        if not math.isfinite(value)
    ]
    if problems:
        return problems
    pairs = (("clip_low_threshold", "clip_high_threshold"), ICEPOP_KEYS)
    for low_key, high_key in pairs:
        if (low_key in config) != (high_key in config):
            problems.append(f"{low_key} and {high_key} must be given together")
        elif low_key in config and not 0 <= config[low_key] <= config[high_key]:
            problems.append(
                f"{low_key}={config[low_key]!r} and {high_key}={config[high_key]!r} "
                f"must satisfy 0 <= {low_key} <= {high_key}"
            )
    if config.get("beta", 0.0) < 0:
        problems.append(f"beta={config['beta']!r} must be >= 0")
    return problems


@dataclass
class LossOutcome:
    """One pass's elementwise loss and the counts its metrics are built from."""

    #: [B, T], zero outside the token mask.
    elementwise: torch.Tensor
    #: Tokens IcePop judged and, of those, how many it zeroed (None when IcePop is off).
    icepop_counted: int | None = None
    icepop_masked: int = 0


def compute(
    spec: LossSpec,
    logprobs: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    mask: torch.Tensor,
    config: Mapping[str, float],
) -> LossOutcome:
    """Apply IcePop (when configured) to the token mask, then the loss; see the module doc."""
    outcome = LossOutcome(elementwise=logprobs.new_zeros(()))
    if spec.reads_sampler and ICEPOP_KEYS[0] in config:
        counted = mask & (inputs["advantages"] != 0)
        ratio = torch.exp(LossArgs(logprobs.detach(), inputs, counted, config).log_ratio())
        inside = (ratio >= config["icepop_low"]) & (ratio <= config["icepop_high"])
        masked = counted & ~inside
        mask = mask & ~masked
        outcome.icepop_counted = int(counted.sum())
        outcome.icepop_masked = int(masked.sum())
    computed = spec.compute(LossArgs(logprobs, inputs, mask, config))
    outcome.elementwise = torch.where(mask, computed, 0.0)
    return outcome
