"""The model bundle format: the one owner of `manifest.json` and its keys.

A bundle is a directory holding `manifest.json` and the files it lists (e.g. `model.onnx`).
The manifest names the model, its version (a monotonic integer), task and labels, the raw
input applications submit, the model's inputs and outputs, the preprocessing, the recommended
hard-example policy and threshold, compatible runtimes and hardware, the health check an
agent runs before it switches to the bundle (a golden input and its output, a latency budget),
the fidelity set it checks on its own backend (and the offload budget it calibrates for),
every file's length and sha256, and an expiry. `fleet/contract/signing.py` signs the canonical
manifest (Ed25519); `edge_agent/update_rules.py` decides what an agent accepts.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleet.contract.errors import BundleError
from fleet.contract.protocol import NAME_PATTERN

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
# A bundle's name is a folder name in every store and a topic-safe word in every message: no
# "/", no "." or ".." and nothing that normalises to another bundle's name.
BUNDLE_NAME = re.compile(NAME_PATTERN)
FILE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
# Versions are stored as 64-bit integers; beyond this a number is not a version.
MAX_VERSION = (1 << 53) - 1
# dtypes a bundle may declare for its tensors; anything else is refused at parse time.
TENSOR_DTYPES = frozenset({"float32", "float16", "uint8", "int8", "int32", "int64"})
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, dtype and shape of a tensor; -1 marks a free (batch) dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        dtype = _req(d, "dtype", str)
        if dtype not in TENSOR_DTYPES:
            raise BundleError(f"tensor dtype {dtype!r} is not one of {sorted(TENSOR_DTYPES)}")
        shape = _req(d, "shape", list)
        if not all(isinstance(s, int) and (s > 0 or s == -1) for s in shape):
            raise BundleError(f"tensor shape {shape!r} must be positive integers or -1")
        return cls(name=str(d.get("name", "")), dtype=dtype, shape=tuple(shape))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of the bundle with the length and sha256 it must have."""

    path: str
    length: int
    sha256: str
    role: str = "model"
    precision: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "length": self.length, "sha256": self.sha256,
                             "role": self.role}
        if self.precision:
            d["precision"] = self.precision
        return d


@dataclass(frozen=True, slots=True)
class HardExampleSpec:
    """The recommended hard-example policy, its threshold, and the thresholds fitted for others."""

    policy: str
    threshold: float
    thresholds: dict[str, float] = field(default_factory=dict)
    fitted_on: str = ""


@dataclass(frozen=True, slots=True)
class HealthSpec:
    """What an agent checks before it switches to a bundle: the model's output on the golden
    input (a file of the bundle, role "golden": an .npz with `input` and `output`) within
    `atol`, and its median single-input latency within `latency_budget_ms`."""

    golden: str
    atol: float
    latency_budget_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"golden": self.golden, "atol": self.atol,
                "latency_budget_ms": self.latency_budget_ms}


