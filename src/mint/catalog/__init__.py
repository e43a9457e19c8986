"""The catalog layer: policy records in SQL and their bytes in a blob store."""

from mint.catalog.peft_io import read_peft_tensors, write_peft_folder
from mint.catalog.records import CheckpointRecord, PolicyRecord, RevisionRecord
from mint.catalog.store import Catalog

__all__ = [
    "Catalog",
    "CheckpointRecord",
    "PolicyRecord",
    "RevisionRecord",
    "read_peft_tensors",
    "write_peft_folder",
]
