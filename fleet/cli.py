"""`fleet`: the command line of the fleet: the one-machine demo, signing keys, bundle signatures.

    fleet demo [--devices N ...]
    fleet keys generate --out DIR [--name fleet]
    fleet models sign BUNDLE --key DIR/fleet.key
    fleet models verify BUNDLE --key DIR/fleet.pub [--key ...]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Edge-cloud hybrid inference: fleet tools.")


@app.callback()
def _root() -> None:
    """Edge-cloud hybrid inference: fleet tools."""


@app.command()
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
    broker: Annotated[str, typer.Option(help="auto, mosquitto or embedded")] = "auto",
    rate: Annotated[float, typer.Option(help="inputs per second per agent")] = 100.0,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the figures here")] = None,
    keep: Annotated[bool, typer.Option(help="keep the work folder (logs, database)")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run the whole loop on one machine: broker, hub, and agents replaying a stream."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    from rich.table import Table

    from fleet.demo import DemoOptions, report_rows, run_demo
    from fleet.errors import FleetError

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING)
    console = Console()
    opts = DemoOptions(devices=devices, stream=stream, samples=samples, policy=policy,
                       threshold=threshold, backend=backend, broker=broker, rate_hz=rate,
                       keep=keep)
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


keys_app = typer.Typer(no_args_is_help=True, help="Signing keys of the fleet.")
models_app = typer.Typer(no_args_is_help=True, help="Model bundles: sign and verify.")
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")

# Exit codes scripts can rely on.
EXIT_REFUSED = 1  # the bundle or key was refused (the message says why)


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option(help="folder for NAME.key (private) and NAME.pub")],
    name: Annotated[str, typer.Option(help="file name stem")] = "fleet",
) -> None:
    """Make an Ed25519 key pair. Keep NAME.key offline; agents pin NAME.pub."""
    from fleet.signing import SignatureError, generate_keys

    try:
        pub = generate_keys(out / f"{name}.key", out / f"{name}.pub")
    except SignatureError as exc:
        typer.echo(f"fleet keys generate: {exc}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    typer.echo(f"key id {pub.keyid}: private {out / (name + '.key')} (mode 0600), "
               f"public {out / (name + '.pub')}")


@models_app.command("sign")
def models_sign(
    bundle: Annotated[Path, typer.Argument(help="bundle folder (manifest.json and its files)")],
    key: Annotated[Path, typer.Option(help="the private key (NAME.key)")],
) -> None:
    """Check the bundle's files against its manifest, then sign the manifest."""
    from fleet.errors import BundleError
    from fleet.signing import sign_bundle

    try:
        keyid = sign_bundle(bundle, key)
    except BundleError as exc:
        typer.echo(f"fleet models sign: {exc}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    typer.echo(f"signed {bundle} with key {keyid}")


@models_app.command("verify")
def models_verify(
    bundle: Annotated[Path, typer.Argument(help="bundle folder")],
    key: Annotated[list[Path], typer.Option(help="a trusted public key (NAME.pub); repeat "
                                                 "for several")],
) -> None:
    """Verify the signature by a trusted key, every file's length and sha256, and the expiry."""
    from fleet.errors import BundleError
    from fleet.signing import PublicKey, verify_bundle

    try:
        keyid = verify_bundle(bundle, [PublicKey.read(k) for k in key])
    except BundleError as exc:
        typer.echo(f"fleet models verify: refused: {exc}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    typer.echo(f"ok: {bundle} signed by {keyid}, files match, not expired")


def main() -> None:
    app()
