"""Wilson intervals, exact McNemar, paired counts and Holm's correction."""

import math

import pytest

from entropix.evaluate.stats import holm, mcnemar_exact, paired_counts, wilson_interval


def test_wilson_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4)
    assert hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0
    assert lo == pytest.approx(1 - 0.2775, abs=1e-4)
    # 81/263 (a textbook example): 0.2553 .. 0.3662
    lo, hi = wilson_interval(81, 263)
    assert (lo, hi) == (pytest.approx(0.2553, abs=1e-4), pytest.approx(0.3662, abs=1e-4))


def test_wilson_properties():
    for n in (1, 7, 50, 400):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
            # Symmetric under swapping successes and failures.
            lo2, hi2 = wilson_interval(n - k, n)
            assert lo == pytest.approx(1 - hi2, abs=1e-12)
    # A wider z widens the interval.
    assert wilson_interval(5, 10, z=2.576)[0] < wilson_interval(5, 10)[0]
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(-1, 10)


def test_wilson_matches_scipy_when_available():
    import scipy.stats as scipy_stats

    for k, n in [(0, 10), (3, 17), (50, 100), (399, 400)]:
        ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        lo, hi = wilson_interval(k, n)
        assert lo == pytest.approx(ci.low, abs=1e-6)
        assert hi == pytest.approx(ci.high, abs=1e-6)


def test_mcnemar_against_scipy():
    import scipy.stats as scipy_stats

    for b, c in [(0, 1), (1, 0), (0, 5), (3, 1), (10, 2), (7, 7), (25, 12), (0, 20), (60, 41), (150, 190)]:
        expected = scipy_stats.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_mcnemar_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(4, 4) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(3, 1) == mcnemar_exact(1, 3)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


@pytest.mark.slow  # the exact sum over 10,400 discordant pairs takes seconds
def test_mcnemar_stays_finite_and_exact_for_very_large_counts():
    p = mcnemar_exact(5000, 5400)
    assert 0.0 < p < 0.01 and math.isfinite(p)


def test_paired_counts():
    a = {"p1": True, "p2": True, "p3": False, "p4": False, "only_a": True}
    b = {"p1": True, "p2": False, "p3": True, "p4": False, "only_b": False}
    assert paired_counts(a, b) == (1, 1, 1, 1)
    assert paired_counts(b, a) == (1, 1, 1, 1)
    assert paired_counts({}, b) == (0, 0, 0, 0)
    a = {i: i % 2 == 0 for i in range(10)}
    b = {i: i % 3 == 0 for i in range(10)}
    both, only_a, only_b, neither = paired_counts(a, b)
    assert (both, only_a, only_b, neither) == (2, 3, 2, 3)
    assert both + only_a + only_b + neither == 10


def test_wilson_coverage_is_near_nominal():
    # Exact coverage: the binomial probability of every k whose interval holds the true p.
    import scipy.stats as scipy_stats

    for n in (50, 200):
        for p in (0.05, 0.2, 0.385, 0.515, 0.8):
            pmf = scipy_stats.binom(n, p).pmf
            cover = sum(pmf(k) for k in range(n + 1) if wilson_interval(k, n)[0] <= p <= wilson_interval(k, n)[1])
            assert 0.92 < cover < 0.98, (n, p, cover)


def test_mcnemar_seed8_letters_by_hand():
    # auto vs greedy on seed-8 letters: b=15, c=5; 2 * sum_{i<=5} C(20, i) / 2^20 = 2 * 21700 / 1048576.
    assert mcnemar_exact(15, 5) == pytest.approx(43400 / 1048576, rel=1e-12)
    assert mcnemar_exact(15, 5) == pytest.approx(0.041389, abs=1e-6)


def test_holm_hand_values():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, then max(0.06, 0.04).
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # The step-down keeps the order: the larger raw p never gets the smaller adjusted one.
    assert holm([0.04, 0.045]) == pytest.approx([0.08, 0.08])
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert holm([0.2]) == [0.2]
    assert holm([]) == []
    with pytest.raises(ValueError):
        holm([0.1, 1.5])


def test_holm_on_the_seed8_auto_family():
    # auto vs greedy on the six seed-8 tasks: letters' p = 0.041 is the second smallest of six, so x5.
    raw = {"decimals": mcnemar_exact(66, 5), "letters": mcnemar_exact(15, 5), "coinflip": mcnemar_exact(34, 42),
           "compare": mcnemar_exact(33, 40), "carries": mcnemar_exact(2, 0), "position": 1.0}
    adj = dict(zip(raw, holm(list(raw.values()))))
    assert adj["decimals"] == pytest.approx(6 * raw["decimals"])
    assert adj["letters"] == pytest.approx(5 * raw["letters"]) and adj["letters"] > 0.05
    assert 4 * raw["coinflip"] > 1 and adj["coinflip"] == 1.0  # capped at 1
    assert adj["compare"] == adj["carries"] == adj["position"] == 1.0


def test_holm_between_raw_and_bonferroni_and_controls_fwer():
    import random

    rng = random.Random(3)
    for _ in range(200):
        ps = [rng.random() ** 3 for _ in range(rng.randint(1, 8))]
        adj = holm(ps)
        for p, a in zip(ps, adj):
            assert p <= a <= min(1.0, len(ps) * p) + 1e-15
    # Under the global null (independent uniform p-values) a family of 6 rejects anything at
    # most 5% of the time; 4000 families put the estimate within about 1 point of the truth.
    families = 4000
    false = sum(min(holm([rng.random() for _ in range(6)])) < 0.05 for _ in range(families))
    assert false / families <= 0.06
