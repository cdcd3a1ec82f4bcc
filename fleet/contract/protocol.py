"""The wire contract between agents and hub: topics, the frame codec and the messages.

Nothing else spells a topic string or a frame layout. Every payload is one frame. Version 1:

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

and carries a results batch as columns (`ResultBatch`): the fields a batch shares written once,
numbers as little-endian arrays whose bytes are grouped by significance (they compress), so
that a record costs tens of bytes instead of a JSON object of 400. A hub reads both versions
and answers each device in the version it last spoke (an upgrade goes hub first, then agents,
`wire_version` in the agent's settings); retained state (desired, reported, status) stays in
version 1, which every agent reads.

Tensors travel as raw bytes with dtype and shape in the header, never as JSON lists of floats.
A frame with another magic, an unknown version or kind, a bad length, or a tensor whose bytes do
not match its dtype and shape raises ProtocolError (UnsupportedVersion for the version).
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.contract.errors import ProtocolError, UnsupportedVersion

PROTOCOL_VERSION = 2  # the newest this build writes
SUPPORTED_VERSIONS = (1, 2)
MAGIC = b"EH"
_PREFIX = struct.Struct(">2sBBI")
_PREFIX_V2 = struct.Struct(">2sBBB")
_HLEN = struct.Struct(">I")
CODEC_NONE, CODEC_ZLIB, CODEC_ZLIB_DICT = 0, 1, 2
# Offloads and hard examples whose tensor is larger than this are not compressed.
COMPRESS_TENSOR_MAX = 4096
# The preset dictionary of codec 2 (zlib with a dictionary, RFC 1950 FDICT): the keys and
# common values of this protocol's headers, so that a small message (an offload, an answer,
# a heartbeat) pays only for what varies. Part of the contract: it never changes; a different
# dictionary would be another codec. zlib matches nearer strings more cheaply: the most
# frequent messages come last.
ZDICT = (
    b'{"device":"","replayed":0,"ts":17,"uptime_s":,"model":"","backend":"onnxruntime",'
    b'"openvino","policy":"max_prob","margin","entropy","threshold":,"fidelity":{"bundle":"",'
    b'"samples":,"agreement":1.0,"min_agreement":0.995,"faithful":true,"accuracy":0.9,'
    b'"reference_accuracy":0.9,"manifest_threshold":,"offload_at_manifest":0.2,'
    b'"reference_offload":0.2,"budget":0.2,"calibrated_threshold":,"cpu":"Intel(R) Xeon(R) '
    b'Processor","AMD EPYC","cpu_flags":["sse4_1","avx","avx2","fma","f16c","avx512f",'
    b'"avx512bw","avx512vl","avx512_vnni","avx_vnni","avx512_bf16","amx_int8","amx_bf16"],'
    b'"refused":{},"threshold_source":"calibrated","manifest"},"offload":{"mode":"threshold",'
    b'"budget","target":,"recent_rate":,"drift":,"drifting":false,"source":"calibrated"},'
    b'"labels":{},"queues":{"offloads_pending":0,"outbox":0},"outbox":{"entries":0,"bytes":0,'
    b'"results":0,"hard_examples":0,"oldest_age_s":0.0,"results_produced":0,'
    b'"results_acked":0,"hard_produced":0,"hard_acked":0,"rejected":0,"dropped_full":0,'
    b'"dropped_expired":0,"resent":0},"counters":{"inputs":0,"offloaded":0,"cloud_answers":0,'
    b'"fallbacks":0,"input_errors":0,"offload_busy":0,"bad_messages":0,"hub_errors":0,'
    b'"late_queued":0,"outbox_full":0,"connections_refused":0,"late_answers":0},"update":'
    b'{"state":"idle","target":null,"code":null},"system":{"cpu_percent":0.0,'
    b'"process_cpu_percent":0.0,"rss_mb":0.0,"memory_percent":0.0,"memory_available_mb":0.0,'
    b'"load_avg":[0.0,0.0,0.0]},"mqtt_bytes":{"sent":0,"received":0}}'
    b'{"ids":[],"strings":{"device":[""],"model":["-edge@1"],"backend":["onnxruntime"],'
    b'"policy":["max_prob"],"cloud_model":["-cloud@1",null],"source":["edge","cloud",'
    b'"edge_fallback"]},"input_ref":[null,"mixed:","clean:","shifted:"],"columns":[["device",'
    b'"<u2"],["model","<u2"],["backend","<u2"],["policy","<u2"],["cloud_model","<u2"],'
    b'["source","<u2"],["seq","<i8"],["ts","<f8"],["score","<f4"],["edge_label","<i4"],'
    b'["edge_confidence","<f4"],["offloaded","u1"],["has_cloud_label","u1"],["cloud_label",'
    b'"<i4"],["final_label","<i4"],["degraded","u1"],["latency_ms","<f4"],["edge_ms","<f4"],'
    b'["offload_bytes","<u4"]]}'
    b'{"id":"","device":"","seq":1,"ts":1764000000.0,"input_ref":null,"model":"digits-edge@1",'
    b'"backend":"onnxruntime","policy":"max_prob","score":0.0,"edge_label":1,'
    b'"edge_confidence":0.9,"offloaded":false,"cloud_label":null,"cloud_model":null,'
    b'"final_label":1,"source":"edge","degraded":false,"latency_ms":0.1,"edge_ms":0.05,'
    b'"offload_bytes":0}{"id":"","device":"","seq":2,"ts":1764000000.0,"input_ref":null,'
    b'"model":"digits-edge@1","backend":"onnxruntime","policy":"max_prob","score":0.5,'
    b'"edge_label":3,"edge_confidence":0.5,"offloaded":true,"cloud_label":3,'
    b'"cloud_model":"digits-cloud@1","final_label":3,"source":"cloud","degraded":false,'
    b'"latency_ms":2.0,"edge_ms":0.05,"offload_bytes":263}'
    b'{"ids":["'
    b'","rejected":{},"of":"results"}'
    b'{"id":"","label":,"confidence":0.99,"model":"digits-cloud@1","hub_ms":0.1}'
    b'{"id":"","model":"digits-edge@1","deadline_ms":250.0,"sent_at":1764000000.0,'
    b'"edge_label":,"edge_score":0.0,"tensor":{"dtype":"float32","shape":[1,8,8]}}'
)
TOPIC_ROOT = "ehi/v1"
HUB_SHARE_GROUP = "hub"
# A hub replica's own topics (`ehi/hub/{replica}/heartbeat`): outside the devices' tree, so no
# device filter matches them.
HUB_TOPIC_ROOT = "ehi/hub"
# A frame larger than this is refused before parsing: it bounds what one message can cost.
MAX_FRAME_BYTES = 4 << 20
MAX_HEADER_BYTES = 1 << 20
MAX_TENSOR_DIMS = 8
WIRE_DTYPES = frozenset({"float32", "float16", "float64", "uint8", "int8", "int16", "int32",
                         "int64"})
# JSON string quoting in C, for the hand-written encoders of the hot paths.
_json_str = json.encoder.encode_basestring_ascii
# A name in the fleet: a device id, a hub replica, a bundle. It is a topic level, a folder and a
# URL segment, so: 1-64 of these characters, starting with a letter or digit (never "." or
# "..", which a path or a store might resolve). The API and the settings use the same pattern.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_DEVICE_ID = re.compile(NAME_PATTERN)


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


class Channel(StrEnum):
    """The last level of a device's topics, `ehi/v1/{device}/{channel}`."""

    OFFLOAD = "offload"      # agent -> hub, QoS 0: a hard example, answered within its deadline
    ANSWER = "answer"        # hub -> agent, QoS 0: the cloud answer for an offload id
    RESULTS = "results"      # agent -> hub, QoS 1: a batch of result records
    ACK = "ack"              # hub -> agent, QoS 1: record ids committed by the hub
    TELEMETRY = "telemetry"  # agent -> hub, QoS 0: heartbeat
    STATUS = "status"        # agent -> hub, QoS 1, retained, last will: online/offline
    HARD = "hard"            # agent -> hub, QoS 1: hard examples for a late cloud answer
    DESIRED = "desired"      # hub -> agent, QoS 1, retained: the signed model assignment
    REPORTED = "reported"    # agent -> hub, QoS 1, retained: model, update state, last error


