"""Per-row sampling for the engine: the processed distribution each row draws from, and the draw.

The distribution a row samples from is built in this order, from the logits of its last
position in float32 (float64 when the base runs in float64):

1. divide the logits by the row's temperature;
2. top-k (when k > 0 and k < vocabulary): keep the k highest tempered logits; among equal
   logits the lower token id ranks first;
3. top-p (when top_p < 1): softmax what top-k kept, then keep the smallest run of the most
   likely tokens whose probabilities add up to at least top_p (the most likely token always
   stays);
4. renormalise: softmax over the kept tokens, every other token gets probability 0.

The logprob reported for a sampled token is its log-probability under that processed
distribution (after temperature, top-k and top-p), so a trainer recomputing it from the same
logits gets the same number. A greedy row (temperature 0) takes the argmax of the logits (the
lowest id on ties) and reports its logprob under the untempered full softmax.

Each sampling row owns a `torch.Generator` seeded from (seed, sample index), so a fixed seed
gives the same samples whatever else shares the batch.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass

import torch

from mint.serve.types import SamplingParams

log = logging.getLogger(__name__)


def sampling_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Logits are processed in float32, or in the model's dtype when that is wider."""
    return torch.promote_types(model_dtype, torch.float32)


@dataclass
class RowParams:
    """Sampling parameters of the rows of a batch as tensors, one entry per row."""

    temperature: torch.Tensor  # [rows] in the sampling dtype; 0 marks a greedy row
    top_k: torch.Tensor  # int64 [rows]; the vocabulary size when top-k is off
    top_p: torch.Tensor  # [rows] in the sampling dtype; 1 when top-p is off

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        vocab_size: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> RowParams:
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=dtype, device=device),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=dtype, device=device),
        )

    def select(self, rows: torch.Tensor) -> RowParams:
        return RowParams(self.temperature[rows], self.top_k[rows], self.top_p[rows])

    def concat(self, other: RowParams) -> RowParams:
        """These rows followed by `other`'s rows."""
        return RowParams(
            torch.cat([self.temperature, other.temperature]),
            torch.cat([self.top_k, other.top_k]),
            torch.cat([self.top_p, other.top_p]),
        )


def processed_logprobs(logits: torch.Tensor, params: RowParams) -> torch.Tensor:
    """Log-probabilities of the processed distribution of every row ([rows, vocab]).

    Dropped tokens get -inf. Greedy rows get the untempered full log-softmax.
    """
    logits = logits.to(sampling_dtype(logits.dtype))
    vocab = logits.shape[-1]
    greedy = params.temperature == 0
    temperature = torch.where(greedy, torch.ones_like(params.temperature), params.temperature)
    # Shifting by the row maximum first changes no probability, and keeps a tiny temperature
    # from overflowing to inf (and the softmax to NaN): the top token stays at 0.
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    scaled = shifted / temperature.unsqueeze(-1)
    filter_k = (params.top_k < vocab) & ~greedy
    filter_p = (params.top_p < 1) & ~greedy
    if not bool((filter_k | filter_p).any()):
        return torch.log_softmax(scaled, dim=-1)
    # One stable sort serves both filters: rank i of a row is its i-th most likely token.
    ordered, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    keep = ranks < torch.where(filter_k, params.top_k, vocab).unsqueeze(-1)
    probs = torch.softmax(ordered.masked_fill(~keep, float("-inf")), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    top_p = torch.where(filter_p, params.top_p, torch.full_like(params.top_p, 2.0))
    keep &= mass_before < top_p.unsqueeze(-1)
    kept = torch.zeros_like(keep).scatter(-1, order, keep)
    return torch.log_softmax(scaled.masked_fill(~kept, float("-inf")), dim=-1)


def draw(
    logits: torch.Tensor, params: RowParams, generators: list[torch.Generator | None]
) -> tuple[list[int], list[float]]:
    """Sample one token per row; return the tokens and their processed logprobs.

    `generators[i]` is None exactly for greedy rows.
    """
    logprobs = processed_logprobs(logits, params)
    greedy_tokens = torch.argmax(logits, dim=-1)
    probs = logprobs.exp()
    picked = []
    for row, generator in enumerate(generators):
        if generator is None:
            picked.append(greedy_tokens[row : row + 1])
        else:
            picked.append(torch.multinomial(probs[row], 1, generator=generator))
    tokens = torch.cat(picked)
    chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens.tolist(), chosen.tolist()


def row_seed(seed: int, sample_index: int) -> int:
    """A 64-bit generator seed for sample `sample_index` of a request seeded with `seed`.

    Hashing keeps nearby (seed, index) pairs from giving correlated generator streams.
    """
    digest = hashlib.sha256(f"mint-sample:{seed}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def row_generator(seed: int | None, sample_index: int, device: torch.device) -> torch.Generator:
    """The generator of one sampling row; a None seed draws a fresh one."""
    if seed is None:
        seed = secrets.randbits(64)
    generator = torch.Generator(device=device)
    generator.manual_seed(row_seed(seed, sample_index))
    return generator
