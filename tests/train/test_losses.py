"""The loss table against references written from the definitions (tests/train/loss_reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from loss_reference import REFERENCES, icepop_keep, masked_datum

from mint.errors import UnsupportedLoss, UserError
from mint.train import LOSSES
from mint.train.losses import LossOutcome, compute, loss_spec, resolve_config

SAMPLER_LOSSES = ["importance_sampling", "ppo", "cispo", "dro", "gspo"]

# Two hand-made datums; the second is padded to width 5. Ratios exp(lp - lp_old) are
# 1.35, 0.905, 0.741, 0.368, 1.0 and 1.35, 0.607, 1.49: inside and outside 0.8..1.2.
DATUMS = [
    {
        "lp": [-1.0, -2.0, -0.5, -3.0, -1.5],
        "logprobs": [-1.3, -1.9, -0.2, -2.0, -1.5],
        "advantages": [1.0, -0.5, 2.0, -1.5, 0.0],
        "weights": [1.0, 0.5, -1.0, 2.0, 0.0],
        "sequence_ratio_mask": [1.0, 1.0, 0.0, 1.0, 1.0],
    },
    {
        "lp": [-0.7, -4.0, -2.2],
        "logprobs": [-1.0, -3.5, -2.6],
        "advantages": [-1.0, 0.5, 1.0],
        "weights": [0.3, 1.0, 1.0],
        "sequence_ratio_mask": [1.0, 1.0, 1.0],
    },
]
WIDTH = 5


def _tensors(
    loss: str, pad: dict[str, float] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """lp (a leaf), the loss's inputs and the mask, with `pad` values at padded positions."""
    pad = pad or {}
    names = LOSSES[loss].float_inputs

    def row(values: list[float], fill: float) -> list[float]:
        return values + [fill] * (WIDTH - len(values))

    lp = torch.tensor([row(d["lp"], pad.get("lp", 0.0)) for d in DATUMS], requires_grad=True)
    inputs = {
        name: torch.tensor([row(d[name], pad.get(name, 0.0)) for d in DATUMS]) for name in names
    }
    mask = torch.tensor([[t < len(d["lp"]) for t in range(WIDTH)] for d in DATUMS])
    return lp, inputs, mask


def _reference(
    loss: str, config: dict[str, float], icepop: tuple[float, float] | None = None
) -> tuple[list[list[float]], list[list[float]]]:
    """Per datum, reference losses and gradients (0 at tokens IcePop drops)."""
    values, grads = [], []
    for datum in DATUMS:
        lp = datum["lp"]
        inputs = {k: v for k, v in datum.items() if k in LOSSES[loss].float_inputs}
        keep = [True] * len(lp) if icepop is None else icepop_keep(lp, inputs, *icepop)
        kept = masked_datum({"lp": lp, **inputs}, keep)
        kept_values, kept_grads = REFERENCES[loss](kept.pop("lp"), kept, config)
        row_values, row_grads = iter(kept_values), iter(kept_grads)
        values.append([next(row_values) if k else 0.0 for k in keep])
        grads.append([next(row_grads) if k else 0.0 for k in keep])
    return values, grads


def _run(
    loss: str, config: dict[str, float], pad: dict[str, float] | None = None
) -> tuple[LossOutcome, torch.Tensor]:
    lp, inputs, mask = _tensors(loss, pad)
    outcome = compute(LOSSES[loss], lp, inputs, mask, config)
    outcome.elementwise.sum().backward()
    assert lp.grad is not None
    return outcome, lp.grad


def _assert_rows(actual: torch.Tensor, expected: list[list[float]]) -> None:
    for row, values in zip(actual, expected, strict=True):
        np.testing.assert_allclose(row[: len(values)].numpy(), values, rtol=1e-5, atol=1e-6)
        assert not row[len(values) :].any()  # padding: exactly zero


CUSTOM = {
    "ppo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "cispo": {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3},
    "gspo": {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05},
    "dro": {"beta": 0.3},
}


CASES = [(loss, None) for loss in sorted(LOSSES)] + sorted(CUSTOM.items())


@pytest.mark.parametrize(("loss", "given"), CASES, ids=[f"{n}-{g}" for n, g in CASES])
def test_values_and_gradients_match_the_reference(
    loss: str, given: dict[str, float] | None
) -> None:
    config = resolve_config(loss, LOSSES[loss], given)
    outcome, grad = _run(loss, config)
    values, grads = _reference(loss, config)
    _assert_rows(outcome.elementwise.detach(), values)
    _assert_rows(grad, grads)
    assert outcome.icepop_counted is None


def test_defaults_are_the_documented_ones() -> None:
    clip = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert {name: resolve_config(name, LOSSES[name], None) for name in LOSSES} == {
        "cross_entropy": {},
        "importance_sampling": {},
        "ppo": clip,
        "cispo": clip,
        "gspo": clip,
        "dro": {"beta": 0.05},
    }


