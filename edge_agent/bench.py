"""`edge-agent bench`: how fast a bundle runs on this device, and what the agent adds.

For each backend, side by side and alternating in rounds, on the same session:
- bare:  the runtime's own call on an already preprocessed tensor (`InferenceBackend.bare_runner`);
- agent: `Agent.infer` in-process (preprocessing, inference, the hard-example policy, the result
         record stored in the durable outbox), with the broker away so that no input waits on
         the cloud;
- agent_mem: the same with the outbox in memory: `agent / agent_mem` is what durability costs;
- api:   the same through the local API's HTTP transport from a keep-alive client;
then, in a fresh process each time, the cold start (process start to first answer over the
local API) and the resident memory and idle CPU of the agent.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.agent import Agent
from edge_agent.config import AgentSettings, default_cache_dir, write_settings
from edge_agent.local_api import LocalApi
from edge_agent.outbox_store import EntryKind
from fleet.inference.engine import Engine
from fleet.transport.mqtt import Will
from fleet.transport.ports import free_port

DEFAULT_ROUNDS = 5
COLD_STARTS = 3
COLD_START_TIMEOUT_S = 30.0
# After the first answer: inputs sent before the memory is read, and how long idle CPU is read.
WARM_INPUTS = 200
IDLE_WINDOW_S = 3.0
PATHS = ("bare", "agent", "agent_mem", "api")


class _Offline:
    """A transport that is never connected: hard inputs are answered at the edge at once."""

    connected = False

    def start(self) -> None:
        pass

    def wait_connected(self, timeout: float) -> bool:
        return False

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                expiry_s: float | None = None) -> bool:
        return False

    def stop(self, final: tuple[str, bytes, int, bool] | None = None) -> None:
        pass


def _offline(_on_message: object, _subs: object, _on_connect: object, _will: Will) -> _Offline:
    return _Offline()


@dataclass
class Series:
    """Per-call latencies of one path; a call handles `batch` inputs."""

    batch: int
    seconds: float = 0.0
    calls: int = 0
    latencies: list[float] = field(default_factory=list)

    def run(self, fn: Callable[[], object], seconds: float) -> None:
        end = time.perf_counter() + seconds
        lat = self.latencies
        t_start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            lat.append(t1 - t0)
            if t1 >= end:
                break
        self.seconds += time.perf_counter() - t_start
        self.calls = len(lat)

    @property
    def ips(self) -> float:
        return self.calls * self.batch / self.seconds if self.seconds else 0.0

    def pct_us(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1e6) if self.latencies else 0.0


def sample_inputs(engine: Engine, batch: int, seed: int = 0) -> np.ndarray:
    """Random raw inputs of the bundle's `raw_input` spec, within its preprocessing range."""
    spec = engine.manifest.raw_input
    rng = np.random.default_rng(seed)
    hi = next((float(s["max"]) for s in engine.manifest.preprocessing
               if s.get("type") == "minmax"), 1.0)
    x = rng.uniform(0, hi, size=(batch, *spec.shape))
    return x.astype(spec.dtype)


