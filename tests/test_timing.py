"""The timing engine's logic, driven by a fake clock whose cost per call the test controls.

No test here asserts a real timing: the fake clock makes every duration exact, so the
stopping rule, the statistics, the budget and the out-of-memory path can be checked.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from pomt_cli.timing import Measurement, measure, median_ci_ranks, precise_enough, summarize


class FakeClock:
    """A clock that only moves when a fake workload says it took time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def workload(clock: FakeClock, costs_s):
    """A callable that advances ``clock`` by the next cost (seconds) each time it runs; counts calls."""
    costs = iter(costs_s)

    def fn() -> None:
        fn.calls += 1
        clock.now += next(costs)

    fn.calls = 0
    return fn


def constant(cost_s: float):
    while True:
        yield cost_s


def binom_cdf(k: int, n: int) -> float:
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


@pytest.mark.parametrize("n, expected", [(5, None), (6, (0, 5)), (10, (1, 8)), (20, (5, 14))])
def test_median_ci_ranks_small_samples(n, expected):
    assert median_ci_ranks(n) == expected


@pytest.mark.parametrize("n", [7, 13, 50, 101, 400, 1000])
def test_median_ci_ranks_are_the_tightest_with_95_percent_coverage(n):
    lo, hi = median_ci_ranks(n)
    assert hi == n - 1 - lo
    assert 1 - 2 * binom_cdf(lo, n) >= 0.95
    assert 1 - 2 * binom_cdf(lo + 1, n) < 0.95  # one rank tighter would cover less


