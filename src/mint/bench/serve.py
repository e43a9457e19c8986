"""`mint bench serve`: the engine's adapter tiers and batching, measured side by side.

(a) 32 concurrent requests over 32 distinct adapters vs the same requests on one adapter;
(b) the same requests served PEFT-style (one `generate` per adapter group, the active
    adapter switched between groups);
(c) request latency by tier: slot hit, host-cache hit, catalog miss;
(d) host cache -> slot time vs a plain copy of the same bytes, and catalog -> host cache
    time vs a raw read of the same files (and vs that read hashed, xxh3_128 and sha256);
(e) Zipf traffic over many adapters with few slots and a small host cache: hit rates and
    p50/p99 latency; then warm per-token latency alone, while a burst of cold revisions
    loads (the cold loader's cost), and while a burst of cold requests loads and joins the
    batch (adding the cost of a bigger batch), reported apart.

Every figure is measured in this run; `--quick` runs all of it small on the tiny test base.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gc
import json
import logging
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mint.catalog.peft_io import CONFIG_FILE, WEIGHTS_FILE, adapter_digest, load_digest
from mint.catalog.records import RevisionRecord
from mint.catalog.store import Catalog
from mint.config import Settings
from mint.control.collector import defer_full_collections
from mint.control.futures import JobFuture, JsonResult, Result
from mint.control.worker import BaseWorker, SampleJob
from mint.errors import Busy
from mint.models.base import ResidentBase, load_base
from mint.models.lora import ATTENTION_TARGETS, MLP_TARGETS, LoraSignature, init_adapter
from mint.serve.config import EngineConfig
from mint.serve.loader import read_revision_files
from mint.serve.tiers import HostEntry, decode_revision
from mint.serve.types import SampleRequest, SampleResult, SamplingParams

log = logging.getLogger(__name__)

ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


@dataclass(frozen=True)
class Sizes:
    base: str
    concurrent: int  # (a), (b): requests and distinct adapters
    tokens: int  # (a), (b): tokens per request
    tier_reps: int  # (c)
    zipf_adapters: int  # (e)
    zipf_slots: int
    zipf_host_entries: int
    zipf_requests: int
    zipf_clients: int
    burst: int
    #: Alternations of the three burst phases; six give each phase about 300 warm tokens,
    #: so its p99 is not one or two slow tokens (with three it moved 30 points run to run).
    burst_rounds: int
    warm_tokens_alone: int  # per-token gaps measured alone in each burst round
    batching_reps: int = 3  # (a): alternations of the distinct and one-adapter runs


FULL = Sizes("smollm2-135m-instruct", 32, 12, 5, 1000, 8, 64, 400, 8, 64, 6, 40)
QUICK = Sizes("tiny-llama", 6, 4, 2, 30, 4, 8, 40, 4, 8, 1, 8, batching_reps=1)


class Adapters:
    """Seeded random revisions exported through a real catalog in a scratch folder."""

    def __init__(self, base: ResidentBase, folder: Path) -> None:
        self.base = base
        self.catalog = Catalog(f"sqlite:///{folder / 'catalog.db'}", folder / "blobs")
        self.catalog.ensure_tenant("bench")
        self.catalog.record_base(base.base_id, base.fingerprint)
        self._count = 0

    def make(self, rank: int, targets: tuple[str, ...] = ALL_TARGETS) -> RevisionRecord:
        self._count += 1
        policy = f"bench-{self._count}"
        signature = LoraSignature(rank, 2.0 * rank, targets)
        self.catalog.create_policy("bench", policy, self.base.base_id, self.base.fingerprint,
                                   signature)  # fmt: skip
        tensors = init_adapter(self.base.layers, signature, seed=self._count)
        generator = torch.Generator().manual_seed(self._count)
        for _, b in tensors.values():
            b.copy_(torch.randn(b.shape, generator=generator) * 0.02)
        return self.catalog.export_revision("bench", policy, None, tensors, step=0)


class Client:
    """Submits sample jobs to a worker and times them."""

    def __init__(self, worker: BaseWorker, prompt: list[int]) -> None:
        self.worker = worker
        self.prompt = prompt

    def submit(
        self,
        revision: RevisionRecord | None,
        tokens: int,
        on_token: Callable[[int, int, float], None] | None = None,
    ) -> tuple[JobFuture, list[SampleResult]]:
        holder: list[SampleResult] = []

        def finish(result: SampleResult) -> Result:
            holder.append(result)
            return JsonResult({})

        params = SamplingParams(max_tokens=tokens, temperature=0.0, stop_tokens=[])
        job = SampleJob(JobFuture("bench", "bench", "sample"), SampleRequest(self.prompt, params),
                        finish, revision, on_token)  # fmt: skip
        self.worker.submit_sample(job)
        return job.future, holder

    def run(self, revision: RevisionRecord | None, tokens: int) -> float:
        """Seconds from submit to result of one request, retrying after the hint while busy
        (as the SDKs do with Retry-After)."""
        started = time.perf_counter()
        while True:
            try:
                future, _ = self.submit(revision, tokens)
                break
            except Busy as busy:
                time.sleep(busy.retry_after_s)
        future.inner.result(timeout=600)
        return time.perf_counter() - started


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _worker(base: ResidentBase, **config: int) -> BaseWorker:
    return BaseWorker(base, EngineConfig(**config), read=read_revision_files)


def _concurrent(client: Client, revisions: list[RevisionRecord], tokens: int) -> dict[str, Any]:
    started, cpu_started = time.perf_counter(), time.process_time()
    jobs = [client.submit(revision, tokens) for revision in revisions]
    for future, _ in jobs:
        future.inner.result(timeout=600)
    seconds = time.perf_counter() - started
    outputs = [holder[0].sequences[0].tokens for _, holder in jobs]
    return {
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_started,
        "tokens_per_s": len(jobs) * tokens / seconds,
        "outputs": outputs,
    }


def bench_batching(base: ResidentBase, adapters: Adapters, sizes: Sizes) -> dict[str, Any]:
    """(a) distinct adapters vs one adapter, warm, in one batch each.

    The two runs alternate `sizes.batching_reps` times and medians are reported, so load
    from other processes falls on both alike; CPU seconds (this process) are reported too,
    being far less sensitive to that load than wall time."""
    revisions = [adapters.make(rank=8) for _ in range(sizes.concurrent)]
    n = sizes.concurrent
    worker = _worker(base, num_slots=n, max_batch_rows=n, max_slot_rank=8, max_cold_loads=n)
    runs: dict[str, list[dict[str, Any]]] = {"distinct": [], "one": []}
    try:
        client = Client(worker, prompt=list(range(10, 30)))
        for revision in revisions:  # place every adapter first: this measures warm batching
            client.run(revision, 1)
        for _ in range(sizes.batching_reps):
            runs["distinct"].append(_concurrent(client, revisions, sizes.tokens))
            runs["one"].append(_concurrent(client, [revisions[0]] * n, sizes.tokens))
    finally:
        worker.stop()

    def median(kind: str, figure: str) -> float:
        return statistics.median(run[figure] for run in runs[kind])

    return {
        "requests": n,
        "tokens_per_request": sizes.tokens,
        "repetitions": sizes.batching_reps,
        "distinct_seconds": median("distinct", "seconds"),
        "one_adapter_seconds": median("one", "seconds"),
        "distinct_tokens_per_s": n * sizes.tokens / median("distinct", "seconds"),
        "one_adapter_tokens_per_s": n * sizes.tokens / median("one", "seconds"),
        "distinct_throughput_over_one": median("one", "seconds") / median("distinct", "seconds"),
        "distinct_cpu_throughput_over_one": (
            median("one", "cpu_seconds") / median("distinct", "cpu_seconds")
        ),
        "_distinct_cpu_seconds": median("distinct", "cpu_seconds"),
        "_outputs": runs["distinct"][0]["outputs"],
        "_revisions": revisions,
    }


def bench_peft(base: ResidentBase, batching: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """(b) the requests of (a) served by PEFT, one generate per adapter group."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    revisions: list[RevisionRecord] = batching["_revisions"]
    model: Any = AutoModelForCausalLM.from_pretrained(base.folder, dtype=base.dtype)
    model.to(base.device).eval()
    started = time.perf_counter()
    peft: Any = PeftModel.from_pretrained(model, revisions[0].blob_path, adapter_name="a0")
    for i, revision in enumerate(revisions[1:], start=1):
        peft.load_adapter(revision.blob_path, adapter_name=f"a{i}")
    load_seconds = time.perf_counter() - started
    prompt = torch.tensor([list(range(10, 30))], device=base.device)
    outputs = []
    started, cpu_started = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for i in range(len(revisions)):
            peft.set_adapter(f"a{i}")
            out = peft.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                max_new_tokens=sizes.tokens, min_new_tokens=sizes.tokens,
                                do_sample=False, pad_token_id=0)  # fmt: skip
            outputs.append(out[0, prompt.shape[1] :].tolist())
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    agree = sum(a == b for a, b in zip(outputs, batching["_outputs"], strict=True))
    return {
        "seconds": seconds,
        "adapter_load_seconds": load_seconds,
        "tokens_per_s": len(revisions) * sizes.tokens / seconds,
        "mint_distinct_speedup": seconds / batching["distinct_seconds"],
        "mint_distinct_cpu_speedup": cpu_seconds / batching["_distinct_cpu_seconds"],
        "greedy_outputs_equal_to_mint": f"{agree}/{len(revisions)}",
    }


