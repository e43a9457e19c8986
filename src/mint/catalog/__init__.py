"""The catalog layer: policy records in SQL and their bytes in a blob store.

Names load on first use, so a command that only needs `mint.catalog.gc` or `rules` (the
CLI's start-up, say) does not pay for importing torch and SQLAlchemy's ORM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mint.catalog.peft_io import read_peft_tensors, write_peft_folder
    from mint.catalog.records import CheckpointRecord, PolicyRecord, RevisionRecord
    from mint.catalog.store import Catalog

_HOMES = {
    "Catalog": "mint.catalog.store",
    "CheckpointRecord": "mint.catalog.records",
    "PolicyRecord": "mint.catalog.records",
    "RevisionRecord": "mint.catalog.records",
    "read_peft_tensors": "mint.catalog.peft_io",
    "write_peft_folder": "mint.catalog.peft_io",
}

__all__ = [
    "Catalog",
    "CheckpointRecord",
    "PolicyRecord",
    "RevisionRecord",
    "read_peft_tensors",
    "write_peft_folder",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'mint.catalog' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