def test_median_ci_ranks_normal_approximation_matches_exact_beyond_1000():
    n = 1600
    lo, _ = median_ci_ranks(n)
    exact = max(j for j in range(n // 2) if binom_cdf(j, n) <= 0.025)
    assert abs(lo - exact) <= 1


def test_summarize_statistics_come_from_the_samples():
    raw = [float(x) for x in [5, 1, 4, 2, 3, 9, 7, 8, 6, 10]]
    m = summarize(raw, status="ok", mode="eager", rel_precision=0.01)
    assert m.samples == 10
    assert m.median_ms == 5.5
    assert (m.ci_low_ms, m.ci_high_ms) == (2.0, 9.0)  # ranks 1 and 8 of the sorted samples
    assert m.min_ms == 1.0 and m.max_ms == 10.0
    assert m.p10_ms == pytest.approx(np.percentile(raw, 10))
    assert m.p90_ms == pytest.approx(np.percentile(raw, 90))
    assert m.raw_ms == raw


def test_constant_cost_stops_at_min_samples_with_exact_statistics():
    clock = FakeClock()
    fn = workload(clock, constant(0.005))
    m = measure(fn, device="cpu", clock=clock, min_samples=10, warmup=3, budget_s=10)
    assert m.status == "ok"
    assert m.samples == 10
    assert m.warmup_calls == 3
    assert fn.calls == 13
    assert m.median_ms == pytest.approx(5.0)
    assert m.ci_low_ms == pytest.approx(5.0) and m.ci_high_ms == pytest.approx(5.0)
    assert m.elapsed_s == pytest.approx(13 * 0.005)


def test_noisy_workload_runs_until_the_ci_of_the_median_is_within_precision():
    rng = random.Random(3)
    clock = FakeClock()
    fn = workload(clock, (0.010 * (1 + 0.05 * rng.gauss(0, 1)) for _ in range(100_000)))
    m = measure(fn, device="cpu", clock=clock, rel_precision=0.01, min_samples=10, budget_s=100)
    assert m.status == "ok"
    assert m.samples > 50  # 5% noise needs far more than 10 samples for a 1% CI
    assert m.rel_halfwidth <= 0.01
    ordered = sorted(m.raw_ms)
    lo, hi = median_ci_ranks(len(ordered))
    assert (m.ci_low_ms, m.ci_high_ms) == (ordered[lo], ordered[hi])
    assert precise_enough(np.array(ordered), 0.01)
    # The rule stops soon after precision is first reached (chunks grow by a quarter).
    first = next(k for k in range(10, len(ordered) + 1) if precise_enough(np.sort(m.raw_ms[:k]), 0.01))
    assert m.samples <= math.ceil(first * 1.25) + 1


def test_bimodal_workload_stops_at_the_budget():
    clock = FakeClock()
    fn = workload(clock, (0.004 if i % 2 else 0.006 for i in range(100_000)))
    m = measure(fn, device="cpu", clock=clock, rel_precision=0.01, budget_s=0.5, warmup=2)
    assert m.status == "budget"
    assert 0.5 <= m.elapsed_s <= 0.5 + 0.006  # stops within one call of the budget
    assert m.samples == fn.calls - 2
    assert m.ci_low_ms == pytest.approx(4.0) and m.ci_high_ms == pytest.approx(6.0)


def test_slow_call_shortens_warmup_and_still_gives_a_sample():
    clock = FakeClock()
    fn = workload(clock, constant(0.4))
    m = measure(fn, device="cpu", clock=clock, budget_s=1.0, warmup=3, min_samples=10)
    assert m.warmup_calls == 1  # the first warm-up call already ate more than a quarter of the budget
    assert m.status == "budget"
    assert m.samples >= 1
    assert m.median_ms == pytest.approx(400.0)


def test_max_samples_caps_the_run():
    clock = FakeClock()
    fn = workload(clock, (0.004 if i % 2 else 0.006 for i in range(100_000)))
    m = measure(fn, device="cpu", clock=clock, budget_s=100, min_samples=10, max_samples=40, warmup=0)
    assert m.samples == 40
    assert m.status == "budget"


def raising(exc: BaseException, after: int):
    calls = {"n": 0}

    def fn():
        calls["n"] += 1
        if calls["n"] > after:
            raise exc

    return fn


@pytest.mark.parametrize(
    "exc",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("MPS backend out of memory (MPS allocated: 1 GiB)"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: can't allocate memory"),
    ],
)
@pytest.mark.parametrize("after", [0, 6])
def test_out_of_memory_is_a_result_not_a_crash(exc, after):
    m = measure(raising(exc, after), device="cpu", budget_s=5, warmup=1)
    assert m.status == "oom"
    assert m.samples == 0 and m.median_ms is None
    assert m.error == str(exc)


def test_other_errors_propagate():
    with pytest.raises(ValueError, match="shape mismatch"):
        measure(raising(ValueError("shape mismatch"), 2), device="cpu", budget_s=5)


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="CUDA"):
        measure(lambda: None, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="rel_precision"):
        measure(lambda: None, device="cpu", rel_precision=0)
    with pytest.raises(ValueError):
        measure(lambda: None, device="cpu", min_samples=20, max_samples=10)


def test_real_clock_on_a_real_computation_gives_a_consistent_measurement():
    a = torch.randn(64, 64)
    m = measure(lambda: a @ a, device=torch.device("cpu"), budget_s=0.2, min_samples=10)
    assert isinstance(m, Measurement)
    assert m.status in ("ok", "budget")
    assert m.samples == len(m.raw_ms) >= 10
    assert m.min_ms <= m.p10_ms <= m.median_ms <= m.p90_ms <= m.max_ms
    assert m.ci_low_ms <= m.median_ms <= m.ci_high_ms
    assert m.mode == "eager"


def test_samples_of_earlier_visits_count_towards_the_precision():
    clock = FakeClock()
    fn = workload(clock, constant(0.01))
    alone = measure(fn, device="cpu", min_samples=3, warmup=0, budget_s=10, clock=clock)
    assert alone.samples >= 6  # fewer than 6 samples give no 95% interval of the median
    clock = FakeClock()
    fn = workload(clock, constant(0.01))
    topped_up = measure(fn, device="cpu", min_samples=3, warmup=0, budget_s=10, clock=clock, prior_ms=[10.0] * 20)
    assert topped_up.status == "ok" and topped_up.samples == 3 and topped_up.raw_ms == pytest.approx([10.0] * 3)
    clock = FakeClock()
    fn = workload(clock, constant(0.01))
    disagreeing = measure(fn, device="cpu", min_samples=3, warmup=0, budget_s=10, clock=clock,
                          prior_ms=[5.0] * 10 + [20.0] * 10)
    assert disagreeing.samples > 3  # a wide pool needs more samples
