"""Frames: the envelope of every message. Version 1:

    offset  size  field
    0       2     magic b"EH"
    2       1     protocol version: 1
    3       1     message kind (Kind)
    4       4     header length H, unsigned big-endian
    8       H     header: UTF-8 JSON object
    8+H     rest  body: raw bytes (a tensor's data, little-endian, C order), may be empty

Version 2 (what this build writes on the data path: offloads, answers, results, acks,
telemetry, hard examples) compresses what follows a 5-byte prefix:

    0       2     magic b"EH"
    2       1     protocol version: 2
    3       1     message kind (Kind)
    4       1     codec: 0 none, 1 zlib (RFC 1950), 2 zlib with the preset dictionary ZDICT;
                  the writer picks 2 when it is smaller than none
    5       rest  the codec's encoding of: header length H (4 bytes), header, body, as in v1

A frame with another magic, an unknown version or kind, a bad length, or a header outside the
bounds of `bounds.parse_header` raises ProtocolError (UnsupportedVersion for the version).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from fleet.contract.errors import ProtocolError, UnsupportedVersion
from fleet.contract.protocol.bounds import parse_header
from fleet.contract.protocol.zdict import ZDICT

PROTOCOL_VERSION = 2  # the newest this build writes
SUPPORTED_VERSIONS = (1, 2)
MAGIC = b"EH"
_PREFIX = struct.Struct(">2sBBI")
_PREFIX_V2 = struct.Struct(">2sBBB")
_HLEN = struct.Struct(">I")
CODEC_NONE, CODEC_ZLIB, CODEC_ZLIB_DICT = 0, 1, 2
# Offloads and hard examples whose tensor is larger than this are not compressed.
COMPRESS_TENSOR_MAX = 4096
# A frame larger than this is refused before parsing: it bounds what one message can cost.
MAX_FRAME_BYTES = 4 << 20
MAX_HEADER_BYTES = 1 << 20
# JSON string quoting in C, for the hand-written encoders of the hot paths.
json_str = json.encoder.encode_basestring_ascii


class Kind(IntEnum):
    OFFLOAD = 1
    ANSWER = 2
    RESULTS = 3
    ACK = 4
    TELEMETRY = 5
    STATUS = 6
    HARD_EXAMPLES = 7
    DESIRED = 8
    REPORTED = 9


# The longest header each kind of message may have, checked before the header is parsed (for
# a compressed frame, before the rest is inflated): an offload's or an answer's header holds a
# few short fields, so a long one is refused for the cost of reading four bytes.
HEADER_LIMIT: dict[Kind, int] = {
    Kind.OFFLOAD: 8 << 10, Kind.ANSWER: 8 << 10, Kind.STATUS: 4 << 10,
    Kind.TELEMETRY: 64 << 10, Kind.DESIRED: 256 << 10, Kind.REPORTED: 256 << 10,
    Kind.RESULTS: MAX_HEADER_BYTES, Kind.ACK: MAX_HEADER_BYTES,
    Kind.HARD_EXAMPLES: MAX_HEADER_BYTES,
}
# The longest body a compressed frame of each kind may carry: writers compress a tensor only
# up to COMPRESS_TENSOR_MAX (a larger one travels with codec 0), and only results batches have
# a large compressed body (columns). A kind not named has no body.
COMPRESSED_BODY_LIMIT: dict[Kind, int] = {
    Kind.OFFLOAD: COMPRESS_TENSOR_MAX, Kind.HARD_EXAMPLES: COMPRESS_TENSOR_MAX,
    Kind.RESULTS: MAX_FRAME_BYTES,
}



@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    header: dict[str, Any]
    body: bytes = b""
    version: int = 1


_RAW_TENSOR_KINDS = frozenset({Kind.OFFLOAD, Kind.HARD_EXAMPLES})


def encode_frame(kind: Kind, header: dict[str, Any], body: bytes = b"",
                 version: int = 1) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    if version == 1:
        return _PREFIX.pack(MAGIC, 1, int(kind), len(h)) + h + body
    if version != 2:
        raise UnsupportedVersion(f"cannot write protocol version {version}")
    inner = b"".join((_HLEN.pack(len(h)), h, body))
    if kind in _RAW_TENSOR_KINDS and len(body) > COMPRESS_TENSOR_MAX:
        # An image or a feature map: zlib gains little on it and costs milliseconds.
        return _PREFIX_V2.pack(MAGIC, 2, int(kind), CODEC_NONE) + inner
    c = zlib.compressobj(6, zdict=ZDICT)
    packed = c.compress(inner) + c.flush()
    if len(packed) < len(inner):
        return _PREFIX_V2.pack(MAGIC, 2, int(kind), CODEC_ZLIB_DICT) + packed
    return _PREFIX_V2.pack(MAGIC, 2, int(kind), CODEC_NONE) + inner


def frame_version(payload: bytes) -> int:
    """The protocol version a frame says it is in (1 for anything too short to say)."""
    return payload[2] if len(payload) >= 3 and payload[:2] == MAGIC else 1


def _inflate(data: bytes, zdict: bytes | None, header_limit: int, body_limit: int) -> bytes:
    """zlib data, decompressed only as far as the frame may go: a header longer than its
    kind's limit is refused once its length is out, and past the header at most `body_limit`
    bytes of body (a bomb is refused after that much, not unpacked)."""
    d = zlib.decompressobj(zdict=zdict) if zdict is not None else zlib.decompressobj()
    limit = MAX_FRAME_BYTES
    try:
        out = d.decompress(data, _HLEN.size)
        if len(out) == _HLEN.size:
            hlen = _HLEN.unpack(out)[0]
            _check_hlen(hlen, header_limit)
            limit = min(MAX_FRAME_BYTES, _HLEN.size + hlen + body_limit)
            out += d.decompress(d.unconsumed_tail, limit + 1 - len(out))
    except zlib.error as exc:
        raise ProtocolError(f"compressed frame does not decompress: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise ProtocolError(f"frame decompresses to more than {limit} bytes", "too_large")
    if not d.eof:
        raise ProtocolError("compressed frame is truncated")
    return out


def _check_hlen(hlen: int, limit: int) -> None:
    if hlen > limit:
        raise ProtocolError(f"header of {hlen} bytes (at most {limit} in this kind of message)",
                            "too_large")


def decode_frame(payload: bytes, expect: Kind | None = None) -> Frame:
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME_BYTES} limit",
                            "too_large")
    if len(payload) < _PREFIX_V2.size:
        raise ProtocolError(f"frame of {len(payload)} bytes is shorter than its prefix")
    magic, version, kind, codec = _PREFIX_V2.unpack_from(payload)
    if magic != MAGIC:
        raise ProtocolError(f"frame does not start with {MAGIC!r} (got {magic!r})")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(f"protocol version {version} is not supported "
                                 f"(this build speaks {', '.join(map(str, SUPPORTED_VERSIONS))})")
    try:
        k = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind}") from None
    if expect is not None and k is not expect:
        raise ProtocolError(f"expected a {expect.name} message, got {k.name}")
    header_limit = HEADER_LIMIT.get(k, MAX_HEADER_BYTES)
    body_limit = COMPRESSED_BODY_LIMIT.get(k, 0)
    if version == 1:
        rest = payload[4:]
    elif codec == CODEC_ZLIB_DICT:
        rest = _inflate(payload[_PREFIX_V2.size:], ZDICT, header_limit, body_limit)
    elif codec == CODEC_ZLIB:
        rest = _inflate(payload[_PREFIX_V2.size:], None, header_limit, body_limit)
    elif codec == CODEC_NONE:
        rest = payload[_PREFIX_V2.size:]
    else:
        raise ProtocolError(f"unknown codec {codec}")
    if len(rest) < _HLEN.size:
        raise ProtocolError(f"frame of {len(payload)} bytes is shorter than its prefix")
    (hlen,) = _HLEN.unpack_from(rest)
    _check_hlen(hlen, header_limit)
    if hlen > MAX_HEADER_BYTES or _HLEN.size + hlen > len(rest):
        raise ProtocolError(f"header length {hlen} does not fit a {len(payload)}-byte frame")
    try:
        header = parse_header(rest[_HLEN.size:_HLEN.size + hlen])
    except UnsupportedVersion:
        raise
    except ProtocolError as exc:
        raise ProtocolError(f"header: {exc}", exc.reason) from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    return Frame(k, header, bytes(rest[_HLEN.size + hlen:]), version)
