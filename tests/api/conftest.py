"""A live mint server on the tiny test base, in this process, for SDK-level tests."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from tinker.proto import tinker_public_pb2 as pb

from mint.api.app import create_app
from mint.config import Settings
from mint.control.service import Service

API_KEY = "tml-test-tenant-a"
OTHER_KEY = "tml-test-tenant-b"
TINY = "mint-test/tiny-llama"


@dataclass
class LiveServer:
    url: str
    service: Service
    home: Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory, bases_dir: Path) -> Iterator[LiveServer]:
    os.environ["TINKER_TELEMETRY"] = "0"
    home = tmp_path_factory.mktemp("mint-home")
    settings = Settings(home=home, device="cpu", dtype="float32", long_poll_s=5.0)
    # Share the session's already-built test base instead of building another.
    (home / "bases").symlink_to(bases_dir, target_is_directory=True)
    service = Service(settings)
    for tenant, key in (("alpha", API_KEY), ("beta", OTHER_KEY)):
        service.catalog.ensure_tenant(tenant)
        service.catalog.add_api_key(tenant, key)
    service.worker(TINY)
    port = _free_port()
    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.05)
    yield LiveServer(f"http://127.0.0.1:{port}", service, home)
    server.should_exit = True
    thread.join(timeout=10)
    service.close()


def forward_backward_body(model_id: str, seq_id: int) -> bytes:
    """A small protobuf forward_backward request: cross-entropy on 8 tokens."""
    message = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    datum = message.data.add()
    datum.model_input.add().encoded_text.tokens = np.arange(30, 38, dtype=np.int32).tobytes()
    target = pb.Tensor(
        dense=np.arange(31, 39, dtype=np.int64).tobytes(), dtype=pb.DTYPE_INT64, shape=[8]
    )
    datum.loss_fn_inputs["target_tokens"].CopyFrom(target)
    return message.SerializeToString()
