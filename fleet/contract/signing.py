"""Ed25519 signatures over a bundle's canonical manifest.

A signed manifest carries `"signatures": [{"keyid": ..., "sig": ...}]`. Each signature covers
the canonical JSON (sorted keys, no spaces, UTF-8) of the manifest without its `signatures`
field; the manifest lists every file's length and sha256, so a signature covers the files too.
`keyid` is the first 16 hex digits of the sha256 of the raw 32-byte public key.

Keys on disk: the private key as PKCS#8 PEM (mode 0600; keep it offline), the public key as one
line of base64 of the raw 32 bytes (what an agent pins in its settings).

This module signs and verifies documents (manifests, rollback directives, assignments); what an
agent must refuse (unknown key, older version, incompatible device) is decided in
`edge_agent/update_rules.py`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.contract.bundle import MANIFEST_NAME, canonical_json, load_bundle
from fleet.contract.errors import BundleError

log = logging.getLogger(__name__)

SIGNATURES_KEY = "signatures"


class SignatureError(BundleError):
    """A document that is unsigned, signed by no trusted key, or altered after signing.

    `code` says which: "unsigned", "unknown_key", "bad_signature" (or "signature")."""

    def __init__(self, message: str, code: str = "signature") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class PublicKey:
    raw: bytes  # 32 bytes

    @property
    def keyid(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def to_text(self) -> str:
        return base64.b64encode(self.raw).decode()

    @classmethod
    def from_text(cls, text: str) -> PublicKey:
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except ValueError:
            raise SignatureError("a public key must be one line of base64") from None
        if len(raw) != 32:
            raise SignatureError(f"an Ed25519 public key has 32 bytes, not {len(raw)}")
        return cls(raw)

    @classmethod
    def read(cls, path: Path) -> PublicKey:
        try:
            return cls.from_text(path.read_text())
        except OSError as exc:
            raise SignatureError(f"cannot read public key {path}: {exc}") from None


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SignatureError("signing needs the 'cryptography' package: "
                             "pip install 'edge-hybrid-inference[fleet]'") from None
    return ed25519


def generate_keys(private_path: Path, public_path: Path) -> PublicKey:
    """A new Ed25519 key pair; refuses to overwrite an existing private key."""
    from cryptography.hazmat.primitives import serialization

    ed = _crypto()
    if private_path.exists():
        raise SignatureError(f"{private_path} exists; not overwriting a signing key")
    key = ed.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub = PublicKey(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                  serialization.PublicFormat.Raw))
    public_path.write_text(pub.to_text() + "\n")
    return pub


class PrivateKey:
    """An Ed25519 signing key (kept offline for bundles; the hub's own for assignments)."""

    def __init__(self, key: Any) -> None:
        from cryptography.hazmat.primitives import serialization

        self._key = key
        self.public = PublicKey(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                              serialization.PublicFormat.Raw))

    @classmethod
    def read(cls, path: Path) -> PrivateKey:
        from cryptography.hazmat.primitives import serialization

        ed = _crypto()
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise SignatureError(f"cannot read private key {path}: {exc}") from None
        if not isinstance(key, ed.Ed25519PrivateKey):
            raise SignatureError(f"{path} is not an Ed25519 private key")
        return cls(key)

    @classmethod
    def read_or_generate(cls, path: Path) -> PrivateKey:
        """The key at `path`, made (0600, with its .pub beside it) if there is none yet."""
        if not path.exists():
            generate_keys(path, path.with_suffix(".pub"))
        return cls.read(path)

    def sign(self, document: dict[str, Any]) -> dict[str, Any]:
        """A copy of `document` with this key's signature added (replacing an older one). The
        entry records the sha256 of what it signed, so that a later signer can tell whether it
        still holds without the signer's public key (`stale_signatures`)."""
        payload = signed_payload(document)
        sig = self._key.sign(payload)
        others = [s for s in document.get(SIGNATURES_KEY, []) if isinstance(s, dict)
                  and s.get("keyid") != self.public.keyid]
        return {**document, SIGNATURES_KEY: [*others, {
            "keyid": self.public.keyid, "sig": base64.b64encode(sig).decode(),
            "payload_sha256": hashlib.sha256(payload).hexdigest()}]}


