"""Codec: encode + decode of one float32 tensor, fedmq's msgpack codec against the alternatives.

Each method turns the array into bytes and back: fedmq = ``pack(encode_tensors)`` then
``decode_tensors(unpack)`` (a read-only zero-copy view), pickle = ``dumps``/``loads`` (protocol 5),
torch = ``torch.save``/``torch.load`` through a BytesIO, and the floor, a plain ``numpy`` copy.
"""

from __future__ import annotations

import io
import pickle
from functools import partial

import numpy as np
import torch

from bench.common import Machine, best_and_median, fmt_seconds, table
from fedmq.shared.codec import decode_tensors, encode_tensors, pack, unpack

SIZES = (100_000, 1_000_000)


def _fedmq(arr: np.ndarray) -> np.ndarray:
    return decode_tensors(unpack(pack({"w": encode_tensors({"t": arr})}))["w"])["t"]


def _pickle(arr: np.ndarray) -> np.ndarray:
    out: np.ndarray = pickle.loads(pickle.dumps(arr, protocol=5))
    return out


def _torch(t: torch.Tensor) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    out: torch.Tensor = torch.load(buf)
    return out


def measure(sizes: tuple[int, ...] = SIZES, repeats: int = 7) -> dict[int, dict[str, tuple[float, float]]]:
    """size -> method -> (best, median) seconds per encode+decode round trip."""
    results: dict[int, dict[str, tuple[float, float]]] = {}
    rng = np.random.default_rng(0)
    for n in sizes:
        arr = rng.normal(size=n).astype(np.float32)
        tensor = torch.from_numpy(arr.copy())
        if not np.array_equal(_fedmq(arr), arr):
            raise RuntimeError("fedmq codec round trip changed the array; not a speed run")
        results[n] = {
            "numpy copy": best_and_median(arr.copy, repeats=repeats),
            "fedmq msgpack": best_and_median(partial(_fedmq, arr), repeats=repeats),
            "pickle": best_and_median(partial(_pickle, arr), repeats=repeats),
            "torch.save/load": best_and_median(partial(_torch, tensor), repeats=repeats),
        }
    return results


def run(url: str = "", quick: bool = False) -> str:
    """The section's markdown; `url` is unused (no broker involved), kept for bench.run_all."""
    machine = Machine()
    repeats = 3 if quick else 7
    results = measure(repeats=repeats)
    rows = []
    for n, by_method in results.items():
        floor = by_method["numpy copy"][0]
        for method, (best, median) in by_method.items():
            mb_s = n * 4 / best / 1e6
            rows.append([f"{n:,}", method, fmt_seconds(best), fmt_seconds(median), f"{mb_s:,.0f}",
                         f"{best / floor:.1f}x"])
    fed = {n: r["fedmq msgpack"][0] for n, r in results.items()}
    ratios = "; ".join(
        f"{n:,} floats: fedmq takes {fed[n] / r['numpy copy'][0]:.1f}x the time of a numpy copy and "
        f"{fed[n] / r['pickle'][0]:.2f}x that of pickle; torch.save/load takes "
        f"{r['torch.save/load'][0] / fed[n]:.1f}x fedmq's time"
        for n, r in results.items())
    return "\n\n".join([
        machine.note().markdown(),
        f"One float32 tensor, encode + decode per call (best of {repeats} samples; the median shows the noise "
        "of the shared machine). fedmq = `pack(encode_tensors)` + `decode_tensors(unpack)`, which decodes to a "
        "zero-copy read-only view; pickle protocol 5; torch.save/load through BytesIO; numpy copy = "
        "`arr.copy()`, the memory-bandwidth floor. MB/s counts the tensor's bytes once.",
        table(["floats", "method", "best", "median", "MB/s", "vs numpy copy"], rows),
        f"Ratios (best vs best, same run): {ratios}.",
    ])
