"""The serve layer: the embedded sampling engine over a resident base, its adapter tiers
(host cache, slot bank) and the cold loader between them."""

from mint.serve.config import EngineConfig
from mint.serve.engine import DecodeBatch, Engine, Tick
from mint.serve.types import (
    AdapterRef,
    SampledSequence,
    SampleRequest,
    SampleResult,
    SamplingParams,
)

__all__ = [
    "AdapterRef",
    "DecodeBatch",
    "Engine",
    "EngineConfig",
    "SampleRequest",
    "SampleResult",
    "SampledSequence",
    "SamplingParams",
    "Tick",
]
