"""The blob stores, local folder and S3-compatible object store alike: bytes in and out,
identical bytes stored once, nothing visible before it is whole, orphans collected, and
export then import through either store.

The object store is a moto S3 server this module starts on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from tests.catalog.conftest import BASE_ID, FINGERPRINT, SIGNATURE, make_tensors

from mint.catalog import Catalog
from mint.catalog.blobs import FOLDER_MARKER, BlobStore, ObjectBlobStore, open_blob_store
from mint.catalog.schema import utc_now
from mint.errors import MintError, NotFound

LATER = timedelta(hours=2)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the local server, with credentials that server accepts."""
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "mint-test"),
        ("AWS_SECRET_ACCESS_KEY", "mint-test-secret"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(name, value)
    bucket = f"mint-{uuid.uuid4().hex[:12]}"
    store = open_blob_store(Path("/nonexistent-unused"), f"s3://{bucket}", s3_endpoint)
    assert isinstance(store, ObjectBlobStore)
    store.remote.mkdir(bucket)
    return f"s3://{bucket}/catalog"


@pytest.fixture(params=["local", "s3"])
def blob_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_store(kind: str, cache: Path, request: pytest.FixtureRequest) -> BlobStore:
    if kind == "local":
        return open_blob_store(cache)
    url: str = request.getfixturevalue("s3_url")
    endpoint: str = request.getfixturevalue("s3_endpoint")
    return open_blob_store(cache, url, endpoint)


@pytest.fixture
def catalog(blob_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Catalog]:
    store = Catalog(
        f"sqlite:///{tmp_path / 'catalog.db'}", make_store(blob_kind, tmp_path / "cache", request)
    )
    store.ensure_tenant("acme")
    store.record_base(BASE_ID, FINGERPRINT)
    store.create_policy("acme", "pol", BASE_ID, FINGERPRINT, SIGNATURE)
    yield store
    store.close()


def keys(store: BlobStore, prefix: str) -> list[str]:
    return [entry.key for entry in store.listing(prefix)]


def same_tensors(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(
        torch.equal(left[p][0], right[p][0]) and torch.equal(left[p][1], right[p][1]) for p in left
    )


def test_put_and_get(catalog: Catalog) -> None:
    payload = bytes(range(256)) * 40
    state = catalog.save_training_state("acme", "pol", "s1", payload, step=3)
    assert state.sha256 == hashlib.sha256(payload).hexdigest()
    assert catalog.read_training_state("acme", "pol", "s1") == payload
    assert catalog.blobs.read_bytes(f"states/{state.sha256}") == payload
    revision = catalog.export_revision("acme", "pol", None, make_tensors(1), step=3)
    assert same_tensors(catalog.read_revision_tensors(revision), make_tensors(1))
    assert catalog.blobs.exists(f"revisions/{revision.sha256}")


def test_identical_bytes_are_stored_once(catalog: Catalog) -> None:
    one = catalog.export_revision("acme", "pol", None, make_tensors(1), step=1)
    two = catalog.export_revision("acme", "pol", None, make_tensors(1), step=2)
    three = catalog.export_revision("acme", "pol", None, make_tensors(2), step=3)
    assert (one.number, two.number, three.number) == (1, 2, 3)
    assert one.sha256 == two.sha256 != three.sha256
    assert keys(catalog.blobs, "revisions") == sorted(
        [f"revisions/{one.sha256}", f"revisions/{three.sha256}"]
    )
    catalog.save_training_state("acme", "pol", "a", b"same", step=1)
    catalog.save_training_state("acme", "pol", "b", b"same", step=2)
    assert keys(catalog.blobs, "states") == [f"states/{hashlib.sha256(b'same').hexdigest()}"]


def test_an_object_store_revision_is_fetched_and_checked_by_a_fresh_cache(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    writer = Catalog(url, make_store("s3", tmp_path / "cache-a", request))
    writer.ensure_tenant("acme")
    writer.record_base(BASE_ID, FINGERPRINT)
    writer.create_policy("acme", "pol", BASE_ID, FINGERPRINT, SIGNATURE)
    written = writer.export_revision("acme", "pol", None, make_tensors(4), step=1)
    writer.close()
    reader = Catalog(url, make_store("s3", tmp_path / "cache-b", request))
    try:
        found = reader.resolve("acme", "pol")
        assert Path(found.blob_path).parent.parent == (tmp_path / "cache-b").resolve()
        assert (Path(found.blob_path) / FOLDER_MARKER).exists()  # fetched on resolve
        assert same_tensors(reader.read_revision_tensors(found), make_tensors(4))
        # Damage in the object store is caught before anything reaches the cache.
        assert isinstance(reader.blobs, ObjectBlobStore)
        weights = f"revisions/{written.sha256}/adapter_model.safetensors"
        reader.blobs.remote.pipe_file(reader.blobs._remote(weights), b"not the weights")
        reader.blobs.remove_cached(f"revisions/{written.sha256}")
        with pytest.raises(MintError, match="does not match its sha256"):
            reader.resolve("acme", "pol")
        assert not Path(found.blob_path).exists()
    finally:
        reader.close()


def test_an_upload_cut_short_is_never_visible(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = catalog.blobs
    if not isinstance(store, ObjectBlobStore):
        pytest.skip("the local folder's rename is covered by the SIGKILL crash test")
    upload = store.remote.pipe_file

    def cut_before_marker(path: str, data: bytes, **kwargs: object) -> None:
        if path.endswith(FOLDER_MARKER):
            raise ConnectionError("upload cut short")
        upload(path, data, **kwargs)

    monkeypatch.setattr(store.remote, "pipe_file", cut_before_marker)
    with pytest.raises(ConnectionError):
        catalog.export_revision("acme", "pol", None, make_tensors(5), step=1)
    monkeypatch.setattr(store.remote, "pipe_file", upload)
    assert catalog.list_revisions("acme", "pol") == ([], 0)
    with pytest.raises(NotFound):
        catalog.resolve("acme", "pol")
    digest = catalog.export_revision("acme", "pol", None, make_tensors(6), step=1).sha256
    partial = [key for key in keys(store, "revisions") if key != f"revisions/{digest}"]
    assert len(partial) == 1 and not store.exists(partial[0])  # weights, config, no marker
    # The same bytes exported again are uploaded whole, not taken for a finished folder.
    again = catalog.export_revision("acme", "pol", None, make_tensors(5), step=2)
    assert f"revisions/{again.sha256}" == partial[0] and store.exists(partial[0])
    store.remove_cached(partial[0])
    assert same_tensors(catalog.read_revision_tensors(again), make_tensors(5))


def test_gc_removes_orphans_and_keeps_what_records_name(catalog: Catalog) -> None:
    kept = catalog.export_revision("acme", "pol", None, make_tensors(1), step=1)
    catalog.save_training_state("acme", "pol", "s1", b"kept state", step=1)
    orphan_state, _ = catalog.blobs.put_bytes("states", b"nobody names me")
    orphan = catalog.export_revision("acme", "pol", "gone", make_tensors(2), step=2)
    catalog.rollback("acme", "pol", kept.number)
    catalog.delete_checkpoint("acme", "pol", "sampler", "gone")
    staged = catalog.blobs.stage_folder()
    (staged / "adapter_model.safetensors").write_bytes(b"half")
    assert catalog.collect_garbage().deleted_blobs == []  # everything is inside the grace
    report = catalog.collect_garbage(now=utc_now() + LATER)
    assert report.deleted_blobs == sorted([orphan_state, f"revisions/{orphan.sha256}"])
    assert report.staging_removed == [f"tmp/{staged.name}"]
    assert report.missing_blobs == []
    assert keys(catalog.blobs, "revisions") == [f"revisions/{kept.sha256}"]
    assert keys(catalog.blobs, "states") == [f"states/{hashlib.sha256(b'kept state').hexdigest()}"]
    assert not Path(orphan.blob_path).exists()  # the cached copy went too
    assert catalog.read_training_state("acme", "pol", "s1") == b"kept state"
    assert same_tensors(catalog.read_revision_tensors(kept), make_tensors(1))


def test_export_then_import_through_the_store(
    catalog: Catalog, tiny_base: object, tmp_path: Path
) -> None:
    from tests.catalog.test_import import SIGNATURE as IMPORT_SIGNATURE
    from tests.catalog.test_import import adapter_files, tiny_tensors

    from mint.models.base import ResidentBase

    assert isinstance(tiny_base, ResidentBase)
    catalog.record_base(tiny_base.base_id, tiny_base.fingerprint)
    for policy in ("imp", "other"):
        catalog.create_policy(
            "acme", policy, tiny_base.base_id, tiny_base.fingerprint, IMPORT_SIGNATURE
        )
    first = catalog.export_revision("acme", "imp", None, tiny_tensors(tiny_base, 1), 5)
    catalog.export_folder("acme", "imp", None, tmp_path / "one")
    imported = catalog.import_revision("acme", "other", tmp_path / "one", tiny_base, step=5)
    catalog.export_folder("acme", "other", "1", tmp_path / "two")
    assert adapter_files(tmp_path / "one") == adapter_files(tmp_path / "two")
    assert imported.sha256 == first.sha256
    assert keys(catalog.blobs, "revisions") == [f"revisions/{first.sha256}"]


def test_configuration_picks_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mint.config import Settings

    monkeypatch.delenv("MINT_BLOB_URL", raising=False)
    local = Settings(home=tmp_path, device="cpu").blob_store()
    assert type(local) is BlobStore and local.root == (tmp_path / "blobs").resolve()
    monkeypatch.setenv("MINT_BLOB_URL", "s3://mint-bucket/catalog")
    monkeypatch.setenv("MINT_BLOB_ENDPOINT_URL", "http://127.0.0.1:9")
    remote = Settings(home=tmp_path, device="cpu").blob_store()
    assert isinstance(remote, ObjectBlobStore)
    assert (remote.url, remote.remote_root) == ("s3://mint-bucket/catalog", "mint-bucket/catalog")
    assert remote.remote.endpoint_url == "http://127.0.0.1:9"  # type: ignore[attr-defined]
    assert remote.root == (tmp_path / "blobs").resolve()  # the local cache
