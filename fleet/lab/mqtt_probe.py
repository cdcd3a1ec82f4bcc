"""A bare MQTT 5 client for probing a confined broker as a device, a hub or an intruder would:
publishes whose acknowledgement says whether the broker accepted them, and a record of every
message received. For tests and bench/security.py."""

from __future__ import annotations

import contextlib
import gc
import ssl
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from fleet.identity.broker_config import BrokerMode

# MQTT 5 reason codes below 0x80 are successes; 0x87 is "not authorized".
NOT_AUTHORIZED = 0x87


@dataclass
class Probe:
    name: str
    port: int
    mode: BrokerMode | None = None   # None: plain TCP, no credentials (an intruder)
    folder: Path | None = None       # the identity's credentials (client.crt, password, ...)
    client_id: str | None = None
    ca_file: Path | None = None      # verifies the broker (default: the folder's ca.crt)
    received: list[tuple[str, bytes]] = field(default_factory=list)
    connect_reason: str | None = None

    def __post_init__(self) -> None:
        self._acks: dict[int, int] = {}
        self._acked = threading.Condition()
        self._connected = threading.Event()
        self._answered = threading.Event()  # a CONNACK came, accepted or not
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                        client_id=self.client_id or f"probe-{self.name}",
                        protocol=mqtt.MQTTv5)
        ca = self.ca_file or (self.folder / "ca.crt" if self.folder is not None else None)
        if self.mode is not None and ca is not None:
            mtls = self.mode == "mtls" and self.folder is not None
            c.tls_set(ca_certs=str(ca),
                      certfile=str(self.folder / "client.crt") if mtls and self.folder else None,
                      keyfile=str(self.folder / "client.key") if mtls and self.folder else None,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if self.mode == "password" and self.folder is not None:
            c.username_pw_set(self.name, (self.folder / "password").read_text().strip())
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *_a: self._connected.clear()
        c.on_message = lambda _c, _u, m: self.received.append((m.topic, bytes(m.payload)))
        c.on_publish = self._on_publish
        self.client = c

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connect_reason = str(reason)
        if not reason.is_failure:
            self._connected.set()
        self._answered.set()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._acked:
            self._acks[mid] = int(reason.value)
            self._acked.notify_all()

    def connect(self, timeout: float = 10.0) -> bool:
        """Connect; returns whether the broker accepted the client."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            self.connect_reason = f"{type(exc).__name__}: {exc}"
            # paho leaves the socket of a failed TLS handshake open; let it go quietly.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                gc.collect()
            return False
        self.client.loop_start()
        self._answered.wait(timeout)
        if not self._connected.is_set():
            self.close()
        return self._connected.is_set()

    def _close_socket(self) -> None:
        sock: Any = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and self.client.is_connected()

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, 1)

    def publish(self, topic: str, payload: bytes, timeout: float = 10.0,
                retain: bool = False) -> bool | None:
        """Publish at QoS 1; True if the broker accepted it, False if it refused it (or the
        connection went away), None if no acknowledgement came in time."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        end = time.monotonic() + timeout
        with self._acked:
            while info.mid not in self._acks:
                left = end - time.monotonic()
                if left <= 0 or not self.client.is_connected():
                    return None if self.client.is_connected() else False
                self._acked.wait(min(left, 0.2))
            return self._acks.pop(info.mid) < 0x80

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self._close_socket()
