"""Protobuf codec for the two binary parts of the Tinker wire protocol.

Requests of `forward_backward` arrive as `ForwardBackwardRequest` (optionally zstd); results of
forward/backward and sample futures leave as `ForwardBackwardOutput` / `SampleResponse`. The
message classes are the `tinker` package's own generated module, so the wire format cannot
drift from the SDK's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb

from mint.errors import MalformedRequest
from mint.serve.types import SampleResult
from mint.train.types import ForwardBackwardResult, TrainDatum

#: A sparse tensor's dense size is bounded, so a tiny body cannot ask for a huge allocation.
MAX_DENSE_ELEMENTS = 1 << 26

_NUMPY_BY_DTYPE = {
    pb.DTYPE_FLOAT32: np.float32,
    pb.DTYPE_INT64: np.int64,
    pb.DTYPE_INT32: np.int32,
}


@dataclass
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    data: list[TrainDatum]
    loss_fn: str
    loss_fn_config: dict[str, float | str]
    forward_only: bool


def _decompress(body: bytes, content_encoding: str | None) -> bytes:
    if content_encoding and "zstd" in content_encoding.lower():
        import zstandard

        try:
            return zstandard.ZstdDecompressor().decompressobj().decompress(body)
        except zstandard.ZstdError as error:
            raise MalformedRequest(f"forward_backward body is not valid zstd: {error}") from None
    return body


def _tensor_to_numpy(name: str, tensor: pb.Tensor) -> np.ndarray:
    np_dtype = _NUMPY_BY_DTYPE.get(tensor.dtype)
    if np_dtype is None:
        raise MalformedRequest(
            f"loss_fn_inputs[{name!r}] has dtype {tensor.dtype}; send float32 or int64"
        )
    shape = tuple(int(s) for s in tensor.shape)
    try:
        if tensor.WhichOneof("encoding") == "sparse_csr":
            return _csr_to_dense(tensor.sparse_csr, np_dtype, shape)
        flat = np.frombuffer(tensor.dense, dtype=np_dtype)
        return flat.reshape(shape).copy() if shape else flat.copy()
    except ValueError as error:
        raise MalformedRequest(
            f"loss_fn_inputs[{name!r}] does not fit shape {list(shape)}: {error}"
        ) from None


def _csr_to_dense(csr: pb.SparseCsr, np_dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    values: np.ndarray = np.frombuffer(csr.values, dtype=np_dtype)
    rows = np.frombuffer(csr.crow_indices, dtype=np.int64)
    cols = np.frombuffer(csr.col_indices, dtype=np.int64)
    return csr_to_dense(rows, cols, values, list(shape))


def csr_to_dense(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: list[int]
) -> np.ndarray:
    """Densify a sparse CSR tensor after checking it fits `shape`; ValueError if not."""
    if (
        len(shape) != 2
        or min(shape) < 0
        or len(rows) != shape[0] + 1
        or len(cols) != len(values)
        or rows[0] != 0
        or rows[-1] != len(values)
        or np.any(np.diff(rows) < 0)
        or np.any((cols < 0) | (cols >= shape[1]))
        or shape[0] * shape[1] > MAX_DENSE_ELEMENTS
    ):
        raise ValueError(
            "not a valid sparse CSR tensor: it needs a 2-D shape, shape[0]+1 non-decreasing "
            "row pointers from 0 to the value count, one in-range column index per value, and "
            f"at most {MAX_DENSE_ELEMENTS} elements once dense"
        )
    dense: np.ndarray = np.zeros(shape, dtype=values.dtype)
    for row in range(shape[0]):
        start, end = int(rows[row]), int(rows[row + 1])
        dense[row, cols[start:end]] = values[start:end]
    return dense


def _datum_tokens(index: int, datum: pb.Datum) -> np.ndarray:
    pieces = []
    for chunk in datum.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise MalformedRequest(
                f"datum {index} has a {kind!r} chunk; this server takes text tokens only"
            )
        pieces.append(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32))
    if not pieces:
        raise MalformedRequest(f"datum {index} has an empty model_input; send at least 1 token")
    return np.concatenate(pieces).astype(np.int64)


def decode_forward_backward(body: bytes, content_encoding: str | None) -> ForwardBackwardCall:
    message = pb.ForwardBackwardRequest()
    try:
        message.ParseFromString(_decompress(body, content_encoding))
    except DecodeError as error:
        raise MalformedRequest(
            f"forward_backward body is not a tinker_public.ForwardBackwardRequest protobuf "
            f"({error}); send it with the tinker SDK or its proto module"
        ) from None
    data = []
    for index, datum in enumerate(message.data):
        inputs = {
            name: _tensor_to_numpy(name, tensor) for name, tensor in datum.loss_fn_inputs.items()
        }
        data.append(TrainDatum(input_tokens=_datum_tokens(index, datum), loss_inputs=inputs))
    config: dict[str, float | str] = dict(message.loss_fn_config)
    for key, value in message.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof("value") == "text" else value.number
    return ForwardBackwardCall(
        model_id=message.model_id,
        seq_id=int(message.seq_id),
        data=data,
        loss_fn=message.loss_fn,
        loss_fn_config=config,
        forward_only=bool(message.forward_only),
    )


def _batched(
    arrays: list[np.ndarray], np_dtype: type, pb_dtype: pb.DType.ValueType
) -> pb.BatchedTensor:
    parts: list[np.ndarray] = [np.ascontiguousarray(a, dtype=np_dtype) for a in arrays]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([p.nbytes for p in parts])
    trailing = list(parts[0].shape[1:]) if parts and parts[0].ndim > 1 else []
    return pb.BatchedTensor(
        data=b"".join(p.tobytes() for p in parts),
        offsets=offsets.tobytes(),
        dtype=pb_dtype,
        trailing_shape=trailing,
    )


def encode_forward_backward(result: ForwardBackwardResult) -> bytes:
    names = sorted(result.outputs[0]) if result.outputs else []
    record = pb.ArrayRecord(type_tag="ArrayRecord", num_datums=len(result.outputs))
    for name in names:
        arrays = [output[name] for output in result.outputs]
        if np.issubdtype(arrays[0].dtype, np.integer):
            record.fields[name].CopyFrom(_batched(arrays, np.int64, pb.DTYPE_INT64))
        else:
            record.fields[name].CopyFrom(_batched(arrays, np.float32, pb.DTYPE_FLOAT32))
    message = pb.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord", loss_fn_outputs=[record], metrics=result.metrics
    )
    return message.SerializeToString()


_STOP_REASONS = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


def encode_sample(result: SampleResult) -> bytes:
    message = pb.SampleResponse()
    for sequence in result.sequences:
        message.sequences.append(
            pb.SampledSequence(
                stop_reason=_STOP_REASONS[sequence.stop_reason],
                tokens=np.asarray(sequence.tokens, dtype=np.int32).tobytes(),
                logprobs=np.asarray(sequence.logprobs, dtype=np.float32).tobytes(),
            )
        )
    if result.prompt_logprobs is not None:
        values = [np.nan if v is None else v for v in result.prompt_logprobs]
        message.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
    return message.SerializeToString()
