"""Reference losses written from their definitions, one token at a time, without mint's code.

Each reference takes one datum as plain Python lists and returns (elementwise losses,
d loss / d lp per token). Values are plain float arithmetic; gradients come from torch
autograd on scalar leaf tensors, one per token, so nothing here vectorises or masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

Datum = Mapping[str, Sequence[float]]
Pair = tuple[list[float], list[float]]
Reference = Callable[[Sequence[float], Datum, Mapping[str, float]], Pair]


def _clip(value: torch.Tensor, low: float, high: float) -> torch.Tensor:
    if value.item() < low:
        return torch.tensor(low, dtype=torch.float64)
    if value.item() > high:
        return torch.tensor(high, dtype=torch.float64)
    return value


def _per_token(
    lp: Sequence[float], token_loss: Callable[[torch.Tensor, int], torch.Tensor]
) -> Pair:
    values, grads = [], []
    for t, value in enumerate(lp):
        leaf = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        loss = token_loss(leaf, t)
        if loss.requires_grad:  # a clipped branch is a constant
            loss.backward()
        values.append(loss.item())
        grads.append(0.0 if leaf.grad is None else leaf.grad.item())
    return values, grads


def cross_entropy(lp: Sequence[float], datum: Datum, config: Mapping[str, float]) -> Pair:
    weights = datum.get("weights", [1.0] * len(lp))
    return _per_token(lp, lambda x, t: -weights[t] * x)


def importance_sampling(lp: Sequence[float], datum: Datum, config: Mapping[str, float]) -> Pair:
    old, adv = datum["logprobs"], datum["advantages"]
    return _per_token(lp, lambda x, t: -torch.exp(x - old[t]) * adv[t])


def ppo(lp: Sequence[float], datum: Datum, config: Mapping[str, float]) -> Pair:
    old, adv = datum["logprobs"], datum["advantages"]
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]

    def token(x: torch.Tensor, t: int) -> torch.Tensor:
        ratio = torch.exp(x - old[t])
        plain, clipped = ratio * adv[t], _clip(ratio, low, high) * adv[t]
        return -(plain if plain.item() <= clipped.item() else clipped)

    return _per_token(lp, token)


def cispo(lp: Sequence[float], datum: Datum, config: Mapping[str, float]) -> Pair:
    old, adv = datum["logprobs"], datum["advantages"]
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]

    def token(x: torch.Tensor, t: int) -> torch.Tensor:
        weight = min(max(math.exp(x.item() - old[t]), low), high)  # a constant: stopgrad
        return -weight * adv[t] * x

    return _per_token(lp, token)


def dro(lp: Sequence[float], datum: Datum, config: Mapping[str, float]) -> Pair:
    old, adv, beta = datum["logprobs"], datum["advantages"], config["beta"]
    return _per_token(lp, lambda x, t: -(adv[t] * x - 0.5 * beta * (x - old[t]) ** 2))


def gspo(lp: Sequence[float], datum: Datum, config: Mapping[str, float]) -> Pair:
    """The sequence ratio couples the tokens, so the gradient is taken over the whole datum."""
    old, adv = datum["logprobs"], datum["advantages"]
    seq_mask = datum.get("sequence_ratio_mask", [1.0] * len(lp))
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in lp]
    chosen = [t for t in range(len(lp)) if adv[t] != 0 and seq_mask[t] != 0]
    if chosen:
        log_ratio = sum(leaves[t] - old[t] for t in chosen) / len(chosen)
        ratio = torch.exp(log_ratio)  # type: ignore[arg-type]
    else:
        ratio = torch.tensor(1.0, dtype=torch.float64)
    losses = []
    for t in range(len(lp)):
        if t not in chosen:
            losses.append(torch.tensor(0.0, dtype=torch.float64))
            continue
        plain, clipped = ratio * adv[t], _clip(ratio, low, high) * adv[t]
        losses.append(-(plain if plain.item() <= clipped.item() else clipped))
    total = sum(losses)
    if isinstance(total, torch.Tensor) and total.requires_grad:
        total.backward()
    grads = [0.0 if leaf.grad is None else leaf.grad.item() for leaf in leaves]
    return [loss.item() for loss in losses], grads


REFERENCES: dict[str, Reference] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
}


def icepop_keep(lp: Sequence[float], datum: Datum, low: float, high: float) -> list[bool]:
    """Which tokens IcePop keeps: advantage 0, or a ratio inside [low, high]."""
    keep = []
    for t, value in enumerate(lp):
        if datum["advantages"][t] == 0:
            keep.append(True)
        else:
            keep.append(low <= math.exp(value - datum["logprobs"][t]) <= high)
    return keep


def masked_datum(datum: Datum, keep: Sequence[bool]) -> dict[str, list[float]]:
    """The datum with IcePop's dropped tokens removed, for references that read every token."""
    return {
        name: [v for v, k in zip(values, keep, strict=True) if k] for name, values in datum.items()
    }
