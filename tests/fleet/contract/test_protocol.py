import json
import struct
from typing import Any

import numpy as np
import pytest

from fleet.contract import protocol as p
from fleet.contract.errors import ProtocolError, UnsupportedVersion


def _offload(x: np.ndarray | None = None) -> p.Offload:
    x = np.arange(64, dtype=np.float32).reshape(8, 8) if x is None else x
    return p.Offload(id="abc", model="digits-edge@1", input=x, deadline_ms=50.0, sent_at=1.5,
                     edge_label=3, edge_score=0.4)


def test_offload_roundtrip_keeps_tensor_bytes() -> None:
    o = _offload()
    back = p.Offload.decode(o.encode(1))
    assert back.id == "abc" and back.edge_label == 3 and back.deadline_ms == 50.0
    assert back.input.dtype == np.float32 and back.input.shape == (8, 8)
    np.testing.assert_array_equal(back.input, o.input)


def test_version_2_sends_integral_floats_as_bytes_and_keeps_other_floats() -> None:
    o = _offload()
    v2 = o.encode(2)
    back = p.Offload.decode(v2)
    assert back.input.dtype == np.uint8 and back.input.shape == (8, 8)
    np.testing.assert_array_equal(back.input, o.input)  # the same values
    assert len(v2) < len(o.encode(1)) - 150
    x = np.arange(64, dtype=np.float32).reshape(8, 8) + 0.5
    back = p.Offload.decode(_offload(x).encode(2))
    assert back.input.dtype == np.float32
    np.testing.assert_array_equal(back.input, x)
    big = np.full((8, 8), 256.0, np.float32)
    assert p.Offload.decode(_offload(big).encode(2)).input.dtype == np.float32


def _blobs(n: int, **over: Any) -> tuple[list[str], list[bytes]]:
    ids, blobs = [], []
    for i in range(n):
        off = i % 4 == 0
        fields: dict[str, Any] = dict(
            id=f"0123456789abcdef{i:x}", device="dev-1", seq=i, ts=1.7e9 + i * 0.01,
            input_ref=f"ref-{i}" if i % 2 else None, model="digits-edge@1",
            backend="onnxruntime", policy="max_prob", score=0.25 + i / 1000,
            edge_label=i % 10, edge_confidence=0.5, offloaded=off,
            cloud_label=(i + 1) % 10 if off else None,
            cloud_model="digits-cloud@1" if off else None, final_label=i % 10,
            source="cloud" if off else "edge", degraded=False, latency_ms=1.0 + i / 7,
            edge_ms=0.05, offload_bytes=120 if off else 0)
        fields.update({k: v(i) if callable(v) else v for k, v in over.items()})
        ids.append(fields["id"])
        blobs.append(p.encode_record(**fields))
    return ids, blobs


def test_version_2_results_are_columns_a_tenth_the_size_with_the_same_records() -> None:
    ids, blobs = _blobs(100)
    v1 = p.ResultBatch(ids, blobs).encode(1)
    v2 = p.ResultBatch(ids, blobs).encode(2)
    assert p.frame_version(v1) == 1 and p.frame_version(v2) == 2
    assert len(v2) * 10 < len(v1)
    a, bad1 = p.ResultBatch.decode_lenient(v1)
    b, bad2 = p.ResultBatch.decode_lenient(v2)
    assert bad1 == bad2 == {}
    for r1, r2 in zip(a, b, strict=True):
        d1, d2 = r1.model_dump(), r2.model_dump()
        for k in ("score", "edge_confidence", "latency_ms", "edge_ms"):  # float32 on the wire
            assert d2.pop(k) == pytest.approx(d1.pop(k), rel=1e-6)
        assert d1 == d2


def test_version_2_refuses_bad_records_by_id_and_keeps_the_others() -> None:
    ids, blobs = _blobs(10, latency_ms=lambda i: -1.0 if i == 1 else 1.0,
                        ts=lambda i: float("inf") if i == 2 else 1.7e9,
                        source=lambda i: "edge")
    blobs[3] = blobs[3].replace(b'"policy":"max_prob"', b'"policy":"' + b"p" * 40 + b'"')
    good, bad = p.ResultBatch.decode_lenient(p.ResultBatch(ids, blobs).encode(2))
    assert set(bad) == {ids[1], ids[2], ids[3]}
    assert "latency_ms" in bad[ids[1]] and "ts" in bad[ids[2]] and "policy" in bad[ids[3]]
    assert [r.id for r in good] == [ids[0], *ids[4:]]


