"""The arithmetic of rollouts: selectors, stage sizes, gates."""

from __future__ import annotations

import pytest

from cloud_hub.errors import Invalid
from cloud_hub.rollout_gates import Figures, RolloutPolicy, judge_stage, ml_gates, rate_worse
from cloud_hub.rollouts import parse_stages, stage_targets
from fleet.contract.selectors import SelectorError, parse_labels, parse_selector

P = RolloutPolicy(min_results=100, bake_s=0)


def test_selectors() -> None:
    s = parse_selector("site=berlin, hw!=rpi3,gpu,!legacy")
    assert s.matches({"site": "berlin", "hw": "rpi4", "gpu": "1"})
    assert not s.matches({"site": "berlin", "hw": "rpi3", "gpu": "1"})
    assert not s.matches({"site": "berlin", "gpu": "1", "legacy": "y"})
    assert not s.matches({"site": "lyon", "gpu": "1"})
    assert parse_selector("").matches({}) and parse_selector("a==b").matches({"a": "b"})
    for bad in ("site=ber lin", "=x", "a b"):
        with pytest.raises(SelectorError):
            parse_selector(bad)
    assert parse_labels("site=berlin,old-") == {"site": "berlin", "old": None}
    with pytest.raises(SelectorError):
        parse_labels("site")


def test_stages_are_cumulative_and_never_empty_in_total() -> None:
    st = parse_stages(["5%", "25%", "100%"])
    assert stage_targets(st, 200) == [10, 50, 200]
    assert stage_targets(st, 3) == [1, 1, 3]          # ceil: the first stage is never empty
    assert stage_targets(st, 0) == [0, 0, 0]
    assert stage_targets(parse_stages(["#5", "#20", "100"]), 12) == [5, 12, 12]
    assert parse_stages([5, 25.5]) == [{"percent": 5.0}, {"percent": 25.5}]
    for bad in (["0%"], ["150%"], ["x"], []):
        with pytest.raises(Invalid):
            parse_stages(bad)


def test_install_gates_fail_on_the_first_failure_over_the_threshold() -> None:
    none = Figures(0, None, None, None)
    v = judge_stage(10, 3, 0, none, none, None, 1.0, P)
    assert v.decision == "wait"                        # 3 of 10 reported
    v = judge_stage(10, 3, 1, none, none, None, 1.0, P)
    assert v.decision == "fail" and "1/10" in v.reason  # 10% > 5%, no need to wait
    v = judge_stage(40, 38, 2, none, none, None, 1.0, P)
    assert v.decision == "wait"                        # 5% failed is allowed; ML gate waits
    v = judge_stage(10, 2, 0, none, none, None, 7200.0, P)
    assert v.decision == "fail" and "reported" in v.reason   # the stage timed out


def test_ml_gate_waits_for_results_and_bake_then_judges() -> None:
    base = Figures(2000, 0.20, 0.25, 3.0, 400)
    same = Figures(400, 0.21, 0.24, 3.1, 84)
    twice = Figures(400, 0.40, 0.25, 3.5, 160)
    assert judge_stage(10, 10, 0, base, Figures(50, 0.4, 0.2, 3.0, 20), 0.0, 1.0,
                       P).decision == "wait"           # 50 < min_results
    slow = RolloutPolicy(min_results=100, bake_s=60)
    assert judge_stage(10, 10, 0, base, twice, 10.0, 10.0, slow).decision == "wait"
    assert judge_stage(10, 10, 0, base, same, 0.0, 1.0, P).decision == "pass"
    v = judge_stage(10, 10, 0, base, Figures(50, 0.2, 0.2, 3.0, 10), 0.0, 7200.0, P)
    assert v.decision == "fail" and "not enough results (50)" in v.reason  # timed out
    v = judge_stage(10, 10, 0, base, twice, 0.0, 1.0, P)
    assert v.decision == "fail" and "offload_rate" in v.reason
    gate = next(g for g in v.gates if g.name == "offload_rate")
    assert gate.limit == pytest.approx(0.20 * 1.2 + 0.02) and gate.baseline == 0.20


