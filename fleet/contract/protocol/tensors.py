"""Tensors on the wire: raw little-endian bytes in C order, with dtype and shape in the header,
never JSON lists of floats."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from fleet.contract.errors import ProtocolError

MAX_TENSOR_DIMS = 8
# One dimension at most: a frame holds 4 MiB, so no real tensor comes near it.
MAX_DIM = 1 << 24
WIRE_DTYPES = frozenset({"float32", "float16", "float64", "uint8", "int8", "int16", "int32",
                         "int64"})


def narrow(x: np.ndarray) -> np.ndarray:
    """A float tensor whose values are all integers in 0..255 (pixels, counts) as uint8: the
    same values in a quarter of the bytes. Anything else as it is."""
    if x.dtype.kind != "f" or x.size == 0 or x.size > 1 << 20:
        return x
    u = x.astype(np.uint8)
    return u if np.array_equal(u, x) else x


def tensor_header(x: np.ndarray) -> dict[str, Any]:
    return {"dtype": x.dtype.name, "shape": list(x.shape)}


def tensor_bytes(x: np.ndarray) -> bytes:
    if x.dtype.byteorder in "=|<" and sys.byteorder == "little" and x.flags.c_contiguous:
        return x.tobytes()  # already little-endian and in C order: the common case, no copy
    return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()


def decode_tensor(spec: Any, body: bytes) -> np.ndarray:
    if not isinstance(spec, dict):
        raise ProtocolError("tensor spec must be an object with dtype and shape")
    dtype, shape = spec.get("dtype"), spec.get("shape")
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise ProtocolError(f"tensor dtype {str(dtype)[:40]!r} is not one of "
                            f"{sorted(WIRE_DTYPES)}", "field")
    if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM
                       for s in shape)):
        raise ProtocolError(f"tensor shape {str(shape)[:80]} must be a list of at most "
                            f"{MAX_TENSOR_DIMS} integers in [0, {MAX_DIM}]", "field")
    dt = np.dtype(dtype).newbyteorder("<")
    need = dt.itemsize
    for s in shape:  # Python integers: a product of huge dimensions cannot wrap around
        need *= s
    if need != len(body):
        raise ProtocolError(f"tensor {dtype}{shape} needs {need} bytes, body has {len(body)}")
    return np.frombuffer(body, dtype=dt).reshape(shape).astype(dt.newbyteorder("="), copy=False)

