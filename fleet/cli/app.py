"""`fleet`: the command line of the fleet.

    fleet demo [--devices N ...]                         the whole loop on one machine
    fleet login --hub URL --token TOKEN                   keep a token for a hub; fleet logout
    fleet keys generate --out DIR [--name fleet]
    fleet models sign|verify|push|list|show|rollback     bundles and the hub's registry
    fleet devices list|show|label|assign|offload         devices, labels, desired models
    fleet devices enroll|revoke ID --pki DIR             device identities on the broker
    fleet pki init|broker|list --pki DIR                 the fleet's CA, the broker's config
    fleet rollout start|status|list|pause|resume|abort|rollback
    fleet simulate --devices N --trusted-key fleet.pub --factory BUNDLE   try rollouts by hand

Commands that talk to the hub take `--hub URL` (or $EHI_FLEET_HUB) and send $EHI_FLEET_TOKEN
when it is set; `--json` prints what the hub answered. Exit codes: 0 done, 1 refused (the
message says why and what to do), 2 the hub could not be reached, 3 a watched rollout ended
halted or rolled back.
"""

from __future__ import annotations

import typer

from fleet.cli.commands import demo, devices, keys, login, models, pki, rollout, simulate
from fleet.cli.commands.common import EXIT_HALTED, EXIT_REFUSED, EXIT_UNREACHABLE

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Edge-cloud hybrid inference: fleet tools.")
app.registered_commands += (demo.app.registered_commands + simulate.app.registered_commands
                            + login.app.registered_commands)
app.add_typer(keys.app, name="keys")
app.add_typer(models.app, name="models")
app.add_typer(devices.app, name="devices")
app.add_typer(pki.app, name="pki")
app.add_typer(rollout.app, name="rollout")

__all__ = ["EXIT_HALTED", "EXIT_REFUSED", "EXIT_UNREACHABLE", "app", "main"]


@app.callback()
def _root() -> None:
    """Edge-cloud hybrid inference: fleet tools."""


def main() -> None:
    app()
