"""The rule for choosing among predicted times: the simplest implementation within a margin of the fastest.

Shared by the planner and by the cost model's held-out validation, so a profile is judged by the choices
the planner would make.
"""

from __future__ import annotations

from typing import Dict

from . import implementations

DIRECT_MARGIN = 1.1
"""A more elaborate implementation is chosen over a simpler one only if predicted at least this much
faster: a difference within 10% is within the cost model's error, and the simpler choice then costs at
most that. Simplicity is each implementation's `simplicity` rank: direct, depthwise, fft, fft-matmul,
fft-tiled, ..."""


def choose(predicted_ms: Dict[str, float], margin: float = DIRECT_MARGIN):
    """(choice, reason): the simplest implementation (by `simplicity`) within `margin` of the fastest."""
    fastest = min(predicted_ms, key=predicted_ms.get)
    for name in implementations.names():
        if name in predicted_ms and predicted_ms[name] <= margin * predicted_ms[fastest]:
            if name == fastest:
                return name, "lowest predicted time"
            return name, f"within {margin:g}x of {fastest}'s predicted time, and simpler"
    return fastest, "lowest predicted time"
