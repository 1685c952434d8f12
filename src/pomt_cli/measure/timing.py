"""The timing engine: how long one call takes on a device, with its uncertainty.

:func:`measure` times a zero-argument callable (one forward pass) and returns a
:class:`Measurement`: the raw per-call times, what was timed (a :class:`Task`) and how
the run ended; the median, p10 and p90, a 95% confidence interval of the median and the
other statistics are derived from the samples. :meth:`Measurement.pool` pools two
measurements of one task (visits of a grid point, rounds of a bench), and
:meth:`Measurement.out_of_memory` is the result of a call that did not fit.

- CUDA: events recorded on the stream around every call, read after one synchronisation
  per chunk of calls; optionally the call is captured once in a CUDA graph (warmed up on
  a side stream first) and the graph's replays are timed, which removes the CPU's launch
  overhead. CPU and MPS: ``time.perf_counter`` around each call, with a device
  synchronisation on MPS.
- Repetitions are adaptive: after ``min_samples`` calls the engine stops as soon as the
  confidence interval of the median lies within ``rel_precision`` of the median, or when
  the time budget is spent. The interval comes from order statistics (the binomial
  distribution of the number of samples below the median), so it needs no bootstrap and
  no assumption about the shape of the noise.
- Running out of memory is a result (status ``"oom"``), not a crash.

A measurement is a value with its context, in the spirit of ``torch.utils.benchmark``.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import torch

from pomt_cli.defaults import MAX_SAMPLES

Status = Literal["ok", "budget", "oom"]
Mode = Literal["eager", "cuda_graph"]

#: The most calls timed between two synchronisations on CUDA.
MAX_CHUNK = 256


@dataclass(frozen=True)
class Task:
    """What was measured, in the spirit of ``torch.utils.benchmark``'s task spec.

    ``label`` names the workload (a method with its setting such as ``pomt r=56 @3``,
    ``proxy``, ``ideal(tome)``); the other fields are None where they do not apply.
    Two measurements pool only when their tasks are equal.
    """

    label: str = ""
    model: str | None = None
    batch_size: int | None = None
    tokens: int | None = None
    dtype: str | None = None

    def __str__(self) -> str:
        """``deit_small_patch16_224, B=4, n=120, float16: pomt @3`` (the fields present)."""
        parts = [self.model,
                 None if self.batch_size is None else f"B={self.batch_size}",
                 None if self.tokens is None else f"n={self.tokens}",
                 self.dtype]
        head = ", ".join(p for p in parts if p)
        return f"{head}: {self.label}" if head and self.label else head or self.label


@dataclass(frozen=True)
class Measurement:
    """The time of one call (:attr:`task`), measured many times: the raw samples and what they give.

    The per-call times in milliseconds (``raw_ms``, in the order taken) are the one source:
    every statistic is derived from them on first use. ``status`` says how the run ended:
    ``"ok"`` when the confidence interval of the median reached ``rel_precision``,
    ``"budget"`` when the time budget (or ``max_samples``) ran out first, and ``"oom"``
    when the call ran out of memory; an ``"oom"`` measurement has no samples, and its
    statistics are None. Build one with :meth:`out_of_memory`, pool several with :meth:`pool`.
    A pooled measurement keeps how many samples each part gave (``part_sizes``, in order),
    so that each part's median can be told (``part_medians``): the rounds of a bench, whose
    spread shows drift that the pooled samples' interval does not
    (:mod:`pomt_cli.measure.ratio`).
    """

    status: Status
    mode: Mode
    raw_ms: tuple[float, ...]
    rel_precision: float
    task: Task = Task()
    confidence: float = 0.95
    warmup_calls: int = 0
    elapsed_s: float = 0.0
    error: str | None = None
    part_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw_ms", tuple(float(v) for v in self.raw_ms))
        object.__setattr__(self, "part_sizes", tuple(int(v) for v in self.part_sizes))
        if self.part_sizes and (sum(self.part_sizes) != len(self.raw_ms) or min(self.part_sizes) < 1):
            raise ValueError(f"part sizes {self.part_sizes} do not split {len(self.raw_ms)} samples")
        if self.status not in ("ok", "budget", "oom") or self.mode not in ("eager", "cuda_graph"):
            raise ValueError(f"unknown status {self.status!r} or mode {self.mode!r}")
        if (self.status == "oom") != (not self.raw_ms):
            raise ValueError(f"a measurement has samples unless it ran out of memory, "
                             f"got status {self.status!r} with {len(self.raw_ms)} samples")

    @classmethod
    def out_of_memory(cls, error: str, *, mode: Mode, rel_precision: float, task: Task = Task(),
                      confidence: float = 0.95, warmup_calls: int = 0, elapsed_s: float = 0.0) -> Measurement:
        """The result of a call that ran out of memory: status ``"oom"``, no samples, ``error`` kept."""
        return cls("oom", mode, (), rel_precision, task, confidence, warmup_calls, elapsed_s, error)

    @classmethod
    def pool(cls, parts: Sequence[Measurement]) -> Measurement:
        """One measurement from the samples of several of the same task (visits, rounds).

        Its samples are the parts' concatenated in order, so its statistics are those of
        the concatenated samples; its status is ``"ok"`` when their interval of the median
        reaches the precision (``"budget"`` otherwise), whatever stopped each part; its
        ``part_sizes`` are the parts' sample counts. Out of memory in any part makes the
        pool out of memory (the first such part); warm-up calls and elapsed time add up.

        Raises:
            ValueError: no parts, or parts that differ in task, mode, precision or confidence.
        """
        if not parts:
            raise ValueError("pooling needs at least one measurement")
        first = parts[0]
        for m in parts[1:]:
            if (m.task, m.mode, m.rel_precision, m.confidence) != (first.task, first.mode, first.rel_precision,
                                                                     first.confidence):
                raise ValueError(f"cannot pool measurements of different tasks or settings: {first!r} and {m!r}")
        spent = {"warmup_calls": sum(m.warmup_calls for m in parts), "elapsed_s": sum(m.elapsed_s for m in parts)}
        oom = next((m for m in parts if m.status == "oom"), None)
        if oom is not None:
            return dataclasses.replace(oom, **spent)
        raw_ms = tuple(v for m in parts for v in m.raw_ms)
        status: Status = "ok" if precise_enough(np.sort(raw_ms), first.rel_precision, first.confidence) else "budget"
        return cls(status, first.mode, raw_ms, first.rel_precision, first.task, first.confidence, **spent,
                   part_sizes=tuple(m.samples for m in parts))

    @property
    def samples(self) -> int:
        """Timed calls."""
        return len(self.raw_ms)

    @cached_property
    def part_medians(self) -> tuple[float, ...]:
        """Each pooled part's median, in order (empty for a measurement that was not pooled)."""
        ends = np.cumsum(self.part_sizes, dtype=np.int64)
        return tuple(float(np.median(self._values[end - size:end])) for size, end in zip(self.part_sizes, ends))

    @cached_property
    def _values(self) -> np.ndarray:
        return np.asarray(self.raw_ms, dtype=np.float64)

    @cached_property
    def _ordered(self) -> np.ndarray:
        return np.sort(self._values)

    def _percentile(self, q: float) -> float | None:
        return float(np.percentile(self._ordered, q)) if self.raw_ms else None

    @cached_property
    def median_ms(self) -> float | None:
        """The median (numpy's linear interpolation, as for the percentiles)."""
        return self._percentile(50)

    @cached_property
    def p10_ms(self) -> float | None:
        return self._percentile(10)

    @cached_property
    def p90_ms(self) -> float | None:
        return self._percentile(90)

    @cached_property
    def iqr_ms(self) -> float | None:
        """The interquartile range, p75 - p25."""
        return self._percentile(75) - self._percentile(25) if self.raw_ms else None

    @cached_property
    def mean_ms(self) -> float | None:
        return float(self._values.mean()) if self.raw_ms else None

    @cached_property
    def std_ms(self) -> float | None:
        """The sample standard deviation (0 for a single sample)."""
        if not self.raw_ms:
            return None
        return float(self._values.std(ddof=1)) if self.samples > 1 else 0.0

    @property
    def min_ms(self) -> float | None:
        return float(self._ordered[0]) if self.raw_ms else None

    @property
    def max_ms(self) -> float | None:
        return float(self._ordered[-1]) if self.raw_ms else None

    @cached_property
    def _ci_ms(self) -> tuple[float, float] | tuple[None, None]:
        ranks = median_ci_ranks(self.samples, self.confidence)
        if ranks is None:
            return None, None
        return float(self._ordered[ranks[0]]), float(self._ordered[ranks[1]])

    @property
    def ci_low_ms(self) -> float | None:
        """Lower end of the confidence interval of the median (None below 6 samples at 95%)."""
        return self._ci_ms[0]

    @property
    def ci_high_ms(self) -> float | None:
        """Upper end of the confidence interval of the median."""
        return self._ci_ms[1]

    @property
    def rel_halfwidth(self) -> float | None:
        """The larger distance from the median to an end of its CI, relative to the median."""
        median, (lo, hi) = self.median_ms, self._ci_ms
        if median is None or lo is None or hi is None or median <= 0:
            return None
        return max(median - lo, hi - median) / median

    def __repr__(self) -> str:
        """``Measurement(tiny, B=4, n=9: proxy; median 1.234 ms, 40 samples, ok, eager)``, without the samples."""
        if self.status == "oom":
            return f"Measurement({self.task}; out of memory: {self.error}, {self.mode})"
        return (f"Measurement({self.task}; median {self.median_ms:.4g} ms, {self.samples} samples, "
                f"{self.status}, {self.mode})")


