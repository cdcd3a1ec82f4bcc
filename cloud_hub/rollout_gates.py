"""The arithmetic of a rollout stage's gates, as pure functions.

A stage passes when (1) enough of its devices reported an outcome of the install, (2) the
share of failed installs is at most `max_failure`, and (3) after the bake time, with at least
`min_results` results on the new version, the stage's devices behave no worse than they did on
the previous version: offload rate, edge-cloud disagreement on offloaded inputs and p95
latency may each grow by at most the given fraction (plus a small absolute slack, so that a
near-zero baseline does not trip on noise).

Rates (offload, disagreement) are proportions measured on samples, the baseline's too: a stage
fails on them only when the new figure is above its limit with `confidence` (a one-sided
two-sample z-test of new > baseline * (1 + increase) + slack, both samples' variances counted),
so that a good model does not halt a rollout on noise, while a model that offloads twice as much
is caught within a few hundred results. A figure above its limit that is not (yet) significantly
so does not pass either: the stage keeps collecting results while they can still tell (while
the new sample is at least a quarter of the noise), up to `more_results_factor` times
`min_results`, and only then gets the benefit of the doubt. The p95 latency is compared only
once both sides have `min_results` results.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any, NamedTuple


@dataclass(frozen=True, slots=True)
class RolloutPolicy:
    max_failure: float = 0.05          # fraction of a stage's devices
    min_reporting: float = 1.0         # fraction of a stage's devices with an install outcome
    bake_s: float = 600.0              # after the reporting gate, before the ML gate judges
    # Results on the new version in the stage before the ML gate judges: enough that doubling
    # an offload rate of 20% is caught with 99.7% probability against a baseline of 400
    # results (bench/gate_power.py; docs/rollouts.md).
    min_results: int = 400
    max_offload_increase: float = 0.20     # relative to the same devices' previous figure
    max_disagreement_increase: float = 0.20
    max_p95_increase: float = 0.20
    offload_slack: float = 0.02        # absolute, added to each limit
    disagreement_slack: float = 0.02
    p95_slack_ms: float = 1.0
    max_rate_per_min: float = 0.0      # devices assigned per minute; 0: no limit
    baseline_window_s: float = 3600.0  # results on the previous version this far back count
    stage_timeout_s: float = 3600.0    # a stage that cannot decide by then halts
    confidence: float = 0.99           # of "above the limit" before a rate gate fails
    # A rate above its limit but not significantly so waits for up to this many times
    # min_results before it passes (docs/rollouts.md: power with and without).
    more_results_factor: float = 4.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutPolicy:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class Figures:
    """How a set of devices behaved on one model version."""

    results: int
    offload_rate: float | None
    disagreement: float | None  # among offloaded inputs that have a cloud answer
    p95_ms: float | None
    answered: int = 0           # offloaded inputs with a cloud answer (disagreement's sample)


@dataclass(frozen=True, slots=True)
class Gate:
    name: str
    value: float | None
    limit: float | None
    passed: bool | None       # None: cannot be judged yet
    baseline: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class StageVerdict:
    decision: str             # "wait", "pass", "fail"
    gates: list[Gate] = field(default_factory=list)
    reason: str = ""


def install_gates(n: int, installed: int, failed: int, p: RolloutPolicy) -> list[Gate]:
    reported = installed + failed
    rep = reported / n if n else 0.0
    fail = failed / n if n else 0.0
    return [
        Gate("reporting", rep, p.min_reporting, rep >= p.min_reporting if n else None,
             note=f"{reported} of {n} devices reported"),
        # Judged on the whole stage from the first failure: more than the threshold failing
        # halts at once, without waiting for the rest.
        Gate("install_failures", fail, p.max_failure, fail <= p.max_failure,
             note=f"{failed} of {n} failed"),
    ]


def _limit(base: float | None, rel: float, slack: float) -> float | None:
    return None if base is None else base * (1.0 + rel) + slack


# A rate gate collects more results only while the new sample makes up at least this share of
# the test's variance: past it, doubling the results shrinks the noise by under 13%.
MIN_NEW_SHARE = 0.25


class RateTest(NamedTuple):
    worse: bool        # above the limit with the confidence asked for
    z: float
    new_share: float   # the new sample's share of the variance: what more results can shrink


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (n up to a few thousand)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp
             + (n - i) * lq for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def rate_worse(new: float, n_new: int, base: float, n_base: int, rel: float, slack: float,
               confidence: float) -> RateTest:
    """Whether the proportion `new` (of `n_new`) is above `base * (1 + rel) + slack` (`base` of
    `n_base`) with `confidence`; also the z score. Proportions are smoothed by half a count so
    that a sample with no events still has a variance.

    The z test's normal approximation is poor on a few events (3 disagreements of 4 answered
    offloads gave z = 2.4 where the exact chance of that at the limit is 2.5%): it must also
    be unlikely, by the exact binomial tail, that the new count comes from a rate at the limit.
    """
    if n_new <= 0 or n_base <= 0:
        return RateTest(False, 0.0, 1.0)
    pn = (new * n_new + 0.5) / (n_new + 1)
    pb = (base * n_base + 0.5) / (n_base + 1)
    var_new = pn * (1 - pn) / n_new
    var_base = (1 + rel) ** 2 * pb * (1 - pb) / n_base
    limit = base * (1 + rel) + slack
    z = (new - limit) / math.sqrt(var_new + var_base)
    worse = (z > NormalDist().inv_cdf(confidence)
             and binomial_tail(round(new * n_new), n_new, min(limit, 1.0)) < 1.0 - confidence)
    return RateTest(worse, z, var_new / (var_new + var_base))


def ml_gates(base: Figures, new: Figures, p: RolloutPolicy) -> list[Gate]:
    out = []
    for name, b, v, rel, slack, n, nb in (
            ("offload_rate", base.offload_rate, new.offload_rate, p.max_offload_increase,
             p.offload_slack, new.results, base.results),
            ("disagreement", base.disagreement, new.disagreement, p.max_disagreement_increase,
             p.disagreement_slack, new.answered, base.answered)):
        lim = _limit(b, rel, slack)
        if v is None or b is None or lim is None:
            # No offloads (no disagreement to measure) or no baseline on the previous version:
            # nothing to compare, nothing worse shown.
            out.append(Gate(name, v, lim, True, b, "no figure to compare"))
            continue
        worse, z, new_share = rate_worse(v, n, b, nb, rel, slack, p.confidence)
        # Above the limit, not significantly: undecided (None) while more results can still
        # tell (the new sample is a fair part of the noise; the baseline's cannot shrink) and
        # until they run to more_results_factor * min_results.
        undecided = (not worse and v > lim and new_share >= MIN_NEW_SHARE
                     and new.results < p.more_results_factor * max(p.min_results, 1))
        out.append(Gate(name, v, lim, None if undecided else not worse, b,
                        f"z={z:.2f} (n={n}, baseline n={nb}); fails above the limit at "
                        f"{p.confidence:.0%} confidence"
                        + ("; above it, not significantly: collecting more results"
                           if undecided else "")))
    lim = _limit(base.p95_ms, p.max_p95_increase, p.p95_slack_ms)
    if new.p95_ms is None or lim is None or min(new.results, base.results) < p.min_results:
        out.append(Gate("p95_latency_ms", new.p95_ms, lim, True, base.p95_ms,
                        f"compared once both sides have {p.min_results} results"))
    else:
        out.append(Gate("p95_latency_ms", new.p95_ms, lim, new.p95_ms <= lim, base.p95_ms))
    return out


def judge_stage(n: int, installed: int, failed: int, base: Figures, new: Figures,
                baked_s: float | None, stage_age_s: float, p: RolloutPolicy) -> StageVerdict:
    """The stage's verdict now. `baked_s`: seconds since the reporting gate passed (None: not
    yet)."""
    gates = install_gates(n, installed, failed, p)
    rep, fail = gates
    if fail.passed is False:
        return StageVerdict("fail", gates, f"install failures {failed}/{n} exceed "
                                           f"{p.max_failure:.0%}")
    if not rep.passed:
        if stage_age_s > p.stage_timeout_s:
            return StageVerdict("fail", gates, f"only {installed + failed}/{n} devices reported "
                                               f"within {p.stage_timeout_s:.0f} s")
        return StageVerdict("wait", gates)
    ml = ml_gates(base, new, p)
    gates += [Gate("results", float(new.results), float(p.min_results),
                   new.results >= p.min_results or None, note="on the new version"), *ml]
    if baked_s is None or baked_s < p.bake_s or new.results < p.min_results:
        if stage_age_s > p.stage_timeout_s:
            return StageVerdict("fail", gates, f"not enough results ({new.results}) within "
                                               f"{p.stage_timeout_s:.0f} s")
        return StageVerdict("wait", gates)
    bad = [g for g in ml if g.passed is False]
    if not bad and any(g.passed is None for g in ml):
        if stage_age_s > p.stage_timeout_s:
            return StageVerdict("fail", gates, "undecided within "
                                f"{p.stage_timeout_s:.0f} s: " + ", ".join(
                                    g.name for g in ml if g.passed is None)
                                + " above the limit, not significantly")
        return StageVerdict("wait", gates)
    if bad:
        return StageVerdict("fail", gates, "; ".join(
            f"{g.name} {g.value:.4g} over its limit {g.limit:.4g} (was {g.baseline:.4g})"
            for g in bad if g.value is not None and g.limit is not None
            and g.baseline is not None))
    return StageVerdict("pass", gates)
