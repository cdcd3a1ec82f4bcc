"""Where the registry keeps bundle files: a small interface, the local filesystem (one replica)
and the hub's database (every replica reads what any stored) behind it, and an in-memory store
beside it for unit tests.

Files are immutable once stored: a (name, version) is written once, from a verified staging
folder. `put` stores the files and registers them (the caller's `register` adds the registry row
to the session) as one step: two uploads of one name@version at the same moment cannot mix
(the loser's registry row fails on its unique key, and it leaves no file behind).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol

from sqlalchemy import delete as sa_delete
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cloud_hub.errors import NotFound, StoreError


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (a file made for it), held across processes."""
    import fcntl

    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ArtifactNotFound(NotFound):
    """No such bundle or file in the store."""


def _safe_rel(path: str) -> PurePosixPath:
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ArtifactNotFound(path)
    return p


Register = Callable[[Session], None]


class ArtifactStore(Protocol):
    def put(self, name: str, version: int, staging: Path, session: Session,
            register: Register) -> None:
        """Store every file under `staging` as bundle `name@version` and commit `session` after
        `register(session)`, atomically: on any failure (IntegrityError when the version
        exists) nothing is stored and nothing is committed."""

    def size(self, name: str, version: int, path: str) -> int: ...

    def open(self, name: str, version: int, path: str) -> BinaryIO: ...

    def delete(self, name: str, version: int) -> None: ...


class LocalArtifactStore:
    """`root/{name}/{version}/{files}`; a bundle appears whole (directory rename) or not at all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _dir(self, name: str, version: int) -> Path:
        return self.root / str(_safe_rel(name)) / str(int(version))

    def put(self, name: str, version: int, staging: Path, session: Session,
            register: Register) -> None:
        final = self._dir(name, version)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=final.parent))
        try:
            shutil.copytree(staging, tmp, dirs_exist_ok=True, symlinks=True)
            # One upload of name@version at a time past this point (also across processes on
            # this disk): the registry row is claimed before the folder moves into place.
            with _locked(final.parent / f".{version}.lock"):
                register(session)
                session.flush()  # IntegrityError here if name@version is registered
                if final.exists():
                    shutil.rmtree(final)  # a leftover of an upload that failed to register
                os.replace(tmp, final)
                try:
                    session.commit()
                except BaseException:
                    shutil.rmtree(final, ignore_errors=True)
                    raise
        except BaseException:
            session.rollback()
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _file(self, name: str, version: int, path: str) -> Path:
        f = self._dir(name, version) / str(_safe_rel(path))
        if not f.is_file() or f.is_symlink():
            raise ArtifactNotFound(f"{name}@{version}/{path}")
        return f

    def size(self, name: str, version: int, path: str) -> int:
        return self._file(name, version, path).stat().st_size

    def open(self, name: str, version: int, path: str) -> BinaryIO:
        return self._file(name, version, path).open("rb")

    def delete(self, name: str, version: int) -> None:
        shutil.rmtree(self._dir(name, version), ignore_errors=True)


class MemoryArtifactStore:
    """The same interface over a dict: for unit tests of the registry's logic."""

    def __init__(self) -> None:
        self._files: dict[tuple[str, int, str], bytes] = {}
        self._lock = threading.Lock()

    def put(self, name: str, version: int, staging: Path, session: Session,
            register: Register) -> None:
        files = {(name, version, f.relative_to(staging).as_posix()): f.read_bytes()
                 for f in staging.rglob("*") if f.is_file()}
        with self._lock:
            try:
                register(session)
                session.commit()
            except BaseException:
                session.rollback()
                raise
            self._files.update(files)

    def _get(self, name: str, version: int, path: str) -> bytes:
        try:
            return self._files[(name, version, str(_safe_rel(path)))]
        except KeyError:
            raise ArtifactNotFound(f"{name}@{version}/{path}") from None

    def size(self, name: str, version: int, path: str) -> int:
        return len(self._get(name, version, path))

    def open(self, name: str, version: int, path: str) -> BinaryIO:
        return io.BytesIO(self._get(name, version, path))

    def delete(self, name: str, version: int) -> None:
        with self._lock:
            for k in [k for k in self._files if k[:2] == (name, version)]:
                del self._files[k]


ARTIFACT_CHUNK = 1 << 20


class DatabaseArtifactStore:
    """Bundle files in the hub's database (PostgreSQL or SQLite), in 1 MiB chunks: every
    replica of the hub reads what any of them stored. A bundle appears whole (one transaction)
    or not at all; reads fetch the chunks they need (HTTP Range requests stay cheap)."""

    def __init__(self, sessions: sessionmaker) -> None:
        self.sessions = sessions

    def put(self, name: str, version: int, staging: Path, session: Session,
            register: Register) -> None:
        """The files and the registry row in the caller's one transaction."""
        from cloud_hub.db import ArtifactChunk, ArtifactFile

        s = session
        try:
            try:
                register(s)
                s.flush()  # IntegrityError here if name@version is registered
                self._delete(s, name, version)  # a leftover written by an older release
                for f in sorted(p for p in staging.rglob("*") if p.is_file()):
                    rel = f.relative_to(staging).as_posix()
                    s.add(ArtifactFile(name=name, version=version, path=rel,
                                       size=f.stat().st_size))
                    with f.open("rb") as fh:
                        seq = 0
                        while chunk := fh.read(ARTIFACT_CHUNK):
                            s.add(ArtifactChunk(name=name, version=version, path=rel, seq=seq,
                                                data=chunk))
                            s.flush()  # one chunk in memory at a time
                            seq += 1
                s.commit()
            except BaseException:
                s.rollback()
                raise
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot store {name}@{version}: {exc}") from None

    def size(self, name: str, version: int, path: str) -> int:
        from cloud_hub.db import ArtifactFile

        rel = str(_safe_rel(path))
        with self.sessions() as s:
            row = s.get(ArtifactFile, (name, version, rel))
        if row is None:
            raise ArtifactNotFound(f"{name}@{version}/{path}")
        return int(row.size)

    def open(self, name: str, version: int, path: str) -> BinaryIO:
        size = self.size(name, version, path)
        return io.BufferedReader(_ChunkReader(self.sessions, name, version,
                                              str(_safe_rel(path)), size),
                                 buffer_size=ARTIFACT_CHUNK)

    def delete(self, name: str, version: int) -> None:
        with self.sessions.begin() as s:
            self._delete(s, name, version)

    @staticmethod
    def _delete(s: Session, name: str, version: int) -> None:
        from cloud_hub.db import ArtifactChunk, ArtifactFile

        for model in (ArtifactChunk, ArtifactFile):
            s.execute(sa_delete(model).where(model.name == name, model.version == version))


class _ChunkReader(io.RawIOBase):
    def __init__(self, sessions: sessionmaker, name: str, version: int, path: str,
                 size: int) -> None:
        self.sessions, self.key, self.length = sessions, (name, version, path), size
        self.pos = 0
        self._cached: tuple[int, bytes] | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def _chunk(self, seq: int) -> bytes:
        from cloud_hub.db import ArtifactChunk

        if self._cached is None or self._cached[0] != seq:
            with self.sessions() as s:
                row = s.get(ArtifactChunk, (*self.key, seq))
            if row is None:
                raise ArtifactNotFound(f"{self.key}: chunk {seq} is missing")
            self._cached = (seq, bytes(row.data))
        return self._cached[1]

    def readinto(self, b: Any) -> int:
        if self.pos >= self.length:
            return 0
        seq, off = divmod(self.pos, ARTIFACT_CHUNK)
        data = self._chunk(seq)[off:off + len(b)]
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)
