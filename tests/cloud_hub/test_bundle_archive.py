"""Archives that promise more than they hold: compression bombs, oversized tar headers, members
that differ from the signed manifest. Each is refused before anything is written or held in
memory beyond a bound."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud_hub.bundle_archive import MAX_HEADER_BYTES, ArchiveTooLarge, BudgetReader
from cloud_hub.errors import BundleRejected
from cloud_hub.registry import unpack_bundle
from fleet.contract.bundle import pack_bundle
from tests.updates import UpdateKit

COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "none": lambda b: b, "gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress,
}


def _pax_bomb(declared: int) -> bytes:
    """A tar whose first member is a pax header declaring `declared` bytes (filled with a
    little padding only: the archive is tiny)."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = declared
    return info.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * (256 << 10)


@pytest.mark.parametrize("codec", sorted(COMPRESS))
def test_a_pax_header_declaring_a_gigabyte_is_refused_before_it_is_read(
        codec: str, kit: UpdateKit, tmp_path: Path) -> None:
    archive = tmp_path / "bomb.tar"
    archive.write_bytes(COMPRESS[codec](_pax_bomb(1 << 30)))
    staging = tmp_path / "s"
    staging.mkdir()
    tracemalloc.start()
    try:
        with pytest.raises(BundleRejected, match="header declares"):
            unpack_bundle(archive, staging, 512 << 20, [kit.pub])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{codec}: {peak} bytes held while refusing"
    assert list(staging.iterdir()) == []
    # A header of an ordinary size is read (and this one holds no bundle).
    archive.write_bytes(COMPRESS[codec](_pax_bomb(MAX_HEADER_BYTES // 2)))
    with pytest.raises(BundleRejected) as exc:
        unpack_bundle(archive, staging, 512 << 20, [kit.pub])
    assert "header declares" not in str(exc.value)


def test_the_budget_reader_stops_at_its_budget() -> None:
    bomb = gzip.compress(b"\0" * (8 << 20))  # 8 MiB from about 8 KiB
    r = BudgetReader(gzip.GzipFile(fileobj=io.BytesIO(bomb)), 1 << 20)
    got = 0
    with pytest.raises(ArchiveTooLarge, match="expands past"):
        while chunk := r.read(64 << 10):
            got += len(chunk)
    assert got <= 1 << 20
    assert len(BudgetReader(io.BytesIO(b"x" * 100), 100).read()) == 100


def _members(src: Path, change: Callable[[str, bytes], bytes] = lambda n, d: d,
             extra: dict[str, bytes] | None = None, skip: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for p in sorted(src.iterdir()):
            if p.name == skip:
                continue
            data = change(p.name, p.read_bytes())
            info = tarfile.TarInfo(p.name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_nothing_is_written_before_the_signature_and_sizes_hold(kit: UpdateKit,
                                                                tmp_path: Path) -> None:
    staging = tmp_path / "s"
    staging.mkdir()
    archive = tmp_path / "up.tar"
    cases = {
        # unsigned, with a big model: expands to 24 MiB, of which nothing may reach the disk
        "not signed": _members(kit.version(3, key=None),
                               lambda n, d: d + b"\0" * (24 << 20) if n == "model.onnx" else d),
        # signed, but a member is longer than the manifest says
        "bytes, the manifest says": _members(
            kit.version(3), lambda n, d: d + b"!" if n == "model.onnx" else d),
        "not listed": _members(kit.version(3), extra={"payload.sh": b"#!/bin/sh\n"}),
        "is missing": _members(kit.version(3), skip="fidelity.npz"),
    }
    for message, data in cases.items():
        archive.write_bytes(data)
        with pytest.raises(BundleRejected, match=message):
            unpack_bundle(archive, staging, 64 << 20, [kit.pub])
        assert list(staging.iterdir()) == [], message


def test_a_member_whose_bytes_differ_from_the_signed_hash_is_refused(kit: UpdateKit,
                                                                     tmp_path: Path) -> None:
    archive = tmp_path / "up.tar"
    archive.write_bytes(_members(kit.version(3), lambda n, d: d[:-1] + bytes([d[-1] ^ 1])
                                 if n == "model.onnx" else d))
    staging = tmp_path / "s"
    staging.mkdir()
    with pytest.raises(BundleRejected, match="sha256"):
        unpack_bundle(archive, staging, 64 << 20, [kit.pub])
    archive.write_bytes(pack_bundle(kit.version(3)))
    staging2 = tmp_path / "s2"
    staging2.mkdir()
    unpack_bundle(archive, staging2, 64 << 20, [kit.pub])
    assert sorted(p.name for p in staging2.iterdir()) == sorted(
        p.name for p in kit.version(3).iterdir())
