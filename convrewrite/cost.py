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
import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import numpy as np

from . import implementations
from . import device
from .errors import ProfileError
from .planner import choose as choose_by_prediction
from .spec import ConvSpec

FORMAT = "convrewrite-profile"
VERSION = 3
"""3: the fingerprint records the hardware ("hardware") and kernel settings, and the profile carries its
canaries ("canaries": timings of `calibration.canary_pairs()` measured with the grid). 2: the tactic cache
("measured") is keyed by device fingerprint. Versions 1 and 2 still load: version 2 as "hardware
unknown" with no canaries (calibration then compares against the fit), version 1 through `_migrate_v1`."""
TACTICS_FORMAT = "convrewrite-tactics"
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


class Prediction(NamedTuple):
    """One predicted time with its provenance.

    ms: the predicted milliseconds per call. source: where it came from: "timed here" (this device's
    tactic cache, or the grid of a profile measured on this device), "fitted" (this device's profile's
    fit), "calibrated timing" / "calibrated fit" (another device's profile, scaled by its canaries timed
    here), "unverified timing" / "unverified fit" (another device's profile, not checked here: converting
    offline for it). band: the expected relative error (0.25 means +-25%), None where nothing bounds it."""

    ms: float
    source: str
    band: Optional[float]


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
    where the profile is another device's: shown in plan summaries).
    """

    def __init__(self, fingerprint: dict, measurements=None, fits=None, measured=None, validation=None,
                 name: Optional[str] = None, path: Optional[Path] = None, mode: str = "", read_only: bool = False,
                 canaries=None):
        self.fingerprint = fingerprint
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
    def prediction(self, impl_name: str, spec: ConvSpec) -> Optional[Prediction]:
        """The predicted time of `impl_name` on `spec` with its source and error band (see Prediction), or
        None where nothing predicts it (unknown spatial size, no fit, not applicable).

        Order: this device's tactic timing; the profile's own timing of the exact spec; its fit. A
        calibrated profile's numbers are scaled by the implementation's canary ratio (measured here /
        predicted), and their band widens by the canaries' residual error."""
        if spec.height is None or spec.width is None:
            return None
        spec = spec if spec.batch else spec.with_input(batch=1)
        key = _spec_key(spec)
        tactic = self.tactics().get(key, {})
        if impl_name in tactic:
            return Prediction(1e3 * tactic[impl_name], "timed here", TIMING_BAND)
        profiled = self._profiled().get(key, {})
        if impl_name in profiled:
            seconds, band, kind = profiled[impl_name], TIMING_BAND, "timing"
        else:
            fit = self.fits.get(impl_name)
            if fit is None:
                return None
            impl = implementations.get(impl_name)
            if not impl.applicable(spec)[0]:
                return None
            seconds = max(fit.predict(regression_terms(impl, spec)), 1e-7)
            band, kind = fit.p90_rel_error, "fit"
        trust = self.trust
        if trust == "this device":
            return Prediction(1e3 * seconds, "timed here" if kind == "timing" else "fitted", band)
        if trust == "calibrated":
            scale, residual = self.calibration.scale(impl_name), self.calibration.band(impl_name)
            combined = None if band is None or residual is None else math.hypot(band, residual)
            return Prediction(1e3 * seconds * scale, f"calibrated {kind}", combined)
        return Prediction(1e3 * seconds, f"unverified {kind}", band)

    def predict_seconds(self, impl_name: str, spec: ConvSpec) -> Optional[float]:
        """Seconds per call (see `prediction`)."""
        p = self.prediction(impl_name, spec)
        return None if p is None else p.ms / 1e3

    def profile_seconds(self, impl_name: str, spec: ConvSpec) -> Optional[float]:
        """What the profile itself says one call takes on its own device: its canary or grid timing of the
        exact spec, else its fit; no tactic timings of this device, no calibration. Calibration compares
        these with timings made here."""
        key = _spec_key(spec)
        for row in self.canaries:
            if row["impl"] == impl_name and row["spec"] == key:
                return row["seconds"]
        if impl_name in self._profiled().get(key, {}):
            return self._profiled()[key][impl_name]
        fit = self.fits.get(impl_name)
        impl = implementations.get(impl_name) if impl_name in implementations.names() else None
        if fit is None or impl is None or not impl.applicable(spec)[0]:
            return None
        return max(fit.predict(regression_terms(impl, spec)), 1e-7)

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
            cached = None if self._writes_in_file() else _read_tactic_file(tactic_cache_path(here)).get(fid)
            if cached:
                _merge_timings(entry["timings"], cached["timings"])
        return entry

    def _writes_in_file(self) -> bool:
        """Whether tactic timings persist in this profile's own file (a profile the user named and that
        is not shipped), rather than in the user cache."""
        return self.path is not None and not self.read_only and not _is_shipped(self.path)

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
        hits, regret, best_total, n = 0, 0.0, 0.0, 0
        for key, times in by_spec.items():
            spec = ConvSpec.from_json(key)
            # pac is chosen by policy, never for speed, so it does not compete here
            preds = {k: self.fits[k].predict(regression_terms(implementations.get(k), spec)) for k in times
                     if k in self.fits and _for_speed(k)}
            if not preds:
                continue
            chosen, _ = choose_by_prediction(preds)  # as the planner decides
            best = min(v for k, v in times.items() if _for_speed(k))
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
            "canaries": self.canaries,
            "measured": {k: v for k, v in self.measured.items() if v["timings"]},
        }

    def save(self, path) -> Path:
        """Write atomically (temporary file in the same folder, then rename)."""
        path = _write_json_atomically(path, self.to_dict())
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
            data = _migrate_v1(data, path)
        try:
            _check_profile(data, path)
            fits = {k: ImplFit(**v) for k, v in data["fits"].items()}
            measured = {device.fingerprint_id(v["fingerprint"]): v for v in data.get("measured", {}).values()}
            cm = cls(data["fingerprint"], data.get("measurements", []), fits, measured,
                     data.get("validation", {}), data.get("name"), path, data.get("mode", ""),
                     read_only=_is_shipped(path), canaries=data.get("canaries", []))
            cm._check_fit_features(path)
            cm._refit_if_features_changed()
            _fill_error_bands(cm.fits, cm.measurements)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProfileError(f"Profile '{path}' is truncated or corrupt ({type(exc).__name__}: {exc}); re-create it with `convrewrite profile`.") from None
        return cm

    def _check_fit_features(self, path):
        """A fit over feature names this version does not compute would predict from missing (zero) terms,
        i.e. garbage; with measurements stored, `_refit_if_features_changed` refits instead."""
        refittable = {m["impl"] for m in self.measurements}
        for name, fit in self.fits.items():
            if name not in implementations.names() or name in refittable:
                continue  # an implementation this version lacks is never asked for
            unknown = sorted(set(fit.features) - known_terms(name))
            if unknown:
                raise ProfileError(
                    f"Profile '{path}' fits {name!r} on features {unknown} that this convrewrite does not compute "
                    f"(it computes {sorted(known_terms(name))}), and holds no measurements to refit from; "
                    f"re-create it with `convrewrite profile` for this version.")

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
                _merge_timings(timings, _read_tactic_file(target).get(fid, {"timings": {}})["timings"])
                _write_json_atomically(target, {"format": TACTICS_FORMAT, "version": VERSION,
                                                "measured": {fid: {"fingerprint": entry["fingerprint"], "timings": timings}}})
        except OSError as exc:
            warnings.warn(f"Could not write the tactic cache to '{target}' ({exc}); the timings are used in this "
                          f"process only.", stacklevel=4)

    def __repr__(self):
        n = sum(len(v["timings"]) for v in self.measured.values())
        return f"<CostModel {self.name!r}: {sorted(self.fits)} fitted, {n} specs in the tactic cache>"


