"""`/metrics`: engine tiers and counters, one registry per Service, exact values."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from mint.api.app import create_app
from mint.config import Settings
from mint.control.futures import JsonResult, Result
from mint.control.service import Service
from mint.models.lora import LoraSignature, init_adapter
from mint.serve import SampleRequest, SampleResult, SamplingParams
from mint.serve.config import EngineConfig

TINY = "mint-test/tiny-llama"


@pytest.fixture
def service(tmp_path: Path, bases_dir: Path) -> Iterator[Service]:
    (tmp_path / "bases").symlink_to(bases_dir, target_is_directory=True)
    settings = Settings(home=tmp_path, device="cpu", dtype="float32")
    made = Service(settings, engine_config=EngineConfig(num_slots=3))
    made.catalog.ensure_tenant("acme")
    yield made
    made.close()


def samples(metrics: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "base"))
            found[(sample.name, labels)] = sample.value
    return found


def sample_once(service: Service, revision: object, tokens: int) -> None:
    def finish(result: SampleResult) -> Result:
        return JsonResult({})

    request = SampleRequest([1, 2, 3], SamplingParams(max_tokens=tokens, temperature=0.0,
                                                      stop_tokens=[]))  # fmt: skip
    future = service.submit_sample("acme", TINY, revision, request, finish)  # type: ignore[arg-type]
    future.inner.result(timeout=60)


def test_metrics_report_tiers_loads_and_tokens(service: Service) -> None:
    worker = service.worker(TINY)
    signature = LoraSignature(rank=2, alpha=4)
    service.catalog.create_policy("acme", "pol", TINY, worker.base.fingerprint, signature)
    tensors = init_adapter(worker.base.layers, signature, seed=1)
    revision = service.catalog.export_revision("acme", "pol", None, tensors, step=1)
    client = TestClient(create_app(service))
    sample_once(service, revision, tokens=4)
    sample_once(service, revision, tokens=3)
    sample_once(service, None, tokens=5)
    got = samples(client.get("/metrics").text)
    entry = worker.host_cache.get(revision.sha256)
    assert entry is not None
    sha = revision.sha256[:12]
    expected = {
        ("mint_slots", ()): 3.0,
        ("mint_slots_occupied", ()): 1.0,
        ("mint_slots_in_use", ()): 0.0,
        ("mint_host_cache_bytes", ()): float(entry.nbytes),
        ("mint_host_cache_entries", ()): 1.0,
        ("mint_cold_queue_depth", ()): 0.0,
        ("mint_batch_rows", ()): 0.0,
        ("mint_queued_samples", ()): 0.0,
        ("mint_cold_loads_total", ()): 1.0,
        ("mint_cold_load_seconds_count", ()): 1.0,
        ("mint_shared_load_hits_total", ()): 0.0,
        ("mint_tier_hits_total", (("tier", "catalog"),)): 1.0,
        ("mint_tier_hits_total", (("tier", "host_cache"),)): 0.0,
        ("mint_tier_hits_total", (("tier", "slot"),)): 1.0,
        ("mint_sampled_tokens_total", ()): 12.0,
        ("mint_revision_resident", (("revision", sha), ("tier", "slot"))): 1.0,
        ("mint_revision_resident", (("revision", sha), ("tier", "host_cache"))): 1.0,
        ("mint_revisions_unlisted", (("tier", "host_cache"),)): 0.0,
    }
    assert {key: got[key] for key in expected} == expected
    assert got[("mint_cold_load_seconds_bucket", (("le", "+Inf"),))] == 1.0
    assert got[("mint_sampled_tokens_per_second", ())] == pytest.approx(12 / 10)


def test_metrics_count_the_rows_of_a_sample_while_it_decodes(service: Service) -> None:
    client = TestClient(create_app(service))
    first_token, scraped = threading.Event(), threading.Event()

    def hold(sample: int, token: int, logprob: float) -> None:
        first_token.set()
        scraped.wait(timeout=30)  # the batch cannot step on while this row's token is held

    params = SamplingParams(max_tokens=6, temperature=0.0, stop_tokens=[])
    request = SampleRequest([1, 2, 3], params, num_samples=2)
    future = service.submit_sample("acme", TINY, None, request, lambda _: JsonResult({}), hold)
    assert first_token.wait(timeout=60)
    during = samples(client.get("/metrics").text)
    scraped.set()
    future.inner.result(timeout=60)
    after = samples(client.get("/metrics").text)
    assert during[("mint_batch_rows", ())] == 2.0
    assert after[("mint_batch_rows", ())] == 0.0 and after[("mint_queued_samples", ())] == 0.0


def test_each_service_has_its_own_registry(service: Service, tmp_path: Path) -> None:
    service.worker(TINY)
    first = create_app(service)
    other_home = tmp_path / "other"
    other_home.mkdir()
    other = Service(Settings(home=other_home, device="cpu", dtype="float32"))
    try:
        second = create_app(other)
        assert first.state.metrics_registry is not second.state.metrics_registry
        assert "mint_slots{" in TestClient(first).get("/metrics").text
        assert "mint_slots{" not in TestClient(second).get("/metrics").text
    finally:
        other.close()
