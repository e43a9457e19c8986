"""The OpenAI-compatible endpoints, driven by the official `openai` client against a live
server, sampling a policy trained through the tinker SDK on the tiny base."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
import tinker
import torch
from tests.api.conftest import API_KEY, OTHER_KEY, TINY, LiveServer
from tinker import types

from mint.api.openai_routes import TextStream


@dataclass
class Trained:
    policy: str
    sampler: tinker.SamplingClient
    tokenizer: object


@pytest.fixture(scope="module")
def trained(live_server: LiveServer) -> Iterator[Trained]:
    service = tinker.ServiceClient(base_url=live_server.url, api_key=API_KEY)
    training = service.create_lora_training_client(base_model=TINY, rank=4, seed=9).result()
    tokens = list(range(60, 80))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    for _ in range(2):
        training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    path = training.save_weights_for_sampler("oa-1").result().path
    sampler = service.create_sampling_client(model_path=path).result()
    yield Trained(training.model_id, sampler, training.get_tokenizer())
    service.close("success").result()


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, max_retries=0)


def greedy_tinker_text(trained: Trained, prompt: list[int], max_tokens: int) -> str:
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    result = trained.sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result()
    tokens = result.sequences[0].tokens
    return str(trained.tokenizer.decode(tokens, skip_special_tokens=True))  # type: ignore[attr-defined]


def test_streamed_chat_from_a_trained_policy_matches_the_tinker_sampler(
    client: openai.OpenAI, trained: Trained
) -> None:
    messages = [{"role": "user", "content": "count: "}]
    stream = client.chat.completions.create(
        model=trained.policy, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals in (["length"], ["stop"])
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens <= 12
    template = trained.tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        messages, add_generation_prompt=True, tokenize=False
    )
    prompt = trained.tokenizer.encode(template, add_special_tokens=False)  # type: ignore[attr-defined]
    assert usage.prompt_tokens == len(prompt)
    assert text == greedy_tinker_text(trained, prompt, 12)
    whole = client.chat.completions.create(
        model=f"{trained.policy}:latest", messages=messages, max_tokens=12, temperature=0
    )
    assert whole.choices[0].message.content == text
    assert whole.object == "chat.completion" and whole.model == f"{trained.policy}:latest"


def test_completions_take_every_model_form_and_sampling_option(
    client: openai.OpenAI, trained: Trained
) -> None:
    prompt = "the cat"
    texts = set()
    for model in (trained.policy, f"{trained.policy}:latest", f"{trained.policy}@1",
                  f"{trained.policy}@oa-1"):  # fmt: skip
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        texts.add(answer.choices[0].text)
    assert len(texts) == 1
    ids = trained.tokenizer.encode(prompt, add_special_tokens=False)  # type: ignore[attr-defined]
    assert texts == {greedy_tinker_text(trained, ids, 8)}
    base = client.completions.create(model=TINY, prompt=prompt, max_tokens=8, temperature=0)
    assert base.choices[0].text != next(iter(texts))  # the policy really changed the output
    seeded = [
        client.completions.create(
            model=trained.policy, prompt=prompt, max_tokens=6, temperature=1.0, top_p=0.9,
            n=2, seed=5, logprobs=0,
        )
        for _ in range(2)
    ]  # fmt: skip
    assert [c.text for c in seeded[0].choices] == [c.text for c in seeded[1].choices]
    assert [c.index for c in seeded[0].choices] == [0, 1]
    logprobs = seeded[0].choices[0].logprobs
    assert logprobs is not None and all(lp <= 0 for lp in logprobs.token_logprobs)


def test_a_stop_string_ends_the_text_before_it(client: openai.OpenAI, trained: Trained) -> None:
    free = (
        client.completions.create(model=trained.policy, prompt="ab", max_tokens=10, temperature=0)
        .choices[0]
        .text
    )
    assert len(free) >= 4
    stop = free[2:4]
    cut = free[: free.find(stop)]
    for stream in (False, True):
        answer = client.completions.create(
            model=trained.policy, prompt="ab", max_tokens=10, temperature=0, stop=[stop],
            stream=stream,
        )  # fmt: skip
        chunks = list(answer) if stream else [answer]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == cut
        assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"


def test_models_lists_the_callers_policies_and_aliases(
    live_server: LiveServer, trained: Trained
) -> None:
    mine = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY)
    ids = [model.id for model in mine.models.list()]
    assert TINY in ids and trained.policy in ids and f"{trained.policy}:latest" in ids
    theirs = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=OTHER_KEY)
    assert trained.policy not in [model.id for model in theirs.models.list()]
    with pytest.raises(openai.NotFoundError) as caught:
        theirs.completions.create(model=trained.policy, prompt="x", max_tokens=2)
    assert "GET /v1/models" in str(caught.value)


def test_authentication_and_errors(live_server: LiveServer, trained: Trained) -> None:
    url = f"{live_server.url}/v1/completions"
    body = {"model": trained.policy, "prompt": "x", "max_tokens": 2}
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    by_header = httpx.post(url, json=body, headers={"X-API-Key": API_KEY}, timeout=30)
    assert by_header.status_code == 200
    bad = httpx.post(
        url,
        json={**body, "temperature": -1},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    assert "temperature is -1.0" in bad.json()["error"]["message"]


def test_a_full_cold_queue_is_429_with_retry_after(
    live_server: LiveServer, trained: Trained
) -> None:
    service = tinker.ServiceClient(base_url=live_server.url, api_key=API_KEY)
    training = service.create_lora_training_client(base_model=TINY, rank=2, seed=4).result()
    training.save_weights_for_sampler("cold-1").result()
    loader = live_server.service.worker(TINY).loader
    limit = loader.max_cold_loads
    loader.max_cold_loads = 0
    try:
        answer = httpx.post(
            f"{live_server.url}/v1/completions",
            json={"model": training.model_id, "prompt": "x", "max_tokens": 2},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=30,
        )
    finally:
        loader.max_cold_loads = limit
    assert answer.status_code == 429
    assert int(answer.headers["Retry-After"]) >= 1
    assert answer.json()["error"]["code"] == "busy"
    assert answer.headers["x-should-retry"] == "true"
    service.close("success").result()


def test_text_stream_holds_back_what_may_start_a_stop_string() -> None:
    pieces = {1: "he", 2: "l", 3: "lo", 4: " wor", 5: "ld"}
    stream = TextStream(lambda ts: "".join(pieces[t] for t in ts), stops=["lo w", "xyz"])
    sent = [stream.push(token, -0.5) for token in (1, 2, 3, 4)]
    assert sent == ["he", "", "l", ""]
    assert stream.stopped and stream.text() == "hel"
    assert stream.push(5, -0.1) == "" and stream.flush() == ""
    plain = TextStream(lambda ts: "".join(pieces[t] for t in ts), stops=[])
    assert [plain.push(t, 0.0) for t in (1, 2, 3)] == ["he", "l", "lo"]


def wire_message(error: openai.APIStatusError) -> str:
    """The message as the server sent it (the client's own message prefixes the status)."""
    assert isinstance(error.body, dict)
    return str(error.body["message"])


def test_refusals_have_openai_error_shape_so_the_client_raises_typed_errors(
    live_server: LiveServer, client: openai.OpenAI, trained: Trained
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=trained.policy, prompt="x", max_tokens=2, n=0)
    assert caught.value.status_code == 400 and caught.value.code == "malformed_request"
    assert caught.value.param == "n"
    assert wire_message(caught.value) == (
        "request body does not match the OpenAI API: body.n: Input should be greater than or "
        "equal to 1; fix those fields (see the API reference of this endpoint)"
    )
    anonymous = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="tml-no", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        anonymous.models.list()
    assert denied.value.status_code == 401 and denied.value.code == "unauthenticated"
    broken = httpx.post(
        f"{live_server.url}/v1/chat/completions",
        content=b'{"model": ',
        headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"},
        timeout=30,
    )
    assert broken.status_code == 400 and broken.headers["x-should-retry"] == "false"
    error = broken.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "malformed_request",
        None,
    )
    assert error["message"].startswith("request body does not match the OpenAI API: body.10:")