def bench_tiers(base: ResidentBase, adapters: Adapters, sizes: Sizes) -> dict[str, Any]:
    """(c) one request's latency when its revision is in a slot, in the host cache only,
    or only in the catalog."""
    worker = _worker(base, num_slots=2, max_slot_rank=8)
    latency: dict[str, list[float]] = {"slot": [], "host_cache": [], "catalog": []}
    try:
        client = Client(worker, prompt=list(range(10, 30)))
        client.run(None, sizes.tokens)  # warm the kernels
        for _ in range(sizes.tier_reps):
            target, other_a, other_b = (adapters.make(rank=8) for _ in range(3))
            latency["catalog"].append(client.run(target, sizes.tokens))
            latency["slot"].append(client.run(target, sizes.tokens))
            client.run(other_a, 1)
            client.run(other_b, 1)  # both slots now hold others: target is host-cached only
            assert worker.bank.find(target.sha256) is None
            latency["host_cache"].append(client.run(target, sizes.tokens))
    finally:
        worker.stop()
    return {f"{tier}_median_s": statistics.median(v) for tier, v in latency.items()}


def bench_copies(base: ResidentBase, adapters: Adapters, reps: int) -> dict[str, Any]:
    """(d) tier moves against plain copies of the same bytes.

    catalog -> host cache is timed as the engine admits: the files read and hashed with
    the revision's load check, the config and the length checked, the header layout from
    the engine's cache (every rep but the one timed with a fresh cache, which parses and
    validates the header too); the sha256 figure is a revision that records no load check.
    The floors beside them read the same two files, plain, then hashed.
    """
    from mint.serve.tiers import LayoutCache, SlotBank

    revision = adapters.make(rank=8)
    older = dataclasses.replace(revision, xxh3_128=None)  # exported before the load check
    bank = SlotBank(base, num_slots=1, max_rank=8)
    layouts = LayoutCache()

    def admitted(record: RevisionRecord, cache: LayoutCache) -> HostEntry:
        return decode_revision(base, record, read_revision_files(record), 8, cache)

    entry = admitted(revision, layouts)
    flat = torch.ones(entry.nbytes, dtype=torch.uint8)
    target = torch.empty(entry.nbytes, dtype=torch.uint8, device=base.device)

    def placed(free: bool = True) -> None:
        index = bank.reserve(entry.sha256, entry.label)
        assert index is not None
        bank.fill(index, entry)
        bank.mark_ready(index, refs=0)
        if free:
            bank.table[index] = None  # free it again without touching its buffers

    target.copy_(flat)  # first touches (page faults, buffer allocation) stay out of the timing
    placed(free=False)
    placement = bank.adapter(0).placement
    assert placement is not None
    stack = placement.stack
    bank.table[0] = None

    def placed_per_tensor() -> None:  # the copies of a revision not laid out as its stack
        stack.write(0, entry.rank, entry.tensors)
        if base.device.type == "cuda":
            torch.cuda.synchronize(base.device)

    placed_per_tensor()
    folder = Path(revision.blob_path)
    times: dict[str, list[float]] = {}

    def timed(name: str, work: Callable[[], object]) -> None:
        started = time.perf_counter()
        work()
        times.setdefault(name, []).append(time.perf_counter() - started)

    def read() -> list[bytes]:
        return [(folder / name).read_bytes() for name in (WEIGHTS_FILE, CONFIG_FILE)]

    def copied() -> None:
        target.copy_(flat)
        if base.device.type == "cuda":
            torch.cuda.synchronize(base.device)

    for _ in range(reps):
        timed("raw_read", read)
        timed("raw_read_and_xxh3", lambda: load_digest(*read()))
        timed("raw_read_and_sha256", lambda: adapter_digest(*read()))
        timed("catalog_to_host", lambda: admitted(revision, layouts))
        timed("catalog_to_host_new_header", lambda: admitted(revision, LayoutCache()))
        timed("catalog_to_host_sha256", lambda: admitted(older, layouts))
        timed("plain_copy", copied)
        timed("host_to_slot", placed)
        timed("host_to_slot_per_tensor", placed_per_tensor)
    median = {name: statistics.median(values) for name, values in times.items()}
    figures: dict[str, Any] = {
        "adapter_bytes": entry.nbytes,
        "adapter_tensors": len(entry.layout.modules) * 2,
        "host_to_slot_one_copy": entry.layout == stack.layout,
    }
    figures |= {f"{name}_s": value for name, value in median.items()}
    for name, floor in (
        ("host_to_slot", "plain_copy"),
        ("host_to_slot_per_tensor", "plain_copy"),
        ("catalog_to_host", "raw_read"),
        ("catalog_to_host_new_header", "raw_read"),
        ("catalog_to_host_sha256", "raw_read"),
        ("raw_read_and_xxh3", "raw_read"),
        ("raw_read_and_sha256", "raw_read"),
    ):
        figures[f"{name}_over_{floor}"] = median[name] / median[floor]
    return figures


