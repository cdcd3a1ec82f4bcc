"""A real Mosquitto with the configuration `fleet pki` generates: every device confined to its own
topics in the protocol's directions, the hubs' group out of reach, client ids bound to
identities, revocation at the next reload; in both modes (client certificates, passwords)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet.contract import protocol as p
from fleet.identity.broker_config import BrokerMode
from fleet.identity.pki import Pki, reload_broker
from fleet.lab.brokers import RunningBroker, mosquitto_path, start_confined_broker
from fleet.lab.mqtt_probe import Probe
from fleet.lab.processes import ProcessGroup
from tests.conftest import DELIVERY_S, need, wait_until

DEVICES = ("dev-a", "dev-b", "dev-c")


@dataclass
class Fleet:
    pki: Pki
    broker: RunningBroker
    mode: BrokerMode

    def probe(self, name: str, kind: str = "device", client_id: str | None = None) -> Probe:
        pr = Probe(name, self.broker.port, self.mode, self.pki.root / f"{kind}s" / name,
                   client_id=client_id)
        assert pr.connect(), f"{name}: {pr.connect_reason}"
        return pr


@pytest.fixture(params=["mtls", "password"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    need(mosquitto_path() is not None, "mosquitto is not installed")
    pki = Pki.init(tmp_path / "pki")
    for d in DEVICES:
        pki.enroll(d)
    with ProcessGroup() as g:
        yield Fleet(pki, start_confined_broker(g, pki, request.param), request.param)


def _hub(f: Fleet) -> Probe:
    hub = f.probe("hub-0", "hub")
    for c in sorted(p.FROM_DEVICE):
        hub.subscribe(p.hub_filter(c, True, f.pki.share_group))
    return hub


def test_a_device_reaches_only_its_own_topics(fleet: Fleet) -> None:
    hub = _hub(fleet)
    a, b = fleet.probe("dev-a"), fleet.probe("dev-b")
    for c in sorted(p.TO_DEVICE):
        a.subscribe(p.topic("dev-a", c))
    # The intruder listens everywhere and joins the hubs' group under the name it can guess.
    for t in ("#", f"$share/{p.HUB_SHARE_GROUP}/{p.TOPIC_ROOT}/+/offload",
              f"$share/{p.HUB_SHARE_GROUP}/{p.TOPIC_ROOT}/+/results"):
        b.subscribe(t)
    time.sleep(0.3)  # let the subscriptions land
    attempts = denied = 0
    for c in sorted(p.FROM_DEVICE | p.TO_DEVICE):  # every channel of another device
        attempts += 1
        denied += b.publish(p.topic("dev-a", c), b"forged") is False
    assert (attempts, denied) == (9, 9)
    # The owner's own traffic flows, all of it to the hub, none of it to the intruder.
    for i in range(20):
        assert a.publish(p.topic("dev-a", p.Channel.OFFLOAD), b"real-%d" % i) is True
    assert wait_until(lambda: len(hub.received) >= 20, DELIVERY_S)
    for c in sorted(p.TO_DEVICE):
        assert hub.publish(p.topic("dev-a", c), b"from-hub") is True
    assert wait_until(lambda: len(a.received) >= 3, DELIVERY_S)
    time.sleep(0.5)
    assert sorted(m for _, m in hub.received) == sorted(b"real-%d" % i for i in range(20))
    assert all(m == b"from-hub" for _, m in a.received) and len(a.received) == 3
    assert b.received == []
    # A device may not speak for the hub either: answers, acks, assignments to itself.
    for c in sorted(p.TO_DEVICE):
        assert b.publish(p.topic("dev-b", c), b"self-served") is False
    for pr in (hub, a, b):
        pr.close()


def test_no_one_takes_the_hubs_session_and_strangers_are_refused(fleet: Fleet,
                                                                  tmp_path: Path) -> None:
    hub = _hub(fleet)
    c = fleet.probe("dev-c", client_id="cloud-hub-hub-0")  # the hub's client id
    time.sleep(0.5)
    assert hub.connected  # the broker named the intruder's session after its identity
    a = fleet.probe("dev-a")
    assert a.publish(p.topic("dev-a", p.Channel.RESULTS), b"r") is True
    assert wait_until(lambda: len(hub.received) == 1, DELIVERY_S)
    # No credentials at all: refused (plain TCP to a TLS port, or TLS without an identity).
    stranger = Probe("nobody", fleet.broker.port, fleet.mode, None,
                     ca_file=fleet.pki.ca.cert_path)
    assert not stranger.connect(5)
    # A certificate from another CA, or a wrong password: refused.
    other = Pki.init(tmp_path / "other")
    other.enroll("dev-a")
    impostor = Probe("dev-a", fleet.broker.port, fleet.mode, other.root / "devices" / "dev-a",
                     client_id="impostor", ca_file=fleet.pki.ca.cert_path)
    assert not impostor.connect(5)
    for pr in (hub, c, a):
        pr.close()


def test_a_revoked_device_loses_every_right_at_the_reload(fleet: Fleet) -> None:
    hub = _hub(fleet)
    b = fleet.probe("dev-b")
    assert b.publish(p.topic("dev-b", p.Channel.RESULTS), b"before") is True
    # A PUBACK says the broker took it, not that the hub has it yet: wait for the delivery.
    assert wait_until(lambda: [m for _, m in hub.received] == [b"before"], DELIVERY_S)
    fleet.pki.revoke("dev-b")
    reload_broker(pid=fleet.broker.process.pid)
    time.sleep(1.0)
    # Connected or not, nothing it sends is accepted ...
    assert b.publish(p.topic("dev-b", p.Channel.RESULTS), b"after", timeout=5) is not True
    b.close()
    # ... and it cannot come back.
    again = Probe("dev-b", fleet.broker.port, fleet.mode, fleet.pki.root / "devices" / "dev-b",
                  client_id="dev-b-again")
    assert not again.connect(5)
    assert [m for _, m in hub.received] == [b"before"]
    # The others carry on; the revoked id can be enrolled again with new credentials.
    a = fleet.probe("dev-a")
    assert a.publish(p.topic("dev-a", p.Channel.RESULTS), b"a") is True
    fleet.pki.enroll("dev-b")
    reload_broker(pid=fleet.broker.process.pid)
    time.sleep(1.0)
    # (a new certificate of the same CA needs no reload; a new password and the rules do)
    assert fleet.probe("dev-b").publish(p.topic("dev-b", p.Channel.RESULTS), b"x") is True
    for pr in (hub, a):
        pr.close()