class _Setup:
    """The three paths of one backend, ready to be timed."""

    def __init__(self, bundle: Path, backend: str, batch: int, threads: int,
                 late_answers: bool = False) -> None:
        self.engine = Engine.open(bundle, backend, threads)
        self.name = self.engine.backend.name
        raw = sample_inputs(self.engine, batch)
        # The runtime's own call on what it takes: our preprocessed tensor, or for a backend
        # that compiled the preprocessing into the model, the raw images.
        model_in = raw if self.engine.backend.takes_raw else self.engine.preprocess(raw)
        self.bare = self.engine.backend.bare_runner(np.ascontiguousarray(model_in))
        self.tmp = tempfile.TemporaryDirectory()
        self.agents = []
        for store in ("sqlite", "memory"):
            # The local path: with the broker away nothing is offloaded, and hard inputs are not
            # kept for a late answer (offline, random inputs are all hard; keeping each one is
            # the offline path's cost, measured apart in docs/benchmarks.md).
            settings = AgentSettings(
                device_id=f"bench-{self.name}", bundle=bundle, telemetry_interval_s=3600,
                local_api={"port": -1}, offload={"late_answers": late_answers},
                results={"store": store, "outbox_dir": Path(self.tmp.name) / "outbox"})
            # Started: the sender thread moves the journal into SQLite as in production.
            a = Agent(settings, engine=self.engine, transport_factory=_offline)
            a.start()
            self.agents.append(a)
        self.agent, agent_mem = self.agents
        agent = self.agent
        one = raw[0]
        self.agent_call: Callable[[], object] = (
            (lambda: agent.infer(one)) if batch == 1 else (lambda: agent.infer_batch(raw)))
        self.agent_mem_call: Callable[[], object] = (
            (lambda: agent_mem.infer(one)) if batch == 1 else (lambda: agent_mem.infer_batch(raw)))
        self.api = LocalApi(agent, "127.0.0.1", 0, max_body_bytes=1 << 30)
        self.api.start()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.api.port, timeout=30)
        body = (one if batch == 1 else raw).tobytes()
        shape = ",".join(str(s) for s in (one if batch == 1 else raw).shape)
        headers = {"Content-Type": "application/octet-stream",
                   "X-EHI-Dtype": raw.dtype.name, "X-EHI-Shape": shape}
        conn = self.conn

        def api_call() -> object:
            conn.request("POST", "/v1/infer", body, headers)
            r = conn.getresponse()
            data = r.read()
            if r.status != 200:
                raise RuntimeError(f"local API answered {r.status}: {data[:200]!r}")
            return data

        self.api_call = api_call
        self.series = {p: Series(batch) for p in PATHS}

    def forget_results(self) -> None:
        """Keep the outboxes small between rounds, as a hub's acknowledgements would."""
        for a in self.agents:
            forget_outbox(a)

    def close(self) -> None:
        self.conn.close()
        self.api.stop()
        for a in self.agents:
            a.stop()
        self.tmp.cleanup()


def forget_outbox(agent: Agent) -> None:
    """Acknowledge everything in an agent's outbox, as if the hub had stored it."""
    ob = agent.outbox
    for kind in EntryKind:
        while batch := ob.due(kind, 1000, 1 << 30, 1 << 30):
            ob.ack(kind, batch.ids)


def measure_paths(bundle: Path, backends: list[str], batch: int, seconds: float, rounds: int,
                  threads: int = 1, late_answers: bool = False) -> dict[str, dict[str, Series]]:
    setups = [_Setup(bundle, b, batch, threads, late_answers) for b in backends]
    try:
        slice_s = seconds / rounds
        for s in setups:  # warm-up, not recorded
            for fn in (s.bare, s.agent_call, s.agent_mem_call, s.api_call):
                Series(batch).run(fn, min(0.2, slice_s))
            s.forget_results()
        for _ in range(rounds):
            for s in setups:
                for path, fn in (("bare", s.bare), ("agent", s.agent_call),
                                 ("agent_mem", s.agent_mem_call), ("api", s.api_call)):
                    s.series[path].run(fn, slice_s)
                    s.forget_results()
        return {s.name: s.series for s in setups}
    finally:
        for s in setups:
            s.close()


def cold_start(bundle: Path, backend: str, threads: int = 1,
               late_answers: bool = False) -> dict[str, float]:
    """Start `edge-agent run` (no broker reachable); time its first answer; read RSS, idle CPU."""
    import psutil

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "agent.toml"
        write_settings(cfg, {
            "device_id": "bench-cold", "bundle": bundle, "backend": backend,
            "threads": threads, "cache_dir": default_cache_dir(), "telemetry_interval_s": 10,
            "mqtt": {"port": free_port()},  # nothing listens there: no broker
            "local_api": {"port": port}, "offload": {"late_answers": late_answers},
            "results": {"outbox_dir": Path(tmp) / "outbox"}})
        eng = Engine.open(bundle, backend, threads)
        one = sample_inputs(eng, 1)[0]
        eng.close()
        body = one.tobytes()
        headers = {"Content-Type": "application/octet-stream", "X-EHI-Dtype": one.dtype.name,
                   "X-EHI-Shape": ",".join(map(str, one.shape))}
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config",
                                 str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ})
        try:
            first = None
            while first is None:
                if time.perf_counter() - t0 > COLD_START_TIMEOUT_S or proc.poll() is not None:
                    raise RuntimeError(f"the agent gave no answer within {COLD_START_TIMEOUT_S} s")
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    conn.request("POST", "/v1/infer", body, headers)
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status != 200:
                        raise RuntimeError("the agent refused the benchmark's input")
                    first = time.perf_counter() - t0
                except ConnectionError:
                    time.sleep(0.005)
                    continue
            for _ in range(WARM_INPUTS):
                conn.request("POST", "/v1/infer", body, headers)
                conn.getresponse().read()
            conn.close()
            p = psutil.Process(proc.pid)
            rss = p.memory_info().rss / 2**20
            c0 = sum(p.cpu_times()[:2])
            time.sleep(IDLE_WINDOW_S)
            idle = (sum(p.cpu_times()[:2]) - c0) / IDLE_WINDOW_S * 100
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"cold_start_s": first, "rss_mb": rss, "idle_cpu_percent": idle}


