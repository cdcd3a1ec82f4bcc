"""Whatever a device sends, each channel's decoder either returns a message within the
protocol's bounds or raises ProtocolError with a reason: never another exception (which would
reach a hub worker), never a value the hub's database cannot hold."""

from __future__ import annotations

import math
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.contract import protocol as p
from fleet.contract.assignment import Reported
from fleet.contract.errors import ProtocolError
from fleet.lab.hostile_messages import CHANNELS, hostile, valid

DECODERS: dict[p.Channel, Any] = {
    p.Channel.OFFLOAD: p.Offload.decode, p.Channel.RESULTS: p.ResultBatch.decode_lenient,
    p.Channel.HARD: p.HardExample.decode_batch, p.Channel.TELEMETRY: p.Telemetry.decode,
    p.Channel.STATUS: p.Status.decode, p.Channel.REPORTED: Reported.decode}
REASONS = {"malformed", "version", "depth", "text", "number", "field", "too_large"}


def _storable_text(s: Any, limit: int) -> bool:
    return isinstance(s, str) and len(s) <= limit and "\x00" not in s and \
        s.encode("utf-8", "surrogatepass").decode("utf-8", "replace") == s


def _check_within_bounds(channel: p.Channel, out: Any) -> None:
    if channel is p.Channel.RESULTS:
        good, bad = out
        for r in good:
            for name, limit in (("id", 64), ("device", 64), ("model", 128), ("backend", 32),
                                ("policy", 32)):
                assert _storable_text(getattr(r, name), limit), (name, getattr(r, name))
            assert r.input_ref is None or _storable_text(r.input_ref, p.MAX_INPUT_REF)
            assert all(math.isfinite(getattr(r, f)) for f in
                       ("ts", "score", "edge_confidence", "latency_ms", "edge_ms"))
            assert p.I32_MIN <= r.edge_label <= p.I32_MAX and 0 <= r.seq <= p.I64_MAX
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in bad.items())
    elif channel is p.Channel.HARD:
        for ex in out[0]:
            assert _storable_text(ex.id, 64) and _storable_text(ex.model, 128)
            assert math.isfinite(ex.ts) and math.isfinite(ex.edge_score)
    elif channel is p.Channel.OFFLOAD:
        assert math.isfinite(out.deadline_ms) and math.isfinite(out.edge_score)
        assert _storable_text(out.id, 64)
    elif channel is p.Channel.TELEMETRY:
        assert out.model is None or _storable_text(out.model, 128)
        assert out.backend is None or _storable_text(out.backend, 32)
    elif channel is p.Channel.REPORTED:
        assert _storable_text(out.model, 128) and 0 <= out.seq <= p.I64_MAX
        assert out.error is None or len(out.error) <= 1024


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_hostile_messages_decode_within_bounds_or_are_refused(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(10):
        channel, payload, how = hostile("dev-x", rng)
        try:
            out = DECODERS[channel](payload)
        except ProtocolError as exc:
            assert exc.reason in REASONS, (how, exc.reason)
            continue
        _check_within_bounds(channel, out)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), version=st.sampled_from(p.SUPPORTED_VERSIONS))
def test_valid_messages_of_every_channel_decode(seed: int, version: int) -> None:
    rng = random.Random(seed)
    for channel in CHANNELS:
        out = DECODERS[channel](valid(channel, "dev-x", rng, version).payload())
        if channel in (p.Channel.RESULTS, p.Channel.HARD):
            assert out[0] and not out[1], out[1]
        _check_within_bounds(channel, out)
