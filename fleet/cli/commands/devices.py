"""`fleet devices`: list, show, label, assign, offload."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from fleet.cli.commands.common import (
    DEFAULT_HUB,
    HubOption,
    JsonOption,
    ago,
    emit_json,
    fail,
    hub_client,
)
from fleet.cli.commands.pki import DEFAULT_PKI, PkiOption, ReloadOption, open_pki, reload_broker

app = typer.Typer(no_args_is_help=True,
                  help="Devices: list, show, label, assign a model, set offloading.")


def _labels(d: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((d.get("labels") or {}).items()))


@app.command("list")
def devices_list(
    selector: Annotated[str | None, typer.Option(
        "--selector", "-l", help="only devices with these labels, e.g. site=berlin,hw=rpi4")]
    = None,
    hub: HubOption = DEFAULT_HUB,
    as_json: JsonOption = False,
) -> None:
    """Every device the hub knows: online, model, update state, labels, last seen."""
    from rich.console import Console
    from rich.table import Table

    with hub_client(hub, "fleet devices list") as c:
        rows = c.get("/v1/devices", selector=selector)
    if as_json:
        emit_json(rows)
        return
    t = Table("device", "online", "model", "update", "labels", "last seen",
              caption=f"{len(rows)} devices")
    for d in rows:
        upd = d.get("update_state") or "-"
        if d.get("update_code"):
            upd += f" ({d['update_code']})"
        t.add_row(d["id"], "yes" if d["online"] else "no", d.get("model") or "-", upd,
                  _labels(d), ago(d.get("last_seen")))
    Console().print(t)


@app.command("show")
def devices_show(
    device: Annotated[str, typer.Argument(help="device id")],
    hub: HubOption = DEFAULT_HUB,
    as_json: JsonOption = False,
) -> None:
    """One device: model, update state and last error, labels, telemetry."""
    with hub_client(hub, "fleet devices show") as c:
        d = c.get(f"/v1/devices/{device}")
    if as_json:
        emit_json(d)
        return
    typer.echo(f"{d['id']}  {'online' if d['online'] else 'offline'}  last seen "
               f"{ago(d.get('last_seen'))}")
    typer.echo(f"model {d.get('model') or '-'} on {d.get('backend') or '-'}")
    typer.echo(f"update {d.get('update_state') or '-'}"
               + (f" -> {d['update_target']}" if d.get("update_target") else "")
               + (f": {d['update_code']}: {d['update_error']}" if d.get("update_error") else ""))
    typer.echo(f"labels {_labels(d) or '-'}")
    f = d.get("fidelity") or {}
    if f.get("agreement") is not None:
        typer.echo(f"fidelity {f['agreement']:.2%} agreement on {f.get('backend')} (floor "
                   f"{f.get('min_agreement', 0):.2%}); offload at the manifest threshold "
                   f"{_pct(f.get('offload_at_manifest'))}, budget {_pct(f.get('budget'))}; "
                   f"threshold {f.get('threshold_source', '-')}")
    for name, why in (f.get("refused") or {}).items():
        typer.echo(f"refused backend {name}: {why}")
    o = d.get("offload") or {}
    if o:
        line = f"offload {o.get('mode')}"
        if o.get("mode") == "budget":
            line += (f", target {_pct(o.get('target'))}, last 100 inputs "
                     f"{_pct(o.get('recent_rate'))}, drift {o.get('drift')}"
                     + (" (DRIFTING)" if o.get("drifting") else ""))
        typer.echo(line + f", threshold {o.get('threshold')}")
    if d.get("offload_setting"):
        s = d["offload_setting"]
        typer.echo(f"offload set by the hub: {s.get('mode')}"
                   + (f", target {_pct(s.get('target'))}" if s.get("target") else "")
                   + (f", at most {s['max_bytes_per_s']:g} B/s" if s.get("max_bytes_per_s")
                      else ""))


def _pct(v: Any) -> str:
    return "-" if not isinstance(v, int | float) else f"{v:.1%}"


@app.command("offload")
def devices_offload(
    device: Annotated[str, typer.Argument(help="device id")],
    mode: Annotated[str, typer.Option(
        help="budget: the device keeps --target of its inputs offloaded as they drift; "
             "threshold: a fixed threshold; device: its own settings again")] = "budget",
    target: Annotated[float | None, typer.Option(
        help="share of inputs to offload in budget mode (default: the bundle's budget)")] = None,
    max_bytes_per_s: Annotated[float | None, typer.Option(
        "--max-bytes-per-s", help="byte budget for a metered link (budget mode)")] = None,
    hub: HubOption = DEFAULT_HUB,
    as_json: JsonOption = False,
) -> None:
    """Set how a device offloads; the hub sends it in the device's signed assignment."""
    if mode not in ("budget", "threshold", "device"):
        fail("fleet devices offload", f"--mode {mode!r}: choose budget, threshold or device")
        return
    with hub_client(hub, "fleet devices offload") as c:
        if mode == "device":
            body = c.request("DELETE", f"/v1/devices/{device}/offload")
        else:
            body = c.put(f"/v1/devices/{device}/offload",
                         json={"mode": mode, "target": target,
                               "max_bytes_per_s": max_bytes_per_s})
    if as_json:
        emit_json(body)
        return
    what = ("its own settings" if mode == "device" else
            mode + (f" {target:.1%}" if target else ""))
    typer.echo(f"{device}: offload {what}, in assignment seq {body['seq']} of "
               f"{body['model']}@{body['version']}")


