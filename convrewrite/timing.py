"""Timing harness shared by the profiler and the benchmarks.

Variants are timed side by side, interleaved round by round (so drift on a shared machine hits all of
them alike), after warm-up calls that absorb tracing/compilation, and summarized by the median.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, Tuple

import numpy as np

CONFIDENCE = 0.95
"""Confidence of the intervals decisions on timings are made with (speed check, calibration)."""



def _block(result):
    """Wait until asynchronous results are computed (the backend's own way: see backend.wait_for)."""
    from .layers import backend

    backend.wait_for(result)


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                     min_time: float = 0.0, max_time: float = float("inf")) -> Dict[str, dict]:
    """Median seconds per call of each zero-argument callable, measured interleaved.

    repeats: rounds; each round calls every variant once (more rounds while the total stays under
    `min_time`, fewer if it passes `max_time`). Returns {name: {"median", "min", "samples"}}.
    """
    for _ in range(warmup):
        for fn in fns.values():
            _block(fn())
    samples = {k: [] for k in fns}
    start = time.perf_counter()
    rounds = 0
    while True:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            _block(fn())
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
        elapsed = time.perf_counter() - start
        if rounds >= repeats and elapsed >= min_time:
            break
        if elapsed > max_time and rounds >= 2:
            break
    return {k: {"median": float(np.median(v)), "min": float(np.min(v)), "samples": v} for k, v in samples.items()}


def median_interval(values, confidence: float = CONFIDENCE) -> Tuple[float, float]:
    """A distribution-free confidence interval for the median of `values` (order statistics: the k-th smallest
    and k-th largest, k the largest with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2); the whole range
    where n is too small for that confidence."""
    v = sorted(float(x) for x in values)
    n = len(v)
    if n == 0:
        raise ValueError("median_interval needs at least one value.")
    alpha, k, below = (1.0 - confidence) / 2.0, 0, 0.0
    while k < n // 2:
        below += math.comb(n, k) / 2.0 ** n  # P(Binomial(n, 1/2) <= k)
        if below > alpha:
            break
        k += 1
    k = max(k, 1)
    return v[k - 1], v[n - k]


def progress(items, label, enabled=True):
    """Yield `items`, drawing a one-line text progress bar with elapsed time and ETA on stderr."""
    import sys

    items = list(items)
    n = len(items)
    start = time.perf_counter()
    for i, item in enumerate(items):
        if enabled and n:
            done = int(30 * i / n)
            el = time.perf_counter() - start
            eta = el / i * (n - i) if i else 0
            sys.stderr.write(f"\r{label} [{'#' * done}{'.' * (30 - done)}] {i}/{n} {el:4.0f}s eta {eta:4.0f}s")
            sys.stderr.flush()
        yield item
    if enabled and n:
        sys.stderr.write(f"\r{label} [{'#' * 30}] {n}/{n} {time.perf_counter() - start:4.0f}s{' ' * 10}\n")


def compiled(fn, layers=()):
    """`fn` compiled for the active Keras backend (a tf.function on TensorFlow, a jax.jit on JAX that takes
    the variables of `layers` as arguments), so timings measure the kernels, not Python dispatch. One
    compiled function per variant is the point here. `layers`: the layers or models fn calls."""
    from .layers import backend

    return backend.graph_function(fn, layers)