def _merge_timings(mine: dict, other: dict):
    """Add `other`'s {spec: {impl: seconds}} to `mine` in place; `mine` wins where both timed a pair."""
    for spec, times in other.items():
        mine[spec] = {**times, **mine.get(spec, {})}


def _write_json_atomically(path, data) -> Path:
    """Write JSON through a temporary file in the same folder and a rename: never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _read_tactic_file(path: Path) -> Dict[str, dict]:
    """{fingerprint id: entry} from a user-cache tactic file; {} where there is none. An unreadable
    file only costs re-measuring, so it is reported and ignored (it is rewritten on the next save)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != TACTICS_FORMAT:
            raise ValueError(f"no \"format\": \"{TACTICS_FORMAT}\"")
        _check_measured(data.get("measured"), path)
        return {device.fingerprint_id(v["fingerprint"]): v for v in data["measured"].values()}
    except (OSError, UnicodeDecodeError, ValueError, ProfileError) as exc:
        warnings.warn(f"Ignoring unreadable tactic cache '{path}' ({exc}); its specs are measured again.", stacklevel=4)
        return {}


# ---- profile validation and migration -------------------------------------------------------------
def _migrate_v1(data: dict, path) -> dict:
    """Version 1 -> 2. Version 1's tactic cache ({spec: {impl: seconds}}) did not record which device
    measured it (measure=True wrote into whatever profile was in use), so its timings cannot be
    attributed: they are dropped (with a warning) and get measured again. Everything else is unchanged."""
    data = dict(data)
    old = data.pop("measured", None)
    if old:
        warnings.warn(f"Profile '{path}' (version 1) holds {len(old) if isinstance(old, dict) else '?'} tactic-cache "
                      f"timings without the device that measured them; they are ignored (measure=True measures "
                      f"them again, keyed by device).", stacklevel=3)
    data["measured"] = {}
    data["version"] = VERSION
    return data