@app.command("label")
def devices_label(
    device: Annotated[str, typer.Argument(help="device id")],
    labels: Annotated[str, typer.Argument(help="k=v,k2=v2 to set; k- to remove")],
    hub: HubOption = DEFAULT_HUB,
    as_json: JsonOption = False,
) -> None:
    """Set or remove operator labels (they override the labels a device reports)."""
    from fleet.contract.selectors import SelectorError, parse_labels

    try:
        changes = parse_labels(labels)
    except SelectorError as exc:
        fail("fleet devices label", str(exc))
        return
    with hub_client(hub, "fleet devices label") as c:
        d = c.put(f"/v1/devices/{device}/labels", json={"labels": changes})
    if as_json:
        emit_json(d)
        return
    typer.echo(f"{device}: {_labels(d) or 'no labels'}")


@app.command("assign")
def devices_assign(
    device: Annotated[str, typer.Argument(help="device id")],
    model: Annotated[str, typer.Option(help="bundle name in the registry")],
    version: Annotated[int, typer.Option(help="bundle version")],
    hub: HubOption = DEFAULT_HUB,
    as_json: JsonOption = False,
) -> None:
    """Make a registry bundle the device's desired model (signed by the hub, retained)."""
    with hub_client(hub, "fleet devices assign") as c:
        body = c.put(f"/v1/devices/{device}/desired", json={"model": model, "version": version})
    if as_json:
        emit_json(body)
        return
    note = "" if body.get("published") else " (the hub publishes it when its broker is back)"
    typer.echo(f"{device}: desired {body['model']}@{body['version']}, seq {body['seq']}{note}")


@app.command("enroll")
def devices_enroll(
    device_id: Annotated[str, typer.Argument(help="the device's id (its MQTT username)")],
    pki: PkiOption = DEFAULT_PKI,
    reload: ReloadOption = None,
) -> None:
    """Issue a device its key, client certificate and password, and let it on the broker.
    Copy PKI/devices/ID/ to the device; its agent-mqtt.toml is the [mqtt] table to use."""
    from fleet.identity.ca import IdentityError

    p = open_pki(pki, "fleet devices enroll")
    try:
        e = p.enroll(device_id)
    except IdentityError as exc:
        fail("fleet devices enroll", str(exc))
        return
    typer.echo(f"enrolled {device_id}: certificate serial {e.serial:x}; credentials in "
               f"{e.folder} (client.key, client.crt, ca.crt, password, agent-mqtt.toml)")
    reload_broker(reload, "fleet devices enroll")


@app.command("revoke")
def devices_revoke(
    device_id: Annotated[str, typer.Argument(help="the device to shut out")],
    pki: PkiOption = DEFAULT_PKI,
    reload: ReloadOption = None,
) -> None:
    """Revoke a device: its certificate goes on the CRL, its password and its access rules
    leave the broker. Takes effect when the broker reloads (--reload PIDFILE)."""
    from fleet.identity.ca import IdentityError

    p = open_pki(pki, "fleet devices revoke")
    try:
        serial = p.revoke(device_id)
    except IdentityError as exc:
        fail("fleet devices revoke", str(exc))
        return
    typer.echo(f"revoked {device_id} (certificate serial {serial:x})")
    reload_broker(reload, "fleet devices revoke")