def _zipf_choices(count: int, population: int, rng: random.Random, s: float = 1.1) -> list[int]:
    weights = [1.0 / (rank + 1) ** s for rank in range(population)]
    return rng.choices(range(population), weights=weights, k=count)


def bench_zipf(base: ResidentBase, adapters: Adapters, sizes: Sizes) -> dict[str, Any]:
    """(e) Zipf traffic over many small adapters, then a burst of cold ones."""
    started = time.perf_counter()
    pool = [adapters.make(rank=8, targets=("q_proj",)) for _ in range(sizes.zipf_adapters)]
    export_seconds = time.perf_counter() - started
    entry_bytes = decode_revision(base, pool[0], read_revision_files(pool[0]), 8).nbytes
    worker = _worker(base, num_slots=sizes.zipf_slots, max_slot_rank=8,
                     host_cache_bytes=sizes.zipf_host_entries * entry_bytes,
                     max_batch_rows=64)  # fmt: skip
    try:
        client = Client(worker, prompt=list(range(10, 26)))
        client.run(None, 2)
        picks = _zipf_choices(sizes.zipf_requests, len(pool), random.Random(0))
        latencies = _closed_loop(client, [pool[i] for i in picks], sizes.zipf_clients)
        stats = worker.stats.snapshot()
        hits: dict[str, int] = stats["tier_hits"]  # type: ignore[assignment]
        total = sum(hits.values())
        zipf = {
            "adapters": len(pool),
            "slots": sizes.zipf_slots,
            "host_cache_entries": sizes.zipf_host_entries,
            "requests": len(picks),
            "distinct_requested": len(set(picks)),
            "export_seconds": export_seconds,
            "hit_rate": {tier: hits.get(tier, 0) / total for tier in ("slot", "host_cache",
                                                                      "catalog")},
            "shared_load_hits": stats["shared_load_hits"],
            "p50_s": _percentile(latencies, 0.5),
            "p99_s": _percentile(latencies, 0.99),
        }  # fmt: skip
        zipf["burst"] = _burst(worker, client, pool[picks[0]], adapters, sizes)
    finally:
        worker.stop()
    return zipf


