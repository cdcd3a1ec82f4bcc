import numpy as np
import pytest

from fleet.inference.policy import HardExamplePolicy, softmax, softmax_one
from models.digits.evaluate import auroc, cascade_curve


def test_scores_order_confident_below_uncertain() -> None:
    sure = np.array([0.97, 0.01, 0.01, 0.01])
    torn = np.array([0.45, 0.44, 0.06, 0.05])
    flat = np.full(4, 0.25)
    for name in ("max_prob", "margin", "entropy"):
        pol = HardExamplePolicy(name, 0.5)
        s = pol.scores(np.stack([sure, torn, flat]))
        assert s[0] < s[1] <= s[2] + 1e-9, name
        assert s.min() >= 0.0 and s.max() <= 1.0


def test_margin_sees_a_two_way_tie_that_max_prob_misses() -> None:
    torn = np.array([0.5, 0.49, 0.01])
    assert HardExamplePolicy("margin", 0.9).decide(torn).hard
    assert not HardExamplePolicy("max_prob", 0.9).decide(torn).hard


def test_entropy_normalised() -> None:
    assert HardExamplePolicy("entropy", 0).scores(np.full(10, 0.1))[0] == pytest.approx(1.0)
    assert HardExamplePolicy("entropy", 0).scores(np.eye(10)[0])[0] == pytest.approx(0.0, abs=1e-9)


def test_baselines() -> None:
    p = np.full((1000, 3), 1 / 3)
    assert not HardExamplePolicy("edge_only", 0.0).scores(p).__gt__(1.0).any()
    assert not any(HardExamplePolicy("edge_only", 0.0).decide(r).hard for r in p[:10])
    assert all(HardExamplePolicy("cloud_only", 5.0).decide(r).hard for r in p[:10])
    rnd = HardExamplePolicy("random", 0.75, seed=1)
    share = np.mean([rnd.decide(r).hard for r in p])
    assert 0.2 < share < 0.3


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        HardExamplePolicy("vibes", 0.1)


def test_softmax_stable() -> None:
    out = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    assert np.allclose(out.sum(axis=1), 1.0) and out[0, 0] == pytest.approx(1.0)


def test_auroc_and_cascade_curve() -> None:
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    scores = np.array([0.1, 0.9, 0.8, 0.2])
    y = np.array([0, 1, 2, 3])
    edge = np.array([0, 0, 0, 3])   # wrong on the two high-score inputs
    cloud = y.copy()
    _thr, rate, acc = cascade_curve(scores, edge, cloud, y)
    assert acc[0] == 1.0 and rate[0] == 1.0            # threshold -1: everything offloaded
    i = int(np.argmin(np.abs(rate - 0.5)))
    assert acc[i] == 1.0                               # offloading the two hard ones suffices
    assert acc[-1] == 0.5 and rate[-1] == 0.0


@pytest.mark.parametrize("name", ["max_prob", "margin", "entropy", "edge_only", "cloud_only"])
def test_one_input_path_agrees_with_the_batch_path(name: str) -> None:
    """The engine scores one input on Python floats (softmax_one, score_one) and a batch with
    numpy (softmax, scores): the same label, probabilities and score, to rounding."""
    rng = np.random.default_rng(7)
    pol = HardExamplePolicy(name, 0.1)
    for _ in range(500):
        k = int(rng.integers(2, 20))
        logits = (rng.normal(size=k) * rng.uniform(0.1, 40)).astype(np.float32)
        probs, label = softmax_one(logits)
        batch = softmax(logits[None])
        assert label == int(batch[0].argmax())
        assert np.allclose(probs, batch[0], rtol=0, atol=1e-15)
        assert pol.score_one(probs, label) == pytest.approx(float(pol.scores(batch)[0]),
                                                            rel=0, abs=1e-12)


def test_one_input_random_policy_draws_the_same_stream() -> None:
    one, many = HardExamplePolicy("random", 0.5, seed=3), HardExamplePolicy("random", 0.5, seed=3)
    p = [0.5, 0.5]
    assert [one.score_one(p, 0) for _ in range(5)] == [
        float(many.scores(np.array(p))[0]) for _ in range(5)]
