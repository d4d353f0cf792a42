"""Calibration: whether a profile measured on another device may be trusted on this one.

Every profile carries canaries: a handful of small specs per implementation (`Implementation.canary_specs`,
covering each cost regime), timed on the profile's device with the grid. Before `auto` uses a profile of
another fingerprint on this device, the canaries are timed here (`profile.time_canaries`, 1-2 s on 2 cores)
and compared with what the profile says of them (its canary timings; for profiles older than canaries,
its prediction):

- ratio = measured here / profile's time, per canary;
- the profile is refused only if a canary is shown outside CALIBRATION_TOLERANCE (1.5x either way): the
  confidence interval of its ratio (from its samples, `timing.median_interval`) lies wholly beyond it. The
  tolerance is widened by the profile's own error where its number is a fitted prediction rather than a
  timing (x (1 + the fit's 90th-percentile error): a fit 40% off on its own grid cannot vouch for 1.5x).
  A canary whose interval is not wholly within the tolerance is timed again (CALIBRATION_RETIMES more
  times, its samples pooled) before anything is decided, so that one noisy sample on a shared machine
  neither throws away a good profile nor makes the decision differ from run to run; one still straddling a
  bound then does not refuse (nothing shows it off);
- an accepted profile's predictions are scaled per implementation by the geometric mean of its canaries'
  ratios (what is left is the `band`: the largest residual), and quoted with that band.

An implementation with no canaries (a third-party one that declares none) is not calibrated: its
predictions from another device's profile stay unverified. This module only compares; timing is
`profile.time_canaries`, choosing what to calibrate is `profiles.resolve`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import List, Optional, Tuple

from . import implementations
from .spec import ConvSpec
from .timing import CONFIDENCE, median_interval

CALIBRATION_TOLERANCE = 1.5
"""The furthest a canary's measured/profile ratio may be from 1 (either way) for a profile to be accepted.
Timing noise on a shared 2-core machine is ~5-15%; the mispredictions this guards against were 2-8x."""

CALIBRATION_RETIMES = 2
"""How many more times a canary not shown within the tolerance is timed (samples pooled) before deciding."""


def canary_pairs() -> List[Tuple[ConvSpec, str]]:
    """(spec, implementation name) for every registered implementation's canary specs that it applies to."""
    pairs = []
    for name in implementations.names():
        impl = implementations.get(name)
        pairs.extend((spec, name) for spec in impl.canary_specs() if impl.applicable(spec)[0])
    return pairs


@dataclasses.dataclass
class Calibration:
    """The outcome of timing a profile's canaries on this device.

    canaries: [{"spec", "impl", "profile_s", "measured_s", "ratio"}]; seconds: wall time the timing took;
    accepted: whether every ratio stayed within the tolerance; refused: why not (one line per canary out of
    tolerance); device: the fingerprint id of the device calibrated on."""

    canaries: List[dict]
    seconds: float
    accepted: bool
    refused: List[str]
    device: str
    tolerance: float = CALIBRATION_TOLERANCE

    def _ratios(self, impl: str) -> List[float]:
        return [c["ratio"] for c in self.canaries if c["impl"] == impl]

    def scale(self, impl: str) -> float:
        """Factor this device's times are of the profile's for `impl` (geometric mean of its canaries'
        ratios); 1.0 for an implementation without canaries."""
        ratios = self._ratios(impl)
        return math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else 1.0

    def band(self, impl: str) -> Optional[float]:
        """The largest relative residual of `impl`'s canaries after scaling; None without canaries (then
        nothing bounds the prediction here)."""
        ratios = self._ratios(impl)
        if not ratios:
            return None
        s = self.scale(impl)
        return max(abs(r / s - 1.0) for r in ratios)

    def error(self) -> float:
        """The largest |ratio - 1| over all canaries: how far the unscaled profile was off here."""
        return max((max(c["ratio"], 1 / c["ratio"]) - 1.0 for c in self.canaries), default=0.0)

    def describe(self) -> str:
        """"calibrated here in 1.4 s: direct 1.08x, fft 0.93x (canary error <= 9%)" or "refused: ..."."""
        impls = list(dict.fromkeys(c["impl"] for c in self.canaries))
        ratios = ", ".join(f"{i} {self.scale(i):.2f}x" for i in impls)
        near = sum(c.get("status") == "near" for c in self.canaries)
        if self.accepted:
            return (f"calibrated here in {self.seconds:.1f} s: measured/profile {ratios} "
                    f"(canary error <= {self.error():.0%}" + (f"; {near} canaries near the tolerance, not shown outside it" if near else "") + ")")
        return f"refused after {self.seconds:.1f} s of canaries: " + "; ".join(self.refused[:3])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**d)


