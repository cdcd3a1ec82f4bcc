"""Result records: one decision of an agent each, and how batches of them travel (version 1:
JSON items; version 2: columns, `_encode_columns`). Version 2 carries a batch's shared fields
once and numbers as little-endian arrays whose bytes are grouped by significance (they
compress), so that a record costs tens of bytes instead of a JSON object of 400."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fleet.contract.errors import ProtocolError
from fleet.contract.protocol.batches import decode_each, encode_items
from fleet.contract.protocol.bounds import I32_MAX, I32_MIN, I64_MAX, MAX_MS, MAX_TS
from fleet.contract.protocol.frames import (
    PROTOCOL_VERSION,
    Frame,
    Kind,
    decode_frame,
    encode_frame,
    frame_version,
)
from fleet.contract.protocol.frames import json_str as _json_str
from fleet.contract.protocol.messages import MAX_ID

Source = Literal["edge", "cloud", "edge_fallback"]
# A string a column can hold: no NUL (PostgreSQL refuses it; a lone surrogate does not get
# through the JSON parser).
_Text = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]
MAX_INPUT_REF = 128


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

    id: _Text = Field(min_length=1, max_length=MAX_ID)
    device: _Text = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0, le=I64_MAX)
    ts: float = Field(ge=0, le=MAX_TS)
    input_ref: _Text | None = Field(default=None, max_length=MAX_INPUT_REF)
    model: _Text = Field(max_length=128)
    backend: _Text = Field(max_length=32)
    policy: _Text = Field(max_length=32)
    score: float
    edge_label: int = Field(ge=I32_MIN, le=I32_MAX)
    edge_confidence: float
    offloaded: bool
    cloud_label: int | None = Field(default=None, ge=I32_MIN, le=I32_MAX)
    cloud_model: _Text | None = Field(default=None, max_length=128)
    final_label: int = Field(ge=I32_MIN, le=I32_MAX)
    source: Source
    degraded: bool = False
    latency_ms: float = Field(ge=0, le=MAX_MS)
    edge_ms: float = Field(ge=0, le=MAX_MS)
    offload_bytes: int = Field(default=0, ge=0, le=I32_MAX)



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
        return decode_each(payload, Kind.RESULTS, ResultRecord.model_validate_json, "record")


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
    if (not isinstance(ids, list) or not all(isinstance(i, str) and 0 < len(i) <= MAX_ID
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
    checks.append((np.array([r is not None and not (isinstance(r, str)
                                                    and len(r) <= MAX_INPUT_REF)
                             for r in refs], bool),
                   f"input_ref: not a string of at most {MAX_INPUT_REF} characters"))
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