def test_clipping_is_active_on_these_inputs() -> None:
    """Guard: the hand-made ratios straddle the default bounds, so clipping is exercised."""
    ppo, _ = _run("ppo", resolve_config("ppo", LOSSES["ppo"], None))
    plain, _ = _run("importance_sampling", {})
    changed = (ppo.elementwise != plain.elementwise).sum().item()
    assert changed == 3  # tokens 0 and 3 of datum 0 (A > 0 above 1.2; A < 0 below 0.8), 2 of 1


@pytest.mark.parametrize("loss", SAMPLER_LOSSES)
def test_icepop_zeroes_tokens_outside_the_band(loss: str) -> None:
    config = resolve_config(loss, LOSSES[loss], {"icepop_low": 0.7, "icepop_high": 1.4})
    outcome, grad = _run(loss, config)
    values, grads = _reference(loss, config, icepop=(0.7, 1.4))
    _assert_rows(outcome.elementwise.detach(), values)
    _assert_rows(grad, grads)
    # Counted: the 7 tokens with a non-zero advantage; dropped: ratios 0.368, 0.607, 1.49.
    assert (outcome.icepop_counted, outcome.icepop_masked) == (7, 3)
    assert [values[0][3], values[1][1], values[1][2]] == [0.0, 0.0, 0.0]


EXTREME_PADS = [
    {"lp": -80.0, "logprobs": -1e30, "advantages": 1e30, "weights": 1e30},
    {"lp": 0.0, "logprobs": 3e38, "advantages": -3e38, "sequence_ratio_mask": 1e30},
]


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("icepop", [False, True], ids=["plain", "icepop"])
@pytest.mark.parametrize("pad", EXTREME_PADS, ids=["huge-ratio", "huge-values"])
def test_extreme_padding_changes_nothing(loss: str, icepop: bool, pad: dict[str, float]) -> None:
    given = {"icepop_low": 0.5, "icepop_high": 2.0} if icepop and loss != "cross_entropy" else {}
    config = resolve_config(loss, LOSSES[loss], given)
    clean, clean_grad = _run(loss, config)
    extreme, extreme_grad = _run(loss, config, pad)
    assert torch.isfinite(extreme.elementwise).all() and torch.isfinite(extreme_grad).all()
    assert torch.equal(extreme.elementwise, clean.elementwise)
    assert torch.equal(extreme_grad, clean_grad)
    assert (extreme.icepop_counted, extreme.icepop_masked) == (
        clean.icepop_counted,
        clean.icepop_masked,
    )


def test_gspo_sequence_ratio_is_one_number_per_datum() -> None:
    """Datum 0's sequence tokens are 0, 1 and 3 (token 2 is masked, token 4 has A = 0)."""
    config = resolve_config("gspo", LOSSES["gspo"], {"clip_low_threshold": 0.0})
    outcome, _ = _run("gspo", {**config, "clip_high_threshold": 100.0})
    ratio = math.exp(((-1.0 + 1.3) + (-2.0 + 1.9) + (-3.0 + 2.0)) / 3)
    expected = [-ratio * 1.0, -ratio * -0.5, 0.0, -ratio * -1.5, 0.0]
    np.testing.assert_allclose(outcome.elementwise[0].detach().numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("loss", "given", "message"),
    [
        (
            "ppo",
            {"icepop_low": 0.5},
            "loss_fn_config for loss 'ppo' is invalid: icepop_low and icepop_high must be "
            "given together; fix it",
        ),
        (
            "cispo",
            {"clip_low_threshold": 1.3, "clip_high_threshold": 1.2},
            "loss_fn_config for loss 'cispo' is invalid: clip_low_threshold=1.3 and "
            "clip_high_threshold=1.2 must satisfy 0 <= clip_low_threshold <= "
            "clip_high_threshold; fix it",
        ),
        (
            "dro",
            {"beta": -1.0},
            "loss_fn_config for loss 'dro' is invalid: beta=-1.0 must be >= 0; fix it",
        ),
        (
            "gspo",
            {"icepop_low": float("nan"), "icepop_high": 2.0},
            "loss_fn_config for loss 'gspo' is invalid: icepop_low=nan must be a finite "
            "number; fix it",
        ),
        (
            "cross_entropy",
            {"icepop_low": 0.5, "icepop_high": 2.0},
            "loss_fn_config keys ['icepop_high', 'icepop_low'] are not accepted by loss "
            "'cross_entropy' (accepted keys: none); remove them",
        ),
        (
            "ppo",
            {"beta": 0.1},
            "loss_fn_config keys ['beta'] are not accepted by loss 'ppo' (accepted keys: "
            "clip_high_threshold, clip_low_threshold, icepop_high, icepop_low); remove them",
        ),
    ],
)
def test_bad_config_is_refused_with_the_rule(
    loss: str, given: dict[str, float], message: str
) -> None:
    with pytest.raises(UserError) as caught:
        resolve_config(loss, LOSSES[loss], given)
    assert str(caught.value) == message


def test_stable_reinforce_is_unsupported() -> None:
    with pytest.raises(UnsupportedLoss) as caught:
        loss_spec("stable_reinforce")
    assert str(caught.value) == (
        "loss function 'stable_reinforce' is not supported by this trainer; "
        "use one of: cispo, cross_entropy, dro, gspo, importance_sampling, ppo"
    )
