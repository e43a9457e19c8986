"""Schema migrations: every catalog open upgrades its database to the newest revision.

Alembic runs programmatically from the migration scripts shipped inside the package, so no
alembic.ini is needed at run time. A database made by the round-one `create_all` (tables but
no `alembic_version`) is stamped at the initial revision first, then upgraded like any other.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from mint.catalog.engine import WRITE_OPTION

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
#: The first migration: the schema as round one's `create_all` made it.
INITIAL_REVISION = "0001"
#: PostgreSQL advisory lock id serialising migrations ("mint" in ASCII).
LOCK_KEY = 0x6D696E74


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the packaged migrations have a head"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade_to_head(engine: Engine) -> None:
    """Bring the catalog schema at `engine` to the newest migration (idempotent)."""
    if current_revision(engine) == head_revision():
        return  # the common case: one cheap read, no transaction that writes
    config = alembic_config()
    # Several processes may open a new catalog at once: hold a write lock while migrating
    # (SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction advisory lock), then look again.
    with engine.execution_options(**{WRITE_OPTION: True}).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        if MigrationContext.configure(connection).get_current_revision() == head_revision():
            return  # another process migrated it meanwhile
        config.attributes["connection"] = connection
        tables = set(inspect(connection).get_table_names())
        if "tenants" in tables and "alembic_version" not in tables:
            log.info("catalog made before migrations; stamping it at %s", INITIAL_REVISION)
            command.stamp(config, INITIAL_REVISION)
        command.upgrade(config, "head")
    log.info("catalog schema at %s", head_revision())