def compare(cost_model, measured: List[dict], seconds: float, device: str,
            tolerance: float = CALIBRATION_TOLERANCE) -> Calibration:
    """A Calibration of `cost_model` from canary timings made here (`measured`: [{"spec", "impl",
    "seconds", "samples"}]). Each canary's ratio (median here / profile) comes with the confidence interval
    of its samples (`timing.median_interval`, at CONFIDENCE for all canaries together) and a status:
    "within" the tolerance, "outside" it (the whole interval beyond it: the canary refuses the profile), or
    "near" it (the interval straddles a bound: not shown to be off, so it does not refuse; `profiles.calibrate` times such canaries again first). Canaries
    the profile cannot speak of (an implementation it never measured) are left out; a profile that speaks
    of none is refused (nothing vouches for it here)."""
    rows, refused = [], []
    # one interval per canary, at a confidence that holds for all of them together (Bonferroni): with ~15
    # canaries at 95% each, one would lie wholly outside by chance in a fair share of calibrations
    confidence = 1.0 - (1.0 - CONFIDENCE) / max(len(measured), 1)
    for m in measured:
        spec = ConvSpec.from_json(m["spec"])
        theirs = cost_model.profile_seconds(m["impl"], spec)
        if theirs is None:
            continue
        ratio = m["seconds"] / theirs
        lo, hi = (x / theirs for x in median_interval(m.get("samples") or [m["seconds"]], confidence))
        allowed = tolerance * (1.0 + cost_model.profile_band(m["impl"], spec))
        status = ("within" if 1 / allowed <= lo and hi <= allowed
                  else "outside" if hi < 1 / allowed or lo > allowed else "near")
        rows.append({"spec": m["spec"], "impl": m["impl"], "profile_s": theirs, "measured_s": m["seconds"],
                     "ratio": ratio, "tolerance": allowed, "interval": [lo, hi], "status": status,
                     "samples": len(m.get("samples") or [m["seconds"]])})
        if status == "outside":
            refused.append(f"{m['impl']} on {spec.short()}: {1e3 * m['seconds']:.3g} ms here, profile "
                           f"{1e3 * theirs:.3g} ms ({ratio:.2f}x [{lo:.2f}, {hi:.2f}], tolerance {allowed:.3g}x)")
    if not rows:
        refused.append("the profile predicts none of the canaries")
    return Calibration(rows, seconds, not refused, refused, device, tolerance)


def undecided(calibration: Calibration) -> List[Tuple[ConvSpec, str]]:
    """The (spec, implementation) pairs whose interval is not within the tolerance ("near" or "outside"):
    timed again before the profile is judged (one noisy sample on a shared machine must not decide)."""
    return [(ConvSpec.from_json(c["spec"]), c["impl"]) for c in calibration.canaries
            if c.get("status", "within") != "within"]


def pool_timings(measured: List[dict], retimed: List[dict]) -> List[dict]:
    """`measured` with the samples of `retimed` added to the same (spec, impl) rows, and their median
    ("seconds") recomputed over all of them."""
    more = {(r["spec"], r["impl"]): r for r in retimed}
    out = []
    for m in measured:
        r = more.get((m["spec"], m["impl"]))
        if r is not None:
            samples = list(m.get("samples") or [m["seconds"]]) + list(r.get("samples") or [r["seconds"]])
            m = {**m, "samples": samples, "seconds": float(statistics.median(samples))}
        out.append(m)
    return out
