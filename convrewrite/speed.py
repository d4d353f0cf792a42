"""The measured speed check: the optimized model against the original, end to end, on this device.

A plan's speedup is a prediction; this measures it. Both models are compiled (tf.function / jax.jit),
called once each to trace and warm up (excluded), then timed interleaved, round by round, on the same
inputs (the user's, else random ones at the model's own input shapes), within a small time budget, and
summarized by medians. `optimize` uses it to never return a model measurably slower than the original
(see api.optimize).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from .graph import input_struct
from .timing import compiled, time_interleaved

SPEED_BUDGET_S = 4.0
"""Seconds of timing rounds per check at most (after warm-up); rounds go on for at least SPEED_MIN_S and
3 rounds, except that a model so slow that 2 rounds pass the budget stops there."""
SPEED_MIN_S = 1.0

NOISE_MARGIN = 1.05
"""The optimized model is "measurably slower" only if its median is more than 5% above the original's:
closer than that is within run-to-run noise on a shared machine."""


@dataclasses.dataclass
class SpeedCheck:
    """One measurement of original vs optimized seconds per call (medians over `rounds` interleaved rounds).

    predicted / band: the plan's predicted conv speedup and its error band where it had one. action: what
    optimize did with the result ("kept", "re-planned from timings of the replaced sites", "kept the
    original implementations", or "measured only ..."); `not_measured` says why nothing was timed."""

    original_s: Optional[float] = None
    optimized_s: Optional[float] = None
    rounds: int = 0
    batch: Optional[int] = None
    predicted: Optional[float] = None
    band: Optional[float] = None
    action: str = ""
    not_measured: str = ""
    history: list = dataclasses.field(default_factory=list)  # earlier measurements of this optimize call

    @property
    def measured(self) -> Optional[float]:
        """Measured speedup: original seconds / optimized seconds."""
        if not self.original_s or not self.optimized_s:
            return None
        return self.original_s / self.optimized_s

    @property
    def slower(self) -> bool:
        """Whether the optimized model is measurably slower (beyond NOISE_MARGIN)."""
        return self.measured is not None and self.optimized_s > NOISE_MARGIN * self.original_s

    def describe(self) -> str:
        """"speed: measured 2.91x (batch 8, 5 rounds), predicted 3.10x +-25%; kept"."""
        predicted = "no prediction" if self.predicted is None else (
            f"predicted {self.predicted:.2f}x" + (f" +-{self.band:.0%}" if self.band is not None else ""))
        if self.measured is None:
            return f"speed: not measured ({self.not_measured}); {predicted}"
        text = f"speed: measured {self.measured:.2f}x (batch {self.batch}, {self.rounds} rounds), {predicted}"
        return text + (f"; {self.action}" if self.action else "")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "measured": self.measured}


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


def measure(original, optimized, inputs, budget_s: float = SPEED_BUDGET_S) -> SpeedCheck:
    """Time both models on `inputs` (interleaved, one warm-up call each excluded, medians)."""
    import keras

    # weights and inputs are arguments of the compiled calls (on JAX, a captured array would be compiled in
    # as a constant, and weight-only work folded away)
    inputs = keras.tree.map_structure(keras.ops.convert_to_tensor, inputs)
    run_original = compiled(lambda t: original(t, training=False), [original])
    run_optimized = compiled(lambda t: optimized(t, training=False), [optimized])
    fns = {"original": lambda: run_original(inputs), "optimized": lambda: run_optimized(inputs)}
    res = time_interleaved(fns, repeats=3, warmup=1, min_time=min(SPEED_MIN_S, budget_s), max_time=budget_s)
    batch = int(keras.tree.flatten(inputs)[0].shape[0])
    return SpeedCheck(res["original"]["median"], res["optimized"]["median"], len(res["original"]["samples"]), batch)
