"""The embedded broker with real paho clients."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest

from fleet.lab.brokers import RunningBroker
from fleet.transport.mqtt import MqttConfig, MqttSession, Will
from tests.conftest import wait_until


def _session(port: int, cid: str, subs: list[tuple[str, int]], sink: list,
             will: Will | None = None) -> MqttSession:
    s = MqttSession(MqttConfig(port=port, protocol="3.1.1", client_id=cid, will=will),
                    lambda t, b: sink.append((t, b)), subs)
    s.start()
    assert s.wait_connected(5)
    time.sleep(0.1)  # let the SUBSCRIBE land
    return s



def test_pubsub_qos1_and_wildcards(embedded_broker: RunningBroker) -> None:
    got: list = []
    sub = _session(embedded_broker.port, "sub1", [("a/+/c", 1), ("x/#", 0)], got)
    pub = _session(embedded_broker.port, "pub1", [], [])
    for i in range(200):
        assert pub.publish("a/b/c", str(i).encode(), qos=1)
    pub.publish("x/y/z", b"deep", qos=0)
    pub.publish("a/b/d", b"no", qos=1)
    assert wait_until(lambda: len(got) == 201)
    assert [b for t, b in got if t == "a/b/c"] == [str(i).encode() for i in range(200)]
    sub.stop()
    pub.stop()


def test_retained_and_last_will(embedded_broker: RunningBroker) -> None:
    pub = _session(embedded_broker.port, "ret-pub", [], [])
    pub.publish("status/dev", b"online", qos=1, retain=True)
    time.sleep(0.1)
    late: list = []
    watcher = _session(embedded_broker.port, "ret-watch", [("status/#", 1)], late)
    assert wait_until(lambda: late == [("status/dev", b"online")])
    doomed = _session(embedded_broker.port, "doomed", [], [],
                      will=Will("status/doomed", b"offline"))
    doomed.abort()  # vanish, no DISCONNECT
    assert wait_until(lambda: ("status/doomed", b"offline") in late)
    # A clean DISCONNECT sends no will.
    polite = _session(embedded_broker.port, "polite", [], [], will=Will("status/polite", b"x"))
    polite.stop()
    time.sleep(0.3)
    assert ("status/polite", b"x") not in late
    watcher.stop()
    pub.stop()


def test_shared_subscription_splits_messages(embedded_broker: RunningBroker) -> None:
    a: list = []
    b: list = []
    sa = _session(embedded_broker.port, "share-a", [("$share/g/jobs/+", 1)], a)
    sb = _session(embedded_broker.port, "share-b", [("$share/g/jobs/+", 1)], b)
    pub = _session(embedded_broker.port, "share-pub", [], [])
    for i in range(40):
        pub.publish(f"jobs/{i}", b"j", qos=1)
    assert wait_until(lambda: len(a) + len(b) == 40)
    assert len(a) == 20 and len(b) == 20  # round robin: each message to exactly one member
    for s in (sa, sb, pub):
        s.stop()


def test_mqtt5_is_refused_clearly(embedded_broker: RunningBroker) -> None:
    result: list = []
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="v5", protocol=mqtt.MQTTv5)

    def on_connect(client, userdata, flags, reason, props):
        result.append(reason)
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", embedded_broker.port)
    c.loop_start()
    assert done.wait(5)
    c.loop_stop()
    assert result[0].is_failure


@pytest.mark.parametrize("flt, topic, ok", [
    ("a/+/c", "a/b/c", True), ("a/#", "a", True), ("a/#", "a/b/c", True), ("+", "a/b", False),
    ("#", "$SYS/x", False), ("a/b", "a/b/c", False), ("+/+", "a/b", True),
])
def test_topic_matching(flt: str, topic: str, ok: bool) -> None:
    from paho.mqtt.client import topic_matches_sub

    assert topic_matches_sub(flt, topic) is ok
