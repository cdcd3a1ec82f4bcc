"""Batch frames (results, hard examples): items as separate blobs. The header lists each item's
id and size, the body holds the blobs back to back. An item that does not decode is refused by
its id while the others are kept: one bad item never blocks the queue behind it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from pydantic import ValidationError

from fleet.contract.errors import ProtocolError
from fleet.contract.protocol.bounds import short_validation
from fleet.contract.protocol.frames import Kind, decode_frame, encode_frame
from fleet.contract.protocol.messages import MAX_ID


def encode_items(kind: Kind, ids: list[str], blobs: list[bytes], version: int = 1) -> bytes:
    return encode_frame(kind, {"ids": ids, "sizes": [len(b) for b in blobs]}, b"".join(blobs),
                        version)


def decode_items(payload: bytes, kind: Kind) -> list[tuple[str, bytes]]:
    f = decode_frame(payload, kind)
    ids, sizes = f.header.get("ids"), f.header.get("sizes")
    if (not isinstance(ids, list) or not isinstance(sizes, list) or len(ids) != len(sizes)
            or not all(isinstance(i, str) and 0 < len(i) <= MAX_ID for i in ids)
            or not all(isinstance(z, int) and not isinstance(z, bool) and z >= 0
                       for z in sizes)):
        raise ProtocolError(f"a batch header needs 'ids' (strings of 1-{MAX_ID} characters) and "
                            "'sizes' (non-negative integers) of the same length", "field")
    if sum(sizes) != len(f.body):
        raise ProtocolError(f"batch item sizes add up to {sum(sizes)} bytes, body has "
                            f"{len(f.body)}", "field")
    out = []
    pos = 0
    for i, z in zip(ids, sizes, strict=True):
        out.append((i, f.body[pos:pos + z]))
        pos += z
    return out


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


_Item = TypeVar("_Item", bound=_HasId)


def decode_each(payload: bytes, kind: Kind, parse: Callable[[bytes], _Item],
                what: str) -> tuple[list[_Item], dict[str, str]]:
    """Decode every item of a batch on its own: (the good ones, {id: reason} for the others)."""
    good: list[_Item] = []
    bad: dict[str, str] = {}
    for item_id, blob in decode_items(payload, kind):
        try:
            item = parse(blob)
        except ValidationError as exc:
            bad[item_id] = short_validation(exc)
            continue
        except ProtocolError as exc:
            bad[item_id] = str(exc)
            continue
        if item.id != item_id:
            bad[item_id] = f"{what} id {item.id[:MAX_ID]!r} differs from its id in the batch"
        else:
            good.append(item)
    return good, bad
