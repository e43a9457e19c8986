"""`mint bench catalog` end to end at a small size, on both backends."""

from __future__ import annotations

import json
from pathlib import Path

from tests.catalog.conftest import postgres_server_url

from mint.bench.catalog import main


def test_bench_catalog_runs_at_500_revisions(tmp_path: Path, postgres_url: str) -> None:
    out = tmp_path / "catalog.json"
    argv = ["--revisions", "500", "--per-policy", "200", "--samples", "100",
            "--postgres-url", postgres_server_url(), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    body = json.loads(out.read_text())
    assert (body["bench"], body["revisions"], sorted(body["backends"])) == (
        "catalog", 500, ["postgres", "sqlite"],
    )  # fmt: skip
    for figures in body["backends"].values():
        assert (figures["revisions"], figures["policies"]) == (500, 3)
        assert figures["registration_per_s"] > 0 and figures["database_bytes"] > 0
        for kind in ("resolve", "list_page", "timer_floor"):
            assert 0 < figures[kind]["p50_ms"] <= figures[kind]["p99_ms"] <= figures[kind]["max_ms"]