def _closed_loop(client: Client, order: list[RevisionRecord], clients: int) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()
    queue = list(reversed(order))

    def run() -> None:
        while True:
            with lock:
                if not queue:
                    return
                revision = queue.pop()
            seconds = client.run(revision, 4)
            with lock:
                latencies.append(seconds)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


class WarmLoop:
    """One client sampling a warm revision request after request, recording per-token gaps.

    Gaps are taken inside each request only (the prefill before a request's first token is
    not a per-token gap); each gap is stamped with its end time and the batch's row count."""

    def __init__(self, worker: BaseWorker, client: Client, revision: RevisionRecord) -> None:
        self.worker, self.client, self.revision = worker, client, revision
        self.gaps: list[tuple[float, float, int]] = []  # (end time, seconds, batch rows)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="warm-loop")

    def _run(self) -> None:
        while not self._stop.is_set():
            stamps: list[tuple[float, int]] = []
            future, _ = self.client.submit(self.revision, WARM_TOKENS, self._stamper(stamps))
            future.inner.result(timeout=600)
            for (a, _), (b, rows) in zip(stamps, stamps[1:], strict=False):
                self.gaps.append((b, b - a, rows))

    def _stamper(self, stamps: list[tuple[float, int]]) -> Callable[[int, int, float], None]:
        def stamp(*_: object) -> None:
            stamps.append((time.perf_counter(), self.worker.running_rows()))

        return stamp

    def __enter__(self) -> WarmLoop:
        self._thread.start()
        time.sleep(0.3)  # let the first request reach its decode steps
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def inside(self, start: float, end: float) -> list[float]:
        """Gaps that lie wholly within [start, end]."""
        return [gap for stamp, gap, _ in self.gaps if start <= stamp - gap and stamp <= end]

    def overlapping(self, start: float, end: float) -> list[float]:
        """Gaps that overlap [start, end] at all."""
        return [gap for stamp, gap, _ in self.gaps if stamp - gap < end and stamp > start]