REQUIRED_FINGERPRINT_KEYS = ("backend", "device_kind", "arch", "threads")
"""What a profile must say of its device for `auto` to decide whether it could describe this one."""


def _for_speed(name: str) -> bool:
    """Whether an implementation competes on speed (one chosen by user policy does not; see Implementation)."""
    return name in implementations.names() and implementations.get(name).chosen_for_speed


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _bad(path, field, expected, found):
    shown = f"{type(found).__name__} {found!r}" if not isinstance(found, (dict, list)) else type(found).__name__
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ProfileError(f"Profile '{path}' has {field} = {shown}; expected {expected}; re-create it with "
                        f"`convrewrite profile` (or fix that field).")


def _check_profile(data: dict, path):
    """Every field's type, so a hand-edited or foreign file fails here with the field named, not later."""
    fp = data.get("fingerprint")
    if not isinstance(fp, dict) or not all(isinstance(k, str) for k in fp):
        raise _bad(path, '"fingerprint"', 'an object like {"backend": "tensorflow", "device_kind": "cpu", ...}', fp)
    for key in REQUIRED_FINGERPRINT_KEYS:
        if key not in fp:
            raise _bad(path, f'"fingerprint"."{key}"', "present (the device the profile measured)", None)
    for key in ("backend", "device_kind", "device_name", "arch"):
        if key in fp and not isinstance(fp[key], str):
            raise _bad(path, f'"fingerprint"."{key}"', "a string", fp[key])
    if not (isinstance(fp["threads"], int) and not isinstance(fp["threads"], bool) and fp["threads"] > 0):
        raise _bad(path, '"fingerprint"."threads"', "a positive integer", fp["threads"])
    if "hardware" in fp and not isinstance(fp["hardware"], dict):
        raise _bad(path, '"fingerprint"."hardware"', 'an object {"cpu": {...}}', fp["hardware"])
    for key in ("name", "mode"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise _bad(path, f'"{key}"', "a string", data[key])
    fits = data.get("fits")
    if not isinstance(fits, dict):
        raise _bad(path, '"fits"', "an object {implementation: fit}", fits)
    for name, fit in fits.items():
        if not isinstance(fit, dict):
            raise _bad(path, f'"fits"."{name}"', 'an object {"features", "weights", "n_samples", "median_rel_error"}', fit)
        feats, weights = fit.get("features"), fit.get("weights")
        if not isinstance(feats, list) or not all(isinstance(f, str) for f in feats):
            raise _bad(path, f'"fits"."{name}"."features"', "a list of feature names", feats)
        if not isinstance(weights, list) or len(weights) != len(feats) or not all(_number(w) and w >= 0 for w in weights):
            raise _bad(path, f'"fits"."{name}"."weights"', f"a list of {len(feats)} finite numbers >= 0, one per feature", weights)
        for key in ("median_rel_error", "p90_rel_error"):
            if fit.get(key) is not None and not (_number(fit[key]) and fit[key] >= 0):
                raise _bad(path, f'"fits"."{name}"."{key}"', "a finite number >= 0", fit[key])
        if not (isinstance(fit.get("n_samples"), int) and fit["n_samples"] >= 0):
            raise _bad(path, f'"fits"."{name}"."n_samples"', "an integer >= 0", fit.get("n_samples"))
    for field in ("measurements", "canaries"):
        rows = data.get(field, [])
        if not isinstance(rows, list):
            raise _bad(path, f'"{field}"', 'a list of {"spec", "impl", "seconds"}', rows)
        for i, m in enumerate(rows):
            if not (isinstance(m, dict) and isinstance(m.get("spec"), str) and isinstance(m.get("impl"), str)
                    and _number(m.get("seconds")) and m["seconds"] > 0):
                raise _bad(path, f'"{field}"[{i}]', 'an object {"spec": ConvSpec JSON, "impl": name, "seconds": > 0}', m)
            _check_spec(m["spec"], path, f'"{field}"[{i}]."spec"')
    if not isinstance(data.get("validation", {}), dict):
        raise _bad(path, '"validation"', "an object", data.get("validation"))
    _check_measured(data.get("measured", {}), path)
    if not fits and not data.get("measurements"):
        raise ProfileError(f"Profile '{path}' has no fits and no measurements, so it predicts nothing; re-create it "
                           f"with `convrewrite profile`.")


def _check_spec(text, path, field):
    try:
        ConvSpec.from_json(text)
    except Exception as exc:  # whatever ConvSpec rejects, the file is what is wrong
        raise ProfileError(f"Profile '{path}' has {field} = {text[:60]!r}, which is not a ConvSpec JSON ({exc}); "
                           f"re-create it with `convrewrite profile`.") from None


def _check_measured(measured, path):
    """The version 2 tactic cache: {fingerprint id: {"fingerprint": {...}, "timings": {spec: {impl: s}}}}."""
    if not isinstance(measured, dict):
        raise _bad(path, '"measured"', '{fingerprint id: {"fingerprint": {...}, "timings": {...}}} (format version 2)', measured)
    for fid, entry in measured.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("fingerprint"), dict) and isinstance(entry.get("timings"), dict)):
            raise _bad(path, f'"measured"."{fid}"', 'an object {"fingerprint": {...}, "timings": {spec: {impl: seconds}}}', entry)
        for spec, times in entry["timings"].items():
            _check_spec(spec, path, f'a "measured"."{fid}"."timings" key')
            if not isinstance(times, dict) or not all(isinstance(k, str) and _number(v) and v > 0 for k, v in times.items()):
                raise _bad(path, f'"measured"."{fid}"."timings"[{spec[:30]!r}...]', "an object {implementation: seconds > 0}", times)


