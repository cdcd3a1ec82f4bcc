"""`fleet pki`: the fleet's certificate authority and its broker's configuration; `fleet devices
enroll|revoke` (devices.py) use the same folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from fleet.cli.commands.common import JsonOption, emit_json, fail

app = typer.Typer(no_args_is_help=True, help="The fleet's identities: CA, broker configuration.")

PkiOption = Annotated[Path, typer.Option("--pki", envvar="EHI_FLEET_PKI",
                                         help="the fleet's identity folder ($EHI_FLEET_PKI)")]
DEFAULT_PKI = Path("fleet-pki")
ReloadOption = Annotated[Path | None, typer.Option(
    "--reload", help="the running broker's pid file: send it SIGHUP to re-read its files")]


def open_pki(path: Path, what: str) -> Any:
    from fleet.identity.ca import IdentityError
    from fleet.identity.pki import Pki

    try:
        return Pki(path)
    except IdentityError as exc:
        fail(what, str(exc))


def reload_broker(pid_file: Path | None, what: str) -> None:
    from fleet.identity.ca import IdentityError
    from fleet.identity.pki import reload_broker as hup

    if pid_file is None:
        typer.echo("the broker reads the new files when it is reloaded: "
                   "kill -HUP $(cat /run/mosquitto/mosquitto.pid), or pass --reload PIDFILE")
        return
    try:
        pid = hup(pid_file)
    except IdentityError as exc:
        fail(what, str(exc))
        return
    typer.echo(f"broker (pid {pid}) reloaded")


@app.command("init")
def pki_init(
    pki: PkiOption = DEFAULT_PKI,
    broker_host: Annotated[list[str] | None, typer.Option(
        "--broker-host", help="a name or address devices use for the broker (repeat); "
                              "default localhost and 127.0.0.1")] = None,
    hub: Annotated[list[str] | None, typer.Option(
        "--hub", help="a hub replica's identity (repeat); default hub-0")] = None,
    mode: Annotated[str, typer.Option(help="mtls: client certificates; password: per-identity "
                                           "passwords over TLS")] = "mtls",
    port: Annotated[int, typer.Option(help="the broker's TLS port")] = 8883,
) -> None:
    """Create the fleet's CA, the broker's certificate, the hubs' identities and the broker's
    configuration (PKI/broker/mosquitto.conf)."""
    from fleet.identity.ca import IdentityError
    from fleet.identity.pki import Pki

    if mode not in ("mtls", "password"):
        fail("fleet pki init", f"--mode is mtls or password, not {mode!r}")
    try:
        p = Pki.init(pki, tuple(broker_host or ("localhost", "127.0.0.1")),
                     tuple(hub or ("hub-0",)))
        conf = p.write_broker(mode=_mode(mode), port=port)  # rewrites the hubs' settings
    except IdentityError as exc:
        fail("fleet pki init", str(exc))
        return
    hubs = ", ".join(str(pki / "hubs" / h / "hub.env") for h in p.identities("hub"))
    typer.echo(f"fleet CA in {pki} (keep {pki / 'ca.key'} offline)\n"
               f"broker configuration: {conf}  (mosquitto -c {conf})\n"
               f"hub settings: {hubs}\n"
               f"next: fleet devices enroll DEVICE_ID --pki {pki}")


def _mode(mode: str) -> Literal["mtls", "password"]:
    return "password" if mode == "password" else "mtls"


@app.command("broker")
def pki_broker(
    pki: PkiOption = DEFAULT_PKI,
    mode: Annotated[str | None, typer.Option(help="mtls or password")] = None,
    port: Annotated[int | None, typer.Option(help="the TLS port")] = None,
    host: Annotated[str | None, typer.Option(help="the address to listen on")] = None,
    mount_dir: Annotated[str | None, typer.Option(
        help="where the broker will find these files (on Kubernetes: /mosquitto/config)")]
    = None,
    data_dir: Annotated[str | None, typer.Option(
        help="keep retained messages and sessions here (on Kubernetes: /mosquitto/data)")]
    = None,
    reload: ReloadOption = None,
) -> None:
    """Rewrite the broker's configuration (after changing its mode, port, address, or where
    it runs)."""
    from fleet.identity.ca import IdentityError

    p = open_pki(pki, "fleet pki broker")
    if mode is not None and mode not in ("mtls", "password"):
        fail("fleet pki broker", f"--mode is mtls or password, not {mode!r}")
    try:
        conf = p.write_broker(mode=_mode(mode) if mode else None, port=port, host=host,
                              mount_dir=mount_dir, data_dir=data_dir)
    except IdentityError as exc:
        fail("fleet pki broker", str(exc))
        return
    typer.echo(f"broker configuration: {conf}")
    reload_broker(reload, "fleet pki broker")


@app.command("list")
def pki_list(pki: PkiOption = DEFAULT_PKI, as_json: JsonOption = False) -> None:
    """Every identity: kind, certificate serial, expiry, revoked or not."""
    from datetime import UTC, datetime

    from rich.console import Console
    from rich.table import Table

    rows = open_pki(pki, "fleet pki list").identities()
    if as_json:
        emit_json({n: {k: v for k, v in r.items() if k != "password"} for n, r in rows.items()})
        return
    t = Table("identity", "kind", "serial", "expires", "state")
    for n, r in sorted(rows.items()):
        revoked = r.get("revoked_at")
        state = ("revoked " + datetime.fromtimestamp(revoked, UTC).strftime("%Y-%m-%d %H:%M")
                 if revoked else "active")
        t.add_row(n, r["kind"], f"{int(r['serial']):x}"[:16], r["not_after"][:10], state)
    Console().print(t)
