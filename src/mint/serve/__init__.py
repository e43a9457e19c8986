"""The serve layer: the embedded sampling engine over a resident base."""

from mint.serve.engine import Engine
from mint.serve.types import (
    AdapterRef,
    SampledSequence,
    SampleRequest,
    SampleResult,
    SamplingParams,
)

__all__ = [
    "AdapterRef",
    "Engine",
    "SampleRequest",
    "SampleResult",
    "SampledSequence",
    "SamplingParams",
]
