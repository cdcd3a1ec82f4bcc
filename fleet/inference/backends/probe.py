"""Probing a backend in a child process before the agent loads it: a runtime that crashes
natively (a segfault in a compiler, an illegal instruction on this CPU) takes down the probe, not
the agent, and that backend is refused with the reason (`crashed (SIGSEGV) ...`).

    python -m fleet.inference.backends.probe OPENER NAME MODEL OPTIONS_JSON SAMPLE_NPZ

opens backend NAME on MODEL with OPENER ("module:function", `open_backend`'s signature) and
runs it once on the sample; exit status 0 when both worked.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fleet.inference.backends.base import BackendOptions

log = logging.getLogger(__name__)

DEFAULT_OPENER = "fleet.inference.backends:open_backend"
# A probe that has not loaded and run the model by then is taken as hung. Compiling a large
# model with OpenVINO on a slow ARM board takes tens of seconds.
PROBE_TIMEOUT_S = 180.0
STDERR_TAIL_CHARS = 300


def _options_json(options: BackendOptions) -> str:
    d = dataclasses.asdict(options)
    d["cache_dir"] = str(options.cache_dir) if options.cache_dir is not None else None
    d["preprocessing"] = list(options.preprocessing)
    return json.dumps(d)


def _options_from_json(text: str) -> BackendOptions:
    d: dict[str, Any] = json.loads(text)
    d["cache_dir"] = Path(d["cache_dir"]) if d.get("cache_dir") else None
    d["preprocessing"] = tuple(d.get("preprocessing") or ())
    return BackendOptions(**d)


def probe_backend(name: str, model_path: Path, options: BackendOptions, raw: np.ndarray,
          preprocessed: np.ndarray, opener: str = DEFAULT_OPENER,
          timeout_s: float | None = None) -> str | None:
    """None if `name` loaded `model_path` and ran a sample (`raw` if it preprocesses itself,
    else `preprocessed`) in a child process, else why not."""
    timeout_s = PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    with tempfile.TemporaryDirectory(prefix="ehi-probe-") as d:
        x = Path(d) / "sample.npz"
        np.savez(x, raw=raw, pre=preprocessed)
        cmd = [sys.executable, "-m", "fleet.inference.backends.probe", opener, name,
               str(model_path), _options_json(options), str(x)]
        try:
            r = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return f"hung: it did not load and run the model within {timeout_s:g} s (probe)"
    if r.returncode < 0:
        try:
            sig = signal.Signals(-r.returncode).name
        except ValueError:
            sig = f"signal {-r.returncode}"
        return (f"crashed ({sig}) loading or running the model in a probe process; not "
                "loaded into the agent")
    if r.returncode != 0:
        tail = r.stderr.decode("utf-8", "replace").strip().splitlines()
        return f"failed in a probe process: {tail[-1][-STDERR_TAIL_CHARS:] if tail else '?'}"
    return None


def _main(argv: list[str]) -> int:
    opener, name, model, options, sample = argv
    module, _, fn = opener.partition(":")
    open_backend = getattr(importlib.import_module(module), fn)
    be = open_backend(name, Path(model), _options_from_json(options))
    try:
        with np.load(sample) as d:
            be.run(d["raw"] if be.takes_raw else d["pre"])
    finally:
        be.close()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
