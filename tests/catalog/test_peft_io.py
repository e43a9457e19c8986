"""The PEFT layout contract: exact keys, exact config bytes, determinism, and PEFT agreement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tests.catalog.conftest import BASE_ID, SIGNATURE, make_tensors

from mint.catalog import Catalog, read_peft_tensors, write_peft_folder
from mint.catalog.peft_io import RevisionManifest, folder_digest
from mint.errors import InvalidAdapter
from mint.models.base import ResidentBase
from mint.models.lora import BoundAdapter, LoraSignature, bound, init_adapter

EXPECTED_CONFIG = """{
  "base_model_name_or_path": "mint-test/tiny-llama",
  "bias": "none",
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "lora_alpha": 4.0,
  "lora_dropout": 0.0,
  "modules_to_save": null,
  "peft_type": "LORA",
  "r": 2,
  "target_modules": [
    "q_proj",
    "v_proj"
  ],
  "task_type": "CAUSAL_LM",
  "use_dora": false,
  "use_rslora": false
}
"""


def write(folder: Path, tensors: dict, signature: LoraSignature = SIGNATURE) -> Path:
    folder.mkdir()
    write_peft_folder(folder, tensors, signature, BASE_ID)
    return folder


def test_layout_keys_metadata_and_config_bytes(tmp_path: Path) -> None:
    folder = write(tmp_path / "a", make_tensors(0))
    assert (folder / "adapter_config.json").read_text() == EXPECTED_CONFIG
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert sorted(handle.keys()) == [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
        ]
        v_b = handle.get_tensor("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")
    assert v_b.dtype == torch.float32 and tuple(v_b.shape) == (4, 2)


def test_same_tensors_give_identical_bytes(tmp_path: Path) -> None:
    tensors = make_tensors(1)
    # A non-contiguous, float64 copy of the same values must encode the same way.
    strided = {
        path: (a.double().t().contiguous().t(), b.double()) for path, (a, b) in tensors.items()
    }
    first, second = write(tmp_path / "a", tensors), write(tmp_path / "b", strided)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert folder_digest(first) == folder_digest(second)
    other = write(tmp_path / "c", make_tensors(2))
    assert folder_digest(other)[0] != folder_digest(first)[0]


def test_read_back_is_exact(tmp_path: Path) -> None:
    tensors = make_tensors(3)
    back, config = read_peft_tensors(write(tmp_path / "a", tensors))
    assert sorted(back) == sorted(tensors)
    for path, (a, b) in tensors.items():
        assert torch.equal(back[path][0], a) and torch.equal(back[path][1], b)
    assert config["r"] == 2 and config["target_modules"] == ["q_proj", "v_proj"]


def test_bad_folders_list_every_problem(tmp_path: Path) -> None:
    tensors = make_tensors(4)
    folder = write(tmp_path / "a", tensors)
    flat = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(3, 8),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2),
        "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": torch.zeros(2, 8),
        "model.embed_tokens.weight": torch.zeros(2, 2),
    }
    from safetensors.torch import save_file

    save_file(flat, str(folder / "adapter_model.safetensors"))
    with pytest.raises(InvalidAdapter) as caught:
        read_peft_tensors(folder)
    assert caught.value.problems == [
        "key 'model.embed_tokens.weight' is not a PEFT LoRA key "
        "(base_model.model.<module>.lora_A.weight)",
        "module 'model.layers.0.self_attn.q_proj' has A (3, 8) and B (8, 2); "
        "config r=2 needs A [2, in] and B [out, 2]",
        "module 'model.layers.0.self_attn.v_proj' has lora_A but not both A and B",
    ]
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(InvalidAdapter, match="adapter_model.safetensors in .* is unreadable"):
        read_peft_tensors(folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(InvalidAdapter) as caught:
        read_peft_tensors(folder)
    assert caught.value.problems == [f"adapter_config.json is missing in {folder}"]


def test_tensors_that_miss_the_signature_are_refused(tmp_path: Path) -> None:
    tensors = make_tensors(5)
    tensors["model.layers.0.mlp.up_proj"] = (torch.zeros(2, 8), torch.zeros(16, 2))
    tensors["model.layers.0.self_attn.q_proj"] = (torch.zeros(4, 8), torch.zeros(8, 4))
    (tmp_path / "a").mkdir()
    with pytest.raises(InvalidAdapter) as caught:
        write_peft_folder(tmp_path / "a", tensors, SIGNATURE, BASE_ID)
    assert caught.value.problems == [
        "module 'model.layers.0.mlp.up_proj' is not a target (targets: ['q_proj', 'v_proj'])",
        "module 'model.layers.0.self_attn.q_proj' has A (4, 8) and B (8, 4); "
        "rank 2 needs A [2, in] and B [out, 2]",
    ]
    assert list((tmp_path / "a").iterdir()) == []


def test_manifest_keeps_unknown_fields() -> None:
    body = {
        "base_id": BASE_ID,
        "base_fingerprint": "f" * 64,
        "policy_id": "pol",
        "number": 3,
        "parent_number": 2,
        "step": 7,
        "created_at": "2026-01-02T03:04:05.000006+00:00",
        "sha256": "0" * 64,
        "size_bytes": 10,
        "layout": "peft",
        "evaluation": {"score": 0.5},
    }
    data = (json.dumps(body, sort_keys=True, indent=2) + "\n").encode()
    manifest = RevisionManifest.from_bytes(data)
    assert manifest.number == 3 and manifest.extra == {"evaluation": {"score": 0.5}}
    assert manifest.created_at.microsecond == 6
    assert manifest.to_bytes() == data


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token under `logits` ([1, T, V]) for `ids` ([1, T])."""
    logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    return logprobs.gather(-1, ids[0, 1:, None])[:, 0]


def test_peft_loads_an_export_and_agrees_with_mint(
    tiny_base: ResidentBase, catalog: Catalog
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    signature = LoraSignature(rank=4, alpha=8.0)
    catalog.create_policy("acme", "peft", tiny_base.base_id, "ab" * 32, signature)
    tensors = init_adapter(tiny_base.layers, signature, 0, tiny_base.device, tiny_base.dtype)
    generator = torch.Generator().manual_seed(0)
    for _, b in tensors.values():
        b.copy_(0.1 * torch.randn(b.shape, generator=generator))
    revision = catalog.export_revision("acme", "peft", None, tensors, step=1)
    folder = Path(revision.blob_path)

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]], device=tiny_base.device)
    with torch.no_grad():
        plain = token_logprobs(tiny_base.model(ids).logits, ids)
        with bound(tiny_base.binding, [BoundAdapter(tensors, signature.scale)]):
            ours = token_logprobs(tiny_base.model(ids).logits, ids)
        fresh = AutoModelForCausalLM.from_pretrained(tiny_base.folder, dtype=tiny_base.dtype)
        peft_model = PeftModel.from_pretrained(fresh.to(tiny_base.device), str(folder)).eval()
        theirs = token_logprobs(peft_model(input_ids=ids).logits, ids)
    assert (ours - plain).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)

    back = catalog.read_revision_tensors(revision)
    again = catalog.export_revision("acme", "peft", None, back, step=2)
    assert again.sha256 == revision.sha256 and again.blob_path == revision.blob_path
    assert folder_digest(folder) == (revision.sha256, revision.size_bytes)
