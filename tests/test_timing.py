"""The timing engine's logic, driven by a fake clock whose cost per call the test controls.

No test here asserts a real timing: the fake clock makes every duration exact, so the
stopping rule, the statistics, the budget and the out-of-memory path can be checked.
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from pomt_cli.measure.timing import Measurement, Task, measure, median_ci_ranks, precise_enough


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


def test_median_ci_ranks_accept_a_coverage_exactly_at_the_confidence():
    # 3 samples: [x_0, x_2] covers the median unless all 3 fall on one side, 1 - 2 / 8 = 0.75 exactly.
    assert median_ci_ranks(3, 0.75) == (0, 2)
    assert median_ci_ranks(3, 0.76) is None


def test_an_interval_exactly_at_the_precision_is_precise_enough():
    # 20 samples: the interval of the median is [x_5, x_14] = [99, 101] around the median 100, so its
    # half-width is 1 ms, exactly 1% of the median: "within 1%" includes the limit.
    ordered = np.array([90.0, 91.0, 92.0, 93.0, 94.0, 99.0] + [100.0] * 8 + [101.0, 110.0, 111.0, 112.0, 113.0, 114.0])
    assert median_ci_ranks(20) == (5, 14) and 0.01 * 100.0 == 1.0
    assert precise_enough(ordered, 0.01)
    assert not precise_enough(ordered, 0.0099)


def test_statistics_come_from_the_samples():
    raw = [float(x) for x in [5, 1, 4, 2, 3, 9, 7, 8, 6, 10]]
    m = Measurement("ok", "eager", raw, rel_precision=0.01)
    assert m.samples == 10
    assert m.median_ms == 5.5
    assert (m.ci_low_ms, m.ci_high_ms) == (2.0, 9.0)  # ranks 1 and 8 of the sorted samples
    assert m.min_ms == 1.0 and m.max_ms == 10.0
    assert m.p10_ms == pytest.approx(np.percentile(raw, 10))
    assert m.p90_ms == pytest.approx(np.percentile(raw, 90))
    assert list(m.raw_ms) == raw


def reference_statistics(raw: list[float], confidence: float = 0.95) -> dict:
    """The statistics written out with numpy, the CI of the median by its binomial definition."""
    x = np.array(raw)
    s = np.sort(x)
    n = len(s)
    # The largest 0-based rank j with P(Binomial(n, 1/2) <= j) <= (1 - confidence) / 2.
    js = [j for j in range(n // 2 + 1) if binom_cdf(j, n) <= (1 - confidence) / 2]
    lo, hi = (s[js[-1]], s[n - 1 - js[-1]]) if js else (None, None)
    median = np.percentile(x, 50)
    return {
        "samples": n, "median_ms": median, "p10_ms": np.percentile(x, 10), "p90_ms": np.percentile(x, 90),
        "iqr_ms": np.percentile(x, 75) - np.percentile(x, 25), "mean_ms": x.mean(),
        "std_ms": x.std(ddof=1) if n > 1 else 0.0, "min_ms": s[0], "max_ms": s[-1],
        "ci_low_ms": lo, "ci_high_ms": hi,
        "rel_halfwidth": None if lo is None else max(median - lo, hi - median) / median,
    }


@pytest.mark.parametrize("raw", [
    [3.0],
    [2.0, 1.0],
    [1.0, 2.0, 2.0, 3.0, 10.0],  # too few for a 95% interval of the median
    [0.51, 0.49, 0.5, 0.52, 0.48, 0.5],
    [float(v) for v in np.random.default_rng(0).lognormal(0.0, 0.3, 37)],
    [float(v) for v in np.random.default_rng(1).normal(5.0, 0.1, 400)],
])
def test_statistics_agree_with_a_written_out_reference(raw):
    m = Measurement("budget", "eager", raw, rel_precision=0.01)
    expected = reference_statistics(raw)
    got = {k: getattr(m, k) for k in expected}
    assert {k for k, v in got.items() if v is None} == {k for k, v in expected.items() if v is None}
    assert {k: v for k, v in got.items() if v is not None} == pytest.approx(
        {k: v for k, v in expected.items() if v is not None}, rel=1e-12)
    assert m.raw_ms == tuple(raw)  # in the order taken


def test_statistics_follow_the_confidence_level():
    raw = [float(v) for v in np.random.default_rng(2).normal(5.0, 0.5, 60)]
    wide, narrow = (Measurement("ok", "eager", raw, rel_precision=0.01, confidence=c) for c in (0.99, 0.8))
    assert (wide.ci_low_ms, wide.ci_high_ms) == (reference_statistics(raw, 0.99)["ci_low_ms"],
                                                 reference_statistics(raw, 0.99)["ci_high_ms"])
    assert wide.ci_low_ms < narrow.ci_low_ms < narrow.median_ms < narrow.ci_high_ms < wide.ci_high_ms


def test_pooling_equals_measuring_the_concatenated_samples():
    task = Task("pomt r=56 @3", "deit_small_patch16_224", 4, 141, "float16")
    rng = np.random.default_rng(3)
    parts = [Measurement(status, "eager", [float(v) for v in rng.normal(mu, 0.2, k)], rel_precision=0.01,
                         task=task, warmup_calls=3, elapsed_s=0.5)
             for status, mu, k in (("ok", 5.0, 40), ("budget", 5.5, 12), ("ok", 5.1, 25))]
    pool = Measurement.pool(parts)
    concatenated = [v for m in parts for v in m.raw_ms]
    whole = Measurement(pool.status, "eager", concatenated, rel_precision=0.01, task=task)
    assert pool.raw_ms == tuple(concatenated)
    assert pool.task == task and pool.samples == 77
    for stat in reference_statistics(concatenated):
        assert getattr(pool, stat) == getattr(whole, stat)
    assert pool.warmup_calls == 9 and pool.elapsed_s == pytest.approx(1.5)
    # The pool's status is its own precision, whatever stopped each part.
    assert pool.status == ("ok" if precise_enough(np.sort(concatenated), 0.01) else "budget")
    tight = Measurement("budget", "eager", [5.0, 5.01, 4.99] * 4, rel_precision=0.01)
    assert Measurement.pool([tight]).status == "ok"  # precise, though the budget ran out before min_samples
    assert Measurement.pool([Measurement("ok", "eager", [1.0, 2.0] * 5, rel_precision=0.01)]).status == "budget"


def test_pooling_refuses_different_tasks_and_settings():
    a = Measurement("ok", "eager", [1.0] * 6, rel_precision=0.01, task=Task("none", batch_size=1))
    with pytest.raises(ValueError, match="different tasks"):
        Measurement.pool([a, Measurement("ok", "eager", [1.0] * 6, rel_precision=0.01, task=Task("none", batch_size=2))])
    with pytest.raises(ValueError, match="different tasks"):
        Measurement.pool([a, Measurement("ok", "cuda_graph", [1.0] * 6, rel_precision=0.01, task=a.task)])
    with pytest.raises(ValueError, match="at least one"):
        Measurement.pool([])


def test_out_of_memory_result_is_recognisable_and_has_no_statistics():
    task = Task("tome r=8", "vit_large_patch16_224", 1024, dtype="float32")
    oom = Measurement.out_of_memory("CUDA out of memory", mode="eager", rel_precision=0.01, task=task)
    assert oom.status == "oom" and oom.error == "CUDA out of memory" and oom.task == task
    assert oom.samples == 0 and oom.raw_ms == ()
    for stat in ("median_ms", "p10_ms", "p90_ms", "iqr_ms", "ci_low_ms", "ci_high_ms", "mean_ms", "std_ms",
                 "min_ms", "max_ms", "rel_halfwidth"):
        assert getattr(oom, stat) is None, stat
    assert "out of memory" in repr(oom) and "tome r=8" in repr(oom)
    # Out of memory in any round makes the pool out of memory, with the first round's message.
    ok = Measurement("ok", "eager", [2.0] * 10, rel_precision=0.01, task=task, elapsed_s=1.0)
    other = Measurement.out_of_memory("later", mode="eager", rel_precision=0.01, task=task, elapsed_s=0.25)
    pooled = Measurement.pool([ok, oom, other])
    assert pooled.status == "oom" and pooled.error == "CUDA out of memory" and pooled.median_ms is None
    assert pooled.elapsed_s == 1.25
    # Samples and out of memory exclude each other.
    with pytest.raises(ValueError, match="samples unless it ran out of memory"):
        Measurement("oom", "eager", [1.0], rel_precision=0.01)
    with pytest.raises(ValueError, match="samples unless it ran out of memory"):
        Measurement("ok", "eager", [], rel_precision=0.01)


def test_a_measurement_is_an_immutable_value():
    m = Measurement("ok", "eager", [1.0, 3.0, 2.0], rel_precision=0.01, task=Task("proxy", tokens=9))
    with pytest.raises(AttributeError):
        m.raw_ms = (5.0,)
    assert m == Measurement("ok", "eager", (1.0, 3.0, 2.0), rel_precision=0.01, task=Task("proxy", tokens=9))
    assert str(m.task) == "n=9: proxy" and str(Task("none", "vit_tiny", 4, dtype="float16")) == "vit_tiny, B=4, float16: none"


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
    assert m.task == Task()  # none given
    task = Task("proxy", "vit_tiny_patch16_224", 8, 99, "float32")
    assert measure(workload(clock, constant(0.005)), device="cpu", clock=clock, task=task).task == task


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


def test_a_warmup_call_longer_than_the_budget_still_leaves_one_timed_sample():
    clock = FakeClock()
    fn = workload(clock, constant(2.5))
    m = measure(fn, device="cpu", clock=clock, budget_s=1.0, warmup=3, min_samples=10)
    # The one warm-up call (2.5 s) spent the whole 1 s budget; one call is timed all the same.
    assert (m.warmup_calls, m.samples, fn.calls, m.status) == (1, 1, 2, "budget")
    assert m.median_ms == pytest.approx(2500.0)


def test_a_slow_first_call_leaves_the_timed_calls_half_the_budget():
    # A first call of 1.5 s (lazy set-up, or a busy machine), then 10 ms calls: the warm-up ate
    # the 1 s budget, and the timed calls still get 0.5 s, enough for an interval of the median.
    clock = FakeClock()
    fn = workload(clock, itertools.chain([1.5], constant(0.010)))
    m = measure(fn, device="cpu", clock=clock, budget_s=1.0, warmup=3, min_samples=10)
    assert m.warmup_calls == 1 and m.samples >= 10 and m.ci_low_ms is not None
    assert m.median_ms == pytest.approx(10.0) and m.elapsed_s <= 1.5 + 0.5 + 0.010
    # Where the warm-up left more than half the budget, the budget alone decides (as before).
    clock = FakeClock()
    fn = workload(clock, (0.004 if i % 2 else 0.006 for i in range(100_000)))
    m = measure(fn, device="cpu", clock=clock, rel_precision=0.01, budget_s=0.5, warmup=2)
    assert 0.5 <= m.elapsed_s <= 0.5 + 0.006


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
    assert m.samples == 0 and m.median_ms is None and m.ci_low_ms is None
    assert m.error == str(exc)
    assert m.warmup_calls == min(after, 1)


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
