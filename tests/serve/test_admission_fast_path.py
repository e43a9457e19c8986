"""Admission's fast path: the xxh3_128 load check (with the sha256 fallback for revisions
that record none), the engine's cache of validated header layouts, and placement as one
copy when a host entry is laid out as its slot's stack."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
import xxhash
from alembic import command
from sqlalchemy import create_engine, inspect
from tests.serve.conftest import Revisions
from tests.serve.test_cold_loads import Job, alone

from mint.catalog.migrate import alembic_config, current_revision
from mint.catalog.peft_io import CONFIG_FILE, WEIGHTS_FILE
from mint.catalog.records import RevisionRecord
from mint.catalog.store import Catalog
from mint.control.worker import BaseWorker
from mint.errors import InvalidAdapter
from mint.models.base import ResidentBase
from mint.models.lora import ATTENTION_TARGETS, SlotStack
from mint.serve.config import EngineConfig
from mint.serve.loader import read_revision_files
from mint.serve.tiers import (
    HostEntry,
    LayoutCache,
    RevisionFiles,
    SlotBank,
    decode_revision,
    load_check,
)


def weights_file(revision: RevisionRecord) -> Path:
    return Path(revision.blob_path) / WEIGHTS_FILE


def damage(revision: RevisionRecord, how: str) -> None:
    """Flip one bit of the last tensor byte, or cut the last 20 bytes off, in place."""
    data = bytearray(weights_file(revision).read_bytes())
    if how == "flipped":
        data[-1] ^= 0x01
    else:
        del data[-20:]
    weights_file(revision).write_bytes(bytes(data))


def header_end(revision: RevisionRecord) -> int:
    return 8 + int.from_bytes(weights_file(revision).read_bytes()[:8], "little")


@pytest.mark.parametrize("how", ["flipped", "truncated"])
@pytest.mark.parametrize("recorded", ["xxh3_128", "sha256"])
def test_damaged_or_truncated_files_are_refused_with_either_check(
    revisions: Revisions, tiny_base: ResidentBase, how: str, recorded: str
) -> None:
    exported = revisions.export("pol-a", seed=1, rank=4)
    assert exported.xxh3_128 is not None and len(exported.xxh3_128) == 32
    # A revision exported before the load check was recorded has NULL there.
    revision = exported if recorded == "xxh3_128" else dataclasses.replace(exported, xxh3_128=None)
    assert load_check(revision) == recorded
    layouts = LayoutCache()
    decode_revision(tiny_base, revision, read_revision_files(revision), 8, layouts)
    assert len(layouts) == 1  # the header is known now: only its parse may be skipped
    damage(revision, how)
    files = read_revision_files(revision)
    assert files.check == recorded
    with pytest.raises(InvalidAdapter) as caught:
        decode_revision(tiny_base, revision, files, 8, layouts)
    digest = revision.xxh3_128 if recorded == "xxh3_128" else revision.sha256
    assert digest is not None
    problems = [
        f"the files do not match the revision's {recorded} {digest[:12]}...; the stored copy "
        "is damaged or truncated; re-export the revision"
    ]
    if how == "truncated":
        body = len(files.weights) + 20 - header_end(revision)
        problems.append(
            f"{WEIGHTS_FILE} is unreadable (the tensors cover {body} bytes but {body - 20} "
            "follow the header; the file is truncated or has trailing bytes); re-export the "
            "revision"
        )
    assert caught.value.problems == problems


def test_the_load_check_covers_weights_then_config_like_the_sha256(
    revisions: Revisions,
) -> None:
    revision = revisions.export("pol-a", seed=1, rank=4)
    folder = Path(revision.blob_path)
    weights, config = (folder / WEIGHTS_FILE).read_bytes(), (folder / CONFIG_FILE).read_bytes()
    assert revision.xxh3_128 == xxhash.xxh3_128(weights + config).hexdigest()
    assert revision.sha256 == hashlib.sha256(weights + config).hexdigest()
    # The resolve lookup (one statement) and the ORM path return the same record.
    assert revisions.catalog.resolve("acme", "pol-a") == revision
    assert revisions.catalog.get_revision("acme", "pol-a", 1) == revision
    copies = revisions.catalog.register_copies("acme", "pol-a", 1, [5])
    assert revisions.catalog.get_revision("acme", "pol-a", copies[0]).xxh3_128 == revision.xxh3_128


def test_files_checked_with_a_digest_the_revision_lacks_are_refused(
    revisions: Revisions, tiny_base: ResidentBase
) -> None:
    revision = dataclasses.replace(revisions.export("pol-a", seed=1, rank=4), xxh3_128=None)
    folder = Path(revision.blob_path)
    files = RevisionFiles.read(folder, "xxh3_128")
    with pytest.raises(InvalidAdapter) as caught:
        decode_revision(tiny_base, revision, files, 8)
    assert caught.value.problems == [
        "the files were checked with xxh3_128 but the revision records no xxh3_128 digest; "
        "check them with sha256"
    ]


# ---------------------------------------------------------------------- header layout cache


def edited(revision: RevisionRecord, old: bytes, new: bytes) -> tuple[RevisionRecord, bytes]:
    """The weights with one header byte changed, and a record whose sha256 matches them."""
    weights = bytearray(weights_file(revision).read_bytes())
    end = header_end(revision)
    at = bytes(weights[:end]).index(old)
    assert len(old) == len(new)
    weights[at : at + len(old)] = new
    config = (Path(revision.blob_path) / CONFIG_FILE).read_bytes()
    digest = hashlib.sha256(bytes(weights) + config).hexdigest()
    return dataclasses.replace(revision, sha256=digest, xxh3_128=None), bytes(weights)


def test_a_known_header_is_looked_up_and_any_other_header_is_validated_afresh(
    revisions: Revisions, tiny_base: ResidentBase
) -> None:
    first = revisions.export("pol-a", seed=1, rank=4)
    second = revisions.export("pol-a", seed=2, rank=4)  # same signature: the same header
    layouts = LayoutCache()
    one = decode_revision(tiny_base, first, read_revision_files(first), 8, layouts)
    two = decode_revision(tiny_base, second, read_revision_files(second), 8, layouts)
    assert len(layouts) == 1 and one.layout is two.layout
    assert not torch.equal(one.data, two.data)
    config = (Path(first.blob_path) / CONFIG_FILE).read_bytes()
    path = "model.layers.0.self_attn.q_proj"
    # One byte: a key that is no longer a PEFT key.
    renamed, weights = edited(first, f"{path}.lora_A".encode(), f"{path}.lora_C".encode())
    with pytest.raises(InvalidAdapter) as caught:
        decode_revision(tiny_base, renamed, RevisionFiles.of(weights, config), 8, layouts)
    assert caught.value.problems == [
        f"key 'base_model.model.{path}.lora_C.weight' is not a PEFT LoRA key "
        "(base_model.model.<module>.lora_A.weight)",
        f"module '{path}' has lora_B but not both A and B",
    ]
    # One byte: a dtype whose size no longer matches the byte span.
    retyped, weights = edited(first, b'"F32"', b'"F16"')
    with pytest.raises(InvalidAdapter) as caught:
        decode_revision(tiny_base, retyped, RevisionFiles.of(weights, config), 8, layouts)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"{WEIGHTS_FILE} is unreadable (tensor ")
    assert "of F16 needs" in caught.value.problems[0]
    assert len(layouts) == 1  # refused headers are never kept


def test_a_known_header_met_with_another_rank_or_targets_is_validated_afresh(
    revisions: Revisions, tiny_base: ResidentBase
) -> None:
    revision = revisions.export("pol-a", seed=1, rank=4)
    layouts = LayoutCache()
    decode_revision(tiny_base, revision, read_revision_files(revision), 8, layouts)
    files = read_revision_files(revision)
    path = "model.layers.0.mlp.down_proj"
    with pytest.raises(InvalidAdapter) as caught:
        decode_revision(tiny_base, dataclasses.replace(revision, rank=2), files, 8, layouts)
    assert f"module '{path}' has A (4, 128) and B (64, 4); config r=2 needs A [2, in] and B " \
        "[out, 2]" in caught.value.problems  # fmt: skip
    attention = dataclasses.replace(revision, target_modules=ATTENTION_TARGETS)
    with pytest.raises(InvalidAdapter) as caught:
        decode_revision(tiny_base, attention, files, 8, layouts)
    assert (
        f"module {path} is not among the revision's targets {sorted(ATTENTION_TARGETS)}"
        in caught.value.problems
    )
    assert len(layouts) == 1


# ---------------------------------------------------------------------- one-copy placement


def placed(bank: SlotBank, entry: HostEntry) -> SlotStack:
    index = bank.reserve(entry.sha256, entry.label)
    assert index is not None
    bank.fill(index, entry)
    bank.mark_ready(index, refs=0)
    placement = bank.adapter(index).placement
    assert placement is not None
    return placement.stack


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_one_copy_placement_equals_the_per_tensor_copies_bit_for_bit(
    revisions: Revisions,
    tiny_base: ResidentBase,
    tiny_base_f64: ResidentBase,
    monkeypatch: pytest.MonkeyPatch,
    precision: str,
) -> None:
    base = tiny_base_f64 if precision == "float64" else tiny_base
    full = revisions.export("pol-full", seed=1, rank=4)  # rank 4 sits in class 4
    smaller = revisions.export("pol-small", seed=2, rank=3, targets=ATTENTION_TARGETS)
    entry = decode_revision(base, full, read_revision_files(full), 8)
    other = decode_revision(base, smaller, read_revision_files(smaller), 8)
    bank = SlotBank(base, num_slots=2, max_rank=8)
    placed(bank, other)  # slot 0: another revision, placed per tensor
    reference = SlotStack(
        {path: (layer.in_features, layer.out_features) for path, layer in base.layers.items()},
        2,
        4,
        base.device,
        base.dtype,
    )
    reference.write(1, entry.rank, entry.layout.views(entry.data))
    assert entry.layout == reference.layout and not entry.data.is_pinned()
    copies: list[int] = []
    monkeypatch.setattr(SlotStack, "write", lambda *args: pytest.fail("copied per tensor"))
    write_flat = SlotStack.write_flat
    monkeypatch.setattr(
        SlotStack,
        "write_flat",
        lambda s, slot, data: copies.append(slot) or write_flat(s, slot, data),
    )
    stack = placed(bank, entry)
    assert copies == [1]
    assert stack.flat[1].view(torch.uint8).tolist() == reference.flat[1].view(torch.uint8).tolist()
    monkeypatch.undo()
    # Over a slot that held another revision, the one copy leaves nothing of it behind.
    bank.table[0] = None
    stack = placed(bank, entry)
    assert torch.equal(stack.flat[0].view(torch.uint8), reference.flat[1].view(torch.uint8))
    assert torch.equal(stack.flat[1].view(torch.uint8), reference.flat[1].view(torch.uint8))


def test_a_revision_laid_out_otherwise_is_placed_per_tensor(
    revisions: Revisions, tiny_base: ResidentBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    three = revisions.export("pol-3", seed=1, rank=3)  # class 4: its rows differ
    entry = decode_revision(tiny_base, three, read_revision_files(three), 8)
    monkeypatch.setattr(SlotStack, "write_flat", lambda *args: pytest.fail("copied whole"))
    stack = placed(SlotBank(tiny_base, num_slots=1, max_rank=8), entry)
    assert stack.rank == 4 and entry.layout != stack.layout
    for path, (a, b) in entry.tensors.items():
        assert torch.equal(stack.a[path][0, :3], a) and not stack.a[path][0, 3].any()
        assert torch.equal(stack.b[path][0, :, :3], b) and not stack.b[path][0, :, 3].any()


# ----------------------------------------------------------------- catalogs from before 0004


def test_a_catalog_upgraded_to_the_load_check_keeps_serving_its_revisions(
    tmp_path: Path, tiny_base: ResidentBase
) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = Catalog(url, tmp_path / "blobs")
    catalog.ensure_tenant("acme")
    catalog.record_base(tiny_base.base_id, tiny_base.fingerprint)
    old = Revisions(catalog, tiny_base).export("pol-old", seed=1, rank=4)
    catalog.close()
    # Back to the schema before the load check, as an older mint left it.
    engine = create_engine(url)
    with engine.begin() as connection:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0003")
    assert "xxh3_128" not in {c["name"] for c in inspect(engine).get_columns("revisions")}
    engine.dispose()
    catalog = Catalog(url, tmp_path / "blobs")
    worker = BaseWorker(tiny_base, EngineConfig(num_slots=2), read=read_revision_files)
    try:
        assert current_revision(catalog.engine) == "0004"
        revision = catalog.resolve("acme", "pol-old")
        assert revision == dataclasses.replace(old, xxh3_128=None)
        assert read_revision_files(revision).check == "sha256"
        new = Revisions(catalog, tiny_base).export("pol-new", seed=2, rank=4)
        assert new.xxh3_128 is not None and read_revision_files(new).check == "xxh3_128"
        for served in (revision, new):
            job = Job(served, [3, 4, 5], 4)
            worker.submit_sample(job.job)
            entry = decode_revision(tiny_base, served, read_revision_files(served), 8)
            assert job.wait().sequences[0].tokens == alone(tiny_base, entry, [3, 4, 5], 4)
        assert worker.stats.snapshot()["cold_loads"] == 2
    finally:
        worker.stop()
        catalog.close()


def refiled(revision: RevisionRecord, header_pad: int, half: set[str]) -> bytes:
    """The revision's weights written again with `header_pad` spaces after the header JSON
    (the format promises no alignment) and the tensors named in `half` stored as F16."""
    weights = weights_file(revision).read_bytes()
    end = header_end(revision)
    header = json.loads(weights[8:end])
    header.pop("__metadata__")
    body, cursor = b"", 0
    for key in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
        info = header[key]
        begin, stop = info["data_offsets"]
        tensor = torch.frombuffer(bytearray(weights[end + begin : end + stop]), dtype=torch.float32)
        if key in half:
            tensor, info["dtype"] = tensor.to(torch.float16), "F16"
        raw = tensor.numpy().tobytes()
        info["data_offsets"] = [cursor, cursor + len(raw)]
        body, cursor = body + raw, cursor + len(raw)
    encoded = json.dumps(header).encode() + b" " * header_pad
    return len(encoded).to_bytes(8, "little") + encoded + body


@pytest.mark.parametrize(("header_pad", "halves"), [(1, False), (0, True)])
def test_files_that_cannot_be_read_in_place_are_packed_into_one_buffer(
    revisions: Revisions, tiny_base: ResidentBase, header_pad: int, halves: bool
) -> None:
    revision = revisions.export("pol-a", seed=1, rank=4)
    config = (Path(revision.blob_path) / CONFIG_FILE).read_bytes()
    expected = revisions.catalog.read_revision_tensors(revision)
    path = "model.layers.1.mlp.up_proj"
    half = {f"base_model.model.{path}.lora_B.weight"} if halves else set()
    weights = refiled(revision, header_pad, half)
    if not halves:
        assert (8 + int.from_bytes(weights[:8], "little")) % 4  # float32 data off alignment
    else:
        expected[path] = (expected[path][0], expected[path][1].to(torch.float16).float())
    digest = hashlib.sha256(weights + config).hexdigest()
    record = dataclasses.replace(revision, sha256=digest, xxh3_128=None)
    entry = decode_revision(tiny_base, record, RevisionFiles.of(weights, config), 8)
    assert sorted(entry.tensors) == sorted(expected)
    for module, (a, b) in expected.items():
        assert torch.equal(entry.tensors[module][0], a)
        assert torch.equal(entry.tensors[module][1], b)
    stack = placed(SlotBank(tiny_base, num_slots=1, max_rank=8), entry)
    assert entry.layout == stack.layout  # packed in data order: still one copy
    for module, (a, b) in expected.items():
        assert torch.equal(stack.a[module][0], a) and torch.equal(stack.b[module][0], b)
