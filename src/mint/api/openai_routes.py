"""The OpenAI-compatible endpoints: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

`model` names what to sample: a base id, a policy id (its `latest` alias), `policy:alias`
or `policy@revision`. Requests go through the same control plane as Tinker's `asample`, so
cold revisions load as background work and a full cold-load queue answers 429 with
Retry-After. Streaming uses server-sent events, one chunk per sampled token that adds text.

Stop strings follow OpenAI: the returned text ends before the first stop string. While
streaming, text that could still turn out to start a stop string is held back until it
cannot. Reported logprobs are those of the distribution each token was sampled from.

Fields OpenAI defines but this server does not implement (penalties, logit_bias, tools,
response_format, ...) are refused by name unless they carry their "off" value
(`UNSUPPORTED_FIELDS`), and every prompt of a request is checked before any is submitted.

Known shortcoming: `top_logprobs` (alternatives per position) is refused; the engine returns
only the sampled token's logprob. Returning the k best of the processed distribution per
row would lift it.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Tenant` dependency.
import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field

from mint.catalog.records import RevisionRecord
from mint.control.futures import JsonResult, Result
from mint.control.service import Service
from mint.errors import Busy, MintError, UserError, http_status_for
from mint.serve.checks import params_problems, prompt_problems
from mint.serve.types import SampleRequest, SampleResult, SamplingParams

log = logging.getLogger(__name__)

#: OpenAI's default for /v1/completions when max_tokens is not given.
DEFAULT_COMPLETION_TOKENS = 16
#: Chat completions without max_tokens may use the rest of the context, up to this many.
DEFAULT_CHAT_TOKENS = 512
MAX_CHOICES = 64


#: OpenAI request fields this server does not implement, the values that mean "off" (which
#: clients often send explicitly), and what to do instead. Any other value is refused rather
#: than ignored, since ignoring it would answer something the caller did not ask for.
UNSUPPORTED_FIELDS: tuple[tuple[str, tuple[Any, ...], str], ...] = (
    ("frequency_penalty", (None, 0, 0.0), "repetition penalties are not applied; send 0"),
    ("presence_penalty", (None, 0, 0.0), "repetition penalties are not applied; send 0"),
    ("logit_bias", (None, {}), "logits are not biased; send no logit_bias"),
    ("best_of", (None, 1), "ranking several samples is not done; ask for n samples instead"),
    ("suffix", (None, ""), "insertion after a suffix is not done; send no suffix"),
    ("tools", (None, []), "tool calls are not parsed; describe tools in the messages"),
    ("functions", (None, []), "function calls are not parsed; describe them in the messages"),
    ("tool_choice", (None, "none", "auto"), "tool calls are not parsed; send no tool_choice"),
    ("function_call", (None, "none", "auto"), "function calls are not parsed; send none"),
    ("response_format", (None, {"type": "text"}), "output is not constrained; ask in the prompt"),
)


def _unsupported_problems(body: BaseModel) -> list[str]:
    extra = body.model_extra or {}
    return [
        f"{name} is {extra[name]!r}, which this server does not support: {remedy}"
        for name, neutral, remedy in UNSUPPORTED_FIELDS
        if name in extra and extra[name] not in neutral
    ]


class _Body(BaseModel):
    # Extra fields are kept (not dropped) so unsupported ones can be refused by name.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class CompletionBody(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _params(body: _Body, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop_strings=_stops(body.stop),
    )


# ------------------------------------------------------------------------- text handling


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that may still grow into a stop string (or into a
    multi-byte character whose bytes have not all been sampled yet)."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


@dataclass
class TextStream:
    """The text of one choice as its tokens arrive, cut before the first stop string."""

    decode: Callable[[list[int]], str]
    stops: list[str]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sent: int = 0
    stopped: bool = False

    def text(self) -> str:
        text = self.decode(self.tokens)
        cuts = [text.find(stop) for stop in self.stops if stop in text]
        return text[: min(cuts)] if cuts else text

    def push(self, token: int, logprob: float) -> str:
        """Record a token; return the text it makes safe to send (possibly empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        self.logprobs.append(logprob)
        text = self.decode(self.tokens)
        if any(stop in text for stop in self.stops):
            self.stopped = True
            return self.flush()
        safe = len(text) - _held_back(text, self.stops)
        delta = text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta

    def flush(self) -> str:
        """Everything not sent yet, once the choice has ended."""
        text = self.text()
        delta = text[self.sent :]
        self.sent = len(text)
        return delta


# ---------------------------------------------------------------------------- submission


@dataclass
class _Call:
    """One sample request in flight and what the route needs to answer it."""

    future: Any
    holder: list[SampleResult]
    prompt_tokens: int


def _submit(
    service: Service,
    tenant: str,
    base_id: str,
    revision: RevisionRecord | None,
    request: SampleRequest,
    on_token: Callable[[int, int, float], None] | None = None,
) -> _Call:
    holder: list[SampleResult] = []

    def finish(result: SampleResult) -> Result:
        holder.append(result)
        return JsonResult({})

    future = service.submit_sample(tenant, base_id, revision, request, finish, on_token)
    return _Call(future, holder, len(request.prompt))


async def _result(call: _Call) -> SampleResult:
    await asyncio.wrap_future(call.future.inner)
    return call.holder[0]


def _tokenizer(service: Service, base_id: str) -> Any:
    return service.worker(base_id).base.tokenizer


def _decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    return lambda tokens: str(tokenizer.decode(tokens, skip_special_tokens=True))


def _max_tokens(service: Service, base_id: str, asked: int | None, default: int, used: int) -> int:
    if asked is not None:
        return asked
    context = service.worker(base_id).base.max_context_length
    return max(1, min(default, context - used - 1))


def _chat_prompt(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    if not messages:
        raise UserError(
            "messages is an empty list; a chat needs at least one message; send e.g. "
            '[{"role": "user", "content": "..."}]'
        )
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "this base's tokenizer has no chat template, so chat messages cannot be turned "
            "into a prompt; use /v1/completions with a prompt string instead"
        )
    plain = [
        {
            "role": m.role,
            # A null content (an assistant turn that only called tools) renders as empty.
            "content": m.content
            if isinstance(m.content, str)
            else "".join(str(part.get("text", "")) for part in m.content or []),
        }
        for m in messages
    ]
    try:
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    except (TemplateError, ValueError) as error:  # the template's own refusal of the chat
        raise UserError(
            f"this base's chat template refuses the messages: {error}; send messages the "
            "template accepts (roles system, user and assistant, in turn)"
        ) from None
    return list(tokenizer.encode(text, add_special_tokens=False))


def _completion_prompts(tokenizer: Any, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, list) and not prompt:
        raise UserError(
            "prompt is an empty list, which asks for no completion at all; send a string, a "
            "list of token ids, or a non-empty list of strings or of token-id lists"
        )
    if isinstance(prompt, str):
        return [list(tokenizer.encode(prompt, add_special_tokens=False))]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [
        list(tokenizer.encode(p, add_special_tokens=False)) if isinstance(p, str) else list(p)
        for p in prompt
    ]


# ------------------------------------------------------------------------------ answers


def openai_error(error: MintError, param: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape, so the `openai` client raises the typed error with its
    code; back-pressure carries Retry-After and `x-should-retry`, which the client obeys."""
    status = http_status_for(error)
    headers = {"x-should-retry": "false"}
    if isinstance(error, Busy):
        headers = {
            "x-should-retry": "true",
            "Retry-After": str(max(1, round(error.retry_after_s))),
        }
    return JSONResponse({"error": _error_body(error, param)}, status, headers=headers)


def _error_body(error: MintError, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: message, type, code, param."""
    kind = "invalid_request_error" if error.category == "user" else "server_error"
    return {"message": error.message, "type": kind, "code": error.code, "param": param}


def _finish_reason(stream: TextStream, stop_reason: str) -> str:
    return "stop" if stream.stopped or stop_reason == "stop" else "length"


def _chat_logprobs(tokenizer: Any, stream: TextStream) -> dict[str, Any]:
    content = []
    for token, logprob in zip(stream.tokens, stream.logprobs, strict=True):
        piece = str(tokenizer.decode([token]))
        content.append(
            {
                "token": piece,
                "logprob": logprob,
                "bytes": list(piece.encode()),
                "top_logprobs": [],
            }
        )
    return {"content": content}


def _completion_logprobs(tokenizer: Any, stream: TextStream) -> dict[str, Any]:
    pieces = [str(tokenizer.decode([token])) for token in stream.tokens]
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {
        "tokens": pieces,
        "token_logprobs": list(stream.logprobs),
        "top_logprobs": None,
        "text_offset": offsets,
    }


def _usage(calls: list[_Call], results: list[SampleResult]) -> dict[str, int]:
    prompt = sum(call.prompt_tokens for call in calls)
    completion = sum(len(s.tokens) for r in results for s in r.sequences)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


Kind = Literal["chat", "completion"]


@dataclass
class _Plan:
    """A validated OpenAI request, turned into what the control plane samples."""

    kind: Kind
    model: str
    base_id: str
    revision: RevisionRecord | None
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    logprobs: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: f"cmpl-{secrets.token_hex(12)}")

    def requests(self) -> list[SampleRequest]:
        return [SampleRequest(list(p), self.params, num_samples=self.n) for p in self.prompts]

    def envelope(self, chunk: bool = False) -> dict[str, Any]:
        kind = "chat.completion" if self.kind == "chat" else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if chunk and self.kind == "chat" else kind,
            "created": self.created,
            "model": self.model,
        }


