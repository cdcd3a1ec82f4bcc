"""Hostile messages for every channel the hub reads, generated from the messages' schema and
then mutated: what `bench/security.py` and the property tests send as an attacker would.

`valid(channel, rng)` builds a well-formed header (and body) of each device channel, in either
protocol version; `hostile(rng)` picks a channel, builds a valid message and breaks it one way:
a field replaced by an out-of-range or huge integer, a non-finite number, a value nested
hundreds or thousands of levels deep, a string with a lone surrogate or a NUL, an over-long
string, a value of the wrong type, an oversized list; or the frame itself broken (an unknown
version, kind or codec, a truncated or bomb-compressed frame, bytes that are not UTF-8, a
header that is not an object). The JSON is written by hand where `json.dumps` cannot say it
(lone surrogates, deep nesting, NaN).
"""

from __future__ import annotations

import functools
import json
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleet.contract import protocol as p
from fleet.contract.assignment import Reported, UpdateState

# Channels the hub reads, and the mutations of a header's value.
CHANNELS = (p.Channel.OFFLOAD, p.Channel.RESULTS, p.Channel.HARD, p.Channel.TELEMETRY,
            p.Channel.STATUS, p.Channel.REPORTED)


class Raw:
    """A JSON fragment written as is (what json.dumps cannot produce)."""

    def __init__(self, text: str) -> None:
        self.text = text


def dumps_raw(v: Any) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dumps_raw(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dumps_raw(x) for x in v) + "]"
    return json.dumps(v)


def _frame(kind: p.Kind, header: dict[str, Any], body: bytes, version: int) -> bytes:
    h = dumps_raw(header).encode("utf-8", "surrogatepass")
    inner = struct.pack(">I", len(h)) + h + body
    if version == 1:
        return struct.pack(">2sBBI", p.MAGIC, 1, int(kind), len(h)) + h + body
    c = zlib.compressobj(6, zdict=p.ZDICT)
    return struct.pack(">2sBBB", p.MAGIC, 2, int(kind), p.CODEC_ZLIB_DICT) + \
        c.compress(inner) + c.flush()


def _record(i: int, device: str, rng: random.Random) -> dict[str, Any]:
    off = rng.random() < 0.3
    return {"id": f"h{rng.getrandbits(40):x}-{i}", "device": device, "seq": i,
            "ts": 1.7e9 + i, "input_ref": f"in:{i}", "model": "digits-edge@1",
            "backend": "onnxruntime", "policy": "max_prob", "score": rng.random(),
            "edge_label": rng.randrange(10), "edge_confidence": rng.random(),
            "offloaded": off, "cloud_label": rng.randrange(10) if off else None,
            "cloud_model": "digits-cloud@1" if off else None, "final_label": rng.randrange(10),
            "source": "cloud" if off else "edge", "degraded": False,
            "latency_ms": rng.random() * 5, "edge_ms": rng.random(), "offload_bytes": 120}


@dataclass
class Message:
    """A message to publish as `device` on `channel`: header and body before framing."""

    channel: p.Channel
    kind: p.Kind
    header: dict[str, Any]
    body: bytes
    version: int
    # For batch items (results v1, hard examples): the item blobs, framed by `payload`.
    items: list[dict[str, Any]] | None = None
    mutation: str = "none"

    def payload(self) -> bytes:
        if self.items is None:
            return _frame(self.kind, self.header, self.body, self.version)
        if self.kind is p.Kind.HARD_EXAMPLES:
            x = np.zeros((8, 8), np.float32).tobytes()
            blobs = []
            for it in self.items:
                meta = dumps_raw(it).encode("utf-8", "surrogatepass")
                blobs.append(struct.pack(">I", len(meta)) + meta + x)
        else:
            blobs = [dumps_raw(it).encode("utf-8", "surrogatepass") for it in self.items]
        ids = [it.get("id") if isinstance(it.get("id"), str) else "x" for it in self.items]
        header = {"ids": ids, "sizes": [len(b) for b in blobs], **self.header}
        return _frame(self.kind, header, b"".join(blobs), self.version)


