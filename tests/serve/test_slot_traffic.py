"""Randomized traffic through the whole serving path (cold loader, host cache, slot bank,
continuous batching): every request decodes exactly as it does alone, with its own adapter.

The base is the float64 tiny base, so the 1e-5 bound on logprobs tests the serving logic,
not float32 noise. There are fewer slots than adapters, so slots are evicted and refilled
while other slots decode; the adapters are random enough that serving a row from any other
adapter's weights moves its logprobs far past the bound (checked below), and a run with a
slot bank that reuses slots in use shows the check catches exactly that fault.
"""

from __future__ import annotations

import random
import threading
from collections import deque

import pytest
import torch
from tests.serve.conftest import Revisions

from mint.catalog.records import RevisionRecord
from mint.control.futures import JobFuture, JsonResult, Result
from mint.control.worker import BaseWorker, SampleJob
from mint.errors import Busy
from mint.models.base import ResidentBase
from mint.models.lora import ATTENTION_TARGETS, MLP_TARGETS, SlotPlacement, SlotRows, SlotStack
from mint.serve import AdapterRef, Engine, SampleRequest, SampleResult, SamplingParams
from mint.serve.config import EngineConfig
from mint.serve.loader import read_revision_files
from mint.serve.tiers import SlotBank, decode_revision

ATOL = 1e-5
WAIT_S = 120
#: (rank, targets) of the adapters, cycled: four rank classes, three target sets.
SHAPES = [
    (1, ATTENTION_TARGETS + MLP_TARGETS),
    (2, ATTENTION_TARGETS),
    (3, ATTENTION_TARGETS + MLP_TARGETS),
    (4, MLP_TARGETS),
    (8, ATTENTION_TARGETS + MLP_TARGETS),
]


class Traffic:
    """A seeded list of requests over `revisions` (None: the plain base)."""

    def __init__(self, revisions: list[RevisionRecord], count: int, seed: int) -> None:
        rng = random.Random(seed)
        self.requests: list[tuple[RevisionRecord | None, SampleRequest]] = []
        for _ in range(count):
            revision = None if rng.random() < 0.04 else rng.choice(revisions)
            sampled = rng.random() < 0.5
            params = SamplingParams(
                max_tokens=rng.randint(1, 4),
                temperature=rng.choice([1.0, 2.0, 4.0]) if sampled else 0.0,
                seed=rng.randrange(2**32) if sampled else None,
                stop_tokens=[] if rng.random() < 0.8 else None,
            )
            prompt = [rng.randrange(1, 250) for _ in range(rng.randint(1, 6))]
            samples = 2 if rng.random() < 0.15 else 1
            self.requests.append((revision, SampleRequest(prompt, params, num_samples=samples)))


def serve(worker: BaseWorker, traffic: Traffic, seed: int) -> list[SampleResult | None]:
    """Submit the traffic in random bursts while earlier requests decode; wait for all.
    A request that failed has None for its result."""
    rng = random.Random(seed)
    results: list[SampleResult | None] = [None] * len(traffic.requests)
    in_flight: deque[tuple[int, SampleJob]] = deque()
    next_index = 0

    def job(index: int) -> SampleJob:
        revision, request = traffic.requests[index]

        def finish(result: SampleResult) -> Result:
            results[index] = result
            return JsonResult({})

        return SampleJob(JobFuture("t", "acme", "sample"), request, finish, revision)

    while next_index < len(traffic.requests) or in_flight:
        wanted = rng.randint(1, 20)
        while next_index < len(traffic.requests) and len(in_flight) < wanted:
            sample_job = job(next_index)
            try:
                worker.submit_sample(sample_job)
            except Busy:
                break
            in_flight.append((next_index, sample_job))
            next_index += 1
        for _ in range(rng.randint(1, 3)):
            if in_flight:
                in_flight.popleft()[1].future.inner.exception(timeout=WAIT_S)
    return results


def alone(base: ResidentBase, adapter: AdapterRef | None, request: SampleRequest) -> SampleResult:
    """The request by itself, its adapter bound from its host tensors (no slot involved)."""
    single = SampleRequest(request.prompt, request.params, request.num_samples, adapter)
    return Engine(base).generate([single])[0]


def mismatches(got: SampleResult | None, want: SampleResult) -> bool:
    if got is None:
        return True
    for mine, reference in zip(got.sequences, want.sequences, strict=True):
        if mine.tokens != reference.tokens or mine.stop_reason != reference.stop_reason:
            return True
        difference = torch.tensor(mine.logprobs, dtype=torch.float64) - torch.tensor(
            reference.logprobs, dtype=torch.float64
        )
        if difference.abs().max() > ATOL:
            return True
    return False


