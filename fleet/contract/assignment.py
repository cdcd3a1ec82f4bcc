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

The assignment may also carry `"offload": {"mode": "budget", "target": 0.15,
"max_bytes_per_s": null}`: how the hub wants the device to offload (`OffloadTarget`).

Reported (agent -> hub, retained on `ehi/v1/{d}/reported`): the model the device runs, the
update state, the target being installed, the last error with a machine-readable code, and
the fidelity figures of the running model on its backend.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from fleet.contract import protocol as p
from fleet.contract.bundle import parse_time
from fleet.contract.errors import BundleError, ProtocolError
from fleet.contract.protocol.bounds import integer, number, required_text, text
from fleet.contract.signing import PrivateKey, PublicKey, SignatureError, verify_manifest

ASSIGNMENT = "assignment"
# The longest error text a report keeps (the hub's column).
MAX_ERROR = 1024
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


OFFLOAD_MODES = ("threshold", "budget")


@dataclass(frozen=True, slots=True)
class OffloadTarget:
    """How the hub wants a device to offload: a fixed threshold, or a budget (a target share of
    its inputs, optionally capped in bytes per second) that the device's controller keeps.
    `target` None means the bundle's own offload budget."""

    mode: str
    target: float | None = None
    max_bytes_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "target": self.target,
                "max_bytes_per_s": self.max_bytes_per_s}

    @classmethod
    def from_dict(cls, d: Any) -> OffloadTarget:
        """Raises ProtocolError for anything but a valid offload setting."""
        if not isinstance(d, dict):
            raise ProtocolError("offload setting must be an object")
        mode, target, cap = d.get("mode"), d.get("target"), d.get("max_bytes_per_s")
        if mode not in OFFLOAD_MODES:
            raise ProtocolError(f"offload mode {mode!r} is not one of {list(OFFLOAD_MODES)}")
        for name, v in (("target", target), ("max_bytes_per_s", cap)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                                  or not math.isfinite(v) or v <= 0):
                raise ProtocolError(f"offload {name} must be a positive number or null")
        if target is not None and target >= 1:
            raise ProtocolError(f"offload target {target} must be below 1 (a share of inputs)")
        return cls(str(mode), None if target is None else float(target),
                   None if cap is None else float(cap))


@dataclass(frozen=True, slots=True)
class Assignment:
    device: str
    seq: int
    issued_at: float
    manifest: dict[str, Any]
    rollback: dict[str, Any] | None = None
    # The offload setting the hub wants for this device; None: the device's own settings.
    offload: OffloadTarget | None = None

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
        d = {"type": ASSIGNMENT, "device": self.device, "seq": self.seq,
             "issued_at": self.issued_at, "manifest": self.manifest, "rollback": self.rollback}
        if self.offload is not None:
            d["offload"] = self.offload.to_dict()
        return d


def encode_desired(assignment: Assignment, hub_key: PrivateKey, version: int = 1) -> bytes:
    """The signed assignment as a retained message, in `version` (the device's: version 1
    for a device the hub has not heard speak a newer one)."""
    return p.encode_json(p.Kind.DESIRED, hub_key.sign(assignment.document()), version)


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
    offload = d.get("offload")
    return Assignment(d["device"], seq, float(issued), manifest, rollback,
                      None if offload is None else OffloadTarget.from_dict(offload))


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
    # The fidelity check of the running model on its serving backend (fleet/inference/fidelity.py:
    # agreement, floor, offload at the manifest threshold, calibrated threshold, CPU), with
    # the backends refused and why under "refused".
    fidelity: dict[str, Any] | None = None

    def encode(self, version: int = 1) -> bytes:
        d: dict[str, Any] = {"device": self.device, "model": self.model, "state": self.state.value,
             "target": self.target, "error": self.error, "code": self.code, "seq": self.seq,
             "ts": self.ts or time.time()}
        if self.fidelity is not None:
            d["fidelity"] = self.fidelity
        return p.encode_json(p.Kind.REPORTED, d, version)

    @classmethod
    def decode(cls, payload: bytes) -> Reported:
        """Every field held to what the hub's columns keep (an over-long error text is cut,
        not refused: it is for people)."""
        h = p.decode_frame(payload, p.Kind.REPORTED).header
        try:
            state = UpdateState(str(h.get("state"))[:16])
        except ValueError:
            raise ProtocolError(f"unknown update state {str(h.get('state'))[:20]!r}",
                                "field") from None
        fidelity = h.get("fidelity")
        error = h.get("error")
        return cls(required_text(h, "device", 64), required_text(h, "model", p.MAX_MODEL_REF),
                   state, text(h, "target", p.MAX_MODEL_REF, optional=True),
                   None if error is None else str(error)[:MAX_ERROR],
                   text(h, "code", 32, optional=True),
                   integer(h, "seq", 0, p.I64_MAX, default=0),
                   number(h, "ts", 0.0, p.MAX_TS, default=0.0),
                   fidelity if isinstance(fidelity, dict) else None)
