"""The installed distribution claims one import name, `fedmq`, and works beside a user's own modules.

A wheel is built from this checkout and installed into a fresh virtualenv whose only other
packages are the dependencies (the dev venv's site-packages, as a plain path: its editable
fedmq is not loaded). There, in a directory holding a user's own `shared` package and
`worker.py`, both the user's modules and fedmq import, and the console script runs."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def _wheel(out: Path) -> Path:
    _run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)])
    [wheel] = out.glob("fedmq-*.whl")
    return wheel


def test_the_wheel_holds_only_the_fedmq_package(tmp_path: Path) -> None:
    names = zipfile.ZipFile(_wheel(tmp_path)).namelist()
    assert {n.split("/")[0] for n in names} == {"fedmq", next(n.split("/")[0] for n in names if ".dist-info/" in n)}
    for role in ("shared/broker.py", "worker/service.py", "coordinator/service.py", "aggregator/service.py"):
        assert f"fedmq/{role}" in names


def test_installed_in_a_fresh_venv_it_leaves_a_users_shared_and_worker_alone(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "dist")
    venv = tmp_path / "venv"
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "fedmq-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)])

    user = tmp_path / "project"
    (user / "shared").mkdir(parents=True)
    (user / "shared" / "__init__.py").write_text("OWN = 'the user'\n")
    (user / "worker.py").write_text("OWN = 'the user too'\n")
    probe = textwrap.dedent("""
        import shared, worker
        assert shared.OWN == 'the user' and worker.OWN == 'the user too'
        import fedmq.cli, fedmq.shared.broker, fedmq.worker.service, fedmq.aggregator.service
        import fedmq.coordinator.service
        assert '/site-packages/fedmq/' in fedmq.shared.broker.__file__, fedmq.shared.broker.__file__
        print('ok')
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    assert _run([str(py), "-c", probe], cwd=user, env=env).stdout.strip() == "ok"
    assert "coordinator" in _run([str(venv / "bin" / "fedmq"), "--help"], cwd=user, env=env).stdout
