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

from shared.errors import CodecError, MalformedMessageError

Weights = dict[str, np.ndarray]

#: dtypes a tensor may have on the wire, by their wire name.
DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
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


def decode_tensors(raw: Any) -> Weights:
    """Inverse of `encode_tensors`; rejects anything whose bytes do not match dtype x shape."""
    if not isinstance(raw, Mapping):
        raise CodecError(f"tensor map must be a map, got {type(raw).__name__}")
    out: Weights = {}
    for name, spec in raw.items():
        if not isinstance(name, str) or not isinstance(spec, Mapping):
            raise CodecError(f"tensor entry {name!r} is not name -> map")
        try:
            dtype = DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            data = spec["data"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"tensor {name!r}: bad or missing dtype/shape/data ({exc})") from exc
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CodecError(f"tensor {name!r}: data is {type(data).__name__}, not bytes")
        if any(d < 0 for d in shape):
            raise CodecError(f"tensor {name!r}: negative dimension in shape {shape}")
        expected = math.prod(shape) * dtype.itemsize
        if len(data) != expected:
            raise CodecError(
                f"tensor {name!r}: {len(data)} bytes but {spec['dtype']}{list(shape)} needs {expected}"
            )
        out[name] = np.frombuffer(data, dtype=dtype).reshape(shape)
    return out


def pack(obj: Mapping[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(body: bytes) -> dict[str, Any]:
    """Parse one msgpack map; any parse failure becomes a `MalformedMessageError`."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedMessageError(f"body is not msgpack: {exc}") from exc
    if not isinstance(obj, dict):
        raise MalformedMessageError(f"body is msgpack {type(obj).__name__}, not a map")
    return obj


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
