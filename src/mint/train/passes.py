"""How the jobs of one forward_backward call become passes, and how passes become results.

A call carries one job per policy. Its datums, in job order, are cut into passes that fit
the trainer's token budget; a pass may hold rows of several jobs (a *segment* each), and
every segment's policy adapter is bound to that segment's rows only. Losses are sums over
datums, so per-job results and gradients add up exactly across passes.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from mint.train.batch import Batch, micro_batches
from mint.train.losses import LossOutcome, LossSpec
from mint.train.state import HOST
from mint.train.types import ForwardBackwardResult, TrainDatum

log = logging.getLogger(__name__)


class TrainJob(NamedTuple):
    """One policy's part of a forward_backward call; a plain 4-tuple works as well."""

    policy_id: str
    data: list[TrainDatum]
    loss_fn: str
    loss_fn_config: Mapping[str, float] | None = None


@dataclass(frozen=True)
class ResolvedJob:
    """A job whose loss, config and data were checked."""

    policy_id: str
    data: list[TrainDatum]
    spec: LossSpec
    config: dict[str, float]


def plan_passes(
    jobs: Sequence[ResolvedJob], token_budget: int
) -> list[list[tuple[int, list[TrainDatum]]]]:
    """Per pass, its segments in row order: (job index, that job's datums in the pass)."""
    flat = [(index, datum) for index, job in enumerate(jobs) for datum in job.data]
    passes = []
    start = 0
    for run in micro_batches([datum for _, datum in flat], token_budget):
        rows = flat[start : start + len(run)]
        start += len(run)
        grouped = itertools.groupby(rows, key=lambda row: row[0])
        passes.append([(index, [datum for _, datum in group]) for index, group in grouped])
    return passes


@dataclass
class JobTally:
    """One job's outputs and metric counts, gathered over its passes."""

    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    loss: float = 0.0
    tokens: int = 0
    icepop_counted: int | None = None
    icepop_masked: int = 0

    def add(self, batch: Batch, logprobs: torch.Tensor, outcome: LossOutcome) -> None:
        """Record a segment: per-datum outputs without padding, and its counts."""
        logprobs_np = logprobs.detach().to(HOST).numpy()
        losses_np = outcome.elementwise.detach().to(HOST).numpy()
        for row, length in enumerate(batch.lengths):
            out = {
                "logprobs": logprobs_np[row, :length].copy(),
                "elementwise_loss": losses_np[row, :length].copy(),
            }
            self.outputs.append(out)
            self.loss += float(np.sum(out["elementwise_loss"], dtype=np.float64))
        self.tokens += sum(batch.lengths)
        if outcome.icepop_counted is not None:
            self.icepop_counted = (self.icepop_counted or 0) + outcome.icepop_counted
            self.icepop_masked += outcome.icepop_masked

    def result(self) -> ForwardBackwardResult:
        metrics = {"loss:sum": self.loss, "num_tokens:sum": float(self.tokens)}
        if self.icepop_counted is not None:
            # Over the whole job, not averaged per pass: passes differ in size.
            fraction = self.icepop_masked / self.icepop_counted if self.icepop_counted else 0.0
            metrics["icepop_masked_fraction:mean"] = fraction
        return ForwardBackwardResult(outputs=self.outputs, metrics=metrics)
