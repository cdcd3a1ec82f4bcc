"""Shared fixtures: brokers on free ports, databases, the bundled models.

Tests that need Mosquitto or PostgreSQL skip when those are missing on a developer's machine,
and fail instead when CI=true, so that CI cannot pass by skipping them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleet.lab.brokers import RunningBroker, mosquitto_path, start_broker
from fleet.lab.pg_databases import PG_ADMIN_URL, create_database, drop_database
from fleet.lab.processes import ProcessGroup
from fleet.lab.processes import wait_until as _wait_until
from tests.updates import UpdateKit

__all__ = ["DELIVERY_S", "need", "wait_until"]

# How long a test waits for something to be delivered, stored or answered before it calls it
# lost: far above any real delivery, also on a loaded 2-core machine (a wait ends as soon as
# its condition holds, so a generous deadline costs nothing when things work).
DELIVERY_S = 30.0


def wait_until(pred: Callable[[], object], timeout: float = DELIVERY_S) -> bool:
    """Poll `pred` until it holds or `timeout` passes (DELIVERY_S unless told)."""
    return _wait_until(pred, timeout)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, why: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{why} (required in CI)")
    pytest.skip(why)


# Loggers of our own packages: an exception one of them logs fails the test that caused it.
OUR_PACKAGES = ("edge_agent", "cloud_hub", "fleet", "models")


class _LoggedExceptions(logging.Handler):
    """Collects the exceptions our modules log (with a traceback) while a test runs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.name.split(".")[0] in OUR_PACKAGES:
            self.records.append(record)


@pytest.fixture(autouse=True)
def _no_unexpected_exceptions(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test during which one of our modules logged an exception, unless the test says
    it expects one (`@pytest.mark.logs_exceptions("text of the message", ...)`): a swallowed
    exception in a worker thread must not pass for a green test."""
    handler = _LoggedExceptions()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
    marker = request.node.get_closest_marker("logs_exceptions")
    allowed = marker.args if marker else ()
    unexpected = [r for r in handler.records
                  if not any(a in r.getMessage() for a in allowed)]
    if unexpected:
        r = unexpected[0]
        pytest.fail(f"{len(unexpected)} exception(s) logged by our code, the first by {r.name}: "
                    f"{r.getMessage()}\n{logging.Formatter().formatException(r.exc_info)}"
                    if r.exc_info else r.getMessage(), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the suite's compiled models and backend choices out of the user's ~/.cache."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(autouse=True)
def _private_state(tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's agents keep their outboxes in a fresh folder: nothing carries over."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))


@pytest.fixture(scope="session")
def procs() -> Iterator[ProcessGroup]:
    with ProcessGroup() as g:
        yield g


@pytest.fixture(scope="session")
def mosquitto(procs: ProcessGroup, tmp_path_factory: pytest.TempPathFactory) -> RunningBroker:
    need(mosquitto_path() is not None, "mosquitto is not installed")
    return start_broker(procs, tmp_path_factory.mktemp("mosquitto"), "mosquitto")


@pytest.fixture(scope="session")
def embedded_broker(procs: ProcessGroup, tmp_path_factory: pytest.TempPathFactory) -> RunningBroker:
    return start_broker(procs, tmp_path_factory.mktemp("embedded"), "embedded")


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request: pytest.FixtureRequest) -> RunningBroker:
    b: RunningBroker = request.getfixturevalue("mosquitto" if request.param == "mosquitto"
                                               else "embedded_broker")
    return b


def _pg_available() -> bool:
    try:
        import psycopg
    except ImportError:
        return False
    try:
        with psycopg.connect(PG_ADMIN_URL.replace("+psycopg", ""), connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    need(_pg_available(), f"PostgreSQL is not reachable at {PG_ADMIN_URL}")
    url = create_database("ehi_test_")
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> UpdateKit:
    """A fleet key, a hub key and derived bundle versions, shared by the update tests."""
    return UpdateKit(tmp_path_factory.mktemp("update-kit"))
