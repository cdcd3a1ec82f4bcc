"""How many result records per second the hub's ingest path stores: the baseline for the hub at
fleet scale (issue 15).

    python bench/hub_ingest.py [--records 20000] [--repeats 3] [--json PATH]

The path the ingest worker runs for a RESULTS message, without MQTT: decode the batch
(`ResultBatch.decode_lenient`), insert-or-ignore in one transaction (`ingest_results`), on a
fresh database each run; PostgreSQL on 127.0.0.1 (skipped when it is not there) and SQLite, at
batch sizes 1, 10, 100 (an agent's default `batch_max`) and 1000. Medians of `--repeats`, runs
alternated. `decode_share` is the part of the time spent decoding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_hub.db import init_db, make_engine, session_factory
from cloud_hub.ingest import ingest_results
from fleet.contract import protocol as p
from fleet.inference.cpu import cpu_name
from fleet.lab.pg_databases import create_database, drop_database

BATCHES = (1, 10, 100, 1000, 10_000)


def records(n: int, run: str, batch: int) -> list[p.ResultRecord]:
    """`n` records in batches of `batch`, each batch from one of 200 devices (as agents send)."""
    return [p.ResultRecord(
        id=f"{run}-{i:07d}", device=f"dev-{(i // batch) % 200:04d}", seq=i, ts=1e9 + i,
        input_ref=f"s:{i}", model="digits-edge@1", backend="onnxruntime", policy="max_prob",
        score=0.1, edge_label=i % 10, edge_confidence=0.9, offloaded=i % 5 == 0,
        cloud_label=i % 10 if i % 5 == 0 else None,
        cloud_model="digits-cloud@1" if i % 5 == 0 else None, final_label=i % 10,
        source="cloud" if i % 5 == 0 else "edge", latency_ms=1.0, edge_ms=0.1,
        offload_bytes=300 if i % 5 == 0 else 0) for i in range(n)]


def pg_database() -> str | None:
    """A fresh database on the local PostgreSQL, or None when there is no server (the SQLite
    rows only)."""
    try:
        return create_database("ehi_ingest_")
    except Exception:
        return None


def one_run(url: str, n: int, batch: int) -> dict[str, float]:
    eng = make_engine(url)
    init_db(eng)
    sessions = session_factory(eng)
    recs = records(n, uuid.uuid4().hex[:8], batch)
    payloads = [p.ResultBatch.of(recs[i:i + batch]).encode() for i in range(0, n, batch)]
    decode_s = 0.0
    t0 = time.perf_counter()
    stored = 0
    for payload in payloads:
        t = time.perf_counter()
        good, bad = p.ResultBatch.decode_lenient(payload)
        decode_s += time.perf_counter() - t
        assert not bad
        stored += len(ingest_results(sessions, good).inserted)
    total = time.perf_counter() - t0
    eng.dispose()
    assert stored == n, (stored, n)
    return {"records_per_s": n / total, "decode_share": decode_s / total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    results: dict[str, dict[int, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="ehi-ingest-") as tmp:
        for r in range(args.repeats):
            for batch in BATCHES:
                n = min(args.records, 2000) if batch == 1 else args.records
                pg = pg_database()
                targets = [("sqlite", f"sqlite:///{tmp}/run-{r}-{batch}.db")]
                if pg is not None:
                    targets.append(("postgresql", pg))
                try:
                    for name, url in targets:
                        results.setdefault(name, {}).setdefault(batch, []).append(
                            one_run(url, n, batch))
                finally:
                    if pg is not None:
                        drop_database(pg)
    out: dict[str, Any] = {"cpu": cpu_name(),
                           "records": args.records, "repeats": args.repeats, "rows": []}
    for db, by_batch in results.items():
        for batch, runs in sorted(by_batch.items()):
            out["rows"].append({
                "database": db, "batch": batch,
                "records_per_s": round(statistics.median(x["records_per_s"] for x in runs)),
                "range": [round(min(x["records_per_s"] for x in runs)),
                          round(max(x["records_per_s"] for x in runs))],
                "decode_share": round(statistics.median(x["decode_share"] for x in runs), 3)})
    print(f"{'database':<11} {'batch':>6} {'records/s':>10} {'range':>17} {'decode':>7}")
    for row in out["rows"]:
        print(f"{row['database']:<11} {row['batch']:>6} {row['records_per_s']:>10,} "
              f"{row['range'][0]:>8,}-{row['range'][1]:<8,} {row['decode_share']:>6.1%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
