"""Every refusal rule of an agent's updater, one by one, and the documents they rest on."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import UpdateRefused
from edge_agent.update_rules import DeviceProfile, TrustState, check_assignment
from fleet.contract.assignment import (
    Assignment,
    Reported,
    UpdateState,
    check_rollback,
    decode_desired,
    encode_desired,
    rollback_directive,
)
from fleet.contract.bundle import MANIFEST_NAME, Manifest, canonical_json, load_bundle
from fleet.contract.errors import ProtocolError
from fleet.contract.signing import PrivateKey, SignatureError, generate_keys
from models import DEMO_KEY, EDGE_BUNDLE
from tests.updates import UpdateKit

PROFILE = DeviceProfile("dev-1", ("x86_64",), ("onnxruntime", "openvino"), 10 << 20)


def _manifest(bundle: Path) -> dict[str, Any]:
    d: dict[str, Any] = json.loads((bundle / MANIFEST_NAME).read_text())
    return d


def _check(kit: UpdateKit, bundle: Path, *, running: int = 1, seq: int = 5,
           trust: TrustState | None = None, rollback: dict[str, Any] | None = None,
           profile: DeviceProfile = PROFILE, device: str = "dev-1") -> Manifest | None:
    run = load_bundle(kit.version(running)).manifest
    a = Assignment(device, seq, time.time(), _manifest(bundle), rollback)
    return check_assignment(a, running=run, profile=profile, trusted=[kit.pub],
                            trust=trust or TrustState())


def _refused(code: str, fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(UpdateRefused) as ei:
        fn(*args, **kw)
    assert ei.value.code == code, str(ei.value)
    return str(ei.value)


def test_a_newer_signed_compatible_bundle_is_accepted(kit: UpdateKit) -> None:
    m = _check(kit, kit.version(2))
    assert m is not None and m.ref == "digits-edge@2" and m.health is not None


def test_the_running_version_is_nothing_to_do(kit: UpdateKit) -> None:
    assert _check(kit, kit.version(3), running=3) is None


def test_unsigned_unknown_key_and_altered_are_refused(kit: UpdateKit, tmp_path: Path) -> None:
    _refused("unsigned", _check, kit, kit.version(2, key=None))
    generate_keys(tmp_path / "other.key", tmp_path / "other.pub")
    msg = _refused("unknown_key", _check, kit, kit.version(2, key=tmp_path / "other.key"))
    assert "none of the trusted keys" in msg
    # The demo key signed the bundled model: not trusted by this fleet.
    _refused("unknown_key", _check, kit, EDGE_BUNDLE)
    altered = kit.version(2)
    m = _manifest(altered)
    m["version"] = 99  # bumped after signing
    a = Assignment("dev-1", 5, time.time(), m)
    _refused("bad_signature", check_assignment, a, running=load_bundle(kit.version(1)).manifest,
             profile=PROFILE, trusted=[kit.pub], trust=TrustState())


def test_expired_is_refused(kit: UpdateKit) -> None:
    past = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0).isoformat()
    msg = _refused("expired", _check, kit, kit.version(2, expires=past))
    assert "expired" in msg


def test_older_or_equal_versions_are_refused_without_a_rollback_directive(kit: UpdateKit,
                                                                         ) -> None:
    _refused("version", _check, kit, kit.version(2), running=3)
    # Once version 5 ran, version 4 stays refused even when the device runs 3 (after a revert).
    _refused("version", _check, kit, kit.version(4), running=3,
             trust=TrustState(0, {"digits-edge": 5}))


def test_a_signed_rollback_directive_allows_exactly_its_step(kit: UpdateKit,
                                                             tmp_path: Path) -> None:
    key = PrivateKey.read(kit.key)
    soon = datetime.now(UTC) + timedelta(days=1)
    d = rollback_directive("digits-edge", 3, 2, soon, key)
    m = _check(kit, kit.version(2), running=3, rollback=d,
               trust=TrustState(0, {"digits-edge": 3}))
    assert m is not None and m.version == 2
    # Not from the version the device runs, expired, or signed by a stranger: refused.
    _refused("rollback", _check, kit, kit.version(2), running=4,
             rollback=rollback_directive("digits-edge", 3, 2, soon, key))
    _refused("rollback", _check, kit, kit.version(2), running=3,
             rollback=rollback_directive("digits-edge", 3, 2, soon - timedelta(days=2), key))
    generate_keys(tmp_path / "x.key", tmp_path / "x.pub")
    _refused("rollback", _check, kit, kit.version(2), running=3,
             rollback=rollback_directive("digits-edge", 3, 2, soon,
                                         PrivateKey.read(tmp_path / "x.key")))
    tampered = {**d, "to_version": 1}
    with pytest.raises(SignatureError):
        check_rollback(tampered, [kit.pub], "digits-edge", 3, 1)


def test_incompatible_runtime_hardware_and_size_are_refused(kit: UpdateKit) -> None:
    _refused("hardware", _check, kit, kit.version(2, hardware=["riscv64"]))
    assert _check(kit, kit.version(2, hardware=["riscv64", "x86_64"])) is not None
    _refused("runtime", _check, kit, kit.version(2, runtimes=["tensorrt"]))
    small = DeviceProfile("dev-1", ("x86_64",), ("onnxruntime",), 1000)
    _refused("size", _check, kit, kit.version(2), profile=small)


def test_a_bundle_without_health_check_is_refused(kit: UpdateKit) -> None:
    _refused("health_spec", _check, kit, kit.version(2, health=None))


def test_replayed_and_foreign_assignments_are_refused(kit: UpdateKit) -> None:
    _refused("replay", _check, kit, kit.version(2), seq=3, trust=TrustState(4, {}))
    assert _check(kit, kit.version(2), seq=4, trust=TrustState(4, {})) is not None
    _refused("device", _check, kit, kit.version(2), device="dev-2")


def test_assignments_carry_the_hub_signature(kit: UpdateKit, tmp_path: Path) -> None:
    payload = kit.assignment("dev-1", kit.version(2), 7)
    a = decode_desired(payload, [kit.hub_key.public])
    assert (a.device, a.seq, a.ref) == ("dev-1", 7, "digits-edge@2")
    stranger = PrivateKey.read_or_generate(tmp_path / "s.key")
    forged = encode_desired(a, stranger)
    with pytest.raises(SignatureError) as ei:
        decode_desired(forged, [kit.hub_key.public])
    assert ei.value.code == "assignment_signature"
    with pytest.raises(ProtocolError):
        decode_desired(b"EH\x01\x08garbage", [kit.hub_key.public])
    # A fleet (bundle) key is not a hub key.
    with pytest.raises(SignatureError):
        decode_desired(encode_desired(a, PrivateKey.read(DEMO_KEY)), [kit.hub_key.public])


def test_reported_state_round_trips_and_refuses_unknown_states() -> None:
    r = Reported("dev-1", "digits-edge@2", UpdateState.FAILED, "digits-edge@3", "bad", "health",
                 4, 1.5)
    assert Reported.decode(r.encode()) == r
    from fleet.contract import protocol as p

    with pytest.raises(ProtocolError, match="unknown update state"):
        Reported.decode(p.encode_json(p.Kind.REPORTED, {"device": "d", "model": "m",
                                                        "state": "exploded"}))


def test_manifest_canonical_form_ignores_key_order_and_spacing(kit: UpdateKit) -> None:
    d = _manifest(kit.version(2))
    shuffled = json.loads(json.dumps(dict(reversed(list(d.items())))))
    assert canonical_json(d) == canonical_json(shuffled)
    assert b" " not in canonical_json({"a": [1, 2], "b": {"c": "x"}})
