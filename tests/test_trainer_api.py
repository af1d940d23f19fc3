"""The site-side trainer API (fedmq.site): a site trains with PyTorch code of its own, given as
`fedmq worker --trainer module:callable` or from Python (`run_site`, `start_site`), through the
one worker; whatever the trainer returns is checked before it can become an update.

Jobs run on the real broker: coordinator and aggregator on threads, sites on threads or as real
`fedmq worker` processes. The trainers are in tests/user_trainer.py, as a site operator writes them.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmq.aggregator.service import Aggregator
from fedmq.coordinator.service import Coordinator, JobResult
from fedmq.shared.broker import JobNames, read_stream
from fedmq.shared.config import JobConfig, load_job_config
from fedmq.shared.datasets import load_site, save_site, write_partition
from fedmq.shared.errors import ConfigError, NonFiniteError, ShapeMismatchError, TrainingFailedError
from fedmq.shared.jobstate import read_event_delivery
from fedmq.shared.messages import EventKind, Task, Update
from fedmq.shared.models import build_model, get_weights, model_spec
from fedmq.shared.privacy import PrivacyLedger
from fedmq.shared.signing import generate_site_key
from fedmq.site import SiteHandle, TrainContext, TrainResult, TrainResultError, make_site, sgd_trainer, start_site
from fedmq.worker.service import Worker, WorkerOptions
from fedmq.worker.train import base_model, finish, run_trainer, task_seed, train_local
from tests import user_trainer
from tests.conftest import ROOT, child_env, fedmq_cmd
from tests.jobkit import dead_letters, run_threaded_job, versions

pytestmark = pytest.mark.timeout(120)

TRAINER = "tests.user_trainer:adam_trainer"


# ---------------------------------------------------------------------------- the contract, no broker


def _context(mu: float = 0.0, rows: int = 60) -> TrainContext:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(rows, 64)).astype(np.float32), rng.integers(0, 10, rows).astype(np.int64)
    spec = model_spec("mlp", (64,), 10)
    base = get_weights(build_model(spec, seed=0))
    cpu = __import__("torch").device("cpu")
    return TrainContext(model=base_model(spec, base, cpu), x=x, y=y, epochs=2, batch_size=16, lr=0.1, mu=mu,
                        seed=task_seed("t-1"), device=cpu, task_id="t-1", version=0, base=base, model_spec=spec)


@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_the_bundled_trainer_through_the_interface_is_train_local_bit_for_bit(mu: float) -> None:
    ctx = _context(mu)
    old = train_local(ctx.model_spec, ctx.base, ctx.x, ctx.y, epochs=2, batch_size=16, lr=0.1, mu=mu,
                      seed=task_seed("t-1"))
    new = run_trainer(sgd_trainer, ctx)
    assert list(new.delta) == list(old.delta)
    assert all(np.array_equal(new.delta[k], old.delta[k]) for k in old.delta)
    assert new.num_samples == old.num_samples == 60 and new.metrics["loss"] == old.metrics["loss"]


def test_user_trainers_return_a_model_or_a_delta_of_tensors_in_any_order() -> None:
    ctx = _context(mu=0.1)
    adam = run_trainer(user_trainer.adam_trainer, ctx)
    assert adam.num_samples == 60 and adam.metrics["trainer"] == "adam" and adam.metrics["steps"] == 8
    assert adam.metrics["last_lr"] == pytest.approx(0.1 * 0.5 ** 2)  # StepLR halved it each epoch
    assert any(np.abs(v).max() > 0 for v in adam.delta.values())
    ctx = _context()
    delta = run_trainer(user_trainer.delta_trainer, ctx)
    assert list(delta.delta) == list(ctx.base) and delta.num_samples == 30  # the model's order, not the dict's
    assert all(delta.delta[k].dtype == ctx.base[k].dtype for k in ctx.base)


def _results(ctx: TrainContext) -> dict[str, tuple[Any, type[Exception], str]]:
    """Results no update may be made of: (what the trainer returned, error, words of its message)."""
    good = {k: np.zeros_like(v) for k, v in ctx.base.items()}
    first = next(iter(good))
    return {
        "a dict": ({"model": ctx.model}, TrainResultError, "returned dict, not a fedmq.site.TrainResult"),
        "neither": (TrainResult(), TrainResultError, "exactly one"),
        "both": (TrainResult(model=ctx.model, delta=good), TrainResultError, "exactly one"),
        "missing tensor": (TrainResult(delta={k: v for k, v in good.items() if k != first}),
                           ShapeMismatchError, f"missing ['{first}']"),
        "float64": (TrainResult(delta={**good, first: good[first].astype(np.float64)}), ShapeMismatchError,
                    "float64"),
        "half model": (TrainResult(model=ctx.model.half()), ShapeMismatchError, "float16"),
        "inf": (TrainResult(delta={**good, first: np.full_like(good[first], np.inf)}), NonFiniteError,
                "NaN or Inf"),
        "list delta": (TrainResult(delta={**good, first: [0.0]}), TrainResultError, "not a torch tensor"),
        "no samples": (TrainResult(delta=good, num_samples=0), TrainResultError, "must be in [1, 60]"),
        "more samples than rows": (TrainResult(delta=good, num_samples=61), TrainResultError, "[1, 60]"),
        "bool samples": (TrainResult(delta=good, num_samples=True), TrainResultError, "not an int"),
        "NaN metric": (TrainResult(delta=good, metrics={"loss": float("nan")}), TrainResultError, "NaN"),
        "array metric": (TrainResult(delta=good, metrics={"acc": np.zeros(3)}), TrainResultError, "an array"),
        "object metric": (TrainResult(delta=good, metrics={"o": object()}), TrainResultError, "is a object"),
    }


@pytest.mark.parametrize("case", list(_results(_context())))
def test_results_that_cannot_be_updates_are_refused_with_the_reason(case: str) -> None:
    ctx = _context()
    returned, error, words = _results(ctx)[case]
    with pytest.raises(error) as info:
        finish(returned, ctx)
    assert words in str(info.value)


def test_metrics_may_be_tensors_and_numpy_scalars() -> None:
    import torch

    ctx = _context()
    good = {k: np.zeros_like(v) for k, v in ctx.base.items()}
    res = finish(TrainResult(delta=good, num_samples=np.int64(7),
                             metrics={"loss": torch.tensor(0.5), "acc": np.float32(0.25), "note": "x" * 999}), ctx)
    assert res.num_samples == 7 and res.metrics == {"loss": 0.5, "acc": 0.25, "note": "x" * 200}


def test_the_python_api_refuses_bad_trainers_and_options_before_connecting(tmp_path: Path) -> None:
    data = tmp_path / "s.npz"
    save_site(data, np.zeros((4, 64), np.float32), np.arange(4))
    with pytest.raises(ConfigError, match="cannot be imported"):
        make_site("amqp://127.0.0.1:1/%2F", "j", "s", data, trainer="no_such_module:fn")
    with pytest.raises(ConfigError, match="must be a callable"):
        make_site("amqp://127.0.0.1:1/%2F", "j", "s", data, trainer=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown worker option"):
        make_site("amqp://127.0.0.1:1/%2F", "j", "s", data, devise="cpu")
    with pytest.raises(ConfigError, match="labels"):  # arrays are checked like a data file
        make_site("amqp://127.0.0.1:1/%2F", "j", "s", (np.zeros((4, 64)), np.zeros((4, 2))))


# ---------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("trainer, words, via", [
    ("no_such_module:train", "trainer 'no_such_module:train' cannot be imported on this machine", "flag"),
    ("no_such_module:train", "trainer 'no_such_module:train' cannot be imported on this machine", "env"),
    ("tests.user_trainer", "must look like package.module:callable", "flag"),
    ("tests.user_trainer:nope", "cannot be imported", "flag"),
    ("tests.user_trainer:NOT_CALLABLE", "is not callable", "env"),
    ("tests.user_trainer:two_args", "must take one argument", "flag"),
])
def test_a_bad_trainer_exits_2_with_one_line(tmp_path: Path, trainer: str, words: str, via: str) -> None:
    data = tmp_path / "s.npz"
    save_site(data, np.zeros((4, 8), np.float32), np.arange(4))
    args = ["worker", "--job", "j", "--site", "s", "--data", str(data), "--broker", "amqp://127.0.0.1:1/%2F",
            "--broker-wait", "0"]
    env = child_env(FEDMQ_TRAINER=trainer) if via == "env" else child_env()
    if via == "flag":
        args += ["--trainer", trainer]
    out = subprocess.run(fedmq_cmd(*args), capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedmq: ") and words in lines[0], out.stderr


# ---------------------------------------------------------------------------- jobs on the broker


def _config(job: str, tmp_path: Path, test_file: Path, *, lr: float = 0.01, target: float = 0.85,
            max_versions: int = 200, concurrency: int = 3, **sections: dict[str, Any]) -> JobConfig:
    return load_job_config(overrides={
        "job": job, "data": {"test": str(test_file)}, "model": {"name": "logreg"},
        "strategy": {"name": "fedbuff", "buffer_size": 2, "flush_timeout": 2.0},
        "training": {"epochs": 1, "batch_size": 16, "lr": lr},
        "coordinator": {"concurrency": concurrency, "target_accuracy": target, "max_seconds": 90,
                        "max_versions": max_versions, "out": str(tmp_path / "out")},
        **sections,
    }, environ={})


def _job_roles(url: str, cfg: JobConfig) -> tuple[Coordinator, Aggregator]:
    return Coordinator(url, cfg, stop=threading.Event()), Aggregator(url, cfg.job, stop=threading.Event(),
                                                                     name="agg-trainer")


def _run_with_sites(coord: Coordinator, agg: Aggregator, sites: list[SiteHandle]) -> tuple[Any, list[Any]]:
    """The job to its end with the sites already running on threads; the sites stopped whatever happens."""
    try:
        result = run_threaded_job(coord, agg, [])
        return result, [h.join(60) for h in sites]
    finally:
        for h in sites:
            h.stop()


def _logged_updates(url: str, job: str) -> list[Update]:
    return [Update.decode(d.body) for d in read_stream(url, JobNames(job).updates_log, "first")]


def _events(url: str, job: str, kind: EventKind) -> list[Any]:
    return [sev for d in read_stream(url, JobNames(job).events, "first")
            if (sev := read_event_delivery(d)).event.event == kind]


@pytest.mark.broker
def test_sites_running_a_trainer_given_as_module_callable_reach_the_target(
        broker_url: str, job: str, tmp_path: Path) -> None:
    """Two real `fedmq worker` processes, one with --trainer, one with FEDMQ_TRAINER."""
    part = write_partition(tmp_path / "data", "digits", 2, scheme="dirichlet", alpha=1.0, seed=0)
    cfg = _config(job, tmp_path, part.test_file, concurrency=2)
    coord, agg = _job_roles(broker_url, cfg)
    base = ["worker", "--broker", broker_url, "--job", job, "--device", "cpu"]
    logs = [tmp_path / f"site-{i}.log" for i in range(2)]
    with logs[0].open("w") as log0, logs[1].open("w") as log1:
        procs = [
            subprocess.Popen(fedmq_cmd(*base, "--site", "site-0", "--data", str(part.site_files[0]),
                                       "--trainer", TRAINER), env=child_env(), cwd=ROOT, stderr=log0),
            subprocess.Popen(fedmq_cmd(*base, "--site", "site-1", "--data", str(part.site_files[1])),
                             env=child_env(FEDMQ_TRAINER=TRAINER), cwd=ROOT, stderr=log1),
        ]
        try:
            result = run_threaded_job(coord, agg, [])
            codes = [p.wait(60) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
    assert result.stop_reason == "target_accuracy", result
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
    updates = _logged_updates(broker_url, job)
    assert {u.site for u in updates} == {"site-0", "site-1"}
    rows = {f"site-{i}": len(load_site(f)[1]) for i, f in enumerate(part.site_files)}
    for u in updates:  # every update came out of the user's loop: its metrics say so
        assert u.metrics["trainer"] == "adam" and u.metrics["last_lr"] == pytest.approx(cfg.training.lr / 2)
        assert u.num_samples == rows[u.site] and u.update_id == f"u-{u.task_id}"
    assert not dead_letters(broker_url, job)


@pytest.mark.broker
def test_the_python_api_runs_signed_sites_in_process(broker_url: str, job: str, tmp_path: Path) -> None:
    """`start_site` with a callable and arrays, and with a 'module:callable' string and a file;
    the job requires signatures, so a single unsigned update would be dead-lettered."""
    part = write_partition(tmp_path / "data", "digits", 2, scheme="iid", seed=1)
    keys = {s: generate_site_key(tmp_path / "keys", s)[0] for s in ("site-0", "site-1")}
    cfg = _config(job, tmp_path, part.test_file, concurrency=2,
                  signing={"registry": str(tmp_path / "keys" / "registry.json")})
    coord, agg = _job_roles(broker_url, cfg)
    x, y = load_site(part.site_files[0])
    sites: list[SiteHandle] = [
        start_site(broker_url, job, "site-0", (x, y), trainer=user_trainer.adam_trainer, device="cpu",
                   key=str(keys["site-0"]), ledger=str(tmp_path / "site-0.ledger.json")),
        start_site(broker_url, job, "site-1", part.site_files[1], trainer=TRAINER, device="cpu",
                   key=str(keys["site-1"])),
    ]
    result, stats = _run_with_sites(coord, agg, sites)
    assert result.stop_reason == "target_accuracy", result
    assert all(s.tasks > 0 and s.failures == 0 for s in stats), stats
    updates = _logged_updates(broker_url, job)
    assert all(len(u.signature) == 64 and u.metrics["trainer"] == "adam" for u in updates)
    assert sum(s.tasks for s in stats) == len({u.update_id for u in updates})
    assert not dead_letters(broker_url, job)


@pytest.mark.broker
def test_a_trainer_returning_nan_or_wrong_shapes_fails_its_tasks_and_poisons_nothing(
        broker_url: str, job: str, tmp_path: Path) -> None:
    part = write_partition(tmp_path / "data", "digits", 4, scheme="iid", seed=2)
    cfg = _config(job, tmp_path, part.test_file, lr=0.1, concurrency=4)
    coord, agg = _job_roles(broker_url, cfg)
    bad: dict[str, SiteHandle] = {
        "site-2": start_site(broker_url, job, "site-2", part.site_files[2], trainer=user_trainer.nan_trainer,
                             device="cpu", max_failures=3),
        "site-3": start_site(broker_url, job, "site-3", part.site_files[3],
                             trainer="tests.user_trainer:wrong_shape_trainer", device="cpu", max_failures=3),
    }
    good = [Worker(broker_url, job, f"site-{i}", part.site_files[i], options=WorkerOptions(device="cpu"))
            for i in range(2)]
    try:
        result = run_threaded_job(coord, agg, good)
    finally:
        for h in bad.values():
            h.stop()
    assert result.stop_reason == "target_accuracy", result
    for site, h in bad.items():  # each bad site stopped after 3 failures in a row, saying why
        with pytest.raises(TrainingFailedError, match="3 tasks in a row"):
            h.join(30)
        assert h.stats.tasks == 0 and h.stats.failures == 3, (site, h.stats)
    failed = _events(broker_url, job, EventKind.TASK_FAILED)
    errors = {site: [sev.data["error"] for sev in failed if sev.site == site] for site in bad}
    assert len(errors["site-2"]) == 3 and all(e.startswith("NonFiniteError: delta tensor") for e in errors["site-2"])
    assert len(errors["site-3"]) == 3 and all(e.startswith("ShapeMismatchError:") for e in errors["site-3"])
    # nothing of theirs left the site: no update, no contribution; every version finite
    assert {u.site for u in _logged_updates(broker_url, job)} <= {"site-0", "site-1"}
    # the only dead letters are the failed tasks the sites rejected (the broker's DLX), no update
    failed_tasks = {sev.data["task_id"] for sev in failed}
    assert {Task.decode(dl.body).task_id for dl in dead_letters(broker_url, job)} <= failed_tasks
    for mv in versions(broker_url, job):
        assert {c["site"] for c in mv.contributions} <= {"site-0", "site-1"}
        assert all(np.isfinite(w).all() for w in mv.weights.values())


def _wait_until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


@pytest.mark.broker
def test_dp_sgd_refuses_a_user_trainer_before_charging_and_the_task_goes_to_the_others(
        broker_url: str, job: str, tmp_path: Path) -> None:
    part = write_partition(tmp_path / "data", "digits", 2, scheme="iid", seed=3)
    cfg = _config(job, tmp_path, part.test_file, lr=0.3, max_versions=3, target=0.99,
                  privacy={"mechanism": "dp_sgd", "epsilon": 50.0, "noise_multiplier": 1.0, "max_grad_norm": 1.0})
    coord, agg = _job_roles(broker_url, cfg)
    ledger = tmp_path / "site-1.ledger.json"
    mine = start_site(broker_url, job, "site-1", part.site_files[1], trainer=user_trainer.adam_trainer,
                      device="cpu", ledger=str(ledger))
    bundled = Worker(broker_url, job, "site-0", part.site_files[0],
                     options=WorkerOptions(device="cpu", ledger=str(tmp_path / "site-0.ledger.json")))
    try:
        result: JobResult = run_threaded_job(coord, agg, [bundled])
    finally:
        mine.stop()
    with pytest.raises(ConfigError, match="uses DP-SGD, which needs the bundled trainer"):
        mine.join(30)
    assert result.stop_reason == "max_versions", result
    assert mine.stats.tasks == 0 and not ledger.exists()  # refused before anything was charged
    updates = _logged_updates(broker_url, job)
    assert {u.site for u in updates} == {"site-0"} and all(u.privacy["mechanism"] == "dp_sgd" for u in updates)


@pytest.mark.broker
def test_dp_fedavg_at_the_site_charges_the_ledger_for_every_update_of_a_user_trainer(
        broker_url: str, job: str, tmp_path: Path) -> None:
    part = write_partition(tmp_path / "data", "digits", 2, scheme="iid", seed=4)
    cfg = _config(job, tmp_path, part.test_file, max_versions=4, target=0.99, concurrency=2,
                  privacy={"mechanism": "dp_fedavg", "noise_at": "site", "epsilon": 200.0, "noise_multiplier": 0.3,
                           "clip_norm": 0.5})
    coord, agg = _job_roles(broker_url, cfg)
    ledgers = {s: tmp_path / f"{s}.ledger.json" for s in ("site-0", "site-1")}
    sites = [start_site(broker_url, job, s, part.site_files[i], trainer=user_trainer.adam_trainer, device="cpu",
                        ledger=str(ledgers[s])) for i, s in enumerate(ledgers)]
    result, stats = _run_with_sites(coord, agg, sites)
    assert result.stop_reason == "max_versions", result
    updates = _logged_updates(broker_url, job)
    assert updates and all(u.privacy["mechanism"] == "dp_fedavg" and u.privacy["epsilon"] > 0 for u in updates)
    for (site, path), st in zip(ledgers.items(), stats, strict=True):
        spends = PrivacyLedger(path, site).spends()
        published = {u.task_id for u in updates if u.site == site}
        assert len(spends) >= st.tasks == len(published) > 0  # write-ahead: charged for every one
        assert published <= {sp.task_id for sp in spends}


@pytest.mark.broker
def test_an_encrypted_signed_job_with_user_trainers_reaches_the_target(
        broker_url: str, job: str, tmp_path: Path) -> None:
    """CKKS and signatures act on the update after training: a user trainer changes nothing there."""
    from fedmq.shared import he

    part = write_partition(tmp_path / "data", "digits", 2, scheme="iid", seed=5)
    files = he.write_keys(tmp_path / "keys", job)
    keys = {s: generate_site_key(tmp_path / "keys", s)[0] for s in ("site-0", "site-1")}
    cfg = _config(job, tmp_path, part.test_file, concurrency=2,
                  encryption={"scheme": "ckks", "public_context": str(files.public),
                              "secret_context": str(files.secret)},
                  signing={"registry": str(tmp_path / "keys" / "registry.json")})
    coord, agg = _job_roles(broker_url, cfg)
    sites = [start_site(broker_url, job, s, part.site_files[i], trainer=user_trainer.adam_trainer, device="cpu",
                        key=str(keys[s])) for i, s in enumerate(keys)]
    result, stats = _run_with_sites(coord, agg, sites)
    assert result.stop_reason == "target_accuracy", result
    assert all(s.tasks > 0 for s in stats), stats
    logged = _logged_updates(broker_url, job)
    assert logged and all(u.delta is None and u.ciphertext and len(u.signature) == 64 for u in logged)
    assert all(u.metrics["trainer"] == "adam" for u in logged)
    assert not dead_letters(broker_url, job)
