"""`fleet keys`: the fleet's signing keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleet.cli.commands.common import fail

app = typer.Typer(no_args_is_help=True, help="Signing keys of the fleet.")


@app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option(help="folder for NAME.key (private) and NAME.pub")],
    name: Annotated[str, typer.Option(help="file name stem")] = "fleet",
) -> None:
    """Make an Ed25519 key pair. Keep NAME.key offline; agents pin NAME.pub."""
    from fleet.contract.signing import SignatureError, generate_keys

    try:
        pub = generate_keys(out / f"{name}.key", out / f"{name}.pub")
    except SignatureError as exc:
        fail("fleet keys generate", str(exc))
        return
    typer.echo(f"key id {pub.keyid}: private {out / (name + '.key')} (mode 0600), "
               f"public {out / (name + '.pub')}")
