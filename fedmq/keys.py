"""`fedmq keys`: a job's CKKS key pair (--job) and sites' Ed25519 signing keys (--site).

    fedmq keys --job J --out keys/      keys/J.public.ctx  -> [encryption] public_context
                                        keys/J.secret.ctx  -> the key holder only (mode 0600)
    fedmq keys --site a --site b --out keys/
                                        keys/a.key         -> site a's worker --key (mode 0600)
                                        keys/registry.json -> [signing] registry
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmq.shared.errors import ConfigError

log = logging.getLogger(__name__)


def _bits(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of bit sizes") from None


def cmd_keys(args: argparse.Namespace) -> int:
    from fedmq.cli import print_json
    from fedmq.shared import he
    from fedmq.shared.broker import validate_job_id
    from fedmq.shared.signing import REGISTRY_FILE, generate_site_key

    if not args.job and not args.site:
        raise ConfigError("fedmq keys needs --job (CKKS key pair) and/or --site (signing key)")
    result: dict[str, Any] = {}
    if args.job:
        params = he.CkksParams(args.poly_modulus_degree, args.coeff_mod_bit_sizes, args.scale_bits)
        files = he.write_keys(args.out, validate_job_id(args.job), params, force=args.force)
        result.update(job=args.job, public_context=str(files.public), secret_context=str(files.secret),
                      context_sha256=files.sha256, public_bytes=files.public.stat().st_size,
                      slots=params.slots)
        log.info("CKKS key pair written", extra={"job": args.job, "public": str(files.public),
                                                  "secret": str(files.secret), "sha256": files.sha256[:12]})
    if args.site:
        sites = {}
        for site in args.site:
            path, hex_key = generate_site_key(args.out, site, force=args.force)
            sites[site] = {"key": str(path), "public_key": hex_key}
            log.info("site key written", extra={"site": site, "key": str(path)})
        result.update(sites=sites, registry=str(Path(args.out) / REGISTRY_FILE))
    if args.json:
        print_json(result)
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


def register(sub: Any, add_common: Callable[..., None]) -> None:
    p = sub.add_parser("keys", help="create a job's CKKS key pair and/or sites' signing keys",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common(p, job=False)
    p.add_argument("--job", help="create the job's CKKS context: <job>.public.ctx and <job>.secret.ctx")
    p.add_argument("--site", action="append", default=[],
                   help="create an Ed25519 key for this site and add it to registry.json (repeatable)")
    p.add_argument("--out", required=True, help="directory for the key files")
    p.add_argument("--poly-modulus-degree", type=int, default=8192, help="CKKS ring degree (slots = half)")
    p.add_argument("--coeff-mod-bit-sizes", type=_bits, default=(60, 40, 60),
                   help="CKKS coefficient moduli in bits, comma-separated")
    p.add_argument("--scale-bits", type=int, default=40, help="CKKS scale = 2**bits")
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p.add_argument("--json", action="store_true", help="print the file names as one JSON object")
    p.set_defaults(run=cmd_keys)
