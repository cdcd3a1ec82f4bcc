"""The kernel's byte counts of a TCP connection, read the way the agent reads its link's."""

from __future__ import annotations

import socket
import sys
import threading

import pytest

from fleet.transport.wire_bytes import tcp_bytes
from tests.conftest import wait_until


@pytest.mark.skipif(sys.platform != "linux", reason="TCP_INFO byte counts are Linux's")
def test_tcp_bytes_counts_what_crossed_both_ways() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    got = bytearray()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while len(got) < 100_000:
                got.extend(conn.recv(65536))
            conn.sendall(b"x" * 1234)

    t = threading.Thread(target=serve)
    t.start()
    with server, socket.create_connection(server.getsockname()) as c:
        base = tcp_bytes(c)
        assert base is not None and base[0] <= 1 and base[1] <= 1  # the kernel counts the SYN
        c.sendall(b"y" * 100_000)
        back = bytearray()
        while len(back) < 1234:
            back.extend(c.recv(65536))
        t.join()
        # The server's FIN counts as a received byte once it arrives.
        assert wait_until(lambda: tcp_bytes(c) in ((base[0] + 100_000, base[1] + 1234),
                                                   (base[0] + 100_000, base[1] + 1235)), 5.0)


def test_no_counts_without_a_socket() -> None:
    assert tcp_bytes(None) is None
    assert tcp_bytes(object()) is None
