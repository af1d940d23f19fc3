"""docs/deploy.md's remote site, for real: a worker process reaches a broker over `amqps://` with
its own user and exactly the documented permissions, trains one task and publishes its update;
the same user cannot publish as another site, issue tasks or declare anything. Runs on a private
node of the test's own (TLS listener, users): the shared broker is never reconfigured."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedmq.shared.broker import Connection, JobNames, TopologyConfig, site_permissions
from fedmq.shared.config import StrategyConfig
from fedmq.shared.errors import BrokerAccessError
from tests.brokers import PrivateBroker, broker_answers, free_port
from tests.conftest import run_fedmq
from tests.jobkit import declare_job_with_v0
from tests.test_monitor import _publish_tasks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

JOB, SITE, PASSWORD = "job-1", "site-3", "s1te-3-pw"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
          issuer_key: ec.EllipticCurvePrivateKey | None, *, ca: bool) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write_tls(base: Path) -> dict[str, Path]:
    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("fedmq test CA", ca_key, None, None, ca=True)
    srv = _cert("localhost", srv_key, ca.subject, ca_key, ca=False)
    files = {"ca": base / "ca.pem", "cert": base / "server.pem", "key": base / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(srv_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return files


def _ctl(node: PrivateBroker, *args: str) -> None:
    env = dict(os.environ, RABBITMQ_NODENAME=node.name, HOME=str(node.base))
    res = subprocess.run([CTL, "-n", node.name, *args], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, f"rabbitmqctl {' '.join(args)}: {res.stdout} {res.stderr}"


def test_remote_site_worker_over_tls_with_its_own_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (PrivateBroker.available() and Path(CTL).exists()):
        pytest.skip("rabbitmq-server is not installed: cannot start a private node")
    node = PrivateBroker()
    tls_port = free_port()
    tls = _write_tls(node.base)
    with (node.base / "rabbitmq.conf").open("a") as conf:
        conf.write(f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
                   f"ssl_options.cacertfile = {tls['ca']}\nssl_options.certfile = {tls['cert']}\n"
                   f"ssl_options.keyfile = {tls['key']}\nssl_options.verify = verify_none\n"
                   "ssl_options.fail_if_no_peer_cert = false\n")
    node.start()
    try:
        names = JobNames(JOB)
        declare_job_with_v0(node.url, JOB, StrategyConfig(), input_shape=(4,), num_classes=2)
        with Connection(node.url, name="fedmq-test-owner").open() as owner:
            _publish_tasks(owner, names, 1)
        _ctl(node, "add_user", SITE, PASSWORD)
        for cmd in site_permissions(JOB, SITE).commands():  # docs/security.md, tested there
            _ctl(node, *cmd)
        site_url = f"amqps://{SITE}:{PASSWORD}@localhost:{tls_port}/%2F"
        deadline = time.monotonic() + 30
        while not broker_answers(f"amqp://guest:guest@127.0.0.1:{node.port}/%2F") and time.monotonic() < deadline:
            time.sleep(0.5)
        data = tmp_path / "train.npz"
        rng = np.random.default_rng(0)
        np.savez(data, x=rng.normal(size=(32, 4)).astype(np.float32), y=rng.integers(0, 2, 32))

        res = run_fedmq("worker", "--job", JOB, "--site", SITE, "--data", str(data), "--max-tasks", "1",
                        "--wait", "10", timeout=180, FEDMQ_BROKER_URL=site_url, SSL_CERT_FILE=str(tls["ca"]))
        assert res.returncode == 0, res.stderr[-3000:]
        with Connection(node.url, name="fedmq-test-owner").open() as owner:
            assert owner.queue_stats(names.updates)[0] == 1  # the update arrived, routed as site-3

        monkeypatch.setenv("SSL_CERT_FILE", str(tls["ca"]))  # this process dials as the site too
        site = Connection(site_url, name="fedmq-test-site").open()
        try:
            with pytest.raises(BrokerAccessError):  # topic permission: only its own routing key
                site.publish(names.updates_exchange, "site-4", b"forged")
        finally:
            site.close()
        for forbidden in (lambda c: c.publish(names.tasks_exchange, "task", b"x"),
                          lambda c: c.declare_job(JobNames("job-2"), TopologyConfig())):
            site = Connection(site_url, name="fedmq-test-site").open()
            try:
                with pytest.raises(BrokerAccessError):
                    forbidden(site)
            finally:
                site.close()

        monkeypatch.delenv("SSL_CERT_FILE")
        plain = run_fedmq("worker", "--job", JOB, "--site", SITE, "--data", str(data), "--max-tasks", "1",
                          "--wait", "5", timeout=120, FEDMQ_BROKER_URL=site_url)  # no CA: TLS must refuse
        assert plain.returncode == 3 and "***" in plain.stderr and PASSWORD not in plain.stderr
    finally:
        node.cleanup()
