"""The local API: applications on the device submit an input over HTTP on loopback.

    POST /v1/infer
        application/json:         {"input": [[...]], "deadline_ms": 100, "input_ref": "cam-1/42"}
        application/octet-stream: raw tensor bytes; headers X-EHI-Dtype, X-EHI-Shape ("8,8"),
                                  optional X-EHI-Deadline-Ms and X-EHI-Input-Ref
      200 {"id", "label", "label_name", "confidence", "source", "degraded", "offloaded",
           "latency_ms"}; for a batch [N, ...] of inputs, {"answers": [...]} in input order
      400 {"error": "..."} for input the bundle does not accept; 413 for an oversized body
    GET /healthz   200 {"status": "ok" | "degraded", "model", "backend", "connected",
                        "broker": {"connected"}, "hub": {"reachable", "last_heard_s", ...}}
    GET /v1/telemetry  the agent's current telemetry
    GET /metrics       Prometheus text: outbox depth, bytes, age, drops; events; connection

The stdlib server keeps the agent free of a web framework; one thread per connection, at most
`max_connections` of them (a connection beyond gets 503 and is closed), each closed after
`idle_timeout_s` without a byte from its client, and a request whose headers and body have not
all arrived REQUEST_DEADLINE_S after its first byte is cut off (a body trickled a byte at a time
cannot hold a connection). Every malformed request gets a 400 that says why; nothing that the
hub could not store (an over-long or non-UTF-8 `input_ref`) is accepted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from edge_agent.agent import Agent
from edge_agent.errors import AgentBusy
from edge_agent.metrics import render as render_metrics
from fleet.contract.errors import ProtocolError
from fleet.contract.protocol import MAX_INPUT_REF, check_string, decode_tensor, parse_header
from fleet.inference.errors import InputError

log = logging.getLogger(__name__)


_BUSY_BODY = b'{"error": "too many connections to the agent; retry later"}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Connection: close\r\nRetry-After: 1\r\nContent-Length: "
         + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


# A request must have arrived whole (headers and body) this long after its first byte.
REQUEST_DEADLINE_S = 10.0
# How often the watchdog looks for requests past their deadline.
WATCHDOG_TICK_S = 0.5
# Elements of one list in a JSON body (a row of an input): more than the wire's header bound,
# as an application's input may be a long flat vector.
MAX_JSON_ITEMS = 1 << 20


class _Watchdog:
    """Cuts off connections whose request has not arrived whole by its deadline: one thread for
    all of them, so a request costs a dict entry, not a timer."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self._armed: dict[int, tuple[float, socket.socket]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.cut = 0
        self._thread = threading.Thread(target=self._run, name="local-api-watchdog",
                                        daemon=True)
        self._thread.start()

    def arm(self, sock: socket.socket) -> None:
        with self._lock:
            self._armed[id(sock)] = (time.monotonic() + self.deadline_s, sock)

    def disarm(self, sock: socket.socket) -> None:
        with self._lock:
            self._armed.pop(id(sock), None)

    def _run(self) -> None:
        while not self._stop.wait(WATCHDOG_TICK_S):
            now = time.monotonic()
            with self._lock:
                late = [k for k, (t, _) in self._armed.items() if t < now]
                socks = [self._armed.pop(k)[1] for k in late]
            for sk in socks:
                self.cut += 1
                with contextlib.suppress(OSError):
                    # The handler's read ends (EOF); it can still answer 408, then closes.
                    sk.shutdown(socket.SHUT_RD)

    def stop(self) -> None:
        self._stop.set()


