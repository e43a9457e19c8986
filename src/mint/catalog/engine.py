"""The SQL engine behind the catalog, with SQLite set up for many threads and no torn writes.

SQLite runs in WAL mode (readers never block the writer) with foreign keys on. Transactions
that write start with `BEGIN IMMEDIATE`: a deferred transaction that reads and then writes
can fail with "database is locked" when another writer committed in between, which the busy
timeout does not retry; taking the write lock up front turns that into a plain wait.

Lookups (`lookup_engine`) run one SELECT each without an explicit transaction: on SQLite no
BEGIN is issued; on PostgreSQL they get their own pool of autocommit connections, which
saves the BEGIN and COMMIT round trips, and which skips the pre-ping the main pool does on
every checkout (one more round trip). A lookup connection the server dropped fails once,
SQLAlchemy then discards that pool, and `Catalog` retries the lookup on a fresh connection.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)

#: Execution option marking an engine whose transactions write.
WRITE_OPTION = "mint_write"
#: Execution option marking an engine whose connections run single statements, no BEGIN.
SINGLE_STATEMENT_OPTION = "mint_single_statement"
SQLITE_BUSY_TIMEOUT_S = 30.0


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite URLs get WAL, foreign keys and immediate write locks."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    in_memory = url in ("sqlite://", "sqlite:///:memory:")
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
        # An in-memory database exists per connection, so all threads must share one.
        poolclass=StaticPool if in_memory else None,
    )
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    return engine


def lookup_engine(engine: Engine) -> Engine:
    """An engine on `engine`'s database for single-statement reads: no BEGIN, no COMMIT.

    SQLite shares `engine`'s pool (an in-memory database exists only there); PostgreSQL
    gets a pool of its own, so its connections can skip the pre-ping.
    """
    if engine.dialect.name == "sqlite":
        return engine.execution_options(**{SINGLE_STATEMENT_OPTION: True})
    return create_engine(engine.url, isolation_level="AUTOCOMMIT")


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself instead of the driver's implicit one.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


def _on_sqlite_begin(connection: Connection) -> None:
    options = connection.get_execution_options()
    if options.get(SINGLE_STATEMENT_OPTION, False):
        return  # SQLite reads one statement atomically without an explicit transaction
    writes = options.get(WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")
