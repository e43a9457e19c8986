"""CLI output prints policy ids verbatim (rich would turn ":train:" into an emoji)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from mint.catalog.store import Catalog
from mint.cli import app
from mint.models.lora import LoraSignature


def test_policy_list_prints_ids_verbatim(tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}", tmp_path / "blobs")
    catalog.ensure_tenant("default")
    catalog.record_base("mint-test/tiny-llama", "f" * 64)
    catalog.create_policy(
        "default", "sess-abc:train:0", "mint-test/tiny-llama", "f" * 64, LoraSignature(2, 4)
    )
    result = CliRunner().invoke(app, ["policy", "list"], env={"MINT_HOME": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert "sess-abc:train:0" in result.output


def test_bench_command_dispatches_to_the_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "catalog-bench.json"
    result = CliRunner().invoke(
        app,
        ["bench", "catalog", "--revisions", "200", "--backends", "sqlite", "--out", str(out)],
        env={"MINT_HOME": str(tmp_path)},
    )
    assert result.exit_code == 0, result.output
    assert out.exists()
    refused = CliRunner().invoke(app, ["bench", "nonsense"])
    assert refused.exit_code != 0 and "unknown benchmark" in refused.output