def test_empty_prompts_chats_and_infinite_temperatures_are_refused(
    client: openai.OpenAI, trained: Trained
) -> None:
    with pytest.raises(openai.BadRequestError) as no_prompt:
        client.completions.create(model=trained.policy, prompt=[], max_tokens=2)
    assert no_prompt.value.code == "invalid_request"
    assert wire_message(no_prompt.value) == (
        "prompt is an empty list, which asks for no completion at all; send a string, a list "
        "of token ids, or a non-empty list of strings or of token-id lists"
    )
    with pytest.raises(openai.BadRequestError) as no_messages:
        client.chat.completions.create(model=trained.policy, messages=[], max_tokens=2)
    assert no_messages.value.code == "invalid_request"
    assert wire_message(no_messages.value) == (
        "messages is an empty list; a chat needs at least one message; send e.g. "
        '[{"role": "user", "content": "..."}]'
    )
    # The openai client refuses to encode infinity; other clients send it as Python's json does.
    hot = httpx.post(
        f"{client.base_url}completions",
        content=f'{{"model": "{trained.policy}", "prompt": "x", "temperature": Infinity}}',
        headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"},
        timeout=30,
    )
    assert hot.status_code == 400 and hot.json()["error"]["code"] == "invalid_request"
    assert hot.json()["error"]["message"] == (
        "temperature is inf; it must be 0 (greedy) or a finite positive number; "
        "use a temperature >= 0 such as 1"
    )


