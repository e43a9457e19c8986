"""Turn a job's datums into one right-padded batch, validating every datum first.

Right padding keeps each real token at its own position (0..N-1) and, under causal
attention, no real token ever attends to a pad; `mask` marks the real tokens so padding is
excluded from the loss, the gradients and the outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mint.errors import UserError
from mint.train.losses import TARGET_TOKENS, LossSpec
from mint.train.types import TrainDatum

log = logging.getLogger(__name__)

#: Id written into padded positions; any valid id works since padding is masked out.
PAD_ID = 0


@dataclass
class Batch:
    """A padded job on the base's device; every tensor is [B, T]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    #: True at real tokens, False at padding.
    mask: torch.Tensor
    #: Float loss inputs by name, zero at padding.
    inputs: dict[str, torch.Tensor]
    lengths: list[int]


def _token_problems(
    where: str, tokens: np.ndarray, length: int | None, vocab_size: int
) -> list[str]:
    if tokens.ndim != 1:
        return [f"{where} must be 1-D, got shape {tokens.shape}"]
    if length is not None and len(tokens) != length:
        return [f"{where} has length {len(tokens)}, input_tokens has {length}"]
    if not np.issubdtype(tokens.dtype, np.integer):
        return [f"{where} must hold integer token ids, got dtype {tokens.dtype}"]
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        return [f"{where} holds ids outside [0, {vocab_size})"]
    return []


def _float_problems(where: str, values: np.ndarray, length: int) -> list[str]:
    if values.shape != (length,):
        return [f"{where} must have shape ({length},), got {values.shape}"]
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        return [f"{where} must be numeric, got dtype {values.dtype}"]
    if not np.isfinite(values).all():
        return [f"{where} holds NaN or infinite values"]
    return []


def datum_problems(
    index: int, datum: TrainDatum, spec: LossSpec, vocab_size: int, max_length: int
) -> list[str]:
    """Everything wrong with one datum, each worded with its index and field."""
    tokens = np.asarray(datum.input_tokens)
    problems = _token_problems(f"datum {index}: input_tokens", tokens, None, vocab_size)
    if problems:
        return problems
    length = len(tokens)
    if not 1 <= length <= max_length:
        return [f"datum {index}: input_tokens has {length} tokens; allowed 1 to {max_length}"]
    given = set(datum.loss_inputs)
    accepted = {TARGET_TOKENS, *spec.float_inputs}
    for name in sorted({TARGET_TOKENS, *spec.required} - given):
        problems.append(f"datum {index}: loss input {name!r} is missing")
    for name in sorted(given - accepted):
        problems.append(
            f"datum {index}: loss input {name!r} is not read by this loss "
            f"(it reads {sorted(accepted)}); remove it"
        )
    for name in sorted(given & accepted):
        values = np.asarray(datum.loss_inputs[name])
        where = f"datum {index}: {name}"
        if name == TARGET_TOKENS:
            problems += _token_problems(where, values, length, vocab_size)
        else:
            problems += _float_problems(where, values, length)
    return problems


def check_data(
    data: Sequence[TrainDatum], spec: LossSpec, vocab_size: int, max_length: int
) -> None:
    """Raise one `UserError` listing every problem in `data`, or return."""
    if not data:
        raise UserError("a forward_backward job needs at least one datum; got none")
    problems: list[str] = []
    for index, datum in enumerate(data):
        problems += datum_problems(index, datum, spec, vocab_size, max_length)
    if problems:
        raise UserError(
            f"{len(problems)} problem(s) in the job's data: " + "; ".join(_grouped(problems))
        )


def _grouped(problems: list[str]) -> list[str]:
    """Problems that differ only in their datum index, worded once with every index (a job
    of 64 datums all missing one field reads as one line, not 64)."""
    indices: dict[str, list[int]] = {}
    for problem in problems:
        head, _, what = problem.partition(": ")
        index = int(head.removeprefix("datum "))
        indices.setdefault(what, []).append(index)
    lines = []
    for what, seen in indices.items():
        if len(seen) == 1:
            lines.append(f"datum {seen[0]}: {what}")
        else:
            lines.append(f"datums {_ranges(seen)}: {what}")
    return lines


def _ranges(indices: list[int]) -> str:
    """`[0, 1, 2, 5, 7, 8]` as `0-2, 5, 7-8`."""
    spans: list[list[int]] = []
    for index in indices:
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def micro_batches(data: Sequence[TrainDatum], token_budget: int) -> list[list[TrainDatum]]:
    """Split `data`, in order, into runs whose padded size stays within `token_budget`.

    Activation memory grows with the padded batch size, so a large job runs as several
    passes whose gradients add up; a datum longer than the budget gets a pass of its own.
    """
    runs: list[list[TrainDatum]] = []
    current: list[TrainDatum] = []
    longest = 0
    for datum in data:
        length = len(datum.input_tokens)
        if current and (len(current) + 1) * max(longest, length) > token_budget:
            runs.append(current)
            current, longest = [], 0
        current.append(datum)
        longest = max(longest, length)
    if current:
        runs.append(current)
    return runs


def collate(
    data: Sequence[TrainDatum],
    spec: LossSpec,
    vocab_size: int,
    max_length: int,
    device: torch.device,
) -> Batch:
    """Validate all datums (one error lists every problem), then pad them into one batch."""
    check_data(data, spec, vocab_size, max_length)
    lengths = [len(datum.input_tokens) for datum in data]
    shape = (len(data), max(lengths))
    input_ids = np.full(shape, PAD_ID, dtype=np.int64)
    targets = np.full(shape, PAD_ID, dtype=np.int64)
    mask = np.zeros(shape, dtype=bool)
    floats = {name: np.zeros(shape, dtype=np.float32) for name in spec.float_inputs}
    for row, (datum, length) in enumerate(zip(data, lengths, strict=True)):
        input_ids[row, :length] = datum.input_tokens
        targets[row, :length] = datum.loss_inputs[TARGET_TOKENS]
        mask[row, :length] = True
        for name, array in floats.items():
            given = datum.loss_inputs.get(name)
            array[row, :length] = spec.optional[name] if given is None else given
    return Batch(
        input_ids=torch.from_numpy(input_ids).to(device),
        attention_mask=torch.from_numpy(mask.astype(np.int64)).to(device),
        targets=torch.from_numpy(targets).to(device),
        mask=torch.from_numpy(mask).to(device),
        inputs={name: torch.from_numpy(array).to(device) for name, array in floats.items()},
        lengths=lengths,
    )


def _pad_columns(tensor: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(tensor, (0, width - tensor.shape[1]), value=0)


def stack(batches: Sequence[Batch]) -> Batch:
    """The rows of several batches as one batch, right-padded to the widest.

    Each part keeps its own float loss inputs, so the stacked batch carries none; a
    multi-policy pass reads them from the parts (see `passes`).
    """
    if len(batches) == 1:
        return batches[0]
    width = max(batch.input_ids.shape[1] for batch in batches)

    def joined(name: str) -> torch.Tensor:
        return torch.cat([_pad_columns(getattr(batch, name), width) for batch in batches])

    return Batch(
        input_ids=joined("input_ids"),
        attention_mask=joined("attention_mask"),
        targets=joined("targets"),
        mask=joined("mask"),
        inputs={},
        lengths=[length for batch in batches for length in batch.lengths],
    )
