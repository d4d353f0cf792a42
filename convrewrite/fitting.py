"""Fitting a cost model: the regression terms of each implementation and their non-negative fit.

Why non-negative linear terms, fitted on relative error: every feature is a cost (work, traffic, a call),
so a negative weight would only fit noise and extrapolate to negative times; and a convolution's time
spans five decades, so absolute least squares would fit the largest specs and ignore the rest.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

import numpy as np

from . import implementations
from .spec import ConvSpec


MIN_PREDICTED_SECONDS = 1e-7
"""The floor of a fitted prediction (0.1 us): a fit whose terms sum to ~0 on a tiny spec must still predict a
positive time, so that ratios of predictions (speedups, calibration) stay finite."""


@dataclasses.dataclass
class ImplFit:
    """Fitted terms of one implementation: seconds = sum(weights[f] * features[f]).

    median_rel_error / p90_rel_error: the fit's relative error on the timings it was fitted on (50th and
    90th percentile); p90 is the band a fitted prediction is quoted with. Fits from before p90 was
    recorded get it computed from the profile's measurements when it loads (`CostModel.load`)."""

    features: List[str]
    weights: List[float]
    n_samples: int
    median_rel_error: float
    p90_rel_error: Optional[float] = None

    def predict(self, feats: Dict[str, float]) -> float:
        return float(sum(w * feats.get(f, 0.0) for f, w in zip(self.features, self.weights)))


_KNOWN_TERMS: Dict[str, set] = {}


def known_terms(impl_name: str) -> set:
    """Every regression-term name this version computes for an implementation, over probe specs that
    cover its regimes (dense, grouped, depthwise; strided, dilated)."""
    if impl_name not in _KNOWN_TERMS:
        def conv(**kw):
            base = dict(kind="conv2d", in_channels=8, filters=8, kernel=(3, 3), height=16, width=16, batch=1, padding="same")
            return ConvSpec(**{**base, **kw})

        probes = [conv(), conv(groups=4), conv(groups=8), conv(kind="depthwise_conv2d", groups=8),
                  conv(strides=(2, 2), kernel=(5, 5)), conv(dilation=(2, 2)), conv(padding="valid", kernel=(7, 7)),
                  conv(kind="conv2d_transpose", strides=(2, 2), kernel=(4, 4)), conv(kind="conv2d_transpose", in_channels=1),
                  conv(kind="separable_conv2d", kernel=(13, 13))]
        impl = implementations.get(impl_name)
        names = set()
        for spec in probes:
            if impl.applicable(spec)[0]:
                names |= set(regression_terms(impl, spec))
        _KNOWN_TERMS[impl_name] = names
    return _KNOWN_TERMS[impl_name]


def regression_terms(impl, spec: ConvSpec) -> Dict[str, float]:
    """The additive cost terms time is regressed on: the implementation's features minus the ones that
    only describe the shape (`impl.descriptive_features`), plus bytes * log2(bytes), because traffic
    that outgrows the caches costs more per byte (held-out regret 20% -> 10% with these choices)."""
    terms = {k: v for k, v in impl.features(spec).items() if k not in impl.descriptive_features}
    moved = terms.get("bytes", 0.0)
    terms["bytes_log"] = moved * math.log2(max(moved, 2.0)) / 30.0
    regime = impl.cost_regime(spec)
    if regime:  # separate weights per regime (FFT depthwise vs dense: held-out regret 13% -> 2%)
        terms = {k if k == "calls" else f"{k}@{regime}": v for k, v in terms.items()}
    return terms


def fit_all(rows) -> Dict[str, ImplFit]:
    from scipy.optimize import nnls

    by_impl: Dict[str, list] = {}
    for m in rows:
        by_impl.setdefault(m["impl"], []).append(m)
    fits = {}
    for name, ms in by_impl.items():
        if name not in implementations.names() or len(ms) < 3:
            continue
        impl = implementations.get(name)
        feats = [regression_terms(impl, ConvSpec.from_json(m["spec"])) for m in ms]
        names = sorted({k for f in feats for k in f})
        X = np.array([[f.get(k, 0.0) for k in names] for f in feats])
        y = np.array([m["seconds"] for m in ms])
        # relative least squares: row i divided by y_i, so each spec counts by its relative error
        scale = np.max(np.abs(X), axis=0)
        scale[scale == 0] = 1.0
        w, _ = nnls((X / scale) / y[:, None], np.ones(len(y)), maxiter=50 * len(names))
        w = w / scale
        errors = np.abs(X @ w - y) / y
        fits[name] = ImplFit(names, [float(v) for v in w], len(ms), float(np.median(errors)),
                             float(np.quantile(errors, 0.9)))
    return fits


def fill_error_bands(fits: Dict[str, ImplFit], rows):
    """Compute p90_rel_error for fits stored without it (profiles before version 3), from their rows."""
    for name, fit in fits.items():
        ms = [m for m in rows if m["impl"] == name]
        if fit.p90_rel_error is not None or not ms or name not in implementations.names():
            continue
        impl = implementations.get(name)
        pred = np.array([max(fit.predict(regression_terms(impl, ConvSpec.from_json(m["spec"]))), MIN_PREDICTED_SECONDS)
                         for m in ms])
        y = np.array([m["seconds"] for m in ms])
        fit.p90_rel_error = float(np.quantile(np.abs(pred - y) / y, 0.9))


def chosen_for_speed(name: str) -> bool:
    """Whether an implementation competes on speed (one chosen by user policy does not; see Implementation)."""
    return name in implementations.names() and implementations.get(name).chosen_for_speed


def held_out_quality(fits: Dict[str, ImplFit], rows, choose) -> dict:
    """How well `fits` choose on held-out timings: the share of specs whose predicted choice (made by
    `choose`, the planner's rule) was within 10% of the measured best, and the total regret."""
    by_spec: Dict[str, Dict[str, float]] = {}
    for m in rows:
        by_spec.setdefault(m["spec"], {})[m["impl"]] = m["seconds"]
    hits, regret, best_total, n = 0, 0.0, 0.0, 0
    for key, times in by_spec.items():
        spec = ConvSpec.from_json(key)
        preds = {k: fits[k].predict(regression_terms(implementations.get(k), spec)) for k in times
                 if k in fits and chosen_for_speed(k)}  # policy-chosen implementations do not compete
        if not preds:
            continue
        chosen, _ = choose(preds)
        best = min(v for k, v in times.items() if chosen_for_speed(k))
        n += 1
        hits += times[chosen] <= 1.1 * best
        regret += times[chosen] - best
        best_total += best
    return {"held_out_specs": n, "within_10pct_of_best": hits / n if n else None,
            "total_regret": regret / best_total if best_total else None}
