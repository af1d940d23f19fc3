"""Wire compression of update deltas: float16, bfloat16, top-k with error feedback.

The job chooses it (`[strategy] compression`, which travels in every ModelVersion's params); a site
compresses its delta just before it signs the update (`ErrorFeedback.compress`, `Update.compression`
names the scheme), and the aggregator and replay turn the wire tensors back into the dense float32
delta with `decompress`, before validation and the fold. Everything here is pure numpy and
deterministic, so replay recomputes every version bit for bit from the updates log.

Only tensors the model holds as float32 are compressed; any other tensor (an int64 step counter,
a float64 buffer) travels as is. Per compressed tensor ``name`` the wire holds:

* ``float16``: ``name`` as IEEE half (numpy's cast: round to nearest even). A value beyond
  +-65504 cannot be represented: the site refuses to send it (`NonFiniteError`), use bfloat16.
* ``bfloat16``: ``name`` as uint16, the upper half of each float32 rounded to nearest even (numpy
  has no bfloat16). Decompression shifts it back: exact, no arithmetic.
* ``topk``: ``name.topk_indices`` (int32, int64 past 2**31 entries), strictly increasing positions
  in the flattened tensor, and ``name.topk_values`` (float32), exactly
  ``k = max(1, ceil(topk_fraction x size))`` of each. Decompression scatters them into zeros.

A site is hostile: `decompress` checks names, order, dtypes, shapes, counts and indices (in range,
strictly increasing: no duplicate can be added twice) before it writes one value, and allocates only
the model's own shapes, which the aggregator trusts; any failure is a `CompressionError` (reason
``bad_compression``). `check_tag` refuses an update whose `compression` is not the job's.

Error feedback (Stich et al. 2018, "Sparsified SGD with memory"; Karimireddy et al. 2019,
"Error feedback fixes SignSGD"): top-k alone drops most of every delta for good. The site keeps what
it did not send (the residual) and adds it to its next delta before selecting, so every entry is
sent eventually and the sum of what a site sent trails the sum of its true deltas by the residual
only. The residual lives in the site's process (`ErrorFeedback`, one per job and site): a restarted
site starts from zero and what it held is lost, like one lost update.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmq.shared.codec import Weights
from fedmq.shared.config import Compression, StrategyConfig
from fedmq.shared.errors import CompressionError, CompressionMismatchError, ConfigError, NonFiniteError

F32 = np.dtype("<f4")
F16 = np.dtype("<f2")
U16 = np.dtype("<u2")
INDICES_SUFFIX = ".topk_indices"
VALUES_SUFFIX = ".topk_values"
FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class CompressionSpec:
    """What the job asks for: the scheme, and top-k's fraction (the only parameter)."""

    kind: Compression = Compression.NONE
    topk_fraction: float = 0.01

    @classmethod
    def of(cls, cfg: StrategyConfig) -> CompressionSpec:
        return cls(cfg.compression, cfg.topk_fraction)

    @property
    def tag(self) -> str | None:
        """What `Update.compression` holds: None for uncompressed updates (the field is then absent)."""
        return None if self.kind is Compression.NONE else self.kind.value


def topk_count(size: int, fraction: float) -> int:
    """Entries a site sends of a tensor of `size` entries: at least one, at most all (0 of none)."""
    if size <= 0:
        return 0
    return min(size, max(1, math.ceil(fraction * size)))


def index_dtype(size: int) -> np.dtype:
    return np.dtype("<i4") if size <= 2**31 - 1 else np.dtype("<i8")


def _compressible(dtype: np.dtype) -> bool:
    return np.dtype(dtype) == F32


