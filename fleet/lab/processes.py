"""Child processes of the demo and the tests: started, waited for, and always stopped."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# How long a process gets to stop after SIGTERM before it is killed.
STOP_GRACE_S = 10.0


@contextlib.contextmanager
def work_folder(path: Path | None, prefix: str, keep: bool = False) -> Iterator[Path]:
    """Where a scenario keeps its processes' state: `path` (made if missing, always kept), or
    a new temporary folder, removed afterwards unless `keep`."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        if not keep:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


# How often wait_until looks again.
POLL_S = 0.01


def wait_until(pred: Callable[[], object], timeout: float = 5.0, poll_s: float = POLL_S) -> bool:
    """Poll `pred` every `poll_s` until it is true or `timeout` passes; returns whether it came
    true."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(poll_s)
    return bool(pred())


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.05)
    return False


class ManagedProcess:
    """A child process with its output in a log file, in its own process group."""

    def __init__(self, name: str, argv: list[str], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", self.name, self.pid)
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ProcessGroup:
    """Stops every process it started, newest first, also when the caller is interrupted."""

    def __init__(self) -> None:
        self.procs: list[ManagedProcess] = []

    def start(self, name: str, argv: list[str], log_path: Path,
              env: dict[str, str] | None = None) -> ManagedProcess:
        p = ManagedProcess(name, argv, log_path, env)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


# A hub's start: imports, database migration, cloud model load (seconds; more on a busy machine).
HUB_START_TIMEOUT_S = 60.0


def migrate_hub_database(database_url: str) -> None:
    """`cloud-hub migrate` once, as the manifests' Job runs it before the replicas start;
    raises FleetError with its output if it fails."""
    from fleet.contract.errors import FleetError

    done = subprocess.run([sys.executable, "-m", "cloud_hub.cli", "migrate", "--database-url",
                           database_url], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise FleetError(f"cloud-hub migrate failed:\n{done.stdout}{done.stderr}")


def start_hub(group: ProcessGroup, workdir: Path, *, port: int, broker_port: int,
              log_path: Path, database_url: str | None = None,
              env: dict[str, str] | None = None) -> ManagedProcess:
    """`cloud-hub serve` as a child process, keeping its state (database, registry files,
    assignment key) in `workdir`; returns once its port is open."""
    from fleet.contract.errors import FleetError
    from models import CLOUD_BUNDLE

    hub = group.start("hub", [sys.executable, "-m", "cloud_hub.cli", "serve",
                              "--port", str(port)], log_path,
                      env={"EHI_HUB_DATABASE_URL": database_url or
                           f"sqlite:///{workdir / 'hub.db'}",
                           "EHI_HUB_MQTT__PORT": str(broker_port),
                           "EHI_HUB_CLOUD_BUNDLE": str(CLOUD_BUNDLE),
                           "EHI_HUB_ARTIFACTS_DIR": str(workdir / "artifacts"),
                           "EHI_HUB_ASSIGNMENT_KEY": str(workdir / "hub.key"),
                           **(env or {})})
    if not wait_for_port(port, HUB_START_TIMEOUT_S, hub.proc):
        raise FleetError(f"the hub did not start:\n{hub.tail()}")
    return hub