def test_a_rate_above_its_limit_but_not_significantly_collects_more_results() -> None:
    base = Figures(480, 0.20, 0.25, 3.0, 100)
    # 0.30 over a limit of 0.26 on 300 results: not significant, so neither pass nor fail.
    v = judge_stage(2, 2, 0, base, Figures(300, 0.30, 0.25, 3.0, 90), 0.0, 60.0, P)
    gate = next(g for g in v.gates if g.name == "offload_rate")
    assert v.decision == "wait" and gate.passed is None and "collecting" in gate.note
    # Still ambiguous at 4x min_results (400 here): the benefit of the doubt.
    assert judge_stage(2, 2, 0, base, Figures(400, 0.28, 0.25, 3.0, 112), 0.0, 60.0,
                       P).decision == "pass"
    # The same figure once significant: halted. Ambiguous past the stage timeout: halted.
    assert judge_stage(2, 2, 0, base, Figures(390, 0.38, 0.25, 3.0, 148), 0.0, 60.0,
                       P).decision == "fail"
    v = judge_stage(2, 2, 0, base, Figures(300, 0.30, 0.25, 3.0, 90), 0.0, 7200.0, P)
    assert v.decision == "fail" and "undecided" in v.reason
    # A short baseline is most of the noise, and more results on the new version cannot shrink
    # it: the stage passes on what it has instead of waiting for the cap.
    short = Figures(105, 0.143, 0.25, 3.0, 25)
    assert judge_stage(2, 2, 0, short, Figures(300, 0.21, 0.25, 3.0, 60), 0.0, 60.0,
                       P).decision == "pass"


def test_rate_test_counts_both_samples_noise() -> None:
    # A tiny baseline cannot prove anything worse ...
    assert not rate_worse(0.40, 400, 0.10, 10, 0.2, 0.02, 0.99)[0]
    # ... a large one can; and a same-rate sample is never "worse".
    assert rate_worse(0.40, 400, 0.20, 2000, 0.2, 0.02, 0.99)[0]
    assert not rate_worse(0.21, 400, 0.20, 2000, 0.2, 0.02, 0.99)[0]
    assert not rate_worse(0.5, 0, 0.2, 100, 0.2, 0.02, 0.99)[0]


def test_latency_gate_compares_p95_once_both_sides_have_enough() -> None:
    base = Figures(500, 0.2, 0.2, 3.0, 100)
    slow = Figures(500, 0.2, 0.2, 6.0, 100)
    g = {x.name: x for x in ml_gates(base, slow, P)}
    assert g["p95_latency_ms"].passed is False and g["p95_latency_ms"].limit == pytest.approx(4.6)
    few = Figures(50, 0.2, 0.2, 6.0, 10)
    assert {x.name: x for x in ml_gates(base, few, P)}["p95_latency_ms"].passed is True
    nothing = {x.name: x for x in ml_gates(Figures(0, None, None, None), slow, P)}
    assert all(x.passed for x in nothing.values())   # no baseline: nothing shown worse


def test_status_marks_say_what_is_provisional_and_what_is_noise() -> None:
    from fleet.cli.commands.rollout import _mark

    def g(name: str, value: float, limit: float, passed: bool | None) -> dict[str, object]:
        return {"name": name, "value": value, "limit": limit, "passed": passed}

    assert _mark(g("offload_rate", 0.4, 0.26, None), provisional=True) == \
        "[yellow]within noise so far[/yellow]"
    assert _mark(g("offload_rate", 0.4, 0.26, None), provisional=False) == \
        "[yellow]within noise, collecting more[/yellow]"
    assert _mark(g("offload_rate", 0.3, 0.26, True), provisional=False) == \
        "[yellow]within noise[/yellow]"
    assert _mark(g("offload_rate", 0.4, 0.26, False), provisional=False) == "[red]FAIL[/red]"
    assert _mark(g("offload_rate", 0.2, 0.26, True), provisional=True) == "[green]ok so far[/green]"
    assert _mark(g("results", 450, 400, True), provisional=False) == "[green]ok[/green]"
    assert _mark(g("results", 50, 400, None), provisional=True) == "[dim]waiting[/dim]"
    assert _mark(g("install_failures", 0, 0.05, True), provisional=True) == "[green]ok[/green]"


def test_a_few_events_do_not_halt_on_the_normal_approximation() -> None:
    from cloud_hub.rollout_gates import binomial_tail

    # 3 disagreements of 4 answered offloads against a baseline of 14.55% (limit 19.46%): the
    # z score says 2.4 (> 2.33 at 99%), but a rate at the limit gives 3 of 4 2.5% of the time.
    t = rate_worse(0.75, 4, 0.1455, 1400, 0.2, 0.02, 0.99)
    assert t.z > 2.33 and not t.worse
    assert rate_worse(0.75, 40, 0.1455, 1400, 0.2, 0.02, 0.99).worse
    assert abs(binomial_tail(3, 4, 0.1946) - 0.0251) < 0.001
    assert binomial_tail(0, 10, 0.3) == 1.0 and binomial_tail(11, 10, 0.3) == 0.0
    # Large samples: the exact tail agrees with the z test's verdict.
    assert rate_worse(0.4, 400, 0.2, 2000, 0.2, 0.02, 0.99).worse
    assert not rate_worse(0.2, 400, 0.2, 2000, 0.2, 0.02, 0.99).worse
