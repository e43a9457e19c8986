"""The blob store: revision folders and training-state bytes under one root folder.

Every write is atomic: bytes go to a fresh name under `tmp/`, are fsynced (file and folder),
then renamed to their final, content-addressed key. A crash leaves at most an orphan under
`tmp/` or an unreferenced final blob, never a torn one; `Catalog.collect_garbage` sweeps both
once they are older than its grace period. A write that finds its key present already
refreshes the blob's modification time, so a collector never takes a blob that a record is
about to name. Paths go through fsspec's local filesystem so an object-store backend can take
its place; known shortcoming: rename and fsync are local-disk operations, so an S3 backend
will need its own publish step (a PUT is atomic per object, which replaces the rename).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec

log = logging.getLogger(__name__)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_folder(folder: Path) -> None:
    """Make a folder's entries (a created or renamed name) durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_durable(fs: fsspec.AbstractFileSystem, path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (the caller fsyncs the folder)."""
    with fs.open(str(path), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


class BlobStore:
    """Content-addressed blobs under `root`; keys are relative paths like `states/<sha256>`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.fs = fsspec.filesystem("file")
        for sub in ("tmp", "states", "revisions"):
            self.fs.makedirs(str(self.root / sub), exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(str(self.path(key))))

    def read_bytes(self, key: str) -> bytes:
        with self.fs.open(str(self.path(key)), "rb") as handle:
            return handle.read()

    def stage_folder(self) -> Path:
        """A fresh, empty folder under `tmp/` to build a blob folder in."""
        folder = self.root / "tmp" / uuid.uuid4().hex
        self.fs.makedirs(str(folder), exist_ok=False)
        return folder

    def discard(self, staged: Path) -> None:
        if self.fs.exists(str(staged)):
            self.fs.rm(str(staged), recursive=True)

    def publish_folder(self, staged: Path, key: str) -> bool:
        """Rename a complete, fsynced staged folder to `key`.

        Returns False when `key` exists already: it is content-addressed, so it holds the same
        adapter bytes and the staged copy is dropped (identical bytes are stored once).
        """
        final = self.path(key)
        fsync_folder(staged)
        try:
            # os.rename, not fs.mv: moving onto an existing folder must fail, not nest.
            os.rename(staged, final)
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            self.discard(staged)
            os.utime(final)  # young again: the record naming it commits next
            log.debug("blob %s exists already; staged copy dropped", key)
            return False
        fsync_folder(final.parent)
        return True

    def put_bytes(self, prefix: str, data: bytes) -> tuple[str, str]:
        """Store `data` at `<prefix>/<sha256>` atomically; return (key, sha256)."""
        digest = sha256_hex(data)
        key = f"{prefix}/{digest}"
        if self.exists(key):
            os.utime(self.path(key))  # young again: the record naming it commits next
            return key, digest
        staged = self.root / "tmp" / uuid.uuid4().hex
        try:
            write_durable(self.fs, staged, data)
            os.replace(staged, self.path(key))  # same bytes if another writer won the race
        finally:
            if staged.exists():
                staged.unlink()
        fsync_folder(self.path(key).parent)
        return key, digest

    def listing(self, prefix: str) -> list[BlobEntry]:
        """Every entry directly under `prefix/` (`revisions`, `states` or `tmp`)."""
        entries = []
        for child in sorted((self.root / prefix).iterdir()):
            stat = child.stat()
            size = stat.st_size
            if child.is_dir():
                size = sum(item.stat().st_size for item in child.rglob("*") if item.is_file())
            entries.append(BlobEntry(f"{prefix}/{child.name}", stat.st_mtime, size))
        return entries

    def remove(self, key: str) -> None:
        """Delete blob (file or folder) `key`; a folder goes in one rename, then is removed,
        so a crash never leaves a partial folder under its final name."""
        path = self.path(key)
        if path.is_dir():
            doomed = self.root / "tmp" / f"gc-{uuid.uuid4().hex}"
            os.rename(path, doomed)
            shutil.rmtree(doomed)
        elif path.exists():
            path.unlink()


@dataclass(frozen=True)
class BlobEntry:
    key: str
    modified: float
    size_bytes: int