def valid(channel: p.Channel, device: str, rng: random.Random,
          version: int | None = None) -> Message:
    """A well-formed message of `channel` from `device`."""
    v = version if version is not None else rng.choice(p.SUPPORTED_VERSIONS)
    if channel is p.Channel.OFFLOAD:
        x = np.full((8, 8), rng.randrange(17), np.float32)
        h = {"id": f"o{rng.getrandbits(40):x}", "model": "digits-edge@1", "deadline_ms": 200.0,
             "sent_at": 1.7e9, "edge_label": 3, "edge_score": 0.4,
             "tensor": {"dtype": "float32", "shape": [8, 8]}}
        return Message(channel, p.Kind.OFFLOAD, h, x.tobytes(), v)
    if channel is p.Channel.RESULTS:
        recs = [_record(i, device, rng) for i in range(rng.randrange(1, 12))]
        if v == 2 and len(recs) >= p.COLUMNS_MIN_RECORDS:
            payload = p.ResultBatch.of([p.ResultRecord(**r) for r in recs]).encode(2)
            f = p.decode_frame(payload)
            return Message(channel, p.Kind.RESULTS, f.header, f.body, 2)
        return Message(channel, p.Kind.RESULTS, {}, b"", v, items=recs)
    if channel is p.Channel.HARD:
        items = [{"id": f"x{rng.getrandbits(40):x}", "model": "digits-edge@1", "ts": 1.7e9,
                  "edge_label": 2, "edge_score": 0.3, "reason": "deadline",
                  "tensor": {"dtype": "float32", "shape": [8, 8]}}
                 for _ in range(rng.randrange(1, 4))]
        return Message(channel, p.Kind.HARD_EXAMPLES, {}, b"", v, items=items)
    if channel is p.Channel.TELEMETRY:
        h = {"device": device, "ts": 1.7e9, "uptime_s": 12.0, "model": "digits-edge@1",
             "backend": "onnxruntime", "labels": {"site": "lab"},
             "offload": {"mode": "threshold", "threshold": 0.5, "drift": 0.1},
             "fidelity": {"agreement": 1.0, "backend": "onnxruntime", "cpu_flags": ["avx2"]},
             "outbox": {"entries": 3, "dropped_full": 0, "dropped_expired": 0},
             "counters": {"inputs": 10}}
        return Message(channel, p.Kind.TELEMETRY, h, b"", v)
    if channel is p.Channel.STATUS:
        return Message(channel, p.Kind.STATUS, {"state": "online", "device": device,
                                                "ts": 1.7e9}, b"", v)
    if channel is p.Channel.REPORTED:
        r = Reported(device, "digits-edge@1", UpdateState.IDLE, ts=1.7e9)
        f = p.decode_frame(r.encode())
        return Message(channel, p.Kind.REPORTED, f.header, b"", v)
    raise ValueError(f"the hub does not read {channel}")


def _deep(depth: int) -> Raw:
    return Raw("[" * depth + "]" * depth)


# How a value is broken. Each returns the replacement for one field.
VALUE_MUTATIONS: dict[str, Callable[[random.Random], Any]] = {
    "huge_int": lambda r: r.choice([10**30, -(10**30), 2**63, -(2**63) - 1, 2**31, 10**4000]),
    "out_of_range": lambda r: r.choice([-1, -(2**31) - 1, 2**31, 2**32, 2**62]),
    "non_finite": lambda r: Raw(r.choice(["NaN", "Infinity", "-Infinity", "1e999"])),
    "deep": lambda r: _deep(r.choice([40, 300, 5000])),
    "surrogate": lambda r: Raw('"ab\\ud800' + r.choice(["", "x", "\\udfff"]) + '"'),
    "nul": lambda r: "a\x00b",
    "long_string": lambda r: "s" * r.choice([129, 300, 5000, 100_000]),
    "wrong_type": lambda r: r.choice([[], {}, True, None, "x", 1.5, [1, 2], {"a": 1}]),
    "big_list": lambda r: Raw(json.dumps(list(range(r.choice([20_000, 50_000]))))),
}
FRAME_MUTATIONS = ("version", "kind", "codec", "truncated", "bomb", "not_utf8", "not_object",
                   "garbage")


def _leaves(d: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            out.append((*path, k))
            out += _leaves(v, (*path, k))
    elif isinstance(d, list):
        for i, v in enumerate(d[:4]):
            out.append((*path, i))
            out += _leaves(v, (*path, i))
    return out


def _set(d: Any, path: tuple[Any, ...], value: Any) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _break_frame(payload: bytes, how: str, rng: random.Random) -> bytes:
    if how == "version":
        return payload[:2] + bytes([rng.choice([0, 3, 9, 255])]) + payload[3:]
    if how == "kind":
        return payload[:3] + bytes([rng.choice([0, 10, 200])]) + payload[4:]
    if how == "codec":
        return struct.pack(">2sBBB", p.MAGIC, 2, payload[3], rng.choice([3, 7, 255])) + \
            payload[5:]
    if how == "truncated":
        return payload[:rng.randrange(0, max(1, len(payload)))]
    if how == "bomb":
        return struct.pack(">2sBBB", p.MAGIC, 2, payload[3], p.CODEC_ZLIB) + _bomb()
    if how == "not_utf8":
        h = b'{"a":"\xff\xfe"}'
        return struct.pack(">2sBBI", p.MAGIC, 1, payload[3], len(h)) + h
    if how == "not_object":
        h = rng.choice([b"[1,2]", b'"x"', b"3", b"null"])
        return struct.pack(">2sBBI", p.MAGIC, 1, payload[3], len(h)) + h
    return rng.randbytes(rng.randrange(1, 300))


@functools.cache
def _bomb() -> bytes:
    """8 MiB of zeros in about 8 KiB: twice what a frame may inflate to."""
    return zlib.compress(b"\x00" * (8 << 20), 9)


def hostile(device: str, rng: random.Random,
            channels: tuple[p.Channel, ...] = CHANNELS) -> tuple[p.Channel, bytes, str]:
    """One hostile message: (channel, payload, the mutation's name)."""
    ch = rng.choice(channels)
    m = valid(ch, device, rng)
    if rng.random() < 0.15:
        how = rng.choice(FRAME_MUTATIONS)
        return ch, _break_frame(m.payload(), how, rng), f"frame:{how}"
    name = rng.choice(list(VALUE_MUTATIONS))
    value = VALUE_MUTATIONS[name](rng)
    target: Any = m.header
    if m.items is not None and (not m.header or rng.random() < 0.8):
        target = m.items[rng.randrange(len(m.items))]
    paths = _leaves(target)
    if paths:
        _set(target, rng.choice(paths), value)
    return ch, m.payload(), f"{name}"
