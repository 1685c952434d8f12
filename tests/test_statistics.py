"""pomt's statistics against their nominal properties, by simulation (no timing).

The simulations are those of scripts/stats_check.py (docs/PERFORMANCE.md has its
figures), run here with fewer draws and fixed seeds. Each bound is the nominal figure
less three Monte Carlo standard errors, and each was checked to fail with the method it
replaced (or a deliberately wrong one, noted beside it).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import load_script

from pomt_cli.measure.timing import median_ci_ranks

stats_check = load_script("stats_check")


def _floor(p: float, draws: int) -> float:
    """``p`` less three standard errors of a share out of ``draws``."""
    return p - 3 * math.sqrt(p * (1 - p) / draws)


def test_median_interval_ranks_keep_95_percent_for_every_n():
    # Exact: the interval [x_(j), x_(n-1-j)] covers the median with probability 1 - 2 P(B <= j),
    # B ~ Binomial(n, 1/2); the normal approximation above n = 1000 included. (Ranks one
    # further in, j + 1, give 0.885 at n = 20.)
    for n in range(1, 3001):
        ranks = median_ci_ranks(n)
        if n < 6:
            assert ranks is None
            continue
        j = ranks[0]
        assert ranks[1] == n - 1 - j
        below = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2))
                    for i in range(j + 1))
        assert 1 - 2 * below >= 0.95 - 1e-12, n


@pytest.mark.parametrize("name", list(stats_check.DISTRIBUTIONS))
def test_median_interval_covers_the_true_median(name):
    sampler, median = stats_check.DISTRIBUTIONS[name]
    rng = np.random.default_rng(1)
    for n in (6, 10, 20, 50):
        coverage = stats_check.median_coverage(sampler, median, n, 4000, rng)
        assert coverage >= _floor(0.95, 4000), (name, n, coverage)
    assert stats_check.median_coverage(sampler, median, 5, 10, rng) is None  # too few samples: no interval


@pytest.mark.parametrize("name", ["normal (sd 5%)", "5% outliers 3x slower"])
def test_stopping_rule_keeps_its_precision(name):
    # A rule that stopped at twice the precision reads within 1% in 0.75 of runs.
    r = stats_check.stopping_rule(name, 300, np.random.default_rng(2))
    assert r["ok"] == 1.0
    assert r["precise"] >= _floor(0.95, 300), r
    assert r["samples"] >= 20  # 3% noise needs more than the 10 minimum samples for 1%


def test_find_steps_rarely_invents_a_step_on_a_linear_curve():
    # 3 x MAD for every pair (the rule before) found a step on 0.28 of these curves.
    rng = np.random.default_rng(3)
    false = np.mean([stats_check.find_steps(stats_check.linear_curve(rng, 0.0)).height > 0 for _ in range(150)])
    assert false <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 150), false


def test_find_steps_finds_a_real_step_at_its_n():
    rates = stats_check.step_rates(0.005, 60, np.random.default_rng(4), steps=(0.10,))
    assert rates["power@10%"] >= 0.9, rates


@pytest.mark.parametrize("samples", [20, 50])
def test_faster_and_slower_claims_between_equal_settings_stay_rare(samples):
    # The one-sided claims of 95% intervals: at most 2.5% of equal pairs. compute-r's rule
    # before (a point's interval below the reference's median) claimed 0.077 at 20 calls.
    r = stats_check.false_claims(600, np.random.default_rng(5), samples=samples, curve_points=5)
    bound = 0.025 + 3 * math.sqrt(0.025 * 0.975 / 600)
    for claim in ("compute-r", "refine", "bench slower"):
        assert r[claim] <= bound, (claim, r)
    assert r["compute-r, flat curve"] <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 600), r


@pytest.mark.parametrize("args, words", [
    (["--scale", "0"], ("--scale: 0 is out of range", "> 0")),
    (["--scale", "-1"], ("--scale: -1 is out of range",)),
    (["--scale", "nan"], ("--scale: nan is out of range",)),
    (["--scale", "inf"], ("--scale: inf is out of range",)),
    (["--scale", "x"], ("--scale: 'x' is not a number", "--help")),
    (["--seed", "-1"], ("--seed: -1 is out of range",)),
])
def test_stats_check_refuses_bad_numbers_in_one_line(capsys, args, words):
    from conftest import script_refusal

    line = script_refusal(stats_check.main, args, capsys)
    assert all(word in line for word in words), line
