"""The single messages: offloads and answers (the deadline-bound pair), acks, status and
telemetry. Each decoder holds every field to its bounds (`bounds`) and raises ProtocolError."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fleet.contract.errors import ProtocolError
from fleet.contract.protocol.bounds import (
    I32_MAX,
    I32_MIN,
    MAX_MS,
    MAX_TS,
    check_string,
    integer,
    number,
    required_text,
    text,
)
from fleet.contract.protocol.frames import PROTOCOL_VERSION, Kind, decode_frame, encode_frame
from fleet.contract.protocol.tensors import decode_tensor, narrow, tensor_bytes, tensor_header

# Lengths of the strings a message carries, as the hub's columns hold them.
MAX_ID = 64          # a record, offload or hard example id
MAX_MODEL_REF = 128  # "name@version"
MAX_BACKEND = 32
MAX_REASON = 256     # why the hub refused an item (in an ack) or could not answer


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
        return cls(id=required_text(h, "id", MAX_ID), model=required_text(h, "model",
                                                                          MAX_MODEL_REF),
                   input=decode_tensor(h.get("tensor"), f.body),
                   deadline_ms=number(h, "deadline_ms", 0.0, MAX_MS),
                   sent_at=number(h, "sent_at", 0.0, MAX_TS),
                   edge_label=integer(h, "edge_label", I32_MIN, I32_MAX),
                   edge_score=number(h, "edge_score"))


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
        return cls(id=required_text(h, "id", MAX_ID), label=integer(h, "label"),
                   confidence=number(h, "confidence"),
                   model=text(h, "model", MAX_MODEL_REF, empty=True) or "",
                   hub_ms=number(h, "hub_ms", 0.0, MAX_MS, default=0.0),
                   error=text(h, "error", MAX_REASON, optional=True))


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
            raise ProtocolError("ack needs an 'ids' list and a 'rejected' object", "field")
        if of not in ("results", "hard"):
            raise ProtocolError(f"ack of {str(of)[:20]!r}: expected 'results' or 'hard'",
                                "field")
        if not all(isinstance(i, str) and 0 < len(i) <= MAX_ID for i in ids) or not all(
                0 < len(k) <= MAX_ID and isinstance(v, str) for k, v in rej.items()):
            raise ProtocolError(f"ack ids must be strings of 1-{MAX_ID} characters, and "
                                "reasons strings", "field")
        return cls(list(ids), {k: v[:MAX_REASON] for k, v in rej.items()}, of)


def encode_json(kind: Kind, header: dict[str, Any], version: int = 1) -> bytes:
    """Telemetry and status are plain headers."""
    return encode_frame(kind, header, b"", version)


def status_payload(state: Literal["online", "offline"], device: str, version: int = 1) -> bytes:
    return encode_frame(Kind.STATUS, {"state": state, "device": device, "ts": time.time()}, b"",
                        version)


@dataclass(frozen=True, slots=True)
class Status:
    """A device's online state (retained; the broker publishes the offline one as its will)."""

    online: bool

    @classmethod
    def decode(cls, payload: bytes) -> Status:
        h = decode_frame(payload, Kind.STATUS).header
        state = h.get("state")
        if state not in ("online", "offline"):
            raise ProtocolError(f"status state {str(state)[:20]!r}: expected 'online' or "
                                "'offline'", "field")
        return cls(state == "online")


# What telemetry may say of a device's fidelity, offload controller and labels: figures a hub
# keeps per device and shows as gauges.
MAX_LABELS = 64
MAX_LABEL_TEXT = 256


@dataclass(frozen=True, slots=True)
class Telemetry:
    """A heartbeat. `header` is the whole document (bounded by the frame: depth, strings,
    finite numbers, int64), kept as the device's latest telemetry; the fields the hub stores in
    columns or reads are checked here to their columns' bounds."""

    header: dict[str, Any]
    version: int
    ts: float | None
    model: str | None
    backend: str | None
    fidelity: dict[str, Any] | None
    offload: dict[str, Any] | None
    labels: dict[str, str] | None

    @classmethod
    def decode(cls, payload: bytes) -> Telemetry:
        f = decode_frame(payload, Kind.TELEMETRY)
        h = f.header
        ts = number(h, "ts", 0.0, MAX_TS) if h.get("ts") is not None else None
        fid, off, labels = h.get("fidelity"), h.get("offload"), h.get("labels")
        for key, v in (("fidelity", fid), ("offload", off), ("labels", labels)):
            if v is not None and not isinstance(v, dict):
                raise ProtocolError(f"telemetry field {key!r} must be an object", "field")
        if labels is not None and (len(labels) > MAX_LABELS or not all(
                isinstance(v, str) and len(k) <= MAX_LABEL_TEXT and len(v) <= MAX_LABEL_TEXT
                for k, v in labels.items())):
            raise ProtocolError(f"telemetry labels: at most {MAX_LABELS} strings of at most "
                                f"{MAX_LABEL_TEXT} characters", "field")
        return cls(h, f.version, ts, text(h, "model", MAX_MODEL_REF, optional=True),
                   text(h, "backend", MAX_BACKEND, optional=True), fid, off, labels)


def figure(d: dict[str, Any] | None, key: str, limit: float = 1e15) -> float | None:
    """A number a device reports inside a telemetry object, if it is one a gauge can show."""
    if d is None:
        return None
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not -limit <= v <= limit:
        return None
    return float(v)


def short_text(v: Any, max_len: int) -> str:
    """A string from the wire cut to `max_len`, for a label or a log (never raises)."""
    s = str(v)[:max_len]
    try:
        return check_string(s)
    except ProtocolError:
        return s.encode("utf-8", "replace").decode("utf-8").replace("\x00", "?")
