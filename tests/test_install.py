"""Each deployable's extra installs what its entry point needs, and nothing else is assumed:
`[agent]`, `[hub]` and `[fleet]` each into an empty virtual environment (from the package
index, or pip's cache), then their command runs there. The hub must also start and serve."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
import venv
from pathlib import Path

import pytest

from fleet.lab.brokers import RunningBroker
from fleet.transport.ports import free_port
from models import CLOUD_BUNDLE
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]
# Building the project and installing an extra's wheels (from pip's cache when warm).
INSTALL_TIMEOUT_S = 900
HUB_START_S = 60.0


def _source(tmp: Path) -> Path:
    """A copy of the project to build from: setuptools writes build/ into the tree it builds."""
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "out"))
    return src


def _install(tmp: Path, extra: str) -> Path:
    env_dir = tmp / f"venv-{extra}"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{_source(tmp)}[{extra}]"],
                       capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    return env_dir / "bin"


def _run(bin_dir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    # Run from an empty folder: nothing of the source tree may be importable by accident.
    return subprocess.run([str(bin_dir / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=120, cwd=bin_dir.parent)


@pytest.mark.slow
@pytest.mark.parametrize("extra, command", [("agent", "edge-agent"), ("fleet", "fleet")])
def test_extra_installs_its_entry_point(tmp_path: Path, extra: str, command: str) -> None:
    bin_dir = _install(tmp_path, extra)
    r = _run(bin_dir, command, "--help")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "usage" in (r.stdout + r.stderr).lower()


@pytest.mark.slow
@pytest.mark.mosquitto
def test_hub_extra_installs_a_hub_that_starts(tmp_path: Path, mosquitto: RunningBroker) -> None:
    bin_dir = _install(tmp_path, "hub")
    assert _run(bin_dir, "cloud-hub", "--help").returncode == 0
    port = free_port()
    env = {**os.environ, "EHI_HUB_CLOUD_BUNDLE": str(CLOUD_BUNDLE),
           "EHI_HUB_DATABASE_URL": f"sqlite:///{tmp_path / 'hub.db'}",
           "EHI_HUB_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
           "EHI_HUB_ASSIGNMENT_KEY": str(tmp_path / "hub.key"),
           "EHI_HUB_MQTT__PORT": str(mosquitto.port)}
    env.pop("PYTHONPATH", None)
    log = tmp_path / "hub.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(bin_dir / "cloud-hub"), "serve", "--port", str(port)],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                return True
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        assert wait_until(ready, HUB_START_S) and proc.poll() is None, log.read_text()[-3000:]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_demo_extra_runs_the_demo(tmp_path: Path) -> None:
    """The README's first command, from a regular (not editable) install: everything the demo
    reads (bundles, streams, the demo key) ships as package data."""
    bin_dir = _install(tmp_path, "demo")
    r = subprocess.run([str(bin_dir / "fleet"), "demo", "--samples", "40", "--devices", "2"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "40 / 40" in r.stdout
