"""Where the registry keeps bundle files: a small interface, the local filesystem behind it, and
an in-memory store beside it for unit tests.

Files are immutable once stored: a (name, version) is written once, from a verified staging
folder, by renaming a complete copy into place.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from cloud_hub.errors import NotFound


class ArtifactNotFound(NotFound):
    """No such bundle or file in the store."""


def _safe_rel(path: str) -> PurePosixPath:
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ArtifactNotFound(path)
    return p


class ArtifactStore(Protocol):
    def put(self, name: str, version: int, staging: Path) -> None:
        """Store every file under `staging` as bundle `name@version`."""

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

    def put(self, name: str, version: int, staging: Path) -> None:
        final = self._dir(name, version)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=final.parent))
        try:
            shutil.copytree(staging, tmp, dirs_exist_ok=True, symlinks=True)
            if final.exists():
                shutil.rmtree(final)  # a leftover of a failed earlier upload of this version
            os.replace(tmp, final)
        except BaseException:
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

    def put(self, name: str, version: int, staging: Path) -> None:
        files = {(name, version, f.relative_to(staging).as_posix()): f.read_bytes()
                 for f in staging.rglob("*") if f.is_file()}
        with self._lock:
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
