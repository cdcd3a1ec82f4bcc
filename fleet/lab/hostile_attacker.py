"""The attacking device of `bench/security.py`, as a process of its own (a device is one; in the
bench's process its publishing would share the measuring victim's interpreter):

    python -m fleet.lab.hostile_attacker PORT MODE FOLDER STOCK

publishes the hostile messages in STOCK (written by `hostile_phases.generate`) as the device
whose credentials are in FOLDER, each channel paced at its rate in `ATTACK_RATES`, and prints
one JSON line: messages per channel and seconds.
"""

from __future__ import annotations

import collections
import json
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from fleet.contract import protocol as p
from fleet.lab.mqtt_probe import Probe

# The attacker's rate per channel: 80% of the hub's default quota (cloud_hub/core/config.py
# DeviceQuota), so that what the hub does with the messages is measured, not its quota.
ATTACK_RATES: dict[p.Channel, float] = {
    p.Channel.OFFLOAD: 400.0, p.Channel.RESULTS: 80.0, p.Channel.HARD: 40.0,
    p.Channel.TELEMETRY: 1.6, p.Channel.STATUS: 1.6, p.Channel.REPORTED: 1.6}
CHANNELS = list(ATTACK_RATES)


def read_stock(path: Path) -> Iterator[tuple[p.Channel, bytes]]:
    """The messages of a stock file: per message a channel index, a length, the payload."""
    with path.open("rb") as f:
        while head := f.read(5):
            i, size = struct.unpack(">BI", head)
            yield CHANNELS[i], f.read(size)


def main(argv: list[str]) -> int:
    port, mode, folder, stock = int(argv[0]), argv[1], Path(argv[2]), Path(argv[3])
    attacker = Probe("attacker", port, mode, folder)  # type: ignore[arg-type]
    if not attacker.connect():
        print(json.dumps({"error": attacker.connect_reason}), flush=True)
        return 1
    by_channel: collections.Counter[str] = collections.Counter()
    start = time.monotonic()
    due = dict.fromkeys(ATTACK_RATES, start)
    for channel, payload in read_stock(stock):
        wait = due[channel] - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        due[channel] += 1.0 / ATTACK_RATES[channel]
        attacker.client.publish(p.topic("attacker", channel), payload, qos=1)
        by_channel[channel.value] += 1
    seconds = time.monotonic() - start
    time.sleep(1.0)  # let paho's queue go out before the connection closes
    attacker.close()
    print(json.dumps({"by_channel": dict(by_channel), "seconds": round(seconds, 1)}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
