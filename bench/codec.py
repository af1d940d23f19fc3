"""Codec: encode + decode of the messages that carry tensors, fedmq's two wire forms against the alternatives.

Each method turns one float32 tensor into bytes and back, in the same run:

* ``Update framed`` / ``ModelVersion framed``: ``msg.encode()`` then ``X.decode(body)`` of a real
  message carrying the tensor (schema 4, what this release writes: header + raw bytes, decoded to a
  read-only zero-copy view), every field checked as the aggregator decodes it;
* ``Update map form``: the same update in the map form the previous release wrote (schema 1, one
  msgpack map; replay still reads it);
* ``tensor map``: the bare tensor map, ``pack(encode_tensors)`` + ``decode_tensors(unpack)``
  (the row this section measured before the framed form);
* ``pickle`` (protocol 5), ``torch.save/load`` through a BytesIO, and the floor, a numpy copy.

A second table: what signing an update costs, ``key.sign(update.signing_bytes())`` and the
verification, for both forms (framed: SHA-256 per tensor + Ed25519 over a small header; map form:
Ed25519 over the whole packed map).
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.common import Machine, best_and_median, fmt_seconds, table
from fedmq.shared.codec import decode_tensors, encode_tensors, pack, unpack
from fedmq.shared.messages import BASE_SCHEMA, FRAMED_SCHEMA, ModelVersion, Update, make_version

SIZES = (100_000, 1_000_000)
FRAMED_UPDATE = "Update framed"
FRAMED_VERSION = "ModelVersion framed"


def _tensor_map(arr: np.ndarray) -> np.ndarray:
    return decode_tensors(unpack(pack({"w": encode_tensors({"t": arr})}))["w"])["t"]


def _update(arr: np.ndarray, schema: int) -> Update:
    return Update(job="bench", update_id="u-t1", task_id="t1", site="site-0", base_version=3, num_samples=100,
                  delta={"t": arr}, metrics={"loss": 0.5, "task_seconds": 1.2}, signature=b"s" * 64,
                  task_proof=b"p" * 64, schema=schema)


def _version(arr: np.ndarray) -> ModelVersion:
    return make_version(job="bench", version=4, parent=3, weights={"t": arr}, included=[f"u-t{i}" for i in range(10)],
                        strategy="fedbuff", params={"buffer_size": 10}, model={"name": "mlp", "args": {}},
                        contributions=[{"update_id": f"u-t{i}", "site": "site-0", "weight": 1.0} for i in range(10)])


def _message(msg: Update | ModelVersion) -> Callable[[], object]:
    cls = type(msg)

    def roundtrip() -> object:
        return cls.decode(msg.encode())
    return roundtrip


def _pickle(arr: np.ndarray) -> np.ndarray:
    out: np.ndarray = pickle.loads(pickle.dumps(arr, protocol=5))
    return out


def _torch(t: torch.Tensor) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    out: torch.Tensor = torch.load(buf)
    return out


def _check(arr: np.ndarray) -> None:
    """Each fedmq path gives the array back bit for bit, or this is not a speed run."""
    got = [_tensor_map(arr), ModelVersion.decode(_version(arr).encode()).weights["t"]]
    for schema in (BASE_SCHEMA, FRAMED_SCHEMA):
        delta = Update.decode(_update(arr, schema).encode()).delta
        assert delta is not None
        got.append(delta["t"])
    if not all(np.array_equal(g, arr) for g in got):
        raise RuntimeError("a fedmq codec round trip changed the array; not a speed run")


def measure(sizes: tuple[int, ...] = SIZES, repeats: int = 7) -> dict[int, dict[str, tuple[float, float]]]:
    """size -> method -> (best, median) seconds per encode+decode round trip (or sign / verify)."""
    results: dict[int, dict[str, tuple[float, float]]] = {}
    rng = np.random.default_rng(0)
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    for n in sizes:
        arr = rng.normal(size=n).astype(np.float32)
        tensor = torch.from_numpy(arr.copy())
        _check(arr)
        framed, old = _update(arr, FRAMED_SCHEMA), _update(arr, BASE_SCHEMA)
        by_method = {
            "numpy copy": best_and_median(arr.copy, repeats=repeats),
            FRAMED_UPDATE: best_and_median(_message(framed), repeats=repeats),
            FRAMED_VERSION: best_and_median(_message(_version(arr)), repeats=repeats),
            "Update map form (schema 1)": best_and_median(_message(old), repeats=repeats),
            "tensor map (msgpack)": best_and_median(partial(_tensor_map, arr), repeats=repeats),
            "pickle": best_and_median(partial(_pickle, arr), repeats=repeats),
            "torch.save/load": best_and_median(partial(_torch, tensor), repeats=repeats),
        }
        for label, u in (("framed", Update.decode(framed.encode())), ("map form", Update.decode(old.encode()))):
            sig = key.sign(u.signing_bytes())
            signed = dataclasses.replace(u, signature=sig)
            by_method[f"sign: {label}"] = best_and_median(lambda u=u: key.sign(u.signing_bytes()), repeats=repeats)
            by_method[f"verify: {label}"] = best_and_median(
                lambda s=signed: public.verify(s.signature, s.signing_bytes()), repeats=repeats)
        results[n] = by_method
    return results


def run(url: str = "", quick: bool = False) -> str:
    """The section's markdown; `url` is unused (no broker involved), kept for bench.run_all."""
    machine = Machine()
    repeats = 3 if quick else 7
    results = measure(repeats=repeats)
    fixed, fixed_median = best_and_median(_message(_update(np.zeros(10, np.float32), FRAMED_SCHEMA)), repeats=repeats)
    rows, sign_rows = [], []
    for n, by_method in results.items():
        floor = by_method["numpy copy"][0]
        for method, (best, median) in by_method.items():
            row = [f"{n:,}", method, fmt_seconds(best), fmt_seconds(median), f"{n * 4 / best / 1e6:,.0f}",
                   f"{best / floor:.1f}x"]
            (sign_rows if method.startswith(("sign", "verify")) else rows).append(row)
    ratios = "; ".join(
        f"{n:,} floats: an Update framed takes {r[FRAMED_UPDATE][0] / r['numpy copy'][0]:.2f}x the time of a "
        f"numpy copy (a ModelVersion {r[FRAMED_VERSION][0] / r['numpy copy'][0]:.2f}x), the map form "
        f"{r['Update map form (schema 1)'][0] / r['numpy copy'][0]:.2f}x, pickle "
        f"{r['pickle'][0] / r['numpy copy'][0]:.2f}x; signing a framed update takes "
        f"{r['sign: framed'][0] / r['sign: map form'][0]:.2f}x the time of a map-form one"
        for n, r in results.items())
    return "\n\n".join([
        machine.note().markdown(),
        f"One float32 tensor, encode + decode per call (best of {repeats} samples; the median shows the noise "
        "of the shared machine). `Update framed` / `ModelVersion framed` = `msg.encode()` + `X.decode(body)` of "
        "a real message carrying the tensor, in the framed form this release writes (schema 4: a msgpack header, "
        "then the raw bytes, decoded to a zero-copy read-only view; every field checked). `Update map form` = the "
        "same update as one msgpack map (schema 1, the previous release's form, still read by replay). `tensor "
        "map` = the bare tensor map through `pack(encode_tensors)` + `decode_tensors(unpack)`. pickle protocol 5; "
        "torch.save/load through BytesIO; numpy copy = `arr.copy()`, the memory-bandwidth floor. MB/s counts the "
        "tensor's bytes once.",
        table(["floats", "method", "best", "median", "MB/s", "vs numpy copy"], rows),
        "Signing the same update (`key.sign(update.signing_bytes())`, Ed25519) and verifying it: framed = "
        "SHA-256 of each tensor in place + Ed25519 over a small header; map form = Ed25519 over the whole packed "
        "map (the previous release's signing bytes, kept for its updates).",
        table(["floats", "method", "best", "median", "MB/s", "vs numpy copy"], sign_rows),
        f"Ratios (best vs best, same run): {ratios}.",
        f"An Update framed costs one copy of the tensor (the encode's join) plus a fixed cost per message "
        f"(msgpack header, every field's check, the dataclass): the same update with a 10-float tensor takes "
        f"{fmt_seconds(fixed)} (best; median {fmt_seconds(fixed_median)}), against "
        + " and ".join(f"{fmt_seconds(r['numpy copy'][0])} for the numpy copy of {n:,} floats"
                       for n, r in results.items())
        + "; of the framed round trip, that fixed cost is "
        + " and ".join(f"{fixed / r[FRAMED_UPDATE][0]:.0%} at {n:,} floats" for n, r in results.items()) + ".",
    ])
