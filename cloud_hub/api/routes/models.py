"""The model registry: upload signed bundles, list and show them, download their files (with
HTTP Range, so an interrupted download resumes), and store signed rollback directives."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from cloud_hub.api.bounds import BundleName, NameFilter, Version
from cloud_hub.api.deps import SessionDep, SettingsDep, StateDep
from cloud_hub.artifacts import ArtifactNotFound
from cloud_hub.db import ModelVersion
from cloud_hub.errors import BundleRejected, NotFound, RegistryError, TooLarge
from cloud_hub.registry import accept_upload, add_rollback, get_model

router = APIRouter(prefix="/v1/models", tags=["models"])

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_STREAM_CHUNK = 256 << 10


class ModelOut(BaseModel):
    name: str
    version: int
    total_bytes: int
    keyid: str
    uploaded_at: float
    expires: str | None
    files: list[dict[str, Any]]


class ModelDetail(ModelOut):
    manifest: dict[str, Any]


def _out(row: ModelVersion, detail: bool = False) -> dict[str, Any]:
    m = row.manifest
    d = {"name": row.name, "version": row.version, "total_bytes": row.total_bytes,
         "keyid": row.keyid, "uploaded_at": row.uploaded_at, "expires": m.get("expires"),
         "files": m.get("files", [])}
    if detail:
        d["manifest"] = m
    return d


def error_response(exc: RegistryError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=exc.status)


@router.post("", status_code=201, response_model=ModelDetail,
             responses={409: {}, 413: {}, 422: {}})
async def upload_model(request: Request, settings: SettingsDep, state: StateDep) -> Any:
    """Upload a bundle as a tar (optionally gzip) of its folder. It is streamed to disk (refused
    past `max_bundle_bytes`), unpacked safely, and accepted only if a trusted key signed it and
    every file matches the manifest."""
    limit = settings.max_bundle_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        state.metrics.uploads.labels("too_large").inc()
        return error_response(TooLarge(f"upload of {declared} bytes exceeds the limit of "
                                       f"{limit} (EHI_HUB_MAX_BUNDLE_BYTES)"))
    work = settings.artifacts_dir / ".uploads"
    work.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".tar", dir=work)
    archive = Path(name)
    try:
        size = 0
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    state.metrics.uploads.labels("too_large").inc()
                    return error_response(TooLarge(f"upload exceeds the limit of {limit} bytes "
                                                   "(EHI_HUB_MAX_BUNDLE_BYTES)"))
                out.write(chunk)

        def accept() -> dict[str, Any]:
            with state.sessions() as s:
                row = accept_upload(s, state.artifacts, archive, work, settings.trusted(), limit)
                return _out(row, detail=True)

        try:
            body = await run_in_threadpool(accept)
        except RegistryError as exc:
            state.metrics.uploads.labels(type(exc).__name__).inc()
            return error_response(exc)
        state.metrics.uploads.labels("accepted").inc()
        return JSONResponse(body, status_code=201)
    finally:
        archive.unlink(missing_ok=True)


@router.get("", response_model=list[ModelOut])
def list_models(session: SessionDep, name: NameFilter = None) -> list[dict[str, Any]]:
    """Every bundle version in the registry, newest first within a name."""
    q = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version.desc())
    if name:
        q = q.where(ModelVersion.name == name)
    return [_out(r) for r in session.scalars(q)]


@router.get("/{name}/{version}", response_model=ModelDetail, responses={404: {}})
def show_model(name: BundleName, version: Version, session: SessionDep) -> Any:
    try:
        return _out(get_model(session, name, version), detail=True)
    except NotFound as exc:
        return error_response(exc)


@router.get("/{name}/{version}/files/{path:path}", responses={206: {}, 404: {}, 416: {}})
def download_file(name: BundleName, version: Version, path: str, request: Request,
                  session: SessionDep, state: StateDep) -> Response:
    """One file of a bundle. Honours a single `Range: bytes=a-b` (206), so a device resumes
    an interrupted download; the manifest's sha256 is sent as the ETag."""
    try:
        row = get_model(session, name, version)
        entry = next((f for f in row.manifest.get("files", []) if f.get("path") == path), None)
        if entry is None:
            raise NotFound(f"{name}@{version} has no file {path!r}")
        size = state.artifacts.size(name, version, path)
    except NotFound as exc:
        return error_response(exc)
    except ArtifactNotFound:
        return error_response(NotFound(f"{name}@{version}/{path} is missing from the store"))
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{entry.get("sha256")}"'}
    start, end = 0, size - 1
    status = 200
    rng = request.headers.get("range")
    if rng:
        m = _RANGE.fullmatch(rng.strip())
        if m is None or (not m.group(1) and not m.group(2)):
            pass  # multiple or malformed ranges: RFC 9110 lets a server send the whole file
        else:
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:  # the last N bytes
                start = max(0, size - int(m.group(2)))
            if start >= size or start > end:
                return Response(status_code=416, headers={**headers,
                                                          "Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    fh = state.artifacts.open(name, version, path)

    def body() -> Iterator[bytes]:
        with fh:
            fh.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = fh.read(min(_STREAM_CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

    return StreamingResponse(body(), status_code=status, headers=headers,
                             media_type="application/octet-stream")


@router.post("/{name}/rollbacks", status_code=201, responses={404: {}, 422: {}})
def upload_rollback(name: BundleName, directive: dict[str, Any], session: SessionDep,
                    settings: SettingsDep) -> Any:
    """Store a rollback directive (signed offline with a fleet key, `fleet models rollback`):
    it lets the hub assign `to_version` to devices running `from_version`."""
    if directive.get("name") != name:
        return error_response(BundleRejected(f"the directive is for {directive.get('name')!r}, "
                                             f"not {name!r}"))
    try:
        row = add_rollback(session, directive, settings.trusted())
    except RegistryError as exc:
        return error_response(exc)
    return {"name": row.name, "from_version": row.from_version, "to_version": row.to_version}
