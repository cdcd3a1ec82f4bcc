"""One hub under a fleet: how many devices it serves on PostgreSQL before it falls behind.

    python bench/hub_load.py [--steps 250,500,1000,1500] [--step-s 20] [--rate 1] [--offload 0.2]
                             [--stats-rows 1000000] [--parts ramp,stats,batching,ingest]
                             [--roles one|split] [--json PATH]

Starts its own Mosquitto, a fresh PostgreSQL database on 127.0.0.1 and `cloud-hub serve` (with
`--roles split`, two: one answering offloads, one storing the rest), then:

1. **Ramp** (`fleet/lab/device_load.py`): devices at `--rate` inputs/s each, `--offload` of them
   offloaded to the hub's cloud model (deadline 250 ms), result batches every 0.2 s resent until
   acknowledged, telemetry every 10 s; `--step-s` seconds per step of the ramp. A step keeps up
   when its offload p99 is at most 50 ms, no offload went unanswered, the records acknowledged
   kept pace with those produced (nothing older than 5 s unacknowledged) and the hub dropped no
   message. After the ramp, 15 s to settle: `lost` counts records never acknowledged, and the
   database is checked to hold every acknowledged record once.
2. **Ingest alone** (bench/hub_ingest.py's path): records/s into PostgreSQL in transactions of
   1,000 and 10,000 records: `ingest_max_records_per_s`.
3. **/v1/stats at 1,000,000 results**: the table filled to `--stats-rows` (1,000 devices over 20
   minutes), then /v1/stats whole, for one device and for the last 5 minutes, 10 times each:
   `stats_p95_ms` over the 30 calls.
4. **Batching**: the MobileNet-class FP32 perf bundle as the cloud
   model, 32 devices each keeping 2 offloads of a 224x224x3 image in flight (saturation), 20 s
   with the hub's dynamic batching (batch_max 16, batch_wait_ms 4) and 20 s without (batch_max
   1): `batching_ratio` (answers/s with over without) and `batching_p99_ratio`.

Every figure is a median of what the run measured on this machine; the table names the CPU.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np

from fleet.contract import protocol as p
from fleet.inference.cpu import cpu_name
from fleet.lab.brokers import start_broker
from fleet.lab.device_load import DeviceLoad
from fleet.lab.hub_metrics import scrape
from fleet.lab.percentiles import percentile
from fleet.lab.pg_databases import create_database, drop_database
from fleet.lab.processes import ProcessGroup, start_hub, wait_until, work_folder
from fleet.transport.mqtt import MqttConfig, MqttSession
from fleet.transport.ports import free_port
from fleet.transport.tuning import tune_gil_switch_interval
from models import STREAMS_FILE

P99_TARGET_MS = 50.0
SETTLE_S = 15.0


# ---------------------------------------------------------------------------- 1. ramp


def ramp(args: argparse.Namespace, broker_port: int, hub_urls: list[str], db_url: str
         ) -> dict[str, Any]:
    data = np.load(STREAMS_FILE)
    x, y = data["mixed_x"], data["mixed_y"]
    load = DeviceLoad(broker_port=broker_port, x=x, edge_labels=y, rate_hz=args.rate,
                      offload=args.offload, connections=args.connections)
    load.start()
    # The generator is not what is measured: its own garbage collections (a full one walks
    # every pending offload and unacknowledged batch of a thousand devices) would stall its
    # network threads and count as the hub's latency. Collected before each step instead.
    gc.collect()
    gc.freeze()
    gc.disable()
    steps: list[dict[str, Any]] = []
    dropped_metric = 'ehi_hub_bad_messages_total{reason="queue_full"'
    try:
        for n in args.steps:
            load.scale_to(n)
            gc.collect()
            time.sleep(2.0)  # the new devices' first messages
            load.take_rtts()
            before = load.snapshot()
            inserted0 = _scrape_all(hub_urls, "ehi_hub_results_inserted_total")
            dropped0 = _scrape_all(hub_urls, dropped_metric) + _scrape_all(
                hub_urls, 'ehi_hub_bad_messages_total{reason="quota"')
            t0 = time.monotonic()
            time.sleep(args.step_s)
            dt = time.monotonic() - t0
            after = load.snapshot()
            rtts, hub_ms = load.take_rtts()
            inserted = _scrape_all(hub_urls, "ehi_hub_results_inserted_total") - inserted0
            dropped = _scrape_all(hub_urls, dropped_metric) + _scrape_all(
                hub_urls, 'ehi_hub_bad_messages_total{reason="quota"') - dropped0
            lag = load.oldest_unacked_s()
            step = {
                "devices": n,
                "inputs_per_s": round((after["inputs"] - before["inputs"]) / dt, 1),
                "offloads_per_s": round((after["offloads"] - before["offloads"]) / dt, 1),
                "records_per_s_ingested": round(inserted / dt, 1),
                "offload_p50_ms": percentile(rtts, 50), "offload_p99_ms": percentile(rtts, 99),
                "hub_p50_ms": percentile(hub_ms, 50), "hub_p99_ms": percentile(hub_ms, 99),
                "unanswered": int(after["missed"] - before["missed"]),
                "oldest_unacked_s": round(lag, 2), "hub_dropped": int(dropped),
            }
            step["kept_up"] = bool(rtts and step["offload_p99_ms"] <= P99_TARGET_MS
                                   and step["unanswered"] == 0 and lag < 5.0
                                   and dropped == 0)
            steps.append(step)
            print(f"  {n:>5} devices: {step['inputs_per_s']:>7,.0f} inputs/s, "
                  f"{step['offloads_per_s']:>6,.0f} offloads/s, "
                  f"{step['records_per_s_ingested']:>7,.0f} records/s stored, offload p50 "
                  f"{step['offload_p50_ms']} / p99 {step['offload_p99_ms']} ms (in the hub "
                  f"{step['hub_p50_ms']} / {step['hub_p99_ms']}), "
                  f"unanswered {step['unanswered']}, oldest unacked {lag:.1f} s"
                  f"{'' if step['kept_up'] else '  <- behind'}", flush=True)
            if not step["kept_up"]:
                break
        load.scale_to(load.devices)  # no new devices; the last ones keep sending
    finally:
        gc.enable()
        # Settle: no more inputs, every record sent until acknowledged.
        load.rate_hz = 0.0
        wait_until(lambda: load.snapshot()["unacked"] == 0, SETTLE_S, 0.2)
        final = load.snapshot()
        load.stop()
    lost = int(final["produced"] - final["acked"])
    stored = _count(db_url, "SELECT count(*) FROM results WHERE device LIKE 'load-%'")
    return {"steps": steps, "produced": int(final["produced"]), "acked": int(final["acked"]),
            "rejected": int(final["rejected"]), "lost": lost, "stored": stored}


def _count(url: str, sql: str) -> int:
    import psycopg

    with psycopg.connect(url.replace("+psycopg", "")) as c:
        row = c.execute(sql).fetchone()
    return int(row[0]) if row else 0


# ---------------------------------------------------------------------------- 2. ingest alone


def ingest_max() -> dict[str, float]:
    from hub_ingest import one_run  # bench/hub_ingest.py, beside this file
    from hub_ingest import pg_database as ingest_db

    out: dict[str, float] = {}
    for batch in (1000, 10_000):
        runs = []
        for _ in range(3):
            made = ingest_db()
            if made is None:
                return {}
            try:
                runs.append(one_run(made, 50_000, batch))
            finally:
                drop_database(made)
        out[str(batch)] = round(statistics.median(r["records_per_s"] for r in runs), 0)
    return out


# ---------------------------------------------------------------------------- 3. stats


def fill_results(db_url: str, rows: int, devices: int = 1000, span_s: float = 1200.0) -> float:
    """`rows` results from `devices` devices over the last `span_s` seconds, through the
    hub's own ingest (so that the running sums are the ones ingest keeps)."""
    from cloud_hub.db import make_engine, session_factory
    from cloud_hub.ingest import ingest_results

    eng = make_engine(db_url)
    sessions = session_factory(eng)
    now = time.time()
    run = uuid.uuid4().hex[:8]
    t0 = time.monotonic()
    chunk = 10_000
    for start in range(0, rows, chunk):
        recs = []
        for i in range(start, min(rows, start + chunk)):
            off = i % 5 == 0
            recs.append(p.ResultRecord.model_construct(
                id=f"{run}{i:x}", device=f"fill-{i % devices:04d}", seq=i,
                ts=now - span_s + span_s * i / rows, input_ref=None, model="digits-edge@1",
                backend="onnxruntime", policy="max_prob", score=0.5, edge_label=i % 10,
                edge_confidence=0.9, offloaded=off, cloud_label=(i + off) % 10 if off else None,
                cloud_model="digits-cloud@1" if off else None, final_label=i % 10,
                source="cloud" if off else "edge", degraded=False,
                latency_ms=0.2 + (i % 97) / 10 if not off else 2.0 + (i % 89) / 5,
                edge_ms=0.05, offload_bytes=300 if off else 0))
        ingest_results(sessions, recs, "bench-fill")
    eng.dispose()
    return time.monotonic() - t0


