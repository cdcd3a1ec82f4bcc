"""Reading an uploaded bundle archive without trusting it: a tar, plain or compressed with gzip,
bzip2 or xz.

An archive is a promise of bytes that it can break in three ways, and each is bounded here
before it costs anything:
- compression: a few hundred bytes can expand to gigabytes. Every byte that comes out of the
  decompressor is counted (`BudgetReader`), and the archive is refused as soon as the count
  passes the budget, whatever part of the tar the bytes were meant for;
- tar's own headers: a pax or GNU long-name header declares its size and tarfile reads it into
  memory whole. Headers larger than `MAX_HEADER_BYTES` are refused before they are read;
- members: a member's declared size is judged against the budget before its data is read.

The registry reads an archive twice (`scan`, then `extract`): the first pass reads only the
manifest (the other members' data are decompressed and dropped), so the signature is checked
before a byte is written to disk, and the second writes exactly the files the signed manifest
lists, with their lengths and hashes checked as they are written.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast

from cloud_hub.errors import BundleRejected

# More members than this is not a model bundle (ours have 2-4 files).
MAX_MEMBERS = 256
# A pax or GNU long-name header larger than this is not a bundle's (ours are a few hundred bytes).
MAX_HEADER_BYTES = 64 << 10
# The manifest of a bundle: a few kilobytes of JSON.
MAX_MANIFEST_BYTES = 1 << 20
# What tar adds to the files' bytes: a 512-byte header per member, padding to 512 bytes, pax
# headers, and the end-of-archive records (up to a 10 KiB block).
_OVERHEAD_PER_MEMBER = 3 * 512 + MAX_HEADER_BYTES
_OVERHEAD = 64 << 10
_COPY_CHUNK = 1 << 20
_HEADER_TYPES = {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                 tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}


class ArchiveTooLarge(BundleRejected):
    """The archive expands past its budget."""


class BudgetReader:
    """A read-only stream that refuses to give out more than `budget` bytes in all."""

    def __init__(self, raw: IO[bytes] | gzip.GzipFile, budget: int) -> None:
        self.raw, self.budget, self.count = raw, budget, 0

    def read(self, n: int = -1) -> bytes:
        left = self.budget - self.count
        # Ask for at most one byte past the budget: enough to know it was passed.
        want = left + 1 if n is None or n < 0 or n > left + 1 else n
        try:
            data = self.raw.read(want)
        except (OSError, EOFError, lzma.LZMAError, ValueError) as exc:
            raise BundleRejected(f"damaged archive: {exc}") from None
        self.count += len(data)
        if self.count > self.budget:
            raise ArchiveTooLarge(f"the archive expands past {self.budget} bytes: refused "
                                  "(a bundle's files plus tar's headers)")
        return data


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses a pax or long-name header larger than MAX_HEADER_BYTES before tarfile reads it
    into memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:
        if self.type in _HEADER_TYPES and self.size > MAX_HEADER_BYTES:
            raise BundleRejected(f"a tar header declares {self.size} bytes (at most "
                                 f"{MAX_HEADER_BYTES}): not a model bundle")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def _decompressor(fh: IO[bytes]) -> IO[bytes]:
    magic = fh.read(6)
    fh.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return cast(IO[bytes], gzip.GzipFile(fileobj=fh, mode="rb"))
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(fh, mode="rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(fh, mode="rb")
    return fh


def expansion_budget(max_bytes: int) -> int:
    """The decompressed bytes an archive of files totalling `max_bytes` may take."""
    return max_bytes + MAX_MEMBERS * _OVERHEAD_PER_MEMBER + _OVERHEAD


@dataclass(frozen=True, slots=True)
class Member:
    path: PurePosixPath  # inside the bundle (a single top folder stripped)
    size: int


@contextmanager
def _open(archive: Path, budget: int) -> Iterator[tarfile.TarFile]:
    with open(archive, "rb") as fh:
        stream = BudgetReader(_decompressor(fh), budget)
        try:
            tf = tarfile.open(fileobj=stream, mode="r|",  # type: ignore[call-overload]  # noqa: SIM115
                              tarinfo=_BoundedTarInfo)
        except tarfile.TarError as exc:
            raise BundleRejected(f"not a tar archive: {exc}") from None
        with tf:
            yield tf


def _members(tf: tarfile.TarFile, max_bytes: int) -> Iterator[tuple[tarfile.TarInfo,
                                                                    PurePosixPath]]:
    """The archive's regular files, each judged by its header before its data is read."""
    total = count = 0
    while True:
        try:
            m = tf.next()
        except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, ValueError) as exc:
            raise BundleRejected(f"damaged tar archive: {exc}") from None
        if m is None:
            return
        count += 1
        if count > MAX_MEMBERS:
            raise BundleRejected(f"more than {MAX_MEMBERS} members: not a model bundle")
        rel = PurePosixPath(m.name)
        if rel.is_absolute() or ".." in rel.parts or "\\" in m.name:
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
            yield m, PurePosixPath(*parts)


