"""The model registry: accepts uploaded bundles (a tar of the bundle folder, plain or
compressed) after checking them, and lists and serves them.

An upload is hostile until proven otherwise (bundle_archive.py). A first pass over the archive
judges every member's header (absolute paths, `..`, links, devices and FIFOs are refused, and so
is any member whose declared size, or the sum of them, passes the limit), counts every byte the
decompressor gives out, and reads only the manifest. The manifest must carry a signature of a
trusted fleet key and list exactly the files present with the sizes their headers declare;
only then does a second pass write those files, checking each one's hash as it is written.
Then the staged bundle is stored.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud_hub.artifacts import ArtifactStore
from cloud_hub.bundle_archive import extract, scan
from cloud_hub.db import ModelVersion, RollbackDirective
from cloud_hub.errors import BundleRejected, Conflict, NotFound
from fleet.contract.assignment import ROLLBACK, check_rollback
from fleet.contract.bundle import MANIFEST_NAME, Manifest
from fleet.contract.errors import BundleError, ProtocolError
from fleet.contract.protocol import parse_header
from fleet.contract.signing import PublicKey, SignatureError, verify_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Unpacked:
    manifest: Manifest
    document: dict[str, Any]  # the manifest as signed, stored in the registry's row
    keyid: str                # the trusted key that signed it


def unpack_bundle(archive: Path, staging: Path, max_bytes: int,
                  trusted: list[PublicKey]) -> Unpacked:
    """Unpack a signed bundle archive into the empty folder `staging`: nothing is written
    before the manifest's signature holds, and each file is checked against its signed length
    and sha256 as it is written (so the staged bundle needs no second check). Raises
    BundleRejected."""
    if not trusted:
        raise BundleRejected("the hub trusts no bundle-signing key: set EHI_HUB_TRUSTED_KEYS "
                             "(the public keys from `fleet keys generate`)")
    members, raw, top = scan(archive, max_bytes, MANIFEST_NAME)
    try:  # bounded before anything reads it: depth, strings, numbers (as a wire header)
        doc = parse_header(raw)
    except ProtocolError as exc:
        raise BundleRejected(f"{MANIFEST_NAME} is not valid JSON within the hub's bounds: "
                             f"{exc}") from None
    if not isinstance(doc, dict):
        raise BundleRejected(f"{MANIFEST_NAME} must be a JSON object")
    try:
        keyid = verify_manifest(doc, trusted)
        m = Manifest.from_dict(doc)
    except BundleError as exc:
        raise BundleRejected(str(exc)) from None
    if m.expires is not None and m.expires <= datetime.now(UTC):
        raise BundleRejected(f"bundle {m.ref} expired at {m.expires.isoformat()}")
    listed = {f.path: (f.length, f.sha256) for f in m.files}
    present = {x.path.as_posix(): x.size for x in members if x.path.as_posix() != MANIFEST_NAME}
    extra = sorted(set(present) - set(listed))
    if extra:
        raise BundleRejected(f"files not listed in the manifest: {', '.join(extra[:5])}")
    for path, (length, _) in listed.items():
        if path not in present:
            raise BundleRejected(f"bundle {m.ref}: file {path} is missing")
        if present[path] != length:
            raise BundleRejected(f"bundle {m.ref}: {path} is {present[path]} bytes, the "
                                 f"manifest says {length}")
    extract(archive, staging, listed, max_bytes, MANIFEST_NAME, raw, top)
    return Unpacked(m, doc, keyid)


def accept_upload(session: Session, store: ArtifactStore, archive: Path, work_dir: Path,
                  trusted: list[PublicKey], max_bytes: int) -> ModelVersion:
    """Unpack, check and store an uploaded bundle; returns its registry row."""
    work_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=work_dir))
    try:
        u = unpack_bundle(archive, staging, max_bytes, trusted)
        m = u.manifest
        if session.scalar(select(ModelVersion.n).where(ModelVersion.name == m.name,
                                                       ModelVersion.version == m.version)):
            raise Conflict(f"{m.ref} is already in the registry: versions are immutable, "
                           "build and sign a new version")
        row = ModelVersion(name=m.name, version=m.version, manifest=u.document,
                           total_bytes=m.total_bytes, keyid=u.keyid, uploaded_at=time.time())
        try:  # the files and the row as one step: a concurrent upload of m.ref loses whole
            store.put(m.name, m.version, staging, session, lambda s: s.add(row))
        except IntegrityError:
            raise Conflict(f"{m.ref} is already in the registry") from None
        log.info("registry: accepted %s (%d bytes, key %s)", m.ref, m.total_bytes, u.keyid)
        return row
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def get_model(session: Session, name: str, version: int) -> ModelVersion:
    row = session.scalar(select(ModelVersion).where(ModelVersion.name == name,
                                                    ModelVersion.version == version))
    if row is None:
        raise NotFound(f"no model {name}@{version} in the registry")
    return row


def add_rollback(session: Session, directive: dict[str, object],
                 trusted: list[PublicKey]) -> RollbackDirective:
    """Store a signed rollback directive (checked against the trusted fleet keys)."""
    name, frm = directive.get("name"), directive.get("from_version")
    to = directive.get("to_version")
    if (directive.get("type") != ROLLBACK or not isinstance(name, str)
            or not isinstance(frm, int) or not isinstance(to, int)):
        raise BundleRejected("a rollback directive names type, name, from_version, to_version")
    try:
        verify_manifest(directive, trusted)
        check_rollback(directive, trusted, name, frm, to)
    except SignatureError as exc:
        raise BundleRejected(f"rollback directive refused: {exc}") from None
    get_model(session, name, to)
    row = session.scalar(select(RollbackDirective).where(
        RollbackDirective.name == name, RollbackDirective.from_version == frm,
        RollbackDirective.to_version == to))
    if row is None:
        row = RollbackDirective(name=name, from_version=frm, to_version=to, document=directive)
        session.add(row)
    else:
        row.document = directive  # a newer directive (e.g. a later expiry) replaces the old
    session.commit()
    return row
