"""The PEFT serving layout of a revision: encode, write, read and validate adapter folders.

A revision folder holds exactly what PEFT and vLLM load, plus mint's own sidecar:

- `adapter_model.safetensors`: keys `base_model.model.<module path>.lora_A.weight` and
  `.lora_B.weight`, contiguous float32, sorted, metadata {"format": "pt"};
- `adapter_config.json`: PEFT's LoRA config, written with sorted keys and indent 2;
- `mint_revision.json`: the revision's provenance (see `RevisionManifest`).

The same tensors, signature and base id always give byte-identical adapter files, so the
revision digest (`adapter_digest`) is a content address: sha256 over the bytes of
adapter_model.safetensors followed by the bytes of adapter_config.json. Each revision also
records `load_digest`, xxh3_128 over the same bytes in the same order: a much faster check
the engine runs when it reads the files back from the blob store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol

import fsspec
import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mint.catalog.blobs import fsync_folder, write_durable
from mint.errors import InvalidAdapter
from mint.models.lora import AdapterTensors, LoraSignature

log = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "mint_revision.json"
KEY_PREFIX = "base_model.model."
# PEFT writes keys without the adapter name; imports saved by other tools may carry one
# (`lora_A.default.weight`), which is accepted and dropped.
KEY_PATTERN = re.compile(
    r"^base_model\.model\.(?P<path>.+)\.lora_(?P<part>[AB])(\.[^.]+)?\.weight$"
)


def encode_config(
    signature: LoraSignature, base_id: str, extra: Mapping[str, Any] | None = None
) -> bytes:
    """adapter_config.json bytes; sorted keys and fixed indent make them deterministic.

    `extra` holds fields an imported config carried that mint does not write itself; they
    are kept as they were, and mint's own fields win over them.
    """
    config: dict[str, Any] = dict(extra or {})
    config |= {
        "base_model_name_or_path": base_id,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": signature.alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": signature.rank,
        "target_modules": sorted(signature.target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    return (json.dumps(config, sort_keys=True, indent=2) + "\n").encode()


def encode_weights(tensors: AdapterTensors) -> bytes:
    """adapter_model.safetensors bytes: float32 host copies, keys sorted."""
    flat: dict[str, torch.Tensor] = {}
    for path, (a, b) in tensors.items():
        for part, tensor in (("A", a), ("B", b)):
            # copy=True: safetensors refuses tensors sharing storage, and the caller's
            # tensors may be views into a trainer's buffers.
            host = tensor.detach().to(device="cpu", dtype=torch.float32, copy=True)
            flat[f"{KEY_PREFIX}{path}.lora_{part}.weight"] = host.contiguous()
    return save_safetensors(dict(sorted(flat.items())), metadata={"format": "pt"})


class Hasher(Protocol):
    def update(self, data: Any, /) -> None: ...

    def hexdigest(self) -> str: ...


#: The digests kept of a revision's files, by name: sha256 is its content address,
#: xxh3_128 its load check.
DIGESTS: dict[str, Callable[[], Hasher]] = {
    "sha256": hashlib.sha256,
    "xxh3_128": xxhash.xxh3_128,
}


def files_digest(name: str, weights: Any, config: bytes) -> str:
    """Digest `name` of a revision's files: over the weights bytes, then the config bytes."""
    digest = DIGESTS[name]()
    digest.update(weights)
    digest.update(config)
    return digest.hexdigest()


def adapter_digest(weights: bytes, config: bytes) -> str:
    """The revision's content address: sha256(weights bytes, then config bytes)."""
    return files_digest("sha256", weights, config)


def load_digest(weights: bytes, config: bytes) -> str:
    """The revision's load check: xxh3_128(weights bytes, then config bytes), hex."""
    return files_digest("xxh3_128", weights, config)


def folder_digest(folder: Path) -> tuple[str, int]:
    """(sha256, size in bytes) of the adapter files in `folder`, as `adapter_digest` counts."""
    sha256, _, size = folder_digests(folder)
    return sha256, size


def folder_digests(folder: Path) -> tuple[str, str, int]:
    """(sha256, xxh3_128, size in bytes) of the adapter files in `folder`: the content
    address, the load check, and the bytes both count."""
    weights = (folder / WEIGHTS_FILE).read_bytes()
    config = (folder / CONFIG_FILE).read_bytes()
    return adapter_digest(weights, config), load_digest(weights, config), len(weights) + len(config)


def write_peft_folder(
    folder: Path,
    tensors: AdapterTensors,
    signature: LoraSignature,
    base_id: str,
    config_extra: Mapping[str, Any] | None = None,
) -> None:
    """Write the two PEFT files into the existing `folder`, each fsynced, then the folder."""
    check_tensors(tensors, signature)
    fs = fsspec.filesystem("file")
    write_durable(fs, folder / WEIGHTS_FILE, encode_weights(tensors))
    write_durable(fs, folder / CONFIG_FILE, encode_config(signature, base_id, config_extra))
    fsync_folder(folder)