def test_version_2_frames_that_lie_are_refused() -> None:
    import zlib

    bomb = b"EH\x02\x03\x01" + zlib.compress(b"\0" * (p.MAX_FRAME_BYTES + 10))
    with pytest.raises(ProtocolError, match="decompresses to more than"):
        p.decode_frame(bomb)
    with pytest.raises(ProtocolError, match="truncated"):
        p.decode_frame(b"EH\x02\x03\x01" + zlib.compress(b"\0\0\0\x02{}" + b"x" * 1000)[:-6])
    with pytest.raises(ProtocolError, match="header of"):  # refused before it is inflated
        p.decode_frame(b"EH\x02\x01\x01" + zlib.compress(b"\0\1\0\0" + b" " * 70_000))
    with pytest.raises(ProtocolError, match="codec"):
        p.decode_frame(b"EH\x02\x03\x07" + b"\0" * 8)
    ids, blobs = _blobs(10)
    f = p.decode_frame(p.ResultBatch(ids, blobs).encode(2))
    short = p.encode_frame(p.Kind.RESULTS, f.header, f.body[:-1], 2)
    with pytest.raises(ProtocolError, match="bytes of columns"):
        p.ResultBatch.decode_lenient(short)
    wrong = p.encode_frame(p.Kind.RESULTS, {**f.header, "columns": [["seq", "<f8"]]}, f.body, 2)
    with pytest.raises(ProtocolError, match="columns"):
        p.ResultBatch.decode_lenient(wrong)


def test_version_2_small_batches_travel_as_compressed_items() -> None:
    ids, blobs = _blobs(3)
    v2 = p.ResultBatch(ids, blobs).encode(2)
    assert p.frame_version(v2) == 2 and "columns" not in p.decode_frame(v2).header
    assert len(v2) < len(p.ResultBatch(ids, blobs).encode(1)) / 3
    good, bad = p.ResultBatch.decode_lenient(v2)
    assert bad == {} and [r.id for r in good] == ids


def test_acks_of_counter_ids_compress_to_a_few_bytes_each() -> None:
    ids = [f"0123456789abcdef{i:x}" for i in range(100)]
    assert len(p.Ack(ids).encode(2)) < 5 * 100
    assert p.Ack.decode(p.Ack(ids).encode(2)).ids == ids
    assert p.Ack.decode(p.Ack(ids).encode(1)).ids == ids


def test_offload_is_binary_not_json_floats() -> None:
    payload = _offload().encode()
    # 64 float32 values travel as 256 raw bytes, not as JSON text.
    assert len(payload) < 256 + 300
    assert b"[0.0," not in payload


@pytest.mark.parametrize("dtype", ["uint8", "int64", "float16", "float64"])
def test_tensor_dtypes_roundtrip(dtype: str) -> None:
    x = (np.arange(12) % 7).astype(dtype).reshape(3, 4)
    np.testing.assert_array_equal(p.Offload.decode(_offload(x).encode()).input, x)


def test_answer_ack_results_roundtrip() -> None:
    a = p.Answer("i1", 7, 0.9, "digits-cloud@1", hub_ms=1.2)
    assert p.Answer.decode(a.encode()) == a
    ack = p.Ack(["a", "b"], {"c": "bad"})
    assert p.Ack.decode(ack.encode()) == ack
    rec = p.ResultRecord(id="r1", device="d1", seq=0, ts=1.0, model="m@1", backend="onnxruntime",
                         policy="entropy", score=0.1, edge_label=1, edge_confidence=0.9,
                         offloaded=False, final_label=1, source="edge", latency_ms=0.3,
                         edge_ms=0.2)
    good, bad = p.ResultBatch.decode_lenient(p.ResultBatch.of([rec]).encode())
    assert good == [rec] and bad == {}
    hard = p.Ack(["h1"], of="hard")
    assert p.Ack.decode(hard.encode()) == hard
    assert p.Ack.decode(p.encode_frame(p.Kind.ACK, {"ids": ["x"]})).of == "results"
    with pytest.raises(ProtocolError, match="ack of"):
        p.Ack.decode(p.encode_frame(p.Kind.ACK, {"ids": [], "of": "nope"}))


