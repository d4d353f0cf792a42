"""Measured cost models: how long each implementation takes on a ConvSpec, on one device.

A CostModel predicts, per implementation, the seconds one call takes on a ConvSpec. The prediction is a
non-negative combination of the implementation's own features (`Implementation.features(spec)`: MACs
per kernel family, bytes moved, FFT work, per-call overhead), fitted on timings from `profile.py`.
Where the exact spec has been timed (the tactic cache filled by `profiles.measure_tactics`, or the
profile's own grid), the timing wins.

What device a profile describes, and whether that is this one, is `convrewrite.device`'s question; how a
profile of another device earns trust here (canaries timed and compared) is `convrewrite.calibration`'s;
which profile `auto` picks is `convrewrite.profiles`'. A CostModel records the outcome (`trust`,
`calibration`) and every prediction says where it came from and how far it may be off (`prediction`).

The tactic cache is keyed by (device fingerprint, spec): a timing is only used on the exact device (and
library versions) that measured it, and only by a profile of that device's class. It is written into a
profile file the user named, never into a shipped one: timings measured with a shipped or `auto`-chosen
profile go to the user cache, `CACHE_DIR/tactics/<fingerprint id>.json`.

Fitting is `fitting.py`'s (why non-negative terms on relative error is explained there), the file format
and its validation `profile_format.py`'s, plotting `plotting.py`'s, measuring `profile.py`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import numpy as np

from . import device, implementations
from .errors import ProfileError
from .fitting import (MIN_PREDICTED_SECONDS, ImplFit, fill_error_bands, fit_all, held_out_quality, known_terms,
                      regression_terms)
from .choice import choose as choose_by_prediction
from .profile_format import (FORMAT, TACTICS_FORMAT, VERSION, check_profile, migrate_v1, read_tactic_file,
                             write_json_atomically)
from .spec import ConvSpec

SHIPPED_DIRS = [Path(__file__).resolve().parent.parent / "cost_models", Path(__file__).resolve().parent / "cost_models"]
CACHE_DIR = Path(os.environ.get("CONVREWRITE_CACHE") or Path.home() / ".cache" / "convrewrite")  # "" means unset


# ---- where profiles live, and who may write them ------------------------------------------------
def tactic_cache_path(fp: Optional[dict] = None) -> Path:
    """The user-cache file holding this device's tactic timings measured with a shipped/`auto` profile."""
    return CACHE_DIR / "tactics" / f"{device.fingerprint_id(fp or device.fingerprint())}.json"


def _is_shipped(path: Path) -> bool:
    """Whether `path` lies in a folder of shipped (package, git-tracked) profiles: never written to."""
    try:
        path = Path(path).resolve()
    except OSError:
        return False
    return any(d.is_dir() and path.is_relative_to(d.resolve()) for d in SHIPPED_DIRS)


# ---- the model ----------------------------------------------------------------------------------
def _spec_key(spec: ConvSpec) -> str:
    return spec.to_json()


TIMING_BAND = 0.10
"""Relative error band of a timing measured on this device (interleaved medians on a shared machine)."""


class Prediction(NamedTuple):
    """One predicted time with its provenance.

    ms: the predicted milliseconds per call. source: where it came from: "timed here" (this device's
    tactic cache, or the grid of a profile measured on this device), "fitted" (this device's profile's
    fit), "calibrated timing" / "calibrated fit" (another device's profile, scaled by its canaries timed
    here), "unverified timing" / "unverified fit" (another device's profile, not checked here: converting
    offline for it). band: the expected relative error (0.25 means +-25%), None where nothing bounds it.
    A forward + backward prediction (`CostModel.prediction(..., training=True)`) has FORWARD_BACKWARD
    appended to its source ("fitted, forward+backward")."""

    ms: float
    source: str
    band: Optional[float]


def predict(cost_model, impl_name: str, spec: ConvSpec) -> Optional[Prediction]:
    """A Prediction from any cost model: its own `prediction` where it has one (a CostModel), else its
    `predict_ms` with source "given" and no band (any object predicting milliseconds)."""
    if hasattr(cost_model, "prediction"):
        return cost_model.prediction(impl_name, spec)
    ms = cost_model.predict_ms(impl_name, spec)
    return None if ms is None else Prediction(ms, "given", None)


