"""The embedded sampling engine: batched decoding over one resident base, many adapters at once.

Each request is expanded into one row per sample. Rows run together in batches of at most
`max_batch_rows`: prompts are left-padded, the attention mask and explicit position ids make
the padding invisible, and a `DynamicCache` carries keys and values between decode steps. Every
forward pass (prefill and each decode step) binds each distinct adapter of the batch to its own
rows, so rows of one pass use different adapters and rows without one see the plain base.
Rows that stop leave the batch (cache included) before the next step.

What a returned logprob means is defined in `mint.serve.sampling`. Only the base's worker
thread calls the engine, so it holds no locks.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from mint.errors import UserError
from mint.models.base import ResidentBase
from mint.models.lora import BoundAdapter, bound
from mint.serve.checks import check_requests
from mint.serve.sampling import RowParams, draw, row_generator, sampling_dtype
from mint.serve.types import (
    AdapterRef,
    SampledSequence,
    SampleRequest,
    SampleResult,
    SamplingParams,
)

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """One sample of one request while it decodes."""

    request: int
    sample: int
    prompt: list[int]
    params: SamplingParams
    adapter: AdapterRef | None
    #: Most tokens this row may sample: max_tokens clipped to the context left.
    limit: int
    stop_ids: frozenset[int]
    #: None for greedy rows.
    generator: torch.Generator | None
    wants_prompt_logprobs: bool
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None
    prompt_logprobs: list[float | None] | None = None


@dataclass
class _Batch:
    """Device state of the rows still decoding, kept aligned with `rows`."""

    rows: list[_Row]
    mask: torch.Tensor  # [rows, tokens so far], 1 where a real token sits
    last_position: torch.Tensor  # [rows, 1], position id of each row's newest token
    params: RowParams
    cache: DynamicCache

    def keep(self, survivors: list[int]) -> None:
        """Drop every row not in `survivors` (indices into `rows`) from the batch."""
        index = torch.tensor(survivors, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in survivors]
        self.mask = self.mask[index]
        self.last_position = self.last_position[index]
        self.params = self.params.select(index)


class Engine:
    """Samples from one resident base, serving several adapters in one batch."""

    def __init__(self, base: ResidentBase, max_batch_rows: int = 64) -> None:
        if max_batch_rows < 1:
            raise UserError(
                f"max_batch_rows is {max_batch_rows}; it must be at least 1; use 1 or more rows"
            )
        self.base = base
        self.max_batch_rows = max_batch_rows
        tokenizer = base.tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = base.eos_token_ids
        # The pad id is masked out everywhere; any valid id would do.
        self._pad_id = int(pad) if pad is not None else (eos[0] if eos else 0)
        forward_args = inspect.signature(base.model.forward).parameters
        # Computing logits only where they are read saves a [rows, prompt, vocab] tensor.
        self._trims_logits = "logits_to_keep" in forward_args

    def generate(self, requests: list[SampleRequest]) -> list[SampleResult]:
        """Sample every request; results come back in request order."""
        check_requests(self.base, requests)
        per_request = [self._rows(index, request) for index, request in enumerate(requests)]
        # Similar prompt lengths share a batch, so less of each batch is padding.
        ordered = sorted(
            (row for rows in per_request for row in rows), key=lambda row: len(row.prompt)
        )
        with torch.inference_mode():
            for start in range(0, len(ordered), self.max_batch_rows):
                self._run(ordered[start : start + self.max_batch_rows])
        return [self._result(rows) for rows in per_request]

    def _rows(self, index: int, request: SampleRequest) -> list[_Row]:
        params = request.params
        stops = self.base.eos_token_ids if params.stop_tokens is None else params.stop_tokens
        limit = min(params.max_tokens, self.base.max_context_length - len(request.prompt))
        return [
            _Row(
                request=index,
                sample=sample,
                prompt=list(request.prompt),
                params=params,
                adapter=request.adapter,
                limit=limit,
                stop_ids=frozenset(stops),
                generator=(
                    None
                    if params.temperature == 0
                    else row_generator(params.seed, sample, self.base.device)
                ),
                wants_prompt_logprobs=request.prompt_logprobs and sample == 0,
            )
            for sample in range(request.num_samples)
        ]

    def _result(self, rows: list[_Row]) -> SampleResult:
        """The result of one request from its rows, which are in sample order."""
        sequences = [
            SampledSequence(list(row.tokens), list(row.logprobs), str(row.stop_reason))
            for row in rows
        ]
        return SampleResult(sequences=sequences, prompt_logprobs=rows[0].prompt_logprobs)

    def _run(self, rows: list[_Row]) -> None:
        """Decode one batch of rows until every row has stopped.

        1. Prefill the left-padded prompts, filling the cache (and prompt logprobs).
        2. Sample a token per row from its last logits and check its stop rules.
        3. Drop stopped rows; feed each survivor's new token as the next step; repeat from 2.
        """
        started = time.monotonic()
        batch, logits = self._prefill(rows)
        steps = 0
        while True:
            tokens = self._sample(batch, logits)
            survivors = [i for i, row in enumerate(batch.rows) if row.stop_reason is None]
            if not survivors:
                break
            if len(survivors) < len(batch.rows):
                batch.keep(survivors)
                tokens = [tokens[i] for i in survivors]
            logits = self._step(batch, tokens)
            steps += 1
        log.debug(
            "batch done rows=%d adapters=%d steps=%d seconds=%.3f",
            len(rows),
            len({row.adapter.key for row in rows if row.adapter}),
            steps + 1,
            time.monotonic() - started,
        )

    def _prefill(self, rows: list[_Row]) -> tuple[_Batch, torch.Tensor]:
        device = self.base.device
        width = max(len(row.prompt) for row in rows)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt, dtype=torch.long)
            mask[i, width - len(row.prompt) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        batch = _Batch(
            rows=rows,
            mask=mask,
            last_position=positions[:, -1:],
            params=RowParams.build(
                [row.params for row in rows],
                self.base.vocab_size,
                device,
                sampling_dtype(self.base.dtype),
            ),
            cache=DynamicCache(config=self.base.model.config),  # type: ignore[arg-type]
        )
        every_position = any(row.wants_prompt_logprobs for row in rows)
        logits = self._forward(batch, ids, positions, every_position)
        if every_position:
            self._fill_prompt_logprobs(rows, logits)
        return batch, logits[:, -1, :]

    def _step(self, batch: _Batch, tokens: list[int]) -> torch.Tensor:
        device = self.base.device
        ids = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(-1)
        batch.mask = torch.cat([batch.mask, torch.ones_like(ids)], dim=-1)
        batch.last_position = batch.last_position + 1
        return self._forward(batch, ids, batch.last_position, False)[:, -1, :]

    def _forward(
        self, batch: _Batch, ids: torch.Tensor, positions: torch.Tensor, every_position: bool
    ) -> torch.Tensor:
        extra = {"logits_to_keep": 0 if every_position else 1} if self._trims_logits else {}
        with bound(self.base.binding, self._bindings(batch.rows)):
            out = self.base.model(
                input_ids=ids,
                attention_mask=batch.mask,
                position_ids=positions,
                past_key_values=batch.cache,
                use_cache=True,
                **extra,
            )
        return out.logits

    def _bindings(self, rows: list[_Row]) -> list[BoundAdapter]:
        """One `BoundAdapter` per distinct adapter key, bound to exactly that key's rows."""
        groups: dict[str, tuple[AdapterRef, list[int]]] = {}
        for i, row in enumerate(rows):
            if row.adapter is not None:
                groups.setdefault(row.adapter.key, (row.adapter, []))[1].append(i)
        bindings = []
        for adapter, members in groups.values():
            # A batch served by one adapter alone skips the per-row gather and scatter.
            everyone = len(members) == len(rows)
            index = None if everyone else torch.tensor(members, device=self.base.device)
            bindings.append(BoundAdapter(adapter.tensors, adapter.scale, rows=index))
        return bindings

    def _fill_prompt_logprobs(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Known shortcoming: when any row of a batch asks for prompt logprobs, the prefill
        keeps logits for every position of every row ([rows, prompt, vocab]); on a large
        vocabulary with long prompts that is gigabytes. Prefilling those requests apart, or
        in chunks of positions, would lift it."""
        width = logits.shape[1]
        for i, row in enumerate(rows):
            if not row.wants_prompt_logprobs:
                continue
            start = width - len(row.prompt)
            # Position p predicts the token at p + 1; the last position predicts no prompt token.
            scores = logits[i, start : width - 1]
            predicted = torch.log_softmax(scores.to(sampling_dtype(scores.dtype)), dim=-1)
            following = torch.tensor(row.prompt[1:], dtype=torch.long, device=logits.device)
            values = predicted.gather(-1, following.unsqueeze(-1)).squeeze(-1).tolist()
            row.prompt_logprobs = [None, *values]

    def _sample(self, batch: _Batch, logits: torch.Tensor) -> list[int]:
        """Draw one token per row, record it, and mark the rows it stops."""
        generators = [row.generator for row in batch.rows]
        tokens, logprobs = draw(logits, batch.params, generators)
        for row, token, logprob in zip(batch.rows, tokens, logprobs, strict=True):
            row.tokens.append(token)
            row.logprobs.append(logprob)
            row.stop_reason = self._stop_reason(row, token)
        return tokens

    def _stop_reason(self, row: _Row, token: int) -> str | None:
        if token in row.stop_ids:
            return "stop"
        stop_strings = row.params.stop_strings
        if stop_strings:
            text = self.base.tokenizer.decode(row.tokens)  # type: ignore[attr-defined]
            if any(stop in text for stop in stop_strings):
                return "stop"
        if len(row.tokens) >= row.limit:
            return "length"
        return None
