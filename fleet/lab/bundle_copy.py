"""Deriving a bundle from another: a new version of the same files, with manifest changes, signed.

What a release pipeline does when only the version (or the expiry, the hardware list, the
health limits) changes; also how tests and benchmarks make the versions they roll out.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleet.contract.bundle import MANIFEST_NAME, file_entry
from fleet.contract.signing import SIGNATURES_KEY, PrivateKey


def copy_bundle(src: Path, dst: Path, *, version: int, key: Path | None,
                changes: dict[str, Any] | None = None,
                edit_files: Callable[[Path], None] | None = None) -> Path:
    """Copy bundle `src` to `dst` as `version`, apply `changes` to the manifest's top-level
    fields, let `edit_files(dst)` change files (their lengths and hashes are recomputed), and
    sign with `key` (None leaves it unsigned)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    d = json.loads((dst / MANIFEST_NAME).read_text())
    d.pop(SIGNATURES_KEY, None)
    if edit_files is not None:
        edit_files(dst)
    d["files"] = [{**f, **file_entry(dst, f["path"], f.get("role", "model"),
                                     f.get("precision", "")).to_dict()} for f in d["files"]]
    d["version"] = version
    d.update(changes or {})
    if key is not None:
        # Signed as is (the file entries were just computed): an expiry in the past is
        # allowed here, so that tests can hold agents to refusing it.
        d = PrivateKey.read(key).sign(d)
    (dst / MANIFEST_NAME).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    return dst


def break_golden(bundle: Path) -> None:
    """Change the recorded golden output so that the bundle fails its health check (for tests
    and benchmarks of the revert path); the manifest must be rewritten and signed after."""
    import numpy as np

    path = bundle / "golden.npz"
    with np.load(path) as z:
        x, out = z["input"], z["output"]
    np.savez(path, input=x, output=np.roll(out, 1, axis=-1))


def break_fidelity(bundle: Path, share: float = 0.05) -> None:
    """Change the top-1 class of `share` of the fidelity set's reference outputs, so that every
    backend falls below the floor (for tests of the `fidelity` refusal); the manifest must be
    rewritten and signed after."""
    import numpy as np

    path = bundle / "fidelity.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    ref = arrays["reference"].copy()
    n = max(1, int(len(ref) * share))
    ref[:n] = np.roll(ref[:n], 1, axis=-1)
    arrays["reference"] = ref
    np.savez_compressed(path, allow_pickle=False, **arrays)