FORWARD_BACKWARD = ", forward+backward"
"""Appended to a Prediction's source where it is the time of a training step's forward + backward."""


TRUST_LEVELS = ("this device", "calibrated", "unverified")
"""How far a profile's numbers describe the device they are used on: measured on it; measured on another
device but its canaries agree here (see calibration.py); or not checked here (another device's)."""


class CostModel:
    """Per-implementation predicted time for a ConvSpec on one device.

    Attributes: fingerprint (dict, the device the profile measured), measurements (list of {"spec",
    "impl", "seconds"}), fits ({impl: ImplFit}), canaries (list of {"spec", "impl", "seconds"}: the
    calibration set timed on the profile's device), measured (the tactic cache: {fingerprint id:
    {"fingerprint": dict, "timings": {spec json: {impl: seconds}}}}), validation (dict), read_only (True:
    tactic timings go to the user cache, not to `path`; set for shipped and `auto`-chosen profiles),
    calibration (a `calibration.Calibration` once calibrated here, else None), trust (one of
    TRUST_LEVELS: set where the profile is chosen, else derived from the fingerprint), match_note (set
    where the profile is another device's: shown in plan summaries), training_measurements / training_fits /
    training_validation (forward + backward timings of the grid and their fits, from `convrewrite profile
    --training`; empty where the profile has none).
    """

    def __init__(self, fingerprint: dict, measurements=None, fits=None, measured=None, validation=None,
                 name: Optional[str] = None, path: Optional[Path] = None, mode: str = "", read_only: bool = False,
                 canaries=None, training=None):
        self.fingerprint = fingerprint
        training = training or {}
        self.training_measurements = list(training.get("measurements") or [])
        self.training_fits: Dict[str, ImplFit] = dict(training.get("fits") or {})
        self.training_validation = dict(training.get("validation") or {})
        self.measurements = list(measurements or [])
        self.fits: Dict[str, ImplFit] = dict(fits or {})
        self.canaries = list(canaries or [])
        self.measured: Dict[str, dict] = {k: {"fingerprint": v["fingerprint"], "timings": dict(v["timings"])}
                                          for k, v in (measured or {}).items()}
        self.validation = dict(validation or {})
        self.name = name or fingerprint.get("device_name", "device")
        self.path = Path(path) if path else None
        self.mode = mode
        self.read_only = read_only
        self.match_note: Optional[str] = None
        self.calibration = None
        self.supplement: Optional[dict] = None  # see add_supplement
        self._trust: Optional[str] = None
        self._user_cache_read = set()  # fingerprint ids whose user-cache file was merged in

    # -- trust --
    @property
    def trust(self) -> str:
        """"this device" where the profile's fingerprint is this device's, "calibrated" where its canaries
        were timed here and agreed, else "unverified"."""
        if self._trust is not None:
            return self._trust
        if self.calibration is not None and self.calibration.accepted:
            return "calibrated"
        return "this device" if device.same_device(self.fingerprint, device.fingerprint()) else "unverified"

    @trust.setter
    def trust(self, value: str):
        if value not in TRUST_LEVELS:
            raise ValueError(f"Received trust={value!r}; expected one of {TRUST_LEVELS}.")
        self._trust = value

    # -- prediction --
    @property
    def has_training(self) -> bool:
        """Whether the profile holds forward + backward fits (`convrewrite profile --training`)."""
        return bool(self.training_fits)

    def prediction(self, impl_name: str, spec: ConvSpec, training: bool = False) -> Optional[Prediction]:
        """The predicted time of `impl_name` on `spec` with its source and error band (see Prediction), or
        None where nothing predicts it (unknown spatial size, no fit, not applicable).

        training: predict a training step's forward + backward from the profile's training timings and fits
        instead (no tactic cache: it holds inference timings); None where the profile has none for
        `impl_name`. A calibrated profile scales them by the same canary ratio (canaries are timed forward
        only: a device k times slower on a kernel is taken to be k times slower on its gradients too).

        Order: this device's tactic timing (not for an unverified profile: that plan is for another
        device); the profile's own timing of the exact spec; its fit. A calibrated profile's numbers are
        scaled by the implementation's canary ratio (measured here / profile), and their band widens by the
        canaries' residual; an implementation without canaries stays unverified."""
        if spec.height is None or spec.width is None:
            return None
        spec = spec if spec.batch else spec.with_input(batch=1)
        key = _spec_key(spec)
        trust = self.trust
        tactic = self.tactics().get(key, {}) if trust != "unverified" and not training else {}
        if impl_name in tactic:
            return Prediction(1e3 * tactic[impl_name], "timed here", TIMING_BAND)
        if not training and trust == "calibrated" and impl_name in (self.supplement or {}).get("implementations", ()):
            return self._supplement_prediction(impl_name, spec)
        own = self._own_number(impl_name, spec, training=training)
        if own is None:
            return None
        seconds, kind = own
        fits = self.training_fits if training else self.fits
        band = TIMING_BAND if kind == "timing" else fits[impl_name].p90_rel_error
        suffix = FORWARD_BACKWARD if training else ""
        if trust == "this device":
            return Prediction(1e3 * seconds, ("timed here" if kind == "timing" else "fitted") + suffix, band)
        if trust == "calibrated" and self.calibration.band(impl_name) is not None:
            scale, residual = self.calibration.scale(impl_name), self.calibration.band(impl_name)
            combined = None if band is None or residual is None else math.hypot(band, residual)
            return Prediction(1e3 * seconds * scale, f"calibrated {kind}{suffix}", combined)
        return Prediction(1e3 * seconds, f"unverified {kind}{suffix}", band)

    # -- implementations measured here beside a calibrated profile --
    SUPPLEMENT_SOURCES = ("timed here, beside the calibrated profile", "fitted here, beside the calibrated profile")

    def add_supplement(self, implementations_measured, rows, seconds: float):
        """Add this device's own timings of implementations the profile has no fit for (measured here after
        calibration: `profiles.calibrate`): they are predicted from their own timings and fit on this device
        (sources SUPPLEMENT_SOURCES), never from the profile, and unscaled. `implementations_measured`: the
        names measured (one without enough timings to fit stays unpredicted); rows: [{"spec", "impl",
        "seconds"}]."""
        self.supplement = {"implementations": sorted(implementations_measured), "measurements": list(rows),
                           "fits": fit_all(rows), "table": _by_spec(rows), "seconds": seconds}

    def _supplement_prediction(self, impl_name: str, spec: ConvSpec) -> Optional[Prediction]:
        timed_here = self.supplement["table"].get(_spec_key(spec), {})
        own = self._from_fit(impl_name, spec, self.supplement["fits"], timed_here)
        if own is None:
            return None
        seconds, kind = own
        timed, fitted = self.SUPPLEMENT_SOURCES
        if kind == "timing":
            return Prediction(1e3 * seconds, timed, TIMING_BAND)
        return Prediction(1e3 * seconds, fitted, self.supplement["fits"][impl_name].p90_rel_error)

    def describe_supplement(self) -> str:
        """"measured here, not in the profile: direct-bf16, depthwise-bf16 (38 timings, 41 s)" or ""."""
        if not self.supplement:
            return ""
        fitted = [n for n in self.supplement["implementations"] if n in self.supplement["fits"]]
        unfitted = [n for n in self.supplement["implementations"] if n not in self.supplement["fits"]]
        return (f"measured here, not in the profile: {', '.join(fitted) or 'none fitted'} "
                f"({len(self.supplement['measurements'])} timings, {self.supplement['seconds']:.0f} s)"
                + (f"; too few timings to fit: {', '.join(unfitted)}" if unfitted else ""))

    def predict_seconds(self, impl_name: str, spec: ConvSpec) -> Optional[float]:
        """Seconds per call (see `prediction`)."""
        p = self.prediction(impl_name, spec)
        return None if p is None else p.ms / 1e3

    def _own_number(self, impl_name: str, spec: ConvSpec, with_canaries: bool = False, training: bool = False):
        """(seconds, "timing" | "fit") the profile itself gives for one call on its own device: a canary
        timing of the exact spec (with_canaries), a grid timing of it, else its fit; None where it says
        nothing (no fit, an implementation this version lacks, or one that does not apply). training: the
        same from the forward + backward timings and fits."""
        key = _spec_key(spec)
        if training:
            timed = self._table("training_measurements").get(key, {})
            return self._from_fit(impl_name, spec, self.training_fits, timed)
        if with_canaries:
            for row in self.canaries:
                if row["impl"] == impl_name and row["spec"] == key:
                    return row["seconds"], "timing"
        return self._from_fit(impl_name, spec, self.fits, self._profiled().get(key, {}))

    @staticmethod
    def _from_fit(impl_name: str, spec: ConvSpec, fits: Dict[str, ImplFit], timed: Dict[str, float]):
        """(seconds, "timing") where `timed` ({impl: seconds} of this spec) has it, else (seconds, "fit") from
        `fits`, else None."""
        if impl_name in timed:
            return timed[impl_name], "timing"
        fit = fits.get(impl_name)
        if fit is None or impl_name not in implementations.names():
            return None
        impl = implementations.get(impl_name)
        if not impl.applicable(spec)[0]:
            return None
        return max(fit.predict(regression_terms(impl, spec)), MIN_PREDICTED_SECONDS), "fit"

    def profile_band(self, impl_name: str, spec: ConvSpec) -> float:
        """How far `profile_seconds` may be off on the profile's own device: 0 for a timing (canary or grid),
        the fit's 90th-percentile relative error for a fitted number."""
        own = self._own_number(impl_name, spec, with_canaries=True)
        return (self.fits[impl_name].p90_rel_error or 0.0) if own and own[1] == "fit" else 0.0

    def profile_seconds(self, impl_name: str, spec: ConvSpec) -> Optional[float]:
        """What the profile itself says one call takes on its own device (see `_own_number`, canaries
        included); no tactic timings of this device, no calibration. Calibration compares these with
        timings made here."""
        own = self._own_number(impl_name, spec, with_canaries=True)
        return None if own is None else own[0]

    def tactics(self, here: Optional[dict] = None) -> Dict[str, Dict[str, float]]:
        """This device's tactic timings ({spec json: {impl: seconds}}), or {} where the profile describes
        another device class: there they would mix this device's times into another device's plan."""
        here = here or device.fingerprint()
        if not device.same_class(self.fingerprint, here):
            return {}
        return self._tactic_entry(here)["timings"]

    def _tactic_entry(self, here: dict) -> dict:
        fid = device.fingerprint_id(here)
        entry = self.measured.setdefault(fid, {"fingerprint": here, "timings": {}})
        if fid not in self._user_cache_read:  # once per device: merge what earlier runs cached for it
            self._user_cache_read.add(fid)
            cached = None if self._writes_in_file() else read_tactic_file(tactic_cache_path(here)).get(fid)
            if cached:
                _merge_timings(entry["timings"], cached["timings"])
        return entry

    def _writes_in_file(self) -> bool:
        """Whether tactic timings persist in this profile's own file (a profile the user named and that
        is not shipped), rather than in the user cache."""
        return self.path is not None and not self.read_only and not _is_shipped(self.path)

    def _profiled(self) -> Dict[str, Dict[str, float]]:
        """The profile's own timings by spec: exact specs the grid measured need no prediction."""
        return self._table("measurements")

    def _table(self, field: str) -> Dict[str, Dict[str, float]]:
        """{spec json: {impl: seconds}} of the rows in attribute `field`, rebuilt when their count changes."""
        rows = getattr(self, field)
        cached = self.__dict__.setdefault("_tables", {}).get(field)
        if cached is None or cached[0] != len(rows):
            cached = self._tables[field] = (len(rows), _by_spec(rows))
        return cached[1]

    def predict_ms(self, impl_name: str, spec: ConvSpec) -> Optional[float]:
        p = self.prediction(impl_name, spec)
        return None if p is None else p.ms

    # -- fitting --
    def fit(self, holdout: float = 0.25, seed: int = 0) -> "CostModel":
        """Fit every implementation's terms; store held-out validation, then refit on everything. The same
        for the forward + backward timings where the profile has them."""
        self.fits, validation = _fit_with_validation(self.measurements, holdout, seed)
        self.validation = validation or self.validation
        if self.training_measurements:
            self.training_fits, validation = _fit_with_validation(self.training_measurements, holdout, seed)
            self.training_validation = validation or self.training_validation
        return self

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
            "canaries": self.canaries,
            "measured": {k: v for k, v in self.measured.items() if v["timings"]},
            **({"training": {"measurements": self.training_measurements, "validation": self.training_validation,
                             "fits": {k: dataclasses.asdict(v) for k, v in self.training_fits.items()}}}
               if self.training_measurements or self.training_fits else {}),
        }

    def save(self, path) -> Path:
        """Write atomically (temporary file in the same folder, then rename)."""
        path = write_json_atomically(path, self.to_dict())
        self.path = path
        return path

    @classmethod
    def load(cls, path) -> "CostModel":
        """Read a profile (version 1 or 2), checking every field's type; ProfileError names the file and
        the field where it is not what `convrewrite profile` writes. Profiles in a shipped folder load
        read-only (their tactic timings go to the user cache)."""
        path = Path(path)
        if path.is_dir():
            raise ProfileError(f"Profile '{path}' is a folder; expected a JSON file written by `convrewrite profile`.")
        if not path.is_file():
            raise ProfileError(f"Profile '{path}' does not exist; expected a JSON file written by `convrewrite profile`.")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProfileError(f"Profile '{path}' is not valid JSON ({exc}); re-create it with `convrewrite profile`.") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"File '{path}' is not a convrewrite profile (no \"format\": \"{FORMAT}\"); expected a file from `convrewrite profile`.")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
            raise ProfileError(f"Profile '{path}' has version {version!r}; this convrewrite reads versions 1 to {VERSION}: upgrade convrewrite or re-profile.")
        if version == 1:
            data = migrate_v1(data, path)
        try:
            check_profile(data, path)
            fits = {k: ImplFit(**v) for k, v in data["fits"].items()}
            training = data.get("training") or {}
            training = {**training, "fits": {k: ImplFit(**v) for k, v in training.get("fits", {}).items()}}
            measured = {device.fingerprint_id(v["fingerprint"]): v for v in data.get("measured", {}).values()}
            cm = cls(data["fingerprint"], data.get("measurements", []), fits, measured,
                     data.get("validation", {}), data.get("name"), path, data.get("mode", ""),
                     read_only=_is_shipped(path), canaries=data.get("canaries", []), training=training)
            cm._check_fit_features(path)
            cm._refit_if_features_changed()
            fill_error_bands(cm.fits, cm.measurements)
            fill_error_bands(cm.training_fits, cm.training_measurements)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProfileError(f"Profile '{path}' is truncated or corrupt ({type(exc).__name__}: {exc}); re-create it with `convrewrite profile`.") from None
        return cm

    def _check_fit_features(self, path):
        """A fit over feature names this version does not compute would predict from missing (zero) terms,
        i.e. garbage; with measurements stored, `_refit_if_features_changed` refits instead."""
        for fits, rows, field in ((self.fits, self.measurements, "fits"),
                                  (self.training_fits, self.training_measurements, "training fits")):
            refittable = {m["impl"] for m in rows}
            for name, fit in fits.items():
                if name not in implementations.names() or name in refittable:
                    continue  # an implementation this version lacks is never asked for
                unknown = sorted(set(fit.features) - known_terms(name))
                if unknown:
                    raise ProfileError(
                        f"Profile '{path}' {field} {name!r} on features {unknown} that this convrewrite does not "
                        f"compute (it computes {sorted(known_terms(name))}), and holds no measurements to refit from; "
                        f"re-create it with `convrewrite profile` for this version.")

    def _refit_if_features_changed(self):
        """Refit from the stored measurements when this version's features differ from the stored fits'.

        The timings stay valid when a feature definition changes; weights fitted on old features do not."""
        if _stale(self.fits, self.measurements):
            self.fits = fit_all(self.measurements)
        if _stale(self.training_fits, self.training_measurements):
            self.training_fits = fit_all(self.training_measurements)

    # -- measured mode (timing itself is `profiles.measure_tactics`) --
    def untimed_specs(self, specs, batch: int = 8) -> List[ConvSpec]:
        """The specs (batch filled in where unknown) that this device's tactic cache lacks, in order, once
        each; specs of unknown spatial size are skipped (nothing can be timed for them)."""
        timings = self._tactic_entry(device.fingerprint())["timings"]
        out = []
        for spec in dict.fromkeys(specs):
            if spec.height is None or spec.width is None:
                continue
            spec = spec.with_input(batch=spec.batch or batch)
            if _spec_key(spec) not in timings and spec not in out:
                out.append(spec)
        return out

    def record_tactics(self, timings: Dict[ConvSpec, Dict[str, float]], save: bool = True):
        """Add this device's timings ({spec: {impl: seconds}}) to its tactic cache and persist them: in
        this profile's file if the user named it, else (shipped or `auto` profiles) in
        `tactic_cache_path()`. A profile of another device class is not written (its tactic cache would
        mix this device's times into another device's plan)."""
        here = device.fingerprint()
        if not device.same_class(self.fingerprint, here):
            return self
        entry = self._tactic_entry(here)["timings"]
        for spec, times in timings.items():
            entry[_spec_key(spec)] = {**entry.get(_spec_key(spec), {}), **times}
        if timings and save:
            self._save_tactics(here)
        return self

    def _save_tactics(self, here: dict):
        """Persist this device's tactic timings: into this profile's file (merged with what other
        processes wrote there since it was loaded) or into the user cache file."""
        fid = device.fingerprint_id(here)
        entry = self.measured[fid]
        target = self.path if self._writes_in_file() else tactic_cache_path(here)
        try:
            if target == self.path:
                try:
                    on_disk = CostModel.load(self.path).measured
                except ProfileError:
                    on_disk = {}
                for key, other in on_disk.items():
                    mine = self.measured.setdefault(key, {"fingerprint": other["fingerprint"], "timings": {}})["timings"]
                    _merge_timings(mine, other["timings"])
                self.save(target)
            else:
                timings = dict(entry["timings"])
                _merge_timings(timings, read_tactic_file(target).get(fid, {"timings": {}})["timings"])
                write_json_atomically(target, {"format": TACTICS_FORMAT, "version": VERSION,
                                                "measured": {fid: {"fingerprint": entry["fingerprint"], "timings": timings}}})
        except OSError as exc:
            warnings.warn(f"Could not write the tactic cache to '{target}' ({exc}); the timings are used in this "
                          f"process only.", stacklevel=4)

    def __repr__(self):
        n = sum(len(v["timings"]) for v in self.measured.values())
        return f"<CostModel {self.name!r}: {sorted(self.fits)} fitted, {n} specs in the tactic cache>"


