"""`fleet login` / `fleet logout`: keep a token for a hub (cloud-hub token, or POST /v1/tokens)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from fleet.cli.commands.common import (
    DEFAULT_HUB,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    HubOption,
    fail,
)

app = typer.Typer(no_args_is_help=True)


@app.command("login")
def login(
    token: Annotated[str, typer.Option(help="the token; - reads it from standard input")],
    hub: HubOption = DEFAULT_HUB,
) -> None:
    """Check a token with the hub and keep it for later commands against that hub."""
    from fleet.cli.hub_client import HubClient, HubClientError, save_token

    if token == "-":
        token = sys.stdin.readline().strip()
    try:
        with HubClient(hub, token=token) as c:
            who = c.get("/v1/whoami")
    except HubClientError as exc:
        fail("fleet login", f"the hub did not take the token ({exc.status}): {exc}",
             EXIT_UNREACHABLE if exc.status == 0 else EXIT_REFUSED)
        return
    path = save_token(hub, token)
    typer.echo(f"logged in to {hub} as {who['subject']} ({who['role'] or 'no role'}); "
               f"token kept in {path}")


@app.command("logout")
def logout(hub: HubOption = DEFAULT_HUB) -> None:
    """Forget the token kept for a hub."""
    from fleet.cli.hub_client import save_token

    save_token(hub, None)
    typer.echo(f"logged out of {hub}")