def test_a_null_message_content_reads_as_empty(client: openai.OpenAI, trained: Trained) -> None:
    messages: list[dict[str, object]] = [
        {"role": "user", "content": "count: "},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "again"},
    ]
    empty = [{**m, "content": m["content"] or ""} for m in messages]
    answers = [
        client.chat.completions.create(
            model=trained.policy,
            messages=chat,
            max_tokens=4,
            temperature=0,  # type: ignore[arg-type]
        )
        for chat in (messages, empty)
    ]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[0].usage == answers[1].usage


def test_models_retrieve_answers_one_model_or_not_found(
    client: openai.OpenAI, trained: Trained
) -> None:
    policy = client.models.retrieve(trained.policy)
    assert (policy.id, policy.owned_by) == (trained.policy, "alpha")
    assert client.models.retrieve(TINY).id == TINY
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve(f"{trained.policy}:nope")
    assert caught.value.code == "not_found"
    assert wire_message(caught.value).startswith(
        f"revision 'nope' not found on policy '{trained.policy}': it is no alias"
    )


def test_unsupported_fields_are_refused_unless_they_are_off(
    client: openai.OpenAI, trained: Trained
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=trained.policy, messages=[{"role": "user", "content": "x"}], max_tokens=2,
            frequency_penalty=1.5, tools=[{"type": "function", "function": {"name": "f"}}],
        )  # fmt: skip
    assert caught.value.code == "invalid_request"
    assert wire_message(caught.value) == (
        "frequency_penalty is 1.5, which this server does not support: repetition penalties "
        "are not applied; send 0; tools is [{'type': 'function', 'function': {'name': 'f'}}], "
        "which this server does not support: tool calls are not parsed; describe tools in the "
        "messages"
    )
    off = client.completions.create(
        model=trained.policy, prompt="x", max_tokens=2, frequency_penalty=0,
        presence_penalty=0, logit_bias={}, best_of=1,
    )  # fmt: skip
    assert len(off.choices) == 1