# ------------------------------------------------------------------------------- bfloat16


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> the uint16 bits of its bfloat16, rounded to nearest, ties to even (NaN stays NaN)."""
    bits = np.ascontiguousarray(x, dtype=F32).view(np.uint32)
    # adding 0x7FFF plus the lowest kept bit carries into the upper half exactly when the cut part
    # is above one half, or exactly one half and the kept part is odd; uint32 arithmetic, no float
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    out = rounded.astype(U16)
    nan = np.isnan(x)
    if nan.any():  # rounding could carry a NaN's mantissa into the exponent (an infinity): keep it quiet NaN
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(U16)
    return out


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """The float32 whose upper half is `bits` (exact)."""
    return (np.asarray(bits, dtype=U16).astype(np.uint32) << np.uint32(16)).view(F32)


# ------------------------------------------------------------------------------- compress


def _check_range(name: str, dense: np.ndarray, wire: np.ndarray, kind: Compression) -> None:
    """A finite value that became infinite did not fit the format: refuse rather than send garbage."""
    back = wire.astype(F32) if kind is Compression.FLOAT16 else from_bfloat16_bits(wire)
    overflow = np.isinf(back) & np.isfinite(dense)
    if overflow.any():
        worst = float(np.max(np.abs(dense[overflow])))
        hint = "; use compression = \"bfloat16\" (float32's range)" if kind is Compression.FLOAT16 else ""
        raise NonFiniteError(f"delta tensor {name} holds {worst:.4g}, beyond {kind.value}'s range{hint}")


def topk_select(flat: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k entries of largest magnitude, ascending. Ties at the k-th magnitude go to
    the lower positions (a stable sort), so the choice is a function of the values alone."""
    if k >= flat.size:
        return np.arange(flat.size, dtype=np.int64)
    order = np.argsort(-np.abs(flat), kind="stable")[:k]
    return np.sort(order)


def wire_names(name: str) -> tuple[str, str]:
    return name + INDICES_SUFFIX, name + VALUES_SUFFIX


def compress(delta: Mapping[str, np.ndarray], spec: CompressionSpec) -> Weights:
    """The wire tensors of a dense delta (stateless: `ErrorFeedback` adds the residual first)."""
    if spec.kind is Compression.NONE:
        return dict(delta)
    out: Weights = {}
    for name, arr in delta.items():
        arr = np.asarray(arr)
        if not _compressible(arr.dtype):
            out[name] = arr
            continue
        if spec.kind is Compression.FLOAT16:
            with np.errstate(over="ignore"):  # an overflow is refused just below, with the value
                wire = arr.astype(F16)
            _check_range(name, arr, wire, spec.kind)
            out[name] = wire
        elif spec.kind is Compression.BFLOAT16:
            wire = to_bfloat16_bits(arr)
            _check_range(name, arr, wire, spec.kind)
            out[name] = wire
        else:
            flat = arr.reshape(-1)
            idx = topk_select(flat, topk_count(flat.size, spec.topk_fraction))
            i_name, v_name = wire_names(name)
            if i_name in delta or v_name in delta:  # never for a torch state_dict ("a" and "a.b" exclude each other)
                raise ConfigError(f"tensor {name}: the model has a tensor named {i_name} or {v_name}, "
                                       "top-k's wire names for it; use another compression")
            out[i_name] = idx.astype(index_dtype(flat.size))
            out[v_name] = flat[idx].astype(F32)
    return out


# ------------------------------------------------------------------------------- decompress


def check_tag(tag: str | None, spec: CompressionSpec, update_id: str) -> None:
    """The update's `compression` must be the job's: a site does not choose how it is read."""
    if tag != spec.tag:
        raise CompressionMismatchError(
            f"update {update_id} is compressed as {tag or 'none'!s:.40} but the job's strategy.compression "
            f"is {spec.kind.value}")


def _expect(name: str, got: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], update_id: str) -> None:
    if got.dtype != dtype or got.shape != shape:
        raise CompressionError(f"update {update_id}: wire tensor {name} is {got.dtype}{list(got.shape)}, "
                               f"expected {dtype}{list(shape)}")


def _expected_names(template: Mapping[str, np.ndarray], spec: CompressionSpec) -> list[str]:
    names: list[str] = []
    for name, ref in template.items():
        if spec.kind is Compression.TOPK and _compressible(ref.dtype):
            names.extend(wire_names(name))
        else:
            names.append(name)
    return names