def _top_folder(paths: list[PurePosixPath], manifest_name: str) -> str | None:
    """The one folder every file sits under, if the manifest is not at the top."""
    if PurePosixPath(manifest_name) in paths:
        return None
    tops = {p.parts[0] for p in paths if len(p.parts) > 1}
    if len(tops) == 1 and all(len(p.parts) > 1 for p in paths):
        return tops.pop()
    raise BundleRejected(f"no {manifest_name} at the top of the archive or under one folder")


def _strip(path: PurePosixPath, top: str | None) -> PurePosixPath:
    return PurePosixPath(*path.parts[1:]) if top is not None else path


def scan(archive: Path, max_bytes: int, manifest_name: str
         ) -> tuple[list[Member], bytes, str | None]:
    """First pass: the archive's files (sizes from their headers), the manifest's bytes, and
    the one folder they sit under (None: at the top). Nothing is written. Raises
    BundleRejected."""
    found: list[tuple[PurePosixPath, int]] = []
    manifests: dict[PurePosixPath, bytes] = {}
    with _open(archive, expansion_budget(max_bytes)) as tf:
        for m, rel in _members(tf, max_bytes):
            found.append((rel, m.size))
            if rel.name == manifest_name and len(rel.parts) <= 2:
                if m.size > MAX_MANIFEST_BYTES:
                    raise BundleRejected(f"{manifest_name} declares {m.size} bytes (at most "
                                         f"{MAX_MANIFEST_BYTES})")
                src = tf.extractfile(m)
                manifests[rel] = src.read() if src is not None else b""
    top = _top_folder([p for p, _ in found], manifest_name)
    manifest = manifests.get(_join(top, manifest_name))
    if manifest is None:
        raise BundleRejected(f"no {manifest_name} at the top of the archive or under one folder")
    members = [Member(_strip(p, top), size) for p, size in found]
    paths = [m.path for m in members]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise BundleRejected(f"member {dup.as_posix()!r} appears twice")
    return members, manifest, top


def _join(top: str | None, name: str) -> PurePosixPath:
    return PurePosixPath(top, name) if top is not None else PurePosixPath(name)


def extract(archive: Path, staging: Path, files: dict[str, tuple[int, str]],
            max_bytes: int, manifest_name: str, manifest: bytes, top: str | None) -> None:
    """Second pass: write the files named in `files` (path -> (length, sha256), from a signed
    manifest) into the empty folder `staging`, checking each one's length and hash as it is
    written, and the manifest's bytes as read in the first pass. Raises BundleRejected."""
    root = staging.resolve()
    written: set[str] = set()
    # The signed manifest says how many bytes there are: the budget of this pass.
    max_bytes = min(max_bytes, len(manifest) + sum(n for n, _ in files.values()))
    with _open(archive, expansion_budget(max_bytes)) as tf:
        for m, path in _members(tf, max_bytes):
            if top is not None and (len(path.parts) < 2 or path.parts[0] != top):
                raise BundleRejected(f"member {path.as_posix()!r} is outside the bundle's "
                                     "folder")
            rel = _strip(path, top)
            key = rel.as_posix()
            if key == manifest_name:
                src = tf.extractfile(m)
                if src is None or src.read() != manifest:
                    raise BundleRejected(f"{manifest_name} changed between two reads")
                continue
            if key not in files:
                raise BundleRejected(f"member {key!r} is not listed in the manifest")
            length, digest = files[key]
            if m.size != length:
                raise BundleRejected(f"{key} is {m.size} bytes, the manifest says {length}")
            _write(tf, m, root, rel, digest)
            written.add(key)
    (staging / manifest_name).write_bytes(manifest)
    missing = sorted(set(files) - written)
    if missing:
        raise BundleRejected(f"files listed in the manifest are missing: "
                             f"{', '.join(missing[:5])}")


def _write(tf: tarfile.TarFile, m: tarfile.TarInfo, root: Path, rel: PurePosixPath,
           digest: str) -> None:
    dest = root.joinpath(*rel.parts)
    if root not in dest.parents:
        raise BundleRejected(f"member {m.name!r} points outside the bundle")
    dest.parent.mkdir(parents=True, exist_ok=True)
    src = tf.extractfile(m)
    if src is None:
        raise BundleRejected(f"member {m.name!r} has no data")
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise BundleRejected(f"member {m.name!r} appears twice") from None
    h = hashlib.sha256()
    left = m.size
    with src, os.fdopen(fd, "wb") as out:
        while left > 0:
            chunk = src.read(min(_COPY_CHUNK, left))
            if not chunk:
                raise BundleRejected(f"member {m.name!r} is shorter than it declares")
            h.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    if h.hexdigest() != digest:
        raise BundleRejected(f"{rel.as_posix()} does not match its sha256 in the manifest")
