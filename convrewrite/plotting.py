"""Predicted vs measured time of a cost model's fits, as a PNG (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import implementations
from .errors import ProfileError
from .fitting import MIN_PREDICTED_SECONDS, regression_terms
from .spec import ConvSpec


def plot(cost_model, path) -> Path:
    """A CostModel's predicted vs measured seconds per implementation (log-log), saved as PNG. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ProfileError("Plotting needs matplotlib: pip install 'convrewrite[plot]'.") from None
    impls = sorted({m["impl"] for m in cost_model.measurements if m["impl"] in cost_model.fits})
    fig, ax = plt.subplots(figsize=(6, 6))
    lo, hi = np.inf, 0
    for name in impls:
        impl = implementations.get(name)
        rows = [m for m in cost_model.measurements if m["impl"] == name]
        meas = np.array([m["seconds"] for m in rows])
        pred = np.array([cost_model.fits[name].predict(regression_terms(impl, ConvSpec.from_json(m["spec"]))) for m in rows])
        ax.scatter(meas, np.maximum(pred, MIN_PREDICTED_SECONDS), s=12,
                   label=f"{name} (median err {cost_model.fits[name].median_rel_error:.0%})")
        lo, hi = min(lo, meas.min(), pred[pred > 0].min(initial=np.inf)), max(hi, meas.max(), pred.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured s")
    ax.set_ylabel("predicted s")
    ax.set_title(f"cost model: {cost_model.name}")
    ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
