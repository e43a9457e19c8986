"""The host cache and the slot bank, asserted as whole tables after every step."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tests.serve.conftest import Revisions

from mint.catalog.peft_io import CONFIG_FILE, WEIGHTS_FILE
from mint.catalog.records import RevisionRecord
from mint.errors import InvalidAdapter, MintError, UserError
from mint.models.base import ResidentBase
from mint.models.lora import FlatLayout
from mint.serve import Engine, SampleRequest, SamplingParams
from mint.serve.tiers import (
    HostCache,
    HostEntry,
    RevisionFiles,
    SlotBank,
    decode_revision,
    view_safetensors,
)

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, stop_tokens=[])


def files(revision: RevisionRecord) -> tuple[bytes, bytes]:
    folder = Path(revision.blob_path)
    return (folder / WEIGHTS_FILE).read_bytes(), (folder / CONFIG_FILE).read_bytes()


def admitted(base: ResidentBase, revision: RevisionRecord, max_rank: int = 8) -> HostEntry:
    return decode_revision(base, revision, RevisionFiles.of(*files(revision)), max_rank=max_rank)


def sized(sha: str, nbytes: int) -> HostEntry:
    data = torch.zeros(nbytes, dtype=torch.uint8)
    return HostEntry(sha, f"pol@{sha}", 1, 1.0, data, FlatLayout(1, (), 0), nbytes=nbytes)


def test_host_cache_keeps_a_byte_budget_least_recently_used_first() -> None:
    cache = HostCache(budget_bytes=400)
    assert cache.admit(sized("a", 100)) == []
    assert cache.table() == [("a", 100)]
    assert cache.admit(sized("b", 200)) == []
    assert cache.table() == [("a", 100), ("b", 200)]
    assert cache.get("a") is not None and cache.get("zzz") is None
    assert cache.table() == [("b", 200), ("a", 100)]
    assert cache.admit(sized("c", 150)) == ["b"]
    assert cache.table() == [("a", 100), ("c", 150)]
    assert (cache.nbytes, len(cache)) == (250, 2)
    assert cache.admit(sized("a", 100)) == []  # re-admitting moves it, counts it once
    assert cache.table() == [("c", 150), ("a", 100)]
    assert cache.admit(sized("d", 400)) == ["c", "a"]
    assert cache.table() == [("d", 400)]
    with pytest.raises(InvalidAdapter) as caught:
        cache.admit(sized("e", 401))
    assert caught.value.message == (
        "revision pol@e rejected (1 problem(s)): it needs 401 bytes of host memory but the "
        "host cache budget is 400 bytes; raise host_cache_bytes above 401"
    )
    assert cache.table() == [("d", 400)]


def test_admission_decodes_once_into_the_base_dtype(
    revisions: Revisions, tiny_base: ResidentBase
) -> None:
    revision = revisions.export("pol-a", seed=1, rank=4)
    entry = admitted(tiny_base, revision)
    assert (entry.sha256, entry.label, entry.rank, entry.scale) == (
        revision.sha256,
        "pol-a@1",
        4,
        2.0,
    )
    stored = revisions.catalog.read_revision_tensors(revision)
    assert sorted(entry.tensors) == sorted(stored) and len(stored) == 14
    for path, (a, b) in stored.items():
        assert torch.equal(entry.tensors[path][0], a) and torch.equal(entry.tensors[path][1], b)
        assert entry.tensors[path][0].dtype == tiny_base.dtype
    assert entry.nbytes == sum(a.nbytes + b.nbytes for a, b in stored.values())


def test_admission_lists_every_problem_at_once(
    revisions: Revisions, tiny_base: ResidentBase
) -> None:
    revision = revisions.export("pol-a", seed=1, rank=4)
    weights, config = files(revision)
    foreign = dataclasses.replace(revision, base_id="acme/Other-1B", base_fingerprint="0" * 64)
    with pytest.raises(InvalidAdapter) as caught:
        decode_revision(tiny_base, foreign, RevisionFiles.of(weights[:-20], config), max_rank=2)
    problems = caught.value.problems
    header = int.from_bytes(weights[:8], "little")
    body = len(weights) - 8 - header
    assert problems == [
        f"the files do not match the revision's sha256 {revision.sha256[:12]}...; the stored "
        "copy is damaged or truncated; re-export the revision",
        f"the base given is mint-test/tiny-llama ({tiny_base.fingerprint[:12]}) but revision "
        "pol-a@1 is on acme/Other-1B (000000000000); sample it on an engine of its own base, "
        "or retrain it on this one",
        "rank 4 is above the slot bank's max rank 2; export at rank <= 2 or start the engine "
        "with max_slot_rank >= 4",
        f"{WEIGHTS_FILE} is unreadable (the tensors cover {body} bytes but {body - 20} follow "
        "the header; the file is truncated or has trailing bytes); re-export the revision",
    ]
    assert caught.value.message.startswith("revision pol-a@1 rejected (4 problem(s)): ")


def test_admission_checks_modules_against_the_base(
    revisions: Revisions, tiny_base: ResidentBase
) -> None:
    good = revisions.export("pol-a", seed=1, rank=2)
    tensors = revisions.catalog.read_revision_tensors(good)
    path = "model.layers.0.self_attn.q_proj"
    tensors[path] = (tensors[path][0][:, :10].contiguous(), tensors[path][1])
    tensors["model.layers.9.mlp.up_proj"] = tensors["model.layers.1.mlp.up_proj"]
    bad = revisions.export_tensors("pol-bad", tensors, rank=2)
    with pytest.raises(InvalidAdapter) as caught:
        admitted(tiny_base, bad)
    assert caught.value.problems == [
        "module model.layers.0.self_attn.q_proj has A (2, 10) and B (64, 2); the base needs "
        "A [2, 64] and B [64, 2]",
        "module model.layers.9.mlp.up_proj is not an adaptable layer of mint-test/tiny-llama",
    ]


def place(bank: SlotBank, entry: HostEntry, refs: int) -> int:
    index = bank.reserve(entry.sha256, entry.label)
    assert index is not None
    bank.fill(index, entry)
    bank.mark_ready(index, refs=refs)
    return index


def test_slot_bank_scenario(revisions: Revisions, tiny_base: ResidentBase) -> None:
    a, b, c = (
        admitted(tiny_base, revisions.export(name, seed=i, rank=2 + i))
        for i, name in enumerate(("pol-a", "pol-b", "pol-c"))
    )
    bank = SlotBank(tiny_base, num_slots=2, max_rank=8)
    assert bank.snapshot() == [None, None]
    assert bank.reserve(a.sha256, a.label) == 0
    assert bank.snapshot() == [("pol-a@1", "placing", 0, False), None]
    assert bank.acquire(a.sha256) is None  # a reservation is not usable yet
    bank.fill(0, a)
    bank.mark_ready(0, refs=1)
    assert bank.snapshot() == [("pol-a@1", "ready", 1, False), None]
    assert place(bank, b, refs=0) == 1
    assert bank.snapshot() == [("pol-a@1", "ready", 1, False), ("pol-b@1", "ready", 0, False)]
    # a is in use, so c takes b's slot even though b was used more recently.
    assert place(bank, c, refs=0) == 1
    assert bank.snapshot() == [("pol-a@1", "ready", 1, False), ("pol-c@1", "ready", 0, False)]
    assert bank.acquire(c.sha256) == 1
    bank.release(0)
    assert bank.snapshot() == [("pol-a@1", "ready", 0, False), ("pol-c@1", "ready", 1, False)]
    assert bank.reserve(b.sha256, b.label, timeout_s=0.01) == 0
    bank.abandon(0)
    assert bank.snapshot() == [None, ("pol-c@1", "ready", 1, False)]
    assert place(bank, a, refs=1) == 0
    # Every slot in use: a reservation waits, and gives up when its wait runs out.
    assert bank.reserve(b.sha256, b.label, timeout_s=0.05) is None
    assert bank.snapshot() == [("pol-a@1", "ready", 1, False), ("pol-c@1", "ready", 1, False)]
    bank.release(0)
    bank.release(1)
    assert bank.set_pinned(a.sha256, True) == 0
    with pytest.raises(UserError, match="would pin all 2 slots"):
        bank.set_pinned(c.sha256, True)
    assert place(bank, b, refs=0) == 1  # the pinned a stays, c goes
    assert bank.snapshot() == [("pol-a@1", "ready", 0, True), ("pol-b@1", "ready", 0, False)]
    with pytest.raises(MintError, match="released without a reference"):
        bank.release(1)


def test_a_slot_holds_a_device_copy_that_serves_like_the_host_tensors(
    revisions: Revisions, tiny_base: ResidentBase
) -> None:
    a, b = (
        admitted(tiny_base, revisions.export(name, seed=i, rank=3 + 2 * i))
        for i, name in enumerate(("pol-a", "pol-b"))
    )
    bank = SlotBank(tiny_base, num_slots=2, max_rank=8)
    place(bank, b, refs=0)
    place(bank, a, refs=0)
    view = bank.adapter(1)
    assert (view.key, view.scale) == (a.sha256, a.scale)
    for path, (host_a, host_b) in a.tensors.items():
        slot_a, slot_b = view.tensors[path]
        assert torch.equal(slot_a, host_a) and torch.equal(slot_b, host_b)
        assert slot_a.data_ptr() != host_a.data_ptr() and slot_a.device == tiny_base.device
    from mint.serve import AdapterRef

    engine = Engine(tiny_base)
    host = AdapterRef("host", a.tensors, a.scale)
    prompt = [5, 6, 7, 8]
    from_slot, from_host = engine.generate(
        [SampleRequest(prompt, GREEDY, adapter=view), SampleRequest(prompt, GREEDY, adapter=host)]
    )
    assert from_slot.sequences[0].tokens == from_host.sequences[0].tokens
    torch.testing.assert_close(
        torch.tensor(from_slot.sequences[0].logprobs),
        torch.tensor(from_host.sequences[0].logprobs),
        rtol=0,
        atol=1e-5,
    )


def test_admission_reads_tensors_in_place_and_agrees_with_safetensors(
    revisions: Revisions, tiny_base: ResidentBase
) -> None:
    from safetensors.torch import load as load_safetensors

    from mint.serve.loader import read_revision_files

    revision = revisions.export("pol-a", seed=1, rank=4)
    read = read_revision_files(revision)
    assert read == RevisionFiles.of(*files(revision), check="xxh3_128")
    assert (read.check, read.digest) == ("xxh3_128", revision.xxh3_128)
    sha256 = RevisionFiles.read(Path(revision.blob_path))
    assert (sha256.check, sha256.digest) == ("sha256", revision.sha256)
    views = view_safetensors(read.weights)
    reference = load_safetensors(bytes(read.weights))
    assert sorted(views) == sorted(reference)
    for key, tensor in reference.items():
        assert views[key].dtype == tensor.dtype and torch.equal(views[key], tensor)
    # A float32 base takes the float32 file's tensors as they lie in the bytes read.
    entry = decode_revision(tiny_base, revision, read, max_rank=8)
    start = torch.frombuffer(read.weights, dtype=torch.uint8).data_ptr()
    header = int.from_bytes(read.weights[:8], "little")
    assert entry.data.data_ptr() == start + 8 + header  # the data region, not a copy
    assert entry.nbytes == len(read.weights) - 8 - header
    for a, b in entry.tensors.values():
        for tensor in (a, b):
            assert start <= tensor.data_ptr() < start + len(read.weights)


def safetensors_bytes(header: dict[str, object], body: bytes) -> bytearray:
    encoded = json.dumps(header).encode()
    return bytearray(len(encoded).to_bytes(8, "little") + encoded + body)


F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (bytearray(b"\x01\x00"), "it is 2 bytes, shorter than the 8-byte header length"),
        (bytearray((999).to_bytes(8, "little") + b"{}"),
         "its 999-byte header runs past the end of the 10 bytes"),
        (safetensors_bytes({"k": {**F32_2x2, "dtype": "I64"}}, bytes(16)),
         "tensor 'k' has dtype 'I64'; LoRA tensors must be one of ['BF16', 'F16', 'F32', "
         "'F64']"),
        (safetensors_bytes({"k": {**F32_2x2, "shape": [2, 3]}}, bytes(16)),
         "tensor 'k' spans 16 bytes but shape [2, 3] of F32 needs 24"),
        (safetensors_bytes({"k": F32_2x2, "j": F32_2x2}, bytes(16)),
         "tensor 'k' starts at byte 0, expected 16"),
        (safetensors_bytes({"k": {**F32_2x2, "data_offsets": [8, 24]}}, bytes(24)),
         "tensor 'k' starts at byte 8, expected 0"),
        (safetensors_bytes({"k": {**F32_2x2, "data_offsets": ["0", 16]}}, bytes(16)),
         "tensor 'k' has data_offsets ['0', 16], not [begin, end]"),
        (safetensors_bytes({"k": {**F32_2x2, "shape": "2x2"}}, bytes(16)),
         "tensor 'k' has shape '2x2', not a list of sizes"),
        (safetensors_bytes({"k": F32_2x2}, bytes(12)),
         "the tensors cover 16 bytes but 12 follow the header; the file is truncated or has "
         "trailing bytes"),
    ],
)  # fmt: skip
def test_a_malformed_safetensors_file_is_named_precisely(data: bytearray, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        view_safetensors(data)
    assert str(caught.value) == problem


def test_misaligned_tensors_are_copied_out_exactly() -> None:
    values = torch.arange(4, dtype=torch.float32)
    header = {
        "a": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [2, 18]},
    }
    body = torch.ones(1, dtype=torch.float16).numpy().tobytes() + values.numpy().tobytes()
    data = safetensors_bytes(header, body)
    views = view_safetensors(data)
    assert torch.equal(views["b"], values) and views["a"].tolist() == [1.0]