def check_tensors(tensors: AdapterTensors, signature: LoraSignature) -> None:
    """Refuse tensors that do not fit `signature`, listing every problem at once."""
    problems: list[str] = []
    rank = signature.rank
    if not tensors:
        problems.append("no module tensors given")
    for path, (a, b) in sorted(tensors.items()):
        short = path.rsplit(".", 1)[-1]
        if short not in signature.target_modules:
            problems.append(
                f"module {path!r} is not a target (targets: {sorted(signature.target_modules)})"
            )
        if a.dim() != 2 or b.dim() != 2:
            problems.append(f"module {path!r} needs 2-D A and B, got {a.dim()}-D and {b.dim()}-D")
            continue
        if a.shape[0] != rank or b.shape[1] != rank:
            problems.append(
                f"module {path!r} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                f"rank {rank} needs A [{rank}, in] and B [out, {rank}]"
            )
    if problems:
        raise InvalidAdapter(problems, subject="adapter tensors")


def read_peft_tensors(folder: Path) -> tuple[AdapterTensors, dict[str, Any]]:
    """Read a PEFT LoRA folder into host (CPU) tensors and its adapter_config.json dict.

    The catalog is the outermost adapter tier: tensors land in host memory, and the engine
    or trainer moves them to its base's device and dtype.
    """
    files = {}
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        try:
            files[name] = (folder / name).read_bytes()
        except FileNotFoundError:
            raise InvalidAdapter([f"{name} is missing in {folder}"]) from None
    return decode_peft(files[WEIGHTS_FILE], files[CONFIG_FILE], folder)


def decode_peft(
    weights: bytes, config_bytes: bytes, folder: Path
) -> tuple[AdapterTensors, dict[str, Any]]:
    """Tensors and config from the two files' bytes; `folder` only names them in errors."""
    config = decode_config(config_bytes, folder)
    try:
        flat = load_safetensors(weights)
    except SafetensorError as error:
        raise InvalidAdapter([f"{WEIGHTS_FILE} in {folder} is unreadable: {error}"]) from None
    return split_tensors(flat, int(config["r"]), folder), config


def decode_config(data: bytes, folder: Path) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidAdapter([f"{CONFIG_FILE} in {folder} is not JSON: {error}"]) from None
    if not isinstance(config, dict):
        raise InvalidAdapter([f"{CONFIG_FILE} in {folder} is not a JSON object"])
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; only 'LORA' is supported")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        problems.append(f"r is {config.get('r')!r}; it must be a positive integer")
    if problems:
        raise InvalidAdapter(problems, subject=f"adapter config in {folder}")
    return config


def split_tensors(flat: dict[str, torch.Tensor], rank: int, folder: Path) -> AdapterTensors:
    """Pair safetensors keys into module path -> (A, B), checking names and shapes."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in flat.items():
        match = KEY_PATTERN.match(key)
        if match is None:
            problems.append(
                f"key {key!r} is not a PEFT LoRA key ({KEY_PREFIX}<module>.lora_A.weight)"
            )
            continue
        parts.setdefault(match["path"], {})[match["part"]] = tensor
    tensors: AdapterTensors = {}
    for path, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            problems.append(
                f"module {path!r} has lora_{''.join(sorted(pair))} but not both A and B"
            )
            continue
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            problems.append(
                f"module {path!r} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                f"config r={rank} needs A [{rank}, in] and B [out, {rank}]"
            )
            continue
        tensors[path] = (a, b)
    if problems:
        raise InvalidAdapter(problems, subject=f"adapter weights in {folder}")
    return tensors


@dataclass(frozen=True)
class RevisionManifest:
    """mint_revision.json: where a revision's bytes came from.

    Fields this version does not know are kept in `extra` and written back unchanged, so an
    older reader never drops what a newer writer recorded.
    """

    base_id: str
    base_fingerprint: str
    policy_id: str
    number: int
    parent_number: int | None
    step: int
    created_at: datetime
    sha256: str
    size_bytes: int
    layout: str = "peft"
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = (
        "base_id", "base_fingerprint", "policy_id", "number", "parent_number", "step",
        "created_at", "sha256", "size_bytes", "layout",
    )  # fmt: skip

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = dict(self.extra)
        body.update({name: getattr(self, name) for name in self.KNOWN})
        body["created_at"] = self.created_at.isoformat()
        return (json.dumps(body, sort_keys=True, indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> RevisionManifest:
        body = json.loads(data)
        missing = [name for name in cls.KNOWN if name not in body and name != "layout"]
        if missing:
            raise InvalidAdapter([f"{MANIFEST_FILE} lacks {', '.join(missing)}"])
        known = {name: body.pop(name) for name in cls.KNOWN if name in body}
        known["created_at"] = datetime.fromisoformat(known["created_at"])
        return cls(**known, extra=body)


def read_manifest(folder: Path) -> RevisionManifest:
    try:
        return RevisionManifest.from_bytes((folder / MANIFEST_FILE).read_bytes())
    except FileNotFoundError:
        raise InvalidAdapter([f"{MANIFEST_FILE} is missing in {folder}"]) from None
