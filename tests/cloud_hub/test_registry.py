"""The model registry: hostile archives, signature checks, listing, ranged downloads, rollback
directives; on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cloud_hub.artifacts import (
    ArtifactNotFound,
    DatabaseArtifactStore,
    LocalArtifactStore,
    MemoryArtifactStore,
)
from cloud_hub.db import init_db, make_engine, session_factory
from cloud_hub.errors import BundleRejected, Conflict
from cloud_hub.main import create_app
from cloud_hub.registry import accept_upload, get_model, unpack_bundle
from fleet.contract.assignment import rollback_directive
from fleet.contract.bundle import pack_bundle
from fleet.contract.signing import PrivateKey, generate_keys
from tests.updates import UpdateKit, hub_settings


def _tar(members: Sequence[tuple[tarfile.TarInfo, bytes | None]], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, hard: bool = False) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info, None


HOSTILE: dict[str, list[tuple[tarfile.TarInfo, bytes | None]]] = {
    "dotdot": [_file("../escape.txt", b"x")],
    "nested-dotdot": [_file("bundle/../../escape.txt", b"x")],
    "absolute": [_file("/tmp/escape.txt", b"x")],
    "symlink": [_link("model.onnx", "/etc/passwd")],
    "hardlink": [_link("model.onnx", "/etc/passwd", hard=True)],
    "symlink-then-write": [_link("d", ".."), _file("d/escape.txt", b"x")],
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_archives_are_refused_before_writing_outside_staging(name: str, kit: UpdateKit,
                                                                     tmp_path: Path) -> None:
    archive = tmp_path / "up.tar"
    archive.write_bytes(_tar(HOSTILE[name]))
    staging = tmp_path / "work" / "staging"
    staging.mkdir(parents=True)
    with pytest.raises(BundleRejected):
        unpack_bundle(archive, staging, 1 << 20, [kit.pub])
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "work" / "escape.txt")\
        .exists()
    assert list(staging.iterdir()) == []  # refused before any member was written


def test_a_huge_declared_size_is_refused_without_reading_it(kit: UpdateKit,
                                                             tmp_path: Path) -> None:
    info = tarfile.TarInfo("model.onnx")
    info.size = 1 << 40  # a tar header claiming a terabyte; the archive itself is tiny
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    archive = tmp_path / "up.tar"
    archive.write_bytes(header + b"\0" * 1024)
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(BundleRejected, match="declares"):
        unpack_bundle(archive, staging, 1 << 20, [kit.pub])
    assert list(staging.iterdir()) == []
    archive.write_bytes(b"this is no tar")
    with pytest.raises(BundleRejected, match="tar"):
        unpack_bundle(archive, staging, 1 << 20, [kit.pub])


def test_a_folder_archive_unpacks_without_its_top_folder(kit: UpdateKit, tmp_path: Path) -> None:
    src = kit.version(2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(src, arcname="digits-edge-2")
    (tmp_path / "up.tar").write_bytes(buf.getvalue())
    (tmp_path / "s").mkdir()
    unpack_bundle(tmp_path / "up.tar", tmp_path / "s", 1 << 20, [kit.pub])
    assert (tmp_path / "s" / "manifest.json").is_file()


@pytest.mark.parametrize("store_kind", ["local", "memory", "database"])
def test_artifact_stores_keep_files_and_refuse_escapes(store_kind: str, kit: UpdateKit,
                                                       tmp_path: Path, database_url: str,
                                                       request: pytest.FixtureRequest) -> None:
    store: Any
    eng = make_engine(database_url)
    request.addfinalizer(eng.dispose)
    init_db(eng)
    sessions = session_factory(eng)
    if store_kind == "database":
        store = DatabaseArtifactStore(sessions)
    else:
        store = (LocalArtifactStore(tmp_path / "a") if store_kind == "local"
                 else MemoryArtifactStore())
    with sessions() as s:
        store.put("digits-edge", 2, kit.version(2), s, lambda _: None)
    data = (kit.version(2) / "model.onnx").read_bytes()
    assert store.size("digits-edge", 2, "model.onnx") == len(data)
    with store.open("digits-edge", 2, "model.onnx") as fh:
        assert fh.read() == data
    with store.open("digits-edge", 2, "model.onnx") as fh:  # ranged reads seek
        fh.seek(1000)
        assert fh.read(300) == data[1000:1300]
    for bad in ("../../etc/passwd", "/etc/passwd", "nope.onnx"):
        with pytest.raises(ArtifactNotFound):
            store.size("digits-edge", 2, bad)
    store.delete("digits-edge", 2)
    with pytest.raises(ArtifactNotFound):
        store.size("digits-edge", 2, "model.onnx")


@pytest.fixture(params=["local", "database"])
def api(database_url: str, kit: UpdateKit, tmp_path: Path,
        request: pytest.FixtureRequest) -> Iterator[TestClient]:
    app = create_app(hub_settings(tmp_path, kit, database_url=database_url,
                                  max_bundle_bytes=200_000, artifact_store=request.param),
                     with_bridge=False)
    with TestClient(app) as c:
        yield c


def test_upload_list_show_and_refusals(api: TestClient, kit: UpdateKit, tmp_path: Path) -> None:
    r = api.post("/v1/models", content=pack_bundle(kit.version(2)))
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["name"], body["version"], body["keyid"]) == ("digits-edge", 2, kit.pub.keyid)
    assert body["manifest"]["signatures"]
    again = api.post("/v1/models", content=pack_bundle(kit.version(2)))
    assert again.status_code == 409 and "immutable" in again.json()["detail"]
    unsigned = api.post("/v1/models", content=pack_bundle(kit.version(3, key=None)))
    assert unsigned.status_code == 422 and "not signed" in unsigned.json()["detail"]
    generate_keys(tmp_path / "o.key", tmp_path / "o.pub")
    stranger = api.post("/v1/models", content=pack_bundle(kit.version(3, key=tmp_path / "o.key")))
    assert stranger.status_code == 422 and "trusted" in stranger.json()["detail"]
    # A file altered inside the archive (the manifest still names the old hash).
    src = kit.version(3)
    files = [_file(p.name, p.read_bytes()) for p in sorted(src.iterdir())]
    files = [(i, d + b"!" if i.name == "model.onnx" else d) for i, d in files]
    for i, d in files:
        i.size = len(d)
    altered = api.post("/v1/models", content=_tar(files))
    assert altered.status_code == 422 and "model.onnx" in altered.json()["detail"]
    # An extra file the manifest does not list.
    extra = api.post("/v1/models", content=_tar([_file(p.name, p.read_bytes())
                                                 for p in sorted(src.iterdir())]
                                                + [_file("payload.sh", b"#!/bin/sh\n")]))
    assert extra.status_code == 422 and "payload.sh" in extra.json()["detail"]
    big = api.post("/v1/models", content=b"\0" * 300_000)
    assert big.status_code == 413
    assert api.post("/v1/models", content=pack_bundle(kit.version(3))).status_code == 201
    listed = api.get("/v1/models").json()
    assert [(m["name"], m["version"]) for m in listed] == [("digits-edge", 3), ("digits-edge", 2)]
    assert api.get("/v1/models/digits-edge/3").json()["manifest"]["version"] == 3
    assert api.get("/v1/models/digits-edge/9").status_code == 404


def test_file_download_honours_ranges(api: TestClient, kit: UpdateKit) -> None:
    assert api.post("/v1/models", content=pack_bundle(kit.version(2))).status_code == 201
    data = (kit.version(2) / "model.onnx").read_bytes()
    url = "/v1/models/digits-edge/2/files/model.onnx"
    full = api.get(url)
    assert full.status_code == 200 and full.content == data
    assert full.headers["accept-ranges"] == "bytes" and full.headers["etag"].strip('"')
    part = api.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    assert api.get(url, headers={"Range": "bytes=5000-"}).content == data[5000:]
    assert api.get(url, headers={"Range": "bytes=-10"}).content == data[-10:]
    r = api.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    assert api.get(url, headers={"Range": "bytes=0-1,5-6"}).content == data  # whole file
    assert api.get("/v1/models/digits-edge/2/files/../../etc/passwd").status_code == 404
    assert api.get("/v1/models/digits-edge/2/files/other.bin").status_code == 404


def test_rollback_directives_are_checked_and_stored(api: TestClient, kit: UpdateKit,
                                                    tmp_path: Path) -> None:
    assert api.post("/v1/models", content=pack_bundle(kit.version(2))).status_code == 201
    soon = datetime.now(UTC) + timedelta(days=1)
    good = rollback_directive("digits-edge", 3, 2, soon, PrivateKey.read(kit.key))
    r = api.post("/v1/models/digits-edge/rollbacks", json=good)
    assert r.status_code == 201, r.text
    stranger = PrivateKey.read_or_generate(tmp_path / "s.key")
    bad = rollback_directive("digits-edge", 3, 2, soon, stranger)
    assert api.post("/v1/models/digits-edge/rollbacks", json=bad).status_code == 422
    to_missing = rollback_directive("digits-edge", 3, 1, soon, PrivateKey.read(kit.key))
    assert api.post("/v1/models/digits-edge/rollbacks", json=to_missing).status_code == 404


def test_assigning_needs_the_bridge_and_a_known_device(api: TestClient) -> None:
    r = api.put("/v1/devices/dev-1/desired", json={"model": "digits-edge", "version": 2})
    assert r.status_code == 503 and "bridge" in r.json()["detail"]
    keys = api.get("/v1/keys").json()
    assert len(keys["assignment"]["keyid"]) == 16 and keys["trusted_bundle_keys"]


@pytest.mark.parametrize("store_kind", ["local", "database"])
def test_concurrent_uploads_of_one_version_leave_one_whole_bundle(
        store_kind: str, kit: UpdateKit, tmp_path: Path, database_url: str,
        request: pytest.FixtureRequest) -> None:
    """Two different signed bundles with the same name@version uploaded at the same moment:
    one is accepted whole (the registry's manifest is the one its files hold), the other gets
    Conflict and leaves nothing."""
    eng = make_engine(database_url)
    request.addfinalizer(eng.dispose)
    init_db(eng)
    sessions = session_factory(eng)
    store: Any = (DatabaseArtifactStore(sessions) if store_kind == "database"
                  else LocalArtifactStore(tmp_path / "a"))
    for trial in range(3):
        v = 20 + trial
        archives = []
        for year in (2030, 2031):
            arc = tmp_path / f"v{v}-{year}.tar.gz"
            arc.write_bytes(pack_bundle(kit.version(v, expires=f"{year}-01-01T00:00:00+00:00")))
            archives.append(arc)
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def upload(archive: Path, barrier: threading.Barrier = barrier,
                   outcomes: list[str] = outcomes) -> None:
            with sessions() as s:
                barrier.wait()
                try:
                    accept_upload(s, store, archive, tmp_path / "work", [kit.pub], 1 << 26)
                    outcomes.append("accepted")
                except Conflict:
                    outcomes.append("conflict")

        threads = [threading.Thread(target=upload, args=(a,)) for a in archives]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(outcomes) == ["accepted", "conflict"], outcomes
        with sessions() as s:
            registered = get_model(s, "digits-edge", v).manifest
        with store.open("digits-edge", v, "manifest.json") as fh:
            assert json.loads(fh.read()) == registered
