"""`worker --site-pool`: scaled compose replicas each claim their own site file and name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmq.shared.errors import ConfigError
from fedmq.site_pool import claim_site


def _pool(tmp_path: Path, n: int) -> str:
    for i in range(n):
        np.savez(tmp_path / f"site_{i}.npz", x=np.zeros((2, 3), np.float32), y=np.zeros(2, np.int64))
    (tmp_path / "test.npz").write_bytes(b"not a site")
    return str(tmp_path / "site_*.npz")


def test_replicas_claim_distinct_sites_until_the_pool_is_exhausted(tmp_path: Path) -> None:
    pattern = _pool(tmp_path, 2)
    first, second = claim_site(pattern), claim_site(pattern)
    assert (first.site, second.site) == ("site_0", "site_1")
    assert first.data == tmp_path / "site_0.npz"
    with pytest.raises(ConfigError, match="all 2 site files are claimed"):
        claim_site(pattern)
    first.release()  # a replica that exits frees its site for the next one
    assert claim_site(pattern).site == "site_0"
    second.release()


def test_an_empty_pool_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="matches no data file"):
        claim_site(str(tmp_path / "site_*.npz"))
