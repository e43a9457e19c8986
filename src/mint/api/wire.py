"""JSON request bodies of the Tinker protocol, parsed leniently.

The SDK's own request models forbid unknown fields; a server must instead accept what older
and newer SDKs send, so these models ignore extra fields and default what may be absent.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CreateSession(Lenient):
    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, Any] = Field(default_factory=dict)
    sdk_version: str = ""
    project_id: str | None = None
    display_name: str | None = None


class FinishSession(Lenient):
    reason: dict[str, Any] = Field(default_factory=lambda: {"type": "success"})
    detail: str | None = None


class SessionRef(Lenient):
    session_id: str


class CreateModel(Lenient):
    session_id: str
    model_seq_id: int = 0
    base_model: str
    lora_config: dict[str, Any] = Field(default_factory=lambda: {"rank": 32})
    user_metadata: dict[str, str] | None = None


class ModelRef(Lenient):
    model_id: str


class OptimStep(Lenient):
    model_id: str
    seq_id: int = 0
    adam_params: dict[str, float] | None = None
    optimizer_params: dict[str, Any] | None = None


class SaveWeights(Lenient):
    model_id: str
    path: str | None = None
    seq_id: int = 0
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None


class SaveWeightsForSampler(Lenient):
    model_id: str
    path: str | None = None
    seq_id: int = 0
    sampling_session_seq_id: int | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] | None = None


class LoadWeights(Lenient):
    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: int = 0
    session_id: str | None = None
    model_seq_id: int | None = None


class CreateSamplingSession(Lenient):
    session_id: str
    sampling_session_seq_id: int = 0
    model_path: str | None = None
    base_model: str | None = None


class SamplingParamsBody(Lenient):
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


class Sample(Lenient):
    sampling_session_id: str | None = None
    seq_id: int | None = None
    num_samples: int = 1
    prompt: dict[str, Any]
    sampling_params: SamplingParamsBody = Field(default_factory=SamplingParamsBody)
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    base_model: str | None = None
    model_path: str | None = None


class RetrieveFuture(Lenient):
    request_id: str
    allow_metadata_only: bool = False


class CheckpointTtl(Lenient):
    ttl_seconds: int | None = None


class WeightsInfo(Lenient):
    tinker_path: str