def _check_plan(service: Service, plan: _Plan, body: _Body) -> _Plan:
    """Raise one error with every problem of the request, before any of its prompts is
    submitted (so a bad later prompt leaves no earlier one running); return the plan."""
    base = service.worker(plan.base_id).base
    several = len(plan.prompts) > 1
    problems = _unsupported_problems(body) + [
        f"prompt {index}: {problem}" if several else problem
        for index, prompt in enumerate(plan.prompts)
        for problem in prompt_problems(base, prompt)
    ]
    problems += params_problems(base, plan.params)
    if problems:
        raise UserError("; ".join(problems))
    return plan


def _plan_chat(service: Service, tenant: str, body: ChatBody) -> _Plan:
    if body.top_logprobs:
        raise UserError(
            f"top_logprobs is {body.top_logprobs}; this server returns the sampled token's "
            "logprob only; ask for logprobs=true with top_logprobs 0 or unset"
        )
    base_id, revision = service.resolve_model(tenant, body.model)
    prompt = _chat_prompt(_tokenizer(service, base_id), body.messages)
    asked = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
    tokens = _max_tokens(service, base_id, asked, DEFAULT_CHAT_TOKENS, len(prompt))
    usage = bool((body.stream_options or {}).get("include_usage"))
    plan = _Plan(
        "chat", body.model, base_id, revision, [prompt], _params(body, tokens), body.n,
        body.logprobs, usage,
    )  # fmt: skip
    return _check_plan(service, plan, body)


