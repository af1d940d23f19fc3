"""Homomorphic aggregation: per-update cost of CKKS against plaintext, and time to accuracy.

Per update (one float32 tensor of 100k / 1M parameters, default CKKS parameters):

* encrypt — the site: plaintext = `Update.encode` (the framed delta); CKKS = encrypt every
  4096-value chunk (`shared.he.encrypt_update`) + `Update.encode`;
* aggregate — the aggregator, per update: plaintext = decode + `Accumulator.fold`; CKKS = decode +
  parse and check every chunk (`check_ciphertext`) + multiply by the weight and add
  (`CiphertextAccumulator.fold`);
* decrypt — the key holder, once per version: CKKS = decrypt the sum and apply it
  (`decrypt_step`); plaintext = `apply_sum` of the same sum in plaintext (the same division and
  addition, no decryption). Neither side folds here: folding is the "aggregate" row;
* bytes — the Update message on the wire, and for CKKS the EncryptedAggregate sent to the key holder;
* sign / verify — Ed25519 over `Update.signing_bytes()` (site / aggregator), which covers the delta
  or the ciphertext, so it grows with the message.

Time to accuracy runs `fedmq demo --json` (digits, 8 sites, FedBuff K=3, signed) with
``--privacy none`` and ``--privacy he``, alternating, as real processes on the test broker; each
demo's job is deleted afterwards, whether it succeeded or not.

    python -m bench.he_bench [--part micro|demo|all] [--quick] [--demo-runs N] [--broker URL]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import uuid
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.common import ROOT, Machine, best_and_median, fmt_seconds, replace_section, run_group, table
from fedmq.aggregator.he import CiphertextAccumulator, JobKeys, apply_sum, check_ciphertext, decrypt_step
from fedmq.aggregator.strategy import Accumulator, learning_rate
from fedmq.shared import he
from fedmq.shared.broker import DEFAULT_URL, Connection, JobNames
from fedmq.shared.config import StrategyConfig
from fedmq.shared.messages import EncryptedAggregate, Update
from fedmq.shared.signing import public_hex, sign_update, verify_update

TITLE = "Homomorphic aggregation"
TITLE_DEMO = "Homomorphic aggregation: time to accuracy"
SIZES = (100_000, 1_000_000)


def _update(n: int) -> Update:
    rng = np.random.default_rng(0)
    delta = {"w": (0.01 * rng.normal(size=n)).astype(np.float32)}
    return Update(job="bench", update_id="u", task_id="t", site="s", base_version=0, num_samples=100,
                  delta=delta)


def measure_update(n: int, keys: he.KeyPair, repeats: int) -> dict[str, Any]:
    """One size: (best, median) seconds per step and message bytes, plaintext and CKKS."""
    cfg = StrategyConfig()
    update = _update(n)
    assert update.delta is not None
    parent = {"w": np.zeros(n, np.float32)}
    public, (secret, _) = he.load_public(keys.public), he.load_secret(keys.secret)
    slots = 4096
    jk = JobKeys.of(public, keys.sha256, slots, he.Layout.of(parent))
    plain_body = update.encode()
    acc = Accumulator(cfg)

    def plain_fold() -> None:
        u = Update.decode(plain_body)
        acc.fold(update_id=u.update_id, site=u.site, delta=u.delta or {}, tau=0, num_samples=u.num_samples,
                 base_version=0)

    # the plaintext sum the key holder would hold had nothing been encrypted (one update, weight 1)
    layout = he.Layout.of(parent)
    plain_sum = layout.flatten(update.delta).astype(np.float64)

    def plain_apply() -> None:
        apply_sum(parent, plain_sum, layout, 1.0, learning_rate(cfg))

    enc = he.encrypt_update(update, public, keys.sha256, slots)
    enc_body = enc.encode()
    hacc = CiphertextAccumulator(cfg)

    def he_fold() -> None:
        u = Update.decode(enc_body)
        hacc.fold(update_id=u.update_id, site=u.site, vectors=check_ciphertext(u, jk), tau=0,
                  num_samples=u.num_samples, base_version=0)

    he_fold()
    total = hacc.flush()
    agg = EncryptedAggregate(job="bench", aggregate_id="agg-v1", version=1, parent=0, included=("u",),
                             contributions=tuple(total.contributions), strategy="fedbuff",
                             params=cfg.to_params(), denominator=total.denominator,
                             sample_ref=total.sample_ref, context_sha256=keys.sha256, size=n,
                             chunks=tuple(total.chunks), ciphertext_sha256=total.sha256)
    decrypted = decrypt_step(secret, parent, total.chunks, total.denominator, cfg)
    error = float(np.abs(decrypted["w"] - update.delta["w"]).max())
    heavy = dict(repeats=repeats, min_seconds=0.0)
    key = Ed25519PrivateKey.generate()
    registry = {"s": public_hex(key)}
    signed_plain, signed_enc = sign_update(update, key), sign_update(enc, key)
    return {
        "plain": {"encode": best_and_median(update.encode, repeats=repeats),
                  "sign": best_and_median(lambda: sign_update(update, key), **heavy),  # type: ignore[arg-type]
                  "verify": best_and_median(lambda: verify_update(signed_plain, registry),
                                            **heavy),  # type: ignore[arg-type]
                  "fold": best_and_median(plain_fold, repeats=repeats),
                  "apply": best_and_median(plain_apply, repeats=repeats),
                  "bytes": len(plain_body)},
        "ckks": {"encode": best_and_median(lambda: he.encrypt_update(update, public, keys.sha256, slots).encode(),
                                           **heavy),  # type: ignore[arg-type]
                 "fold": best_and_median(he_fold, **heavy),  # type: ignore[arg-type]
                 "apply": best_and_median(lambda: decrypt_step(secret, parent, total.chunks, total.denominator,
                                                               cfg), **heavy),  # type: ignore[arg-type]
                 "sign": best_and_median(lambda: sign_update(enc, key), **heavy),  # type: ignore[arg-type]
                 "verify": best_and_median(lambda: verify_update(signed_enc, registry),
                                           **heavy),  # type: ignore[arg-type]
                 "bytes": len(enc_body), "aggregate_bytes": len(agg.encode()), "max_abs_error": error},
    }


def run_demo(privacy: str, broker: str, seed: int) -> dict[str, Any]:
    """One demo as real processes (its whole process group is killed on a timeout); its job is
    deleted from the broker afterwards, on failure too."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    job = f"bench-he-{privacy}-{uuid.uuid4().hex[:8]}"
    try:
        out = run_group([sys.executable, "-m", "fedmq", "demo", "--json", "--privacy", privacy, "--job", job,
                         "--seed", str(seed), "--broker", broker, "--log-level", "warning"],
                        timeout=900, cwd=ROOT, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"demo --privacy {privacy} failed ({out.returncode}): {out.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result
    finally:
        with Connection(broker, name="fedmq-bench-cleanup").open() as conn:
            conn.delete_job(JobNames(job))


def _per_update_section(results: dict[int, dict[str, Any]]) -> str:
    rows = []
    for n, r in results.items():
        p, c = r["plain"], r["ckks"]
        for step, label in (("encode", "encrypt (site)"), ("fold", "aggregate, per update"),
                            ("apply", "decrypt + apply (key holder, per version)"),
                            ("sign", "sign (site, Ed25519)"), ("verify", "verify signature (aggregator)")):
            rows.append([f"{n:,}", label, fmt_seconds(p[step][0]), fmt_seconds(c[step][0]),
                         fmt_seconds(c[step][1]), f"{c[step][0] / p[step][0]:,.0f}x"])
        rows.append([f"{n:,}", "update message", f"{p['bytes'] / 2**20:.2f} MiB", f"{c['bytes'] / 2**20:.2f} MiB",
                     "", f"{c['bytes'] / p['bytes']:.1f}x"])
        rows.append([f"{n:,}", "aggregate message (to key holder)", "—", f"{c['aggregate_bytes'] / 2**20:.2f} MiB",
                     "", ""])
    errors = ", ".join(f"{n:,}: {r['ckks']['max_abs_error']:.1e}" for n, r in results.items())
    return "\n\n".join([
        table(["parameters", "step", "plaintext (best)", "CKKS (best)", "CKKS (median)", "CKKS / plaintext"], rows),
        f"Largest absolute error of a decrypted delta (values ~0.01): {errors}. Plaintext 'encrypt' is the "
        "encoding alone (`Update.encode`); plaintext 'decrypt + apply' is `apply_sum` of the same sum in plaintext "
        "(CKKS: decrypt, then the same `apply_sum`); neither side folds in that row. The ratios are the "
        "whole cost CKKS adds at each role, not a comparison of two ciphers.",
    ])


def _demo_section(runs: list[dict[str, Any]]) -> str:
    rows = []
    for privacy in ("none", "he"):
        mine = [r for r in runs if r["privacy_arg"] == privacy]
        for r in mine:
            rows.append([privacy, str(r["seconds_to_target"]), f"{r['final_accuracy']:.4f}", str(r["versions"]),
                         str(r["updates_applied"]), f"{r['wall_seconds']:.1f}"])
    medians, med = [], {}
    for privacy in ("none", "he"):
        t = [r["seconds_to_target"] for r in runs if r["privacy_arg"] == privacy and r["seconds_to_target"]]
        if t:
            med[privacy] = statistics.median(t)
            medians.append(f"{privacy}: {med[privacy]:.1f} s")
    if len(med) == 2:
        medians.append(f"ratio he / none {med['he'] / med['none']:.2f}")
    return "\n\n".join([
        table(["--privacy", "seconds to 0.90", "final accuracy", "versions", "updates applied", "wall s"], rows),
        "Median time to target: " + ", ".join(medians) + ". Run one after the other on the shared machine, "
        "so the load differs between runs; the digits MLP has 4,810 parameters (2 CKKS chunks per update). "
        "Final accuracy is that of the version the job hands over (the first at the target; "
        "`[coordinator] export = \"target\"`).",
    ])


def run(url: str = DEFAULT_URL, quick: bool = False) -> str:
    """The per-update section (no broker needed; `url` keeps bench.run_all's signature)."""
    machine = Machine()
    keys = he.generate()
    results = {n: measure_update(n, keys, repeats=3 if quick else 5) for n in SIZES}
    return "\n\n".join([
        machine.note().markdown(),
        "CKKS via TenSEAL, poly_modulus_degree 8192, coefficient moduli 60/40/60 bits, scale 2^40 "
        "(`fedmq keys` defaults): 4,096 values per ciphertext. One float32 tensor per update; "
        f"best of {3 if quick else 5} samples, the median of CKKS beside it (the machine is shared).",
        _per_update_section(results)])


def run_time_to_accuracy(broker: str = DEFAULT_URL, quick: bool = False, demo_runs: int | None = None) -> str:
    """The time-to-accuracy section: `demo_runs` pairs of demos, plaintext and HE alternating."""
    machine = Machine()
    runs = []
    for i in range(demo_runs or (1 if quick else 2)):
        for privacy in ("none", "he"):
            r = run_demo(privacy, broker, seed=i)
            runs.append({**r, "privacy_arg": privacy})
    return "\n\n".join([
        machine.note().markdown(),
        "`fedmq demo --json --privacy none|he --seed i` (digits, 8 sites of which 2 are 5x slower, "
        "Dirichlet 0.5, MLP, FedBuff K=3, target 0.90, update signing on in both), as real processes.",
        _demo_section(runs)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="all", choices=["micro", "demo", "all"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--demo-runs", type=int, default=2, help="demo pairs (none + he) for time to accuracy")
    p.add_argument("--broker", default=os.environ.get("FEDMQ_BROKER_URL", DEFAULT_URL))
    args = p.parse_args()
    if args.part in ("micro", "all"):
        body = run(args.broker, args.quick)
        replace_section(TITLE, body)
        print(body)
    if args.part in ("demo", "all"):
        body = run_time_to_accuracy(args.broker, args.quick, args.demo_runs)
        replace_section(TITLE_DEMO, body)
        print(body)


if __name__ == "__main__":
    main()
