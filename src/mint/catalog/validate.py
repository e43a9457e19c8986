"""Validation of an outside PEFT adapter folder against a policy's base and LoRA signature.

`validate_adapter` reads the folder once and reports every problem in one `InvalidAdapter`:
keys naming no module of the base, adapter names baked into keys, target modules that
disagree with the tensors or the policy, shapes that disagree with the base, a rank above the
limit, NaN or infinite values, a base id or fingerprint that does not match (in the manifest
or in `base_model_name_or_path`), full-weight `modules_to_save`, embedding
tensors whose rows differ from the vocabulary, and config settings mint cannot serve.
Config fields it does not know are kept and written back; they never fail an import.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from mint.catalog.peft_io import (
    CONFIG_FILE,
    KEY_PREFIX,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    RevisionManifest,
)
from mint.catalog.records import PolicyRecord
from mint.errors import InvalidAdapter
from mint.models.lora import MAX_RANK, AdapterTensors, LoraSignature

log = logging.getLogger(__name__)

#: Config fields mint writes itself on import (canonical values); all others are kept.
CANONICAL_FIELDS = frozenset(
    {
        "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
        "init_lora_weights", "lora_alpha", "lora_dropout", "modules_to_save", "peft_type",
        "r", "target_modules", "task_type", "use_dora", "use_rslora",
    }
)  # fmt: skip

#: Config settings that change what the adapter computes, with the values mint serves and
#: the remedy. An import with any other value is refused, naming the row.
NEUTRAL_SETTINGS: tuple[tuple[str, tuple[Any, ...], str], ...] = (
    ("bias", ("none", None), "mint adapts weights only; retrain with bias='none'"),
    ("use_dora", (False, None), "DoRA magnitudes are not served; retrain with plain LoRA"),
    ("use_rslora", (False, None), "rsLoRA scales by alpha/sqrt(r); retrain with alpha/r"),
    ("fan_in_fan_out", (False, None), "transposed (Conv1D) weights are not served"),
    ("rank_pattern", ({}, None), "per-module ranks are not served; use one rank"),
    ("alpha_pattern", ({}, None), "per-module alphas are not served; use one alpha"),
    ("lora_bias", (False, None), "LoRA bias terms are not served; retrain without them"),
    ("target_parameters", (None, []), "parameter (MoE expert) targets are not served here"),
    ("trainable_token_indices", (None,), "trainable token rows are not served"),
    ("layer_replication", (None,), "layer replication is not served"),
)

LORA_KEY = re.compile(
    r"^base_model\.model\.(?P<path>.+)\.lora_(?P<part>[AB])(?:\.(?P<name>[^.]+))?\.weight$"
)
EMBEDDING_KEY = re.compile(
    r"^base_model\.model\.(?P<path>.+)\.lora_embedding_(?P<part>[AB])(?:\.(?P<name>[^.]+))?$"
)
SAVED_SUFFIX = re.compile(r"\.modules_to_save(\.[^.]+)?$")
#: How many damaged tensors one problem names before it only counts the rest.
SHOWN_MODULES = 5
#: Module short names whose first dimension is the vocabulary.
VOCAB_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings")


class AdaptableBase(Protocol):
    """What validation needs of a base; a `ResidentBase` is one."""

    @property
    def base_id(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def layers(self) -> Mapping[str, Any]: ...

    @property
    def vocab_size(self) -> int: ...


@dataclass(frozen=True)
class ValidatedAdapter:
    """An adapter that passed validation: its tensors and what to keep of its metadata."""

    tensors: AdapterTensors
    #: adapter_config.json fields outside `CANONICAL_FIELDS`, written back on import.
    config_extra: dict[str, Any]
    #: mint_revision.json fields this mint does not know (empty without a manifest).
    manifest_extra: dict[str, Any]


def validate_adapter(
    folder: Path, base: AdaptableBase, policy: PolicyRecord, max_rank: int | None = None
) -> ValidatedAdapter:
    """Check the PEFT folder against `policy` on `base`; raise one `InvalidAdapter` listing
    every problem, or return the adapter."""
    limit = MAX_RANK if max_rank is None else max_rank
    signature = LoraSignature(policy.rank, policy.alpha, policy.target_modules)
    problems: list[str] = _base_problems(base, policy)
    config = _read_config(folder, problems)
    flat = _read_weights(folder, problems)
    raw_rank = config.get("r")
    rank = raw_rank if isinstance(raw_rank, int) and raw_rank > 0 else signature.rank
    problems += _config_problems(config, signature, limit, policy.policy_id)
    pairs = _key_problems(flat, base, problems)
    tensors = _pair_problems(pairs, base, rank, problems)
    problems += _finite_problems(tensors)
    problems += _base_name_problems(config, base)
    problems += _target_problems(config, pairs, base, signature, policy.policy_id)
    manifest_extra = _manifest_problems(folder, base, problems)
    if problems:
        raise InvalidAdapter(problems, subject=f"adapter folder {folder}")
    extra = {key: value for key, value in config.items() if key not in CANONICAL_FIELDS}
    return ValidatedAdapter(tensors, extra, manifest_extra)


def base_mismatch(
    base: AdaptableBase, base_id: str, fingerprint: str, owner: str, remedy: str
) -> list[str]:
    """The one rule for whether `owner` (a policy, a revision) belongs on `base`: the base id
    and the base fingerprint must both match. Empty when they do, else one problem naming
    both sides and `remedy`."""
    if (base.base_id, base.fingerprint) == (base_id, fingerprint):
        return []
    return [
        f"the base given is {base.base_id} ({base.fingerprint[:12]}) but {owner} is on "
        f"{base_id} ({fingerprint[:12]}); {remedy}"
    ]


def _base_problems(base: AdaptableBase, policy: PolicyRecord) -> list[str]:
    return base_mismatch(
        base,
        policy.base_id,
        policy.base_fingerprint,
        owner=f"policy {policy.policy_id!r}",
        remedy="pass the policy's own resident base",
    )


def _read_config(folder: Path, problems: list[str]) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG_FILE).read_bytes())
    except FileNotFoundError:
        problems.append(f"{CONFIG_FILE} is missing; a PEFT adapter folder needs it")
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problems.append(f"{CONFIG_FILE} is not JSON ({error}); re-save it with PEFT")
        return {}
    if not isinstance(config, dict):
        problems.append(f"{CONFIG_FILE} is not a JSON object; re-save it with PEFT")
        return {}
    return config


def _read_weights(folder: Path, problems: list[str]) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors((folder / WEIGHTS_FILE).read_bytes())
    except FileNotFoundError:
        problems.append(f"{WEIGHTS_FILE} is missing; only safetensors adapters are imported")
    except SafetensorError as error:
        problems.append(f"{WEIGHTS_FILE} is unreadable ({error}); the file is damaged")
    return {}


def _config_problems(
    config: dict[str, Any], signature: LoraSignature, limit: int, policy_id: str
) -> list[str]:
    if not config:
        return []
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; only 'LORA' is imported")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        problems.append(f"r is {rank!r}; it must be a positive integer")
    elif rank > limit:
        problems.append(f"rank r={rank} is above the limit {limit}; use a rank <= {limit}")
    elif rank != signature.rank:
        problems.append(
            f"rank r={rank} differs from policy {policy_id!r}'s rank {signature.rank}; "
            "import it into a policy with that rank"
        )
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or float(alpha) != float(signature.alpha):
        problems.append(
            f"lora_alpha {alpha!r} differs from policy {policy_id!r}'s alpha "
            f"{signature.alpha:g}; import it into a policy with that alpha"
        )
    saved = config.get("modules_to_save")
    if saved:
        problems.append(
            f"modules_to_save {saved!r} stores full weights; mint serves LoRA-only adapters, "
            "so retrain without modules_to_save"
        )
    for name, neutral, remedy in NEUTRAL_SETTINGS:
        if name in config and config[name] not in neutral:
            problems.append(f"{name} is {config[name]!r}; {remedy}")
    return problems


def _key_problems(
    flat: dict[str, torch.Tensor], base: AdaptableBase, problems: list[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """Sort keys into module path -> {"A": tensor, "B": tensor}, noting every bad key."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sorted(flat.items()):
        embedding = EMBEDDING_KEY.match(key)
        if embedding is not None:
            problems += _embedding_problems(key, embedding["part"], tensor, base)
            continue
        match = LORA_KEY.match(key)
        if match is None:
            problems += _full_weight_problems(key, tensor, base)
            continue
        if match["name"] is not None:
            problems.append(
                f"key {key!r} carries adapter name {match['name']!r}; PEFT saves keys without "
                f"it (...lora_{match['part']}.weight), so re-save with save_pretrained"
            )
        if match["path"] not in base.layers:
            problems.append(
                f"key {key!r} names module {match['path']!r}, which base {base.base_id} "
                "does not have (or mint cannot adapt); the adapter is for another base"
            )
            continue
        if not tensor.is_floating_point():
            problems.append(f"key {key!r} holds {tensor.dtype}, not a floating-point tensor")
            continue
        pairs.setdefault(match["path"], {})[match["part"]] = tensor
    return pairs