@dataclass(frozen=True, slots=True)
class FidelitySpec:
    """What an agent checks on the backend that will serve the bundle, before it serves it:
    the model's outputs on the fidelity set (a file of the bundle, role "fidelity": an .npz with
    `input`, raw samples drawn like the stream from the validation split, `reference`, the
    outputs the build computed, and `labels`) agree in top-1 with the reference on at least
    `min_agreement` of the samples. `offload_budget` is the share of inputs the hard-example
    threshold was fitted to offload: the device fits its own threshold on the fidelity set to
    offload that share. `reference` says how the build computed the reference outputs."""

    file: str
    min_agreement: float
    offload_budget: float | None = None
    reference: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "min_agreement": self.min_agreement,
                "offload_budget": self.offload_budget, "reference": self.reference}

    @classmethod
    def from_dict(cls, d: Any, files: set[str]) -> FidelitySpec:
        if not isinstance(d, dict):
            raise BundleError("manifest field 'fidelity' must be an object")
        spec = cls(file=_req(d, "file", str),
                   min_agreement=float(_req(d, "min_agreement", (int, float))),
                   offload_budget=(None if d.get("offload_budget") is None
                                   else float(_req(d, "offload_budget", (int, float)))),
                   reference=str(d.get("reference", "")))
        if spec.file not in files:
            raise BundleError(f"the fidelity file {spec.file!r} is not among the bundle's files")
        if not 0.0 < spec.min_agreement <= 1.0:
            raise BundleError(f"fidelity min_agreement {spec.min_agreement} is not in (0, 1]")
        if spec.offload_budget is not None and not 0.0 < spec.offload_budget < 1.0:
            raise BundleError(f"fidelity offload_budget {spec.offload_budget} is not in (0, 1)")
        return spec


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    version: int
    task: str
    labels: tuple[str, ...]
    raw_input: TensorSpec
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocessing: tuple[dict[str, Any], ...]
    hard_example: HardExampleSpec | None
    runtimes: tuple[str, ...]
    files: tuple[FileEntry, ...]
    expires: datetime | None
    metrics: dict[str, Any]
    extra: dict[str, Any]
    # Hardware tags the bundle runs on (e.g. "x86_64", "aarch64", "rpi4"); empty: any device.
    hardware: tuple[str, ...] = ()
    health: HealthSpec | None = None
    fidelity: FidelitySpec | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.length for f in self.files)

    @property
    def ref(self) -> str:
        """`name@version`, how messages and records name a model."""
        return f"{self.name}@{self.version}"

    def model_file(self) -> FileEntry:
        for f in self.files:
            if f.role == "model":
                return f
        raise BundleError(f"bundle {self.ref} lists no file with role 'model'")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if not isinstance(d, dict):
            raise BundleError("manifest must be a JSON object")
        schema = d.get("schema")
        if schema != SCHEMA_VERSION:
            raise BundleError(f"manifest schema {schema!r} is not supported "
                              f"(want {SCHEMA_VERSION})")
        name = _req(d, "name", str)
        if not BUNDLE_NAME.fullmatch(name):
            raise BundleError(f"bundle name {name!r} is not a plain name: 1-64 letters, digits, "
                              "'.', '_' or '-', starting with a letter or digit")
        version = _req(d, "version", int)
        if not 1 <= version <= MAX_VERSION:
            raise BundleError(f"manifest version must be an integer in 1..{MAX_VERSION}")
        he = d.get("hard_example")
        hard = None
        if he is not None:
            hard = HardExampleSpec(
                policy=_req(he, "policy", str),
                threshold=float(_req(he, "threshold", (int, float))),
                thresholds={str(k): float(v) for k, v in he.get("thresholds", {}).items()},
                fitted_on=str(he.get("fitted_on", "")),
            )
        files = []
        seen: set[str] = set()
        for f in _req(d, "files", list):
            length = _req(f, "length", int)
            digest = _req(f, "sha256", str)
            path = _req(f, "path", str)
            if length < 0 or len(digest) != 64:
                raise BundleError(f"file entry {path!r} needs a length >= 0 and a sha256 "
                                  "hex digest")
            if not all(FILE_PART.fullmatch(part) for part in path.split("/")):
                raise BundleError(f"file path {path!r} must be a plain relative path inside the "
                                  "bundle: parts of letters, digits, '.', '_' or '-', none "
                                  "starting with '.'")
            if path in seen:
                raise BundleError(f"file path {path!r} is listed twice")
            seen.add(path)
            files.append(FileEntry(path=path, length=length, sha256=digest,
                                   role=str(f.get("role", "model")),
                                   precision=str(f.get("precision", ""))))
        expires = d.get("expires")
        health = None
        if (hd := d.get("health")) is not None:
            if not isinstance(hd, dict):
                raise BundleError("manifest field 'health' must be an object")
            health = HealthSpec(golden=_req(hd, "golden", str),
                                atol=float(_req(hd, "atol", (int, float))),
                                latency_budget_ms=float(_req(hd, "latency_budget_ms",
                                                             (int, float))))
            if health.golden not in {f.path for f in files}:
                raise BundleError(f"the golden file {health.golden!r} is not among the "
                                  "bundle's files")
        fidelity = None
        if (fd := d.get("fidelity")) is not None:
            fidelity = FidelitySpec.from_dict(fd, {f.path for f in files})
        known = {"schema", "name", "version", "task", "labels", "raw_input", "inputs", "outputs",
                 "preprocessing", "hard_example", "runtimes", "files", "expires", "metrics",
                 "hardware", "health", "fidelity"}
        return cls(
            name=name,
            version=version,
            task=_req(d, "task", str),
            labels=tuple(str(x) for x in _req(d, "labels", list)),
            raw_input=TensorSpec.from_dict(_req(d, "raw_input", dict)),
            inputs=tuple(TensorSpec.from_dict(x) for x in _req(d, "inputs", list)),
            outputs=tuple(TensorSpec.from_dict(x) for x in _req(d, "outputs", list)),
            preprocessing=tuple(_req(d, "preprocessing", list)),
            hard_example=hard,
            runtimes=tuple(str(x) for x in d.get("runtimes", [])),
            files=tuple(files),
            expires=parse_time(expires) if expires else None,
            metrics=dict(d.get("metrics", {})),
            extra={k: v for k, v in d.items() if k not in known},
            hardware=tuple(str(x) for x in d.get("hardware", [])),
            health=health,
            fidelity=fidelity,
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "labels": list(self.labels),
            "raw_input": self.raw_input.to_dict(),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "preprocessing": list(self.preprocessing),
            "runtimes": list(self.runtimes),
            "files": [f.to_dict() for f in self.files],
            "expires": self.expires.isoformat() if self.expires else None,
            "metrics": self.metrics,
        }
        if self.hardware:
            d["hardware"] = list(self.hardware)
        if self.health is not None:
            d["health"] = self.health.to_dict()
        if self.fidelity is not None:
            d["fidelity"] = self.fidelity.to_dict()
        if self.hard_example is not None:
            d["hard_example"] = {
                "policy": self.hard_example.policy,
                "threshold": self.hard_example.threshold,
                "thresholds": self.hard_example.thresholds,
                "fitted_on": self.hard_example.fitted_on,
            }
        d.update(self.extra)
        return d


