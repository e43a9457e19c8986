"""Alembic environment for the catalog, run only through `mint.catalog.migrate`.

The caller hands over an open connection in `config.attributes["connection"]`; there is no
URL and no offline (SQL script) mode, because the catalog always migrates a live database.
"""

from __future__ import annotations

from alembic import context

from mint.catalog.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "catalog migrations run through mint.catalog.migrate.upgrade_to_head, which passes "
        "a connection; do not call the alembic command line on this folder"
    )
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most columns; batch mode rebuilds the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
