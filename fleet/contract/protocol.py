"""The wire contract between agents and hub: topics, the frame codec and the messages.

Nothing else spells a topic string or a frame layout. Every payload is one frame:

    offset  size  field
    0       2     magic b"EH"
    2       1     protocol version (PROTOCOL_VERSION)
    3       1     message kind (Kind)
    4       4     header length H, unsigned big-endian
    8       H     header: UTF-8 JSON object
    8+H     rest  body: raw bytes (a tensor's data, little-endian, C order), may be empty

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
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.contract.errors import ProtocolError, UnsupportedVersion

PROTOCOL_VERSION = 1
MAGIC = b"EH"
_PREFIX = struct.Struct(">2sBBI")
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

    OFFLOAD = "offload"      # agent -> hub, QoS 1: a hard example
    ANSWER = "answer"        # hub -> agent, QoS 1: the cloud answer for an offload id
    RESULTS = "results"      # agent -> hub, QoS 1: a batch of result records
    ACK = "ack"              # hub -> agent, QoS 1: record ids committed by the hub
    TELEMETRY = "telemetry"  # agent -> hub, QoS 0: heartbeat
    STATUS = "status"        # agent -> hub, QoS 1, retained, last will: online/offline
    HARD = "hard"            # agent -> hub, QoS 1: hard examples for a late cloud answer
    DESIRED = "desired"      # hub -> agent, QoS 1, retained: the signed model assignment
    REPORTED = "reported"    # agent -> hub, QoS 1, retained: model, update state, last error


QOS: dict[Channel, int] = {
    Channel.OFFLOAD: 1, Channel.ANSWER: 1, Channel.RESULTS: 1, Channel.ACK: 1,
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


def encode_frame(kind: Kind, header: dict[str, Any], body: bytes = b"") -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, PROTOCOL_VERSION, int(kind), len(h)) + h + body


def decode_frame(payload: bytes, expect: Kind | None = None) -> Frame:
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME_BYTES} limit")
    if len(payload) < _PREFIX.size:
        raise ProtocolError(f"frame of {len(payload)} bytes is shorter than its "
                            f"{_PREFIX.size}-byte prefix")
    magic, version, kind, hlen = _PREFIX.unpack_from(payload)
    if magic != MAGIC:
        raise ProtocolError(f"frame does not start with {MAGIC!r} (got {magic!r})")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {version} is not supported "
                                 f"(this build speaks {PROTOCOL_VERSION})")
    try:
        k = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind}") from None
    if expect is not None and k is not expect:
        raise ProtocolError(f"expected a {expect.name} message, got {k.name}")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(payload):
        raise ProtocolError(f"header length {hlen} does not fit a {len(payload)}-byte frame")
    try:
        header = json.loads(payload[_PREFIX.size:_PREFIX.size + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    return Frame(k, header, bytes(payload[_PREFIX.size + hlen:]))


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

    def encode(self) -> bytes:
        header = {"id": self.id, "model": self.model, "deadline_ms": self.deadline_ms,
                  "sent_at": self.sent_at, "edge_label": self.edge_label,
                  "edge_score": self.edge_score, "tensor": tensor_header(self.input)}
        return encode_frame(Kind.OFFLOAD, header, tensor_bytes(self.input))

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

    def encode(self) -> bytes:
        header = {"id": self.id, "label": self.label, "confidence": self.confidence,
                  "model": self.model, "hub_ms": self.hub_ms}
        if self.error:
            header["error"] = self.error
        return encode_frame(Kind.ANSWER, header)

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


def encode_items(kind: Kind, ids: list[str], blobs: list[bytes]) -> bytes:
    return encode_frame(kind, {"ids": ids, "sizes": [len(b) for b in blobs]}, b"".join(blobs))


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
    return (
        f'{{"id":{_json_str(id)},"device":{_json_str(device)},"seq":{int(seq)},'
        f'"ts":{_jnum(ts)},"input_ref":{_jopt(input_ref)},"model":{_json_str(model)},'
        f'"backend":{_json_str(backend)},"policy":{_json_str(policy)},"score":{_jnum(score)},'
        f'"edge_label":{int(edge_label)},"edge_confidence":{_jnum(edge_confidence)},'
        f'"offloaded":{"true" if offloaded else "false"},'
        f'"cloud_label":{"null" if cloud_label is None else int(cloud_label)},'
        f'"cloud_model":{_jopt(cloud_model)},"final_label":{int(final_label)},'
        f'"source":"{source}","degraded":{"true" if degraded else "false"},'
        f'"latency_ms":{_jnum(latency_ms)},"edge_ms":{_jnum(edge_ms)},'
        f'"offload_bytes":{int(offload_bytes)}}}').encode()


@dataclass(frozen=True, slots=True)
class ResultBatch:
    ids: list[str]
    blobs: list[bytes]

    @classmethod
    def of(cls, records: list[ResultRecord]) -> ResultBatch:
        return cls([r.id for r in records], [record_blob(r) for r in records])

    def encode(self) -> bytes:
        return encode_items(Kind.RESULTS, self.ids, self.blobs)

    @staticmethod
    def decode_lenient(payload: bytes) -> tuple[list[ResultRecord], dict[str, str]]:
        """Decode a batch, keeping the valid records and naming each invalid one with a reason."""
        return _decode_each(payload, Kind.RESULTS, ResultRecord.model_validate_json, "record")


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


def encode_hard_batch(ids: list[str], blobs: list[bytes]) -> bytes:
    return encode_items(Kind.HARD_EXAMPLES, ids, blobs)


@dataclass(frozen=True, slots=True)
class Ack:
    """Ids the hub committed (`ids`) or refused for good (`rejected`, id -> reason), of the
    results or the hard examples of a device (`of`)."""

    ids: list[str]
    rejected: dict[str, str] = field(default_factory=dict)
    of: Literal["results", "hard"] = "results"

    def encode(self) -> bytes:
        return encode_frame(Kind.ACK, {"ids": self.ids, "rejected": self.rejected, "of": self.of})

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        h = decode_frame(payload, Kind.ACK).header
        ids, rej, of = h.get("ids", []), h.get("rejected", {}), h.get("of", "results")
        if not isinstance(ids, list) or not isinstance(rej, dict):
            raise ProtocolError("ack needs an 'ids' list and a 'rejected' object")
        if of not in ("results", "hard"):
            raise ProtocolError(f"ack of {of!r}: expected 'results' or 'hard'")
        return cls([str(i) for i in ids], {str(k): str(v) for k, v in rej.items()}, of)


def encode_json(kind: Kind, header: dict[str, Any]) -> bytes:
    """Telemetry and status are plain headers."""
    return encode_frame(kind, header)


def status_payload(state: Literal["online", "offline"], device: str) -> bytes:
    return encode_frame(Kind.STATUS, {"state": state, "device": device, "ts": time.time()})


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
