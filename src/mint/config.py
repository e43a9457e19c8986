"""Server settings, read once from the environment (prefix `MINT_`) or given explicitly."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mint.catalog.blobs import BlobStore


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    # bf16 is the production default on GPUs; on CPUs fp32 is far faster (and exact).
    return "bfloat16" if device.startswith("cuda") else "float32"


@dataclass
class Settings:
    """Where mint keeps its data and how it places bases on devices."""

    home: Path = field(default_factory=lambda: Path(os.environ.get("MINT_HOME", "~/.mint")))
    device: str = field(default_factory=lambda: os.environ.get("MINT_DEVICE", ""))
    dtype: str = field(default_factory=lambda: os.environ.get("MINT_DTYPE", ""))
    #: Bases loaded at start-up (public ids or short names); others load on first use.
    preload_bases: list[str] = field(default_factory=list)
    #: How long a `retrieve_future` poll is held open before answering "try again".
    long_poll_s: float = 25.0
    #: Torch intra-op threads; 0 keeps torch's default.
    torch_threads: int = field(default_factory=lambda: int(os.environ.get("MINT_THREADS", "0")))
    #: Padded tokens per training forward/backward pass; bigger jobs run as several passes
    #: whose gradients add up. Peak host memory grows with it (activations kept for backward):
    #: on SmolLM2 with 2 CPU threads a 4,600-token job peaked at +6.1 GB with 2,048-token
    #: passes and +1.9 GB with 512, and ran no slower. GPUs want larger passes.
    train_pass_tokens: int = field(
        default_factory=lambda: int(os.environ.get("MINT_TRAIN_PASS_TOKENS", "512"))
    )
    #: Seconds open requests get to finish once the server is told to stop (SIGTERM).
    shutdown_grace_s: int = field(
        default_factory=lambda: int(os.environ.get("MINT_SHUTDOWN_GRACE_S", "10"))
    )
    #: Sessions without a heartbeat for this long are reaped.
    session_timeout_s: float = 300.0
    #: A client's job waits at most this long for an earlier seq_id that never arrives.
    seq_gap_timeout_s: float = 30.0
    #: How often idle sessions are reaped and seq gaps checked.
    housekeeping_interval_s: float = 2.0

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser()
        if not self.device:
            self.device = default_device()
        if not self.dtype:
            self.dtype = default_dtype(self.device)
        if self.train_pass_tokens < 1:
            raise ValueError(
                f"MINT_TRAIN_PASS_TOKENS is {self.train_pass_tokens}; it must be at least 1 "
                "(512 suits CPUs; GPUs take several thousand)"
            )
        if self.long_poll_s <= 0:
            raise ValueError(f"long_poll_s must be positive, got {self.long_poll_s}")

    @property
    def bases_dir(self) -> Path:
        return self.home / "bases"

    @property
    def blobs_dir(self) -> Path:
        return self.home / "blobs"

    @property
    def blob_url(self) -> str:
        """Where blobs live: empty for the local `blobs_dir`, else an fsspec URL such as
        `s3://bucket/prefix` (then `blobs_dir` is the local cache)."""
        return os.environ.get("MINT_BLOB_URL", "")

    @property
    def blob_endpoint_url(self) -> str:
        """The S3-compatible server's URL when it is not AWS (credentials come from the
        usual AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables)."""
        return os.environ.get("MINT_BLOB_ENDPOINT_URL", "")

    def blob_store(self) -> BlobStore:
        from mint.catalog.blobs import open_blob_store

        return open_blob_store(self.blobs_dir, self.blob_url, self.blob_endpoint_url)

    @property
    def catalog_url(self) -> str:
        return os.environ.get("MINT_CATALOG_URL", f"sqlite:///{self.home / 'catalog.db'}")

    @property
    def tenants_file(self) -> Path:
        return self.home / "tenants.json"