def decompress(wire: Mapping[str, np.ndarray], spec: CompressionSpec, template: Mapping[str, np.ndarray],
               update_id: str = "?") -> Weights:
    """The dense delta (the template's names, dtypes and shapes) a wire form stands for.

    `template` is the model (the aggregator's current version): shapes and sizes come from it,
    never from the wire. Raises CompressionError for anything but the exact form `compress` writes."""
    if spec.kind is Compression.NONE:
        return dict(wire)
    expected = _expected_names(template, spec)
    if list(wire) != expected:
        missing = [n for n in expected if n not in wire][:4]
        extra = [n[:60] for n in wire if n not in set(expected)][:4]
        raise CompressionError(f"update {update_id}: {spec.kind.value} wire tensors do not match the model "
                               f"(missing {missing}, unexpected {extra}, or out of order)")
    out: Weights = {}
    for name, ref in template.items():
        ref_dtype, shape = np.dtype(ref.dtype), tuple(ref.shape)
        if not _compressible(ref_dtype):
            got = wire[name]
            _expect(name, got, ref_dtype, shape, update_id)
            out[name] = got
        elif spec.kind is Compression.FLOAT16:
            got = wire[name]
            _expect(name, got, F16, shape, update_id)
            out[name] = got.astype(F32)
        elif spec.kind is Compression.BFLOAT16:
            got = wire[name]
            _expect(name, got, U16, shape, update_id)
            out[name] = from_bfloat16_bits(got).reshape(shape)
        else:
            out[name] = _scatter(name, wire, shape, spec.topk_fraction, update_id)
    return out


def _scatter(name: str, wire: Mapping[str, np.ndarray], shape: tuple[int, ...], fraction: float,
             update_id: str) -> np.ndarray:
    size = math.prod(shape)
    k = topk_count(size, fraction)
    i_name, v_name = wire_names(name)
    idx, values = wire[i_name], wire[v_name]
    _expect(i_name, idx, index_dtype(size), (k,), update_id)
    _expect(v_name, values, F32, (k,), update_id)
    if k:
        if idx[0] < 0 or idx[-1] >= size:
            raise CompressionError(f"update {update_id}: {i_name} has an index outside [0, {size})")
        if k > 1 and not bool(np.all(idx[1:] > idx[:-1])):
            raise CompressionError(f"update {update_id}: {i_name} is not strictly increasing "
                                   "(a duplicate or unsorted index)")
    # strictly increasing with first >= 0 and last < size: every index is in range and unique
    dense = np.zeros(size, dtype=F32)
    dense[idx] = values
    return dense.reshape(shape)


# ------------------------------------------------------------------------------- the site's side


class ErrorFeedback:
    """One site's compressor for one job: top-k with the residual it carries over (other schemes
    keep none). Thread-safe; `residual_norm` is for logs and tests."""

    def __init__(self) -> None:
        self._residual: Weights = {}
        self._lock = threading.Lock()

    def compress(self, delta: Mapping[str, np.ndarray], spec: CompressionSpec) -> Weights:
        if spec.kind is not Compression.TOPK:
            return compress(delta, spec)
        with self._lock:
            corrected: Weights = {}
            for name, arr in delta.items():
                arr = np.asarray(arr)
                r = self._residual.get(name)
                if _compressible(arr.dtype) and r is not None and r.shape == arr.shape:
                    corrected[name] = (arr + r).astype(F32)
                else:
                    corrected[name] = arr
            wire = compress(corrected, spec)
            sent = decompress(wire, spec, corrected)
            residual = {name: (corrected[name] - sent[name]).astype(F32)
                        for name in corrected if _compressible(corrected[name].dtype)}
            # a diverged delta (NaN, Inf) is dead-lettered by the aggregator; carried over, it would
            # poison every later update of this site too
            finite = all(bool(np.isfinite(r).all()) for r in residual.values())
            self._residual = residual if finite else {}
            return wire

    def reset(self) -> None:
        with self._lock:
            self._residual = {}

    @property
    def residual(self) -> Weights:
        with self._lock:
            return {k: v.copy() for k, v in self._residual.items()}

    def residual_norm(self) -> float:
        with self._lock:
            return float(math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in self._residual.values())))