class _BoundedServer(ThreadingHTTPServer):
    """One thread per connection, at most `max_connections` of them."""

    daemon_threads = True
    # The listen backlog: socketserver's default of 5 let a burst of connections overflow the
    # accept queue (the kernel dropped or reset them; a client waited 1 s for its SYN to be
    # sent again, or saw "connection reset"). Connections beyond `max_connections` get a 503.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: Any, max_connections: int,
                 on_refused: Any) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._on_refused = on_refused

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._on_refused()
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class LocalApi:
    def __init__(self, agent: Agent, host: str, port: int, max_body_bytes: int,
                 max_connections: int = 64, idle_timeout_s: float = 30.0) -> None:
        self.agent = agent
        self.max_body = max_body_bytes
        self.sample_shape = agent.engine.manifest.raw_input.shape
        self.watchdog = _Watchdog(REQUEST_DEADLINE_S)
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in two writes: with Nagle's algorithm the second waits for
            # the client's delayed ACK (40 ms) on every keep-alive request.
            disable_nagle_algorithm = True
            # A socket timeout: a client that sends nothing for this long is disconnected.
            timeout = idle_timeout_s

            def handle_one_request(self) -> None:
                try:
                    # Idle until a request's first byte (at most `timeout`); from then on the
                    # whole request has REQUEST_DEADLINE_S.
                    if not self.rfile.peek(1):  # type: ignore[attr-defined]
                        self.close_connection = True
                        return
                    api.watchdog.arm(self.connection)
                    try:
                        super().handle_one_request()
                    finally:
                        api.watchdog.disarm(self.connection)
                except (TimeoutError, ConnectionError, OSError):
                    self.close_connection = True

            def log_message(self, fmt: str, *args: Any) -> None:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("local api: %s", fmt % args)

            def do_GET(self) -> None:
                api.watchdog.disarm(self.connection)
                if self.path == "/healthz":
                    self._send(200, agent.health())
                elif self.path == "/v1/telemetry":
                    self._send(200, agent.telemetry())
                elif self.path == "/metrics":
                    data = render_metrics(agent).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                else:
                    self._send(404, {"error": f"no route {self.path}"})

            def do_POST(self) -> None:
                try:
                    self._post()
                except Exception:  # a bug costs this request a 500, never the connection
                    log.exception("local API: request failed")
                    self.close_connection = True
                    self._send(500, {"error": "the agent failed on this request; see its log"})

            def _post(self) -> None:
                if self.path != "/v1/infer":
                    self._send(404, {"error": f"no route {self.path}"})
                    return
                try:
                    length = int(self.headers.get("Content-Length", "-1"))
                except ValueError:
                    length = -1
                if length < 0:
                    self._send(411, {"error": "Content-Length is required"})
                    return
                if length > api.max_body:
                    self.close_connection = True
                    self._send(413, {"error": f"body of {length} bytes exceeds the "
                                              f"{api.max_body}-byte limit"})
                    return
                body = self.rfile.read(length)
                api.watchdog.disarm(self.connection)
                if len(body) < length:  # cut off by the watchdog, or the client went away
                    self.close_connection = True
                    self._send(408, {"error": f"the body did not arrive within "
                                              f"{REQUEST_DEADLINE_S:g} s"})
                    return
                try:
                    raw, deadline, ref = api.parse(self.headers.get("Content-Type", ""),
                                                   self.headers, body)
                    if raw.ndim == len(api.sample_shape) + 1:
                        answers = agent.infer_batch(raw, deadline_ms=deadline)
                        self._send(200, {"answers": [a.to_dict() for a in answers]})
                        return
                    answer = agent.submit(raw, input_ref=ref, deadline_ms=deadline)
                except AgentBusy as exc:
                    self._send(503, {"error": str(exc)})
                    return
                except (InputError, ProtocolError) as exc:
                    if not isinstance(exc, InputError):
                        agent.counters.inc("input_errors")
                    self._send(400, {"error": str(exc)})
                    return
                self._send(200, answer.to_dict())

            def _send(self, code: int, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = _BoundedServer((host, port), Handler, max_connections,
                                      lambda: agent.counters.inc("connections_refused"))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @staticmethod
    def parse(ctype: str, headers: Any, body: bytes) -> tuple[np.ndarray, float | None, str | None]:
        """The input, deadline and reference of a request; ProtocolError (a 400) for anything
        malformed."""
        if ctype.startswith("application/octet-stream"):
            spec = headers.get("X-EHI-Shape", "")
            if len(spec) > MAX_SHAPE_HEADER:
                raise ProtocolError(f"X-EHI-Shape of {len(spec)} characters")
            try:
                shape = [int(s) for s in spec.split(",") if s.strip()]
            except ValueError:
                raise ProtocolError("X-EHI-Shape must be comma-separated integers") from None
            raw = decode_tensor({"dtype": headers.get("X-EHI-Dtype", "float32"), "shape": shape},
                                body)
            return raw, _deadline(headers.get("X-EHI-Deadline-Ms")), \
                _input_ref(headers.get("X-EHI-Input-Ref"))
        try:
            obj = parse_header(body, max_items=MAX_JSON_ITEMS)
        except ProtocolError as exc:
            raise ProtocolError(f"body is not JSON the agent takes: {exc}") from None
        if not isinstance(obj, dict) or "input" not in obj:
            raise ProtocolError('JSON body needs an "input" array')
        try:
            raw = np.asarray(obj["input"], dtype=np.float32)
        except (TypeError, ValueError, OverflowError):
            raise ProtocolError('"input" must be a rectangular array of numbers') from None
        return raw, _deadline(obj.get("deadline_ms")), _input_ref(obj.get("input_ref"))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-api",
                                        daemon=True)
        self._thread.start()
        log.info("local API on http://%s:%d", *self._server.server_address[:2])

    def stop(self) -> None:
        self.watchdog.stop()
        self._server.shutdown()
        self._server.server_close()


# The longest X-EHI-Shape header read (eight dimensions need a few dozen characters).
MAX_SHAPE_HEADER = 256


def _input_ref(ref: Any) -> str | None:
    """An application's reference for an input, stored with its result: what the hub's column
    holds (at most MAX_INPUT_REF characters, no NUL, valid UTF-8)."""
    if ref is None:
        return None
    if not isinstance(ref, str) or len(ref) > MAX_INPUT_REF:
        raise ProtocolError(f'"input_ref" must be a string of at most {MAX_INPUT_REF} '
                            "characters")
    return check_string(ref, '"input_ref"')


def _deadline(value: Any) -> float | None:
    """A request's deadline in ms: None, or a finite number (the agent bounds its range)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ProtocolError("deadline_ms must be a number")
    try:
        ms = float(value)
    except ValueError:
        raise ProtocolError(f"deadline_ms must be a number, got {value!r}") from None
    if not math.isfinite(ms):
        raise ProtocolError(f"deadline_ms must be finite, got {value!r}")
    return ms
