"""An MQTT session shared by agent and hub (paho-mqtt 2.x), and an in-memory fake beside it.

What the session takes care of, so that callers do not:
- TCP_NODELAY on the client socket: without it a QoS 1 request/response over loopback waits on
  Nagle's algorithm against delayed ACKs (tens of ms instead of under one);
- MQTT 5 where asked, MQTT 3.1.1 otherwise (the embedded broker and some brokers speak only it);
  message expiry is sent only over MQTT 5;
- reconnect with exponential backoff, re-subscribing on every connect, and a hook the caller uses
  to republish what the broker may have lost;
- no more retries after the broker refuses the credentials (retrying cannot fix them);
- a last will, so the broker announces the client offline when it vanishes.
paho errors are converted at this boundary into TransportError.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from paho.mqtt.client import topic_matches_sub
from pydantic import Field, model_validator

from fleet.contract.errors import FleetError
from fleet.transport.strict_settings import Section
from fleet.transport.tls import SecretFileError, TlsConfig, TlsSettings, read_secret
from fleet.transport.wire_bytes import tcp_bytes

log = logging.getLogger(__name__)

# Backoff between reconnect attempts: quick first retry, capped so a device that was offline for
# hours comes back within 10 s of the broker, while a fleet retries at most once per 10 s each.
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 10.0
KEEPALIVE_S = 30
# QoS 1 messages in flight per connection; paho's default of 20 throttles result batches and
# offloads of several threads.
MAX_INFLIGHT = 200
# Not reaching the broker is logged at WARNING at most this often (every attempt at DEBUG).
UNREACHABLE_LOG_EVERY_S = 60.0
# MQTT 5's reason code for a connection closed because another took its client id.
SESSION_TAKEN_OVER = 0x8E
# A connection closed within EARLY_DROP_S of opening, EARLY_DROPS_WARN times in a minute: on MQTT
# 3.1.1, the mark of two clients with one id taking turns.
EARLY_DROP_S = 10.0
EARLY_DROPS_WARN = 3
# paho reason codes for a refused login (3.1.1 return codes 4 and 5, MQTT 5 0x86 and 0x87).
_AUTH_FAILURES = {"Bad user name or password", "Not authorized"}
LOG_PAYLOAD_CHARS = 64

MessageHandler = Callable[[str, bytes], None]


class TransportError(FleetError):
    """The message transport could not connect or publish."""


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: Literal["3.1.1", "5"] = "5"
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    keepalive_s: int = KEEPALIVE_S
    reconnect_min_s: float = RECONNECT_MIN_S
    reconnect_max_s: float = RECONNECT_MAX_S
    will: Will | None = None
    tls: TlsConfig | None = None


class BrokerSettings(Section):
    """How a daemon reaches its broker, as agent and hub settings spell it."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    # "5" uses MQTT 5 features (message expiry); "3.1.1" for brokers that speak only that.
    protocol: Literal["3.1.1", "5"] = "5"
    username: str | None = None
    password: str | None = None
    # The password in a file readable by its owner only (what `fleet devices enroll` writes),
    # instead of `password`.
    password_file: Path | None = None
    keepalive_s: int = Field(KEEPALIVE_S, ge=5)
    tls: TlsSettings | None = None

    @model_validator(mode="after")
    def _one_password(self) -> BrokerSettings:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        return self

    def session_config(self, client_id: str, will: Will | None = None) -> MqttConfig:
        """The session's configuration; reads the password file and checks the TLS files.
        Raises TransportError naming the file at fault."""
        try:
            password = (read_secret(self.password_file) if self.password_file is not None
                        else self.password)
            tls = self.tls.config() if self.tls is not None else None
        except SecretFileError as exc:
            raise TransportError(str(exc)) from None
        return MqttConfig(host=self.host, port=self.port, protocol=self.protocol,
                          client_id=client_id, username=self.username, password=password,
                          keepalive_s=self.keepalive_s, will=will, tls=tls)


class Transport(Protocol):
    """What agent and hub need of a message transport."""

    @property
    def connected(self) -> bool: ...

    def start(self) -> None: ...

    def wait_connected(self, timeout: float) -> bool: ...

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                expiry_s: float | None = None) -> bool: ...

    def stop(self, final: tuple[str, bytes, int, bool] | None = None) -> None: ...


