"""Timing harness shared by the profiler and the benchmarks.

Variants are timed side by side, interleaved round by round (so drift on a shared machine hits all of
them alike), after warm-up calls that absorb tracing/compilation, and summarized by the median.
"""

from __future__ import annotations

import time
from typing import Callable, Dict

import numpy as np


def _block(result):
    """Wait for asynchronous results by pulling one element of each output to the host."""
    import keras

    for t in keras.tree.flatten(result):
        if hasattr(t, "numpy") or hasattr(t, "shape"):
            np.asarray(keras.ops.convert_to_numpy(keras.ops.reshape(t, (-1,))[:1]))


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
