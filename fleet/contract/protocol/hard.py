"""Hard examples: inputs whose cloud answer did not come in time, sent durably for a late one."""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fleet.contract.errors import ProtocolError
from fleet.contract.protocol.batches import decode_each, encode_items
from fleet.contract.protocol.bounds import (
    I32_MAX,
    I32_MIN,
    MAX_TS,
    integer,
    number,
    parse_header,
    required_text,
)
from fleet.contract.protocol.frames import PROTOCOL_VERSION, Kind
from fleet.contract.protocol.frames import json_str as _json_str
from fleet.contract.protocol.messages import MAX_ID, MAX_MODEL_REF
from fleet.contract.protocol.tensors import decode_tensor, tensor_bytes

HardReason = Literal["deadline", "offline", "busy", "hub_error"]
_REASONS = ("deadline", "offline", "busy", "hub_error")


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
        h = parse_header(blob[_U32.size:_U32.size + mlen])
        if not isinstance(h, dict):
            raise ProtocolError("hard example metadata must be a JSON object", "field")
        reason = h.get("reason")
        if reason not in _REASONS:
            raise ProtocolError(f"hard example reason {str(reason)[:20]!r} is unknown", "field")
        return cls(id=required_text(h, "id", MAX_ID),
                   model=required_text(h, "model", MAX_MODEL_REF),
                   input=decode_tensor(h.get("tensor"), blob[_U32.size + mlen:]),
                   ts=number(h, "ts", 0.0, MAX_TS),
                   edge_label=integer(h, "edge_label", I32_MIN, I32_MAX),
                   edge_score=number(h, "edge_score"), reason=reason)

    @staticmethod
    def decode_batch(payload: bytes) -> tuple[list[HardExample], dict[str, str]]:
        return decode_each(payload, Kind.HARD_EXAMPLES, HardExample.from_blob, "hard example")


def encode_hard_batch(ids: list[str], blobs: list[bytes],
                      version: int = PROTOCOL_VERSION) -> bytes:
    return encode_items(Kind.HARD_EXAMPLES, ids, blobs, version)

