"""`mint bench catalog`: how the catalog holds up with many revisions, SQLite beside PostgreSQL.

For each backend, in one process and one run:
1. Fill: policies of `--per-policy` revisions each, `--revisions` in all. Each policy gets
   one real export (PEFT files, fsync, rename); the rest are registered in bulk on that
   shared blob (`Catalog.register_copies`, `--batch` revisions per transaction).
2. Resolve: random (policy, alias or number) -> revision lookups; p50 and p99, after an
   untimed warm-up (statement compilation, PostgreSQL's prepared statements) of each kind.
3. List: random pages of one policy's revisions (opaque keyset tokens); p50 and p99.
4. Size: the database's bytes on disk, and this process's resident memory growth.
5. Timer floor: a busy loop as long as the resolve p50, timed the same way. Its p99 is what
   the machine's scheduling alone adds on a shared host; a resolve p99 near it says the
   tail is the host's, not the catalog's.
PostgreSQL runs in a scratch schema that is dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text

from mint.catalog import paging
from mint.catalog.scratch import DEFAULT_TEST_POSTGRES_URL, scratch_schema
from mint.catalog.store import Catalog
from mint.models.lora import LoraSignature

log = logging.getLogger(__name__)

BASE_ID = "mint-bench/catalog"
FINGERPRINT = "be" * 32
SIGNATURE = LoraSignature(rank=1, alpha=2.0, target_modules=("q_proj",))
TENANT = "bench"
#: Lookups run before timing; psycopg prepares a statement after its fifth use.
WARM_UP_CALLS = 50


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mint bench catalog", description=__doc__)
    parser.add_argument("--revisions", type=int, default=10_000, help="revisions in all")
    parser.add_argument("--per-policy", type=int, default=1000, help="revisions per policy")
    parser.add_argument("--batch", type=int, default=1000, help="revisions per transaction")
    parser.add_argument("--backends", default="sqlite,postgres", help="comma-separated")
    parser.add_argument("--samples", type=int, default=2000, help="timed lookups per kind")
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--postgres-url", default=DEFAULT_TEST_POSTGRES_URL)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a tmp folder")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.revisions < 1 or args.per_policy < 1 or args.batch < 1 or args.samples < 1:
        parser.error("--revisions, --per-policy, --batch and --samples must be >= 1")
    unknown = set(args.backends.split(",")) - {"sqlite", "postgres"}
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; use sqlite and/or postgres")
    return args


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 where it is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    cut = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else []
    p50 = cut[49] if cut else ordered[0]
    p99 = cut[98] if cut else ordered[0]
    return {"p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "max_ms": ordered[-1] * 1e3}


def timed(calls: list[Callable[[], object]]) -> list[float]:
    samples = []
    for call in calls:
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def busy_loop(duration_s: float) -> Callable[[], object]:
    def spin() -> None:
        until = time.perf_counter() + duration_s
        while time.perf_counter() < until:
            pass

    return spin


def fill(catalog: Catalog, args: argparse.Namespace) -> tuple[list[str], float]:
    """Step 1: returns the policy ids and the registration rate (revisions/s)."""
    import torch

    catalog.ensure_tenant(TENANT)
    catalog.record_base(BASE_ID, FINGERPRINT)
    tensors = {"model.layers.0.self_attn.q_proj": (torch.ones(1, 8), torch.zeros(8, 1))}
    policies: list[str] = []
    left, started = args.revisions, time.perf_counter()
    while left > 0:
        policy_id = f"policy-{len(policies):06d}"
        catalog.create_policy(TENANT, policy_id, BASE_ID, FINGERPRINT, SIGNATURE)
        count = min(args.per_policy, left)
        catalog.export_revision(TENANT, policy_id, None, tensors, step=0)
        for first in range(1, count, args.batch):
            steps = list(range(first, min(first + args.batch, count)))
            catalog.register_copies(TENANT, policy_id, 1, steps)
        catalog.set_alias(TENANT, policy_id, "prod", max(1, count // 2))
        policies.append(policy_id)
        left -= count
    return policies, args.revisions / (time.perf_counter() - started)


def database_bytes(catalog: Catalog, sqlite_file: Path | None) -> int:
    if sqlite_file is not None:
        return sum(p.stat().st_size for p in sqlite_file.parent.glob(sqlite_file.name + "*"))
    query = text(
        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND c.relkind = 'r'"
    )
    with catalog.engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def measure(url: str, blobs: Path, sqlite_file: Path | None, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    rss_before = rss_bytes()
    catalog = Catalog(url, blobs)
    try:
        policies, rate = fill(catalog, args)
        sizes = {p: r.number for p in policies for r in [catalog.resolve(TENANT, p)]}

        def resolve_call() -> Callable[[], object]:
            policy = rng.choice(policies)
            ref = rng.choice(["latest", "prod", str(rng.randint(1, sizes[policy]))])
            return lambda: catalog.resolve(TENANT, policy, ref)

        def page_call() -> Callable[[], object]:
            policy = rng.choice(policies)
            start = rng.randint(0, max(0, sizes[policy] - args.page_size))
            token = paging.encode_token("revisions", start) if start else None
            return lambda: catalog.revision_page(TENANT, policy, args.page_size, token)

        timed([resolve_call() for _ in range(WARM_UP_CALLS)] + [page_call()])
        resolve = timed([resolve_call() for _ in range(args.samples)])
        pages = timed([page_call() for _ in range(max(1, args.samples // 4))])
        total = sum(catalog.list_revisions(TENANT, p, limit=1)[1] for p in policies)
        floor = timed([busy_loop(statistics.median(resolve))] * args.samples)
        return {
            "revisions": total,
            "policies": len(policies),
            "registration_per_s": rate,
            "resolve": percentiles(resolve),
            "list_page": percentiles(pages),
            "timer_floor": percentiles(floor),
            "database_bytes": database_bytes(catalog, sqlite_file),
            "rss_growth_bytes": rss_bytes() - rss_before,
            # Timings on a shared machine mean little without how busy it was.
            "load_average_1m": os.getloadavg()[0],
        }
    finally:
        catalog.close()


def run_backend(backend: str, workdir: Path, args: argparse.Namespace) -> dict:
    folder = workdir / backend
    folder.mkdir(parents=True, exist_ok=True)
    if backend == "sqlite":
        db = folder / "catalog.db"
        return measure(f"sqlite:///{db}", folder / "blobs", db, args)
    with scratch_schema(args.postgres_url, prefix="mint_bench") as url:
        return measure(url, folder / "blobs", None, args)


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"catalog with {args.revisions} revisions", show_lines=False)
    table.add_column("figure")
    for backend in results:
        table.add_column(backend, justify="right")
    rows: list[tuple[str, Callable[[dict], str]]] = [
        ("policies", lambda r: f"{r['policies']}"),
        ("registration (revisions/s)", lambda r: f"{r['registration_per_s']:,.0f}"),
        ("resolve p50 / p99 (ms)", lambda r: f"{r['resolve']['p50_ms']:.2f} / "
                                             f"{r['resolve']['p99_ms']:.2f}"),
        ("timer floor p50 / p99 (ms)", lambda r: f"{r['timer_floor']['p50_ms']:.2f} / "
                                                 f"{r['timer_floor']['p99_ms']:.2f}"),
        ("list page p50 / p99 (ms)", lambda r: f"{r['list_page']['p50_ms']:.2f} / "
                                               f"{r['list_page']['p99_ms']:.2f}"),
        ("database (MiB)", lambda r: f"{r['database_bytes'] / 2**20:.1f}"),
        ("memory growth (MiB)", lambda r: f"{r['rss_growth_bytes'] / 2**20:.1f}"),
        ("load average (1 min)", lambda r: f"{r['load_average_1m']:.1f}"),
    ]  # fmt: skip
    for label, cell in rows:
        table.add_row(label, *(cell(results[b]) for b in results))
    Console(emoji=False).print(table)


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_num_threads(1)  # two cores are shared; the catalog needs none of them for math
    args = parse(list(sys.argv[1:] if argv is None else argv))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mint-bench-catalog-") as scratch:
        workdir = args.workdir or Path(scratch)
        for backend in args.backends.split(","):
            log.info("catalog bench on %s with %d revisions", backend, args.revisions)
            results[backend] = run_backend(backend, workdir, args)
    body: dict[str, Any] = {
        "bench": "catalog",
        "revisions": args.revisions,
        "per_policy": args.per_policy,
        "page_size": args.page_size,
        "samples": args.samples,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "backends": results,
    }
    report(results, args)
    if args.out is not None:
        args.out.write_text(json.dumps(body, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
