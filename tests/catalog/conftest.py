"""Catalog fixtures: every catalog test runs on SQLite and on PostgreSQL.

SQLite gets a fresh file per test. PostgreSQL gets one scratch schema per test session
(dropped at the end) and every test starts from empty tables. PostgreSQL comes from
MINT_TEST_POSTGRES_URL, else the local server; when it cannot be reached its cases skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from mint.catalog import Catalog
from mint.catalog.schema import Base
from mint.catalog.scratch import DEFAULT_TEST_POSTGRES_URL, scratch_schema
from mint.models.lora import AdapterTensors, LoraSignature

BASE_ID = "mint-test/tiny-llama"
FINGERPRINT = "ab" * 32
SIGNATURE = LoraSignature(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"))
MODULES = {  # module path -> (in_features, out_features)
    "model.layers.0.self_attn.q_proj": (8, 8),
    "model.layers.0.self_attn.v_proj": (8, 4),
}
BACKENDS = ("sqlite", "postgres")


def make_tensors(seed: int, signature: LoraSignature = SIGNATURE) -> AdapterTensors:
    """Small seeded adapter tensors shaped like `MODULES` at the signature's rank."""
    generator = torch.Generator().manual_seed(seed)
    return {
        path: (
            torch.randn(signature.rank, fan_in, generator=generator),
            torch.randn(fan_out, signature.rank, generator=generator),
        )
        for path, (fan_in, fan_out) in MODULES.items()
    }


def postgres_server_url() -> str:
    return os.environ.get("MINT_TEST_POSTGRES_URL", DEFAULT_TEST_POSTGRES_URL)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A URL into this session's scratch schema; skips when PostgreSQL is unreachable."""
    server = postgres_server_url()
    probe = create_engine(server)
    try:
        with probe.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as error:
        pytest.skip(f"PostgreSQL at {server} is unreachable ({error.orig}); set "
                    "MINT_TEST_POSTGRES_URL to a reachable server to run these cases")  # fmt: skip
    finally:
        probe.dispose()
    with scratch_schema(server, prefix="mint_test") as url:
        yield url


def empty_tables(catalog: Catalog) -> None:
    """Delete every row, children first, so a shared schema starts each test empty."""
    with catalog.engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())


@pytest.fixture(params=BACKENDS)
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def catalog(catalog_url: str, tmp_path: Path) -> Iterator[Catalog]:
    store = Catalog(catalog_url, tmp_path / "blobs")
    empty_tables(store)
    store.ensure_tenant("acme")
    store.ensure_tenant("globex")
    store.record_base(BASE_ID, FINGERPRINT)
    store.create_policy("acme", "pol", BASE_ID, FINGERPRINT, SIGNATURE, {"team": "rl"})
    yield store
    store.close()


def sqlite_only(catalog: Catalog) -> None:
    if catalog.engine.dialect.name != "sqlite":
        pytest.skip("checks SQLite's own files and pragmas")
