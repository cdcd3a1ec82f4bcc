"""Bytes a TCP connection carried, as the kernel counts them (Linux `TCP_INFO`).

`tcpi_bytes_acked` (bytes sent and acknowledged by the peer) and `tcpi_bytes_received` count
the connection's payload: for MQTT, every packet with its framing, pings and acks; for TLS, the
records as they crossed. They cost nothing to keep (the kernel keeps them) and are read on
demand (the connection's SYN and FIN count one byte each). Other systems, or kernels older than 4.2,
report None.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

# struct tcp_info (include/uapi/linux/tcp.h): 8 one-byte fields, then u32 fields up to
# tcpi_total_retrans, then u64 tcpi_pacing_rate, tcpi_max_pacing_rate, tcpi_bytes_acked,
# tcpi_bytes_received.
_BYTES_ACKED_AT = 120
_INFO = struct.Struct("=QQ")
_INFO_LEN = 256


def tcp_bytes(sock: Any) -> tuple[int, int] | None:
    """(bytes sent, bytes received) on `sock` so far, or None where the kernel does not say."""
    opt = getattr(socket, "TCP_INFO", None)
    if opt is None or sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, opt, _INFO_LEN)
    except (OSError, AttributeError, ValueError):
        return None
    if len(raw) < _BYTES_ACKED_AT + _INFO.size:
        return None
    sent, received = _INFO.unpack_from(raw, _BYTES_ACKED_AT)
    return int(sent), int(received)
