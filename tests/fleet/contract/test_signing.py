"""Bundle signatures: keys, signing, and every way a signature check must refuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleet.cli.app import app
from fleet.contract.bundle import MANIFEST_NAME
from fleet.contract.errors import BundleError
from fleet.contract.signing import (
    PublicKey,
    SignatureError,
    generate_keys,
    sign_bundle,
    signed_payload,
    stale_signatures,
    verify_bundle,
)
from models import EDGE_BUNDLE


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A copy of the bundled edge model without its (demo) signature."""
    b = tmp_path / "bundle"
    shutil.copytree(EDGE_BUNDLE, b)
    d = json.loads((b / MANIFEST_NAME).read_text())
    del d["signatures"]
    (b / MANIFEST_NAME).write_text(json.dumps(d))
    return b


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, PublicKey]:
    pub = generate_keys(tmp_path / "k" / "fleet.key", tmp_path / "k" / "fleet.pub")
    return tmp_path / "k" / "fleet.key", pub


def _manifest(b: Path) -> dict:
    return json.loads((b / MANIFEST_NAME).read_text())


def test_sign_then_verify(bundle: Path, keys: tuple[Path, PublicKey]) -> None:
    key, pub = keys
    assert (key.stat().st_mode & 0o777) == 0o600
    assert sign_bundle(bundle, key) == pub.keyid
    assert verify_bundle(bundle, [pub]) == pub.keyid
    assert sign_bundle(bundle, key) == pub.keyid  # signing again replaces, not appends
    assert len(_manifest(bundle)["signatures"]) == 1


def test_payload_is_canonical_and_excludes_signatures() -> None:
    a = {"b": 1, "a": [1, 2], "signatures": [{"keyid": "x"}]}
    assert signed_payload(a) == b'{"a":[1,2],"b":1}'
    assert signed_payload({"a": [1, 2], "b": 1}) == signed_payload(a)


def test_unsigned_bundle_is_refused(bundle: Path, keys: tuple[Path, PublicKey]) -> None:
    with pytest.raises(SignatureError, match="not signed"):
        verify_bundle(bundle, [keys[1]])


def test_unknown_key_is_refused(bundle: Path, keys: tuple[Path, PublicKey],
                                tmp_path: Path) -> None:
    sign_bundle(bundle, keys[0])
    other = generate_keys(tmp_path / "o" / "o.key", tmp_path / "o" / "o.pub")
    with pytest.raises(SignatureError, match="none of the trusted keys"):
        verify_bundle(bundle, [other])


def test_altered_manifest_is_refused(bundle: Path, keys: tuple[Path, PublicKey]) -> None:
    sign_bundle(bundle, keys[0])
    d = _manifest(bundle)
    d["version"] += 1  # e.g. an attacker dressing an old model up as new
    (bundle / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(SignatureError, match="altered"):
        verify_bundle(bundle, [keys[1]])


def test_altered_file_is_refused(bundle: Path, keys: tuple[Path, PublicKey]) -> None:
    sign_bundle(bundle, keys[0])
    model = next(p for p in bundle.iterdir() if p.suffix == ".onnx")
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        verify_bundle(bundle, [keys[1]])


def test_file_longer_than_stated_is_refused(bundle: Path, keys: tuple[Path, PublicKey]) -> None:
    sign_bundle(bundle, keys[0])
    model = next(p for p in bundle.iterdir() if p.suffix == ".onnx")
    with model.open("ab") as fh:
        fh.write(b"\0" * 10)
    with pytest.raises(BundleError, match="bytes, manifest says"):
        verify_bundle(bundle, [keys[1]])


def test_expired_manifest_is_refused_even_when_signed(bundle: Path,
                                                      keys: tuple[Path, PublicKey]) -> None:
    d = _manifest(bundle)
    d["expires"] = "2020-01-01T00:00:00+00:00"
    (bundle / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(BundleError, match="expired"):
        sign_bundle(bundle, keys[0])  # nothing expired is signed either


def test_a_key_is_never_overwritten(keys: tuple[Path, PublicKey]) -> None:
    with pytest.raises(SignatureError, match="not overwriting"):
        generate_keys(keys[0], keys[0].with_suffix(".pub2"))


def test_bad_public_key_text() -> None:
    with pytest.raises(SignatureError, match="32 bytes"):
        PublicKey.from_text("AAAA")
    with pytest.raises(SignatureError, match="base64"):
        PublicKey.from_text("not base64 !")


def test_cli_generate_sign_verify(bundle: Path, tmp_path: Path) -> None:
    r = CliRunner()
    out = tmp_path / "cli-keys"
    res = r.invoke(app, ["keys", "generate", "--out", str(out)])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["models", "sign", str(bundle), "--key", str(out / "fleet.key")])
    assert res.exit_code == 0 and "signed" in res.output
    res = r.invoke(app, ["models", "verify", str(bundle), "--key", str(out / "fleet.pub")])
    assert res.exit_code == 0 and res.output.startswith("ok:")
    other = tmp_path / "other"
    r.invoke(app, ["keys", "generate", "--out", str(other)])
    res = r.invoke(app, ["models", "verify", str(bundle), "--key", str(other / "fleet.pub")])
    assert res.exit_code == 1 and "refused" in res.output


def test_bundled_models_are_signed_with_the_demo_key() -> None:
    from models import CLOUD_BUNDLE, DEMO_PUBLIC_KEY

    demo = PublicKey.read(DEMO_PUBLIC_KEY)
    for b in (EDGE_BUNDLE, CLOUD_BUNDLE):
        assert verify_bundle(b, [demo]) == demo.keyid


def test_a_signature_over_an_older_manifest_is_dropped_when_another_key_signs(
        bundle: Path, keys: tuple[Path, PublicKey], tmp_path: Path) -> None:
    """A co-signer's signature made before a version bump no longer holds: signing again with
    another key drops it (and says so) instead of keeping it as if it held."""
    key, pub = keys
    other = tmp_path / "o" / "o.key"
    other_pub = generate_keys(other, tmp_path / "o" / "o.pub")
    sign_bundle(bundle, key)
    sign_bundle(bundle, other)
    assert stale_signatures(_manifest(bundle)) == []
    m = _manifest(bundle)
    m["version"] += 1
    (bundle / MANIFEST_NAME).write_text(json.dumps(m))
    assert sorted(stale_signatures(m)) == sorted([pub.keyid, other_pub.keyid])
    sign_bundle(bundle, other)
    after = _manifest(bundle)
    assert [s["keyid"] for s in after["signatures"]] == [other_pub.keyid]
    assert verify_bundle(bundle, [other_pub]) == other_pub.keyid