def _embedding_problems(
    key: str, part: str, tensor: torch.Tensor, base: AdaptableBase
) -> list[str]:
    problems = []
    # PEFT's embedding LoRA: A is [r, vocabulary], B is [hidden, r].
    rows = tensor.shape[1] if part == "A" and tensor.dim() == 2 else None
    if rows is not None and rows != base.vocab_size:
        problems.append(
            f"key {key!r} covers {rows} vocabulary rows but base {base.base_id} has "
            f"{base.vocab_size}; the adapter was trained on another tokenizer"
        )
    problems.append(f"key {key!r} adapts an embedding; mint adapts linear layers only")
    return problems


def _full_weight_problems(key: str, tensor: torch.Tensor, base: AdaptableBase) -> list[str]:
    if not key.startswith(KEY_PREFIX) or not key.endswith((".weight", ".bias")):
        return [f"key {key!r} is not a PEFT LoRA key ({KEY_PREFIX}<module>.lora_A.weight)"]
    # PEFT saves modules_to_save as `<module>.weight`, or `<module>.modules_to_save.<name>.weight`.
    module = SAVED_SUFFIX.sub("", key[len(KEY_PREFIX) :].rsplit(".", 1)[0])
    problems = [
        f"key {key!r} is a full weight of module {module!r} (modules_to_save); mint serves "
        "LoRA-only adapters, so retrain without modules_to_save"
    ]
    short = module.rsplit(".", 1)[-1]
    if short in VOCAB_MODULES and tensor.dim() >= 1 and tensor.shape[0] != base.vocab_size:
        problems.append(
            f"key {key!r} has {tensor.shape[0]} vocabulary rows but base {base.base_id} has "
            f"{base.vocab_size}; the adapter was trained on another tokenizer"
        )
    return problems


