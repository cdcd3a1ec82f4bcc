"""The broker of the one-machine demo and of the tests: Mosquitto when installed, else embedded."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fleet.contract.errors import FleetError
from fleet.identity.broker_config import BrokerMode
from fleet.identity.pki import Pki
from fleet.lab.processes import ManagedProcess, ProcessGroup, wait_for_port
from fleet.transport.ports import free_port

BrokerKind = Literal["mosquitto", "embedded"]
BROKER_START_TIMEOUT_S = 15.0

# set_tcp_nodelay: without it each QoS 1 round trip waits ~40 ms on Nagle + delayed ACK.
MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
persistence false
max_queued_messages 100000
log_dest stdout
log_type error
log_type warning
"""


@dataclass(frozen=True)
class RunningBroker:
    kind: BrokerKind
    port: int
    process: ManagedProcess

    @property
    def protocol(self) -> Literal["3.1.1", "5"]:
        """The MQTT version clients should speak: the embedded broker knows only 3.1.1."""
        return "5" if self.kind == "mosquitto" else "3.1.1"


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None)


def resolve_kind(kind: str) -> BrokerKind:
    if kind == "auto":
        return "mosquitto" if mosquitto_path() else "embedded"
    if kind == "mosquitto" and not mosquitto_path():
        raise FleetError("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto); "
                         "use --broker embedded")
    if kind not in ("mosquitto", "embedded"):
        raise FleetError(f"unknown broker {kind!r}; choose auto, mosquitto or embedded")
    return kind  # type: ignore[return-value]


def start_broker(group: ProcessGroup, workdir: Path, kind: str = "auto",
                 port: int | None = None) -> RunningBroker:
    """Start a broker of its own on a free port (never the machine's shared one)."""
    k = resolve_kind(kind)
    port = port or free_port()
    if k == "mosquitto":
        conf = workdir / f"mosquitto-{port}.conf"
        conf.write_text(MOSQUITTO_CONF.format(port=port))
        argv = [mosquitto_path() or "mosquitto", "-c", str(conf)]
    else:
        argv = [sys.executable, "-m", "fleet.lab.embedded_broker", "--port", str(port)]
    proc = group.start(f"broker-{k}", argv, workdir / f"broker-{port}.log")
    if not wait_for_port(port, BROKER_START_TIMEOUT_S, proc.proc):
        raise FleetError(f"the {k} broker did not start on port {port}:\n{proc.tail()}")
    return RunningBroker(k, port, proc)


def start_confined_broker(group: ProcessGroup, pki: Pki, mode: BrokerMode,
                          port: int | None = None) -> RunningBroker:
    """Mosquitto with the configuration `fleet pki` generates (TLS, identities, access rules),
    on a free loopback port. Reload it after enrolling or revoking with `proc.reload()`."""
    import getpass

    if not mosquitto_path():
        raise FleetError("a confined broker needs Mosquitto (apt-get install mosquitto)")
    port = port or free_port()
    # Started by root, Mosquitto would become the user `mosquitto`, who cannot read the
    # identity folder's files: it stays the user who runs the lab.
    conf = pki.write_broker(mode=mode, port=port, host="127.0.0.1", run_as=getpass.getuser())
    proc = group.start("broker-confined", [mosquitto_path() or "mosquitto", "-c", str(conf)],
                       pki.root / f"broker-{port}.log")
    if not wait_for_port(port, BROKER_START_TIMEOUT_S, proc.proc):
        raise FleetError(f"the confined broker did not start on port {port}:\n{proc.tail()}")
    return RunningBroker("mosquitto", port, proc)
