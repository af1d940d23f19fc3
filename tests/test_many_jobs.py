"""Many jobs on one broker, as real processes: five concurrent `fedmq demo` jobs (coordinator,
aggregator, two sites each) and one alone all finish, `fedmq jobs` sees each as finished and
`fedmq delete` removes them (bench.many_jobs raises otherwise). The benchmark runs twenty."""

from __future__ import annotations

import re

import pytest

from bench import many_jobs

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(240)]


def test_five_concurrent_jobs_all_finish_and_are_deleted(broker_url: str) -> None:
    section = many_jobs.run(broker_url, jobs=5)
    assert "| 5 concurrent |" in section and "listed `finished`" in section
    assert re.search(r"Wall time for all 5: \S+", section)
