"""`fleet rollout`: start a staged, gated rollout; watch it; pause, resume, abort, roll back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fleet.cli.commands.common import (
    DEFAULT_HUB,
    EXIT_HALTED,
    HubOption,
    JsonOption,
    emit_json,
    fail,
    hub_client,
    parse_duration,
    parse_fraction,
)

app = typer.Typer(no_args_is_help=True,
                  help="Staged rollouts gated on installs and on how the model behaves.")

TERMINAL = ("completed", "halted", "rolled_back")
WATCH_EVERY_S = 1.0


def _target(client: Any, bundle: str, key: Path | None, what: str) -> tuple[str, int]:
    """`name@version` in the registry, or a bundle folder (pushed if it is not there yet)."""
    from fleet.cli.commands.models import push_bundle

    p = Path(bundle)
    if p.is_dir():
        body = push_bundle(client, p, what, exist_ok=True)
        return str(body["name"]), int(body["version"])
    name, _, v = bundle.rpartition("@")
    if not name or not v.isdigit():
        fail(what, f"{bundle!r} is neither a bundle folder nor NAME@VERSION")
    return name, int(v)


def _directives(client: Any, name: str, version: int, selector: str, key: Path,
                what: str) -> list[int]:
    """Sign (offline key, here) and upload the rollback directives an automatic revert of the
    targeted devices would need."""
    from fleet.cli.commands.models import sign_rollback

    older = set()
    for d in client.get("/v1/devices", selector=selector or None):
        n, _, v = (d.get("model") or "").rpartition("@")
        if n == name and v.isdigit() and int(v) < version:
            older.add(int(v))
    for v in sorted(older):
        client.post(f"/v1/models/{name}/rollbacks",
                    json=sign_rollback(name, version, v, key, 30, what))
    return sorted(older)


@app.command("start")
def rollout_start(
    bundle: Annotated[str, typer.Argument(help="a signed bundle folder (pushed if needed) or "
                                               "NAME@VERSION in the registry")],
    to: Annotated[str, typer.Option("--to", help="label selector, e.g. site=berlin,hw=rpi4 "
                                                 "(empty: every device)")] = "",
    stages: Annotated[str, typer.Option(help="cumulative stages: percentages, or counts "
                                             "as #N")] = "5,25,100",
    max_failure: Annotated[str, typer.Option(help="failed installs a stage may have")] = "5%",
    max_offload_increase: Annotated[str, typer.Option(
        help="offload rate increase over the same devices' previous version")] = "20%",
    max_disagreement_increase: Annotated[str, typer.Option(
        help="edge-cloud disagreement increase (offloaded inputs)")] = "20%",
    max_latency_increase: Annotated[str, typer.Option(help="p95 latency increase")] = "20%",
    bake: Annotated[str, typer.Option(help="bake time per stage before the ML gate judges, "
                                           "e.g. 10m")] = "10m",
    min_results: Annotated[int, typer.Option(help="results per stage before the ML gate "
                                                  "judges")] = 400,
    min_reporting: Annotated[str, typer.Option(help="devices of a stage that must report")]
    = "100%",
    max_rate: Annotated[float, typer.Option(help="devices assigned per minute (0: no "
                                                 "limit)")] = 0.0,
    stage_timeout: Annotated[str, typer.Option(help="a stage that cannot decide by then "
                                                    "halts")] = "1h",
    key: Annotated[Path | None, typer.Option(
        help="fleet private key: sign the rollback directives an automatic revert needs")]
    = None,
    hub: HubOption = DEFAULT_HUB,
    as_json: JsonOption = False,
) -> None:
    """Start a rollout; `fleet rollout status --watch` follows it."""
    what = "fleet rollout start"
    spec: list[str] = []
    for s in stages.split(","):
        s = s.strip()
        spec.append(s if s.startswith("#") or s.endswith("%") else f"{s}%")
    body = {"selector": to, "stages": spec,
            "max_failure": parse_fraction(max_failure, what),
            "max_offload_increase": parse_fraction(max_offload_increase, what),
            "max_disagreement_increase": parse_fraction(max_disagreement_increase, what),
            "max_p95_increase": parse_fraction(max_latency_increase, what),
            "bake_s": parse_duration(bake, what), "min_results": min_results,
            "min_reporting": parse_fraction(min_reporting, what), "max_rate_per_min": max_rate,
            "stage_timeout_s": parse_duration(stage_timeout, what)}
    with hub_client(hub, what) as c:
        name, version = _target(c, bundle, key, what)
        signed = _directives(c, name, version, to, key, what) if key is not None else []
        r = c.post("/v1/rollouts", json={"model": name, "version": version, **body})
    if as_json:
        emit_json(r)
        return
    if signed:
        typer.echo(f"signed rollback directives {name}@{version} -> "
                   + ", ".join(str(v) for v in signed))
    typer.echo(f"rollout {r['id']}: {name}@{version} to "
               f"{r['selector'] or 'every device'} in stages {stages}; "
               f"follow it with: fleet rollout status {r['id']} --watch")


def _render(r: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    state = r["state"] + (f" (stage {r['stage']}/{len(r['stages'])})"
                          if r["state"] in ("running", "paused") else "")
    head = Table.grid(padding=(0, 2))
    head.add_row(f"[bold]rollout {r['id']}[/bold]", f"{r['model']}@{r['version']}",
                 f"to {r['selector'] or 'every device'}", f"[bold]{state}[/bold]")
    parts: list[Any] = [head]
    if r.get("reason"):
        parts.append(f"[yellow]{r['reason']}[/yellow]")
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[extra]}"))
    for s in r["stage_counts"]:
        spec = s["spec"]
        label = f"{spec['percent']:g}%" if "percent" in spec else f"#{spec['count']:g}"
        extra = ", ".join(f"{k} {s[k]}" for k in ("failed", "reverting", "reverted",
                                                  "revert_failed", "skipped") if s.get(k))
        bars.add_task(f"stage {s['stage']} ({label}, {s['status']})",
                      total=max(s["devices"], 1), completed=s["installed"], extra=extra)
    parts.append(bars)
    g = r.get("gates") or {}
    if g.get("gates"):
        t = Table(f"gate (stage {g.get('stage')})", "value", "limit", "previous version", "")
        for x in g["gates"]:
            t.add_row(x["name"], _num(x["value"]), _num(x["limit"]), _num(x.get("baseline")),
                      _mark(x, provisional=g.get("decision") == "wait"))
        parts.append(t)
    if r.get("devices"):
        t = Table("device", "stage", "state", "previous")
        t.add_column("error", overflow="fold")
        for d in r["devices"]:
            t.add_row(d["device"], str(d["stage"]), d["state"], d["previous_model"] or "-",
                      d["error"] or "")
        parts.append(t)
    return Group(*parts)


# Judged on the stage's results after the bake time: until then their marks are provisional.
ML_GATES = ("offload_rate", "disagreement", "p95_latency_ms")
RATE_GATES = ("offload_rate", "disagreement")  # judged by a z-test, not by the value alone


def _mark(gate: dict[str, Any], provisional: bool) -> str:
    passed, value, limit = gate["passed"], gate["value"], gate["limit"]
    so_far = " so far" if provisional and gate["name"] in ML_GATES else ""
    # Above the limit, but not by more than the samples' noise (the z-test): undecided while
    # results come in, passed with the benefit of the doubt once there are enough.
    noise = (gate["name"] in RATE_GATES and value is not None and limit is not None
             and value > limit)
    if passed is None:
        if noise:
            return f"[yellow]within noise{so_far or ', collecting more'}[/yellow]"
        return "[dim]waiting[/dim]"
    if passed is False:
        return f"[red]{'worse' + so_far if so_far else 'FAIL'}[/red]"
    if noise:
        return f"[yellow]within noise{so_far}[/yellow]"
    return f"[green]ok{so_far}[/green]"


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


@app.command("status")
def rollout_status(
    rollout_id: Annotated[int | None, typer.Argument(help="rollout id (default: the newest)")]
    = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="follow it until it ends; exit "
                                                             "3 if it halts or rolls back")]
    = False,
    devices: Annotated[bool, typer.Option("--devices", "-d", help="every device of the "
                                                                  "rollout: stage, state, "
                                                                  "error")] = False,
    hub: HubOption = DEFAULT_HUB,
    as_json: JsonOption = False,
) -> None:
    """A rollout's state, its stages' progress and its gates' values against thresholds."""
    from rich.console import Console
    from rich.live import Live

    what = "fleet rollout status"
    with hub_client(hub, what) as c:
        if rollout_id is None:
            rows = c.get("/v1/rollouts")
            if not rows:
                fail(what, "there are no rollouts yet: fleet rollout start BUNDLE --to ...")
            rollout_id = int(rows[0]["id"])
        r = c.get(f"/v1/rollouts/{rollout_id}", devices=devices or None)
        if watch and not as_json:
            console = Console()
            with Live(_render(r), console=console, refresh_per_second=4) as live:
                while r["state"] not in TERMINAL:
                    time.sleep(WATCH_EVERY_S)
                    r = c.get(f"/v1/rollouts/{rollout_id}", devices=devices or None)
                    live.update(_render(r))
            if not console.is_terminal:
                console.line()  # Live leaves its last frame without a line end when piped
        elif watch:
            while r["state"] not in TERMINAL:
                time.sleep(WATCH_EVERY_S)
                r = c.get(f"/v1/rollouts/{rollout_id}", devices=devices or None)
    if as_json:
        emit_json(r)
    elif not watch:
        Console().print(_render(r))
    if watch and r["state"] != "completed":
        raise typer.Exit(EXIT_HALTED)


