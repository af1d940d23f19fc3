"""A RabbitMQ cluster of private nodes on this machine, for tests that kill a node.

Each node is a `PrivateBroker` (own node name, AMQP and distribution ports, mnesia and log dirs in
a temp dir). They share one Erlang cookie: every node's HOME (its base dir) holds the same
``.erlang.cookie``, and every `rabbitmqctl` call runs with one of those HOMEs (without it the CLI
writes a random cookie into the real $HOME and fails to authenticate). Nodes 2..N join node 1 with
``stop_app; join_cluster; start_app``. Nodes are stopped or killed by their own process group id
only; the shared broker on 5672 is never touched.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.brokers import SERVER, PrivateBroker

CTL = str(Path(SERVER).with_name("rabbitmqctl"))


class ClusterError(RuntimeError):
    """A cluster step failed; the message carries the CLI's output."""


class Cluster:
    """`size` private nodes joined into one cluster. `url` lists every node, comma-separated."""

    def __init__(self, size: int = 3, base: Path | None = None) -> None:
        self.base = base or Path(tempfile.mkdtemp(prefix="fedmq-cluster-"))
        cookie = secrets.token_hex(20).upper()
        self.nodes: list[PrivateBroker] = []
        self.formed_seconds: float | None = None  # measured by `start`
        for i in range(size):
            home = self.base / f"node{i}"
            home.mkdir(parents=True, exist_ok=True)
            (home / ".erlang.cookie").write_text(cookie)
            (home / ".erlang.cookie").chmod(0o400)
            self.nodes.append(PrivateBroker(home))

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def rotated_url(self, first: int) -> str:
        """The node list starting at node `first`: spreads clients over the nodes."""
        k = first % len(self.nodes)
        return ",".join(n.url for n in self.nodes[k:] + self.nodes[:k])

    def alive(self) -> list[PrivateBroker]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    # ------------------------------------------------------------------ CLI

    def ctl(self, node: PrivateBroker, *args: str, timeout: float = 60.0) -> str:
        """`rabbitmqctl -n NODE args` with the cluster's cookie; ClusterError on failure."""
        env = dict(os.environ, HOME=str(node.base))
        proc = subprocess.run([CTL, "-n", node.name, *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise ClusterError(f"rabbitmqctl -n {node.name} {' '.join(args)}: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def running_nodes(self, via: PrivateBroker) -> set[str]:
        """Node names `via` reports as running members of its cluster."""
        out = self.ctl(via, "cluster_status", "--formatter", "json")
        return set(json.loads(out).get("running_nodes", []))

    def queues(self, vhost: str = "/") -> dict[str, tuple[str, list[str]]]:
        """name -> (leader node, member nodes) of every quorum queue and stream, from one live node
        (one CLI call: each takes seconds on a loaded machine)."""
        for node in self.alive():
            try:
                out = self.ctl(node, "-q", "list_queues", "-p", vhost, "name", "leader", "members",
                               "--no-table-headers", timeout=90)
            except (ClusterError, subprocess.TimeoutExpired):
                continue
            got = {}
            for line in out.splitlines():
                name, _, rest = line.partition("\t")
                lead, _, members = rest.partition("\t")
                got[name] = (lead.strip(), re.findall(r"[\w.-]+@[\w.-]+", members))
            return got
        raise ClusterError("no live node answers list_queues")

    def leader(self, queue: str, vhost: str = "/") -> str:
        """The node leading quorum queue or stream `queue`, asked of a live node."""
        lead = self.queues(vhost).get(queue, ("", []))[0]
        if not lead:
            raise ClusterError(f"no live node reports a leader for {queue}")
        return lead

    def node_named(self, name: str) -> PrivateBroker:
        return next(n for n in self.nodes if n.name == name)

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 120.0) -> float:
        """Start every node (in parallel), join them to node 0; returns the seconds it took."""
        started = time.monotonic()
        errors: list[BaseException] = []

        def _start(node: PrivateBroker) -> None:
            try:
                node.start(timeout=timeout)
            except BaseException as exc:  # re-raised below, after every thread is joined
                errors.append(exc)

        threads = [threading.Thread(target=_start, args=(n,)) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", seed.name)
            self.ctl(node, "start_app")
        want = {n.name for n in self.nodes}
        deadline = time.monotonic() + timeout
        while self.running_nodes(seed) != want:
            if time.monotonic() > deadline:
                raise ClusterError(f"cluster did not form in {timeout}s: {self.running_nodes(seed)}")
            time.sleep(0.5)
        self.formed_seconds = time.monotonic() - started
        return self.formed_seconds

    def kill(self, node: PrivateBroker) -> float:
        """SIGKILL one node's process group (by pid); returns the wall-clock time of the kill."""
        assert node.proc is not None
        os.killpg(node.proc.pid, signal.SIGKILL)
        at = time.time()
        node.proc.wait(30)
        return at

    def stop(self) -> None:
        """Stop every node of this cluster by its own pid (SIGTERM, then SIGKILL)."""
        for node in self.nodes:
            try:
                node.stop(timeout=20)
            except Exception:
                if node.proc is not None and node.proc.poll() is None:
                    os.killpg(node.proc.pid, signal.SIGKILL)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