def test_a_bad_later_prompt_is_named_by_its_index_before_anything_runs(
    client: openai.OpenAI, trained: Trained
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=trained.policy, prompt=[[1, 2], [900]], max_tokens=2)
    assert wire_message(caught.value) == (
        "prompt 1: prompt token ids 900 at position 0 are outside the vocabulary of "
        "mint-test/tiny-llama (ids 0 to 258); tokenize with that base's tokenizer"
    )


def test_models_retrieve_takes_a_revision_too(client: openai.OpenAI, trained: Trained) -> None:
    pinned = client.models.retrieve(f"{trained.policy}@1")
    assert (pinned.id, pinned.owned_by) == (f"{trained.policy}@1", "alpha")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve(f"{trained.policy}@99")
    assert caught.value.code == "not_found"


def test_a_failure_after_the_stream_started_is_a_typed_error_event(
    live_server: LiveServer, client: openai.OpenAI
) -> None:
    service = tinker.ServiceClient(base_url=live_server.url, api_key=API_KEY)
    training = service.create_lora_training_client(base_model=TINY, rank=2, seed=5).result()
    training.save_weights_for_sampler("finite").result()
    catalog = live_server.service.catalog
    revision = catalog.resolve("alpha", training.model_id, "finite")
    tensors = catalog.read_revision_tensors(revision)
    path = sorted(tensors)[0]
    tensors[path] = (torch.full_like(tensors[path][0], float("nan")), tensors[path][1])
    catalog.export_revision("alpha", training.model_id, "damaged", tensors, 1)
    stream = client.completions.create(
        model=f"{training.model_id}@damaged", prompt="x", max_tokens=2, stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        list(stream)
    assert caught.value.code == "invalid_adapter"
    assert caught.value.message.endswith(
        f"rejected (1 problem(s)): tensors {path} A hold NaN or infinite values; the revision "
        "is damaged (or its training diverged); sample another revision, or train from a "
        "finite state and export again"
    )
    service.close("success").result()


@pytest.fixture
def slow_decoding(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> object:
    """Each decode step of the tiny base takes at least 20 ms, so a 400-token answer takes
    8 s or more: a request that ends sooner was cancelled, not finished."""
    worker = live_server.service.worker(TINY)
    record = worker.stats.record_tokens

    def slowly(count: int, now: float | None = None) -> None:
        time.sleep(0.02)
        record(count, now)

    monkeypatch.setattr(worker.stats, "record_tokens", slowly)
    return worker


def _rows_gone(worker: object, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if worker.running_rows() == 0 and worker.queued_samples() == 0:  # type: ignore[attr-defined]
            return True
        time.sleep(0.02)
    return False


def test_a_stream_whose_client_disconnects_leaves_the_batch(
    live_server: LiveServer, trained: Trained, slow_decoding: object
) -> None:
    body = {"model": trained.policy, "prompt": "count: ", "max_tokens": 400, "temperature": 0,
            "n": 2, "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{live_server.url}/v1/completions", json=body, headers=headers,
                      timeout=30) as response:  # fmt: skip
        assert response.status_code == 200
        lines = response.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in seen)
        assert slow_decoding.running_rows() == 2  # type: ignore[attr-defined]
    # Closed after a few tokens: both rows leave long before 400 tokens would be done.
    assert _rows_gone(slow_decoding, within_s=3)


def test_a_call_whose_client_times_out_leaves_the_batch(
    live_server: LiveServer, trained: Trained, slow_decoding: object
) -> None:
    body = {"model": trained.policy, "prompt": "count: ", "max_tokens": 400, "temperature": 0}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_server.url}/v1/completions", json=body, headers=headers, timeout=0.5)
    assert _rows_gone(slow_decoding, within_s=3)
    # The engine serves on.
    done = httpx.post(f"{live_server.url}/v1/completions", headers=headers, timeout=30,
                      json={**body, "max_tokens": 3})  # fmt: skip
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] <= 3