@app.command("list")
def rollout_list(hub: HubOption = DEFAULT_HUB, as_json: JsonOption = False) -> None:
    """Every rollout, newest first."""
    from rich.console import Console
    from rich.table import Table

    with hub_client(hub, "fleet rollout list") as c:
        rows = c.get("/v1/rollouts")
    if as_json:
        emit_json(rows)
        return
    t = Table("id", "model", "to", "state", "stage", "installed")
    for r in rows:
        inst = sum(s["installed"] for s in r["stage_counts"])
        tot = r["stage_counts"][-1]["cumulative"] if r["stage_counts"] else 0
        t.add_row(str(r["id"]), f"{r['model']}@{r['version']}", r["selector"] or "*",
                  r["state"], f"{r['stage']}/{len(r['stages'])}", f"{inst}/{tot}")
    console = Console()
    console.print(t)
    for r in rows:  # below the table: a reason is too long for a column
        if r["reason"]:
            console.print(f"rollout {r['id']}: {r['reason']}", highlight=False)


def _action(action: str, rollout_id: int, hub: str, as_json: bool) -> None:
    with hub_client(hub, f"fleet rollout {action}") as c:
        r = c.post(f"/v1/rollouts/{rollout_id}/{action}")
    if as_json:
        emit_json(r)
    else:
        typer.echo(f"rollout {r['id']}: {r['state']}")


IdArg = Annotated[int, typer.Argument(help="rollout id")]


@app.command("pause")
def rollout_pause(rollout_id: IdArg, hub: HubOption = DEFAULT_HUB,
                  as_json: JsonOption = False) -> None:
    """Stop assigning and judging; devices keep what they have."""
    _action("pause", rollout_id, hub, as_json)


@app.command("resume")
def rollout_resume(rollout_id: IdArg, hub: HubOption = DEFAULT_HUB,
                   as_json: JsonOption = False) -> None:
    """Continue a paused rollout."""
    _action("resume", rollout_id, hub, as_json)


@app.command("abort")
def rollout_abort(rollout_id: IdArg, hub: HubOption = DEFAULT_HUB,
                  as_json: JsonOption = False) -> None:
    """End the rollout here (halted); devices keep what they run."""
    _action("abort", rollout_id, hub, as_json)


@app.command("rollback")
def rollout_rollback(rollout_id: IdArg, hub: HubOption = DEFAULT_HUB,
                     as_json: JsonOption = False) -> None:
    """End the rollout and send every one of its devices back to its previous version."""
    _action("rollback", rollout_id, hub, as_json)
