"""Process-wide tuning that the daemons' entry points apply (never library code)."""

from __future__ import annotations

import gc
import os
import sys

# CPython hands the GIL to a waiting thread only every 5 ms by default. The agent and the hub
# pass every offload between threads (paho's network thread, the worker, the caller), and each
# hand-off can wait a full interval while another thread computes (ingest, telemetry): that is
# the offload latency tail. A shorter interval trades a little throughput for that tail; the
# measurements are in docs/benchmarks.md. EHI_GIL_SWITCH_INTERVAL_S overrides it.
GIL_SWITCH_INTERVAL_S = 0.0005
_ENV = "EHI_GIL_SWITCH_INTERVAL_S"


def tune_gil_switch_interval() -> float:
    interval = float(os.environ.get(_ENV, GIL_SWITCH_INTERVAL_S))
    sys.setswitchinterval(interval)
    return interval


def freeze_startup_heap() -> None:
    """Move every object alive after start-up (modules, the model, the app) out of the garbage
    collector's sight: a full collection then walks only what the daemon made since, instead of
    the whole heap. A full collection of the hub's heap took 40-100 ms in the middle of a
    /v1/stats over a fleet's sums, and would in an answer too (docs/benchmarks.md)."""
    gc.collect()
    gc.freeze()