@pytest.mark.parametrize("payload, message", [
    (b"", "shorter"),
    (b"XX\x01\x01\x00\x00\x00\x00", "does not start"),
    (b"EH\x01\x63\x00\x00\x00\x00", "unknown message kind"),
    (b"EH\x01\x01\x00\x00\x00\x50{}", "does not fit"),
    (b"EH\x01\x01\x00\x00\x00\x03{x}", "not UTF-8 JSON"),
    (b"EH\x01\x01\x00\x00\x00\x02[]", "JSON object"),
])
def test_malformed_frames_are_refused_clearly(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        p.decode_frame(payload)


def test_unknown_version_is_its_own_error() -> None:
    payload = bytearray(_offload().encode())
    payload[2] = 9
    with pytest.raises(UnsupportedVersion, match="version 9"):
        p.Offload.decode(bytes(payload))


def test_wrong_kind_is_refused() -> None:
    with pytest.raises(ProtocolError, match="expected a ANSWER"):
        p.Answer.decode(_offload().encode())


def test_tensor_bytes_must_match_shape() -> None:
    o = _offload().encode(1)
    with pytest.raises(ProtocolError, match="needs 256 bytes"):
        p.Offload.decode(o[:-4])
    header = p.encode_frame(p.Kind.OFFLOAD, {"id": "x", "model": "m", "deadline_ms": 1,
                                             "sent_at": 0, "edge_label": 0, "edge_score": 0,
                                             "tensor": {"dtype": "object", "shape": [1]}}, b"x")
    with pytest.raises(ProtocolError, match="dtype 'object'"):
        p.Offload.decode(header)


def test_offload_missing_field() -> None:
    payload = p.encode_frame(p.Kind.OFFLOAD, {"id": "x", "tensor": {"dtype": "uint8",
                                                                    "shape": [1]}}, b"\x01")
    with pytest.raises(ProtocolError, match="model"):
        p.Offload.decode(payload)


def test_oversized_frame_refused_before_parsing() -> None:
    big = struct.pack(">2sBBI", b"EH", 1, 1, 2) + b"{}" + bytes(p.MAX_FRAME_BYTES)
    with pytest.raises(ProtocolError, match="exceeds"):
        p.decode_frame(big)


def test_results_batch_keeps_good_records_and_names_bad_ones() -> None:
    ok = {"id": "r1", "device": "d", "seq": 0, "ts": 1.0, "model": "m", "backend": "b",
          "policy": "p", "score": 0.0, "edge_label": 1, "edge_confidence": 1.0,
          "offloaded": False, "final_label": 1, "source": "edge", "latency_ms": 1.0,
          "edge_ms": 1.0}
    bad = {**ok, "id": "r2", "latency_ms": -5}
    blobs = [json.dumps(ok).encode(), json.dumps(bad).encode(), b"\x00not a record",
             json.dumps({**ok, "id": "r9"}).encode(), json.dumps({**ok, "id": "r5"}).encode()]
    payload = p.ResultBatch(["r1", "r2", "r3", "r4", "r5"], blobs).encode()
    good, refused = p.ResultBatch.decode_lenient(payload)
    assert [r.id for r in good] == ["r1", "r5"]  # the bad ones do not hide those after them
    assert set(refused) == {"r2", "r3", "r4"}
    assert "latency_ms" in refused["r2"] and "differs" in refused["r4"]


@pytest.mark.parametrize("header, body, message", [
    ({"ids": ["a"], "sizes": [3]}, b"ab", "add up"),
    ({"ids": ["a"], "sizes": []}, b"", "same length"),
    ({"ids": [""], "sizes": [0]}, b"", "1-64"),
    ({"ids": ["a"], "sizes": [-1]}, b"", "non-negative"),
    ({"records": []}, b"", "ids"),
])
def test_malformed_batches_are_refused(header: dict, body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        p.ResultBatch.decode_lenient(p.encode_frame(p.Kind.RESULTS, header, body))


def test_hard_examples_roundtrip_and_bad_items_are_named() -> None:
    x = np.arange(64, dtype=np.float32).reshape(8, 8)
    ex = p.HardExample("h1", "digits-edge@1", x, 12.5, 3, 0.25, "offline")
    blob = ex.blob()
    good, bad = p.HardExample.decode_batch(p.encode_hard_batch(
        ["h1", "h2", "h3", "h4"], [blob, blob[:10], b"\x00\x00\x00\x02{}", blob]))
    assert len(good) == 1 and good[0].id == "h1" and good[0].reason == "offline"
    np.testing.assert_array_equal(good[0].input, x)
    assert set(bad) == {"h2", "h3", "h4"} and "differs" in bad["h4"]


def test_topics() -> None:
    assert p.topic("dev-1", p.Channel.OFFLOAD) == "ehi/v1/dev-1/offload"
    assert p.parse_topic("ehi/v1/dev-1/ack") == ("dev-1", p.Channel.ACK)
    assert p.hub_filter(p.Channel.RESULTS) == "$share/hub/ehi/v1/+/results"
    for bad in ("ehi/v1/dev-1", "ehi/v2/d/ack", "ehi/v1/d/nope", "ehi/v1/a b/ack"):
        with pytest.raises(ProtocolError):
            p.parse_topic(bad)
    with pytest.raises(ProtocolError):
        p.topic("has/slash", p.Channel.ACK)


@pytest.mark.parametrize("kw", [
    {},
    {"input_ref": 'cam "1"/é', "cloud_label": 3, "cloud_model": "digits-cloud@1",
     "source": "cloud", "offloaded": True, "degraded": False},
    {"source": "edge_fallback", "degraded": True, "offloaded": True, "score": 1e-7,
     "ts": 1.7e9 + 0.123456},
])
def test_hand_written_record_encoder_matches_the_model(kw: dict) -> None:
    fields: dict[str, Any] = dict(id="r1", device="d-1", seq=7, ts=1.5, input_ref=None, model="m@1",
                  backend="onnxruntime", policy="entropy", score=0.25, edge_label=1,
                  edge_confidence=0.9, offloaded=False, cloud_label=None, cloud_model=None,
                  final_label=1, source="edge", degraded=False, latency_ms=0.3, edge_ms=0.1,
                  offload_bytes=0)
    fields.update(kw)
    blob = p.encode_record(**fields)
    assert p.ResultRecord.model_validate_json(blob) == p.ResultRecord(**fields)
    assert json.loads(blob) == json.loads(p.record_blob(p.ResultRecord(**fields)))
    assert set(json.loads(blob)) == set(p.ResultRecord.model_fields)


def test_a_record_with_a_non_finite_number_is_refused_by_id() -> None:
    fields: dict[str, Any] = dict(id="r1", device="d", seq=0, ts=1.0, input_ref=None, model="m",
                  backend="b", policy="p", score=float("nan"), edge_label=1,
                  edge_confidence=1.0, offloaded=False, cloud_label=None, cloud_model=None,
                  final_label=1, source="edge", degraded=False, latency_ms=1.0, edge_ms=1.0,
                  offload_bytes=0)
    good, bad = p.ResultBatch.decode_lenient(p.ResultBatch(["r1"], [p.encode_record(**fields)])
                                             .encode())
    assert good == [] and "score" in bad["r1"]


@pytest.mark.parametrize("device", [".", "..", "-x", ".hidden", "a/b", "a+b", "#", "", "x" * 65])
def test_device_ids_that_a_path_or_a_topic_could_misread_are_refused(device: str) -> None:
    with pytest.raises(ProtocolError, match="device id"):
        p.topic(device, p.Channel.RESULTS)
    assert p.topic("cam-1.front_2", p.Channel.RESULTS) == "ehi/v1/cam-1.front_2/results"
