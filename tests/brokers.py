"""Finding or starting a RabbitMQ broker for the tests.

Order (DEVELOPERS.md): FEDMQ_BROKER_URL -> a broker on localhost:5672 -> a testcontainers
RabbitMQ when a Docker engine answers -> a private `rabbitmq-server` node started here.

A `PrivateBroker` is a node of our own (own node name, ports, mnesia and log dirs in a temp dir)
that a test may stop and restart freely; the shared broker is never stopped or reconfigured.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pika

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def broker_answers(url: str, timeout: float = 3.0) -> bool:
    try:
        params = pika.URLParameters(url)
        params.socket_timeout = timeout
        params.connection_attempts = 1
        pika.BlockingConnection(params).close()
        return True
    except Exception:
        return False


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port that is free now and stays free until a node binds it.

    A port the kernel hands out for `bind(0)` lies in the ephemeral range, where any outgoing
    connection (pika's, Erlang distribution's) may take it as its local port before the node
    starts listening: CI lost a cluster node that way (could_not_start_listener). Ports below the
    ephemeral range are only ever taken by explicit binds.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below the ephemeral range (< {low}) after 200 tries")


class PrivateBroker:
    """A throw-away RabbitMQ node on its own ports; `restart` keeps its data (quorum queues,
    streams) like a real broker restart does."""

    def __init__(self, base: Path | None = None, *, management: bool = False) -> None:
        self.base = base or Path(tempfile.mkdtemp(prefix="fedmq-rmq-"))
        self.port = free_port()
        self.dist_port = free_port()
        self.name = f"fedmq{self.port}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        #: the management plugin's HTTP port when asked for (its own port, like the node's others)
        self.management_port = free_port() if management else None
        (self.base / "enabled_plugins").write_text("[rabbitmq_management].\n" if management else "[].\n")
        conf = f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        if self.management_port:
            conf += f"management.tcp.port = {self.management_port}\nmanagement.tcp.ip = 127.0.0.1\n"
        (self.base / "rabbitmq.conf").write_text(conf)

    @property
    def management_url(self) -> str:
        assert self.management_port, "started without management=True"
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @staticmethod
    def available() -> bool:
        return Path(SERVER).exists() or shutil.which("rabbitmq-server") is not None

    def start(self, timeout: float = 60.0) -> None:
        env = dict(os.environ)
        env.update({
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
            "HOME": str(self.base),
        })
        server = SERVER if Path(SERVER).exists() else shutil.which("rabbitmq-server")
        assert server, "rabbitmq-server is not installed"
        out = (self.base / "server.out").open("ab")
        self.proc = subprocess.Popen([server], env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"private broker exited: {(self.base / 'server.out').read_text()[-2000:]}")
            if broker_answers(self.url, timeout=1.0):
                return
            time.sleep(0.5)
        # a node still booting would outlive the test (and hold its ports): stop it before raising;
        # it has no state worth a graceful stop, and a booting node may ignore SIGTERM for a while
        self.stop(timeout=2.0)
        raise RuntimeError(f"private broker on port {self.port} did not answer within {timeout}s; stopped it "
                           f"(its output: {self.base / 'server.out'})")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop only this node: its own process group, by pid."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        # the listener may linger for a moment after the process group is gone
        deadline = time.monotonic() + 10
        while broker_answers(self.url, timeout=0.5) and time.monotonic() < deadline:
            time.sleep(0.2)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
