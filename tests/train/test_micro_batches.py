"""A job split into several passes gives the same outputs and gradients as one pass."""

from __future__ import annotations

import pytest
import torch
from train_helpers import make_data, warmed_trainer

from mint.models.base import ResidentBase
from mint.train.batch import micro_batches


def test_micro_batches_keep_order_and_budget() -> None:
    data = make_data(1, [5, 3, 9, 2, 30, 4])
    runs = micro_batches(data, token_budget=12)
    assert [[len(d.input_tokens) for d in run] for run in runs] == [[5, 3], [9], [2], [30], [4]]
    assert [d for run in runs for d in run] == data


def test_split_job_matches_single_pass(tiny_base: ResidentBase) -> None:
    data = make_data(3, [7, 12, 5, 9, 3], sampler=True, weights=False)
    results, grads = [], []
    for budget, chunk in ((10_000, 10_000), (16, 5)):
        trainer = warmed_trainer(tiny_base, pass_token_budget=budget, unembed_chunk_tokens=chunk)
        results.append(trainer.forward_backward("p", data, "importance_sampling"))
        grads.append(trainer.gradients("p"))
    whole, split = results
    assert split.metrics["loss:sum"] == pytest.approx(whole.metrics["loss:sum"], rel=1e-5)
    for one, other in zip(whole.outputs, split.outputs, strict=True):
        torch.testing.assert_close(
            torch.from_numpy(other["logprobs"]),
            torch.from_numpy(one["logprobs"]),
            rtol=1e-6,
            atol=1e-5,  # tiny-base logprobs reach -60: fp32 rounding
        )
    for path, (grad_a, grad_b) in grads[0].items():
        other_a, other_b = grads[1][path]
        torch.testing.assert_close(other_a, grad_a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(other_b, grad_b, rtol=1e-5, atol=1e-7)
