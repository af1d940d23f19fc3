"""Benchmarks: `python -m bench.run_all` (`make bench`) writes its sections of BENCHMARKS.md."""