@dataclass(frozen=True, slots=True)
class Bundle:
    """A manifest and the directory that holds its files."""

    root: Path
    manifest: Manifest

    def path_of(self, entry: FileEntry) -> Path:
        return self.root / entry.path

    @property
    def model_path(self) -> Path:
        return self.path_of(self.manifest.model_file())


def canonical_json(d: dict[str, Any]) -> bytes:
    """The canonical form of a manifest: sorted keys, no spaces, UTF-8 (what a signature covers)."""
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entry(root: Path, rel: str, role: str = "model", precision: str = "") -> FileEntry:
    p = root / rel
    return FileEntry(path=rel, length=p.stat().st_size, sha256=sha256_file(p), role=role,
                     precision=precision)


def load_bundle(root: Path | str, *, verify_files: bool = True,
                now: datetime | None = None) -> Bundle:
    """Read a bundle directory; check every file's length and sha256 and the expiry.

    Raises BundleError with a message naming the file or field at fault.
    """
    root = Path(root)
    mpath = root / MANIFEST_NAME
    try:
        raw = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise BundleError(f"{mpath} not found: is {root} a model bundle?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath} is not valid JSON: {exc}") from None
    manifest = Manifest.from_dict(raw)
    now = now or datetime.now(UTC)
    if manifest.expires is not None and manifest.expires <= now:
        raise BundleError(f"bundle {manifest.ref} expired at {manifest.expires.isoformat()}")
    if verify_files:
        for entry in manifest.files:
            p = root / entry.path
            if not p.is_file():
                raise BundleError(f"bundle {manifest.ref}: file {entry.path} is missing")
            size = p.stat().st_size
            if size != entry.length:
                raise BundleError(f"bundle {manifest.ref}: {entry.path} is {size} bytes, "
                                  f"manifest says {entry.length}")
            if sha256_file(p) != entry.sha256:
                raise BundleError(f"bundle {manifest.ref}: {entry.path} does not match its sha256")
    return Bundle(root=root, manifest=manifest)


def pack_bundle(root: Path) -> bytes:
    """The bundle as a gzip'd tar: `manifest.json` and the files it lists, at the top level
    (what the hub's registry takes). Only listed files go in; nothing outside the folder."""
    import io
    import tarfile

    b = load_bundle(root)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for rel in (MANIFEST_NAME, *(f.path for f in b.manifest.files)):
            info = tf.gettarinfo(str(root / rel), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with (root / rel).open("rb") as fh:
                tf.addfile(info, fh)
    return buf.getvalue()


def write_manifest(root: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True)
    (root / MANIFEST_NAME).write_text(text + "\n")


def parse_time(v: Any) -> datetime:
    """An ISO 8601 time with its UTC offset (a time without one is ambiguous: refused)."""
    try:
        t = datetime.fromisoformat(str(v))
    except ValueError:
        raise BundleError(f"time {v!r} is not ISO 8601") from None
    if t.tzinfo is None:
        raise BundleError(f"time {v!r} has no UTC offset")
    return t


def _req(d: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    if key not in d:
        raise BundleError(f"manifest is missing {key!r}")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, typ):
        raise BundleError(f"manifest field {key!r} has the wrong type ({type(v).__name__})")
    return v