def _plan_completion(service: Service, tenant: str, body: CompletionBody) -> _Plan:
    if body.echo:
        raise UserError("echo=true is not supported; send echo=false and join prompt and text")
    if body.logprobs:
        raise UserError(
            f"logprobs is {body.logprobs}; this server returns the sampled token's logprob "
            "only; ask for logprobs=0"
        )
    base_id, revision = service.resolve_model(tenant, body.model)
    prompts = _completion_prompts(_tokenizer(service, base_id), body.prompt)
    longest = max((len(p) for p in prompts), default=0)
    tokens = _max_tokens(service, base_id, body.max_tokens, DEFAULT_COMPLETION_TOKENS, longest)
    usage = bool((body.stream_options or {}).get("include_usage"))
    plan = _Plan(
        "completion", body.model, base_id, revision, prompts, _params(body, tokens), body.n,
        body.logprobs is not None, usage,
    )  # fmt: skip
    return _check_plan(service, plan, body)


def _choice(plan: _Plan, tokenizer: Any, index: int, stream: TextStream, reason: str) -> Any:
    if plan.kind == "chat":
        return {
            "index": index,
            "message": {"role": "assistant", "content": stream.text()},
            "logprobs": _chat_logprobs(tokenizer, stream) if plan.logprobs else None,
            "finish_reason": _finish_reason(stream, reason),
        }
    return {
        "index": index,
        "text": stream.text(),
        "logprobs": _completion_logprobs(tokenizer, stream) if plan.logprobs else None,
        "finish_reason": _finish_reason(stream, reason),
    }


