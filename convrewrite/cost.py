"""Device fingerprints and measured cost models.

A CostModel predicts, per implementation, the seconds one call takes on a ConvSpec. The prediction is a
non-negative combination of the implementation's own features (`Implementation.features(spec)`: MACs
per kernel family, bytes moved, FFT work, per-call overhead), fitted on timings from `profile.py`.
Where the exact spec has been timed (the tactic cache filled by `measure_specs`), the timing wins.

Why non-negative linear terms, fitted on relative error: every feature is a cost (work, traffic, a call),
so a negative weight would only fit noise and extrapolate to negative times; and a convolution's time
spans five decades, so absolute least squares would fit the largest specs and ignore the rest.

Profile file: versioned JSON, described in `cost_models/README.md`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from . import implementations
from .errors import ProfileError
from .spec import ConvSpec

FORMAT = "convrewrite-profile"
VERSION = 1
SHIPPED_DIRS = [Path(__file__).resolve().parent.parent / "cost_models", Path(__file__).resolve().parent / "cost_models"]
CACHE_DIR = Path(os.environ.get("CONVREWRITE_CACHE", Path.home() / ".cache" / "convrewrite"))


# ---- device fingerprint -------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint() -> dict:
    """What a timing depends on: backend, device kind and name, threads, library versions."""
    import keras

    fp = {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "arch": platform.machine(),
        "device_kind": "cpu",
        "device_name": _cpu_name(),
        "threads": os.cpu_count(),
    }
    if fp["backend"] == "tensorflow":
        import tensorflow as tf

        fp["tensorflow"] = tf.__version__
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            fp["device_kind"] = "gpu"
            fp["device_name"] = details.get("device_name", gpus[0].name)
            fp["compute_capability"] = list(details.get("compute_capability", ()))
            fp["gpu_count"] = len(gpus)
    elif fp["backend"] == "jax":
        import jax

        dev = jax.devices()[0]
        fp["jax"] = jax.__version__
        fp["device_kind"] = dev.platform
        if dev.platform != "cpu":
            fp["device_name"] = dev.device_kind
    return fp


CLASS_KEYS = ("backend", "device_kind", "arch", "threads")
"""Keys that must agree for a profile's numbers to describe this device (its machine class)."""


def fingerprint_mismatch(profile_fp: dict, here: Optional[dict] = None) -> List[str]:
    """Human-readable differences between a profile's fingerprint and this device's, class keys first."""
    here = here or fingerprint()
    out = []
    for key in CLASS_KEYS + ("device_name", "compute_capability", "tensorflow", "keras"):
        if profile_fp.get(key) != here.get(key):
            out.append(f"{key}: profile {profile_fp.get(key)!r}, this device {here.get(key)!r}")
    return out


def same_class(profile_fp: dict, here: Optional[dict] = None) -> bool:
    here = here or fingerprint()
    keys = CLASS_KEYS + (("device_name",) if here.get("device_kind") != "cpu" else ())
    return all(profile_fp.get(k) == here.get(k) for k in keys)


# ---- the model ----------------------------------------------------------------------------------
def _spec_key(spec: ConvSpec) -> str:
    return spec.to_json()


@dataclasses.dataclass
class ImplFit:
    """Fitted terms of one implementation: seconds = sum(weights[f] * features[f])."""

    features: List[str]
    weights: List[float]
    n_samples: int
    median_rel_error: float

    def predict(self, feats: Dict[str, float]) -> float:
        return float(sum(w * feats.get(f, 0.0) for f, w in zip(self.features, self.weights)))


