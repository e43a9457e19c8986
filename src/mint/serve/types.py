"""Plain data the engine takes and returns: sampling parameters, requests and results.

Requests name the adapter revision they sample with through an `AdapterRef` whose tensors are
already on the base's device; the engine never loads anything itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mint.models.lora import AdapterTensors, SlotPlacement


@dataclass
class SamplingParams:
    """How one request samples. Bounds are checked by `mint.serve.checks`."""

    max_tokens: int = 128
    #: 0 means greedy (argmax); otherwise logits are divided by it before filtering.
    temperature: float = 1.0
    #: Nucleus mass in (0, 1]; 1 turns nucleus filtering off.
    top_p: float = 1.0
    #: Keep only the k most likely tokens; -1 or 0 turns top-k filtering off.
    top_k: int = -1
    #: Any 64-bit integer (signed or unsigned); the same seed gives the same samples.
    #: None draws a fresh random seed per call.
    seed: int | None = None
    #: Stop as soon as the decoded generated text contains any of these.
    stop_strings: list[str] = field(default_factory=list)
    #: None stops at the base's EOS ids; an empty list never stops on a token.
    stop_tokens: list[int] | None = None


@dataclass
class AdapterRef:
    """One adapter revision a request samples with; equal keys mean the same tensors."""

    key: str
    tensors: AdapterTensors
    scale: float
    #: Where the revision sits in a slot bank; the engine then serves its rows from the
    #: bank's stacks. None for tensors of its own, bound per adapter.
    placement: SlotPlacement | None = None


@dataclass
class SampleRequest:
    prompt: list[int]
    params: SamplingParams
    num_samples: int = 1
    #: None samples from the plain base.
    adapter: AdapterRef | None = None
    prompt_logprobs: bool = False


@dataclass
class SampledSequence:
    tokens: list[int]
    #: Logprob of each token under the distribution it was sampled from (see `sampling`).
    logprobs: list[float]
    #: "stop" (a stop token or stop string ended it) or "length" (max_tokens or context).
    stop_reason: str


@dataclass
class SampleResult:
    #: One sequence per requested sample, in sample order.
    sequences: list[SampledSequence]
    #: Untempered logprob of each prompt token given the ones before it; the first entry is
    #: None. None when the request did not ask for prompt logprobs.
    prompt_logprobs: list[float | None] | None