async def _answer(service: Service, plan: _Plan, calls: list[_Call]) -> dict[str, Any]:
    tokenizer = _tokenizer(service, plan.base_id)
    results = [await _result(call) for call in calls]
    choices = []
    for p, result in enumerate(results):
        for j, sequence in enumerate(result.sequences):
            stream = TextStream(_decoder(tokenizer), plan.params.stop_strings)
            for token, logprob in zip(sequence.tokens, sequence.logprobs, strict=True):
                stream.push(token, logprob)
            choices.append(_choice(plan, tokenizer, p * plan.n + j, stream, sequence.stop_reason))
    return {**plan.envelope(), "choices": choices, "usage": _usage(calls, results)}


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _delta_chunk(
    plan: _Plan, index: int, text: str | None, reason: str | None, logprobs: Any = None
) -> dict[str, Any]:
    if plan.kind == "chat":
        delta: dict[str, Any] = {} if text is None else {"content": text}
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
    return {**plan.envelope(chunk=True), "choices": [choice]}


def _cancel_unfinished(service: Service, plan: _Plan, calls: list[_Call]) -> None:
    """The caller went away: stop its requests still sampling, so their rows leave the
    batch instead of decoding to the end for nobody."""
    for call in calls:
        if not call.future.inner.done():
            service.cancel_sample(plan.base_id, call.future)


async def _events(
    service: Service, plan: _Plan, calls: list[_Call], queue: asyncio.Queue[Any]
) -> AsyncIterator[str]:
    """The server-sent events of a streamed answer; a client that disconnects cancels its
    requests (the server closes this generator, which runs the `finally`)."""
    try:
        async for event in _event_lines(service, plan, calls, queue):
            yield event
    finally:
        _cancel_unfinished(service, plan, calls)


async def _event_lines(
    service: Service, plan: _Plan, calls: list[_Call], queue: asyncio.Queue[Any]
) -> AsyncIterator[str]:
    """1. A role chunk per chat choice. 2. A chunk per token that adds text (or logprobs).
    3. When every call is done: the held-back rest and the finish reason per choice,
    the usage chunk when asked, and [DONE]."""
    tokenizer = _tokenizer(service, plan.base_id)
    choices = len(calls) * plan.n
    streams = {i: TextStream(_decoder(tokenizer), plan.params.stop_strings) for i in range(choices)}
    if plan.kind == "chat":
        for index in range(choices):
            chunk = _delta_chunk(plan, index, "", None)
            chunk["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield _sse(chunk)
    done = 0
    while done < len(calls):
        item = await queue.get()
        if item is None:
            done += 1
            continue
        index, token, logprob = item
        stream = streams[index]
        text = stream.push(token, logprob)
        if text or (plan.logprobs and not stream.stopped):
            yield _sse(
                _delta_chunk(
                    plan, index, text, None, _token_logprobs(plan, tokenizer, token, logprob)
                )
            )
    failed = [c.future.inner.exception() for c in calls if c.future.inner.exception()]
    if failed:
        error = failed[0]
        if not isinstance(error, MintError):
            log.error("sample failed mid-stream", exc_info=error)
            error = MintError(f"internal error: {error}")
        yield _sse({"error": _error_body(error)})
        yield _sse("[DONE]")
        return
    results = [call.holder[0] for call in calls]
    for p, result in enumerate(results):
        for j, sequence in enumerate(result.sequences):
            index = p * plan.n + j
            rest = streams[index].flush()
            reason = _finish_reason(streams[index], sequence.stop_reason)
            yield _sse(_delta_chunk(plan, index, rest if rest else None, reason))
    if plan.include_usage:
        yield _sse({**plan.envelope(chunk=True), "choices": [], "usage": _usage(calls, results)})
    yield _sse("[DONE]")


def _token_logprobs(plan: _Plan, tokenizer: Any, token: int, logprob: float) -> Any:
    if not plan.logprobs:
        return None
    piece = str(tokenizer.decode([token]))
    if plan.kind == "chat":
        entry = {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}
        return {"content": [{**entry, "top_logprobs": []}]}
    return {"tokens": [piece], "token_logprobs": [logprob], "top_logprobs": None}


#: How often a non-streamed answer still sampling checks that its client is connected.
DISCONNECT_POLL_S = 0.25


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _answer_while_connected(
    service: Service, plan: _Plan, calls: list[_Call], request: Request
) -> Any:
    """The whole answer, unless the client disconnects first (a timeout, a closed
    connection): then its requests are cancelled and nothing is sent."""
    answer = asyncio.ensure_future(_answer(service, plan, calls))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if answer.done():
        return answer.result()
    answer.cancel()
    _cancel_unfinished(service, plan, calls)
    return Response(status_code=499)  # nobody reads it: the client is gone


async def _run(service: Service, tenant: str, plan: _Plan, stream: bool, request: Request) -> Any:
    if not stream:
        calls = await asyncio.to_thread(
            lambda: [
                _submit(service, tenant, plan.base_id, plan.revision, r) for r in plan.requests()
            ]
        )
        return await _answer_while_connected(service, plan, calls, request)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def sink(offset: int) -> Callable[[int, int, float], None]:
        def put(sample: int, token: int, logprob: float) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (offset + sample, token, logprob))

        return put

    def submit_all() -> list[_Call]:
        calls = []
        for p, request in enumerate(plan.requests()):
            call = _submit(service, tenant, plan.base_id, plan.revision, request, sink(p * plan.n))
            call.future.inner.add_done_callback(
                lambda _: loop.call_soon_threadsafe(queue.put_nowait, None)
            )
            calls.append(call)
        return calls

    calls = await asyncio.to_thread(submit_all)
    return StreamingResponse(_events(service, plan, calls, queue), media_type="text/event-stream")


