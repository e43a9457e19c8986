"""`mint bench trainer --quick` on the tiny base: it runs and writes every figure as a number."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mint.bench import trainer as bench
from mint.models.base import ResidentBase

pytestmark = pytest.mark.usefixtures("one_thread")

FIGURES = {
    "step_s",
    "tokens_per_s",
    "swap_out_in_s",
    "swap_fraction_of_step",
    "state_bytes",
}


def test_quick_bench_writes_every_figure(
    tiny_base: ResidentBase, bases_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "trainer.json"
    argv = ["--quick", "--bases-dir", str(bases_dir), "--ranks", "2,4", "--threads", "1"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["base"] == "mint-test/tiny-llama"
    assert sorted(figures["ranks"]) == ["2", "4"]
    for row in figures["ranks"].values():
        assert set(row) == FIGURES
        assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in row.values())
    # Rank 4 holds twice rank 2's weights and moments.
    assert figures["ranks"]["4"]["state_bytes"] == 2 * figures["ranks"]["2"]["state_bytes"]
    rotation = figures["rotation"]["policies"]
    assert sorted(rotation, key=int) == ["1", "10", "100"]
    one_state = figures["ranks"]["2"]["state_bytes"]
    assert (rotation["1"]["device_bytes"], rotation["1"]["host_bytes"]) == (one_state, 0.0)
    assert rotation["10"]["device_bytes"] == 4 * one_state
    assert rotation["100"]["host_bytes"] == 96 * one_state
    assert all(row["rss_bytes"] > 0 for row in rotation.values())
    multi = figures["multi_lora"]
    assert multi["policies"] == 4.0
    assert sorted(multi["sizes"]) == ["1x16", "1x4"]
    assert multi["sizes"]["1x16"]["tokens"] == 64.0
    for row in multi["sizes"].values():
        for key in ("sequential_s", "shared_s", "sequential_tokens_per_s", "shared_tokens_per_s"):
            assert isinstance(row[key], float) and row[key] > 0
        assert row["speedup"] == pytest.approx(row["sequential_s"] / row["shared_s"])