def stale_signatures(document: dict[str, Any]) -> list[str]:
    """Key ids of the signatures that were not made over the document as it is now (or do not
    say what they signed): after a change, such as a version bump, they no longer hold."""
    digest = hashlib.sha256(signed_payload(document)).hexdigest()
    return [str(s.get("keyid")) for s in document.get(SIGNATURES_KEY, [])
            if isinstance(s, dict) and s.get("payload_sha256") != digest]


def signed_payload(manifest: dict[str, Any]) -> bytes:
    """What a signature covers: the canonical manifest without its signatures."""
    return canonical_json({k: v for k, v in manifest.items() if k != SIGNATURES_KEY})


def _read_manifest(bundle: Path) -> dict[str, Any]:
    try:
        d = json.loads((bundle / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        raise BundleError(f"{bundle / MANIFEST_NAME} not found: is {bundle} a bundle?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{bundle / MANIFEST_NAME} is not valid JSON: {exc}") from None
    if not isinstance(d, dict):
        raise BundleError("manifest must be a JSON object")
    return d


def sign_bundle(bundle: Path, private_key: Path) -> str:
    """Check the bundle's files against its manifest, then add (or replace) this key's
    signature. Returns the key id."""
    load_bundle(bundle)  # never sign files that do not match the manifest
    key = PrivateKey.read(private_key)
    doc = _read_manifest(bundle)
    # Another key's signature over an older manifest would be kept as if it held: dropped,
    # and said (its holder signs again).
    stale = set(stale_signatures(doc)) - {key.public.keyid}
    for keyid in sorted(stale):
        log.warning("dropped the signature of key %s from %s: it was made over another "
                    "version of this manifest; its holder must sign again", keyid, bundle)
    doc[SIGNATURES_KEY] = [s for s in doc.get(SIGNATURES_KEY, [])
                           if not (isinstance(s, dict) and s.get("keyid") in stale)]
    d = key.sign(doc)
    tmp = bundle / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, bundle / MANIFEST_NAME)  # a crash leaves the old manifest or the new one
    return key.public.keyid


def verify_manifest(manifest: dict[str, Any], trusted: list[PublicKey]) -> str:
    """The key id of a trusted key whose signature over the manifest (or any signed document)
    holds.

    Raises SignatureError: unsigned, signed by no trusted key, or altered since signing.
    """
    from cryptography.exceptions import InvalidSignature

    ed = _crypto()
    sigs = manifest.get(SIGNATURES_KEY)
    if not sigs or not isinstance(sigs, list):
        raise SignatureError("not signed", "unsigned")
    by_id = {k.keyid: k for k in trusted}
    payload = signed_payload(manifest)
    known = False
    for s in sigs:
        if not isinstance(s, dict) or s.get("keyid") not in by_id:
            continue
        known = True
        try:
            raw = base64.b64decode(str(s.get("sig", "")), validate=True)
            ed.Ed25519PublicKey.from_public_bytes(by_id[s["keyid"]].raw).verify(raw, payload)
        except (InvalidSignature, ValueError):
            continue
        return str(s["keyid"])
    if not known:
        ids = sorted(str(s.get("keyid")) for s in sigs if isinstance(s, dict))
        raise SignatureError(f"signed by {', '.join(ids)}: none of the trusted keys "
                             f"({', '.join(sorted(by_id)) or 'none'})", "unknown_key")
    raise SignatureError("the signature does not match: altered after signing", "bad_signature")


def verify_bundle(bundle: Path, trusted: list[PublicKey]) -> str:
    """Signature by a trusted key, then every file's length and sha256 and the expiry."""
    keyid = verify_manifest(_read_manifest(bundle), trusted)
    load_bundle(bundle)
    return keyid
