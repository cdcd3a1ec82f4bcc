"""Desired and reported model state: the one owner of these documents' keys.

Desired (hub -> agent, retained on `ehi/v1/{d}/desired`): an *assignment*, signed by the hub's
own key, binding one device to one signed bundle manifest:

    {"type": "assignment", "device": ..., "seq": 7, "issued_at": 1.7e9,
     "manifest": {...the bundle's manifest with the fleet key's signature...},
     "rollback": null | {...a rollback directive...}, "signatures": [{hub key}]}

`seq` grows by one with each assignment the hub issues to that device; an agent refuses one
whose `seq` is below the highest it has accepted (a replayed old assignment).

A *rollback directive*, signed offline by a fleet key like a bundle, allows devices running
version `from_version` of bundle `name` to install the older `to_version`:

    {"type": "rollback", "name": ..., "from_version": 3, "to_version": 2,
     "expires": "2027-01-01T00:00:00+00:00", "signatures": [{fleet key}]}

Reported (agent -> hub, retained on `ehi/v1/{d}/reported`): the model the device runs, the
update state, the target being installed and the last error with a machine-readable code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from fleet import protocol as p
from fleet.bundle import Manifest, parse_time
from fleet.errors import BundleError, ProtocolError
from fleet.signing import PrivateKey, PublicKey, SignatureError, verify_manifest

ASSIGNMENT = "assignment"
ROLLBACK = "rollback"


class UpdateState(StrEnum):
    IDLE = "idle"                # running its model, nothing to do
    DOWNLOADING = "downloading"  # fetching the assigned bundle into the staging slot
    VERIFYING = "verifying"      # checking the staged files against the signed manifest
    CHECKING = "checking"        # health check: loads, golden output, latency
    ACTIVATING = "activating"    # switching the current pointer to the staged slot
    REFUSED = "refused"          # the assignment broke a rule (signature, version, device...)
    FAILED = "failed"            # download, verification or health check failed: old model kept
    REVERTED = "reverted"        # went back to the previous model


@dataclass(frozen=True, slots=True)
class Assignment:
    device: str
    seq: int
    issued_at: float
    manifest: dict[str, Any]
    rollback: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return str(self.manifest.get("name"))

    @property
    def version(self) -> int:
        v = self.manifest.get("version")
        return v if isinstance(v, int) else -1

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def document(self) -> dict[str, Any]:
        return {"type": ASSIGNMENT, "device": self.device, "seq": self.seq,
                "issued_at": self.issued_at, "manifest": self.manifest,
                "rollback": self.rollback}


def encode_desired(assignment: Assignment, hub_key: PrivateKey) -> bytes:
    return p.encode_json(p.Kind.DESIRED, hub_key.sign(assignment.document()))


def decode_desired(payload: bytes, hub_keys: list[PublicKey]) -> Assignment:
    """The assignment in a desired-state message, its hub signature checked.

    Raises ProtocolError for a malformed message, SignatureError for a bad signature."""
    d = p.decode_frame(payload, p.Kind.DESIRED).header
    if d.get("type") != ASSIGNMENT:
        raise ProtocolError(f"desired state of type {d.get('type')!r}, expected {ASSIGNMENT!r}")
    try:
        verify_manifest(d, hub_keys)
    except SignatureError as exc:
        raise SignatureError(f"assignment signature: {exc}", "assignment_signature") from None
    seq, issued, manifest = d.get("seq"), d.get("issued_at"), d.get("manifest")
    if (not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(issued, int | float)
            or not isinstance(manifest, dict) or not isinstance(d.get("device"), str)):
        raise ProtocolError("assignment needs device, seq (int), issued_at and manifest")
    rollback = d.get("rollback")
    if rollback is not None and not isinstance(rollback, dict):
        raise ProtocolError("assignment's rollback must be an object or null")
    return Assignment(d["device"], seq, float(issued), manifest, rollback)


def rollback_directive(name: str, from_version: int, to_version: int, expires: datetime,
                       key: PrivateKey) -> dict[str, Any]:
    if to_version >= from_version:
        raise BundleError("a rollback goes to an older version")
    return key.sign({"type": ROLLBACK, "name": name, "from_version": from_version,
                     "to_version": to_version, "expires": expires.isoformat()})


def check_rollback(directive: dict[str, Any], trusted: list[PublicKey], name: str,
                   from_version: int, to_version: int, now: datetime | None = None) -> None:
    """Raise SignatureError unless `directive` is a valid, trusted rollback from
    `name@from_version` to `name@to_version`."""
    if directive.get("type") != ROLLBACK:
        raise SignatureError("not a rollback directive", "rollback")
    try:
        verify_manifest(directive, trusted)
    except SignatureError as exc:
        raise SignatureError(f"rollback directive: {exc}", "rollback") from None
    if (directive.get("name"), directive.get("from_version"), directive.get("to_version")) != (
            name, from_version, to_version):
        raise SignatureError(
            f"the rollback directive allows {directive.get('name')}@"
            f"{directive.get('from_version')} -> {directive.get('to_version')}, "
            f"not {name}@{from_version} -> {to_version}", "rollback")
    try:
        expires = parse_time(directive.get("expires"))
    except BundleError as exc:
        raise SignatureError(f"rollback directive: {exc}", "rollback") from None
    if expires <= (now or datetime.now(UTC)):
        raise SignatureError(f"the rollback directive expired at {expires.isoformat()}",
                             "rollback")


@dataclass(frozen=True, slots=True)
class Reported:
    device: str
    model: str                 # name@version it runs
    state: UpdateState
    target: str | None = None  # name@version being installed, or refused/failed
    error: str | None = None
    code: str | None = None    # e.g. "signature", "version", "hardware", "health", "download"
    seq: int = 0               # the assignment this report answers
    ts: float = 0.0

    def encode(self) -> bytes:
        return p.encode_json(p.Kind.REPORTED, {
            "device": self.device, "model": self.model, "state": self.state.value,
            "target": self.target, "error": self.error, "code": self.code, "seq": self.seq,
            "ts": self.ts or time.time()})

    @classmethod
    def decode(cls, payload: bytes) -> Reported:
        h = p.decode_frame(payload, p.Kind.REPORTED).header
        try:
            state = UpdateState(str(h.get("state")))
        except ValueError:
            raise ProtocolError(f"unknown update state {h.get('state')!r}") from None
        model, device = h.get("model"), h.get("device")
        if not isinstance(model, str) or not isinstance(device, str):
            raise ProtocolError("reported state needs 'device' and 'model' strings")
        seq, ts = h.get("seq", 0), h.get("ts", 0.0)
        return cls(device, model, state, _opt(h, "target"), _opt(h, "error"), _opt(h, "code"),
                   seq if isinstance(seq, int) else 0,
                   float(ts) if isinstance(ts, int | float) else 0.0)


def _opt(h: dict[str, Any], key: str) -> str | None:
    v = h.get(key)
    return None if v is None else str(v)


def manifest_of(assignment: Assignment) -> Manifest:
    """The parsed manifest of an assignment (BundleError if it is malformed)."""
    return Manifest.from_dict(assignment.manifest)
