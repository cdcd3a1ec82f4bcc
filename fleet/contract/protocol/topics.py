"""Topics and channels: where each message travels, at which QoS, and who may publish it."""

from __future__ import annotations

import re
from enum import StrEnum

from fleet.contract.errors import ProtocolError

TOPIC_ROOT = "ehi/v1"
HUB_SHARE_GROUP = "hub"
# A hub replica's own topics (`ehi/hub/{replica}/heartbeat`): outside the devices' tree, so no
# device filter matches them.
HUB_TOPIC_ROOT = "ehi/hub"
# A name in the fleet: a device id, a hub replica, a bundle. It is a topic level, a folder and a
# URL segment, so: 1-64 of these characters, starting with a letter or digit (never "." or
# "..", which a path or a store might resolve). The API and the settings use the same pattern;
# Python code matches it with `fullmatch` (with `match`, `$` lets a trailing newline through).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_DEVICE_ID = re.compile(NAME_PATTERN)


class Channel(StrEnum):
    """The last level of a device's topics, `ehi/v1/{device}/{channel}`."""

    OFFLOAD = "offload"      # agent -> hub, QoS 0: a hard example, answered within its deadline
    ANSWER = "answer"        # hub -> agent, QoS 0: the cloud answer for an offload id
    RESULTS = "results"      # agent -> hub, QoS 1: a batch of result records
    ACK = "ack"              # hub -> agent, QoS 1: record ids committed by the hub
    TELEMETRY = "telemetry"  # agent -> hub, QoS 0: heartbeat
    STATUS = "status"        # agent -> hub, QoS 1, retained, last will: online/offline
    HARD = "hard"            # agent -> hub, QoS 1: hard examples for a late cloud answer
    DESIRED = "desired"      # hub -> agent, QoS 1, retained: the signed model assignment
    REPORTED = "reported"    # agent -> hub, QoS 1, retained: model, update state, last error


# An offload and its answer live for one deadline (200 ms by default): MQTT sends a QoS 1
# message again only after a reconnect, by when the agent has answered from the edge model,
# so QoS 1 would buy them little but two PUBACKs per offload on the critical path (the
# request/response floor through Mosquitto is 0.27 ms at QoS 0 against 0.53 at QoS 1). An
# offload lost on the way (also one in flight at a reconnect under a long deadline) is a
# fallback to the edge answer, counted; the hard example then goes to the hub durably on
# `hard` when `late_answers` is on.
QOS: dict[Channel, int] = {
    Channel.OFFLOAD: 0, Channel.ANSWER: 0, Channel.RESULTS: 1, Channel.ACK: 1,
    Channel.TELEMETRY: 0, Channel.STATUS: 1, Channel.HARD: 1, Channel.DESIRED: 1,
    Channel.REPORTED: 1,
}


# Smaller limits than MAX_FRAME_BYTES for the channels that carry no tensors: what one device can
# make the hub store per message (telemetry and reports are kept per device).
CHANNEL_MAX_BYTES: dict[Channel, int] = {
    Channel.TELEMETRY: 64 << 10, Channel.STATUS: 4 << 10, Channel.REPORTED: 256 << 10,
    Channel.ACK: 1 << 20,
}

# Who publishes on each channel: a device on its own topics, the hub on the others. The broker's
# access rules (fleet/identity/broker_config.py) are generated from these two sets.
FROM_DEVICE = frozenset({Channel.OFFLOAD, Channel.RESULTS, Channel.TELEMETRY, Channel.STATUS,
                         Channel.HARD, Channel.REPORTED})
TO_DEVICE = frozenset({Channel.ANSWER, Channel.ACK, Channel.DESIRED})


def check_device_id(device: str) -> str:
    if not isinstance(device, str) or not _DEVICE_ID.fullmatch(device):
        raise ProtocolError(f"device id {device!r} must be 1-64 characters of A-Z a-z 0-9 _ . -, "
                            "starting with a letter or digit")
    return device


def topic(device: str, channel: Channel) -> str:
    return f"{TOPIC_ROOT}/{check_device_id(device)}/{channel.value}"


def hub_heartbeat_topic(replica: str) -> str:
    """Where a hub replica publishes to itself through the broker, to know it still hears it."""
    return f"{HUB_TOPIC_ROOT}/{check_device_id(replica)}/heartbeat"


def hub_filter(channel: Channel, shared: bool = True, group: str = HUB_SHARE_GROUP) -> str:
    """The hub's subscription for a channel of every device, shared among hub replicas in
    `group` (on a confined broker a secret: docs/security.md)."""
    base = f"{TOPIC_ROOT}/+/{channel.value}"
    return f"$share/{group}/{base}" if shared else base


def parse_topic(t: str) -> tuple[str, Channel]:
    parts = t.split("/")
    if len(parts) != 4 or "/".join(parts[:2]) != TOPIC_ROOT:
        raise ProtocolError(f"topic {t!r} is not under {TOPIC_ROOT}/{{device}}/{{channel}}")
    try:
        channel = Channel(parts[3])
    except ValueError:
        raise ProtocolError(f"topic {t!r} names an unknown channel {parts[3]!r}") from None
    return check_device_id(parts[2]), channel