def wrong_results(
    base: ResidentBase,
    traffic: Traffic,
    results: list[SampleResult | None],
    refs: dict[str | None, AdapterRef | None],
) -> list[int]:
    """Indices of the requests whose served result differs from their run alone."""
    wrong = []
    for index, ((revision, request), result) in enumerate(
        zip(traffic.requests, results, strict=True)
    ):
        adapter = refs[None if revision is None else revision.sha256]
        if mismatches(result, alone(base, adapter, request)):
            wrong.append(index)
    return wrong


class MixSpy:
    """Records how many slots and stacks each forward pass of the engine served."""

    def __init__(self, engine: Engine) -> None:
        self.passes: list[tuple[int, int]] = []
        plan = engine._slot_rows

        def spy(rows: list, tokens_per_row: int) -> SlotRows | None:
            slot_rows = plan(rows, tokens_per_row)
            if slot_rows is not None:
                slots = {(id(g.stack), run.slot) for g in slot_rows.groups for run in g.runs}
                self.passes.append((len(slots), len(slot_rows.groups)))
            return slot_rows

        engine._slot_rows = spy  # type: ignore[method-assign]


def traffic_worker(base: ResidentBase) -> BaseWorker:
    # Cold loads are not paced here: the point is slot churn while batches run, and pacing
    # would let few slots change hands mid-batch, so a careless bank could go unnoticed.
    config = EngineConfig(
        num_slots=6,
        max_batch_rows=8,
        max_slot_rank=8,
        max_cold_loads=64,
        cold_load_share_percent=100,
    )
    return BaseWorker(base, config, read=read_revision_files)


def export_adapters(revisions: Revisions, count: int) -> list[RevisionRecord]:
    return [
        revisions.export(f"pol-{i}", seed=i, rank=SHAPES[i % 5][0], targets=SHAPES[i % 5][1])
        for i in range(count)
    ]


def references(
    base: ResidentBase, exported: list[RevisionRecord]
) -> dict[str | None, AdapterRef | None]:
    refs: dict[str | None, AdapterRef | None] = {None: None}
    for revision in exported:
        entry = decode_revision(base, revision, read_revision_files(revision), max_rank=8)
        refs[revision.sha256] = AdapterRef("host-" + revision.sha256, entry.tensors, entry.scale)
    return refs


def test_a_thousand_mixed_requests_decode_as_they_do_alone(
    revisions: Revisions, tiny_base_f64: ResidentBase
) -> None:
    exported = export_adapters(revisions, 50)
    refs = references(tiny_base_f64, exported)
    # A row served by any other adapter's weights would be caught: every two adapters
    # (and the plain base) sample a probe to different tokens or logprobs. (Greedy logprobs
    # of the tiny base are mostly 0.0: its logits span about 100, so a high temperature
    # is what makes logprobs tell adapters apart.)
    params = SamplingParams(max_tokens=6, temperature=4.0, seed=5, stop_tokens=[])
    probe = SampleRequest([5, 9, 2, 7], params)
    probes = [alone(tiny_base_f64, ref, probe) for ref in refs.values()]
    for i, first in enumerate(probes):
        for second in probes[i + 1 :]:
            assert mismatches(first, second)
    traffic = Traffic(exported, count=1000, seed=11)
    worker = traffic_worker(tiny_base_f64)
    spy = MixSpy(worker.engine)
    try:
        results = serve(worker, traffic, seed=12)
        stats = worker.stats.snapshot()
    finally:
        worker.stop()
    wrong = wrong_results(tiny_base_f64, traffic, results, refs)
    assert wrong == []
    # The traffic really mixed adapters and rank classes in passes, and evicted slots.
    assert max(slots for slots, _ in spy.passes) == 6
    assert sum(slots > 1 for slots, _ in spy.passes) > len(spy.passes) // 4
    assert max(stacks for _, stacks in spy.passes) >= 3
    hits: dict[str, int] = stats["tier_hits"]  # type: ignore[assignment]
    assert hits["host_cache"] > 50 and stats["cold_loads"] > 100


