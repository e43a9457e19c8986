"""Checks on sample requests, run before any forward pass so one bad request never fails a
batch halfway. Each problem is worded as: the value, the rule, the fix."""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict

import torch

from mint.errors import InvalidAdapter, UserError
from mint.models.base import ResidentBase
from mint.serve.types import AdapterRef, SampleRequest, SamplingParams

log = logging.getLogger(__name__)

#: Samples one request may ask for. Each sample is a row held until the request is done, so
#: an unbounded count could exhaust host memory and keeps later requests waiting behind it.
MAX_NUM_SAMPLES = 4096
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1
#: How many bad token ids (or damaged tensors) one problem lists before it counts the rest.
SHOWN_TOKENS = 5


def _bad_ids(tokens: list[int], vocab_size: int) -> list[tuple[int, object]]:
    return [
        (position, token)
        for position, token in enumerate(tokens)
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size
    ]


def _describe_ids(bad: list[tuple[int, object]]) -> str:
    shown = ", ".join(f"{token!r} at position {position}" for position, token in bad[:SHOWN_TOKENS])
    more = f" and {len(bad) - SHOWN_TOKENS} more" if len(bad) > SHOWN_TOKENS else ""
    return shown + more


def prompt_problems(base: ResidentBase, prompt: list[int]) -> list[str]:
    if not prompt:
        return ["the prompt is empty; a prompt needs at least one token; send a non-empty prompt"]
    problems = []
    vocab = base.vocab_size
    bad = _bad_ids(prompt, vocab)
    if bad:
        problems.append(
            f"prompt token ids {_describe_ids(bad)} are outside the vocabulary of "
            f"{base.base_id} (ids 0 to {vocab - 1}); tokenize with that base's tokenizer"
        )
    context = base.max_context_length
    if len(prompt) >= context:
        problems.append(
            f"the prompt has {len(prompt)} tokens but {base.base_id} has a context of "
            f"{context} tokens, which must also hold at least one sampled token; shorten the "
            f"prompt to at most {context - 1} tokens"
        )
    return problems


def params_problems(base: ResidentBase, params: SamplingParams) -> list[str]:
    problems = []
    if not params.max_tokens >= 1:
        problems.append(
            f"max_tokens is {params.max_tokens}; it must be at least 1; ask for 1 or more tokens"
        )
    if not 0 <= params.temperature < math.inf:
        problems.append(
            f"temperature is {params.temperature}; it must be 0 (greedy) or a finite "
            "positive number; use a temperature >= 0 such as 1"
        )
    if not 0 < params.top_p <= 1:
        problems.append(
            f"top_p is {params.top_p}; it must be in (0, 1]; use 1 to turn nucleus sampling off"
        )
    if not params.top_k >= -1:
        problems.append(
            f"top_k is {params.top_k}; it must be -1 or 0 (off) or a positive count; "
            "use -1 to turn top-k off"
        )
    seed = params.seed
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX
    ):
        problems.append(
            f"seed {seed!r} is not a 64-bit integer; use an int from {SEED_MIN} to {SEED_MAX} "
            "or no seed"
        )
    if any(not stop for stop in params.stop_strings):
        problems.append(
            "stop_strings holds an empty string, which would stop every sample at once; "
            "drop the empty stop string"
        )
    bad = _bad_ids(params.stop_tokens or [], base.vocab_size)
    if bad:
        problems.append(
            f"stop token ids {_describe_ids(bad)} are outside the vocabulary of "
            f"{base.base_id} (ids 0 to {base.vocab_size - 1}); use ids the base can sample"
        )
    return problems


def request_problems(base: ResidentBase, request: SampleRequest) -> list[str]:
    """Every problem with one request (empty when it can run)."""
    problems = prompt_problems(base, request.prompt) + params_problems(base, request.params)
    if not 1 <= request.num_samples <= MAX_NUM_SAMPLES:
        problems.append(
            f"num_samples is {request.num_samples}; it must be from 1 to {MAX_NUM_SAMPLES}; "
            f"ask for 1 to {MAX_NUM_SAMPLES} samples per request (send several requests for more)"
        )
    return problems


def _on_device(tensor: torch.Tensor, device: torch.device) -> bool:
    if tensor.device.type != device.type:
        return False
    return device.index is None or tensor.device.index in (None, device.index)


def adapter_problems(base: ResidentBase, adapter: AdapterRef) -> list[str]:
    """Problems that would break or silently skip part of `adapter` in a forward pass."""
    problems = []
    for path, (a, b) in sorted(adapter.tensors.items()):
        layer = base.layers.get(path)
        if layer is None:
            problems.append(f"module {path} is not an adaptable layer of {base.base_id}")
            continue
        rank = a.shape[0] if a.dim() == 2 else -1
        want_a, want_b = (rank, layer.in_features), (layer.out_features, rank)
        if a.dim() != 2 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(
                f"module {path} has A {tuple(a.shape)} and B {tuple(b.shape)}; expected "
                f"A [rank, {layer.in_features}] and B [{layer.out_features}, rank]"
            )
        for name, tensor in (("A", a), ("B", b)):
            if not _on_device(tensor, base.device) or tensor.dtype != base.dtype:
                problems.append(
                    f"module {path} {name} is {tensor.dtype} on {tensor.device}; the base "
                    f"runs {base.dtype} on {base.device}; place the adapter there first"
                )
    return problems


class FiniteAdapterKeys:
    """Keys of adapters whose tensors were found finite. Equal keys mean the same immutable
    tensors, so each adapter is scanned once, not on every request that uses it."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._keys

    def add(self, key: str) -> None:
        with self._lock:
            self._keys[key] = None
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)


FINITE_ADAPTERS = FiniteAdapterKeys()


def nonfinite_problems(adapter: AdapterRef) -> list[str]:
    """NaN or infinite adapter entries turn a row's logits into NaN, and one NaN row makes
    the draw of its whole batch fail, so such an adapter never reaches a forward pass."""
    if adapter.key in FINITE_ADAPTERS:
        return []
    paths = sorted(adapter.tensors)
    flags = [torch.isfinite(t).all() for path in paths for t in adapter.tensors[path]]
    finite = torch.stack(flags).tolist() if flags else []  # one device sync for all of them
    bad = [f"{path} {part}" for i, path in enumerate(paths) for j, part in enumerate("AB")
           if not finite[2 * i + j]]  # fmt: skip
    if not bad:
        FINITE_ADAPTERS.add(adapter.key)
        return []
    more = f" and {len(bad) - SHOWN_TOKENS} more" if len(bad) > SHOWN_TOKENS else ""
    return [
        f"tensors {', '.join(bad[:SHOWN_TOKENS])}{more} hold NaN or infinite values; the "
        "revision is damaged (or its training diverged); sample another revision, or train "
        "from a finite state and export again"
    ]


def check_requests(base: ResidentBase, requests: list[SampleRequest]) -> None:
    """Raise one `UserError` listing every bad request, then `InvalidAdapter` for a bad
    adapter; return quietly when the whole list can run."""
    problems = [
        f"request {index}: {problem}"
        for index, request in enumerate(requests)
        for problem in request_problems(base, request)
    ]
    if problems:
        raise UserError("; ".join(problems))
    checked: set[str] = set()
    for request in requests:
        adapter = request.adapter
        if adapter is None or adapter.key in checked:
            continue
        found = adapter_problems(base, adapter)
        found = found or nonfinite_problems(adapter)
        if found:
            raise InvalidAdapter(found, subject=f"adapter {adapter.key}")
        checked.add(adapter.key)
