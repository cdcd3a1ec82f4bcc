"""Heartbeat figures from psutil: CPU, memory, temperature where the device has a sensor."""

from __future__ import annotations

import os
from typing import Any

import psutil


class TelemetrySampler:
    def __init__(self) -> None:
        self._proc = psutil.Process(os.getpid())
        # The first cpu_percent() call only starts the measurement window.
        self._proc.cpu_percent(None)
        psutil.cpu_percent(None)

    def sample(self) -> dict[str, Any]:
        mem = psutil.virtual_memory()
        out: dict[str, Any] = {
            "cpu_percent": psutil.cpu_percent(None),
            "process_cpu_percent": self._proc.cpu_percent(None),
            "rss_mb": round(self._proc.memory_info().rss / 2**20, 1),
            "memory_percent": mem.percent,
            "memory_available_mb": round(mem.available / 2**20, 1),
            "load_avg": list(os.getloadavg()),
        }
        temp = _max_temperature()
        if temp is not None:
            out["temperature_c"] = temp
        return out


def _max_temperature() -> float | None:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return None
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return None
    temps = [t.current for entries in sensors.values() for t in entries if t.current]
    return round(max(temps), 1) if temps else None