def test_the_traffic_check_catches_a_slot_reused_mid_batch(
    revisions: Revisions, tiny_base_f64: ResidentBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same check against a bank that evicts slots still in use must fail."""

    def careless_victim(bank: SlotBank) -> int | None:
        free = [i for i, slot in enumerate(bank.table) if slot is None]
        ready = [
            (slot.last_used, i)
            for i, slot in enumerate(bank.table)
            if slot is not None and slot.state.value == "ready"
        ]
        return free[0] if free else (min(ready)[1] if ready else None)

    lock = threading.Lock()

    def lenient_release(bank: SlotBank, index: int) -> None:
        with lock:
            slot = bank.table[index]
            if slot is not None and slot.refs > 0:
                slot.refs -= 1

    monkeypatch.setattr(SlotBank, "_victim_locked", careless_victim)
    monkeypatch.setattr(SlotBank, "release", lenient_release)
    exported = export_adapters(revisions, 20)
    refs = references(tiny_base_f64, exported)
    traffic = Traffic(exported, count=150, seed=21)
    worker = traffic_worker(tiny_base_f64)
    try:
        results = serve(worker, traffic, seed=22)
    finally:
        worker.stop()
    wrong = wrong_results(tiny_base_f64, traffic, results, refs)
    assert len(wrong) > 5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize(
    "slots_of_rows",
    [
        [2, 2, 2],  # one slot: plain matmuls
        [0, 1, 2, 3],  # one row per slot, every slot: one batched matmul over the stack
        [1, 3, 4],  # one row per slot, most slots: the stack with zero rows padded in
        [0, 0, 3, 3, 3],  # several rows per slot: segments (grouped kernel or per slot)
    ],
)
def test_slot_rows_give_every_row_its_own_slot(
    dtype: torch.dtype, tokens: int, slots_of_rows: list[int]
) -> None:
    # o_proj's strides suit the grouped kernel (float32); the odd sizes take the fallback.
    shapes = {"m.q_proj": (6, 5), "m.down_proj": (4, 7), "m.o_proj": (8, 12)}
    stack = SlotStack(shapes, num_slots=5, rank=4, device=torch.device("cpu"), dtype=dtype)
    generator = torch.Generator().manual_seed(3)
    stack.flat.copy_(torch.randn(stack.flat.shape, generator=generator, dtype=dtype))
    scales = [0.5, 1.0, 2.0, 3.0, 4.0]
    placements = [SlotPlacement(stack, slot, frozenset(shapes)) for slot in range(5)]
    # A plain-base row first: the served rows are the contiguous rest.
    rows = [None] + [(placements[slot], scales[slot]) for slot in slots_of_rows]
    plan = SlotRows(rows, tokens, torch.device("cpu"), dtype)
    for path, (in_features, out_features) in shapes.items():
        x = torch.randn(len(rows), tokens, in_features, generator=generator, dtype=dtype)
        y = torch.randn(len(rows), tokens, out_features, generator=generator, dtype=dtype)
        want = y.clone()
        for row, slot in enumerate(slots_of_rows, start=1):
            a, b = stack.a[path][slot], stack.b[path][slot]
            want[row] += scales[slot] * (x[row] @ a.t() @ b.t())
        got = plan.apply(path, x, y.clone())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert stack.segmentable == {"m.q_proj": False, "m.down_proj": False, "m.o_proj": True}


def test_slot_rows_refuse_rows_out_of_slot_order() -> None:
    stack = SlotStack({"m.q_proj": (2, 2)}, 3, 1, torch.device("cpu"), torch.float32)
    place = [SlotPlacement(stack, slot, frozenset({"m.q_proj"})) for slot in range(3)]
    with pytest.raises(ValueError, match="in slot order"):
        SlotRows([(place[2], 1.0), (place[0], 1.0)], 1, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        SlotRows([(place[0], 1.0), None, (place[1], 1.0)], 1, torch.device("cpu"), torch.float32)


def test_placements_sit_in_their_rank_class_and_clear_what_the_slot_held(
    revisions: Revisions, tiny_base: ResidentBase
) -> None:
    from tests.serve.test_tiers import admitted, place

    four = admitted(tiny_base, revisions.export("pol-4", seed=1, rank=4))
    three = admitted(
        tiny_base, revisions.export("pol-3", seed=2, rank=3, targets=ATTENTION_TARGETS)
    )
    eight = admitted(tiny_base, revisions.export("pol-8", seed=3, rank=8))
    bank = SlotBank(tiny_base, num_slots=1, max_rank=8)
    place(bank, four, refs=0)
    stack = bank.adapter(0).placement.stack  # type: ignore[union-attr]
    assert stack.rank == 4 and stack.flat.abs().sum() > 0
    place(bank, three, refs=0)  # the same slot and class: rank 3 leaves row 4 to zeros
    placement = bank.adapter(0).placement
    assert placement is not None and placement.stack is stack and placement.slot == 0
    assert placement.modules == frozenset(three.tensors)
    for path in stack.paths:
        a, b = stack.a[path][0], stack.b[path][0]
        if path in three.tensors:
            assert torch.equal(a[:3], three.tensors[path][0])
            assert torch.equal(b[:, :3], three.tensors[path][1])
            assert not a[3].any() and not b[:, 3].any()
        else:
            assert not a.any() and not b.any()  # the MLP that pol-4 adapted is cleared
    place(bank, eight, refs=0)
    placement = bank.adapter(0).placement
    assert placement is not None and placement.stack.rank == 8
    assert sorted(bank._stacks) == [4, 8]