def run_bench(bundle: Path, backends: list[str], batch: int = 1, seconds: float = 5.0,
              rounds: int = DEFAULT_ROUNDS, cold: bool = True, threads: int = 1,
              late_answers: bool = False) -> list[dict[str, Any]]:
    series = measure_paths(bundle, backends, batch, seconds, rounds, threads, late_answers)
    out = []
    for name, s in series.items():
        bare, agent, api, mem = s["bare"], s["agent"], s["api"], s["agent_mem"]
        row: dict[str, Any] = {
            "backend": name, "batch": batch,
            "bare_ips": round(bare.ips, 1), "agent_ips": round(agent.ips, 1),
            "ratio": round(agent.ips / bare.ips, 4) if bare.ips else 0.0,
            "added_us_p50": round(agent.pct_us(50) - bare.pct_us(50), 1),
            "agent_mem_ips": round(mem.ips, 1),
            "outbox_ratio": round(agent.ips / mem.ips, 4) if mem.ips else 0.0,
            "api_ips": round(api.ips, 1),
            "api_added_us_p50": round(api.pct_us(50) - bare.pct_us(50), 1),
            "bare_p50_us": round(bare.pct_us(50), 1), "bare_p99_us": round(bare.pct_us(99), 1),
            "agent_p50_us": round(agent.pct_us(50), 1),
            "agent_p99_us": round(agent.pct_us(99), 1),
            "api_p50_us": round(api.pct_us(50), 1), "api_p99_us": round(api.pct_us(99), 1),
        }
        if cold:
            runs = [cold_start(bundle, name, threads, late_answers) for _ in range(COLD_STARTS)]
            for k in ("cold_start_s", "rss_mb", "idle_cpu_percent"):
                row[k] = round(statistics.median(r[k] for r in runs), 3)
        else:
            row.update(cold_start_s=None, rss_mb=None, idle_cpu_percent=None)
        out.append(row)
    return out


def format_table(rows: list[dict[str, Any]], bundle: str) -> str:
    cols = [("backend", "backend", "{}"), ("bare_ips", "bare/s", "{:,.0f}"),
            ("agent_ips", "agent/s", "{:,.0f}"), ("ratio", "ratio", "{:.3f}"),
            ("bare_p50_us", "bare p50 us", "{:.1f}"), ("agent_p50_us", "agent p50 us", "{:.1f}"),
            ("added_us_p50", "added us", "{:.1f}"),
            ("outbox_ratio", "durable/mem", "{:.3f}"), ("api_ips", "api/s", "{:,.0f}"),
            ("api_added_us_p50", "api added us", "{:.1f}"),
            ("cold_start_s", "cold s", "{:.2f}"), ("rss_mb", "RSS MB", "{:.0f}"),
            ("idle_cpu_percent", "idle CPU %", "{:.2f}")]
    lines = [f"{bundle}, batch {rows[0]['batch'] if rows else '?'}"]
    lines.append("  ".join(f"{h:>12}" for _, h, _ in cols))
    for r in rows:
        lines.append("  ".join(f"{(f.format(r[k]) if r.get(k) is not None else '-'):>12}"
                               for k, _, f in cols))
    return "\n".join(lines)


def dump(rows: list[dict[str, Any]], path: Path) -> None:
    path.write_text(json.dumps(rows, indent=2) + "\n")
