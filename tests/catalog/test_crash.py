"""Crash safety: exporting processes SIGKILLed at random moments never leave a torn revision.

Each child is forked from the test process (a fresh interpreter would spend about two
seconds importing torch, so 200 kills would take minutes) and exports revisions in a loop
until it is killed. Afterwards every visible revision must be whole and GC must clear the
leftovers. It runs on SQLite and on PostgreSQL (a killed client's transaction is rolled
back by the server).
"""

from __future__ import annotations

import os
import random
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from tests.catalog.conftest import make_tensors

from mint.catalog import Catalog
from mint.catalog.peft_io import read_manifest
from mint.catalog.schema import utc_now

KILLS = 200
ADAPTERS = 40
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _export_until_killed(url: str, blobs: Path, tensors: list, start: int, ready: int) -> None:
    catalog = Catalog(url, blobs)
    step = start
    while True:
        # The step says which tensors were written, so the check can compare contents.
        catalog.export_revision("acme", "pol", None, tensors[step % ADAPTERS], step)
        if step == start:
            # The first export paid for this engine's statement compilation; kill times are
            # drawn from here on, so they land in steady-state exports.
            os.write(ready, b"r")
        step += 1


def _run_child(url: str, blobs: Path, tensors: list, start: int, delay_s: float) -> int:
    ready, announce = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: export until the parent kills it
        code = 0
        try:
            os.close(ready)
            _export_until_killed(url, blobs, tensors, start, announce)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(announce)
    os.read(ready, 1)  # b"" if the child died first; its status tells why
    os.close(ready)
    time.sleep(delay_s)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return status


def test_sigkilled_exports_leave_whole_revisions_or_none(catalog: Catalog) -> None:
    """On SQLite and on PostgreSQL: the fixture's catalog has policy "pol" and no revisions."""
    url, blobs = catalog.engine.url.render_as_string(hide_password=False), catalog.blobs.root
    tensors = [make_tensors(seed) for seed in range(ADAPTERS)]
    catalog.export_revision("acme", "pol", None, tensors[0], 0)
    catalog.close()  # nothing of the database stays open across fork
    rng = random.Random(20261203)
    statuses = [
        _run_child(url, blobs, tensors, kill * 1000, rng.uniform(0.0, 0.1)) for kill in range(KILLS)
    ]
    # Every child died of the SIGKILL, none of an error of its own.
    assert [os.WTERMSIG(s) if os.WIFSIGNALED(s) else -1 for s in statuses] == [9] * KILLS
    check_catalog_is_whole(Catalog(url, blobs), tensors)


def check_catalog_is_whole(catalog: Catalog, tensors: list) -> None:
    try:
        revisions, total = catalog.list_revisions("acme", "pol", limit=10_000)
        assert total > KILLS, "every child commits one export before the kill can come"
        assert [r.number for r in revisions] == list(range(1, total + 1))
        assert [r.parent_number for r in revisions] == [None, *range(1, total)]
        assert catalog.aliases("acme", "pol") == {"latest": total}
        for revision in revisions:
            read = catalog.read_revision_tensors(revision)  # checks bytes against sha256
            expected = tensors[revision.step % len(tensors)]
            assert all(torch.equal(read[p][0], expected[p][0]) for p in expected)
            assert read_manifest(Path(revision.blob_path)).sha256 == revision.sha256
        report = catalog.collect_garbage(now=utc_now() + timedelta(hours=2))
        assert report.missing_blobs == []
        # Kills inside write_peft_folder leave staging folders; with 200 kills, always some.
        assert report.staging_removed != []
        assert list((catalog.blobs.root / "tmp").iterdir()) == []
        on_disk = {entry.key for entry in catalog.blobs.listing("revisions")}
        assert on_disk == {f"revisions/{r.sha256}" for r in revisions}
        assert catalog.collect_garbage(now=utc_now() + timedelta(hours=2)).deleted_blobs == []
    finally:
        catalog.close()
