"""Publish a provisioned base's config and tokenizer into the Hugging Face hub cache.

Clients written for hosted Tinker look a base's tokenizer up by its model id
(`AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")`; the tinker SDK's
`get_tokenizer`, the tinker-cookbook). With the files in the hub cache's own layout, that
lookup resolves offline (`HF_HUB_OFFLINE=1`) to mint's converted copy, and nothing of the
client has to change:

    $HF_HUB_CACHE/models--ORG--NAME/blobs/<sha256>            file contents
    $HF_HUB_CACHE/models--ORG--NAME/snapshots/<revision>/FILE  relative link to the blob
    $HF_HUB_CACHE/models--ORG--NAME/refs/main                   the revision

The revision is derived from the base fingerprint, so re-publishing the same base is a
no-op and a re-provisioned base gets a new snapshot. Weights are not published: they stay in
mint's bases folder, and clients only need the tokenizer and config.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

#: Files of a base folder that describe it without holding weights.
PUBLISHED_SUFFIXES = (".json", ".jinja", ".txt", ".model")
NOT_PUBLISHED = frozenset({"mint_base.json", "model.safetensors.index.json"})


def hub_cache_dir() -> Path:
    """The hub cache the Hugging Face libraries read: HF_HUB_CACHE, else HF_HOME/hub.

    Read from the environment at call time (huggingface_hub reads it once at import), so
    a command run with a different HF_HOME publishes where its clients will look.
    """
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_folder(cache_dir: Path, model_id: str) -> Path:
    if model_id.count("/") != 1:
        raise ValueError(f"model id {model_id!r} must look like ORG/NAME")
    return cache_dir / f"models--{model_id.replace('/', '--')}"


def published_files(base_folder: Path) -> list[Path]:
    return sorted(
        path
        for path in base_folder.iterdir()
        if path.is_file() and path.suffix in PUBLISHED_SUFFIXES and path.name not in NOT_PUBLISHED
    )


def publish_to_hub_cache(
    base_folder: Path, model_id: str, fingerprint: str, cache_dir: Path | None = None
) -> Path:
    """Write the base's tokenizer and config as snapshot `refs/main` of `model_id`.

    Returns the snapshot folder. Blobs are written under a temporary name and renamed, the
    snapshot is built beside its final name and renamed, and `refs/main` moves last, so a
    reader sees the old snapshot or the new one, never half of one.
    """
    repo = repo_folder(cache_dir or hub_cache_dir(), model_id)
    revision = fingerprint[:40]
    snapshot = repo / "snapshots" / revision
    for sub in ("blobs", "snapshots", "refs"):
        (repo / sub).mkdir(parents=True, exist_ok=True)
    if not snapshot.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{revision}-", dir=repo / "snapshots"))
        try:
            for source in published_files(base_folder):
                digest = _store_blob(repo / "blobs", source)
                (staging / source.name).symlink_to(Path("..", "..", "blobs", digest))
            os.replace(staging, snapshot)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _write_atomically(repo / "refs" / "main", revision)
    log.info("base %s published to the hub cache at %s", model_id, snapshot)
    return snapshot


def _store_blob(blobs: Path, source: Path) -> str:
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    target = blobs / digest
    if not target.exists():
        _write_atomically(target, data)
    return digest


def _write_atomically(target: Path, content: str | bytes) -> None:
    data = content.encode() if isinstance(content, str) else content
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
