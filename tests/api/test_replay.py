"""Every training and sampling request sent twice gives the same final state as sent once.

A test-only ASGI wrapper delivers each POST to the app twice (as a client retrying after a
lost answer would) and returns the second answer; the run's final training state and samples
must equal those of a run without replays.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tinker
import uvicorn
from tests.api.conftest import API_KEY, TINY
from tinker import types

from mint.api.app import create_app
from mint.config import Settings
from mint.control.service import Service

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ReplayEveryPost:
    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.replayed = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break

        async def replay_receive() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        async def discard(_: Message) -> None:
            return None

        await self.app(scope, replay_receive, discard)
        self.replayed += 1
        await self.app(scope, replay_receive, send)


def _serve(app: Any) -> tuple[uvicorn.Server, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture
def two_servers(
    tmp_path: Path, bases_dir: Path
) -> Iterator[tuple[Service, str, Service, str, ReplayEveryPost]]:
    made = []
    wrappers = []
    for name, wrap in (("once", False), ("twice", True)):
        home = tmp_path / name
        home.mkdir()
        (home / "bases").symlink_to(bases_dir, target_is_directory=True)
        service = Service(Settings(home=home, device="cpu", dtype="float32", long_poll_s=5.0))
        service.catalog.ensure_tenant("alpha")
        service.catalog.add_api_key("alpha", API_KEY)
        app: Any = create_app(service)
        if wrap:
            app = ReplayEveryPost(app)
            wrappers.append(app)
        server, url = _serve(app)
        made.append((service, url, server))
    yield made[0][0], made[0][1], made[1][0], made[1][1], wrappers[0]
    for service, _, server in made:
        server.should_exit = True
        service.close()


def _short_run(url: str) -> tuple[str, list[list[int]]]:
    client = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    training = client.create_lora_training_client(base_model=TINY, rank=4, seed=9).result()
    tokens = list(range(50, 70))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )
    for _ in range(3):
        training.forward_backward([datum, datum], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-2))
    training.save_state("final").result()
    sampler = training.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=4)
    prompt = types.ModelInput.from_ints(tokens[:5])
    samples = [sampler.sample(prompt, 2, params).result() for _ in range(2)]
    client.close("success").result()
    return training.model_id, [list(s.tokens) for r in samples for s in r.sequences]


def test_replayed_requests_are_applied_once(
    two_servers: tuple[Service, str, Service, str, ReplayEveryPost],
) -> None:
    once_service, once_url, twice_service, twice_url, replayer = two_servers
    once_id, once_samples = _short_run(once_url)
    twice_id, twice_samples = _short_run(twice_url)
    once_state = once_service.catalog.read_training_state("alpha", once_id, "final")
    twice_state = twice_service.catalog.read_training_state("alpha", twice_id, "final")
    assert replayer.replayed >= 12  # every submit of the run, and its polls, went twice
    assert once_state == twice_state
    assert once_samples == twice_samples
    revisions, _ = twice_service.catalog.list_revisions("alpha", twice_id)
    assert [r.number for r in revisions] == [1]  # the replayed export made no second revision
