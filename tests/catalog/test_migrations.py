"""Alembic migrations: a migrated catalog has exactly the ORM's schema, on both backends."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from tests.catalog.conftest import empty_tables, make_tensors

from mint.catalog import Catalog
from mint.catalog.migrate import alembic_config, current_revision, head_revision
from mint.catalog.schema import Base


def test_migrated_schema_equals_the_orm_metadata(catalog: Catalog) -> None:
    with catalog.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    assert current_revision(catalog.engine) == head_revision() == "0004"


def test_reopening_a_migrated_catalog_changes_nothing(catalog: Catalog, catalog_url: str) -> None:
    catalog.close()
    again = Catalog(catalog_url, Path(catalog.blobs.root))
    try:
        assert current_revision(again.engine) == "0004"
        assert [p.policy_id for p in again.list_policies("acme")[0]] == ["pol"]
    finally:
        again.close()


def test_a_catalog_made_before_migrations_is_stamped_and_upgraded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        # What round one's create_all left: the tables and no version table.
        connection.execute(text("DROP TABLE alembic_version"))
        connection.execute(
            text("INSERT INTO tenants (name, created_at) VALUES ('acme', '2026-01-01 00:00:00')")
        )
        digest = hashlib.sha256(b"tml-old-key").hexdigest()
        connection.execute(
            text(
                "INSERT INTO api_keys (key_sha256, tenant_id, created_at) "
                f"VALUES ('{digest}', 1, '2026-01-01 00:00:00')"
            )
        )
    engine.dispose()
    catalog = Catalog(url, tmp_path / "blobs")
    try:
        assert current_revision(catalog.engine) == "0004"
        columns = {c["name"] for c in inspect(catalog.engine).get_columns("revisions")}
        assert "manifest_extra" in columns
        assert catalog.list_policies("acme") == ([], 0)  # the old tenant row is still there
        # A key issued before scopes existed keeps every scope; the tenant has no quota.
        grant = catalog.key_grant("tml-old-key")
        assert grant is not None and grant.tenant == "acme"
        assert (grant.scopes, grant.max_concurrent_jobs) == (None, None)
    finally:
        catalog.close()


def test_catalogs_opened_at_once_migrate_once(catalog_url: str, tmp_path: Path) -> None:
    engine = create_engine(catalog_url)
    with engine.begin() as connection:  # start from a database with no catalog at all
        for table in ("aliases", "revisions", "training_states", "policies", "api_keys",
                      "bases", "tenants", "alembic_version"):  # fmt: skip
            connection.execute(text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()
    opened: list[Catalog] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            opened.append(Catalog(catalog_url, tmp_path / "blobs"))
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(opened) == 4
    assert {current_revision(c.engine) for c in opened} == {"0004"}
    empty_tables(opened[0])
    for catalog in opened:
        catalog.close()


def test_revisions_from_before_the_load_check_keep_resolving_without_one(
    catalog: Catalog, catalog_url: str
) -> None:
    old = catalog.export_revision("acme", "pol", None, make_tensors(1), step=1)
    assert old.xxh3_128 is not None
    catalog.close()
    engine = create_engine(catalog_url)
    with engine.begin() as connection:  # the schema an older mint left, its rows kept
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0003")
        assert "xxh3_128" not in {
            column["name"] for column in inspect(connection).get_columns("revisions")
        }
    engine.dispose()
    again = Catalog(catalog_url, Path(catalog.blobs.root))
    try:
        assert current_revision(again.engine) == "0004"
        assert again.resolve("acme", "pol") == dataclasses.replace(old, xxh3_128=None)
        assert again.get_revision("acme", "pol", 1).xxh3_128 is None
        new = again.export_revision("acme", "pol", None, make_tensors(2), step=2)
        assert new.xxh3_128 is not None and again.resolve("acme", "pol", "2") == new
    finally:
        again.close()
