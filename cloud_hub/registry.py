"""The model registry: accepts uploaded bundles (a tar of the bundle folder) after checking
them, and lists and serves them.

An upload is hostile until proven otherwise. It is unpacked by hand, member by member, into a
fresh staging folder: absolute paths, `..`, links, devices and FIFOs are refused, and so is any
member whose declared size (or the sum of them) passes the limit, all before a byte of it is
written. Then the bundle must carry a signature of a trusted fleet key over a manifest that
lists exactly the files present, with their lengths and hashes. Only then is it stored.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud_hub.artifacts import ArtifactStore
from cloud_hub.db import ModelVersion, RollbackDirective
from cloud_hub.errors import BundleRejected, Conflict, NotFound
from fleet.contract.assignment import ROLLBACK, check_rollback
from fleet.contract.bundle import MANIFEST_NAME, Manifest
from fleet.contract.errors import BundleError
from fleet.contract.signing import PublicKey, SignatureError, verify_bundle, verify_manifest

log = logging.getLogger(__name__)

# More members than this is not a model bundle (ours have 2-4 files).
MAX_MEMBERS = 256
_COPY_CHUNK = 1 << 20


def unpack_bundle(archive: Path, staging: Path, max_bytes: int) -> None:
    """Unpack a bundle tar (plain or gzip) into the empty folder `staging`.

    Files may sit at the top of the archive or under one top folder. Raises BundleRejected."""
    try:
        tf = tarfile.open(archive, "r:*")  # noqa: SIM115 (closed by the `with` below)
    except (tarfile.TarError, OSError) as exc:
        raise BundleRejected(f"not a tar archive: {exc}") from None
    with tf:
        files: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
        total = count = 0
        while True:
            # Member by member: each header is judged before the archive is read any further,
            # so a member declaring a terabyte is refused without skipping over it.
            try:
                m = tf.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise BundleRejected(f"damaged tar archive: {exc}") from None
            if m is None:
                break
            count += 1
            if count > MAX_MEMBERS:
                raise BundleRejected(f"more than {MAX_MEMBERS} members: not a model bundle")
            rel = PurePosixPath(m.name)
            if rel.is_absolute() or ".." in rel.parts:
                raise BundleRejected(f"member {m.name!r} points outside the bundle")
            if m.issym() or m.islnk():
                raise BundleRejected(f"member {m.name!r} is a link: links are refused")
            if m.isdir():
                continue
            if not m.isreg():
                raise BundleRejected(f"member {m.name!r} is not a regular file")
            if m.size < 0 or m.size > max_bytes or total + m.size > max_bytes:
                raise BundleRejected(f"member {m.name!r} declares {m.size} bytes: the bundle "
                                     f"would pass the {max_bytes}-byte limit")
            total += m.size
            parts = tuple(x for x in rel.parts if x != ".")
            if parts:
                files.append((m, PurePosixPath(*parts)))
        files = _strip_top_folder(files)
        for m, rel in files:
            _extract(tf, m, staging, rel)


def _strip_top_folder(files: list[tuple[tarfile.TarInfo, PurePosixPath]],
                      ) -> list[tuple[tarfile.TarInfo, PurePosixPath]]:
    if any(rel == PurePosixPath(MANIFEST_NAME) for _, rel in files):
        return files
    tops = {rel.parts[0] for _, rel in files if len(rel.parts) > 1}
    if len(tops) == 1 and all(len(rel.parts) > 1 for _, rel in files):
        return [(m, PurePosixPath(*rel.parts[1:])) for m, rel in files]
    raise BundleRejected(f"no {MANIFEST_NAME} at the top of the archive or under one folder")


def _extract(tf: tarfile.TarFile, m: tarfile.TarInfo, staging: Path, rel: PurePosixPath) -> None:
    dest = staging.joinpath(*rel.parts)
    if staging.resolve() not in dest.resolve().parents:
        raise BundleRejected(f"member {m.name!r} points outside the bundle")
    dest.parent.mkdir(parents=True, exist_ok=True)
    src = tf.extractfile(m)
    if src is None:
        raise BundleRejected(f"member {m.name!r} has no data")
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise BundleRejected(f"member {m.name!r} appears twice") from None
    left = m.size
    with src, os.fdopen(fd, "wb") as out:
        while left > 0:
            chunk = src.read(min(_COPY_CHUNK, left))
            if not chunk:
                raise BundleRejected(f"member {m.name!r} is shorter than it declares")
            out.write(chunk)
            left -= len(chunk)


def check_bundle(staging: Path, trusted: list[PublicKey]) -> tuple[Manifest, str]:
    """The manifest and the signing key id of a staged bundle, or BundleRejected."""
    if not trusted:
        raise BundleRejected("the hub trusts no bundle-signing key: set EHI_HUB_TRUSTED_KEYS "
                             "(the public keys from `fleet keys generate`)")
    try:
        keyid = verify_bundle(staging, trusted)
        m = Manifest.from_dict(_manifest_json(staging))
    except BundleError as exc:
        raise BundleRejected(str(exc)) from None
    listed = {MANIFEST_NAME, *(f.path for f in m.files)}
    extra = sorted(f.relative_to(staging).as_posix() for f in staging.rglob("*")
                   if f.is_file() and f.relative_to(staging).as_posix() not in listed)
    if extra:
        raise BundleRejected(f"files not listed in the manifest: {', '.join(extra[:5])}")
    return m, keyid


def _manifest_json(staging: Path) -> dict[str, object]:
    d = json.loads((staging / MANIFEST_NAME).read_text())
    if not isinstance(d, dict):
        raise BundleError("manifest must be a JSON object")
    return d


def accept_upload(session: Session, store: ArtifactStore, archive: Path, work_dir: Path,
                  trusted: list[PublicKey], max_bytes: int) -> ModelVersion:
    """Unpack, check and store an uploaded bundle; returns its registry row."""
    work_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=work_dir))
    try:
        unpack_bundle(archive, staging, max_bytes)
        m, keyid = check_bundle(staging, trusted)
        if session.scalar(select(ModelVersion.n).where(ModelVersion.name == m.name,
                                                       ModelVersion.version == m.version)):
            raise Conflict(f"{m.ref} is already in the registry: versions are immutable, "
                           "build and sign a new version")
        store.put(m.name, m.version, staging)
        row = ModelVersion(name=m.name, version=m.version, manifest=_manifest_json(staging),
                           total_bytes=m.total_bytes, keyid=keyid, uploaded_at=time.time())
        session.add(row)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            raise Conflict(f"{m.ref} is already in the registry") from None
        log.info("registry: accepted %s (%d bytes, key %s)", m.ref, m.total_bytes, keyid)
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
