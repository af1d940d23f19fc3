"""The tensor codec: exact round trips for every wire dtype and shape, strict rejection of bodies
whose bytes do not match their declared dtype x shape, and zero-copy decoding."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmq.shared.codec import (
    ALIGN,
    DTYPES,
    FRAME_MAGIC,
    decode_tensors,
    encode_tensors,
    is_framed,
    pack,
    pack_frame,
    tensor_digests,
    unpack,
    unpack_frame,
    weights_sha256,
)
from fedmq.shared.errors import CodecError, MalformedMessageError

WIRE_DTYPES = sorted(DTYPES)
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    """Any wire dtype, any shape incl. 0-d and empty, any values (NaN and Inf included)."""
    dtype = DTYPES[draw(st.sampled_from(WIRE_DTYPES))]
    return draw(hnp.arrays(dtype=dtype, shape=shapes))


weight_maps = st.dictionaries(st.text(min_size=1, max_size=12), arrays(), max_size=5)


def _roundtrip(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return decode_tensors(unpack(pack({"w": encode_tensors(weights)}))["w"])


@settings(max_examples=200, deadline=None)
@given(weight_maps)
def test_every_dtype_and_shape_round_trips_bit_exactly(weights: dict[str, np.ndarray]) -> None:
    out = _roundtrip(weights)
    assert list(out) == list(weights)
    for name, arr in weights.items():
        got = out[name]
        assert got.dtype == arr.dtype
        assert got.shape == arr.shape
        assert got.tobytes() == arr.tobytes()  # bit-exact, NaN payloads included


@settings(max_examples=100, deadline=None)
@given(weight_maps)
def test_sha256_is_stable_across_a_round_trip(weights: dict[str, np.ndarray]) -> None:
    assert weights_sha256(_roundtrip(weights)) == weights_sha256(weights)


@settings(max_examples=100, deadline=None)
@given(arrays())
def test_big_endian_input_is_sent_little_endian_with_the_same_values(arr: np.ndarray) -> None:
    swapped = arr.astype(arr.dtype.newbyteorder(">"))
    got = _roundtrip({"t": swapped})["t"]
    assert got.dtype == arr.dtype
    np.testing.assert_array_equal(got, arr)


@settings(max_examples=100, deadline=None)
@given(arrays(), st.integers(min_value=1, max_value=16))
def test_a_body_with_bytes_missing_or_extra_is_rejected(arr: np.ndarray, n: int) -> None:
    wire = encode_tensors({"t": arr})
    short = {"t": {**wire["t"], "data": wire["t"]["data"][:-n]}} if arr.nbytes >= n else None
    long = {"t": {**wire["t"], "data": bytes(wire["t"]["data"]) + b"\0" * n}}
    with pytest.raises(CodecError, match="bytes but"):
        decode_tensors(long)
    if short is not None:
        with pytest.raises(CodecError, match="bytes but"):
            decode_tensors(short)


@settings(max_examples=100, deadline=None)
@given(arrays())
def test_a_shape_that_does_not_match_the_bytes_is_rejected(arr: np.ndarray) -> None:
    wire = encode_tensors({"t": arr})["t"]
    bad_shape = [*wire["shape"], 2] if arr.size else [3]
    with pytest.raises(CodecError):
        decode_tensors({"t": {**wire, "shape": bad_shape}})


@pytest.mark.parametrize("declared, actual", [("float64", "float32"), ("int32", "int64"),
                                              ("float16", "float32")])
def test_a_dtype_that_does_not_match_the_bytes_is_rejected(declared: str, actual: str) -> None:
    wire = encode_tensors({"t": np.arange(5, dtype=DTYPES[actual])})["t"]
    with pytest.raises(CodecError, match="bytes but"):
        decode_tensors({"t": {**wire, "dtype": declared}})


@pytest.mark.parametrize("dtype", ["uint8", "bool", "complex64", "float128", "U4"])
def test_a_dtype_outside_the_wire_set_is_refused_when_encoding(dtype: str) -> None:
    if not hasattr(np, dtype) and dtype != "U4":
        pytest.skip(f"numpy on this platform has no {dtype}")
    with pytest.raises(CodecError, match="cannot travel"):
        encode_tensors({"t": np.zeros(3, dtype=dtype)})


@pytest.mark.parametrize("spec, match", [
    ({"dtype": "uint8", "shape": [1], "data": b"\0"}, "bad or missing"),
    ({"shape": [1], "data": b"\0\0\0\0"}, "bad or missing"),
    ({"dtype": "float32", "data": b"\0\0\0\0"}, "bad or missing"),
    ({"dtype": "float32", "shape": [1]}, "bad or missing"),
    ({"dtype": "float32", "shape": ["x"], "data": b"\0\0\0\0"}, "bad or missing"),
    ({"dtype": "float32", "shape": [1], "data": "text"}, "not bytes"),
    ({"dtype": "float32", "shape": [-1], "data": b""}, "negative dimension"),
])
def test_a_malformed_tensor_spec_is_rejected_with_what_is_wrong(spec: dict[str, object], match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode_tensors({"t": spec})


def test_a_tensor_map_that_is_not_a_map_is_rejected() -> None:
    with pytest.raises(CodecError, match="must be a map"):
        decode_tensors([1, 2, 3])
    with pytest.raises(CodecError, match="not name -> map"):
        decode_tensors({"t": [1, 2]})


def test_decoding_is_zero_copy_into_numpy_and_torch() -> None:
    src = np.arange(100_000, dtype=np.float32)
    body = pack({"w": encode_tensors({"t": src})})
    raw = unpack(body)["w"]
    data = raw["t"]["data"]
    arr = decode_tensors(raw)["t"]
    # the array is a view on the bytes msgpack produced: same buffer address, nothing copied
    assert arr.base is not None
    assert np.shares_memory(arr, np.frombuffer(data, dtype=np.uint8))
    assert arr.__array_interface__["data"][0] == np.frombuffer(data, np.uint8).__array_interface__["data"][0]
    assert not arr.flags.writeable  # callers must copy before writing
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the view is read-only
        t = torch.from_numpy(arr)
    assert t.data_ptr() == arr.__array_interface__["data"][0]
    assert math.isclose(float(t.sum()), float(src.sum()), rel_tol=1e-6)


@pytest.mark.parametrize("body, match", [
    (b"\xc1", "not msgpack"),
    (b"", "not msgpack"),
    (msgpack.packb([1, 2, 3]), "not a map"),
    (msgpack.packb({1: 2}), "not msgpack"),
])
def test_unpack_rejects_bodies_that_are_not_a_msgpack_map(body: bytes, match: str) -> None:
    with pytest.raises(MalformedMessageError, match=match):
        unpack(body)


# --------------------------------------------------------------------------- framed form

TF = ("a", "b")


def _frame_roundtrip(first: dict[str, np.ndarray], second: dict[str, np.ndarray] | None) -> dict[str, object]:
    body = pack_frame({"x": 1, "a": first, "b": second, "z": "end"}, TF)
    assert is_framed(body) and body.startswith(FRAME_MAGIC)
    return unpack_frame(body, TF)


@settings(max_examples=200, deadline=None)
@given(weight_maps, st.none() | weight_maps)
def test_every_dtype_and_shape_round_trips_framed_bit_exactly(first: dict[str, np.ndarray],
                                                              second: dict[str, np.ndarray] | None) -> None:
    out = _frame_roundtrip(first, second)
    assert out["x"] == 1 and out["z"] == "end" and list(out) == ["x", "a", "b", "z"]
    for field, weights in (("a", first), ("b", second)):
        if weights is None:
            assert out[field] is None
            continue
        got = out[field]
        assert isinstance(got, dict) and list(got) == list(weights)
        for name, arr in weights.items():
            assert got[name].dtype == arr.dtype and got[name].shape == arr.shape
            assert got[name].tobytes() == arr.tobytes()
            assert not got[name].flags.writeable
        assert weights_sha256(got) == weights_sha256(weights)


@settings(max_examples=100, deadline=None)
@given(arrays())
def test_framed_big_endian_and_strided_input_is_sent_little_endian_c_order(arr: np.ndarray) -> None:
    swapped = arr.astype(arr.dtype.newbyteorder(">"))
    strided = np.asarray(arr.T) if arr.ndim > 1 else arr
    out = _frame_roundtrip({"s": swapped, "t": strided}, None)["a"]
    assert isinstance(out, dict)
    assert out["s"].dtype == arr.dtype and out["s"].tobytes() == arr.tobytes()
    assert out["t"].tobytes() == np.ascontiguousarray(strided).tobytes()


def test_frame_tensors_are_aligned_and_the_layout_is_canonical() -> None:
    body = pack_frame({"a": {"x": np.ones(3, np.int32), "y": np.ones(2, np.float64)}, "b": None}, TF)
    out = unpack_frame(body, TF)["a"]
    assert isinstance(out, dict)
    base = np.frombuffer(body, np.uint8).__array_interface__["data"][0]
    for arr in out.values():
        assert (arr.__array_interface__["data"][0] - base) % ALIGN == 0
    assert pack_frame({"a": out, "b": None}, TF) == body  # decode then encode: the same bytes


def test_tensor_digests_cover_name_dtype_shape_and_bytes() -> None:
    w = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    d = tensor_digests(w)
    assert d[0][:3] == ["w", "float32", [2, 3]] and len(d[0][3]) == 32
    assert tensor_digests({"w": w["w"].reshape(3, 2)}) != d
    assert tensor_digests({"v": w["w"]}) != d
    assert tensor_digests({"w": w["w"].astype(np.float64)}) != d
    assert tensor_digests({"w": w["w"] + 1}) != d
    assert tensor_digests({"w": w["w"].astype(">f4")}) == d  # the wire bytes, not the memory order


def test_is_framed_never_raises() -> None:
    assert not is_framed(b"") and not is_framed(b"\xc1FM") and not is_framed("\xc1FMQ")  # type: ignore[arg-type]
    assert not is_framed(memoryview(np.zeros((4, 4), np.uint8)[:, :1]))  # not contiguous
    assert is_framed(bytearray(FRAME_MAGIC + b"x"))