def _pair_problems(
    pairs: dict[str, dict[str, torch.Tensor]],
    base: AdaptableBase,
    rank: int,
    problems: list[str],
) -> AdapterTensors:
    tensors: AdapterTensors = {}
    for path, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            problems.append(f"module {path!r} has lora_{''.join(pair)} but not both A and B")
            continue
        layer = base.layers[path]
        want_a, want_b = (rank, layer.in_features), (layer.out_features, rank)
        got_a, got_b = tuple(pair["A"].shape), tuple(pair["B"].shape)
        if (got_a, got_b) != (want_a, want_b):
            problems.append(
                f"module {path!r} has A {got_a} and B {got_b}; base {base.base_id} at rank "
                f"{rank} needs A {want_a} and B {want_b}"
            )
            continue
        tensors[path] = (pair["A"], pair["B"])
    if not pairs and not problems:
        problems.append("the adapter holds no LoRA tensors")
    return tensors


def _finite_problems(tensors: AdapterTensors) -> list[str]:
    """NaN or infinite entries: served, they turn every sampled distribution into NaN."""
    bad = [
        f"{path} {part}"
        for path, pair in sorted(tensors.items())
        for part, tensor in zip("AB", pair, strict=True)
        if not bool(torch.isfinite(tensor).all())
    ]
    if not bad:
        return []
    shown = ", ".join(bad[:SHOWN_MODULES])
    more = f" and {len(bad) - SHOWN_MODULES} more" if len(bad) > SHOWN_MODULES else ""
    return [
        f"tensors {shown}{more} hold NaN or infinite values; the adapter is damaged (or its "
        "training diverged), so export it again from a finite training state"
    ]


