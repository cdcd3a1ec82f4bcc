"""`fleet demo`: the whole loop on one machine."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer()


@app.command("demo")
def demo(
    devices: Annotated[int, typer.Option(help="agent processes")] = 4,
    stream: Annotated[str, typer.Option(help="clean, shifted or mixed")] = "mixed",
    samples: Annotated[int | None, typer.Option(help="inputs to replay (default: all)")] = None,
    policy: Annotated[str | None, typer.Option(
        help="max_prob, margin, entropy, random, edge_only, cloud_only "
             "(default: the bundle's recommendation)")] = None,
    threshold: Annotated[float | None, typer.Option(
        help="policy threshold (default: fitted in the bundle)")] = None,
    backend: Annotated[str, typer.Option(help="auto, onnxruntime or openvino")] = "auto",
    offload: Annotated[str, typer.Option(
        help="threshold: a fixed threshold (calibrated on each device for the bundle's budget); "
             "budget: each agent's controller keeps --target of its inputs offloaded")]
    = "threshold",
    target: Annotated[float | None, typer.Option(
        help="share of inputs to offload with --offload budget (default: the bundle's "
             "budget)")] = None,
    broker: Annotated[str, typer.Option(help="auto, mosquitto or embedded")] = "auto",
    rate: Annotated[float, typer.Option(help="inputs per second per agent")] = 100.0,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the figures here")] = None,
    keep: Annotated[bool, typer.Option(help="keep the work folder (logs, database)")] = False,
    update: Annotated[bool, typer.Option(help="push version 2 of the edge model while the "
                                              "agents run; they switch mid-stream")] = True,
    secure: Annotated[str | None, typer.Option(
        help="mtls or password: the same loop on a confined Mosquitto (a fleet CA, an "
             "identity per agent and hub, TLS, access rules) with a token on the hub's API")]
    = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run the whole loop on one machine: broker, hub, and agents replaying a stream."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    from rich.table import Table

    from fleet.contract.errors import FleetError
    from fleet.lab.demo import DemoOptions, report_rows, run_demo

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING)
    console = Console()
    opts = DemoOptions(devices=devices, stream=stream, samples=samples, policy=policy,
                       threshold=threshold, backend=backend, broker=broker, rate_hz=rate,
                       keep=keep, update=update, offload=offload, target=target,
                       secure=secure)
    try:
        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                      transient=False) as bar:
            task = bar.add_task("results at the hub", total=None)

            def on_progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            report = run_demo(opts, on_progress)
    except FleetError as exc:
        console.print(f"[red]fleet demo failed:[/red] {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every process the demo started was stopped[/yellow]")
        raise typer.Exit(130) from None
    table = Table(title="fleet demo", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in report_rows(report):
        table.add_row(k, v)
    console.print(table)
    if report.get("workdir"):
        console.print(f"logs and database kept in {report['workdir']}")
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"figures written to {json_path}")
    if report["results_at_hub"] != report["results_produced"]:
        console.print("[red]the hub is missing results[/red]")
        raise typer.Exit(1)


