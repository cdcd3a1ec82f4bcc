"""What messages cost on an MQTT link, packet framing included: for the figures the demo
reports beside the bytes the kernel counted."""

from __future__ import annotations

from typing import Literal

import numpy as np

from fleet.contract import protocol as p

PUBACK_BYTES = 4  # fixed header, remaining length 2, packet id (MQTT 3.1.1; 5 with success)


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_bytes(topic: str, payload: int, qos: int,
                  protocol: Literal["3.1.1", "5"] = "3.1.1", properties: int = 0) -> int:
    """Bytes of one PUBLISH packet of `payload` bytes on `topic`."""
    rest = 2 + len(topic.encode()) + (2 if qos else 0) + payload
    if protocol == "5":
        rest += _varint_len(properties) + properties
    return 1 + _varint_len(rest) + rest


def cloud_only_bytes_per_input(x: np.ndarray, device: str, model_ref: str, cloud_ref: str,
                               deadline_ms: float, protocol: Literal["3.1.1", "5"] = "3.1.1",
                               version: int = p.PROTOCOL_VERSION) -> float:
    """A device's link, per input, if every input went to the cloud and came back answered:
    the offload and the answer as the agent and hub encode them, at the contract's QoS (with
    a PUBACK each at QoS 1; ids as the agent draws them; the offload's message expiry on
    MQTT 5)."""
    total = 0
    prefix = "0123456789abcdef"
    up = p.topic(device, p.Channel.OFFLOAD)
    down = p.topic(device, p.Channel.ANSWER)
    for i, xi in enumerate(x):
        rid = f"{prefix}{i:x}"
        off = p.Offload(id=rid, model=model_ref, input=xi, deadline_ms=deadline_ms,
                        sent_at=1_764_000_000.123456, edge_label=0, edge_score=0.0).encode(version)
        ans = p.Answer(rid, 0, 0.987654, cloud_ref, hub_ms=0.123).encode(version)
        for topic, payload, qos, props in (
                (up, off, p.QOS[p.Channel.OFFLOAD], 5), (down, ans, p.QOS[p.Channel.ANSWER], 0)):
            total += publish_bytes(topic, len(payload), qos, protocol, properties=props)
            total += PUBACK_BYTES if qos else 0
    return total / max(1, len(x))
