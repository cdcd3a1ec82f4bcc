"""What an agent accepts as a model update: the refusal rules, as pure functions.

The rules follow The Update Framework and Uptane: trust comes only from pinned keys (the
fleet's bundle keys for manifests and rollback directives, the hub's key for assignments);
versions only go up unless a signed rollback directive says otherwise; nothing is accepted for
another device, for another runtime or hardware, past its expiry, or larger than the device's
limit. The download itself is held to the manifest's lengths and hashes (`download.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from edge_agent.errors import UpdateRefused
from fleet.contract.assignment import Assignment, check_rollback
from fleet.contract.bundle import Manifest
from fleet.contract.errors import BundleError
from fleet.contract.signing import PublicKey, SignatureError, verify_manifest


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    device: str
    hardware: tuple[str, ...]   # tags this device matches (e.g. "x86_64", "rpi4")
    runtimes: tuple[str, ...]   # backends the agent may run
    max_bundle_bytes: int


@dataclass(slots=True)
class TrustState:
    """What the agent has accepted so far (persisted with the update state)."""

    max_seq: int = 0
    # The highest version of each bundle name ever installed: the anti-rollback floor.
    highest: dict[str, int] = field(default_factory=dict)


def check_assignment(a: Assignment, *, running: Manifest, profile: DeviceProfile,
                     trusted: list[PublicKey], trust: TrustState,
                     now: datetime | None = None) -> Manifest | None:
    """The manifest to install, or None when the assignment names what already runs.

    Raises UpdateRefused with a code: device, replay, unsigned, unknown_key, bad_signature,
    manifest, expired, version, rollback, runtime, hardware, size, health_spec.
    The hub's signature on the assignment is checked when it is decoded.
    """
    now = now or datetime.now(UTC)
    if a.device != profile.device:
        raise UpdateRefused("device", f"assignment is for device {a.device!r}, "
                                      f"not {profile.device!r}")
    if a.seq < trust.max_seq:
        raise UpdateRefused("replay", f"assignment seq {a.seq} is older than the newest "
                                      f"accepted ({trust.max_seq}): a replayed assignment")
    try:
        verify_manifest(a.manifest, trusted)
    except SignatureError as exc:
        raise UpdateRefused(exc.code, f"bundle {a.ref}: {exc}") from None
    try:
        m = Manifest.from_dict(a.manifest)
    except BundleError as exc:
        raise UpdateRefused("manifest", f"bundle {a.ref}: {exc}") from None
    if m.expires is not None and m.expires <= now:
        raise UpdateRefused("expired", f"bundle {m.ref} expired at {m.expires.isoformat()}")
    if m.name == running.name and m.version == running.version:
        return None
    floor = max(trust.highest.get(m.name, 0),
                running.version if m.name == running.name else 0)
    if m.version <= floor:
        if a.rollback is None:
            raise UpdateRefused("version", f"bundle {m.ref} is not newer than version {floor} "
                                           "(a rollback needs a signed rollback directive)")
        if m.name != running.name:
            raise UpdateRefused("rollback", f"a rollback to {m.ref} must start from a running "
                                            f"{m.name}, not {running.ref}")
        try:
            check_rollback(a.rollback, trusted, m.name, running.version, m.version, now)
        except SignatureError as exc:
            raise UpdateRefused("rollback", str(exc)) from None
    if not set(m.runtimes) & set(profile.runtimes):
        raise UpdateRefused("runtime", f"bundle {m.ref} runs on {', '.join(m.runtimes)}; this "
                                       f"agent has {', '.join(profile.runtimes)}")
    if m.hardware and not set(m.hardware) & set(profile.hardware):
        raise UpdateRefused("hardware", f"bundle {m.ref} is for {', '.join(m.hardware)}; this "
                                        f"device is {', '.join(profile.hardware)}")
    if m.total_bytes > profile.max_bundle_bytes:
        raise UpdateRefused("size", f"bundle {m.ref} has {m.total_bytes} bytes, more than this "
                                    f"device's limit of {profile.max_bundle_bytes}")
    if m.health is None:
        raise UpdateRefused("health_spec", f"bundle {m.ref} has no health check (golden input "
                                           "and latency budget): rebuild it with one")
    return m
