"""Tensor (de)serialisation for the ``pirl.v1.Tensor`` message.

A tensor travels as ``dtype`` (a name from :data:`DTYPES`), ``shape`` (non-negative ints) and ``data``:
the elements in row-major (C) order as little-endian bytes. Decoding is plain byte reinterpretation
(``np.frombuffer``); nothing received is ever unpickled or ``torch.load``-ed.

Every malformed input raises :class:`WireError` (a ``ValueError``) whose message says what was wrong,
so a server can turn it into ``INVALID_ARGUMENT`` and keep serving.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pirl.v1 import pirl_pb2

__all__ = [
    "DTYPES",
    "MAX_NDIM",
    "WireError",
    "dtype_name",
    "from_tensor_msg",
    "sha256_hex",
    "spec_msg",
    "to_tensor_msg",
]

# wire name -> little-endian numpy dtype
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
MAX_NDIM = 32  # numpy itself allows 64; nothing in this project comes close


class WireError(ValueError):
    """A tensor message (or a value to be sent as one) is malformed or not what was expected."""


def _allowed() -> str:
    return ", ".join(DTYPES)


def dtype_name(dtype: Any) -> str:
    """The wire name of ``dtype`` (a wire name, numpy dtype / scalar type or torch dtype); WireError if not allowed."""
    if isinstance(dtype, str):
        if dtype in DTYPES:
            return dtype
        try:
            dt = np.dtype(dtype)
        except (TypeError, ValueError):
            raise WireError(f"unknown dtype {dtype!r} (allowed: {_allowed()})") from None
    elif type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype":
        name = str(dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise WireError(f"unsupported dtype {dtype} (allowed: {_allowed()})")
        return name
    else:
        try:
            dt = np.dtype(dtype)
        except (TypeError, ValueError):
            raise WireError(f"unknown dtype {dtype!r} (allowed: {_allowed()})") from None
    name = dt.name
    if name not in DTYPES:
        raise WireError(f"unsupported dtype {name!r} (allowed: {_allowed()})")
    return name


def _check_shape(shape: Sequence[int], what: str = "shape") -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) > MAX_NDIM:
        raise WireError(f"{what} has {len(shape)} dimensions (at most {MAX_NDIM})")
    out = []
    for i, d in enumerate(shape):
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise WireError(f"{what} {shape}: dimension {i} is {d!r}, not an int")
        if d < 0:
            raise WireError(f"{what} {shape}: dimension {i} is negative ({d})")
        out.append(int(d))
    return tuple(out)


def _to_numpy(value: Any) -> np.ndarray:
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if getattr(t, "is_conj", lambda: False)():
            t = t.resolve_conj()
        if getattr(t, "is_neg", lambda: False)():
            t = t.resolve_neg()
        try:
            return t.numpy()
        except TypeError as e:  # e.g. bfloat16 has no numpy dtype
            raise WireError(f"unsupported dtype {t.dtype} (allowed: {_allowed()})") from e
    return np.asarray(value)


def to_tensor_msg(value: Any) -> pirl_pb2.Tensor:
    """Encode a numpy array, torch tensor (any device; copied to CPU) or array-like as a ``Tensor``.

    The bytes are C-contiguous and little-endian whatever the input's layout or byte order.
    Raises WireError for a dtype that is not in :data:`DTYPES` (e.g. float16, bfloat16, object).
    """
    arr = _to_numpy(value)
    name = dtype_name(arr.dtype)
    _check_shape(arr.shape)
    # also fixes big-endian inputs; keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)
    arr = np.asarray(arr, dtype=DTYPES[name], order="C")
    return pirl_pb2.Tensor(dtype=name, shape=list(arr.shape), data=arr.tobytes(order="C"))


def _show_shape(shape: Sequence[int | None]) -> str:
    dims = ["?" if d is None else str(int(d)) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _shape_matches(shape: tuple[int, ...], expect: Sequence[int | None]) -> bool:
    expect = tuple(expect)
    if len(shape) != len(expect):
        return False
    return all(e is None or int(e) == d for d, e in zip(shape, expect, strict=True))


def from_tensor_msg(
    msg: pirl_pb2.Tensor,
    *,
    expect_dtype: Any = None,
    expect_shape: Sequence[int | None] | None = None,
    max_bytes: int | None = None,
) -> np.ndarray:
    """Decode a ``Tensor`` message into a new, writable numpy array (native byte order).

    ``expect_dtype`` / ``expect_shape`` (a ``None`` entry matches any size of that dimension) and
    ``max_bytes`` (limit on ``len(data)``) are checked before anything is copied. Raises WireError
    naming the problem: unknown dtype, bad or negative dimension, data length not matching the shape,
    dtype or shape not the expected one (naming both), tensor too large, bool bytes other than 0/1.
    """
    if not isinstance(msg, pirl_pb2.Tensor):
        raise WireError(f"expected a pirl.v1.Tensor message, got {type(msg).__name__}")
    name = msg.dtype
    if name not in DTYPES:
        shown = name if len(name) <= 32 else name[:32] + "..."
        raise WireError(
            f"unknown dtype {shown!r} (allowed: {_allowed()})"
            if name
            else f"tensor has no dtype (allowed: {_allowed()})"
        )
    shape = _check_shape(msg.shape)
    nbytes = len(msg.data)
    if max_bytes is not None and nbytes > max_bytes:
        raise WireError(f"tensor too large: {nbytes} bytes of data (limit {max_bytes})")
    if expect_dtype is not None:
        want = dtype_name(expect_dtype)
        if name != want:
            raise WireError(f"dtype mismatch: got {name}, expected {want}")
    if expect_shape is not None and not _shape_matches(shape, expect_shape):
        raise WireError(f"shape mismatch: got {shape}, expected {_show_shape(expect_shape)}")
    dt = DTYPES[name]
    expected = math.prod(shape) * dt.itemsize  # Python ints: no overflow
    if max_bytes is not None and expected > max_bytes:
        raise WireError(f"tensor too large: shape {shape} {name} needs {expected} bytes (limit {max_bytes})")
    if nbytes != expected:
        raise WireError(
            f"data length mismatch: len(data) = {nbytes} bytes, but shape {shape} {name} needs "
            f"prod(shape) * itemsize = {expected}"
        )
    if name == "bool":
        raw = np.frombuffer(msg.data, dtype=np.uint8)
        if raw.size and int(raw.max()) > 1:
            raise WireError("bool tensor holds bytes other than 0 and 1")
    arr = np.frombuffer(msg.data, dtype=dt).reshape(shape)
    return arr.astype(dt.newbyteorder("="), copy=True)


def spec_msg(dtype: Any, shape: Sequence[int]) -> pirl_pb2.TensorSpec:
    """A ``TensorSpec`` (dtype name and shape), validated like a tensor's."""
    return pirl_pb2.TensorSpec(dtype=dtype_name(dtype), shape=list(_check_shape(shape)))


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 digest of ``data`` (as used by ``Artifact.sha256``)."""
    return hashlib.sha256(data).hexdigest()
