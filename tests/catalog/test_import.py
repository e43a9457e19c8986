"""Importing outside PEFT folders: round trips, kept unknown fields, and every refusal."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import update
from tests.catalog.conftest import make_tensors

from mint.catalog import Catalog
from mint.catalog.peft_io import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, write_peft_folder
from mint.catalog.schema import PolicyRow
from mint.errors import InvalidAdapter
from mint.models.base import ResidentBase
from mint.models.lora import AdapterTensors, LoraSignature

SIGNATURE = LoraSignature(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"))
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def base_catalog(catalog: Catalog, tiny_base: ResidentBase) -> Catalog:
    catalog.record_base(tiny_base.base_id, tiny_base.fingerprint)
    for policy in ("imp", "other"):
        catalog.create_policy("acme", policy, tiny_base.base_id, tiny_base.fingerprint, SIGNATURE)
    return catalog


def tiny_tensors(base: ResidentBase, seed: int) -> AdapterTensors:
    generator = torch.Generator().manual_seed(seed)
    return {
        path: (torch.randn(a, generator=generator), torch.randn(b, generator=generator))
        for path, (a, b) in sorted(base.shapes(SIGNATURE).items())
    }


def peft_folder(tmp_path: Path, base: ResidentBase, name: str = "outside") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    write_peft_folder(folder, tiny_tensors(base, 7), SIGNATURE, base.base_id)
    return folder


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def edit_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    flat = load_file(str(folder / WEIGHTS_FILE))
    change(flat)
    save_file(flat, str(folder / WEIGHTS_FILE))


def adapter_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (WEIGHTS_FILE, CONFIG_FILE)}


def test_export_import_export_gives_identical_files(
    base_catalog: Catalog, tiny_base: ResidentBase, tmp_path: Path
) -> None:
    first = base_catalog.export_revision("acme", "imp", None, tiny_tensors(tiny_base, 1), 5)
    base_catalog.export_folder("acme", "imp", None, tmp_path / "one")
    imported = base_catalog.import_revision("acme", "other", tmp_path / "one", tiny_base, step=5)
    base_catalog.export_folder("acme", "other", "1", tmp_path / "two")
    assert adapter_files(tmp_path / "one") == adapter_files(tmp_path / "two")
    assert (imported.sha256, imported.size_bytes) == (first.sha256, first.size_bytes)
    manifest = json.loads((tmp_path / "two" / MANIFEST_FILE).read_text())
    assert (manifest["policy_id"], manifest["number"], manifest["step"]) == ("other", 1, 5)
    assert manifest["base_fingerprint"] == tiny_base.fingerprint
    assert base_catalog.read_revision_tensors(imported).keys() == first_keys(tiny_base)


def first_keys(base: ResidentBase) -> set[str]:
    return set(base.shapes(SIGNATURE))


def test_unknown_config_and_manifest_fields_survive(
    base_catalog: Catalog, tiny_base: ResidentBase, tmp_path: Path
) -> None:
    folder = peft_folder(tmp_path, tiny_base)
    edit_config(folder, peft_version="0.99.0", future_knob={"level": 3}, rank_pattern={})
    base_catalog.export_revision("acme", "imp", None, tiny_tensors(tiny_base, 7), 0)
    base_catalog.export_folder("acme", "imp", None, tmp_path / "ours")
    manifest = json.loads((tmp_path / "ours" / MANIFEST_FILE).read_text())
    manifest["written_by"] = {"mint": "9.0", "shards": [1, 2]}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    record = base_catalog.import_revision("acme", "other", folder, tiny_base, name="ext")
    assert record.manifest_extra == {"written_by": {"mint": "9.0", "shards": [1, 2]}}
    base_catalog.export_folder("acme", "other", "ext", tmp_path / "back")
    config = json.loads((tmp_path / "back" / CONFIG_FILE).read_text())
    assert (config["peft_version"], config["future_knob"]) == ("0.99.0", {"level": 3})
    assert config["rank_pattern"] == {} and config["r"] == 2
    back = json.loads((tmp_path / "back" / MANIFEST_FILE).read_text())
    assert back["written_by"] == {"mint": "9.0", "shards": [1, 2]}
    assert back["policy_id"] == "other"
    # A second import of that export keeps them again, and the bytes are the same blob.
    again = base_catalog.import_revision("acme", "imp", tmp_path / "back", tiny_base)
    assert again.manifest_extra == record.manifest_extra and again.sha256 == record.sha256


def test_user_metadata_from_a_newer_writer_round_trips(catalog: Catalog) -> None:
    newer = {"team": "rl", "lineage": {"source": "hub", "tags": ["a", "b"]}, "n": 3}
    with catalog.engine.begin() as connection:
        connection.execute(update(PolicyRow).values(user_metadata=newer))
    catalog.touch_policy("acme", "pol")  # rewrites the row
    catalog.export_revision("acme", "pol", "r", make_tensors(0), 1, user_metadata={"k": "v"})
    assert catalog.get_policy("acme", "pol").user_metadata == newer
    catalog.set_checkpoint_ttl("acme", "pol", "sampler", "r", 60)
    [checkpoint], _ = catalog.list_checkpoints("acme", "pol")
    assert checkpoint.user_metadata == {"k": "v"}


def rename_keys(flat: dict[str, torch.Tensor], old: str, new: str) -> None:
    for key in [key for key in flat if old in key]:
        flat[key.replace(old, new)] = flat.pop(key)


def bigger_q(flat: dict[str, torch.Tensor]) -> None:
    flat[f"{Q0}.lora_A.weight"] = torch.zeros(2, 32)


def embedding(flat: dict[str, torch.Tensor]) -> None:
    flat["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(2, 100)
    flat["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.zeros(64, 2)


def full_head(flat: dict[str, torch.Tensor]) -> None:
    flat["base_model.model.lm_head.weight"] = torch.zeros(300, 64)


def foreign_module(flat: dict[str, torch.Tensor]) -> None:
    rename_keys(flat, "layers.1.self_attn.v_proj", "layers.9.self_attn.v_proj")


def named_keys(flat: dict[str, torch.Tensor]) -> None:
    rename_keys(flat, "layers.0.self_attn.q_proj.lora_A.weight",
                "layers.0.self_attn.q_proj.lora_A.default.weight")  # fmt: skip


def manifest(folder: Path, **fields: object) -> None:
    body = {"base_id": "mint-test/tiny-llama", "base_fingerprint": "00" * 32, "policy_id": "x",
            "number": 1, "parent_number": None, "step": 0, "sha256": "0" * 64,
            "size_bytes": 1, "created_at": "2026-01-01T00:00:00+00:00"}  # fmt: skip
    body.update(fields)
    (folder / MANIFEST_FILE).write_text(json.dumps(body))


V1 = "model.layers.1.self_attn.v_proj"
CASES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "unknown module": (
        lambda f: edit_weights(f, foreign_module),
        [
            "key 'base_model.model.model.layers.9.self_attn.v_proj.lora_A.weight' names module "
            "'model.layers.9.self_attn.v_proj', which base mint-test/tiny-llama does not have "
            "(or mint cannot adapt); the adapter is for another base",
            "key 'base_model.model.model.layers.9.self_attn.v_proj.lora_B.weight' names module "
            "'model.layers.9.self_attn.v_proj', which base mint-test/tiny-llama does not have "
            "(or mint cannot adapt); the adapter is for another base",
        ],
    ),
    "targets disagree": (
        lambda f: edit_config(f, target_modules=["q_proj", "k_proj", "v_proj"]),
        [
            "adapter_config target_modules ['k_proj', 'q_proj', 'v_proj'] disagree with the "
            "tensors, which adapt ['q_proj', 'v_proj']; fix target_modules or the weights"
        ],
    ),
    "shape": (
        lambda f: edit_weights(f, bigger_q),
        [
            "module 'model.layers.0.self_attn.q_proj' has A (2, 32) and B (64, 2); base "
            "mint-test/tiny-llama at rank 2 needs A (2, 64) and B (64, 2)"
        ],
    ),
    "base fingerprint": (
        lambda f: manifest(f),
        [
            "mint_revision.json names base fingerprint 000000000000... but base "
            "mint-test/tiny-llama here has {fp}...; the adapter was trained on other "
            "weights, so retrain it on this base"
        ],
    ),
    "base id": (
        lambda f: None,  # the test writes this manifest: it needs the base's fingerprint
        [
            "mint_revision.json names base 'org/other' but the policy's base is "
            "'mint-test/tiny-llama'; import it into a policy on org/other"
        ],
    ),
    "modules_to_save": (
        lambda f: edit_config(f, modules_to_save=["lm_head"]),
        [
            "modules_to_save ['lm_head'] stores full weights; mint serves LoRA-only adapters, "
            "so retrain without modules_to_save"
        ],
    ),
    "embedding rows": (
        lambda f: edit_weights(f, embedding),
        [
            "key 'base_model.model.model.embed_tokens.lora_embedding_A' covers 100 vocabulary "
            "rows but base mint-test/tiny-llama has 259; the adapter was trained on another "
            "tokenizer",
            "key 'base_model.model.model.embed_tokens.lora_embedding_A' adapts an embedding; "
            "mint adapts linear layers only",
            "key 'base_model.model.model.embed_tokens.lora_embedding_B' adapts an embedding; "
            "mint adapts linear layers only",
        ],
    ),
    "full head rows": (
        lambda f: edit_weights(f, full_head),
        [
            "key 'base_model.model.lm_head.weight' is a full weight of module 'lm_head' "
            "(modules_to_save); mint serves LoRA-only adapters, so retrain without "
            "modules_to_save",
            "key 'base_model.model.lm_head.weight' has 300 vocabulary rows but base "
            "mint-test/tiny-llama has 259; the adapter was trained on another tokenizer",
        ],
    ),
    "adapter name in keys": (
        lambda f: edit_weights(f, named_keys),
        [
            f"key '{Q0}.lora_A.default.weight' carries adapter name 'default'; PEFT saves "
            "keys without it (...lora_A.weight), so re-save with save_pretrained"
        ],
    ),
    "rslora": (
        lambda f: edit_config(f, use_rslora=True),
        ["use_rslora is True; rsLoRA scales by alpha/sqrt(r); retrain with alpha/r"],
    ),
    "non-finite values": (
        lambda f: edit_weights(f, poison),
        [
            "tensors model.layers.0.self_attn.q_proj A, model.layers.1.self_attn.v_proj B "
            "hold NaN or infinite values; the adapter is damaged (or its training diverged), "
            "so export it again from a finite training state"
        ],
    ),
    "base named in the config": (
        lambda f: edit_config(f, base_model_name_or_path="org/other-base"),
        [
            "base_model_name_or_path 'org/other-base' is not the policy's base "
            "mint-test/tiny-llama; import the adapter into a policy on the base it was "
            "trained on (or, if it was trained on mint-test/tiny-llama, set "
            "base_model_name_or_path to 'mint-test/tiny-llama')"
        ],
    ),
}


def poison(flat: dict[str, torch.Tensor]) -> None:
    flat[f"{Q0}.lora_A.weight"][0, 3] = float("nan")
    flat[f"base_model.model.{V1}.lora_B.weight"][1, 0] = float("inf")


def test_a_local_base_folder_of_the_same_name_is_the_base(
    base_catalog: Catalog, tiny_base: ResidentBase, tmp_path: Path
) -> None:
    folder = peft_folder(tmp_path, tiny_base)
    edit_config(folder, base_model_name_or_path="/models/Tiny-Llama/")
    record = base_catalog.import_revision("acme", "imp", folder, tiny_base)
    assert record.number == 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_problem_is_reported(
    base_catalog: Catalog, tiny_base: ResidentBase, tmp_path: Path, case: str
) -> None:
    folder = peft_folder(tmp_path, tiny_base)
    spoil, expected = CASES[case]
    if case == "base id":
        manifest(folder, base_id="org/other", base_fingerprint=tiny_base.fingerprint)
    else:
        spoil(folder)
    with pytest.raises(InvalidAdapter) as caught:
        base_catalog.import_revision("acme", "imp", folder, tiny_base)
    fp = tiny_base.fingerprint[:12]
    assert caught.value.problems == [line.replace("{fp}", fp) for line in expected]
    assert base_catalog.list_revisions("acme", "imp") == ([], 0)
    assert list((base_catalog.blobs.root / "tmp").iterdir()) == []


def test_rank_above_the_limit(
    base_catalog: Catalog, tiny_base: ResidentBase, tmp_path: Path
) -> None:
    folder = peft_folder(tmp_path, tiny_base)
    with pytest.raises(InvalidAdapter) as caught:
        base_catalog.import_revision("acme", "imp", folder, tiny_base, max_rank=1)
    assert caught.value.problems == ["rank r=2 is above the limit 1; use a rank <= 1"]


def test_several_problems_are_listed_together(
    base_catalog: Catalog, tiny_base: ResidentBase, tmp_path: Path
) -> None:
    folder = peft_folder(tmp_path, tiny_base)
    edit_config(folder, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    edit_weights(folder, bigger_q)
    manifest(folder)
    with pytest.raises(InvalidAdapter) as caught:
        base_catalog.import_revision("acme", "imp", folder, tiny_base)
    problems = caught.value.problems
    assert [line.split(";")[0] for line in problems] == [
        "rank r=4 differs from policy 'imp''s rank 2",
        "lora_alpha 8 differs from policy 'imp''s alpha 4",
        "use_dora is True",
        "module 'model.layers.0.self_attn.q_proj' has A (2, 32) and B (64, 2)",
        "module 'model.layers.0.self_attn.v_proj' has A (2, 64) and B (32, 2)",
        "module 'model.layers.1.self_attn.q_proj' has A (2, 64) and B (64, 2)",
        "module 'model.layers.1.self_attn.v_proj' has A (2, 64) and B (32, 2)",
        "adapter_config target_modules ['q_proj'] disagree with the tensors, which adapt "
        "['q_proj', 'v_proj']",
        "mint_revision.json names base fingerprint 000000000000... but base "
        "mint-test/tiny-llama here has " + tiny_base.fingerprint[:12] + "...",
    ]
    assert str(caught.value).startswith("adapter folder ")
    assert "rejected (9 problem(s))" in str(caught.value)


def test_the_base_must_be_the_policys(
    catalog: Catalog, tiny_base: ResidentBase, tmp_path: Path
) -> None:
    folder = peft_folder(tmp_path, tiny_base)
    with pytest.raises(InvalidAdapter) as caught:
        catalog.import_revision("acme", "pol", folder, tiny_base)
    assert caught.value.problems[0] == (
        f"the base given is mint-test/tiny-llama ({tiny_base.fingerprint[:12]}) but policy "
        "'pol' is on mint-test/tiny-llama (abababababab); pass the policy's own resident base"
    )