def _scrape_all(urls: list[str], metric: str) -> float:
    return sum(scrape(u, metric) for u in urls)


def stats_latency(hub_url: str, repeats: int = 10) -> dict[str, Any]:
    times: list[float] = []
    sizes = {}
    with httpx.Client(base_url=hub_url, timeout=60) as c:
        for _ in range(repeats):
            for name, params in (("all", {}), ("device", {"device": "fill-0042"}),
                                 ("last_5_min", {"since": time.time() - 300})):
                t0 = time.perf_counter()
                r = c.get("/v1/stats", params=params)
                times.append((time.perf_counter() - t0) * 1000.0)
                r.raise_for_status()
                sizes[name] = r.json()["total"]["count"]
    return {"stats_p95_ms": percentile(times, 95), "stats_p50_ms": percentile(times, 50),
            "counts": sizes}


# ---------------------------------------------------------------------------- 4. batching


def batching(workdir: Path, group: ProcessGroup, broker_port: int, seconds: float,
             threads: int = 2) -> dict[str, Any]:
    from models import perf

    bundle = perf.ensure()["fp32"]
    out: dict[str, Any] = {}
    for mode, env in (("on", {"EHI_HUB_BATCH_MAX": "16", "EHI_HUB_BATCH_WAIT_MS": "4"}),
                      ("off", {"EHI_HUB_BATCH_MAX": "1", "EHI_HUB_BATCH_WAIT_MS": "0"})):
        port = free_port()
        (workdir / f"batch-{mode}").mkdir(exist_ok=True)
        hub = start_hub(group, workdir / f"batch-{mode}", port=port, broker_port=broker_port,
                        log_path=workdir / f"hub-batch-{mode}.log",
                        env={"EHI_HUB_CLOUD_BUNDLE": str(bundle), "EHI_HUB_INLINE_MAX_MS": "0",
                             "EHI_HUB_THREADS": str(threads),
                             "EHI_HUB_MQTT__SHARE_GROUP": f"batch{mode}", **env})
        wait_until(functools.partial(_ready, f"http://127.0.0.1:{port}"), 60.0, 0.2)
        out[mode] = saturate(broker_port, seconds)
        hub.stop()
        print(f"  batching {mode}: {out[mode]['answers_per_s']:.1f} answers/s, p50 "
              f"{out[mode]['p50_ms']} / p99 {out[mode]['p99_ms']} ms, errors "
              f"{out[mode]['error_reasons']}", flush=True)
    out["model_ms_per_image"] = model_per_image(bundle, threads)
    print(f"  the model alone, ms per image by batch size: {out['model_ms_per_image']}",
          flush=True)
    on, off = out["on"], out["off"]
    out["batching_ratio"] = round(on["answers_per_s"] / off["answers_per_s"], 2) \
        if off["answers_per_s"] else None
    out["batching_p99_ratio"] = round(on["p99_ms"] / off["p99_ms"], 2) \
        if on["p99_ms"] and off["p99_ms"] else None
    return out


