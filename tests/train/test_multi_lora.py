"""forward_backward_many: several policies' jobs in shared passes equal separate calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import WARM_UP, make_data

from mint.errors import NotFound, UserError
from mint.models.base import ResidentBase
from mint.models.lora import ATTENTION_TARGETS, AdapterBinding, BoundAdapter, LoraSignature
from mint.train import TrainDatum, Trainer
from mint.train.losses import LOSSES
from mint.train.passes import ResolvedJob, TrainJob, plan_passes

pytestmark = pytest.mark.usefixtures("one_thread")

SIGNATURES = {
    "a": LoraSignature(rank=4, alpha=8),
    "b": LoraSignature(rank=2, alpha=4, target_modules=ATTENTION_TARGETS),
    "c": LoraSignature(rank=8, alpha=16),
    "idle": LoraSignature(rank=4, alpha=8),
}


def _trainer(base: ResidentBase, **kwargs: int) -> Trainer:
    """Four warmed-up policies (non-zero A and B), identical on every call."""
    trainer = Trainer(base, **kwargs)
    for seed, (policy_id, signature) in enumerate(SIGNATURES.items()):
        trainer.create_policy(policy_id, signature, seed=seed)
        trainer.forward_backward(policy_id, make_data(50 + seed, [5, 4]), "cross_entropy")
        trainer.optim_step(policy_id, WARM_UP)
    return trainer


def _sampler_data(
    trainer: Trainer, policy_id: str, seed: int, lengths: list[int]
) -> list[TrainDatum]:
    """Sampler logprobs within +-0.3 of the policy's own, as after a rollout."""
    data = make_data(seed, lengths, weights=False, sampler=True)
    current = trainer.forward_backward(policy_id, data, "importance_sampling", forward_only=True)
    for datum, out in zip(data, current.outputs, strict=True):
        offsets = np.linspace(-0.3, 0.3, len(out["logprobs"]), dtype=np.float32)
        datum.loss_inputs["logprobs"] = out["logprobs"] + offsets
    return data


def _jobs(trainer: Trainer) -> list[TrainJob]:
    gspo_config = {"icepop_low": 0.8, "icepop_high": 1.2, "clip_high_threshold": 1.1}
    return [
        TrainJob("a", make_data(60, [7, 3]), "cross_entropy"),
        TrainJob("b", _sampler_data(trainer, "b", 61, [5, 6, 2]), "ppo", {}),
        TrainJob("c", _sampler_data(trainer, "c", 62, [4]), "gspo", gspo_config),
    ]


def _grads(trainer: Trainer, policy_id: str) -> dict[str, torch.Tensor]:
    return {
        f"{path}.{part}": tensor
        for path, pair in trainer.gradients(policy_id).items()
        for part, tensor in zip("AB", pair, strict=True)
    }


@pytest.mark.parametrize("budget", [2048, 12], ids=["one-pass", "mixed-passes"])
def test_shared_passes_equal_separate_calls(tiny_base: ResidentBase, budget: int) -> None:
    shared = _trainer(tiny_base, pass_token_budget=budget)
    separate = _trainer(tiny_base)
    jobs = _jobs(separate)
    together = shared.forward_backward_many(jobs)
    assert shared.live_policies[-3:] == ["a", "b", "c"]
    for job, result in zip(jobs, together, strict=True):
        alone = separate.forward_backward(*job)
        assert result.metrics.keys() == alone.metrics.keys()
        for key, value in alone.metrics.items():
            assert result.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6)
        for out, ref in zip(result.outputs, alone.outputs, strict=True):
            np.testing.assert_allclose(out["logprobs"], ref["logprobs"], rtol=0, atol=1e-5)
            np.testing.assert_allclose(
                out["elementwise_loss"], ref["elementwise_loss"], rtol=0, atol=1e-5
            )
        expected = _grads(separate, job.policy_id)
        assert any(grad.abs().max() > 0 for grad in expected.values())
        got = _grads(shared, job.policy_id)
        assert got.keys() == expected.keys()  # only the policy's own tensors
        for name, grad in got.items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-5)
    assert all(not grad.any() for grad in _grads(shared, "idle").values())