class _QuietStop(logging.Filter):
    """paho's network loop logs "Client is not connected" as an error once when a client it
    runs is stopped (the socket goes before the loop does): not an error, not logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_PAHO_LOG = logging.getLogger(__name__ + ".paho")
_PAHO_LOG.addFilter(_QuietStop())


class MqttSession:
    """A paho client running its network loop in a background thread."""

    def __init__(self, cfg: MqttConfig, on_message: MessageHandler,
                 subscriptions: list[tuple[str, int]],
                 on_connect: Callable[[], None] | None = None) -> None:
        import paho.mqtt.client as mqtt

        self.cfg = cfg
        self._mqtt = mqtt
        self._on_message = on_message
        self._subs = subscriptions
        self._on_connect_hook = on_connect
        self._connected = threading.Event()
        # Bytes sent and received on connections already closed (wire_bytes adds the open one).
        self._closed_bytes = (0, 0)
        self._wire_known = True
        self._gave_up = False
        self._stopping = False
        # Not reaching the broker: since when, how often, when it was last said (WARNING at
        # most every UNREACHABLE_LOG_EVERY_S; every attempt at DEBUG).
        self._down_since: float | None = None
        self._failures = 0
        self._down_logged = -math.inf
        self._connected_at = 0.0
        self._early_drops: list[float] = []
        proto = mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311
        kwargs: dict[str, Any] = {"callback_api_version": mqtt.CallbackAPIVersion.VERSION2,
                                  "client_id": cfg.client_id, "protocol": proto}
        if proto == mqtt.MQTTv311:
            kwargs["clean_session"] = True
        c = mqtt.Client(**kwargs)
        c.enable_logger(_PAHO_LOG)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password)
        if cfg.tls is not None:
            import ssl

            t = cfg.tls
            try:
                # PROTOCOL_TLS_CLIENT checks the broker's certificate and its host name.
                c.tls_set(ca_certs=str(t.ca_file),
                          certfile=str(t.cert_file) if t.cert_file else None,
                          keyfile=str(t.key_file) if t.key_file else None,
                          cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ValueError, ssl.SSLError) as exc:
                raise TransportError(f"TLS settings for the broker: {exc}") from None
        if cfg.will:
            c.will_set(cfg.will.topic, cfg.will.payload, cfg.will.qos, cfg.will.retain)
        # paho types the delays as int but sleeps on them as numbers: 0.5 s stays 0.5 s.
        c.reconnect_delay_set(min_delay=cfg.reconnect_min_s,  # type: ignore[arg-type]
                              max_delay=cfg.reconnect_max_s)  # type: ignore[arg-type]
        c.max_inflight_messages_set(MAX_INFLIGHT)
        c.on_socket_open = self._socket_open
        c.on_socket_close = self._socket_close
        c.on_connect = self._handle_connect
        c.on_connect_fail = self._handle_connect_fail
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        self._client = c

    # -- paho callbacks (run in paho's network thread)

    def _socket_open(self, _c: Any, _u: Any, sock: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            log.debug("could not set TCP_NODELAY on the MQTT socket")

    def _socket_close(self, _c: Any, _u: Any, sock: Any) -> None:
        counted = tcp_bytes(sock)
        if counted is None:
            self._wire_known = False
            return
        self._closed_bytes = (self._closed_bytes[0] + counted[0],
                              self._closed_bytes[1] + counted[1])

    def wire_bytes(self) -> tuple[int, int] | None:
        """(bytes sent, bytes received) to and from the broker over every connection of this
        session, as the kernel counted them (MQTT framing, acks and pings included; TLS
        records as they crossed); None where the system does not count them."""
        if not self._wire_known:
            return None
        sock: Any = self._client.socket()
        now = tcp_bytes(sock) if sock is not None else (0, 0)
        if now is None:
            return None
        return self._closed_bytes[0] + now[0], self._closed_bytes[1] + now[1]

    def _unreachable(self, why: object) -> None:
        now = time.monotonic()
        self._failures += 1
        if self._down_since is None:
            self._down_since = now
        if now - self._down_logged >= UNREACHABLE_LOG_EVERY_S:
            self._down_logged = now
            log.warning("cannot reach the MQTT broker %s:%s: %s (%d attempts in %.0f s; "
                        "retrying every %g-%g s)", self.cfg.host, self.cfg.port, why,
                        self._failures, now - self._down_since, self.cfg.reconnect_min_s,
                        self.cfg.reconnect_max_s)
        else:
            log.debug("cannot reach the MQTT broker %s:%s: %s", self.cfg.host, self.cfg.port,
                      why)

    def _handle_connect_fail(self, _c: Any, _u: Any) -> None:
        # paho calls this inside its `except OSError:` around the connect: the error is there.
        exc = sys.exc_info()[1]
        self._unreachable(exc if exc is not None else "connection failed")

    def _handle_connect(self, client: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._unreachable(f"it refused the connection: {reason}")
            log.error("broker %s:%s refused the connection: %s", self.cfg.host, self.cfg.port,
                      reason)
            if str(reason) in _AUTH_FAILURES:
                log.error("not retrying: fix the MQTT username/password in the settings")
                self._gave_up = True
                client.disconnect()
            return
        for t, qos in self._subs:
            client.subscribe(t, qos)
        self._connected.set()
        self._connected_at = time.monotonic()
        if self._down_since is not None:
            log.info("connected to MQTT broker %s:%s (MQTT %s) after %.0f s and %d failed "
                     "attempts", self.cfg.host, self.cfg.port, self.cfg.protocol,
                     time.monotonic() - self._down_since, self._failures)
        else:
            log.info("connected to MQTT broker %s:%s (MQTT %s)", self.cfg.host, self.cfg.port,
                     self.cfg.protocol)
        self._down_since, self._failures, self._down_logged = None, 0, -math.inf
        if self._on_connect_hook:
            try:
                self._on_connect_hook()
            except Exception:
                log.exception("on-connect hook failed")

    def _handle_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if not was or self._stopping:
            return
        now = time.monotonic()
        self._down_since = now
        log.warning("disconnected from MQTT broker %s:%s (%s); reconnecting", self.cfg.host,
                    self.cfg.port, reason)
        if getattr(reason, "value", None) == SESSION_TAKEN_OVER:
            log.error("the broker says another client connected with this one's id %r: two "
                      "processes share one id (two agents with one device_id?); each takes "
                      "the connection from the other", self.cfg.client_id)
            return
        # MQTT 3.1.1 has no reason for a takeover: connections closed again and again soon
        # after they opened are the sign.
        if now - self._connected_at < EARLY_DROP_S:
            self._early_drops = [t for t in self._early_drops if now - t < 60.0] + [now]
            if len(self._early_drops) >= EARLY_DROPS_WARN:
                self._early_drops.clear()
                log.error("the broker closed this connection %d times within a minute soon "
                          "after it opened: another client may use the same client id %r (two "
                          "agents with one device_id?), or its access rules refuse this one",
                          EARLY_DROPS_WARN, self.cfg.client_id)

    def _handle_message(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            self._on_message(msg.topic, msg.payload)
        except Exception:
            # A failing handler must not kill paho's network thread.
            log.exception("handler failed for a message on %s (%r...)", msg.topic,
                          bytes(msg.payload[:LOG_PAYLOAD_CHARS]))

    # -- public API

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        try:
            self._client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive_s)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot connect to MQTT broker {self.cfg.host}:{self.cfg.port}: "
                                 f"{exc}") from None
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                expiry_s: float | None = None) -> bool:
        """Queue a message; False when not connected (paho would queue it and report success)."""
        if not self._connected.is_set():
            return False
        props = None
        if expiry_s is not None and self.cfg.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = max(1, int(expiry_s + 0.999))
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        return bool(info.rc == self._mqtt.MQTT_ERR_SUCCESS)

    def stop(self, final: tuple[str, bytes, int, bool] | None = None) -> None:
        """Disconnect cleanly; publish `final` (topic, payload, qos, retain) first if connected."""
        self._stopping = True
        if final and self._connected.is_set():
            info = self._client.publish(final[0], final[1], qos=final[2], retain=final[3])
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2.0)
        if self._connected.is_set():
            self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()


    def unsubscribe_all(self) -> None:
        """Take no more messages (a replica going away): unsubscribe, and do not subscribe
        again on a reconnect. Publishing still works."""
        topics = [t for t, _ in self._subs]
        self._subs = []
        if topics and self._connected.is_set():
            self._client.unsubscribe(topics)

    def reconnect(self) -> None:
        """Drop the connection so that paho's loop reconnects (a session that hears nothing
        any more: its heartbeats do not come back)."""
        sock: Any = self._client.socket()  # a socket.socket or an ssl.SSLSocket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def abort(self) -> None:
        """Drop the connection without DISCONNECT and stop, as a crash or a cut cable would:
        the broker then publishes the last will. For fault injection and tests."""
        self._stopping = True
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._client.loop_stop()
        self._connected.clear()


class MemoryBus:
    """An in-process broker for unit tests: exact topics, `+`/`#` filters and `$share` groups."""

    def __init__(self) -> None:
        self._subs: list[tuple[str, MessageHandler]] = []
        self.retained: dict[str, bytes] = {}
        self.log: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()

    def subscribe(self, flt: str, handler: MessageHandler) -> None:
        if flt.startswith("$share/"):
            flt = flt.split("/", 2)[2]
        with self._lock:
            self._subs.append((flt, handler))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        with self._lock:
            self.log.append((topic, payload))
            if retain:
                self.retained[topic] = payload
            targets = [h for f, h in self._subs if topic_matches_sub(f, topic)]
        for h in targets:
            h(topic, payload)


class MemorySession:
    """A Transport on a MemoryBus; delivery is synchronous in the publisher's thread."""

    def __init__(self, bus: MemoryBus, on_message: MessageHandler,
                 subscriptions: list[tuple[str, int]],
                 on_connect: Callable[[], None] | None = None) -> None:
        self.bus = bus
        self._on_message = on_message
        self._subs = subscriptions
        self._on_connect = on_connect
        self._connected = False
        self.online = True

    @property
    def connected(self) -> bool:
        return self._connected and self.online

    def start(self) -> None:
        for t, _q in self._subs:
            self.bus.subscribe(t, self._deliver)
        self._connected = True
        if self._on_connect:
            self._on_connect()

    def _deliver(self, topic: str, payload: bytes) -> None:
        if self.connected:
            self._on_message(topic, payload)

    def wait_connected(self, timeout: float) -> bool:
        return self.connected

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                expiry_s: float | None = None) -> bool:
        if not self.connected:
            return False
        self.bus.publish(topic, payload, retain)
        return True

    def stop(self, final: tuple[str, bytes, int, bool] | None = None) -> None:
        if final and self.connected:
            self.bus.publish(final[0], final[1], final[3])
        self._connected = False
