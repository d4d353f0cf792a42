"""The measured speed check: the optimized model against the original, end to end, on this device.

A plan's speedup is a prediction; this measures it. Both models are compiled (tf.function / jax.jit),
called once each to trace and warm up (excluded), then timed interleaved, round by round, on the same
inputs (the user's, else random ones at the model's own input shapes), and summarized by medians and by a
confidence interval of the speedup: rounds go on until that interval separates from the noise margin or
the budget (SPEED_BUDGET_S) ends. `optimize` uses it to never return a model it cannot show to be as fast
as the original (see `SpeedCheck.kept` and api.optimize).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Tuple

import numpy as np

from .graph import input_struct
from . import timing
from .timing import compiled, median_interval, time_interleaved

SPEED_BUDGET_S = 30.0
"""Seconds of timing rounds per check at most (after warm-up). Rounds go on until the speedup's interval has
separated from the margin (see `SpeedCheck.kept`), at least SPEED_MIN_ROUNDS of them; a model so slow that
two rounds pass the budget stops there."""
SPEED_MIN_ROUNDS = 6
"""Rounds before the interval is read: with 6 paired ratios the order-statistic interval of their median is
the range of all six, at 97% confidence."""

CONFIDENCE = timing.CONFIDENCE
"""Confidence of the speedup's interval (a distribution-free interval of the median paired ratio)."""

NOISE_MARGIN = 1.05
"""The optimized model is kept only if the check shows it is not more than 5% slower (the interval's lower
end at or above 1/1.05) and cannot show it slower at all (the interval's upper end at or above 1): closer
than 5% is within run-to-run noise on a shared machine, and a model shown slower is never kept."""


@dataclasses.dataclass
class SpeedCheck:
    """One measurement of original vs optimized seconds per call (medians over `rounds` interleaved rounds).

    interval: the confidence interval (CONFIDENCE) of the speedup, from the rounds' paired ratios (original /
    optimized of the same round, so drift on a shared machine cancels). predicted / band: the plan's
    predicted conv speedup and its error band where it had one. action: what optimize did with the result
    ("kept", "re-planned from timings of the replaced sites", "kept the original implementations", ...);
    `not_measured` says why nothing was timed; seconds: the check's wall time (compiling included).
    float32: where the plan runs sites in reduced precision, the same check of the plan against its float32
    counterpart, timed in the same rounds (`against_float32`)."""

    original_s: Optional[float] = None
    optimized_s: Optional[float] = None
    rounds: int = 0
    batch: Optional[int] = None
    predicted: Optional[float] = None
    band: Optional[float] = None
    action: str = ""
    not_measured: str = ""
    history: list = dataclasses.field(default_factory=list)  # earlier measurements of this optimize call
    interval: Optional[Tuple[float, float]] = None
    seconds: float = 0.0
    float32: Optional[dict] = None
    others: dict = dataclasses.field(default_factory=dict)  # measure(others=...): {name: {"seconds", "interval"}}

    @property
    def measured(self) -> Optional[float]:
        """Measured speedup: original seconds / optimized seconds."""
        if not self.original_s or not self.optimized_s:
            return None
        return self.original_s / self.optimized_s

    @property
    def kept(self) -> bool:
        """Whether the optimized model may be kept: shown not more than NOISE_MARGIN slower (the interval's
        lower end >= 1 / NOISE_MARGIN) and not shown slower (its upper end >= 1). Nothing measured: kept."""
        if self.measured is None:
            return True
        return keeps(self.interval or (self.measured, self.measured))

    @property
    def slower(self) -> bool:
        """Whether the check could not show the optimized model to be as fast as the original (not `kept`)."""
        return not self.kept

    def as_float32(self) -> "SpeedCheck":
        """This check with the float32 counterpart (timed in the same rounds) as the optimized model: its
        time, its speedup interval over the original, and an action saying why it replaced the plan."""
        f = self.float32
        return dataclasses.replace(self, optimized_s=f["seconds"], interval=tuple(f["speedup_interval"]),
                                   action=f["action"])

    def describe(self) -> str:
        """"speed: measured 2.91x [2.80, 3.02] (batch 8, 9 rounds, 95% interval), predicted 3.10x +-25%; kept"."""
        predicted = "no prediction" if self.predicted is None else (
            f"predicted {self.predicted:.2f}x" + (f" +-{self.band:.0%}" if self.band is not None else ""))
        if self.measured is None:
            return f"speed: not measured ({self.not_measured}); {predicted}"
        interval = f" [{self.interval[0]:.2f}, {self.interval[1]:.2f}]" if self.interval else ""
        text = (f"speed: measured {self.measured:.2f}x{interval} (batch {self.batch}, {self.rounds} rounds, "
                f"{CONFIDENCE:.0%} interval), {predicted}")
        if self.float32:
            lo, hi = self.float32["interval"]
            text += f"; reduced precision vs float32 {self.float32['measured']:.2f}x [{lo:.2f}, {hi:.2f}]"
        return text + (f"; {self.action}" if self.action else "")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "measured": self.measured}


