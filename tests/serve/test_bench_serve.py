"""`mint bench serve --quick` runs every part on the tiny base and writes consistent JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mint.bench import serve as bench


def test_quick_bench_writes_every_figure(
    bases_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "serve.json"
    assert bench.main(["--quick", "--bases-dir", str(bases_dir), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert sorted(report) == ["base", "batching", "copies", "device", "peft", "targets",
                              "threads", "tiers", "zipf"]  # fmt: skip
    sizes = bench.QUICK
    assert report["batching"]["requests"] == sizes.concurrent
    # PEFT, switching adapters per group, decodes the same greedy tokens as mint's batch.
    assert (
        report["peft"]["greedy_outputs_equal_to_mint"] == f"{sizes.concurrent}/{sizes.concurrent}"
    )
    assert sorted(report["tiers"]) == ["catalog_median_s", "host_cache_median_s", "slot_median_s"]
    zipf = report["zipf"]
    assert (zipf["adapters"], zipf["requests"]) == (sizes.zipf_adapters, sizes.zipf_requests)
    assert sum(zipf["hit_rate"].values()) == pytest.approx(1.0)
    assert zipf["p50_s"] <= zipf["p99_s"]
    burst = zipf["burst"]
    assert burst["cold_loads"] == 2 * sizes.burst * sizes.burst_rounds
    for phase in ("alone", "loading", "joining"):
        assert burst[f"warm_tokens_{phase}"] > 0
        assert 0 < burst[f"warm_token_s_{phase}_p50"] <= burst[f"warm_token_s_{phase}_p99"]
    assert report["copies"]["adapter_tensors"] == 28
    # Every target is judged from the figure it names, with its bound.
    targets = report["targets"]
    assert sorted(targets) == [
        "(a) distinct_throughput_over_one",
        "(b) mint_distinct_speedup",
        "(d) catalog_to_host_over_raw_read",
        "(d) host_to_slot_over_plain_copy",
        "(e) warm_token_p99_rise_loading",
    ]
    ratio = report["batching"]["distinct_throughput_over_one"]
    verdict = "met" if ratio >= 0.85 else "NOT met"
    assert targets["(a) distinct_throughput_over_one"] == f"{ratio:.3g} (target >= 0.85): {verdict}"
    assert "wrote" in capsys.readouterr().out
