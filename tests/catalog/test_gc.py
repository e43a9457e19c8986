"""The garbage collector, on hand-made orphans and expired checkpoints."""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from pathlib import Path

from tests.catalog.conftest import make_tensors

from mint.catalog import Catalog
from mint.catalog.gc import GcReport
from mint.catalog.schema import utc_now

HOUR = timedelta(hours=1)


def age(path: Path, seconds: float) -> None:
    """Backdate `path` by `seconds` so it is past the grace period."""
    moment = path.stat().st_mtime - seconds
    os.utime(path, (moment, moment))


def test_orphans_go_and_referenced_blobs_stay(catalog: Catalog) -> None:
    kept = catalog.export_revision("acme", "pol", None, make_tensors(0), 1)
    state = catalog.save_training_state("acme", "pol", "s1", b"state-bytes", 1)
    root = catalog.blobs.root
    orphan_revision = root / "revisions" / ("f" * 64)
    orphan_revision.mkdir()
    (orphan_revision / "adapter_model.safetensors").write_bytes(b"x" * 100)
    orphan_state = root / "states" / ("e" * 64)
    orphan_state.write_bytes(b"y" * 10)
    staging = catalog.blobs.stage_folder()
    (staging / "adapter_model.safetensors").write_bytes(b"z" * 7)
    young_orphan = root / "states" / ("d" * 64)
    young_orphan.write_bytes(b"w")
    for path in (orphan_revision, orphan_state, staging, Path(kept.blob_path)):
        age(path, 7200)
    report = catalog.collect_garbage()
    assert report == GcReport(
        deleted_blobs=[f"revisions/{'f' * 64}", f"states/{'e' * 64}"],
        staging_removed=[f"tmp/{staging.name}"],
        bytes_freed=117,
    )
    assert not orphan_revision.exists() and not orphan_state.exists() and not staging.exists()
    assert young_orphan.exists()  # inside the grace period: an export may be committing it
    assert catalog.read_training_state("acme", "pol", "s1") == b"state-bytes"
    assert catalog.read_revision_tensors(kept).keys() == make_tensors(0).keys()
    assert state.sha256 == hashlib.sha256(b"state-bytes").hexdigest()
    assert catalog.collect_garbage(now=utc_now() + HOUR) == GcReport(
        deleted_blobs=[f"states/{'d' * 64}"], bytes_freed=1
    )


def test_expired_checkpoints_go_unless_an_alias_holds_them(catalog: Catalog) -> None:
    first = catalog.export_revision("acme", "pol", "one", make_tensors(0), 1, ttl_seconds=60)
    catalog.export_revision("acme", "pol", "two", make_tensors(1), 2, ttl_seconds=60)
    catalog.export_revision("acme", "pol", "three", make_tensors(2), 3)
    catalog.set_alias("acme", "pol", "prod", 2)
    catalog.save_training_state("acme", "pol", "old", b"old", 1, ttl_seconds=60)
    catalog.save_training_state("acme", "pol", "new", b"new", 2, ttl_seconds=7200)
    later = utc_now() + timedelta(minutes=2)
    report = catalog.collect_garbage(now=later)
    assert report.expired_states == ["pol/old"]
    assert report.expired_revisions == ["pol/1"]
    assert report.kept_by_alias == ["pol/2"]
    assert report.deleted_blobs == []  # the blobs are still young
    assert [r.number for r in catalog.list_revisions("acme", "pol")[0]] == [2, 3]
    names = [c.name for c in catalog.list_checkpoints("acme", "pol")[0]]
    assert sorted(names) == ["new", "three", "two"]
    report = catalog.collect_garbage(now=later + 2 * HOUR)
    assert report.expired_states == ["pol/new"]
    assert report.deleted_blobs == sorted(
        [f"revisions/{first.sha256}", *(f"states/{c}" for c in _state_digests(b"old", b"new"))]
    )
    assert report.missing_blobs == []


def _state_digests(*payloads: bytes) -> list[str]:
    return [hashlib.sha256(p).hexdigest() for p in payloads]


def test_a_record_whose_blob_vanished_is_reported(catalog: Catalog) -> None:
    revision = catalog.export_revision("acme", "pol", None, make_tensors(0), 1)
    catalog.blobs.remove(f"revisions/{revision.sha256}")
    report = catalog.collect_garbage()
    assert report.missing_blobs == [f"revisions/{revision.sha256}"]