class CostModel:
    """Per-implementation predicted time for a ConvSpec on one device.

    Attributes: fingerprint (dict), measurements (list of {"spec", "impl", "seconds"}), fits
    ({impl: ImplFit}), measured ({spec json: {impl: seconds}}, the tactic cache), validation (dict).
    """

    def __init__(self, fingerprint: dict, measurements=None, fits=None, measured=None, validation=None,
                 name: Optional[str] = None, path: Optional[Path] = None, mode: str = ""):
        self.fingerprint = fingerprint
        self.measurements = list(measurements or [])
        self.fits: Dict[str, ImplFit] = dict(fits or {})
        self.measured: Dict[str, Dict[str, float]] = dict(measured or {})
        self.validation = dict(validation or {})
        self.name = name or fingerprint.get("device_name", "device")
        self.path = Path(path) if path else None
        self.mode = mode

    # -- prediction --
    def predict_seconds(self, impl_name: str, spec: ConvSpec) -> Optional[float]:
        """Seconds per call: a timing where this exact spec was measured (tactic cache, or the profile's
        own grid), else the fitted model."""
        if spec.height is None or spec.width is None:
            return None
        spec = spec if spec.batch else spec.with_input(batch=1)
        key = _spec_key(spec)
        hit = self.measured.get(key) or self._profiled().get(key, {})
        if impl_name in hit:
            return hit[impl_name]
        fit = self.fits.get(impl_name)
        if fit is None:
            return None
        impl = implementations.get(impl_name)
        ok, _ = impl.applicable(spec)
        if not ok:
            return None
        return max(fit.predict(regression_terms(impl, spec)), 1e-7)

    def _profiled(self) -> Dict[str, Dict[str, float]]:
        """The profile's own timings by spec: exact specs the grid measured need no prediction."""
        if getattr(self, "_profiled_cache", None) is None or self._profiled_len != len(self.measurements):
            table: Dict[str, Dict[str, float]] = {}
            for m in self.measurements:
                table.setdefault(m["spec"], {})[m["impl"]] = m["seconds"]
            self._profiled_cache, self._profiled_len = table, len(self.measurements)
        return self._profiled_cache

    def predict_ms(self, impl_name: str, spec: ConvSpec) -> Optional[float]:
        s = self.predict_seconds(impl_name, spec)
        return None if s is None else 1e3 * s

    # -- fitting --
    def fit(self, holdout: float = 0.25, seed: int = 0) -> "CostModel":
        """Fit every implementation's terms; store held-out validation, then refit on everything."""
        specs = sorted({m["spec"] for m in self.measurements})
        rng = np.random.default_rng(seed)
        held = set(rng.choice(specs, size=int(len(specs) * holdout), replace=False)) if holdout and len(specs) > 8 else set()
        train = [m for m in self.measurements if m["spec"] not in held]
        self.fits = _fit_all(train)
        if held:
            self.validation = self._validate([m for m in self.measurements if m["spec"] in held])
        self.fits = _fit_all(self.measurements)
        return self

    def _validate(self, rows) -> dict:
        by_spec: Dict[str, Dict[str, float]] = {}
        for m in rows:
            by_spec.setdefault(m["spec"], {})[m["impl"]] = m["seconds"]
        from .planner import _choose as choose

        hits, regret, best_total, n = 0, 0.0, 0.0, 0
        for key, times in by_spec.items():
            spec = ConvSpec.from_json(key)
            # pac is chosen by policy, never for speed, so it does not compete here
            preds = {k: self.fits[k].predict(regression_terms(implementations.get(k), spec)) for k in times
                     if k in self.fits and k != "pac"}
            if not preds:
                continue
            chosen, _ = choose(preds)  # as the planner decides
            best = min(v for k, v in times.items() if k != "pac")
            n += 1
            hits += times[chosen] <= 1.1 * best
            regret += times[chosen] - best
            best_total += best
        return {
            "held_out_specs": n,
            "within_10pct_of_best": hits / n if n else None,
            "total_regret": regret / best_total if best_total else None,
        }

    # -- persistence --
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "mode": self.mode,
            "fingerprint": self.fingerprint,
            "fits": {k: dataclasses.asdict(v) for k, v in self.fits.items()},
            "validation": self.validation,
            "measurements": self.measurements,
            "measured": self.measured,
        }

    def save(self, path) -> Path:
        """Write atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        self.path = path
        return path

    @classmethod
    def load(cls, path) -> "CostModel":
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"Profile '{path}' does not exist; expected a JSON file written by `convrewrite profile`.")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProfileError(f"Profile '{path}' is not valid JSON ({exc}); re-create it with `convrewrite profile`.") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"File '{path}' is not a convrewrite profile (no \"format\": \"{FORMAT}\"); expected a file from `convrewrite profile`.")
        version = data.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise ProfileError(f"Profile '{path}' has version {version!r}; this convrewrite reads versions <= {VERSION}: upgrade convrewrite or re-profile.")
        try:
            fits = {k: ImplFit(**v) for k, v in data["fits"].items()}
            for fit in fits.values():
                if len(fit.features) != len(fit.weights) or not all(np.isfinite(fit.weights)):
                    raise ValueError("features and weights differ in length or hold non-finite numbers")
            cm = cls(data["fingerprint"], data.get("measurements", []), fits, data.get("measured", {}),
                     data.get("validation", {}), data.get("name"), path, data.get("mode", ""))
            cm._refit_if_features_changed()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProfileError(f"Profile '{path}' is truncated or corrupt ({type(exc).__name__}: {exc}); re-create it with `convrewrite profile`.") from None
        return cm

    def _refit_if_features_changed(self):
        """Refit from the stored measurements when this version's features differ from the stored fits'.

        The timings stay valid when a feature definition changes; weights fitted on old features do not."""
        stale = False
        for m in self.measurements:
            fit = self.fits.get(m["impl"])
            if fit is not None and m["impl"] in implementations.names():
                current = regression_terms(implementations.get(m["impl"]), ConvSpec.from_json(m["spec"]))
                stale = stale or sorted(current) != sorted(fit.features)
        if stale:
            self.fits = _fit_all(self.measurements)

    # -- measured mode --
    def measure_specs(self, specs, allow=None, batch: int = 8, progress: bool = True, save: bool = True):
        """Time every applicable implementation on these exact specs (the tactic cache) and persist it.

        Specs already in the cache are not measured again; specs with unknown spatial size are skipped."""
        from .profile import time_spec

        todo = []
        for spec in dict.fromkeys(specs):
            if spec.height is None or spec.width is None:
                continue
            spec = spec.with_input(batch=spec.batch or batch)
            if _spec_key(spec) not in self.measured:
                todo.append(spec)
        for spec in _progress(todo, "measuring model specs", progress):
            self.measured[_spec_key(spec)] = time_spec(spec, allow=allow)
        if todo and save and self.path is not None:
            self.save(self.path)
        return self

    def __repr__(self):
        return f"<CostModel {self.name!r}: {sorted(self.fits)} fitted, {len(self.measured)} specs cached>"


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


def _fit_all(rows) -> Dict[str, ImplFit]:
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
        pred = X @ w
        fits[name] = ImplFit(names, [float(v) for v in w], len(ms), float(np.median(np.abs(pred - y) / y)))
    return fits


def _progress(items, label, enabled=True):
    """A one-line text progress bar on stderr."""
    import sys
    import time

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


# ---- choosing a profile -------------------------------------------------------------------------
def shipped_profiles() -> List[Path]:
    out = []
    extra = os.environ.get("CONVREWRITE_COST_MODELS")
    for d in ([Path(extra)] if extra else []) + SHIPPED_DIRS + [CACHE_DIR]:
        if d.is_dir():
            out.extend(sorted(d.glob("*.json")))
    return out


_AUTO_CACHE = {}


def resolve(cost_model, warn: bool = True) -> Optional[CostModel]:
    """A CostModel from "auto", a path, or a CostModel; None stays None (rule-based planning).

    "auto": the shipped or cached profile of this device's class; if there is none, a quick profile is
    measured now (about a minute) and cached, never a different device's numbers.
    A profile from another device class is still used when named explicitly (converting for a target
    device), with a warning saying so.
    """
    if cost_model is None or hasattr(cost_model, "predict_ms"):
        return cost_model  # a CostModel, or any object predicting milliseconds per (implementation, spec)
    here = fingerprint()
    if cost_model == "auto":
        key = json.dumps({k: here.get(k) for k in CLASS_KEYS}, sort_keys=True)
        if key in _AUTO_CACHE:
            return _AUTO_CACHE[key]
        for path in shipped_profiles():
            try:
                cm = CostModel.load(path)
            except ProfileError as exc:
                warnings.warn(f"Skipping unreadable profile: {exc}", stacklevel=2)
                continue
            if same_class(cm.fingerprint, here):
                _AUTO_CACHE[key] = cm
                return cm
        warnings.warn(
            f"No profile for this device ({here['device_kind']} {here['device_name']!r}, {here['threads']} threads); "
            f"measuring a quick one now and caching it in {CACHE_DIR}.", stacklevel=2)
        from .profile import profile_device

        cm = profile_device(mode="quick")
        cm.save(CACHE_DIR / f"auto-{here['arch']}-{here['device_kind']}-{here['threads']}t.json")
        _AUTO_CACHE[key] = cm
        return cm
    cm = CostModel.load(cost_model)
    if warn and not same_class(cm.fingerprint, here):
        diffs = "; ".join(fingerprint_mismatch(cm.fingerprint, here)[:3])
        warnings.warn(
            f"Profile '{cost_model}' was measured on another device ({diffs}); planning for that device as "
            f"asked, so predicted times describe it, not this one.", stacklevel=2)
    return cm


def plot(cost_model: CostModel, path) -> Path:
    """Predicted vs measured seconds per implementation (log-log), saved as PNG. Needs matplotlib."""
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
        ax.scatter(meas, np.maximum(pred, 1e-7), s=12, label=f"{name} (median err {cost_model.fits[name].median_rel_error:.0%})")
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
