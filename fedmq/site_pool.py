"""Site claiming for scaled workers: ``docker compose up --scale worker=N`` on one host.

Compose gives the N replicas of a service identical configuration, so a replica cannot be told
which site it is. Instead every replica sees the same read-only directory of per-site data files
(what ``fedmq partition`` writes) and claims the first file no other replica holds, with an
exclusive ``flock`` on the file itself. The kernel drops the lock when the process dies, so a
restarted replica claims a free site again; a file's stem becomes the site name (``site_3.npz`` ->
``site_3``), so each replica has its own data and its own identity on the broker.

flock is per host and needs a local file system (bind mounts and named volumes are; NFS is not):
across hosts, run one worker per site with ``--site`` and ``--data`` (docs/deploy.md).
"""

from __future__ import annotations

import fcntl
import glob
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fedmq.shared.broker import validate_site
from fedmq.shared.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteClaim:
    """A claimed site; the lock lives as long as `handle` stays open (the process's life)."""

    site: str
    data: Path
    handle: IO[bytes] = field(repr=False, compare=False)

    def release(self) -> None:
        self.handle.close()


def _try_lock(path: Path) -> IO[bytes] | None:
    fh = path.open("rb")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def claim_site(pattern: str) -> SiteClaim:
    """Claim the first free data file matching `pattern` (sorted, so site 0 fills first)."""
    files = sorted(Path(f) for f in glob.glob(pattern) if Path(f).is_file())
    if not files:
        raise ConfigError(f"--site-pool {pattern!r} matches no data file (mount the site files there)")
    for path in files:
        site = validate_site(path.stem)
        handle = _try_lock(path)
        if handle is not None:
            log.info("site claimed", extra={"site": site, "data": str(path)})
            return SiteClaim(site, path, handle)
    raise ConfigError(f"--site-pool {pattern!r}: all {len(files)} site files are claimed by other "
                      "workers; scale the workers down or add site files")
