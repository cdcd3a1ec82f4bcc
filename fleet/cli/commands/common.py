"""What every `fleet` command shares: exit codes, the hub option, errors that say what to do,
human tables or JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

# Exit codes scripts can rely on.
EXIT_OK = 0
EXIT_REFUSED = 1      # the hub (or this tool) refused: bad input, conflict, not found
EXIT_UNREACHABLE = 2  # the hub could not be reached
EXIT_HALTED = 3       # a watched rollout ended halted or rolled back

DEFAULT_HUB = "http://127.0.0.1:8080"  # where `cloud-hub serve` listens by default
HubOption = Annotated[str, typer.Option("--hub", envvar="EHI_FLEET_HUB",
                                        help="the hub's URL ($EHI_FLEET_HUB)")]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]


@contextmanager
def hub_client(hub: str, what: str) -> Iterator[Any]:
    """A HubClient whose errors end the command with the right exit code and the hub's words."""
    from fleet.cli.hub_client import HubClient, HubClientError

    client = HubClient(hub)
    try:
        yield client
    except HubClientError as exc:
        if exc.status == 0:
            fail(what, f"{exc} (is the hub running? --hub or $EHI_FLEET_HUB)", EXIT_UNREACHABLE)
        hint = (" (fleet login --hub URL --token TOKEN, or set $EHI_FLEET_TOKEN)"
                if exc.status == 401 else "")
        fail(what, f"refused ({exc.status}): {exc}{hint}", EXIT_REFUSED)
    finally:
        client.close()


def fail(what: str, message: str, code: int = EXIT_REFUSED) -> None:
    typer.echo(f"{what}: {message}", err=True)
    raise typer.Exit(code)


def emit_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def parse_fraction(text: str, what: str) -> float:
    """`5%` or `0.05` -> 0.05."""
    t = text.strip()
    try:
        return float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
    except ValueError:
        fail(what, f"{text!r} is not a percentage (5%) or a fraction (0.05)")
        raise  # unreachable


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str, what: str) -> float:
    """`10m`, `30s`, `1h`, `0` -> seconds."""
    m = _DURATION.fullmatch(text)
    if m is None:
        fail(what, f"{text!r} is not a duration (e.g. 30s, 10m, 1h)")
        raise AssertionError
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def ago(ts: float | None) -> str:
    import time

    if not ts:
        return "-"
    s = max(0.0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else \
        f"{s / 3600:.0f}h ago"
