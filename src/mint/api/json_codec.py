"""The JSON form of `forward_backward` and `forward` request bodies.

SDKs of the JSON era (0.22 and earlier, and later ones whose `client/config` leaves
`proto_write_fwdbwd` off) send these calls as JSON: `{"forward_backward_input" | "forward_input":
{"data": [Datum], "loss_fn", "loss_fn_config"}, "model_id", "seq_id"}`, where every
`loss_fn_inputs` value is a `TensorData` object (`data`, `dtype`, `shape`, optionally sparse
CSR indices). The result is the same `ForwardBackwardCall` the protobuf codec yields, so the
control plane never knows which encoding a client used.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mint.api.proto import ForwardBackwardCall, csr_to_dense
from mint.errors import MalformedRequest
from mint.train.types import TrainDatum

_NUMPY_BY_NAME = {"float32": np.float32, "int64": np.int64, "int32": np.int32}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TensorDataBody(_Lenient):
    data: list[float | int]
    dtype: str = "float32"
    shape: list[int] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None


class ChunkBody(_Lenient):
    type: str = "encoded_text"
    tokens: list[int] = Field(default_factory=list)


class ModelInputBody(_Lenient):
    chunks: list[ChunkBody] = Field(default_factory=list)


class DatumBody(_Lenient):
    model_input: ModelInputBody
    loss_fn_inputs: dict[str, TensorDataBody] = Field(default_factory=dict)


class PassInputBody(_Lenient):
    data: list[DatumBody]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, float | str] | None = None


class ForwardBackwardBody(_Lenient):
    model_id: str
    seq_id: int = 0
    forward_backward_input: PassInputBody | None = None
    forward_input: PassInputBody | None = None


def _tensor(name: str, body: TensorDataBody) -> np.ndarray:
    np_dtype = _NUMPY_BY_NAME.get(body.dtype)
    if np_dtype is None:
        raise MalformedRequest(
            f"loss_fn_inputs[{name!r}] has dtype {body.dtype!r}; send float32 or int64"
        )
    values = np.asarray(body.data, dtype=np_dtype)
    if body.sparse_crow_indices is not None:
        return _csr_to_dense(name, body, values)
    if body.shape is None:
        return values
    if int(np.prod(body.shape)) != values.size or any(s < 0 for s in body.shape):
        raise MalformedRequest(
            f"loss_fn_inputs[{name!r}]: {values.size} values do not fit shape {body.shape}"
        )
    return values.reshape(body.shape)


def _csr_to_dense(name: str, body: TensorDataBody, values: np.ndarray) -> np.ndarray:
    rows = np.asarray(body.sparse_crow_indices or [], dtype=np.int64)
    cols = np.asarray(body.sparse_col_indices or [], dtype=np.int64)
    try:
        return csr_to_dense(rows, cols, values, list(body.shape or []))
    except ValueError as error:
        raise MalformedRequest(f"loss_fn_inputs[{name!r}] is {error}") from None


def _datum(index: int, body: DatumBody) -> TrainDatum:
    tokens: list[int] = []
    for chunk in body.model_input.chunks:
        if chunk.type != "encoded_text":
            raise MalformedRequest(
                f"datum {index} has a {chunk.type!r} chunk; this server takes text tokens only"
            )
        tokens.extend(chunk.tokens)
    if not tokens:
        raise MalformedRequest(f"datum {index} has an empty model_input; send at least 1 token")
    inputs = {name: _tensor(name, t) for name, t in body.loss_fn_inputs.items()}
    return TrainDatum(input_tokens=np.asarray(tokens, dtype=np.int64), loss_inputs=inputs)


def decode_forward_backward_json(raw: bytes) -> ForwardBackwardCall:
    """Parse a JSON forward/backward (or forward) body; any flaw is a MalformedRequest."""
    try:
        body = ForwardBackwardBody.model_validate(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as error:
        raise MalformedRequest(
            f"forward_backward JSON body does not match the Tinker API ({error}); send "
            f'{{"model_id", "seq_id", "forward_backward_input": {{"data", "loss_fn"}}}}'
        ) from None
    forward_only = body.forward_backward_input is None
    pass_input = body.forward_backward_input or body.forward_input
    if pass_input is None:
        raise MalformedRequest(
            "forward_backward JSON body has neither forward_backward_input nor forward_input"
        )
    config: dict[str, Any] = dict(pass_input.loss_fn_config or {})
    try:
        data = [_datum(i, d) for i, d in enumerate(pass_input.data)]
    except (OverflowError, ValueError) as error:  # e.g. a token id beyond int64
        raise MalformedRequest(
            f"forward_backward JSON body has an unusable value: {error}"
        ) from None
    return ForwardBackwardCall(
        model_id=body.model_id,
        seq_id=body.seq_id,
        data=data,
        loss_fn=pass_input.loss_fn,
        loss_fn_config=config,
        forward_only=forward_only,
    )
