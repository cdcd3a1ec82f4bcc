"""`fleet models push|rollback` and `fleet devices assign` through Typer's runner, against the
hub's real HTTP API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleet.cli.app import EXIT_REFUSED, EXIT_UNREACHABLE, app
from fleet.transport.ports import free_port
from tests.updates import HubServer, UpdateKit, hub_settings


@pytest.fixture(scope="module")
def hub(kit: UpdateKit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    with HubServer(hub_settings(tmp_path_factory.mktemp("cli-hub"), kit)) as h:
        yield h


def test_push_then_push_again_and_unsigned(hub: HubServer, kit: UpdateKit) -> None:
    r = CliRunner().invoke(app, ["models", "push", str(kit.version(6)), "--hub", hub.url])
    assert r.exit_code == 0, r.output
    assert "pushed digits-edge@6" in r.output
    again = CliRunner().invoke(app, ["models", "push", str(kit.version(6)), "--hub", hub.url])
    assert again.exit_code == EXIT_REFUSED and "409" in again.output
    unsigned = CliRunner().invoke(app, ["models", "push", str(kit.version(7, key=None)),
                                        "--hub", hub.url])
    assert unsigned.exit_code == EXIT_REFUSED and "not signed" in unsigned.output


def test_hub_unreachable_and_not_a_bundle(tmp_path: Path, kit: UpdateKit) -> None:
    r = CliRunner().invoke(app, ["models", "push", str(kit.version(6)),
                                 "--hub", f"http://127.0.0.1:{free_port()}"])
    assert r.exit_code == EXIT_UNREACHABLE and "cannot reach the hub" in r.output
    r = CliRunner().invoke(app, ["models", "push", str(tmp_path)])
    assert r.exit_code == EXIT_REFUSED and "manifest.json" in r.output


def test_rollback_directive_signed_written_and_uploaded(hub: HubServer, kit: UpdateKit,
                                                        tmp_path: Path) -> None:
    assert CliRunner().invoke(app, ["models", "push", str(kit.version(8)), "--hub",
                                    hub.url]).exit_code in (0, EXIT_REFUSED)
    out = tmp_path / "rb.json"
    r = CliRunner().invoke(app, ["models", "rollback", "digits-edge", "--from", "9", "--to", "8",
                                 "--key", str(kit.key), "--out", str(out), "--hub", hub.url])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert (d["from_version"], d["to_version"], len(d["signatures"])) == (9, 8, 1)
    bad = CliRunner().invoke(app, ["models", "rollback", "digits-edge", "--from", "8", "--to",
                                   "9", "--key", str(kit.key)])
    assert bad.exit_code == EXIT_REFUSED and "older version" in bad.output


def test_assign_says_why_it_cannot(hub: HubServer) -> None:
    r = CliRunner().invoke(app, ["devices", "assign", "dev-1", "--model", "digits-edge",
                                 "--version", "6", "--hub", hub.url])
    assert r.exit_code == EXIT_REFUSED and "bridge" in r.output
