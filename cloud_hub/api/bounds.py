"""Bounds on what enters the API: every integer fits the database's 64-bit columns, every name
and id is a plain word of bounded length, every time is a finite number. A value outside them
is a 422 that names the field, never a 500 from the database."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

from fleet.contract.bundle import MAX_VERSION
from fleet.contract.protocol import NAME_PATTERN

MAX_DB_INT = (1 << 63) - 1
# 1970 to 2286: any timestamp a device or a query can mean.
MAX_EPOCH_S = 1e10
_WORD = NAME_PATTERN

DeviceId = Annotated[str, Path(pattern=_WORD, max_length=64, description="a device id")]
BundleName = Annotated[str, Path(pattern=_WORD, max_length=64, description="a bundle name")]
Version = Annotated[int, Path(ge=1, le=MAX_VERSION)]
RowId = Annotated[int, Path(ge=1, le=MAX_DB_INT)]
Cursor = Annotated[int, Query(ge=0, le=MAX_DB_INT,
                              description="the previous page's next_cursor")]
Limit = Annotated[int, Query(ge=1, le=1_000_000, description="at most the hub's max_page")]
Epoch = Annotated[float | None, Query(ge=0, le=MAX_EPOCH_S, allow_inf_nan=False)]
# A record's or hard example's id as agents write them (1-64 printable ASCII characters).
ItemId = Annotated[str, Path(pattern=r"^[!-~]{1,64}$", description="an id")]
StateFilter = Annotated[str | None, Query(pattern=r"^[a-z_]{1,32}$")]
DeviceFilter = Annotated[str | None, Query(pattern=_WORD, max_length=64)]
NameFilter = Annotated[str | None, Query(pattern=_WORD, max_length=64)]
