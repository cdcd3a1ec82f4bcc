"""A small MQTT 3.1.1 broker in pure Python (asyncio), for the one-machine demo and tests.

It lets `fleet demo` run on a laptop with nothing else installed. It speaks MQTT 3.1.1 only
(refusing other protocol levels with return code 1, as the standard says) and supports QoS 0
and 1 (QoS 2 is granted as 1), retained messages, last wills, keepalive, `+`/`#` wildcards and
`$share/{group}/{filter}` shared subscriptions (round-robin within a group). Sessions are always
clean: nothing persists across connections or restarts. It is not a production broker: use
Mosquitto (or another full broker) there.

    python -m fleet.lab.embedded_broker --port 1883
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import signal
import socket
import struct
from dataclasses import dataclass, field

from paho.mqtt.client import topic_matches_sub as topic_matches

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
# Largest packet accepted: bounds the memory one client can make the broker hold.
MAX_PACKET_BYTES = 16 << 20
# A client silent for 1.5 x its keepalive is gone (MQTT 3.1.1, 3.1.2.10).
KEEPALIVE_GRACE = 1.5
# Time a new connection has to send CONNECT.
CONNECT_TIMEOUT_S = 10.0


class _Closed(Exception):
    pass


def _enc_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def _enc_len(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + _enc_len(len(body)) + body


@dataclass
class _Client:
    client_id: str
    writer: asyncio.StreamWriter
    will: tuple[str, bytes, int, bool] | None = None
    subs: dict[str, int] = field(default_factory=dict)
    ids: itertools.cycle = field(default_factory=lambda: itertools.cycle(range(1, 65536)))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, data: bytes) -> None:
        async with self.lock:
            self.writer.write(data)
            await self.writer.drain()


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self._clients: dict[str, _Client] = {}
        self._retained: dict[str, tuple[bytes, int]] = {}
        self._share_rr: dict[tuple[str, str], int] = {}
        self._server: asyncio.AbstractServer | None = None
        self.messages_routed = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("embedded MQTT broker on %s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            for c in list(self._clients.values()):
                c.writer.close()
            await self._server.wait_closed()

    # ------------------------------------------------------------------ wire

    @staticmethod
    async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
        head = await reader.readexactly(1)
        mult, length = 1, 0
        for _ in range(4):
            b = (await reader.readexactly(1))[0]
            length += (b & 0x7F) * mult
            if not b & 0x80:
                break
            mult *= 128
        else:
            raise _Closed("malformed remaining length")
        if length > MAX_PACKET_BYTES:
            raise _Closed(f"packet of {length} bytes exceeds {MAX_PACKET_BYTES}")
        body = await reader.readexactly(length) if length else b""
        return head[0] >> 4, head[0] & 0x0F, body

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client: _Client | None = None
        clean_exit = False
        try:
            ptype, _flags, body = await asyncio.wait_for(self._read_packet(reader),
                                                         CONNECT_TIMEOUT_S)
            if ptype != CONNECT:
                raise _Closed("first packet was not CONNECT")
            client, keepalive = await self._connect(body, writer)
            if client is None:
                return
            timeout = keepalive * KEEPALIVE_GRACE if keepalive else None
            while True:
                ptype, flags, body = await asyncio.wait_for(self._read_packet(reader), timeout)
                if ptype == DISCONNECT:
                    clean_exit = True
                    return
                await self._dispatch(client, ptype, flags, body)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, _Closed,
                struct.error, UnicodeDecodeError, IndexError) as exc:
            log.debug("client %s gone: %r", client.client_id if client else "?", exc)
        finally:
            if client is not None and self._clients.get(client.client_id) is client:
                del self._clients[client.client_id]
                if client.will and not clean_exit:
                    await self._route(*client.will)
            writer.close()

    async def _connect(self, body: bytes, writer: asyncio.StreamWriter
                       ) -> tuple[_Client | None, int]:
        i = 0
        (n,) = struct.unpack_from(">H", body, i)
        proto = body[i + 2:i + 2 + n].decode()
        i += 2 + n
        level, cflags = body[i], body[i + 1]
        (keepalive,) = struct.unpack_from(">H", body, i + 2)
        i += 4
        if proto != "MQTT" or level != 4:
            # 0x01: unacceptable protocol level. MQTT 5 clients must retry with 3.1.1.
            writer.write(_packet(CONNACK, 0, b"\x00\x01"))
            await writer.drain()
            return None, 0
        (n,) = struct.unpack_from(">H", body, i)
        client_id = body[i + 2:i + 2 + n].decode() or f"anon-{id(writer):x}"
        i += 2 + n
        will = None
        if cflags & 0x04:
            (n,) = struct.unpack_from(">H", body, i)
            wtopic = body[i + 2:i + 2 + n].decode()
            i += 2 + n
            (n,) = struct.unpack_from(">H", body, i)
            wpayload = body[i + 2:i + 2 + n]
            i += 2 + n
            will = (wtopic, bytes(wpayload), min((cflags >> 3) & 0x03, 1), bool(cflags & 0x20))
        old = self._clients.get(client_id)
        if old is not None:  # a client id takes over its older connection (3.1.4-2)
            old.will = None
            old.writer.close()
        client = _Client(client_id, writer, will)
        self._clients[client_id] = client
        await client.send(_packet(CONNACK, 0, b"\x00\x00"))
        return client, keepalive

    async def _dispatch(self, c: _Client, ptype: int, flags: int, body: bytes) -> None:
        if ptype == PUBLISH:
            qos, retain = (flags >> 1) & 0x03, bool(flags & 0x01)
            (n,) = struct.unpack_from(">H", body, 0)
            topic = body[2:2 + n].decode()
            i = 2 + n
            pid = None
            if qos:
                (pid,) = struct.unpack_from(">H", body, i)
                i += 2
            if "+" in topic or "#" in topic:
                raise _Closed(f"PUBLISH to a wildcard topic {topic!r}")
            await self._route(topic, bytes(body[i:]), min(qos, 1), retain)
            if qos == 1:
                await c.send(_packet(PUBACK, 0, struct.pack(">H", pid)))
            elif qos == 2:
                await c.send(_packet(PUBREC, 0, struct.pack(">H", pid)))
        elif ptype == PUBREL:
            await c.send(_packet(PUBCOMP, 0, body[:2]))
        elif ptype == SUBSCRIBE:
            (pid,) = struct.unpack_from(">H", body, 0)
            i, granted, new = 2, bytearray(), []
            while i < len(body):
                (n,) = struct.unpack_from(">H", body, i)
                flt = body[i + 2:i + 2 + n].decode()
                qos = min(body[i + 2 + n] & 0x03, 1)
                i += 3 + n
                c.subs[flt] = qos
                granted.append(qos)
                new.append(flt)
            await c.send(_packet(SUBACK, 0, struct.pack(">H", pid) + bytes(granted)))
            for flt in new:
                if flt.startswith("$share/"):
                    continue
                for t, (payload, q) in list(self._retained.items()):
                    if topic_matches(flt, t):
                        await self._deliver(c, t, payload, min(q, c.subs[flt]), True)
        elif ptype == UNSUBSCRIBE:
            (pid,) = struct.unpack_from(">H", body, 0)
            i = 2
            while i < len(body):
                (n,) = struct.unpack_from(">H", body, i)
                c.subs.pop(body[i + 2:i + 2 + n].decode(), None)
                i += 2 + n
            await c.send(_packet(UNSUBACK, 0, struct.pack(">H", pid)))
        elif ptype == PINGREQ:
            await c.send(_packet(PINGRESP, 0, b""))
        elif ptype in (PUBACK, PUBCOMP, PUBREC):
            pass  # no retransmission state: sessions are clean and in-memory
        else:
            raise _Closed(f"unexpected packet type {ptype}")

    # ------------------------------------------------------------------ routing

    async def _route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if retain:
            if payload:
                self._retained[topic] = (payload, qos)
            else:
                self._retained.pop(topic, None)
        self.messages_routed += 1
        groups: dict[tuple[str, str], list[tuple[_Client, int]]] = {}
        for c in list(self._clients.values()):
            best = -1
            for flt, sq in c.subs.items():
                if flt.startswith("$share/"):
                    _, group, real = flt.split("/", 2)
                    if topic_matches(real, topic):
                        groups.setdefault((group, real), []).append((c, sq))
                elif topic_matches(flt, topic):
                    best = max(best, sq)
            if best >= 0:
                await self._deliver(c, topic, payload, min(qos, best), False)
        for key, members in groups.items():
            k = self._share_rr.get(key, 0)
            c, sq = members[k % len(members)]
            self._share_rr[key] = k + 1
            await self._deliver(c, topic, payload, min(qos, sq), False)

    async def _deliver(self, c: _Client, topic: str, payload: bytes, qos: int,
                       retain: bool) -> None:
        body = _enc_str(topic)
        if qos:
            body += struct.pack(">H", next(c.ids))
        with contextlib.suppress(ConnectionError):
            await c.send(_packet(PUBLISH, (qos << 1) | int(retain), body + payload))


async def _main(host: str, port: int) -> None:
    broker = EmbeddedBroker(host, port)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fleet.lab.embedded_broker")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
