"""Fetching a bundle's files from the hub: streamed, resumable, held to the manifest.

Each file goes to `<name>.part` in the staging slot; an interrupted download resumes with an
HTTP Range request. Bytes beyond the manifest's length are refused as they arrive (a server
cannot fill the disk), and the finished file must match the manifest's sha256 before it is
renamed to its name.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from edge_agent.errors import UpdateFailed
from fleet.contract.bundle import FileEntry, sha256_file

log = logging.getLogger(__name__)

CHUNK = 64 << 10
# One read of the socket may take this long before the download counts as failed (resumable).
READ_TIMEOUT_S = 30.0


def file_url(hub_url: str, name: str, version: int, path: str) -> str:
    return (f"{hub_url.rstrip('/')}/v1/models/{urllib.parse.quote(name)}/{version}/files/"
            f"{urllib.parse.quote(path)}")


def fetch_file(url: str, dest: Path, entry: FileEntry, *, rate_bps: float = 0.0,
               timeout_s: float = READ_TIMEOUT_S) -> int:
    """Download `url` to `dest`, held to `entry`'s length and sha256; returns bytes fetched.

    Raises UpdateFailed: code "download" (network, resumable), "size" (more than stated) or
    "hash" (the content is not what the manifest says; the partial file is removed).
    """
    if dest.is_file() and dest.stat().st_size == entry.length and sha256_file(dest) == entry.sha256:
        return 0  # fetched before a restart
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > entry.length:
        part.unlink()
        have = 0
    fetched = 0
    if have < entry.length:
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                if have and resp.status != 206:
                    have = 0  # the server ignored the range: start over
                with part.open("ab" if have else "wb") as out:
                    fetched = _copy(resp, out, entry, have, rate_bps)
        except UpdateFailed:
            part.unlink(missing_ok=True)
            raise
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the connection
            raise UpdateFailed("download", f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise UpdateFailed("download", f"{url}: {exc}") from None
    size = part.stat().st_size
    if size < entry.length:
        raise UpdateFailed("download", f"{entry.path}: got {size} of {entry.length} bytes "
                                       "(will resume)")
    if sha256_file(part) != entry.sha256:
        part.unlink()
        raise UpdateFailed("hash", f"{entry.path} does not match the sha256 in the manifest")
    part.replace(dest)
    return fetched


def _copy(resp: object, out: object, entry: FileEntry, have: int, rate_bps: float) -> int:
    read = resp.read  # type: ignore[attr-defined]
    write = out.write  # type: ignore[attr-defined]
    budget = entry.length - have
    total = 0
    t0 = time.monotonic()
    while True:
        chunk = read(CHUNK)
        if not chunk:
            return total
        if total + len(chunk) > budget:
            raise UpdateFailed("size", f"{entry.path} is longer than the {entry.length} bytes "
                                       "the manifest states")
        write(chunk)
        total += len(chunk)
        if rate_bps > 0:
            ahead = total / rate_bps - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
