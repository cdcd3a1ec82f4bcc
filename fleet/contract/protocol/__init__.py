"""The wire contract between agents and hub, one owner for each concern:

    topics.py     topics, channels, QoS, who publishes what, names
    frames.py     the frame envelope (versions 1 and 2) and its codec; zdict.py its dictionary
    bounds.py     what any inbound value may be, and the typed field readers
    tensors.py    tensors as raw bytes with dtype and shape
    messages.py   offloads, answers, acks, status, telemetry
    batches.py    batch frames of separately decodable items
    results.py    result records and their batches (version 2: columns)
    hard.py       hard examples for a late answer

Nothing else spells a topic string or a frame layout; every name is re-exported here, so the
daemons write `from fleet.contract import protocol as p` and `p.Offload`. Every inbound
payload is decoded by one of these decoders, which hold each field to its bounds (lengths,
valid UTF-8 without NUL, integer ranges, finite numbers, nesting depth) and raise
ProtocolError, whose `reason` names the fault for the refusal counters.
"""

from fleet.contract.protocol.batches import decode_each, decode_items, encode_items
from fleet.contract.protocol.bounds import (
    I32_MAX,
    I32_MIN,
    I64_MAX,
    I64_MIN,
    MAX_DEPTH,
    MAX_MS,
    MAX_TEXT,
    MAX_TS,
    check_string,
    parse_header,
)
from fleet.contract.protocol.frames import (
    CODEC_NONE,
    CODEC_ZLIB,
    CODEC_ZLIB_DICT,
    COMPRESS_TENSOR_MAX,
    MAGIC,
    MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Frame,
    Kind,
    decode_frame,
    encode_frame,
    frame_version,
)
from fleet.contract.protocol.hard import HardExample, HardReason, encode_hard_batch
from fleet.contract.protocol.messages import (
    MAX_BACKEND,
    MAX_ID,
    MAX_MODEL_REF,
    MAX_REASON,
    Ack,
    Answer,
    Offload,
    Status,
    Telemetry,
    encode_json,
    figure,
    short_text,
    status_payload,
)
from fleet.contract.protocol.results import (
    COLUMNS_MIN_RECORDS,
    MAX_INPUT_REF,
    NO_STRING,
    ResultBatch,
    ResultRecord,
    Source,
    encode_record,
    record_blob,
)
from fleet.contract.protocol.tensors import (
    MAX_TENSOR_DIMS,
    WIRE_DTYPES,
    decode_tensor,
    narrow,
    tensor_bytes,
    tensor_header,
)
from fleet.contract.protocol.topics import (
    CHANNEL_MAX_BYTES,
    FROM_DEVICE,
    HUB_SHARE_GROUP,
    HUB_TOPIC_ROOT,
    NAME_PATTERN,
    QOS,
    TO_DEVICE,
    TOPIC_ROOT,
    Channel,
    check_device_id,
    hub_filter,
    hub_heartbeat_topic,
    parse_topic,
    topic,
)
from fleet.contract.protocol.zdict import ZDICT

__all__ = [
    "CHANNEL_MAX_BYTES", "CODEC_NONE", "CODEC_ZLIB", "CODEC_ZLIB_DICT", "COLUMNS_MIN_RECORDS",
    "COMPRESS_TENSOR_MAX", "FROM_DEVICE", "HUB_SHARE_GROUP", "HUB_TOPIC_ROOT", "I32_MAX",
    "I32_MIN", "I64_MAX", "I64_MIN", "MAGIC", "MAX_BACKEND", "MAX_DEPTH", "MAX_FRAME_BYTES",
    "MAX_HEADER_BYTES", "MAX_ID", "MAX_INPUT_REF", "MAX_MODEL_REF", "MAX_MS", "MAX_REASON",
    "MAX_TENSOR_DIMS", "MAX_TEXT", "MAX_TS", "NAME_PATTERN", "NO_STRING", "PROTOCOL_VERSION",
    "QOS", "SUPPORTED_VERSIONS", "TOPIC_ROOT", "TO_DEVICE", "WIRE_DTYPES", "ZDICT", "Ack",
    "Answer", "Channel", "Frame", "HardExample", "HardReason", "Kind", "Offload", "ResultBatch",
    "ResultRecord", "Source", "Status", "Telemetry", "check_device_id", "check_string",
    "decode_each", "decode_frame", "decode_items", "decode_tensor", "encode_frame",
    "encode_hard_batch", "encode_items", "encode_json", "encode_record", "figure",
    "frame_version", "hub_filter", "hub_heartbeat_topic", "narrow", "parse_header",
    "parse_topic", "record_blob", "short_text", "status_payload", "tensor_bytes",
    "tensor_header", "topic",
]