# An offload and its answer live for one deadline (200 ms by default): MQTT sends a QoS 1
# message again only after a reconnect, by when the agent has answered from the edge model,
# so QoS 1 would buy them little but two PUBACKs per offload on the critical path (the
# request/response floor through Mosquitto is 0.27 ms at QoS 0 against 0.53 at QoS 1). An
# offload lost on the way (also one in flight at a reconnect under a long deadline) is a
# fallback to the edge answer, counted; the hard example then goes to the hub durably on
# `hard` when `late_answers` is on.
QOS: dict[Channel, int] = {
    Channel.OFFLOAD: 0, Channel.ANSWER: 0, Channel.RESULTS: 1, Channel.ACK: 1,
    Channel.TELEMETRY: 0, Channel.STATUS: 1, Channel.HARD: 1, Channel.DESIRED: 1,
    Channel.REPORTED: 1,
}


# Smaller limits than MAX_FRAME_BYTES for the channels that carry no tensors: what one device can
# make the hub store per message (telemetry and reports are kept per device).
CHANNEL_MAX_BYTES: dict[Channel, int] = {
    Channel.TELEMETRY: 64 << 10, Channel.STATUS: 4 << 10, Channel.REPORTED: 256 << 10,
    Channel.ACK: 1 << 20,
}

