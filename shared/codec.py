"""msgpack codec for tensors and messages: the map form and the framed form.

Map form (every message of the previous release, and today's Task, Event, EncryptedAggregate):
one msgpack map; tensors travel inside it as ``{name: {"dtype": str, "shape": [int], "data":
bytes}}``. msgpack copies the tensor bytes when packing (more than once as its buffer grows) and
again into a new bytes object when unpacking: 4.2-4.4x a numpy copy (BENCHMARKS.md, "Codec").

Framed form (ModelVersion and Update, schema 4, `pack_frame` / `unpack_frame`)::

    FRAME_MAGIC (4) | FRAME_VERSION (1) | header length (u32 LE) | header (msgpack map) |
    zero padding to ALIGN | tensor bytes, each tensor zero-padded to ALIGN, nothing after

The header is the message's map with each tensor field's value replaced by a list of
``[name, dtype, shape, offset, nbytes]`` (offset relative to the first tensor byte, so the
header does not depend on its own length). Encoding copies the tensor bytes once (one join);
decoding copies none: each tensor is a read-only `numpy.frombuffer` view on the body. The layout
is canonical (each offset is the previous end rounded up to ALIGN, padding is zero, no byte
after the last tensor), so one equality check per tensor rules out overlaps, gaps, reordering,
ranges outside the body and trailing bytes, and one message has one framed body.

Ciphertext chunks (``Update.ciphertext``, ``EncryptedAggregate.chunks``) stay msgpack bin values
(in the header or the map): TenSEAL reads them as bytes objects, so a frame would save one copy
on encode at most, next to a second of encryption per million parameters.

FRAME_MAGIC starts with 0xc1, a byte msgpack never uses: no map-form body starts with it, and a
reader of the previous release refuses a framed body as "not msgpack" (it cannot read it; see
docs/architecture.md, "Messages"). Decoding either form is total: the value or
`MalformedMessageError` (`CodecError` for a tensor), with every size checked before numpy or
msgpack allocate anything. Callers that need to write to a decoded tensor must copy it (the
aggregator's fold accumulates into its own float64 buffer anyway).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Mapping
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
    return _unpack_map(body, "body")


def _unpack_map(data: Any, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, timestamp=0, ext_hook=_no_ext)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedMessageError(f"{what} is not msgpack: {_short(str(exc), 200)}") from exc
    if not isinstance(obj, dict):
        raise MalformedMessageError(f"{what} is msgpack {type(obj).__name__}, not a map")
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
        h.update(_raw_bytes(np.asarray(arr, dtype=DTYPES[wire], order="C")))  # a view: no copy
    return h.hexdigest()


def _raw_bytes(arr: np.ndarray) -> memoryview | bytes:
    """The bytes of a C-contiguous array as a view (a 0-d array too), or b"" when it has none."""
    return arr.reshape(-1).data.cast("B") if arr.size else b""


def _wire_array(arr: Any) -> tuple[np.ndarray, str]:
    """`arr` as the wire holds it: C order, little-endian (a copy only if it is not already)."""
    if type(arr) is np.ndarray and arr.flags.c_contiguous:
        wire = _WIRE_NAME.get(arr.dtype)  # exactly a wire dtype (little-endian): nothing to convert
        if wire is not None:
            return arr, wire
    arr = np.asarray(arr)
    wire = _wire_dtype(arr)
    return np.asarray(arr, dtype=DTYPES[wire], order="C"), wire


# --------------------------------------------------------------------------- framed form

FRAME_MAGIC = b"\xc1FMQ"
FRAME_VERSION = 1
#: magic, frame version, header length
_PREFIX = struct.Struct("<4sBI")
#: every tensor starts at a multiple of ALIGN from the body's start (float64 views are aligned)
ALIGN = 8
_ZEROS = bytes(ALIGN)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def is_framed(body: Any) -> bool:
    """True for a body in the framed form (decided by its first four bytes alone)."""
    if type(body) is bytes:  # what the broker hands over: no view needed
        return body.startswith(FRAME_MAGIC)
    if not isinstance(body, bytes | bytearray | memoryview):
        return False
    try:
        return bytes(memoryview(body).cast("B")[:4]) == FRAME_MAGIC
    except (TypeError, ValueError):  # not a contiguous buffer: the map parser says what is wrong
        return False


def pack_frame(fields: Mapping[str, Any], tensor_fields: Iterable[str]) -> bytes:
    """The framed body of `fields` (a message's map, in order); the values of `tensor_fields`
    are `{name: array}` maps (or None) and travel as raw bytes after the header.

    The tensor bytes are copied exactly once, by the final join (plus a conversion for an array
    that is not C-ordered little-endian of a wire dtype already)."""
    tensor_fields = tuple(tensor_fields)
    header: dict[str, Any] = {}
    segments: list[memoryview | bytes] = []
    end = 0
    for key, value in fields.items():
        if key not in tensor_fields or value is None:
            header[key] = value
            continue
        descriptors = []
        for name, raw in value.items():
            arr, wire = _wire_array(raw)
            offset = _align(end)
            if offset > end:
                segments.append(_ZEROS[: offset - end])
            descriptors.append([name, wire, list(arr.shape), offset, arr.nbytes])
            if arr.size:
                segments.append(_raw_bytes(arr))
            end = offset + arr.nbytes
        header[key] = descriptors
    head = pack(header)
    used = _PREFIX.size + len(head)
    return b"".join([_PREFIX.pack(FRAME_MAGIC, FRAME_VERSION, len(head)), head, _ZEROS[: _align(used) - used],
                     *segments])


def unpack_frame(body: Any, tensor_fields: Iterable[str], max_bytes: int = 128 * 2**20,
                 *, tensors: bool = True) -> dict[str, Any]:
    """Parse a framed body: the header map with each tensor field's descriptor list replaced by
    `{name: read-only array view}` (`tensors=False`: left as the raw descriptors, unchecked, for
    readers that want the other fields only). Any defect raises `MalformedMessageError`.

    Checked before anything is allocated: the body's size, the magic and frame version, the
    header's length against the body, then per tensor its name, dtype, shape (`_shape`'s rules),
    nbytes == prod(shape) * itemsize, its offset (exactly the canonical one) and its end (inside
    the body); at the end, that the last tensor ends where the body does."""
    view = _byte_view(body)
    size = len(view)
    if size > max_bytes:
        raise MalformedMessageError(f"body of {size} bytes is over the {max_bytes} this message may have")
    if size < _PREFIX.size:
        raise MalformedMessageError(f"framed body of {size} bytes is shorter than its {_PREFIX.size}-byte prefix")
    magic, version, head_len = _PREFIX.unpack_from(view)
    if magic != FRAME_MAGIC:
        raise MalformedMessageError(f"body starts with {bytes(magic)!r}, not the frame magic {FRAME_MAGIC!r}")
    if version != FRAME_VERSION:
        raise MalformedMessageError(f"frame version {version}; this fedmq reads version {FRAME_VERSION} "
                                    "(a newer fedmq wrote it: upgrade)")
    used = _PREFIX.size + head_len
    start = _align(used)
    if start > size:
        raise MalformedMessageError(f"frame header of {head_len} bytes (and its padding) runs past the body's "
                                    f"{size} bytes")
    header = _unpack_map(view[_PREFIX.size:used], "frame header")
    if view[used:start] != _ZEROS[: start - used]:
        raise MalformedMessageError("frame header padding is not zero")
    if not tensors:
        return header
    end = 0
    names = tuple(tensor_fields)
    for key, value in header.items():
        if key in names and value is not None:
            header[key], end = _frame_tensors(key, value, view, start, end)
    if start + end != size:
        raise MalformedMessageError(f"framed body has {size - start - end} bytes after its last tensor "
                                    "(trailing garbage)" if start + end < size else "framed body is truncated")
    return header


def _byte_view(body: Any) -> memoryview:
    if type(body) is bytes:
        return memoryview(body)  # already one-dimensional bytes
    if not isinstance(body, bytes | bytearray | memoryview):
        raise MalformedMessageError(f"body is a {type(body).__name__}, not bytes")
    try:
        return memoryview(body).cast("B")
    except (TypeError, ValueError) as exc:  # a non-contiguous or oddly shaped buffer
        raise MalformedMessageError(f"body is not a contiguous byte buffer: {exc}") from exc


def _frame_tensors(field: str, raw: Any, view: memoryview, start: int, end: int) -> tuple[Weights, int]:
    """One tensor field's descriptors -> views; `end` is where the previous tensor ended."""
    if type(raw) is not list:
        raise CodecError(f"field {field!r}: tensor list is a {type(raw).__name__}, not a list")
    if len(raw) > MAX_TENSORS:
        raise CodecError(f"field {field!r}: {len(raw)} tensors, at most {MAX_TENSORS}")
    out: Weights = {}
    for i, desc in enumerate(raw):
        if type(desc) is not list or len(desc) != 5:
            raise CodecError(f"field {field!r}: tensor {i} is {_short(desc)}, not [name, dtype, shape, offset, nbytes]")
        name, wire, shape_raw, offset, nbytes = desc
        if type(name) is not str or not 0 < len(name) <= MAX_NAME_LEN:
            raise CodecError(f"field {field!r}: tensor {i} name {_short(name)} is not a string of 1-{MAX_NAME_LEN} "
                             "characters")
        if name in out:
            raise CodecError(f"field {field!r}: tensor {name!r} appears twice")
        if not isinstance(wire, str) or wire not in DTYPES:
            raise CodecError(f"tensor {name!r}: bad or missing dtype {_short(wire)} (one of {sorted(DTYPES)})")
        dtype = DTYPES[wire]
        shape = _shape(name, shape_raw)
        if type(offset) is not int or type(nbytes) is not int:
            raise CodecError(f"tensor {name!r}: offset {_short(offset)} and nbytes {_short(nbytes)} must be ints")
        count = math.prod(shape)
        if nbytes != count * dtype.itemsize:
            raise CodecError(f"tensor {name!r}: nbytes {nbytes} but {wire}{list(shape)} needs {count * dtype.itemsize}")
        expected = _align(end)
        if offset != expected:
            what = "overlaps the tensor before it" if offset < end else "is not where the tensor before it ends"
            raise CodecError(f"tensor {name!r}: offset {offset} {what} (expected {expected}: tensors follow each "
                             f"other in header order, each aligned to {ALIGN} bytes)")
        if start + offset + nbytes > len(view):
            raise CodecError(f"tensor {name!r}: bytes {offset}..{offset + nbytes} run past the body's end "
                             "(truncated body)")
        if offset > end and view[start + end:start + offset] != _ZEROS[: offset - end]:
            raise CodecError(f"tensor {name!r}: the padding before it is not zero")
        # one constructor call makes the view (bounds checked above; numpy checks them again)
        arr = np.ndarray(shape, dtype, buffer=view if count else b"", offset=start + offset if count else 0)
        if arr.flags.writeable:
            arr.flags.writeable = False  # a view on a bytearray body: must not be written through either
        out[name] = arr
        end = offset + nbytes
    return out, end


def unpack_any(body: Any, tensor_fields: Iterable[str] = (), max_bytes: int = 128 * 2**20) -> dict[str, Any]:
    """A message's fields from either form, tensors not decoded: for readers that want a field or
    two (the monitor reads the newest version's number and meta) without the message classes."""
    if is_framed(body):
        return unpack_frame(body, tensor_fields, max_bytes, tensors=False)
    return unpack(body, max_bytes)


def tensor_digests(weights: Mapping[str, np.ndarray]) -> list[list[Any]]:
    """Per tensor, in order, [name, dtype, shape, SHA-256 of its bytes]: what a signature over a
    framed message covers instead of the bytes themselves (hashlib reads the array in place)."""
    out: list[list[Any]] = []
    for name, raw in weights.items():
        arr, wire = _wire_array(raw)
        out.append([name, wire, list(arr.shape), hashlib.sha256(_raw_bytes(arr)).digest()])
    return out