def against_float32(other: dict) -> dict:
    """The `float32` entry of a SpeedCheck from `measure`'s `others["float32"]`: the float32 counterpart's time
    over the plan's (its speedup over float32), that interval, and whether the plan is kept over it (`keeps`)."""
    lo, hi = other["interval"]
    kept = keeps((lo, hi))
    return {"measured": other["ratio"], "interval": [lo, hi], "seconds": other["seconds"],
            "speedup": other["speedup"], "speedup_interval": other["speedup_interval"], "kept": kept,
            "action": "reduced precision kept" if kept else "reduced precision not shown faster: the float32 plan kept"}


def keeps(interval: Tuple[float, float]) -> bool:
    """The rule of `SpeedCheck.kept` on a speedup interval (lo, hi)."""
    return interval[0] >= 1.0 / NOISE_MARGIN and interval[1] >= 1.0


def _separated(interval: Tuple[float, float]) -> bool:
    """Whether more rounds would not change the decision: the interval shows the optimized model slower (all
    below 1) or faster (all above 1), or lies within the noise margin and is narrower than it."""
    lo, hi = interval
    return hi < 1.0 or lo >= 1.0 or (lo >= 1.0 / NOISE_MARGIN and hi - lo <= 1.0 - 1.0 / NOISE_MARGIN)


def model_inputs(model, batch: int, like=None):
    """The inputs to time on: random normal (finite) data at the model's input shapes with `batch`; where a
    non-batch size is unknown, random data shaped like `like` (e.g. the user's verification inputs, whose
    values may hold NaN/Inf); None where neither says a size."""
    import keras

    rng = np.random.default_rng(0)

    def make(shape, dtype):
        dtype = keras.backend.standardize_dtype(dtype)
        if "int" in dtype or dtype == "bool":
            return keras.ops.convert_to_tensor(rng.integers(0, 2, size=shape).astype(dtype))
        return keras.ops.convert_to_tensor(rng.standard_normal(shape).astype(dtype))

    struct = input_struct(model)
    if not any(d is None for t in keras.tree.flatten(struct) for d in tuple(t.shape)[1:]):
        return keras.tree.map_structure(lambda t: make((batch,) + tuple(t.shape[1:]), t.dtype), struct)
    if like is None:
        return None
    return keras.tree.map_structure(lambda a: make(tuple(np.shape(a)), getattr(a, "dtype", "float32")), like)


def measure(original, optimized, inputs, budget_s: float = SPEED_BUDGET_S, others=None) -> SpeedCheck:
    """Time both models on `inputs` (interleaved, one warm-up call each excluded, medians) until the speedup's
    interval separates from the margin or `budget_s` ends. others: {name: model} timed in the same rounds
    (e.g. a float32 counterpart): the result's `others` gives each one's median seconds and the interval of
    its time over the optimized model's (its speedup as `optimized`'s baseline)."""
    import keras

    # weights and inputs are arguments of the compiled calls (on JAX, a captured array would be compiled in
    # as a constant, and weight-only work folded away)
    start = time.perf_counter()
    inputs = keras.tree.map_structure(keras.ops.convert_to_tensor, inputs)
    models = {"original": original, "optimized": optimized, **(others or {})}
    runs = {name: compiled(lambda t, m=m: m(t, training=False), [m]) for name, m in models.items()}
    fns = {name: (lambda run=run: run(inputs)) for name, run in runs.items()}
    samples = time_rounds(fns, budget_s)
    batch = int(keras.tree.flatten(inputs)[0].shape[0])
    ratios = [a / b for a, b in zip(samples["original"], samples["optimized"])]
    others = {name: {"seconds": float(np.median(samples[name])),
                     "interval": median_interval([a / b for a, b in zip(samples[name], samples["optimized"])]),
                     "ratio": float(np.median(samples[name]) / np.median(samples["optimized"])),
                     "speedup": float(np.median(samples["original"]) / np.median(samples[name])),
                     "speedup_interval": median_interval([a / b for a, b in zip(samples["original"], samples[name])])}
              for name in others or {}}
    return SpeedCheck(float(np.median(samples["original"])), float(np.median(samples["optimized"])), len(ratios),
                      batch, interval=median_interval(ratios), seconds=time.perf_counter() - start, others=others)


def time_rounds(fns, budget_s: float = SPEED_BUDGET_S) -> dict:
    """{name: [seconds per round]} of the zero-argument callables, interleaved, after one warm-up call each:
    at least SPEED_MIN_ROUNDS rounds, then more until the interval of original / optimized (the first two
    names) has separated from the margin (`_separated`) or `budget_s` has passed."""
    start = time.perf_counter()
    names = list(fns)
    res = time_interleaved(fns, repeats=SPEED_MIN_ROUNDS, warmup=1, max_time=budget_s)
    samples = {k: list(v["samples"]) for k, v in res.items()}
    while time.perf_counter() - start < budget_s:
        ratios = [a / b for a, b in zip(samples[names[0]], samples[names[1]])]
        if len(ratios) >= SPEED_MIN_ROUNDS and _separated(median_interval(ratios)):
            break
        more = time_interleaved(fns, repeats=2, warmup=0, max_time=budget_s)
        for k in names:
            samples[k] += more[k]["samples"]
    return samples
