"""How often the ML gate halts a stage, by how much worse the new version really is.

    python bench/gate_power.py [--trials 4000] [--min-results 400] [--json PATH]

Monte Carlo over the hub's own `judge_stage` (cloud_hub/rollout_gates.py): a stage's devices
offloaded 20% of their inputs on the previous version (a baseline of `--baseline` results); on
the new version they offload `p`. Results arrive `--step` at a time (one controller tick's
worth) and the stage is judged after each arrival once it has `--min-results`, until it passes
or fails. Two rules side by side:

- `single look`: pass as soon as the rate is not significantly above its limit (what the gate
  did first);
- `collect more` (the gate now): a rate above its limit but not significantly so waits for more
  results, up to `more_results_factor` x `min_results`, before it passes.

Reports, per true offload rate, the share of stages halted and the mean results judged on.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_hub.rollout_gates import Figures, RolloutPolicy, judge_stage

BASE_RATE = 0.20
RATES = (0.20, 0.24, 0.26, 0.30, 0.40)   # the same, inside the limit, at it, 1.5x, 2x


def one_stage(rng: np.random.Generator, p: float, n_base: int, step: int,
              policy: RolloutPolicy) -> tuple[bool, int]:
    base_k = rng.binomial(n_base, BASE_RATE)
    base = Figures(n_base, base_k / n_base, None, None)
    n = policy.min_results
    k = int(rng.binomial(n, p))
    while True:
        v = judge_stage(1, 1, 0, base, Figures(n, k / n, None, None), 0.0, 0.0, policy)
        if v.decision != "wait":
            return v.decision == "fail", n
        k += int(rng.binomial(step, p))
        n += step


def run(trials: int, min_results: int, baselines: list[int], step: int, seed: int
        ) -> list[dict[str, object]]:
    rng = np.random.default_rng(seed)
    now = RolloutPolicy(min_results=min_results, bake_s=0)
    rules = {"single look": replace(now, more_results_factor=0.0), "collect more": now}
    rows: list[dict[str, object]] = []
    for n_base in baselines:
        for p in RATES:
            row: dict[str, object] = {"baseline_results": n_base, "offload_rate": p}
            for name, policy in rules.items():
                out = [one_stage(rng, p, n_base, step, policy) for _ in range(trials)]
                row[f"{name}: halted"] = round(sum(h for h, _ in out) / trials, 4)
                row[f"{name}: results"] = round(float(np.mean([n for _, n in out])))
            rows.append(row)
    return rows


def table(rows: list[dict[str, object]]) -> str:
    keys = list(rows[0])
    w = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    head = "  ".join(k.rjust(x) for k, x in zip(keys, w, strict=True))
    body = ["  ".join(str(r[k]).rjust(x) for k, x in zip(keys, w, strict=True)) for r in rows]
    return "\n".join([head, *body])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=4000)
    ap.add_argument("--min-results", type=int, default=400)
    ap.add_argument("--baseline", type=int, nargs="+", default=[400, 2000])
    ap.add_argument("--step", type=int, default=10, help="results arriving between two looks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = run(args.trials, args.min_results, args.baseline, args.step, args.seed)
    print(f"baseline offload rate {BASE_RATE}, limit +20% + 0.02, {args.trials} stages per row, "
          f"min_results {args.min_results}")
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"trials": args.trials, "min_results": args.min_results,
                                         "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