_KNOWN_TERMS: Dict[str, set] = {}


def known_terms(impl_name: str) -> set:
    """Every regression-term name this version computes for an implementation, over probe specs that
    cover its regimes (dense, grouped, depthwise; strided, dilated)."""
    if impl_name not in _KNOWN_TERMS:
        def conv(**kw):
            base = dict(kind="conv2d", in_channels=8, filters=8, kernel=(3, 3), height=16, width=16, batch=1, padding="same")
            return ConvSpec(**{**base, **kw})

        probes = [conv(), conv(groups=4), conv(groups=8), conv(kind="depthwise_conv2d", groups=8),
                  conv(strides=(2, 2), kernel=(5, 5)), conv(dilation=(2, 2)), conv(padding="valid", kernel=(7, 7))]
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
        errors = np.abs(X @ w - y) / y
        fits[name] = ImplFit(names, [float(v) for v in w], len(ms), float(np.median(errors)),
                             float(np.quantile(errors, 0.9)))
    return fits


def _fill_error_bands(fits: Dict[str, ImplFit], rows):
    """Compute p90_rel_error for fits stored without it (profiles before version 3), from their rows."""
    for name, fit in fits.items():
        ms = [m for m in rows if m["impl"] == name]
        if fit.p90_rel_error is not None or not ms or name not in implementations.names():
            continue
        impl = implementations.get(name)
        pred = np.array([max(fit.predict(regression_terms(impl, ConvSpec.from_json(m["spec"]))), 1e-7) for m in ms])
        y = np.array([m["seconds"] for m in ms])
        fit.p90_rel_error = float(np.quantile(np.abs(pred - y) / y, 0.9))


# ---- plotting -----------------------------------------------------------------------------------
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
