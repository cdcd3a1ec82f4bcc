"""Model updates that cannot brick a device, proven against a real hub and agent.

    python bench/update_safety.py [--crash-trials 50] [--rate 200] [--json PATH] [--keep]

Starts its own Mosquitto on a free port, a hub and one agent (updates on, its own fleet key) as
processes, installs three versions the normal way, then:

- attacks: ten, each must be refused (reported by the agent) with the model on disk and the
  model answering unchanged: bad signature, unknown key, unsigned, older version, expired
  manifest (straight onto the device's `desired` topic, signed with the hub's own key: a
  compromised hub or broker), hash mismatch and a file longer than stated (a tampered artifact
  store), incompatible hardware (through the registry and API), a replayed old assignment and
  an assignment not signed by the hub (the broker);
- crash trials: `kill -9` of the agent at a random moment of an update, a restart, which must
  come up on the complete old or new model and then finish the update;
- revert: a bundle whose golden output is wrong; seconds until the agent reports the failed
  health check, still answering with the old model;
- hot swap: an update while the local API serves `--rate` requests/s; failed requests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.lab.update_safety import SafetyOptions, run_safety


def table(r: dict) -> str:
    lines = ["attacks:"]
    for a in r["attacks"]:
        lines.append(f"  {'refused' if a['rejected'] else 'ACCEPTED':8}  {a['name']:<34} "
                     f"{a['delivered_by']:<22} reported {a['state']} ({a['code']})")
    phases = ", ".join(f"{k} {v}" for k, v in sorted(r["crash_phases"].items()))
    sw = r["swap"]
    rows = [
        ("attacks rejected", f"{r['attacks_rejected']} / {r['attacks_total']}"),
        ("crash trials safe", f"{r['crash_safe']} / {r['crash_trials']}  (killed in: {phases})"),
        ("update seconds (median)", f"{r['update_seconds']}"),
        ("revert seconds", f"{r['revert_seconds']}"),
        ("revert reported as", f"{r['revert_reported']}"),
        ("hot swap: requests", f"{sw.get('sent')} at {sw.get('rate_hz')}/s over "
                               f"{sw.get('seconds')} s, models {sw.get('models')}"),
        ("hot swap: failed requests", f"{r['swap_failed_requests']}"),
    ]
    w = max(len(k) for k, _ in rows)
    lines += [f"{k:<{w}}  {v}" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--crash-trials", type=int, default=50)
    ap.add_argument("--rate", type=float, default=200.0, help="requests/s during the hot swap")
    ap.add_argument("--swap-seconds", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="keep the logs and state in this folder")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    o = SafetyOptions(crash_trials=args.crash_trials, swap_rate_hz=args.rate,
                      swap_seconds=args.swap_seconds, seed=args.seed, backend=args.backend,
                      workdir=args.keep, keep=args.keep is not None)
    r = run_safety(o, lambda m: print(m, flush=True)).figures()
    r["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    print(table(r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    ok = (r["attacks_rejected"] == r["attacks_total"] >= 8
          and r["crash_safe"] == r["crash_trials"] >= min(50, args.crash_trials)
          and r["revert_seconds"] is not None and r["revert_seconds"] <= 60
          and r["swap_failed_requests"] == 0)
    print("targets:", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