# Who publishes on each channel: a device on its own topics, the hub on the others. The broker's
# access rules (fleet/identity/broker_config.py) are generated from these two sets.
FROM_DEVICE = frozenset({Channel.OFFLOAD, Channel.RESULTS, Channel.TELEMETRY, Channel.STATUS,
                         Channel.HARD, Channel.REPORTED})
TO_DEVICE = frozenset({Channel.ANSWER, Channel.ACK, Channel.DESIRED})


def check_device_id(device: str) -> str:
    if not _DEVICE_ID.match(device):
        raise ProtocolError(f"device id {device!r} must be 1-64 characters of A-Z a-z 0-9 _ . -, "
                            "starting with a letter or digit")
    return device


def topic(device: str, channel: Channel) -> str:
    return f"{TOPIC_ROOT}/{check_device_id(device)}/{channel.value}"


def hub_heartbeat_topic(replica: str) -> str:
    """Where a hub replica publishes to itself through the broker, to know it still hears it."""
    return f"{HUB_TOPIC_ROOT}/{check_device_id(replica)}/heartbeat"


def hub_filter(channel: Channel, shared: bool = True, group: str = HUB_SHARE_GROUP) -> str:
    """The hub's subscription for a channel of every device, shared among hub replicas in
    `group` (on a confined broker a secret: docs/security.md)."""
    base = f"{TOPIC_ROOT}/+/{channel.value}"
    return f"$share/{group}/{base}" if shared else base


def parse_topic(t: str) -> tuple[str, Channel]:
    parts = t.split("/")
    if len(parts) != 4 or "/".join(parts[:2]) != TOPIC_ROOT:
        raise ProtocolError(f"topic {t!r} is not under {TOPIC_ROOT}/{{device}}/{{channel}}")
    try:
        channel = Channel(parts[3])
    except ValueError:
        raise ProtocolError(f"topic {t!r} names an unknown channel {parts[3]!r}") from None
    return check_device_id(parts[2]), channel


# ---------------------------------------------------------------------------- frames


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


def _inflate(data: bytes, zdict: bytes | None = None) -> bytes:
    """zlib data, at most MAX_FRAME_BYTES of it decompressed: a bomb is refused, not unpacked."""
    d = zlib.decompressobj(zdict=zdict) if zdict is not None else zlib.decompressobj()
    try:
        out = d.decompress(data, MAX_FRAME_BYTES + 1)
    except zlib.error as exc:
        raise ProtocolError(f"compressed frame does not decompress: {exc}") from None
    if len(out) > MAX_FRAME_BYTES or d.unconsumed_tail:
        raise ProtocolError(f"frame decompresses to more than {MAX_FRAME_BYTES} bytes")
    if not d.eof:
        raise ProtocolError("compressed frame is truncated")
    return out