def model_per_image(bundle: Path, threads: int) -> dict[str, float]:
    """The perf model's time per image at batch sizes 1, 4 and 16 (median of 8), in this
    process: what batching can gain at most."""
    from fleet.inference.model import Model

    m = Model.open(bundle, "onnxruntime", threads)
    x = np.random.default_rng(0).integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)
    out = {}
    for bs in (1, 4, 16):
        m.predict_batch(x[:bs])
        times = []
        for _ in range(8):
            t0 = time.perf_counter()
            m.predict_batch(x[:bs])
            times.append((time.perf_counter() - t0) / bs * 1000.0)
        out[str(bs)] = round(statistics.median(times), 2)
    return out


def _ready(url: str) -> bool:
    try:
        return bool(httpx.get(f"{url}/readyz", timeout=2).json().get("ready"))
    except (httpx.HTTPError, ValueError):
        return False


def saturate(broker_port: int, seconds: float, devices: int = 32, in_flight: int = 2,
             deadline_ms: float = 2000.0) -> dict[str, Any]:
    """Closed loop: each device keeps `in_flight` offloads of a random image outstanding."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(8)]
    sent: dict[str, float] = {}
    rtts: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(10**9))
    expired = 0
    errors: dict[str, int] = {}

    def fire(session: MqttSession, dev: str) -> None:
        rid = f"sat{next(counter):x}"
        x = images[int(rng.integers(len(images)))]
        payload = p.Offload(rid, "perf@1", x, deadline_ms, time.time(), 0, 0.5).encode()
        with lock:
            sent[rid] = time.perf_counter()
        session.publish(p.topic(dev, p.Channel.OFFLOAD), payload, qos=1,
                        expiry_s=deadline_ms / 1000.0)

    sessions: list[MqttSession] = []

    def on_message(topic: str, payload: bytes) -> None:
        nonlocal expired
        t = time.perf_counter()
        dev, _ = p.parse_topic(topic)
        a = p.Answer.decode(payload)
        with lock:
            t0 = sent.pop(a.id, None)
            if t0 is not None and a.error is None:
                rtts.append((t - t0) * 1000.0)
            elif a.error:
                expired += 1
                errors[a.error[:80]] = errors.get(a.error[:80], 0) + 1
        if not stop.is_set():
            fire(sessions[int(dev.split("-")[1]) % len(sessions)], dev)

    # One connection: a second one subscribed to the same answers would get each twice.
    sessions.append(MqttSession(MqttConfig(port=broker_port, protocol="5",
                                           client_id=f"sat-{uuid.uuid4().hex[:6]}"),
                                on_message, [(f"{p.TOPIC_ROOT}/+/answer", 1)]))
    for s in sessions:
        s.start()
        s.wait_connected(10)
    for d in range(devices):
        for _ in range(in_flight):
            fire(sessions[d % len(sessions)], f"sat-{d:03d}")
    time.sleep(3.0)  # warm-up
    with lock:
        rtts.clear()
    t0 = time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    with lock:
        got = list(rtts)
    stop.set()
    time.sleep(1.0)
    for s in sessions:
        s.stop()
    return {"answers_per_s": round(len(got) / dt, 1), "p50_ms": percentile(got, 50),
            "p99_ms": percentile(got, 99), "errors": expired, "error_reasons": errors}


# ---------------------------------------------------------------------------- main


def table(r: dict[str, Any]) -> str:
    rows = [("cpu", r["machine"]["cpu"]),
            ("hub processes", "two (answer, store)" if r.get("roles") == "split" else "one")]
    if "ramp" in r:
        ramp_r = r["ramp"]
        rows += [
            ("devices kept up (at 50 ms offload p99)", f"{r['devices']:,}"),
            ("inputs/s / offloads/s at that step",
             f"{r['inputs_per_s']:,} / {r['offloads_per_s']:,}"),
            ("records/s stored at that step", f"{r['records_per_s_ingested']:,}"),
            ("offload p50 / p99 (ms), in the hub",
             f"{r['offload_p50_ms']} / {r['offload_p99_ms']}, "
             f"{r['hub_p50_ms']} / {r['hub_p99_ms']}"),
            ("records lost (produced, acked, stored)",
             f"{r['lost']} ({ramp_r['produced']:,}, {ramp_r['acked']:,}, "
             f"{ramp_r['stored']:,})")]
    if r.get("ingest"):
        rows.append(("ingest alone, records/s (1k / 10k per tx)",
                     " / ".join(f"{v:,.0f}" for v in r["ingest"].values())))
    if r.get("stats_rows") is not None:
        rows.append(("/v1/stats p95 (ms) at results",
                     f"{r['stats_p95_ms']} at {r['stats_rows']:,}"))
    if r.get("batching_ratio") is not None:
        rows.append(("batching throughput / p99 ratio",
                     f"{r['batching_ratio']} / {r['batching_p99_ratio']}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="250,500,1000,1500",
                    type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--step-s", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=1.0, help="inputs/s per device")
    ap.add_argument("--offload", type=float, default=0.2)
    ap.add_argument("--connections", type=int, default=2)
    ap.add_argument("--stats-rows", type=int, default=1_000_000)
    ap.add_argument("--parts", default="ramp,stats,batching,ingest",
                    type=lambda v: set(v.split(",")), help="which parts to run")
    ap.add_argument("--batching-s", type=float, default=20.0)
    ap.add_argument("--roles", choices=("one", "split"), default="one",
                    help="one hub process, or two: one answering offloads, one storing the "
                         "rest (EHI_HUB_ROLES)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    tune_gil_switch_interval()  # as the agents this stands for do
    r: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "cpu": cpu_name(),
                                     "python": platform.python_version()}}
    db_url = create_database("ehi_load_")
    try:
        with work_folder(None, "ehi-hub-load-", False) as workdir, ProcessGroup() as group:
            broker = start_broker(group, workdir, "mosquitto")
            port = free_port()
            hub_url = f"http://127.0.0.1:{port}"
            hub_env = {"EHI_HUB_MQTT__PROTOCOL": "5"}
            if args.roles == "split":
                hub_env["EHI_HUB_ROLES"] = "store"
            main_hub = start_hub(group, workdir, port=port, broker_port=broker.port,
                                 log_path=workdir / "hub.log", database_url=db_url,
                                 env=hub_env)
            wait_until(lambda: _ready(hub_url), 60.0, 0.2)
            hub_urls = [hub_url]
            r["roles"] = args.roles
            if args.roles == "split":
                a_port = free_port()
                (workdir / "answer").mkdir(exist_ok=True)
                answer_hub = start_hub(
                    group, workdir / "answer", port=a_port, broker_port=broker.port,
                    log_path=workdir / "hub-answer.log", database_url=db_url,
                    env={**hub_env, "EHI_HUB_ROLES": "answer", "EHI_HUB_REPLICA_ID": "hub-answer",
                         "EHI_HUB_MIGRATE_ON_START": "false"})
                hub_urls.append(f"http://127.0.0.1:{a_port}")
                wait_until(lambda: _ready(hub_urls[1]), 60.0, 0.2)
            r["devices"] = r["lost"] = None
            if "ramp" in args.parts:
                print("ramp", flush=True)
                r["ramp"] = ramp(args, broker.port, hub_urls, db_url)
                kept = [s for s in r["ramp"]["steps"] if s["kept_up"]]
                best = kept[-1] if kept else r["ramp"]["steps"][0]
                r.update({k: best[k] for k in ("inputs_per_s", "offloads_per_s",
                                               "records_per_s_ingested", "offload_p50_ms",
                                               "offload_p99_ms", "hub_p50_ms", "hub_p99_ms")})
                r["devices"] = best["devices"] if kept else 0
                r["lost"] = r["ramp"]["lost"]
            r["stats_rows"] = r["stats_p95_ms"] = None
            if "stats" in args.parts:
                print(f"stats: filling the results table to {args.stats_rows:,} rows",
                      flush=True)
                have = _count(db_url, "SELECT count(*) FROM results")
                r["fill_s"] = round(fill_results(db_url, max(0, args.stats_rows - have)), 1)
                r["stats_rows"] = _count(db_url, "SELECT count(*) FROM results")
                r.update(stats_latency(hub_url))
                print(f"  /v1/stats p50 {r['stats_p50_ms']} / p95 {r['stats_p95_ms']} ms at "
                      f"{r['stats_rows']:,} results", flush=True)
            if "batching" in args.parts:
                print("batching", flush=True)
                main_hub.stop()  # the perf model's hubs alone answer offloads
                if args.roles == "split":
                    answer_hub.stop()
                b = batching(workdir, group, broker.port, args.batching_s)
                r["batching"] = b
                r["batching_ratio"] = b["batching_ratio"]
                r["batching_p99_ratio"] = b["batching_p99_ratio"]
            else:
                r["batching_ratio"] = r["batching_p99_ratio"] = None
    finally:
        drop_database(db_url)
    r["ingest"] = ingest_max() if "ingest" in args.parts else {}
    r["ingest_max_records_per_s"] = max(r["ingest"].values()) if r["ingest"] else None
    print(table(r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    ok = ((r["devices"] or 0) >= 1000 and r["lost"] == 0
          and (r["ingest_max_records_per_s"] or 0) >= 20_000
          and (r["stats_p95_ms"] or 1e9) <= 200
          and ((r["batching_ratio"] or 0) >= 3 and (r["batching_p99_ratio"] or 9) <= 1))
    print("targets:", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
