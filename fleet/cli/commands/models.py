"""`fleet models`: sign, verify, push and inspect bundles; rollback directives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fleet.cli.commands.common import (
    DEFAULT_HUB,
    HubOption,
    JsonOption,
    emit_json,
    fail,
    hub_client,
)

app = typer.Typer(no_args_is_help=True,
                  help="Model bundles: sign, verify, push to the registry, list, show.")


@app.command("sign")
def models_sign(
    bundle: Annotated[Path, typer.Argument(help="bundle folder (manifest.json and its files)")],
    key: Annotated[Path, typer.Option(help="the private key (NAME.key)")],
) -> None:
    """Check the bundle's files against its manifest, then sign the manifest."""
    import json

    from fleet.contract.bundle import MANIFEST_NAME
    from fleet.contract.errors import BundleError
    from fleet.contract.signing import PrivateKey, sign_bundle, stale_signatures

    try:
        own = PrivateKey.read(key).public.keyid
        before = json.loads((bundle / MANIFEST_NAME).read_text())
        stale = [k for k in stale_signatures(before) if k != own] \
            if isinstance(before, dict) else []
        keyid = sign_bundle(bundle, key)
    except (BundleError, OSError, ValueError) as exc:
        fail("fleet models sign", str(exc))
        return
    for k in stale:
        typer.echo(f"dropped the signature of key {k}: it was made over another version of "
                   "this manifest (its holder signs again)", err=True)
    typer.echo(f"signed {bundle} with key {keyid}")


@app.command("verify")
def models_verify(
    bundle: Annotated[Path, typer.Argument(help="bundle folder")],
    key: Annotated[list[Path], typer.Option(help="a trusted public key (NAME.pub); repeat "
                                                 "for several")],
) -> None:
    """Verify the signature by a trusted key, every file's length and sha256, and the expiry."""
    from fleet.contract.errors import BundleError
    from fleet.contract.signing import PublicKey, verify_bundle

    try:
        keyid = verify_bundle(bundle, [PublicKey.read(k) for k in key])
    except BundleError as exc:
        fail("fleet models verify", f"refused: {exc}")
        return
    typer.echo(f"ok: {bundle} signed by {keyid}, files match, not expired")


def push_bundle(client: Any, bundle: Path, what: str, exist_ok: bool = False) -> dict[str, Any]:
    """Upload a bundle folder; with `exist_ok`, the same signed manifest already in the
    registry counts as pushed."""
    from fleet.cli.hub_client import HubClientError
    from fleet.contract.bundle import MANIFEST_NAME, pack_bundle
    from fleet.contract.errors import BundleError

    try:
        data = pack_bundle(bundle)
        manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    except BundleError as exc:
        fail(what, str(exc))
        raise AssertionError from None
    try:
        return dict(client.post("/v1/models", content=data))
    except HubClientError as exc:
        if exc.status != 409 or not exist_ok:
            raise
        there = client.get(f"/v1/models/{manifest['name']}/{manifest['version']}")
        if there["manifest"] != manifest:
            fail(what, f"{manifest['name']}@{manifest['version']} is in the registry with a "
                       "different manifest: versions are immutable, build a new version")
        return dict(there)


@app.command("push")
def models_push(
    bundle: Annotated[Path, typer.Argument(help="bundle folder (signed)")],
    hub: HubOption = DEFAULT_HUB,
    as_json: JsonOption = False,
) -> None:
    """Upload a signed bundle to the hub's registry (it checks the signature and every file)."""
    with hub_client(hub, "fleet models push") as c:
        body = push_bundle(c, bundle, "fleet models push")
    if as_json:
        emit_json(body)
        return
    typer.echo(f"pushed {body['name']}@{body['version']} ({body['total_bytes']} bytes, "
               f"key {body['keyid']})")


@app.command("list")
def models_list(
    name: Annotated[str | None, typer.Option(help="only this bundle name")] = None,
    hub: HubOption = DEFAULT_HUB,
    as_json: JsonOption = False,
) -> None:
    """Every bundle version in the hub's registry."""
    from rich.console import Console
    from rich.table import Table

    with hub_client(hub, "fleet models list") as c:
        rows = c.get("/v1/models", name=name)
    if as_json:
        emit_json(rows)
        return
    t = Table("model", "version", "bytes", "files", "expires")
    t.add_column("signed by", no_wrap=True)
    for m in rows:
        t.add_row(m["name"], str(m["version"]), f"{m['total_bytes']:,}", str(len(m["files"])),
                  (m["expires"] or "-")[:10], m["keyid"])
    Console().print(t)
    if rows:
        Console().print("files of one: fleet models show NAME VERSION", style="dim")


@app.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help="bundle name")],
    version: Annotated[int, typer.Argument(help="version")],
    hub: HubOption = DEFAULT_HUB,
    as_json: JsonOption = False,
) -> None:
    """One bundle version: its manifest (signatures, files, health check, hardware)."""
    with hub_client(hub, "fleet models show") as c:
        body = c.get(f"/v1/models/{name}/{version}")
    if as_json:
        emit_json(body)
        return
    m = body["manifest"]
    typer.echo(f"{name}@{version}  {body['total_bytes']:,} bytes  signed by {body['keyid']}  "
               f"expires {m.get('expires')}")
    typer.echo(f"runtimes {', '.join(m.get('runtimes', []))}; hardware "
               f"{', '.join(m.get('hardware', [])) or 'any'}; health {m.get('health')}")
    he = m.get("hard_example") or {}
    typer.echo(f"hard-example policy {he.get('policy')} threshold {he.get('threshold')}")
    for f in m.get("files", []):
        typer.echo(f"  {f['path']:<20} {f['length']:>12,}  {f['sha256'][:16]}  {f['role']}")


@app.command("rollback")
def models_rollback(
    name: Annotated[str, typer.Argument(help="bundle name")],
    from_version: Annotated[int, typer.Option("--from", help="the version devices run")],
    to_version: Annotated[int, typer.Option("--to", help="the older version to allow")],
    key: Annotated[Path, typer.Option(help="the private key (NAME.key)")],
    days: Annotated[int, typer.Option(help="the directive expires after this many days")] = 30,
    out: Annotated[Path | None, typer.Option(help="write the directive here")] = None,
    hub: Annotated[str | None, typer.Option("--hub", envvar="EHI_FLEET_HUB",
                                            help="upload it to this hub")] = None,
) -> None:
    """Sign a rollback directive: devices on NAME@FROM may install the older NAME@TO."""
    doc = sign_rollback(name, from_version, to_version, key, days, "fleet models rollback")
    if out is not None:
        out.write_text(json.dumps(doc, indent=2) + "\n")
        typer.echo(f"wrote {out}")
    if hub:
        with hub_client(hub, "fleet models rollback") as c:
            c.post(f"/v1/models/{name}/rollbacks", json=doc)
        typer.echo(f"uploaded: {name}@{from_version} may go back to {to_version}")
    if out is None and not hub:
        emit_json(doc)


def sign_rollback(name: str, from_version: int, to_version: int, key: Path, days: int,
                  what: str) -> dict[str, Any]:
    from datetime import UTC, datetime, timedelta

    from fleet.contract.assignment import rollback_directive
    from fleet.contract.errors import BundleError
    from fleet.contract.signing import PrivateKey

    try:
        return rollback_directive(name, from_version, to_version,
                                  datetime.now(UTC).replace(microsecond=0)
                                  + timedelta(days=days), PrivateKey.read(key))
    except BundleError as exc:
        fail(what, str(exc))
        raise AssertionError from None