#: Tokens per warm request in the burst measurement.
WARM_TOKENS = 16


def _load_only(worker: BaseWorker, cold: list[RevisionRecord]) -> None:
    """Load `cold` through the cold loader as cold sample requests would, without joining
    the batch: each slot reference is given back as soon as its load ends."""
    pending: set[concurrent.futures.Future[int]] = set()
    for revision in cold:
        while True:
            try:
                future = worker.loader.request(revision)
                break
            except Busy:  # wait for a place in the cold-load queue
                done, pending = concurrent.futures.wait(pending, return_when="FIRST_COMPLETED")
        future.add_done_callback(lambda done: worker.bank.release(done.result()))
        pending.add(future)
    for future in pending:
        future.result(timeout=600)


def _burst(
    worker: BaseWorker, client: Client, warm: RevisionRecord, adapters: Adapters, sizes: Sizes
) -> dict[str, Any]:
    """Warm per-token latency alone, while `burst` cold revisions load, and while `burst`
    cold requests load and then join the batch; alternated `burst_rounds` times so that a
    change in the machine's background load hits every condition alike."""
    client.run(warm, 1)
    # The warm revision is pinned (as a `prod` alias would be): between two warm requests
    # its slot is idle, and the burst must not evict it.
    worker.bank.set_pinned(warm.sha256, True)
    loads_before = int(worker.stats.snapshot()["cold_loads"])  # type: ignore[call-overload]
    gaps: dict[str, list[float]] = {"alone": [], "loading": [], "joining": []}
    cold_seconds: list[float] = []
    rows: list[int] = []
    for _ in range(sizes.burst_rounds):
        loading = [adapters.make(rank=8, targets=("q_proj",)) for _ in range(sizes.burst)]
        joining = [adapters.make(rank=8, targets=("q_proj",)) for _ in range(sizes.burst)]
        with WarmLoop(worker, client, warm) as loop:
            started = time.perf_counter()
            while len(loop.inside(started, time.perf_counter())) < sizes.warm_tokens_alone:
                time.sleep(0.05)
            middle = time.perf_counter()
            _load_only(worker, loading)
            loaded = time.perf_counter()
            cold_seconds += _closed_loop(client, joining, clients=len(joining))
            joined = time.perf_counter()
        gaps["alone"] += loop.inside(started, middle)
        gaps["loading"] += loop.overlapping(middle, loaded)
        gaps["joining"] += loop.overlapping(loaded, joined)
        rows += [n for stamp, _, n in loop.gaps if loaded < stamp <= joined]
    loads = int(worker.stats.snapshot()["cold_loads"]) - loads_before  # type: ignore[call-overload]
    report: dict[str, Any] = {"cold_adapters": sizes.burst, "rounds": sizes.burst_rounds,
                              "cold_loads": loads}  # fmt: skip
    for phase, values in gaps.items():  # None where a phase ended before a token did
        report[f"warm_token_s_{phase}_p50"] = _percentile(values, 0.5) if values else None
        report[f"warm_token_s_{phase}_p99"] = _percentile(values, 0.99) if values else None
        report[f"warm_tokens_{phase}"] = len(values)
    for phase in ("loading", "joining"):
        for q in ("p50", "p99"):
            alone, during = report[f"warm_token_s_alone_{q}"], report[f"warm_token_s_{phase}_{q}"]
            rise = None if alone is None or during is None else during / alone - 1
            report[f"warm_token_{q}_rise_{phase}"] = rise
    report["batch_rows_joining_mean"] = statistics.mean(rows) if rows else 0.0
    report["cold_request_p50_s"] = _percentile(cold_seconds, 0.5)
    report["cold_request_p99_s"] = _percentile(cold_seconds, 0.99)
    report["refusals"] = worker.stats.snapshot()["refusals"]
    worker.bank.set_pinned(warm.sha256, False)
    return report