def _model_entries(service: Service, tenant: str) -> list[dict[str, Any]]:
    entries = [
        {"id": spec.public_id, "object": "model", "created": 0, "owned_by": "mint"}
        for spec in service.supported_bases()
    ]
    offset, page = 0, 1000
    while True:
        policies, total = service.catalog.list_policies(tenant, page, offset)
        for policy in policies:
            created = int(policy.created_at.timestamp())
            names = [policy.policy_id] + [
                f"{policy.policy_id}:{alias}"
                for alias in service.catalog.aliases(tenant, policy.policy_id)
            ]
            entries.extend(
                {"id": name, "object": "model", "created": created, "owned_by": tenant,
                 "root": policy.base_id, "parent": policy.base_id}
                for name in names
            )  # fmt: skip
        offset += len(policies)
        if not policies or offset >= total:
            return entries


def _model_entry(service: Service, tenant: str, model: str) -> dict[str, Any]:
    """The /v1/models entry of a listed name, or of any other name the completion routes
    accept (`policy@revision`)."""
    for entry in _model_entries(service, tenant):
        if entry["id"] == model:
            return entry
    base_id, revision = service.resolve_model(tenant, model)
    if revision is None:
        return {"id": model, "object": "model", "created": 0, "owned_by": "mint"}
    created = int(revision.created_at.timestamp())
    return {"id": model, "object": "model", "created": created, "owned_by": tenant,
            "root": base_id, "parent": base_id}  # fmt: skip


def add_openai_routes(app: FastAPI, service: Service, Tenant: Any) -> None:
    @app.get("/v1/models")
    async def models(tenant: Tenant) -> dict[str, Any]:
        entries = await asyncio.to_thread(_model_entries, service, tenant)
        return {"object": "list", "data": entries}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, tenant: Tenant) -> Any:
        try:
            return await asyncio.to_thread(_model_entry, service, tenant, model)
        except MintError as error:
            return openai_error(error)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody, tenant: Tenant, request: Request) -> Any:
        try:
            plan = await asyncio.to_thread(_plan_completion, service, tenant, body)
            return await _run(service, tenant, plan, body.stream, request)
        except MintError as error:
            return openai_error(error)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatBody, tenant: Tenant, request: Request) -> Any:
        try:
            plan = await asyncio.to_thread(_plan_chat, service, tenant, body)
            return await _run(service, tenant, plan, body.stream, request)
        except MintError as error:
            return openai_error(error)