def decode_frame(payload: bytes, expect: Kind | None = None) -> Frame:
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME_BYTES} limit")
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
    if version == 1:
        rest = payload[4:]
    elif codec == CODEC_ZLIB_DICT:
        rest = _inflate(payload[_PREFIX_V2.size:], ZDICT)
    elif codec == CODEC_ZLIB:
        rest = _inflate(payload[_PREFIX_V2.size:])
    elif codec == CODEC_NONE:
        rest = payload[_PREFIX_V2.size:]
    else:
        raise ProtocolError(f"unknown codec {codec}")
    if len(rest) < _HLEN.size:
        raise ProtocolError(f"frame of {len(payload)} bytes is shorter than its prefix")
    (hlen,) = _HLEN.unpack_from(rest)
    if hlen > MAX_HEADER_BYTES or _HLEN.size + hlen > len(rest):
        raise ProtocolError(f"header length {hlen} does not fit a {len(payload)}-byte frame")
    try:
        header = json.loads(rest[_HLEN.size:_HLEN.size + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    return Frame(k, header, bytes(rest[_HLEN.size + hlen:]), version)


def narrow(x: np.ndarray) -> np.ndarray:
    """A float tensor whose values are all integers in 0..255 (pixels, counts) as uint8: the
    same values in a quarter of the bytes. Anything else as it is."""
    if x.dtype.kind != "f" or x.size == 0 or x.size > 1 << 20:
        return x
    u = x.astype(np.uint8)
    return u if np.array_equal(u, x) else x


def tensor_header(x: np.ndarray) -> dict[str, Any]:
    return {"dtype": x.dtype.name, "shape": list(x.shape)}


def tensor_bytes(x: np.ndarray) -> bytes:
    if x.dtype.byteorder in "=|<" and sys.byteorder == "little" and x.flags.c_contiguous:
        return x.tobytes()  # already little-endian and in C order: the common case, no copy
    return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()


def decode_tensor(spec: Any, body: bytes) -> np.ndarray:
    if not isinstance(spec, dict):
        raise ProtocolError("tensor spec must be an object with dtype and shape")
    dtype, shape = spec.get("dtype"), spec.get("shape")
    if dtype not in WIRE_DTYPES:
        raise ProtocolError(f"tensor dtype {dtype!r} is not one of {sorted(WIRE_DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ProtocolError(f"tensor shape {shape!r} must be a list of at most {MAX_TENSOR_DIMS} "
                            "non-negative integers")
    dt = np.dtype(dtype).newbyteorder("<")
    need = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if need != len(body):
        raise ProtocolError(f"tensor {dtype}{shape} needs {need} bytes, body has {len(body)}")
    return np.frombuffer(body, dtype=dt).reshape(shape).astype(dt.newbyteorder("="), copy=False)


# ---------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Offload:
    """A hard example: the raw input (before preprocessing) and what the edge thought of it."""

    id: str
    model: str
    input: np.ndarray
    deadline_ms: float
    sent_at: float
    edge_label: int
    edge_score: float

    def encode(self, version: int = PROTOCOL_VERSION) -> bytes:
        x = narrow(self.input) if version >= 2 else self.input
        header = {"id": self.id, "model": self.model, "deadline_ms": self.deadline_ms,
                  "sent_at": self.sent_at, "edge_label": self.edge_label,
                  "edge_score": self.edge_score, "tensor": tensor_header(x)}
        return encode_frame(Kind.OFFLOAD, header, tensor_bytes(x), version)

    @classmethod
    def decode(cls, payload: bytes) -> Offload:
        f = decode_frame(payload, Kind.OFFLOAD)
        h = f.header
        try:
            return cls(id=_str(h, "id"), model=_str(h, "model"),
                       input=decode_tensor(h.get("tensor"), f.body),
                       deadline_ms=float(h["deadline_ms"]), sent_at=float(h["sent_at"]),
                       edge_label=int(h["edge_label"]), edge_score=float(h["edge_score"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"offload header is incomplete or mistyped: {exc!r}") from None


@dataclass(frozen=True, slots=True)
class Answer:
    """The hub's answer to one offload; `error` set (and label -1) when the hub could not answer."""

    id: str
    label: int
    confidence: float
    model: str
    hub_ms: float = 0.0
    error: str | None = None

    def encode(self, version: int = PROTOCOL_VERSION) -> bytes:
        header = {"id": self.id, "label": self.label, "confidence": self.confidence,
                  "model": self.model, "hub_ms": self.hub_ms}
        if self.error:
            header["error"] = self.error
        return encode_frame(Kind.ANSWER, header, b"", version)

    @classmethod
    def decode(cls, payload: bytes) -> Answer:
        h = decode_frame(payload, Kind.ANSWER).header
        try:
            return cls(id=_str(h, "id"), label=int(h["label"]), confidence=float(h["confidence"]),
                       model=str(h["model"]), hub_ms=float(h.get("hub_ms", 0.0)),
                       error=h.get("error"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"answer header is incomplete or mistyped: {exc!r}") from None


Source = Literal["edge", "cloud", "edge_fallback"]
I32_MIN, I32_MAX, I64_MAX = -(2**31), 2**31 - 1, 2**63 - 1
MAX_TS = 1e11          # seconds since 1970: beyond the year 5000
MAX_MS = 86_400_000.0  # a day, in milliseconds


class ResultRecord(BaseModel):
    """One decision of an agent: what it answered, from where, and how long it took.

    `source` is "edge" (easy input), "cloud" (offloaded and answered in time) or
    "edge_fallback" (offloaded, no cloud answer by the deadline: the edge answer is final and
    the record is `degraded`).
    """

    # Every number bounded to what the hub's columns hold (a record the database would refuse
    # is refused here, by its id, and never blocks the records stored beside it); no NaN or
    # infinity anywhere.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    id: str = Field(min_length=1, max_length=64)
    device: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0, le=I64_MAX)
    ts: float = Field(ge=0, le=MAX_TS)
    input_ref: str | None = Field(default=None, max_length=128)
    model: str = Field(max_length=128)
    backend: str = Field(max_length=32)
    policy: str = Field(max_length=32)
    score: float
    edge_label: int = Field(ge=I32_MIN, le=I32_MAX)
    edge_confidence: float
    offloaded: bool
    cloud_label: int | None = Field(default=None, ge=I32_MIN, le=I32_MAX)
    cloud_model: str | None = Field(default=None, max_length=128)
    final_label: int = Field(ge=I32_MIN, le=I32_MAX)
    source: Source
    degraded: bool = False
    latency_ms: float = Field(ge=0, le=MAX_MS)
    edge_ms: float = Field(ge=0, le=MAX_MS)
    offload_bytes: int = Field(default=0, ge=0, le=I32_MAX)


# A batch frame (results, hard examples) carries items as separate blobs: the header lists each
# item's id and size, the body holds the blobs back to back. An item that does not decode is
# refused by its id while the others are kept: one bad item never blocks the queue behind it.
_MAX_ID = 64


def encode_items(kind: Kind, ids: list[str], blobs: list[bytes], version: int = 1) -> bytes:
    return encode_frame(kind, {"ids": ids, "sizes": [len(b) for b in blobs]}, b"".join(blobs),
                        version)


def decode_items(payload: bytes, kind: Kind) -> list[tuple[str, bytes]]:
    f = decode_frame(payload, kind)
    ids, sizes = f.header.get("ids"), f.header.get("sizes")
    if (not isinstance(ids, list) or not isinstance(sizes, list) or len(ids) != len(sizes)
            or not all(isinstance(i, str) and 0 < len(i) <= _MAX_ID for i in ids)
            or not all(isinstance(z, int) and not isinstance(z, bool) and z >= 0
                       for z in sizes)):
        raise ProtocolError("a batch header needs 'ids' (strings of 1-64 characters) and "
                            "'sizes' (non-negative integers) of the same length")
    if sum(sizes) != len(f.body):
        raise ProtocolError(f"batch item sizes add up to {sum(sizes)} bytes, body has "
                            f"{len(f.body)}")
    out = []
    pos = 0
    for i, z in zip(ids, sizes, strict=True):
        out.append((i, f.body[pos:pos + z]))
        pos += z
    return out


def record_blob(r: ResultRecord) -> bytes:
    """A result record as it travels and as the agent's outbox keeps it: compact JSON."""
    return r.__pydantic_serializer__.to_json(r)


def _jnum(x: float) -> str:
    x = float(x)
    return repr(x) if math.isfinite(x) else "null"  # the hub then refuses it, by id


def _jopt(v: str | None) -> str:
    return "null" if v is None else _json_str(v)


def encode_record(*, id: str, device: str, seq: int, ts: float, input_ref: str | None,
                  model: str, backend: str, policy: str, score: float, edge_label: int,
                  edge_confidence: float, offloaded: bool, cloud_label: int | None,
                  cloud_model: str | None, final_label: int, source: Source, degraded: bool,
                  latency_ms: float, edge_ms: float, offload_bytes: int) -> bytes:
    """The same JSON as `record_blob(ResultRecord(...))`, written without building the model:
    this runs on the agent's answering thread for every input (a third of the pydantic cost).
    A test checks both give the same record."""
    ts, score, conf = float(ts), float(score), float(edge_confidence)
    latency_ms, edge_ms = float(latency_ms), float(edge_ms)
    # One test for the five numbers: the sum is finite unless one is NaN or infinite (or they
    # overflow together, which the careful path below also handles).
    if math.isfinite(ts + score + conf + latency_ms + edge_ms):
        nums = (repr(ts), repr(score), repr(conf), repr(latency_ms), repr(edge_ms))
    else:
        nums = (_jnum(ts), _jnum(score), _jnum(conf), _jnum(latency_ms), _jnum(edge_ms))
    return (
        f'{{"id":{_json_str(id)},"device":{_json_str(device)},"seq":{int(seq)},'
        f'"ts":{nums[0]},"input_ref":{_jopt(input_ref)},"model":{_json_str(model)},'
        f'"backend":{_json_str(backend)},"policy":{_json_str(policy)},"score":{nums[1]},'
        f'"edge_label":{int(edge_label)},"edge_confidence":{nums[2]},'
        f'"offloaded":{"true" if offloaded else "false"},'
        f'"cloud_label":{"null" if cloud_label is None else int(cloud_label)},'
        f'"cloud_model":{_jopt(cloud_model)},"final_label":{int(final_label)},'
        f'"source":"{source}","degraded":{"true" if degraded else "false"},'
        f'"latency_ms":{nums[3]},"edge_ms":{nums[4]},'
        f'"offload_bytes":{int(offload_bytes)}}}').encode()


@dataclass(frozen=True, slots=True)
class ResultBatch:
    """Result records as they travel: JSON objects side by side (version 1), or columns
    (version 2: `_encode_columns`)."""

    ids: list[str]
    blobs: list[bytes]

    @classmethod
    def of(cls, records: list[ResultRecord]) -> ResultBatch:
        return cls([r.id for r in records], [record_blob(r) for r in records])

    def encode(self, version: int = PROTOCOL_VERSION) -> bytes:
        if version >= 2 and len(self.ids) >= COLUMNS_MIN_RECORDS:
            try:
                return _encode_columns(self.ids, [json.loads(b) for b in self.blobs])
            except (ValueError, TypeError, KeyError, OverflowError, AttributeError):
                pass  # a record that does not fit its columns: the hub refuses it by its id
        return encode_items(Kind.RESULTS, self.ids, self.blobs, version)

    @staticmethod
    def decode_lenient(payload: bytes) -> tuple[list[ResultRecord], dict[str, str]]:
        """Decode a batch, keeping the valid records and naming each invalid one with a reason."""
        if frame_version(payload) >= 2:
            f = decode_frame(payload, Kind.RESULTS)
            if "columns" in f.header:
                return _decode_columns(f)
        return _decode_each(payload, Kind.RESULTS, ResultRecord.model_validate_json, "record")


# A version 2 batch of fewer records travels as version 1's JSON items in a compressed frame
# (the preset dictionary holds a record's keys): as small as columns at that size, and a tenth
# of their cost to decode (columns have a fixed cost per column).
COLUMNS_MIN_RECORDS = 8

# Version 2 results: strings a batch shares as a table of distinct values and a uint16 index
# per record (NO_STRING for none), numbers as arrays of these types, in this order.
_STRING_FIELDS: dict[str, int] = {"device": 64, "model": 128, "backend": 32, "policy": 32,
                                  "cloud_model": 128, "source": 16}
_OPTIONAL_STRINGS = frozenset({"cloud_model"})
NO_STRING = 0xFFFF
_NUM_FIELDS: tuple[tuple[str, str], ...] = (
    ("seq", "<i8"), ("ts", "<f8"), ("score", "<f4"), ("edge_label", "<i4"),
    ("edge_confidence", "<f4"), ("offloaded", "u1"), ("has_cloud_label", "u1"),
    ("cloud_label", "<i4"), ("final_label", "<i4"), ("degraded", "u1"), ("latency_ms", "<f4"),
    ("edge_ms", "<f4"), ("offload_bytes", "<u4"))
_SOURCES = ("edge", "cloud", "edge_fallback")


def _shuffle(a: np.ndarray) -> bytes:
    """An array's bytes grouped by significance (every first byte, then every second, ...):
    the high bytes of similar numbers repeat, and compress."""
    return np.ascontiguousarray(a).view(np.uint8).reshape(len(a), a.dtype.itemsize).T.tobytes()


def _unshuffle(b: bytes, dtype: np.dtype[Any], n: int) -> np.ndarray:
    return np.frombuffer(b, np.uint8).reshape(dtype.itemsize, n).T.copy().view(dtype).ravel()


def _encode_columns(ids: list[str], recs: list[dict[str, Any]]) -> bytes:
    n = len(recs)
    strings: dict[str, list[str]] = {}
    idx_cols: list[np.ndarray] = []
    for name in _STRING_FIELDS:
        table: dict[str, int] = {}
        col = np.empty(n, "<u2")
        for i, r in enumerate(recs):
            v = r[name]
            col[i] = NO_STRING if v is None else table.setdefault(v, len(table))
        if len(table) >= NO_STRING:
            raise ValueError("too many distinct strings")
        strings[name] = list(table)
        idx_cols.append(col)
    nums = []
    for name, dt in _NUM_FIELDS:
        if name == "has_cloud_label":
            vals: list[Any] = [r["cloud_label"] is not None for r in recs]
        elif name == "cloud_label":
            vals = [r["cloud_label"] or 0 for r in recs]
        else:
            vals = [r[name] for r in recs]
        if dt[-2] == "f":
            vals = [math.nan if v is None else v for v in vals]
        nums.append(np.array(vals, dtype=dt))
    header = {"ids": ids, "strings": strings, "input_ref": [r.get("input_ref") for r in recs],
              "columns": [[name, "<u2"] for name in _STRING_FIELDS] + [list(f) for f in
                                                                     _NUM_FIELDS]}
    body = b"".join(_shuffle(c) for c in (*idx_cols, *nums))
    return encode_frame(Kind.RESULTS, header, body, 2)


_RECORD_FIELDS = frozenset(ResultRecord.model_fields)


def _checked_record(fields: dict[str, Any]) -> ResultRecord:
    """A ResultRecord from fields the column checks have already held to its bounds: what
    `model_construct` does for a complete set of fields, without its general path (a tenth
    of its time, which was most of decoding a batch). A test holds it equal to a validated
    record."""
    r = ResultRecord.__new__(ResultRecord)
    object.__setattr__(r, "__dict__", fields)
    object.__setattr__(r, "__pydantic_fields_set__", set(_RECORD_FIELDS))
    object.__setattr__(r, "__pydantic_extra__", None)
    object.__setattr__(r, "__pydantic_private__", None)
    return r


def _decode_columns(f: Frame) -> tuple[list[ResultRecord], dict[str, str]]:
    """A version 2 results batch: records checked column by column (the same bounds as
    `ResultRecord`'s), each failing record named by its id with the first reason."""
    h = f.header
    ids, strings, refs, columns = h.get("ids"), h.get("strings"), h.get("input_ref"), \
        h.get("columns")
    expect = [[name, "<u2"] for name in _STRING_FIELDS] + [list(c) for c in _NUM_FIELDS]
    if (not isinstance(ids, list) or not all(isinstance(i, str) and 0 < len(i) <= _MAX_ID
                                             for i in ids)):
        raise ProtocolError("a results batch needs 'ids': strings of 1-64 characters")
    n = len(ids)
    if columns != expect:
        raise ProtocolError("a version 2 results batch needs the columns "
                            f"{[c[0] for c in expect]} with their types")
    if (not isinstance(strings, dict) or set(strings) != set(_STRING_FIELDS)
            or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                       for v in strings.values())):
        raise ProtocolError(f"'strings' needs a list of strings for each of "
                            f"{list(_STRING_FIELDS)}")
    if not isinstance(refs, list) or len(refs) != n:
        raise ProtocolError("'input_ref' needs one entry per record")
    need = sum(np.dtype(dt).itemsize for _, dt in expect) * n
    if need != len(f.body):
        raise ProtocolError(f"{n} records need {need} bytes of columns, body has {len(f.body)}")
    cols: dict[str, np.ndarray] = {}
    pos = 0
    for name, dt in expect:
        d = np.dtype(dt)
        cols[name] = _unshuffle(f.body[pos:pos + d.itemsize * n], d, n)
        pos += d.itemsize * n
    # Every check is a mask over the records; only a batch with a failing record (rare)
    # pays for finding each one's first reason.
    checks: list[tuple[np.ndarray, str]] = []
    values: dict[str, list[str | None]] = {}
    for name, top in _STRING_FIELDS.items():
        table = strings[name]
        col = cols[name]
        if name == "source":
            ok_table = [v in _SOURCES for v in table]
        else:
            ok_table = [len(v) <= top and (len(v) > 0 or name != "device") for v in table]
        # Index len(table) stands for "none" or "out of the table": accepted only where
        # optional and none.
        accepted = np.array([*ok_table, False, name in _OPTIONAL_STRINGS], bool)
        missing = col == NO_STRING
        safe = np.where(missing, len(table) + 1, np.minimum(col, len(table)))
        checks.append((~accepted[safe], f"{name}: missing, out of its table or not accepted"))
        values[name] = [table[c] if c < len(table) else None for c in col.tolist()]
    for name, limit in (("ts", MAX_TS), ("latency_ms", MAX_MS), ("edge_ms", MAX_MS)):
        c = cols[name]
        checks.append((~((c >= 0) & (c <= limit)), f"{name}: not a number in [0, {limit:g}]"))
    for name in ("score", "edge_confidence"):
        checks.append((~np.isfinite(cols[name]), f"{name}: not a finite number"))
    checks.append((cols["seq"] < 0, "seq: negative"))
    checks.append((cols["offload_bytes"] > I32_MAX, "offload_bytes: too large"))
    for name in ("offloaded", "has_cloud_label", "degraded"):
        checks.append((cols[name] > 1, f"{name}: not a boolean"))
    checks.append((np.array([r is not None and not (isinstance(r, str) and len(r) <= 128)
                             for r in refs], bool),
                   "input_ref: not a string of at most 128 characters"))
    why: list[str | None] = [None] * n
    if np.logical_or.reduce([m for m, _ in checks]).any():
        for mask, reason in checks:
            for i in np.flatnonzero(mask).tolist():
                why[i] = why[i] or reason
    good: list[ResultRecord] = []
    bad: dict[str, str] = {}
    # A float32 read back as the shortest decimal that is the same float32 (0.3, not
    # 0.30000001192092896): what the agent wrote, to the precision that travelled.
    lists = {name: (c.astype(str).astype(np.float64) if c.dtype == np.float32 else c).tolist()
             for name, c in cols.items()}
    for i in range(n):
        if why[i] is not None:
            bad[ids[i]] = why[i]  # type: ignore[assignment]
            continue
        fields: dict[str, Any] = {
            "id": ids[i], "seq": lists["seq"][i], "ts": lists["ts"][i], "input_ref": refs[i],
            "score": lists["score"][i], "edge_label": lists["edge_label"][i],
            "edge_confidence": lists["edge_confidence"][i],
            "offloaded": bool(lists["offloaded"][i]),
            "cloud_label": lists["cloud_label"][i] if lists["has_cloud_label"][i] else None,
            "final_label": lists["final_label"][i], "degraded": bool(lists["degraded"][i]),
            "latency_ms": lists["latency_ms"][i], "edge_ms": lists["edge_ms"][i],
            "offload_bytes": lists["offload_bytes"][i]}
        for name in _STRING_FIELDS:
            fields[name] = values[name][i]
        good.append(_checked_record(fields))
    return good, bad


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


_Item = TypeVar("_Item", bound=_HasId)


def _decode_each(payload: bytes, kind: Kind, parse: Callable[[bytes], _Item],
                 what: str) -> tuple[list[_Item], dict[str, str]]:
    """Decode every item of a batch on its own: (the good ones, {id: reason} for the others)."""
    good: list[_Item] = []
    bad: dict[str, str] = {}
    for item_id, blob in decode_items(payload, kind):
        try:
            item = parse(blob)
        except ValidationError as exc:
            bad[item_id] = _short_validation(exc)
            continue
        except ProtocolError as exc:
            bad[item_id] = str(exc)
            continue
        if item.id != item_id:
            bad[item_id] = f"{what} id {item.id!r} differs from its id in the batch"
        else:
            good.append(item)
    return good, bad


HardReason = Literal["deadline", "offline", "busy", "hub_error"]


@functools.lru_cache(maxsize=64)
def _tensor_json(dtype: str, shape: tuple[int, ...]) -> str:
    return json.dumps({"dtype": dtype, "shape": list(shape)}, separators=(",", ":"))
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class HardExample:
    """A hard input whose cloud answer did not come in time: the hub answers it late and keeps
    it (for statistics and retraining). `reason` says why the live answer was missing."""

    id: str
    model: str
    input: np.ndarray
    ts: float
    edge_label: int
    edge_score: float
    reason: HardReason

    def blob(self) -> bytes:
        # Written by hand rather than json.dumps: this runs on the answering thread for every
        # hard input answered offline (json.dumps made it 3x slower). Same JSON either way.
        x = self.input
        meta = (f'{{"id":{_json_str(self.id)},"model":{_json_str(self.model)},'
                f'"ts":{float(self.ts)!r},"edge_label":{int(self.edge_label)},'
                f'"edge_score":{float(self.edge_score)!r},"reason":"{self.reason}",'
                f'"tensor":{_tensor_json(x.dtype.name, x.shape)}}}').encode()
        return b"".join((_U32.pack(len(meta)), meta, tensor_bytes(x)))

    @classmethod
    def from_blob(cls, blob: bytes) -> HardExample:
        if len(blob) < _U32.size:
            raise ProtocolError("hard example is shorter than its length prefix")
        (mlen,) = _U32.unpack_from(blob)
        if mlen > len(blob) - _U32.size:
            raise ProtocolError("hard example metadata runs past its end")
        try:
            h = json.loads(blob[_U32.size:_U32.size + mlen])
            if not isinstance(h, dict):
                raise ProtocolError("hard example metadata must be a JSON object")
            reason = h.get("reason")
            if reason not in ("deadline", "offline", "busy", "hub_error"):
                raise ProtocolError(f"hard example reason {reason!r} is unknown")
            return cls(id=_str(h, "id"), model=_str(h, "model"),
                       input=decode_tensor(h.get("tensor"), blob[_U32.size + mlen:]),
                       ts=float(h["ts"]), edge_label=int(h["edge_label"]),
                       edge_score=float(h["edge_score"]), reason=reason)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"hard example metadata is incomplete or mistyped: {exc!r}") \
                from None

    @staticmethod
    def decode_batch(payload: bytes) -> tuple[list[HardExample], dict[str, str]]:
        return _decode_each(payload, Kind.HARD_EXAMPLES, HardExample.from_blob, "hard example")


def encode_hard_batch(ids: list[str], blobs: list[bytes],
                      version: int = PROTOCOL_VERSION) -> bytes:
    return encode_items(Kind.HARD_EXAMPLES, ids, blobs, version)


@dataclass(frozen=True, slots=True)
class Ack:
    """Ids the hub committed (`ids`) or refused for good (`rejected`, id -> reason), of the
    results or the hard examples of a device (`of`)."""

    ids: list[str]
    rejected: dict[str, str] = field(default_factory=dict)
    of: Literal["results", "hard"] = "results"

    def encode(self, version: int = PROTOCOL_VERSION) -> bytes:
        return encode_frame(Kind.ACK, {"ids": self.ids, "rejected": self.rejected, "of": self.of},
                            b"", version)

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        h = decode_frame(payload, Kind.ACK).header
        ids, rej, of = h.get("ids", []), h.get("rejected", {}), h.get("of", "results")
        if not isinstance(ids, list) or not isinstance(rej, dict):
            raise ProtocolError("ack needs an 'ids' list and a 'rejected' object")
        if of not in ("results", "hard"):
            raise ProtocolError(f"ack of {of!r}: expected 'results' or 'hard'")
        return cls([str(i) for i in ids], {str(k): str(v) for k, v in rej.items()}, of)


def encode_json(kind: Kind, header: dict[str, Any], version: int = 1) -> bytes:
    """Telemetry and status are plain headers."""
    return encode_frame(kind, header, b"", version)


def status_payload(state: Literal["online", "offline"], device: str, version: int = 1) -> bytes:
    return encode_frame(Kind.STATUS, {"state": state, "device": device, "ts": time.time()}, b"",
                        version)


def _str(h: dict[str, Any], key: str) -> str:
    v = h.get(key)
    if not isinstance(v, str) or not v:
        raise ProtocolError(f"header field {key!r} must be a non-empty string")
    return v


def _short_validation(exc: ValidationError) -> str:
    errs = exc.errors()
    first = errs[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc}: {first.get('msg')}{more}"
