"""`fleet simulate`: a simulated fleet against a running hub, to try rollouts by hand."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from fleet.cli.commands.common import DEFAULT_HUB, HubOption, fail

app = typer.Typer()


@app.command("simulate")
def simulate(
    devices: Annotated[int, typer.Option(help="simulated devices")] = 50,
    mqtt_port: Annotated[int, typer.Option(help="the hub's broker port")] = 1883,
    factory: Annotated[Path, typer.Option(help="the bundle every device starts on (it must be "
                                               "in the hub's registry too)")] = Path("."),
    trusted_key: Annotated[list[Path], typer.Option(help="fleet public key the devices pin")]
    = [],  # noqa: B006 (typer reads the default, never mutates it)
    hub_key: Annotated[Path | None, typer.Option(help="the hub's assignment public key "
                                                      "(default: fetched from /v1/keys)")]
    = None,
    rate: Annotated[float, typer.Option(help="results per second per device")] = 2.0,
    prefix: Annotated[str, typer.Option(help="device ids are PREFIX-0000, ...")] = "sim",
    sites: Annotated[str, typer.Option(help="site labels handed out in turn")]
    = "berlin,lyon,porto",
    hub: HubOption = DEFAULT_HUB,
) -> None:
    """Run DEVICES simulated devices (one MQTT connection; the agent's own update rules and
    record encoder; each bundle version downloaded, verified, health-checked and run over the
    digits stream once) until Ctrl-C."""
    import numpy as np

    from fleet.cli.commands.common import hub_client
    from fleet.contract.signing import PublicKey
    from fleet.inference.engine import Engine
    from fleet.lab.sim_fleet import SimFleet
    from models import CLOUD_BUNDLE, STREAMS_FILE

    logging.basicConfig(level=logging.WARNING)
    if not trusted_key:
        fail("fleet simulate", "give the fleet's public key with --trusted-key fleet.pub")
    with hub_client(hub, "fleet simulate") as c:
        hub_pub = (PublicKey.read(hub_key) if hub_key is not None
                   else PublicKey.from_text(c.get("/v1/keys")["assignment"]["key"]))
    with np.load(STREAMS_FILE) as z:
        x = z["mixed_x"].astype(np.float32)
    e = Engine.open(CLOUD_BUNDLE, "onnxruntime")
    cloud = e.predict_batch(x).argmax(axis=1)
    e.close()
    site = sites.split(",")
    work = tempfile.TemporaryDirectory(prefix="fleet-simulate-")
    sim = SimFleet(broker_port=mqtt_port, hub_url=hub, hub_keys=[hub_pub],
                   trusted=[PublicKey.read(k) for k in trusted_key], factory=factory,
                   stream_x=x, cloud_labels=cloud, workdir=Path(work.name),
                   devices=devices, rate_hz=rate, prefix=prefix,
                   labels=lambda i: {"site": site[i % len(site)],
                                     "hw": "rpi4" if i % 2 else "x86"})
    sim.start()
    typer.echo(f"{devices} simulated devices on {sim.models()}; Ctrl-C to stop")
    try:
        while True:
            time.sleep(10)
            typer.echo(f"models: {sim.models()}; results sent {sim.results_sent:,}")
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        work.cleanup()
