"""msgpack codec for tensors and messages.

Tensors travel as ``{name: {"dtype": str, "shape": [int], "data": bytes}}`` in little-endian
byte order. Decoding is zero-copy: the arrays returned are read-only views on the message body
(``numpy.frombuffer``), so a 4 MiB update costs one msgpack parse and no copy. Callers that need
to write must copy (the aggregator's fold accumulates into its own float64 buffer anyway).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from fedmq.shared.errors import CodecError, MalformedMessageError

Weights = dict[str, np.ndarray]

#: dtypes a tensor may have on the wire, by their wire name.
DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint16": np.dtype("<u2"),  # bfloat16 updates: the upper 16 bits of each float32 (shared/compression.py)
}
_WIRE_NAME = {dt: name for name, dt in DTYPES.items()}


def _wire_dtype(arr: np.ndarray) -> str:
    name = _WIRE_NAME.get(arr.dtype.newbyteorder("<"))
    if name is None:
        raise CodecError(f"dtype {arr.dtype} cannot travel; use one of {sorted(DTYPES)}")
    return name


def encode_tensors(weights: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Map each array to its wire form; order of `weights` is kept.

    ``data`` is a byte view on the array (no copy): pack the result before changing the arrays.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, arr in weights.items():
        arr = np.asarray(arr)
        wire = _wire_dtype(arr)
        # not ascontiguousarray: it turns a 0-d array into shape (1,)
        arr = np.asarray(arr, dtype=DTYPES[wire], order="C")
        # a byte view, not arr.tobytes(): msgpack copies the view once into the body, while an
        # extra 4 MB bytes object made packing ~30x slower (BENCHMARKS.md, "Codec")
        data = arr.data.cast("B") if arr.size else b""
        out[name] = {"dtype": wire, "shape": list(arr.shape), "data": data}
    return out


#: bounds checked before anything is allocated: a site chooses every byte of an update
MAX_TENSORS = 4096
MAX_NAME_LEN = 256
MAX_NDIM = 16
MAX_ELEMENTS = 2**34
_SPEC_KEYS = frozenset({"dtype", "shape", "data"})


def _shape(name: str, raw: Any) -> tuple[int, ...]:
    """Exact non-negative ints only: a float dimension is not truncated, a bool is not 0/1."""
    if not isinstance(raw, list | tuple):
        raise CodecError(f"tensor {name!r}: bad or missing shape (a {type(raw).__name__}, not a list)")
    if len(raw) > MAX_NDIM:
        raise CodecError(f"tensor {name!r}: {len(raw)} dimensions, at most {MAX_NDIM}")
    for d in raw:
        if type(d) is not int:
            raise CodecError(f"tensor {name!r}: bad or missing shape (dimension {d!r} is not an int)")
        if d < 0:
            raise CodecError(f"tensor {name!r}: negative dimension in shape {list(raw)}")
    shape = tuple(raw)
    # max(d, 1): numpy refuses [0, 2**62, 2**62] too, although it holds no element; Python ints
    # cannot overflow, whatever the dimensions
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise CodecError(f"tensor {name!r}: shape {list(shape)} has more than {MAX_ELEMENTS} elements")
    return shape


def decode_tensors(raw: Any) -> Weights:
    """Inverse of `encode_tensors`; rejects anything whose bytes do not match dtype x shape.

    Every check runs before numpy sees the bytes, so no hostile shape can make it allocate."""
    if not isinstance(raw, Mapping):
        raise CodecError(f"tensor map must be a map, got {type(raw).__name__}")
    if len(raw) > MAX_TENSORS:
        raise CodecError(f"tensor map has {len(raw)} tensors, at most {MAX_TENSORS}")
    out: Weights = {}
    for name, spec in raw.items():
        if not isinstance(name, str) or not isinstance(spec, Mapping):
            raise CodecError(f"tensor entry {_short(name)} is not name -> map")
        if not 0 < len(name) <= MAX_NAME_LEN:
            raise CodecError(f"tensor name of {len(name)} characters (1-{MAX_NAME_LEN})")
        if set(spec) != _SPEC_KEYS:
            raise CodecError(f"tensor {name!r}: bad or missing dtype/shape/data (keys {_short(list(spec))})")
        wire, data = spec["dtype"], spec["data"]
        if not isinstance(wire, str) or wire not in DTYPES:
            raise CodecError(f"tensor {name!r}: bad or missing dtype {_short(wire)} (one of {sorted(DTYPES)})")
        dtype = DTYPES[wire]
        shape = _shape(name, spec["shape"])
        if not isinstance(data, bytes | bytearray | memoryview):  # memoryview: encode_tensors' own output
            raise CodecError(f"tensor {name!r}: data is {type(data).__name__}, not bytes")
        expected, got = math.prod(shape) * dtype.itemsize, memoryview(data).nbytes
        if got != expected:
            raise CodecError(f"tensor {name!r}: {got} bytes but {wire}{list(shape)} needs {expected}")
        out[name] = np.frombuffer(data, dtype=dtype).reshape(shape)
    return out


def _short(value: Any, limit: int = 80) -> str:
    """repr of a hostile value, cut: error texts end up in dead-letter headers and logs."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def pack(obj: Mapping[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(body: bytes, max_bytes: int = 128 * 2**20) -> dict[str, Any]:
    """Parse one msgpack map of at most `max_bytes`; any failure becomes a `MalformedMessageError`.

    msgpack bounds every string, array and map by the body's length before allocating, and its
    own stack limit bounds nesting; extension types (timestamps included) are refused."""
    if not isinstance(body, bytes | bytearray | memoryview):
        raise MalformedMessageError(f"body is a {type(body).__name__}, not bytes")
    if len(body) > max_bytes:
        raise MalformedMessageError(f"body of {len(body)} bytes is over the {max_bytes} this message may have")
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, timestamp=0, ext_hook=_no_ext)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedMessageError(f"body is not msgpack: {_short(str(exc), 200)}") from exc
    if not isinstance(obj, dict):
        raise MalformedMessageError(f"body is msgpack {type(obj).__name__}, not a map")
    return obj


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"extension type {code} is not part of any fedmq message")


def weights_sha256(weights: Mapping[str, np.ndarray]) -> str:
    """Hash over names, dtypes, shapes and bytes in order: equal hash <=> bit-identical model."""
    h = hashlib.sha256()
    for name, arr in weights.items():
        arr = np.asarray(arr)
        wire = _wire_dtype(arr)
        h.update(name.encode())
        h.update(wire.encode())
        h.update(repr(tuple(arr.shape)).encode())
        h.update(np.ascontiguousarray(arr, dtype=DTYPES[wire]).tobytes())
    return h.hexdigest()