def test_mixed_passes_really_mix(tiny_base: ResidentBase) -> None:
    """Guard for the test above: budget 12 puts rows of two jobs into one pass."""
    resolved = [
        ResolvedJob(job.policy_id, job.data, LOSSES[job.loss_fn], {})
        for job in _jobs(_trainer(tiny_base))
    ]
    plans = [[index for index, _ in segments] for segments in plan_passes(resolved, 12)]
    # Rows 7 | 3, 5 | 6, 2 | 4: the second pass holds a's last row and b's first.
    assert plans == [[0], [0, 1], [1], [2]]


def test_forward_only_many_touches_no_gradient(tiny_base: ResidentBase) -> None:
    trainer = _trainer(tiny_base)
    before = {policy_id: trainer.save_state(policy_id) for policy_id in SIGNATURES}
    jobs = _jobs(trainer)
    forward = trainer.forward_backward_many(jobs, forward_only=True)
    for policy_id in SIGNATURES:
        assert all(not grad.any() for grad in _grads(trainer, policy_id).values())
    full = trainer.forward_backward_many(jobs)
    for a, b in zip(forward, full, strict=True):
        assert a.metrics == b.metrics
    for policy_id, payload in before.items():
        assert trainer.save_state(policy_id) == payload


@pytest.mark.parametrize(
    ("jobs", "error", "message"),
    [
        ([], UserError, "forward_backward_many needs at least one job; got none"),
        (
            [TrainJob("a", make_data(1, [3]), "cross_entropy")] * 2,
            UserError,
            "policies ['a'] appear in more than one job of one call; merge each policy's "
            "data into one job",
        ),
        (
            [TrainJob(p, make_data(1, [3]), "cross_entropy") for p in ("a", "b", "c")],
            UserError,
            "3 policies in one call exceed max_live_policies=2; split the call or raise the limit",
        ),
        (
            [("a", make_data(1, [3]), "cross_entropy", None), ("zz", [], "ppo", None)],
            UserError,
            "job 1 (policy 'zz'): a forward_backward job needs at least one datum; got none",
        ),
        (
            [
                ("a", make_data(1, [3]), "cross_entropy", None),
                ("zz", make_data(1, [3]), "cross_entropy", None),
            ],
            NotFound,
            "policy 'zz' is not on this trainer; create it with create_policy or load_state first",
        ),
    ],
)
def test_bad_calls_are_refused_before_any_work(
    tiny_base: ResidentBase, jobs: list[TrainJob], error: type[Exception], message: str
) -> None:
    trainer = _trainer(tiny_base, max_live_policies=2)
    live = trainer.live_policies
    with pytest.raises(error) as caught:
        trainer.forward_backward_many(jobs)
    assert str(caught.value) == message
    assert trainer.live_policies == live
    assert tiny_base.binding.adapters == []


def _graph_names(output: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_row_slices_split_once_and_must_tile_the_batch() -> None:
    """Segments are cut by one split (indexing each slice would zero-fill a full-size
    gradient per slice in backward) and must cover the batch in order."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, generator=generator, requires_grad=True)
    y = torch.randn(5, 3, 6, generator=generator)
    pairs = [
        {"m": (torch.randn(2, 8, generator=generator), torch.randn(6, 2, generator=generator))}
        for _ in range(2)
    ]
    binding = AdapterBinding(
        [BoundAdapter(pairs[0], 0.5, slice(0, 2)), BoundAdapter(pairs[1], 2.0, slice(2, 5))]
    )
    out = binding.apply("m", x, y)
    names = _graph_names(out)
    assert "SplitWithSizesBackward0" in names and "SliceBackward0" not in names
    for rows, (a, b), scale in (
        (slice(0, 2), pairs[0]["m"], 0.5),
        (slice(2, 5), pairs[1]["m"], 2.0),
    ):
        expected = y[rows] + scale * ((x[rows] @ a.t()) @ b.t())
        assert torch.equal(out[rows], expected)
    gaps = AdapterBinding(
        [BoundAdapter(pairs[0], 0.5, slice(0, 2)), BoundAdapter(pairs[1], 2.0, slice(3, 5))]
    )
    with pytest.raises(ValueError, match="row-slice adapters must tile the batch in order"):
        gaps.apply("m", x, y)
    short = AdapterBinding([BoundAdapter(pairs[0], 0.5, slice(0, 4))])
    with pytest.raises(ValueError, match="row slices cover 4 of 5 rows"):
        short.apply("m", x, y)
