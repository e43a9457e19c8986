"""CLI output prints policy ids verbatim (rich would turn ":train:" into an emoji)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mint.catalog.store import Catalog
from mint.cli import app, main
from mint.errors import UnknownBase
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


def test_models_pull_provisions_and_prints_the_fingerprint(tmp_path: Path) -> None:
    from mint.models.provision import fingerprint_folder

    env = {"MINT_HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": None}
    pulled = CliRunner().invoke(app, ["models", "pull", "tiny-llama"], env=env)
    assert pulled.exit_code == 0, pulled.output
    folder = tmp_path / "bases" / "tiny-llama"
    assert f"fingerprint {fingerprint_folder(folder)}" in pulled.output
    # The tokenizer went to the hub cache named by HF_HOME, not the user's own cache.
    refs_main = tmp_path / "hf" / "hub" / "models--mint-test--tiny-llama" / "refs" / "main"
    assert refs_main.read_text() == fingerprint_folder(folder)[:40]
    listed = CliRunner().invoke(app, ["models", "list"], env=env)
    assert "mint-test/tiny-llama" in listed.output
    unknown = CliRunner().invoke(app, ["models", "pull", "acme/nothing"], env=env)
    assert isinstance(unknown.exception, UnknownBase)
    assert "unknown base 'acme/nothing'" in str(unknown.exception)


def test_entry_point_turns_mint_errors_into_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MINT_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["mint", "models", "pull", "acme/nothing"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    assert "unknown base 'acme/nothing'" in capsys.readouterr().out