def _by_spec(rows) -> Dict[str, Dict[str, float]]:
    """{spec json: {impl: seconds}} of timing rows."""
    table: Dict[str, Dict[str, float]] = {}
    for m in rows:
        table.setdefault(m["spec"], {})[m["impl"]] = m["seconds"]
    return table


def _fit_with_validation(rows, holdout: float, seed: int):
    """(fits on all `rows`, held-out validation or {}): fitted first without a random `holdout` share of the
    specs, whose choices are scored (fitting.held_out_quality), then refitted on everything."""
    specs = sorted({m["spec"] for m in rows})
    rng = np.random.default_rng(seed)
    held = set(rng.choice(specs, size=int(len(specs) * holdout), replace=False)) if holdout and len(specs) > 8 else set()
    validation = {}
    if held:
        validation = held_out_quality(fit_all([m for m in rows if m["spec"] not in held]),
                                      [m for m in rows if m["spec"] in held], choose_by_prediction)
    return fit_all(rows), validation


def _stale(fits: Dict[str, ImplFit], rows) -> bool:
    """Whether a fit's feature names differ from what this version computes for its rows' specs."""
    for m in rows:
        fit = fits.get(m["impl"])
        if fit is not None and m["impl"] in implementations.names():
            current = regression_terms(implementations.get(m["impl"]), ConvSpec.from_json(m["spec"]))
            if sorted(current) != sorted(fit.features):
                return True
    return False


def _merge_timings(mine: dict, other: dict):
    """Add `other`'s {spec: {impl: seconds}} to `mine` in place; `mine` wins where both timed a pair."""
    for spec, times in other.items():
        mine[spec] = {**times, **mine.get(spec, {})}