def median_ci_ranks(n: int, confidence: float = 0.95) -> tuple[int, int] | None:
    """0-based ranks (lo, hi) of the sorted samples bounding the median with ``confidence``.

    The number of samples below the true median is Binomial(n, 1/2), so the interval
    ``[x_(j), x_(n-1-j)]`` (0-based) covers it with probability ``1 - 2 P(B <= j)``; ``j`` is
    the largest rank that keeps that at least ``confidence``. Exact for ``n <= 1000``,
    the normal approximation beyond. ``None`` when ``n`` is too small for any interval
    (``n < 6`` at 95%).
    """
    tail = (1.0 - confidence) / 2.0
    if n <= 0:
        return None
    if n <= 1000:
        total = 2**n
        cdf = 0
        j = -1
        for i in range(n // 2 + 1):
            cdf += math.comb(n, i)
            if cdf / total > tail:
                break
            j = i
        if j < 0:
            return None
        return j, n - 1 - j
    z = NormalDist().inv_cdf(1.0 - tail)
    j = int(math.floor(n / 2.0 - z * math.sqrt(n) / 2.0)) - 1
    return max(j, 0), n - 1 - max(j, 0)


def precise_enough(ordered_ms: np.ndarray, rel_precision: float, confidence: float = 0.95) -> bool:
    """Whether the CI of the median of the sorted samples lies within ``rel_precision`` of it."""
    ranks = median_ci_ranks(len(ordered_ms), confidence)
    if ranks is None:
        return False
    median = float(np.median(ordered_ms))
    if median <= 0:
        return False
    lo, hi = float(ordered_ms[ranks[0]]), float(ordered_ms[ranks[1]])
    return max(median - lo, hi - median) <= rel_precision * median


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says a device (CUDA, MPS, CPU) ran out of memory."""
    # torch.OutOfMemoryError came in torch 2.3; torch.cuda's name for it exists since 1.13.
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return "out of memory" in text or "can't allocate memory" in text
    return False


def synchronize(device: torch.device) -> None:
    """Wait for all work queued on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def release_memory(device: torch.device) -> None:
    """Collect garbage and return cached blocks to the device, after an out-of-memory error."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Keep Python's garbage collector from running inside timed calls (as timeit does)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _time_with_clock(fn: Callable[[], Any], count: int, device: torch.device,
                     clock: Callable[[], float]) -> list[float]:
    """Per-call milliseconds from a host clock, synchronising the device after each call."""
    out = []
    for _ in range(count):
        start = clock()
        fn()
        synchronize(device)
        out.append((clock() - start) * 1e3)
    return out


def _time_with_events(fn: Callable[[], Any], count: int, device: torch.device) -> list[float]:
    """Per-call milliseconds from CUDA events around each call; one synchronisation per chunk.

    Calls are queued back to back, so the device never idles between them for the host's
    sake; each call's time is the interval between its own two events on the stream.
    """
    stream = torch.cuda.current_stream(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    for start, end in zip(starts, ends):
        start.record(stream)
        fn()
        end.record(stream)
    ends[-1].synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def _capture_graph(fn: Callable[[], Any], device: torch.device, warmup: int) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph, after ``warmup`` calls on a side stream.

    ``fn`` must read and write only tensors that outlive the graph (its inputs are
    captured by address, as CUDA graphs require).
    """
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    synchronize(device)
    return graph


def measure(
    fn: Callable[[], Any],
    *,
    device: torch.device | str,
    rel_precision: float = 0.01,
    budget_s: float = 1.0,
    min_samples: int = 10,
    max_samples: int = MAX_SAMPLES,
    warmup: int = 3,
    cuda_graphs: bool = False,
    confidence: float = 0.95,
    clock: Callable[[], float] = time.perf_counter,
    prior_ms: Sequence[float] = (),
    task: Task = Task(),
) -> Measurement:
    """Time ``fn()`` on ``device`` until the median is known to ``rel_precision`` or ``budget_s`` is spent.

    Args:
        fn: one call of the workload, e.g. a forward pass on fixed input tensors. Run it
            under ``torch.inference_mode()`` if it should not record autograd history.
        device: where ``fn`` runs; decides the timer (CUDA events, or ``clock`` with a
            device synchronisation).
        rel_precision: stop once the CI of the median lies within this fraction of it.
        budget_s: wall-clock seconds for this measurement, warm-up included; the timed
            calls get at least half of it, even after a warm-up that took longer. At least
            one sample is always taken.
        min_samples: the fewest timed calls before the precision rule may stop.
        max_samples: the most timed calls.
        warmup: untimed calls first (at least one; fewer when they would eat more than a
            quarter of the budget). With ``cuda_graphs`` they run on a side stream before
            the capture.
        cuda_graphs: capture ``fn`` once in a CUDA graph and time its replays (CUDA only).
        confidence: the confidence level of the interval of the median.
        clock: the host clock for CPU/MPS timing and for the budget (seconds). Tests pass
            a fake clock that ``fn`` advances.
        prior_ms: samples of the same call from earlier visits. They count towards the
            precision rule (this visit stops once the pool of prior and new samples is
            precise enough, after ``min_samples`` new ones), but the measurement holds only
            the new samples.
        task: what ``fn`` is (model, batch size, tokens, method, dtype), carried on the result.

    Raises:
        ValueError: ``cuda_graphs`` on a device other than CUDA, or a parameter out of range.
        Exception: whatever ``fn`` raises, except running out of memory.
    """
    device = torch.device(device)
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
    if not 0 < rel_precision < 1:
        raise ValueError(f"rel_precision must lie in (0, 1), got {rel_precision}")
    if budget_s <= 0 or min_samples < 1 or max_samples < min_samples or warmup < 0:
        raise ValueError("budget_s must be positive and 1 <= min_samples <= max_samples, warmup >= 0")
    mode: Mode = "cuda_graph" if cuda_graphs else "eager"
    began = clock()
    samples: list[float] = []
    warm = 0
    oom_message: str | None = None

    def elapsed() -> float:
        return clock() - began

    try:
        with _gc_paused():
            timed = fn
            estimate_ms = 0.0
            if cuda_graphs:
                graph = _capture_graph(fn, device, warmup)
                timed = graph.replay
                warm = max(1, warmup)
            while warm < max(1, warmup) and not (warm >= 1 and elapsed() > budget_s / 4):
                estimate_ms = _time_with_clock(timed, 1, device, clock)[0]
                warm += 1
            if cuda_graphs:
                estimate_ms = _time_with_clock(timed, 1, device, clock)[0]  # one replay untimed
            status: Status = "budget"
            # The timed calls get half the budget at least: a warm-up that ate it (a slow first
            # call: lazy set-up, compilation, a busy machine) must not leave a single sample.
            timing_began = clock()
            while True:
                remaining_ms = max(budget_s - elapsed(), budget_s / 2 - (clock() - timing_began)) * 1e3
                if samples and remaining_ms <= 0:
                    break
                wanted = min_samples - len(samples) if len(samples) < min_samples else math.ceil(len(samples) / 4)
                fits = int(remaining_ms // estimate_ms) if estimate_ms > 0 else wanted
                count = max(1, min(wanted, fits, max_samples - len(samples), MAX_CHUNK))
                if device.type == "cuda":
                    samples.extend(_time_with_events(timed, count, device))
                else:
                    samples.extend(_time_with_clock(timed, count, device, clock))
                ordered = np.sort(np.asarray(samples))
                estimate_ms = float(np.median(ordered))
                if prior_ms:
                    ordered = np.sort(np.concatenate([np.asarray(prior_ms, dtype=np.float64), ordered]))
                if len(samples) >= min_samples and precise_enough(ordered, rel_precision, confidence):
                    status = "ok"
                    break
                if len(samples) >= max_samples:
                    break
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        oom_message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if oom_message is not None:
        # Outside the except block, so the traceback's frames (and their tensors) are gone.
        release_memory(device)
        return Measurement.out_of_memory(oom_message, mode=mode, rel_precision=rel_precision, task=task,
                                         confidence=confidence, warmup_calls=warm, elapsed_s=elapsed())
    return Measurement(status, mode, tuple(samples), rel_precision, task, confidence, warm, elapsed())
