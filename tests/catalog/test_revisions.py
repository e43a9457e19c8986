"""Exports, revision numbers, lineage, aliases, rollback, resolve and deletion."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from tests.catalog.conftest import make_tensors

from mint.catalog import Catalog
from mint.catalog.peft_io import read_manifest
from mint.errors import AliasInUse, Conflict, NotFound, UserError


def export(catalog: Catalog, seed: int, name: str | None = None, step: int = 0) -> int:
    return catalog.export_revision("acme", "pol", name, make_tensors(seed), step).number


def test_export_writes_a_whole_revision_and_moves_latest(catalog: Catalog) -> None:
    first = catalog.export_revision("acme", "pol", None, make_tensors(0), step=3)
    assert (first.number, first.name, first.parent_number, first.step) == (1, "rev-1", None, 3)
    folder = Path(first.blob_path)
    assert folder.name == first.sha256 and folder.parent.name == "revisions"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "mint_revision.json",
    ]
    manifest = read_manifest(folder)
    assert (manifest.policy_id, manifest.number, manifest.step) == ("pol", 1, 3)
    assert (manifest.sha256, manifest.size_bytes) == (first.sha256, first.size_bytes)
    assert manifest.created_at == first.created_at
    assert catalog.aliases("acme", "pol") == {"latest": 1}
    second = catalog.export_revision("acme", "pol", "final", make_tensors(1), step=4)
    assert (second.number, second.name, second.parent_number) == (2, "final", 1)
    assert catalog.aliases("acme", "pol") == {"latest": 2}
    assert list((catalog.blobs.root / "tmp").iterdir()) == []


def test_identical_bytes_are_stored_once(catalog: Catalog) -> None:
    one = catalog.export_revision("acme", "pol", None, make_tensors(0), step=1)
    two = catalog.export_revision("acme", "pol", None, make_tensors(0), step=2)
    assert (one.number, two.number) == (1, 2)
    assert one.blob_path == two.blob_path
    assert len(list((catalog.blobs.root / "revisions").iterdir())) == 1
    assert read_manifest(Path(two.blob_path)).number == 1  # the first writer's manifest


def test_numbers_are_unique_under_concurrent_exports(catalog: Catalog) -> None:
    errors: list[BaseException] = []

    def run(worker: int) -> None:
        try:
            for round_ in range(2):
                export(catalog, seed=worker * 10 + round_)
        except BaseException as error:  # reported below, a thread must not swallow it
            errors.append(error)

    threads = [threading.Thread(target=run, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    revisions, total = catalog.list_revisions("acme", "pol")
    assert total == 16
    assert [r.number for r in revisions] == list(range(1, 17))
    # Exports are serialised, so lineage is one chain and `latest` is the last one.
    assert [r.parent_number for r in revisions] == [None, *range(1, 16)]
    assert len({r.sha256 for r in revisions}) == 16
    assert catalog.aliases("acme", "pol") == {"latest": 16}


WRITER_PROCESSES = 8
EXPORTS_PER_WRITER = 3


def _writer_process(url: str, blobs: Path, worker: int, start: int) -> None:
    """A forked child: open its own catalog, wait for the start signal, export, exit."""
    code = 1
    try:
        catalog = Catalog(url, blobs)
        os.read(start, 1)
        for round_ in range(EXPORTS_PER_WRITER):
            seed = 100 + worker * EXPORTS_PER_WRITER + round_
            catalog.export_revision("acme", "pol", None, make_tensors(seed), step=seed)
        catalog.close()
        code = 0
    finally:
        os._exit(code)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_writer_processes_get_gapless_unique_numbers(catalog: Catalog) -> None:
    """8 processes, each with its own engine, export into one policy at the same moment."""
    url, blobs = catalog.engine.url.render_as_string(hide_password=False), catalog.blobs.root
    catalog.close()  # nothing of the database stays open across fork
    start, go = os.pipe()
    children = []
    for worker in range(WRITER_PROCESSES):
        pid = os.fork()
        if pid == 0:
            os.close(go)
            _writer_process(url, blobs, worker, start)
        children.append(pid)
    os.close(start)
    os.write(go, b"g" * WRITER_PROCESSES)  # every child's read returns at once
    os.close(go)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert codes == [0] * WRITER_PROCESSES
    reopened = Catalog(url, blobs)
    try:
        revisions, total = reopened.list_revisions("acme", "pol")
        count = WRITER_PROCESSES * EXPORTS_PER_WRITER
        assert total == count
        assert [r.number for r in revisions] == list(range(1, count + 1))
        assert [r.parent_number for r in revisions] == [None, *range(1, count)]
        assert sorted(r.step for r in revisions) == list(range(100, 100 + count))
        assert reopened.aliases("acme", "pol") == {"latest": count}
    finally:
        reopened.close()


def test_rollback_moves_latest_back_and_resolve_follows(catalog: Catalog) -> None:
    for seed in range(3):
        export(catalog, seed)
    catalog.rollback("acme", "pol", 1)
    assert catalog.resolve("acme", "pol").number == 1
    assert catalog.aliases("acme", "pol") == {"latest": 1}
    branch = catalog.export_revision("acme", "pol", None, make_tensors(9), step=9)
    assert (branch.number, branch.parent_number) == (4, 1)
    with pytest.raises(NotFound) as caught:
        catalog.rollback("acme", "pol", 9)
    assert str(caught.value) == (
        "revision 9 of policy 'pol' not found; existing revisions are numbered 1..4 "
        "(4 revision(s)); list them with list_revisions"
    )
    assert catalog.aliases("acme", "pol") == {"latest": 4}


def test_resolve_by_alias_number_and_name(catalog: Catalog) -> None:
    export(catalog, 0, name="000010")
    export(catalog, 1, name="best")
    export(catalog, 2)
    catalog.set_alias("acme", "pol", "prod", 2)
    assert catalog.resolve("acme", "pol").number == 3
    assert catalog.resolve("acme", "pol", "prod").number == 2
    assert catalog.resolve("acme", "pol", "1").number == 1
    assert catalog.resolve("acme", "pol", "@2").number == 2
    assert catalog.resolve("acme", "pol", "000010").number == 1  # a name, not number 10
    assert catalog.resolve("acme", "pol", "best").name == "best"
    assert catalog.get_revision("acme", "pol", 3).name == "rev-3"
    with pytest.raises(NotFound) as caught:
        catalog.resolve("acme", "pol", "nope")
    assert str(caught.value) == (
        "revision 'nope' not found on policy 'pol': it is no alias (aliases: ['latest', "
        "'prod']), no revision number and no checkpoint name (existing revisions are "
        "numbered 1..3 (3 revision(s))); list them with list_revisions"
    )
    with pytest.raises(UserError, match=r"revision reference '@x' is not '@' and a number"):
        catalog.resolve("acme", "pol", "@x")


def test_resolve_on_a_policy_without_revisions(catalog: Catalog) -> None:
    with pytest.raises(NotFound, match="the policy has no revisions yet"):
        catalog.resolve("acme", "pol")


def test_delete_is_refused_while_aliased(catalog: Catalog) -> None:
    export(catalog, 0)
    export(catalog, 1, name="candidate")
    catalog.set_alias("acme", "pol", "prod", 2)
    with pytest.raises(AliasInUse) as caught:
        catalog.delete_checkpoint("acme", "pol", "sampler", "candidate")
    assert caught.value.code == "alias_in_use"
    assert str(caught.value) == (
        "revision 2 ('candidate') of policy 'pol' is what alias(es) 'latest', 'prod' point "
        "at; move them with rollback or set_alias (or delete_alias) before deleting it"
    )
    catalog.rollback("acme", "pol", 1)
    catalog.delete_alias("acme", "pol", "prod")
    catalog.delete_checkpoint("acme", "pol", "sampler", "candidate")
    assert [r.number for r in catalog.list_revisions("acme", "pol")[0]] == [1]
    with pytest.raises(NotFound, match="revision 2 of policy 'pol' not found"):
        catalog.get_revision("acme", "pol", 2)
    # The number of a deleted revision is never handed out again; its name is free again.
    assert export(catalog, 2, name="candidate") == 3


def test_duplicate_and_bad_names(catalog: Catalog) -> None:
    export(catalog, 0, name="final")
    with pytest.raises(Conflict) as caught:
        export(catalog, 1, name="final")
    assert str(caught.value) == (
        "sampler checkpoint 'final' exists already on policy 'pol'; names are unique per "
        "policy and kind, so choose another name"
    )
    assert list((catalog.blobs.root / "tmp").iterdir()) == []
    assert catalog.list_revisions("acme", "pol")[1] == 1
    bad = {
        "a/b": "contains '/'",
        "7": "is a plain number",
        "rev-3": "reserved for unnamed exports",
        "@x": "starts with '@'",
        "": "is empty",
    }
    for name, reason in bad.items():
        with pytest.raises(UserError, match=reason):
            export(catalog, 2, name=name)


def test_aliases_are_validated(catalog: Catalog) -> None:
    export(catalog, 0)
    with pytest.raises(UserError, match="alias '3x' is not a valid alias name"):
        catalog.set_alias("acme", "pol", "3x", 1)
    with pytest.raises(NotFound, match="revision 5 of policy 'pol' not found"):
        catalog.set_alias("acme", "pol", "prod", 5)
    with pytest.raises(UserError, match="alias 'latest' is kept by export"):
        catalog.delete_alias("acme", "pol", "latest")
    with pytest.raises(NotFound) as caught:
        catalog.delete_alias("acme", "pol", "prod")
    assert str(caught.value) == (
        "alias 'prod' not found on policy 'pol'; existing aliases: ['latest']"
    )


def test_a_failed_publish_leaves_no_revision(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(staged: Path, key: str) -> bool:
        raise OSError("disk went away")

    monkeypatch.setattr(catalog.blobs, "publish_folder", crash)
    with pytest.raises(OSError, match="disk went away"):
        export(catalog, 0)
    assert catalog.list_revisions("acme", "pol") == ([], 0)
    assert catalog.aliases("acme", "pol") == {}
    assert list((catalog.blobs.root / "tmp").iterdir()) == []
    assert list((catalog.blobs.root / "revisions").iterdir()) == []


def test_read_revision_tensors_refuses_damaged_bytes(catalog: Catalog) -> None:
    from mint.errors import MintError

    revision = catalog.export_revision("acme", "pol", None, make_tensors(0), step=0)
    config = Path(revision.blob_path) / "adapter_config.json"
    body = json.loads(config.read_text())
    body["r"] = 3
    config.write_text(json.dumps(body))
    with pytest.raises(MintError, match=r"do not match sha256 .*; the blob store is damaged"):
        catalog.read_revision_tensors(revision)


def test_resolve_follows_an_alias_another_catalog_moves(catalog: Catalog) -> None:
    """Nothing is cached: a move made through another engine is seen by the next lookup."""
    export(catalog, seed=0)
    export(catalog, seed=1)
    other = Catalog(catalog.engine.url.render_as_string(hide_password=False), catalog.blobs)
    try:
        other.set_alias("acme", "pol", "prod", 1)
        assert catalog.resolve("acme", "pol", "prod").number == 1
        other.set_alias("acme", "pol", "prod", 2)
        assert catalog.resolve("acme", "pol", "prod").number == 2
        other.rollback("acme", "pol", 1)
        assert catalog.resolve("acme", "pol").number == 1
    finally:
        other.close()


def test_resolve_survives_a_connection_the_server_dropped(catalog: Catalog) -> None:
    if catalog.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no server to drop a connection")
    from sqlalchemy import create_engine, text

    export(catalog, seed=0)
    assert catalog.resolve("acme", "pol").number == 1  # leaves one pooled connection
    lookups = catalog._lookups  # resolve's own pool
    assert lookups.pool.checkedin() == 1  # type: ignore[attr-defined]
    with lookups.connect() as connection:  # that same connection
        pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
    killer = create_engine(catalog.engine.url)
    with killer.connect() as connection:
        connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    killer.dispose()
    assert catalog.resolve("acme", "pol").number == 1  # fails once, retried on a new one
