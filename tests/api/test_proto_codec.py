"""Malformed protobuf tensors are refused as bad requests (the fuzz run found a 500 here)."""

from __future__ import annotations

import numpy as np
import pytest
from tinker.proto import tinker_public_pb2 as pb

from mint.api.proto import decode_forward_backward
from mint.errors import MalformedRequest


def _request(csr: pb.SparseCsr, shape: list[int]) -> bytes:
    message = pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    datum = message.data.add()
    datum.model_input.add().encoded_text.tokens = np.asarray([1, 2], np.int32).tobytes()
    tensor = datum.loss_fn_inputs["weights"]
    tensor.dtype = pb.DTYPE_FLOAT32
    tensor.shape.extend(shape)
    tensor.sparse_csr.CopyFrom(csr)
    return message.SerializeToString()


def _csr(values: list[float], rows: list[int], cols: list[int]) -> pb.SparseCsr:
    return pb.SparseCsr(
        values=np.asarray(values, np.float32).tobytes(),
        crow_indices=np.asarray(rows, np.int64).tobytes(),
        col_indices=np.asarray(cols, np.int64).tobytes(),
    )


@pytest.mark.parametrize(
    ("csr", "shape"),
    [
        (_csr([], [], []), [2, 2]),  # no row pointers at all (was an IndexError, a 500)
        (_csr([1.0], [0, 1, 5], [0]), [2, 2]),  # row pointer past the values
        (_csr([1.0], [0, 1, 1], [7]), [2, 2]),  # column out of range
        (_csr([1.0], [0, 1], [0]), [3]),  # not 2-D
        (_csr([1.0], [0, 1], [0]), [1, 1 << 40]),  # a huge dense size from a tiny body
    ],
)
def test_bad_sparse_tensors_are_malformed_requests(csr: pb.SparseCsr, shape: list[int]) -> None:
    with pytest.raises(MalformedRequest, match="not a valid sparse CSR tensor"):
        decode_forward_backward(_request(csr, shape), None)


def test_good_sparse_tensor_is_densified() -> None:
    call = decode_forward_backward(_request(_csr([0.5, 2.0], [0, 1, 2], [1, 0]), [2, 2]), None)
    np.testing.assert_array_equal(call.data[0].loss_inputs["weights"], [[0, 0.5], [2.0, 0]])
