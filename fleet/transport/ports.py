"""A free TCP port on the loopback interface (the local API, brokers and hubs of tests and the
lab bind one of their own; nothing here ever takes a shared service's port)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on now (another process may take it before we bind it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
