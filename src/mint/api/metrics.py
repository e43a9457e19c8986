"""Prometheus metrics of the engines at `/metrics`, read from their state at scrape time.

Each Service gets its own registry (never the process-global one), so two services in one
process (as in tests) never mix their numbers. Gauges come from the tiers themselves (slot
table, host cache, cold-load queue), counters from each engine's `ServeStats`.

Revision residency is labelled by the first 12 hex digits of the revision's sha256, never by
policy or tenant names, so `/metrics` (served without an API key, as scrapers expect) shows
no tenant's names. Label cardinality is bounded: every slot (at most `num_slots` series per
base) and at most `MAX_HOST_CACHE_LABELS` host-cache entries, the most recently used first;
`mint_revisions_unlisted` counts the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from mint.control.service import Service
from mint.control.worker import BaseWorker
from mint.serve.stats import COLD_LOAD_BUCKETS

log = logging.getLogger(__name__)

MAX_HOST_CACHE_LABELS = 64
SHA_LABEL = 12


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


class EngineCollector(Collector):
    """Collects every loaded base's engine metrics from a Service."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        for base_id, worker in sorted(self.service.workers().items()):
            self._tiers(families, base_id, worker)
            self._counters(families, base_id, worker)
        yield from families.values()

    def _families(self) -> dict[str, Any]:
        base, tier = ["base"], ["base", "tier"]
        return {
            "slots": _gauge("mint_slots", "Slots in the slot bank.", base),
            "occupied": _gauge("mint_slots_occupied", "Slots holding a revision.", base),
            "in_use": _gauge("mint_slots_in_use", "Slots referenced by sample jobs.", base),
            "host_bytes": _gauge("mint_host_cache_bytes", "Bytes in the host cache.", base),
            "host_budget": _gauge(
                "mint_host_cache_budget_bytes", "Byte budget of the host cache.", base
            ),
            "host_entries": _gauge("mint_host_cache_entries", "Revisions host-cached.", base),
            "queue": _gauge("mint_cold_queue_depth", "Revisions loading or waiting to load.", base),
            "rows": _gauge("mint_batch_rows", "Sample rows decoding in the running batch.", base),
            "waiting": _gauge(
                "mint_queued_samples", "Sample requests waiting to join the batch.", base
            ),
            "tps": _gauge(
                "mint_sampled_tokens_per_second", "Tokens sampled per second (last 10 s).", base
            ),
            "resident": _gauge(
                "mint_revision_resident",
                "1 for each revision (sha256 prefix) held in a tier.",
                ["base", "tier", "revision"],
            ),
            "unlisted": _gauge(
                "mint_revisions_unlisted", "Revisions in a tier left out of the labels.", tier
            ),
            "loads": CounterMetricFamily("mint_cold_loads", "Cold loads finished.", labels=base),
            "latency": HistogramMetricFamily(
                "mint_cold_load_seconds", "Cold load time, request to slot.", labels=base
            ),
            "shared": CounterMetricFamily(
                "mint_shared_load_hits", "Requests that joined a load in flight.", labels=base
            ),
            "hits": CounterMetricFamily(
                "mint_tier_hits", "Where requests found their revision.", labels=tier
            ),
            "refusals": CounterMetricFamily(
                "mint_refusals", "Requests refused, by reason.", labels=["base", "reason"]
            ),
            "tokens": CounterMetricFamily("mint_sampled_tokens", "Tokens sampled.", labels=base),
        }

    def _tiers(self, f: dict[str, Any], base_id: str, worker: BaseWorker) -> None:
        table = worker.bank.snapshot()
        held = worker.bank.residents()
        f["slots"].add_metric([base_id], len(table))
        f["occupied"].add_metric([base_id], len(held))
        f["in_use"].add_metric([base_id], sum(1 for entry in table if entry and entry[2] > 0))
        f["host_bytes"].add_metric([base_id], worker.host_cache.nbytes)
        f["host_budget"].add_metric([base_id], worker.host_cache.budget_bytes)
        cached = worker.host_cache.table()
        f["host_entries"].add_metric([base_id], len(cached))
        f["queue"].add_metric([base_id], worker.loader.queue_depth)
        f["rows"].add_metric([base_id], worker.running_rows())
        f["waiting"].add_metric([base_id], worker.queued_samples())
        f["tps"].add_metric([base_id], worker.stats.tokens_per_second())
        for sha in held:
            f["resident"].add_metric([base_id, "slot", sha[:SHA_LABEL]], 1)
        recent = list(reversed(cached))[:MAX_HOST_CACHE_LABELS]
        for sha, _ in recent:
            f["resident"].add_metric([base_id, "host_cache", sha[:SHA_LABEL]], 1)
        f["unlisted"].add_metric([base_id, "host_cache"], len(cached) - len(recent))

    def _counters(self, f: dict[str, Any], base_id: str, worker: BaseWorker) -> None:
        stats = worker.stats.snapshot()
        f["loads"].add_metric([base_id], stats["cold_loads"])
        counts: list[int] = stats["cold_load_buckets"]  # type: ignore[assignment]
        bounds = [str(bound) for bound in COLD_LOAD_BUCKETS] + ["+Inf"]
        running, buckets = 0, []
        for bound, count in zip(bounds, counts, strict=True):
            running += count
            buckets.append((bound, running))
        f["latency"].add_metric([base_id], buckets, stats["cold_load_seconds_sum"])
        f["shared"].add_metric([base_id], stats["shared_load_hits"])
        hits: dict[str, int] = stats["tier_hits"]  # type: ignore[assignment]
        for tier in ("slot", "host_cache", "catalog"):
            f["hits"].add_metric([base_id, tier], hits.get(tier, 0))
        refusals: dict[str, int] = stats["refusals"]  # type: ignore[assignment]
        for reason, count in sorted(refusals.items()):
            f["refusals"].add_metric([base_id, reason], count)
        f["tokens"].add_metric([base_id], stats["sampled_tokens"])


def metrics_registry(service: Service) -> CollectorRegistry:
    """A fresh registry holding `service`'s engine collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(service))
    return registry


def add_metrics_route(app: FastAPI, service: Service) -> None:
    registry = metrics_registry(service)
    app.state.metrics_registry = registry

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
