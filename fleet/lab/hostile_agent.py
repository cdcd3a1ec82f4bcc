"""Hostile requests for the agent's local API: malformed bodies (deep JSON, huge integers,
non-finite numbers, lone surrogates, NUL, wrong types, huge shapes and dtypes in the raw form,
lies in Content-Length) and slow bodies trickled a byte at a time. Every request must get an
HTTP answer (4xx for what is malformed, 408 for a body that did not arrive in time), and the
agent must go on answering valid inputs. For `bench/security.py`."""

from __future__ import annotations

import collections
import random
import select
import socket
import threading
from typing import Any

# Where a request counts as dropped: no status line within this long.
ANSWER_TIMEOUT_S = 30.0


_JSON = {"Content-Type": "application/json"}
_RAW = {"Content-Type": "application/octet-stream"}
# Malformed requests: (body, headers); None as the body is random bytes.
MALFORMED: tuple[tuple[bytes | None, dict[str, str]], ...] = (
    (b"[" * 5000 + b"]" * 5000, _JSON),
    (b'{"input": [[' + b"9" * 5000 + b"]]}", _JSON),
    (b'{"input": [[1e999]], "deadline_ms": 50}', _JSON),
    (b'{"input": [[0]], "deadline_ms": NaN}', _JSON),
    (b'{"input": [[0]], "input_ref": "a\\ud800"}', _JSON),
    (b'{"input": [[0]], "input_ref": "a\\u0000b"}', _JSON),
    (b'{"input": [[0]], "input_ref": "' + b"r" * 300 + b'"}', _JSON),
    (b'{"input": "not an array"}', _JSON),
    (b'{"input": [[1, 2], [3]]}', _JSON),
    (b'{"input": {"a": 1}}', _JSON),
    (None, _JSON),
    (b"\x00" * 256, {**_RAW, "X-EHI-Shape": ",".join(["99999999999"] * 8)}),
    (b"\x00" * 256, {**_RAW, "X-EHI-Shape": "9" * 5000}),
    (b"\x00" * 256, {**_RAW, "X-EHI-Shape": "8,8", "X-EHI-Dtype": "object"}),
    (b"\x00" * 256, {**_RAW, "X-EHI-Shape": "8,8", "X-EHI-Input-Ref": "x" * 300}),
    (b'{"input": [[0]], "deadline_ms": ' + b"1" * 400 + b"}", _JSON),
)


def _bodies(rng: random.Random) -> tuple[bytes, dict[str, str]]:
    """One malformed request: (body, headers)."""
    body, headers = MALFORMED[rng.randrange(len(MALFORMED))]
    return (rng.randbytes(rng.randrange(1, 200)) if body is None else body), headers


def _request(port: int, body: bytes, headers: dict[str, str], *, length: int | None = None,
             trickle_s: float = 0.0) -> int | None:
    """One POST /v1/infer on its own connection; the status code, or None if none came."""
    head = ["POST /v1/infer HTTP/1.1", "Host: 127.0.0.1",
            f"Content-Length: {len(body) if length is None else length}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    data = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT_S) as s:
            if trickle_s > 0:
                s.sendall(data[:len(data) - len(body)])
                for i in range(len(body)):
                    # Stop sending once the agent answers (it cut the request off).
                    if select.select([s], [], [], trickle_s)[0]:
                        break
                    s.sendall(body[i:i + 1])
            else:
                s.sendall(data)
            reply = b""
            while b"\r\n" not in reply:
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return None
    parts = reply.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def attack(port: int, n: int, slow: int, rng: random.Random,
           valid: tuple[bytes, dict[str, str]]) -> dict[str, Any]:
    """`n` malformed requests and `slow` bodies trickled at a byte a second (in parallel),
    with a valid request between them; what came back."""
    statuses: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def note(what: str, code: int | None) -> None:
        with lock:
            statuses[f"{what} {code if code is not None else 'dropped'}"] += 1

    def trickle() -> None:
        # A body that claims 200 bytes and sends one a second: cut off well before it ends.
        note("slow", _request(port, b'{"input": [[0]]}' + b" " * 184, {
            "Content-Type": "application/json"}, trickle_s=1.0))

    def lying() -> None:
        # A Content-Length that says more than is sent: the body never arrives whole.
        body, headers = _bodies(random.Random(rng.random()))
        note("short", _request(port, body, headers, length=len(body) + 10))

    slow_threads = [threading.Thread(target=trickle, daemon=True) for _ in range(slow)]
    slow_threads += [threading.Thread(target=lying, daemon=True) for _ in range(slow)]
    for t in slow_threads:
        t.start()
    valid_ok = 0
    for i in range(n):
        body, headers = _bodies(rng)
        note("malformed", _request(port, body, headers))
        if i % 100 == 0:
            valid_ok += _request(port, *valid) == 200
    for t in slow_threads:
        t.join(120)
    valid_ok += _request(port, *valid) == 200
    bad = sum(v for k, v in statuses.items()
              if k.endswith("dropped") or (k.split()[1].isdigit() and int(k.split()[1]) >= 500))
    return {"requests": n + 2 * slow, "statuses": dict(sorted(statuses.items())),
            "five_xx_or_dropped": bad, "valid_answered": valid_ok,
            "valid_sent": n // 100 + (1 if n % 100 > 0 else 0) + 1}
