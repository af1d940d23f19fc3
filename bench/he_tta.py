"""Homomorphic aggregation: time to accuracy, HE vs plaintext demos (the code is in bench/he_bench.py;
this module lets bench.run_all write it as a section of its own)."""

from __future__ import annotations

from bench.he_bench import run_time_to_accuracy
from fedmq.shared.broker import DEFAULT_URL


def run(url: str = DEFAULT_URL, quick: bool = False) -> str:
    return run_time_to_accuracy(url, quick=quick)
