"""A base published to the hub cache loads by model id offline, like a downloaded one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from mint.models.hub_cache import hub_cache_dir, publish_to_hub_cache, repo_folder
from mint.models.provision import ensure_base, read_base_record

TINY = "mint-test/tiny-llama"


def test_published_tokenizer_loads_by_model_id_offline(bases_dir: Path, tmp_path: Path) -> None:
    folder = ensure_base("tiny-llama", bases_dir)
    fingerprint = read_base_record(folder)["fingerprint"]
    snapshot = publish_to_hub_cache(folder, TINY, fingerprint, cache_dir=tmp_path)

    repo = repo_folder(tmp_path, TINY)
    assert repo == tmp_path / "models--mint-test--tiny-llama"
    assert (repo / "refs" / "main").read_text() == fingerprint[:40]
    assert snapshot == repo / "snapshots" / fingerprint[:40]
    names = sorted(p.name for p in snapshot.iterdir())
    assert "tokenizer_config.json" in names and "config.json" in names
    assert not any(n.endswith(".safetensors") or n == "mint_base.json" for n in names)
    for link in snapshot.iterdir():  # the hub layout: relative links into blobs/<sha256>
        assert os.readlink(link).startswith(os.path.join("..", "..", "blobs"))
        assert link.read_bytes() == (folder / link.name).read_bytes()

    by_id = AutoTokenizer.from_pretrained(TINY, cache_dir=tmp_path, local_files_only=True)
    by_folder = AutoTokenizer.from_pretrained(folder)
    text = "What is 7 + 5?"
    assert by_id.encode(text) == by_folder.encode(text)
    config = AutoConfig.from_pretrained(TINY, cache_dir=tmp_path, local_files_only=True)
    assert config.num_hidden_layers == AutoConfig.from_pretrained(folder).num_hidden_layers


def test_publishing_again_changes_nothing(bases_dir: Path, tmp_path: Path) -> None:
    folder = ensure_base("tiny-llama", bases_dir)
    fingerprint = read_base_record(folder)["fingerprint"]
    first = publish_to_hub_cache(folder, TINY, fingerprint, cache_dir=tmp_path)
    blobs = sorted((repo_folder(tmp_path, TINY) / "blobs").iterdir())
    second = publish_to_hub_cache(folder, TINY, fingerprint, cache_dir=tmp_path)
    assert first == second
    assert sorted((repo_folder(tmp_path, TINY) / "blobs").iterdir()) == blobs
    leftovers = [p for p in (repo_folder(tmp_path, TINY) / "snapshots").iterdir() if p != first]
    assert leftovers == []


def test_cache_dir_follows_the_hub_environment_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"
