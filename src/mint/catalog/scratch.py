"""Throw-away PostgreSQL schemas for tests and benchmarks, so runs never see each other.

`scratch_schema(url)` creates a uniquely named schema, yields a URL whose connections use it
(through libpq's `options=-csearch_path=...`), and drops it with everything in it after.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

#: The PostgreSQL that tests and `mint bench catalog` use unless MINT_TEST_POSTGRES_URL says.
DEFAULT_TEST_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def with_search_path(url: str, schema: str) -> str:
    """`url` with its connections' search_path set to `schema`."""
    parsed = make_url(url)
    return parsed.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )


@contextmanager
def scratch_schema(url: str, prefix: str = "mint_scratch") -> Iterator[str]:
    """A fresh schema on the PostgreSQL at `url`; yields a URL scoped to it."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        log.debug("scratch schema %s created", schema)
        yield with_search_path(url, schema)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
        log.debug("scratch schema %s dropped", schema)
