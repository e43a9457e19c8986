"""The host cache and the slot bank, asserted as whole tables after every step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tests.serve.conftest import Revisions

from mint.catalog.peft_io import CONFIG_FILE, WEIGHTS_FILE
from mint.catalog.records import RevisionRecord
from mint.errors import InvalidAdapter, MintError, UserError
from mint.models.base import ResidentBase
from mint.serve import Engine, SampleRequest, SamplingParams
from mint.serve.tiers import HostCache, HostEntry, SlotBank, decode_revision

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, stop_tokens=[])


def files(revision: RevisionRecord) -> tuple[bytes, bytes]:
    folder = Path(revision.blob_path)
    return (folder / WEIGHTS_FILE).read_bytes(), (folder / CONFIG_FILE).read_bytes()


def admitted(base: ResidentBase, revision: RevisionRecord, max_rank: int = 8) -> HostEntry:
    return decode_revision(base, revision, *files(revision), max_rank=max_rank)


def sized(sha: str, nbytes: int) -> HostEntry:
    return HostEntry(sha, f"pol@{sha}", rank=1, scale=1.0, tensors={}, nbytes=nbytes)


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
        decode_revision(tiny_base, foreign, weights[:-20], config, max_rank=2)
    problems = caught.value.problems
    assert problems[:4] == [
        f"the files do not match the revision's sha256 {revision.sha256[:12]}...; the stored "
        "copy is damaged or truncated; re-export the revision",
        "it was trained on base acme/Other-1B but this engine serves mint-test/tiny-llama; "
        "sample it on its own base",
        f"its base fingerprint 000000000000... differs from the resident base's "
        f"{tiny_base.fingerprint[:12]}...; the base weights changed since training; retrain "
        "or re-provision the original base",
        "rank 4 is above the slot bank's max rank 2; export at rank <= 2 or start the engine "
        "with max_slot_rank >= 4",
    ]
    assert len(problems) == 5 and problems[4].startswith(f"{WEIGHTS_FILE} is unreadable (")
    assert caught.value.message.startswith("revision pol-a@1 rejected (5 problem(s)): ")


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