def _base_name_problems(config: dict[str, Any], base: AdaptableBase) -> list[str]:
    """base_model_name_or_path must name the policy's base: its id, or a local folder of
    the same name. Another base with the same shapes would be accepted silently otherwise."""
    named = config.get("base_model_name_or_path")
    if named is None or named == "":
        return []
    short = base.base_id.rsplit("/", 1)[-1].lower()
    if isinstance(named, str) and (
        named == base.base_id or named.rstrip("/").rsplit("/", 1)[-1].lower() == short
    ):
        return []
    return [
        f"base_model_name_or_path {named!r} is not the policy's base {base.base_id}; import "
        "the adapter into a policy on the base it was trained on (or, if it was trained on "
        f"{base.base_id}, set base_model_name_or_path to {base.base_id!r})"
    ]


def _target_problems(
    config: dict[str, Any],
    pairs: dict[str, dict[str, torch.Tensor]],
    base: AdaptableBase,
    signature: LoraSignature,
    policy_id: str,
) -> list[str]:
    adapted = sorted({path.rsplit(".", 1)[-1] for path in pairs})
    problems = []
    declared = _declared_targets(config.get("target_modules"), base)
    if config and declared is None:
        problems.append(
            f"target_modules {config.get('target_modules')!r} is neither a list of module "
            "names nor a pattern; list the adapted module names"
        )
    elif declared is not None and adapted and declared != adapted:
        problems.append(
            f"adapter_config target_modules {declared} disagree with the tensors, which "
            f"adapt {adapted}; fix target_modules or the weights"
        )
    if adapted and adapted != sorted(signature.target_modules):
        problems.append(
            f"the tensors adapt {adapted} but policy {policy_id!r} targets "
            f"{sorted(signature.target_modules)}; import into a policy with those targets"
        )
    return problems


def _declared_targets(targets: Any, base: AdaptableBase) -> list[str] | None:
    """target_modules as sorted short names; a pattern string is matched as PEFT does."""
    if isinstance(targets, list) and all(isinstance(name, str) for name in targets):
        return sorted({name.rsplit(".", 1)[-1] for name in targets})
    if not isinstance(targets, str):
        return None
    if targets == "all-linear":
        return sorted({path.rsplit(".", 1)[-1] for path in base.layers})
    try:
        pattern = re.compile(targets)
    except re.error:
        return None
    return sorted({path.rsplit(".", 1)[-1] for path in base.layers if pattern.fullmatch(path)})


def _manifest_problems(folder: Path, base: AdaptableBase, problems: list[str]) -> dict[str, Any]:
    """Check mint_revision.json (when present) names this base; return its unknown fields."""
    path = folder / MANIFEST_FILE
    if not path.exists():
        return {}
    try:
        manifest = RevisionManifest.from_bytes(path.read_bytes())
    except (InvalidAdapter, ValueError, TypeError, KeyError) as error:
        problems.append(f"{MANIFEST_FILE} is unreadable ({error}); remove it or repair it")
        return {}
    if manifest.base_id != base.base_id:
        problems.append(
            f"{MANIFEST_FILE} names base {manifest.base_id!r} but the policy's base is "
            f"{base.base_id!r}; import it into a policy on {manifest.base_id}"
        )
    if manifest.base_fingerprint != base.fingerprint:
        problems.append(
            f"{MANIFEST_FILE} names base fingerprint {manifest.base_fingerprint[:12]}... but "
            f"base {base.base_id} here has {base.fingerprint[:12]}...; the adapter was "
            "trained on other weights, so retrain it on this base"
        )
    return dict(manifest.extra)