#: (part, figure path in the report, bound, "min" or "max"): what each part must show.
TARGETS = [
    ("a", ("batching", "distinct_throughput_over_one"), 0.85, "min"),
    ("b", ("peft", "mint_distinct_speedup"), 5.0, "min"),
    ("d", ("copies", "host_to_slot_over_plain_copy"), 2.0, "max"),
    ("d", ("copies", "catalog_to_host_over_raw_read"), 2.0, "max"),
    ("e", ("zipf", "burst", "warm_token_p99_rise_loading"), 0.10, "max"),
]


def _targets(report: dict[str, Any]) -> dict[str, str]:
    """Each target of the parts that ran: the measured figure, its bound, and whether it
    holds. (e)'s target is the warm rise while the cold burst loads; the rise once those
    requests decode beside the warm one is reported with it, apart: it is the cost of a
    bigger batch, which grows with rows on a CPU whatever loads them."""
    verdicts = {}
    for part, path, bound, kind in TARGETS:
        value: Any = report
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            continue
        held = value >= bound if kind == "min" else value <= bound
        sign = ">=" if kind == "min" else "<="
        verdicts[f"({part}) {path[-1]}"] = (
            f"{value:.3g} (target {sign} {bound:g}): {'met' if held else 'NOT met'}"
        )
    return verdicts


def _print(report: dict[str, Any]) -> None:
    for section, figures in report.items():
        if not isinstance(figures, dict):
            print(f"{section:<42} {figures}")
            continue
        print(f"[{section}]")
        for name, value in figures.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
            print(f"  {name:<40} {_fmt(value)}")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mint bench serve", description=__doc__.split("\n")[0])
    parser.add_argument("--bases-dir", type=Path, default=None, help="provisioned bases")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-serve.json"))
    parser.add_argument("--quick", action="store_true", help="tiny base, small sizes")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--parts", default="abcde", help="parts to run, e.g. 'de'")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    settings = Settings()
    bases_dir = args.bases_dir or settings.bases_dir
    base = load_base(sizes.base, bases_dir, settings.device, settings.dtype)
    gc.freeze()  # as `mint serve` does once a base is loaded
    defer_full_collections()  # and so does it
    with tempfile.TemporaryDirectory(prefix="mint-bench-serve-") as scratch:
        adapters = Adapters(base, Path(scratch))
        report: dict[str, Any] = {"base": base.base_id, "device": str(base.device),
                                  "threads": args.threads}  # fmt: skip
        if "a" in args.parts or "b" in args.parts:
            batching = bench_batching(base, adapters, sizes)
            if "b" in args.parts:
                report["peft"] = bench_peft(base, batching, sizes)
            report["batching"] = {k: v for k, v in batching.items() if not k.startswith("_")}
        if "c" in args.parts:
            report["tiers"] = bench_tiers(base, adapters, sizes)
        if "d" in args.parts:
            report["copies"] = bench_copies(base, adapters, reps=15)
        if "e" in args.parts:
            report["zipf"] = bench_zipf(base, adapters, sizes)
        adapters.catalog.close()
    report["targets"] = _targets(report)
    _print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
