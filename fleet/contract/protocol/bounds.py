"""What any value from the wire may be: the bounds every inbound message is held to.

A header is parsed by `parse_header`, which refuses, before anything reads a field:
- NaN and infinities (JSON has none; Python's parser would take `NaN` and `1e999`),
- integers outside int64 (no column holds more; Python would build any size),
- nesting deeper than MAX_DEPTH (a deep value costs every walker a recursion),
- strings with a NUL or a lone surrogate (neither PostgreSQL nor UTF-8 can hold them),
- strings longer than MAX_TEXT and containers of more than MAX_ITEMS entries.

The typed readers below (`text`, `integer`, `number`, ...) then hold each field to what its
column and its use require. Both sides use them: the hub on what devices send, the agent on
what the hub sends and on what its local API is given.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pydantic import ValidationError

from fleet.contract.errors import ProtocolError

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
MAX_TS = 1e11          # seconds since 1970: beyond the year 5000
MAX_MS = 86_400_000.0  # a day, in milliseconds
# Telemetry nests three levels (telemetry -> fidelity -> cpu_flags); a signed assignment five
# (assignment -> manifest -> files -> entry -> ...). Twice the deepest document we write.
MAX_DEPTH = 12
# The longest string any header field may hold (an error text, a CPU's name); columns hold less
# and their fields are held to their own length by `text`.
MAX_TEXT = 4096
# Entries of one list or object in a header: a results batch's ids (at most a few thousand),
# a telemetry's counters. The header's byte limit bounds the rest.
MAX_ITEMS = 16_384


def _parse_float(s: str) -> float:
    x = float(s)
    if not math.isfinite(x):
        raise ProtocolError(f"number {s[:24]!r} is not finite", "number")
    return x


# Nineteen digits in a row: an integer that may be outside int64 (or a long fraction). Only a
# header holding such a run has its integers checked one by one (a C-speed search, where a
# parse hook would cost a Python call per integer).
_LONG_DIGITS = re.compile(rb"\d{19}")


def _check_int(v: int) -> None:
    if not I64_MIN <= v <= I64_MAX:
        raise ProtocolError(f"integer {str(v)[:24]}... is outside int64", "number")


def _refuse_constant(s: str) -> Any:
    raise ProtocolError(f"{s} is not a finite number (the protocol carries no other)", "number")


def check_string(s: str, what: str = "string") -> str:
    """`s` if it holds neither NUL nor a lone surrogate (PostgreSQL and UTF-8 refuse both)."""
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(f"{what} holds a lone surrogate", "text") from None
    if "\x00" in s:
        raise ProtocolError(f"{what} holds a NUL character", "text")
    return s


def _walk(value: Any, check_strings: bool, max_items: int = MAX_ITEMS,
          check_ints: bool = False) -> None:
    """Depth, sizes and (when escapes were present) the strings, (when long digit runs were
    present) the integers of a parsed JSON value."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth >= MAX_DEPTH:
                raise ProtocolError(f"value nested deeper than {MAX_DEPTH} levels", "depth")
            if len(v) > max_items:
                raise ProtocolError(f"{'object' if isinstance(v, dict) else 'list'} of more "
                                    f"than {max_items} entries", "too_large")
            if isinstance(v, dict):
                for k in v:
                    _leaf(k, check_strings)
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
        elif isinstance(v, str):
            _leaf(v, check_strings)
        elif check_ints and isinstance(v, int):
            _check_int(v)


def _leaf(s: str, check_strings: bool) -> None:
    if len(s) > MAX_TEXT:
        raise ProtocolError(f"string of {len(s)} characters (at most {MAX_TEXT})", "text")
    if check_strings:
        check_string(s)


def parse_header(raw: bytes | bytearray | memoryview | str, *, max_items: int = MAX_ITEMS) -> Any:
    """Parse JSON from the wire, held to the bounds above; ProtocolError for anything else."""
    data = bytes(raw) if not isinstance(raw, bytes | str) else raw
    try:
        value = json.loads(data, parse_float=_parse_float, parse_constant=_refuse_constant)
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError("value nested too deep to parse", "depth") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"not UTF-8 JSON: {exc}") from None
    except ValueError as exc:  # e.g. int() of an over-long integer
        raise ProtocolError(f"not a value the protocol carries: {exc}", "number") from None
    # Strict JSON refuses raw control characters, and bytes that are not UTF-8 fail to decode:
    # a NUL or a lone surrogate can only come from a \u escape.
    b = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    escaped, long_digits = b"\\u" in b, _LONG_DIGITS.search(b) is not None
    # A short header with no escapes, no long digit runs and few brackets cannot break a
    # bound: no string or list in it can be long, nor the nesting deep (the offload's and the
    # answer's case, on the hot path). Anything else is walked.
    if (escaped or long_digits or len(b) > min(MAX_TEXT, max_items)
            or b.count(b"[") + b.count(b"{") > MAX_DEPTH):
        _walk(value, escaped, max_items, long_digits)
    return value


# ---------------------------------------------------------------------------- typed fields


def text(h: dict[str, Any], key: str, max_len: int, *, optional: bool = False,
         empty: bool = False) -> str | None:
    """A string field of at most `max_len` characters (its column's length)."""
    v = h.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or (not v and not empty):
        raise ProtocolError(f"field {key!r} must be a {'' if empty else 'non-empty '}string",
                            "field")
    if len(v) > max_len:
        raise ProtocolError(f"field {key!r} has {len(v)} characters, at most {max_len}", "text")
    return check_string(v, f"field {key!r}")


def required_text(h: dict[str, Any], key: str, max_len: int) -> str:
    v = text(h, key, max_len)
    assert v is not None
    return v


def integer(h: dict[str, Any], key: str, lo: int = I32_MIN, hi: int = I32_MAX,
            *, default: int | None = None) -> int:
    """An integer field in [lo, hi] (a bool is not an integer here)."""
    v = h.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"field {key!r} must be an integer", "field")
    if not lo <= v <= hi:
        raise ProtocolError(f"field {key!r} = {v} is outside [{lo}, {hi}]", "number")
    return v


def number(h: dict[str, Any], key: str, lo: float = -math.inf, hi: float = math.inf,
           *, default: float | None = None) -> float:
    """A finite number field in [lo, hi] (an integer is a number; a bool is not)."""
    v = h.get(key, default)
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise ProtocolError(f"field {key!r} must be a number", "field")
    x = float(v)
    if not math.isfinite(x) or not lo <= x <= hi:
        raise ProtocolError(f"field {key!r} = {v!r} is not a finite number in [{lo:g}, {hi:g}]",
                            "number")
    return x


def finite(x: float, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """`x` as a float if finite and in [lo, hi]; for values already read from the wire."""
    x = float(x)
    if not math.isfinite(x) or not lo <= x <= hi:
        raise ProtocolError(f"{what} = {x!r} is not a finite number in [{lo:g}, {hi:g}]",
                            "number")
    return x


def short_validation(exc: ValidationError) -> str:
    """A pydantic error in one line: the first field and its message."""
    errs = exc.errors()
    first = errs[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc}: {first.get('msg')}{more}"
