"""The blob store: revision folders and training-state bytes, content-addressed.

Keys are relative paths like `states/<sha256>` and `revisions/<sha256>` (a folder of the
PEFT files), so identical bytes are stored once. Two homes, chosen by configuration
(`open_blob_store`):

- `BlobStore`, a local folder (the default). Every write is atomic: bytes go to a fresh name
  under `tmp/`, are fsynced (file and folder), then renamed to their final key.
- `ObjectBlobStore`, any fsspec object store (S3-compatible through s3fs at scale). A PUT is
  atomic per object, which replaces the rename; a revision folder's manifest is uploaded
  last and marks the folder complete. Readers get the files from a local cache folder,
  filled on first use and checked against the sha256 before it is renamed into place; the
  cache never goes stale because a key's bytes never change.

A crash leaves at most an orphan (a staging folder under `tmp/`, an unreferenced or
incomplete blob), never a torn blob under a name a record uses; `Catalog.collect_garbage`
sweeps them once they are older than its grace period. A write that finds its key present
refreshes the blob's modification time, so a collector never takes a blob that a record is
about to name.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from mint.errors import MintError

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


#: Under a revision key, the file uploaded last: its presence means the folder is complete.
FOLDER_MARKER = "mint_revision.json"
#: The files a revision folder's sha256 covers, in hashing order (see peft_io).
DIGESTED_FILES = ("adapter_model.safetensors", "adapter_config.json")


class BlobStore:
    """Content-addressed blobs in the local folder `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.fs = fsspec.filesystem("file")
        for sub in ("tmp", "states", "revisions"):
            self.fs.makedirs(str(self.root / sub), exist_ok=True)

    def path(self, key: str) -> Path:
        """Where blob `key` is (or, for an object store, will be cached) on local disk."""
        return self.root / key

    def local_folder(self, key: str, sha256: str) -> Path:
        """The local folder holding revision blob `key` (the object store fetches it)."""
        return self.path(key)

    def describe(self) -> str:
        return str(self.root)

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


class ObjectBlobStore(BlobStore):
    """Content-addressed blobs in the fsspec object store at `url` (e.g. `s3://bucket/mint`).

    The local folder `cache_root` holds staging folders and the read cache of revision
    folders; the object store is where blobs live. Listings are never cached, so objects
    written or deleted by other processes are seen at once.
    """

    def __init__(
        self, url: str, cache_root: Path, storage_options: dict[str, Any] | None = None
    ) -> None:
        super().__init__(cache_root)
        options = {"use_listings_cache": False, "skip_instance_cache": True}
        options.update(storage_options or {})
        self.url = url
        self.remote, root = fsspec.core.url_to_fs(url, **options)
        self.remote_root = str(root).rstrip("/")

    def describe(self) -> str:
        return self.url

    def _remote(self, key: str) -> str:
        return f"{self.remote_root}/{key}"

    def _marker(self, key: str) -> str:
        return self._remote(f"{key}/{FOLDER_MARKER}")

    def exists(self, key: str) -> bool:
        """A revision folder exists once its marker does; a half-uploaded one does not."""
        if key.startswith("revisions/"):
            return bool(self.remote.exists(self._marker(key)))
        return bool(self.remote.exists(self._remote(key)))

    def read_bytes(self, key: str) -> bytes:
        return bytes(self.remote.cat_file(self._remote(key)))

    def publish_folder(self, staged: Path, key: str) -> bool:
        """Upload a complete staged folder to `key`, the marker last, and keep the staged
        copy as the local cache. False when the folder was complete there already."""
        if self.exists(key):
            self._refresh(self._marker(key))
            super().publish_folder(staged, key)  # cached copy (or dropped if one exists)
            log.debug("blob %s exists already in %s; not uploaded again", key, self.url)
            return False
        names = sorted(child.name for child in staged.iterdir() if child.name != FOLDER_MARKER)
        for name in [*names, FOLDER_MARKER]:
            self.remote.pipe_file(self._remote(f"{key}/{name}"), (staged / name).read_bytes())
        super().publish_folder(staged, key)
        return True

    def put_bytes(self, prefix: str, data: bytes) -> tuple[str, str]:
        """Store `data` at `<prefix>/<sha256>` with one PUT (atomic per object)."""
        digest = sha256_hex(data)
        key = f"{prefix}/{digest}"
        if self.remote.exists(self._remote(key)):
            self._refresh(self._remote(key))
            return key, digest
        self.remote.pipe_file(self._remote(key), data)
        return key, digest

    def local_folder(self, key: str, sha256: str) -> Path:
        """The cached copy of revision folder `key`, downloaded and checked on first use."""
        folder = self.path(key)
        if folder.is_dir():
            return folder
        if not self.exists(key):
            raise MintError(
                f"revision blob {key} is missing or incomplete in {self.url}; the blob store "
                "is damaged, restore it"
            )
        staged = self.stage_folder()
        try:
            for remote_path in self.remote.ls(self._remote(key), detail=False):
                name = str(remote_path).rstrip("/").rsplit("/", 1)[-1]
                write_durable(self.fs, staged / name, bytes(self.remote.cat_file(remote_path)))
            digest = hashlib.sha256()
            for name in DIGESTED_FILES:
                digest.update((staged / name).read_bytes())
            if digest.hexdigest() != sha256:
                raise MintError(
                    f"revision blob {key} in {self.url} does not match its sha256 {sha256}; "
                    "the blob store is damaged, restore it"
                )
            super().publish_folder(staged, key)
        finally:
            self.discard(staged)
        log.debug("revision blob %s cached from %s", key, self.url)
        return folder

    def listing(self, prefix: str) -> list[BlobEntry]:
        """Entries under `prefix/`: staging (`tmp`) is local, blobs are in the object store.
        A revision folder's time is its newest object's, its size the sum of them."""
        if prefix == "tmp":
            return super().listing(prefix)
        newest: dict[str, float] = {}
        sizes: dict[str, int] = {}
        base = self._remote(prefix) + "/"
        for path, info in self.remote.find(self._remote(prefix), detail=True).items():
            relative = str(path)[len(base) :] if str(path).startswith(base) else None
            if not relative:
                continue
            key = f"{prefix}/{relative.split('/', 1)[0]}"
            newest[key] = max(newest.get(key, 0.0), self._modified(str(path), info))
            sizes[key] = sizes.get(key, 0) + int(info.get("size") or 0)
        return [BlobEntry(key, newest[key], sizes[key]) for key in sorted(newest)]

    def remove(self, key: str) -> None:
        """Delete blob `key` and its cached copy; a folder's marker goes first, so a
        half-deleted folder already counts as absent."""
        if key.startswith("revisions/"):
            if self.remote.exists(self._marker(key)):
                self.remote.rm(self._marker(key))
            if self.remote.exists(self._remote(key)):
                self.remote.rm(self._remote(key), recursive=True)
        elif self.remote.exists(self._remote(key)):
            self.remote.rm(self._remote(key))
        super().remove(key)

    def remove_cached(self, key: str) -> None:
        """Drop the local cached copy of `key` only (it is fetched again on next use)."""
        super().remove(key)

    def _refresh(self, path: str) -> None:
        """Make an existing object young again (its modification time is now)."""
        if hasattr(self.remote, "setxattr"):  # s3fs: a server-side copy onto itself
            self.remote.setxattr(path, mint_refreshed=f"{time.time():.6f}")
        else:
            self.remote.pipe_file(path, self.remote.cat_file(path))

    def _modified(self, path: str, info: dict[str, Any]) -> float:
        stamp = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
        if stamp is None:
            stamp = self.remote.modified(path)
        return float(stamp.timestamp() if hasattr(stamp, "timestamp") else stamp)


def open_blob_store(
    cache_root: Path, url: str | None = None, endpoint_url: str | None = None
) -> BlobStore:
    """The blob store configuration asks for: the local folder `cache_root` when `url` is
    empty, else the object store at `url` (`endpoint_url` for S3-compatible servers)."""
    if not url:
        return BlobStore(cache_root)
    options: dict[str, Any] = {}
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    return ObjectBlobStore(url, cache_root, options)
