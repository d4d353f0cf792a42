"""Choosing the profile a plan is made with, and earning the right to trust it on this device.

`resolve(cost_model, target=...)` turns "auto", a path, or a CostModel into the CostModel a plan uses:

- A profile measured on this very device (`device.same_device`: hardware, libraries and kernel settings
  all agree) is used as it is: trust "this device".
- Planning for this device (target "here", or "auto" with a profile of this device's class), a profile of
  another fingerprint is calibrated first: its canaries are timed here (`profile.time_canaries`, 1-2 s on
  2 cores) and compared (`calibration.compare`). Accepted, it is used with its per-implementation scale and
  error band: trust "calibrated"; implementations that run on this device but that the profile has no
  timings of (bfloat16 variants on a bf16 CPU, implementations newer than the profile) are then measured
  here, their canaries and the quick grid for them alone, and predicted from those timings (`_supplement`).
  Refused, a quick profile of this device is measured instead (about a minute, with a progress bar),
  cached in the user cache under the full fingerprint and reused next time.
- Converting for another device (target "other", or a profile of another machine class: another backend,
  device kind, architecture or thread count), nothing is timed here, ever: the profile is used as it is,
  and the plan says its predictions are unverified.

Calibrations are cached per (device, profile) in `CACHE_DIR/calibrations/`, so a profile is calibrated once
per device. `measure_tactics` times candidates on a model's own shapes (optimize(measure=True)).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import List, Optional

from . import calibration as calib
from . import cost, device, implementations
from .cost import CostModel
from .errors import ProfileError
from .profile_format import write_json_atomically
from .planner import constraint_violation, parse_memory_limit
from . import profile as profiling
from .timing import progress as progress_bar

TARGETS = ("auto", "here", "other")
"""Which device a plan is for: "here" (this device: calibrate or measure), "other" (another device:
never time anything here), or "auto" ("here" where the profile is of this device's class, else "other")."""

MAX_CALIBRATIONS = 2
"""How many candidate profiles `auto` calibrates (closest first) before measuring this device itself."""

_AUTO_CACHE = {}  # fingerprint id -> the CostModel "auto" chose in this process
_WARNED = set()  # warnings already given in this process


def _warn_once(key, message: str, stacklevel: int = 3):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=stacklevel)


def shipped_profiles() -> List[Path]:
    """Profiles `auto` considers: CONVREWRITE_COST_MODELS (a folder), the shipped folders, the user cache."""
    out = []
    extra = os.environ.get("CONVREWRITE_COST_MODELS")
    for d in ([Path(extra)] if extra else []) + cost.SHIPPED_DIRS + [cost.CACHE_DIR]:
        if d.is_dir():
            out.extend(sorted(d.glob("*.json")))
    return out


def check_target(target) -> str:
    if target not in TARGETS:
        raise ValueError(f"Received target={target!r}; expected one of {TARGETS} (the device the plan is for).")
    return target


def resolve(cost_model, warn: bool = True, target: str = "auto") -> Optional[CostModel]:
    """The CostModel to plan with (see the module docstring).

    Args:
        cost_model: "auto", a path to a profile JSON, a CostModel (or any object with `predict_ms`), or None
            (rule-based planning: returned as None).
        warn: warn where the profile is another device's (unverified) or was refused here.
        target: "auto", "here" or "other": the device the plan is for (see TARGETS).

    Returns:
        A CostModel whose `trust` says how far its numbers describe the target, and whose `calibration` /
        `match_note` say why; or None.

    Raises:
        ProfileError: the named profile is missing, unreadable or not a profile; `cost_model` is of a type
            that names no profile.
    """
    check_target(target)
    if cost_model is None or hasattr(cost_model, "predict_ms"):
        return cost_model  # a CostModel, or any object predicting milliseconds per (implementation, spec)
    if not isinstance(cost_model, (str, os.PathLike)):
        raise ProfileError(f"Received cost_model={cost_model!r} ({type(cost_model).__name__}); expected 'auto', "
                           f"'rules', None, a path to a profile JSON, or a CostModel.")
    here = device.fingerprint()
    if cost_model == "auto":
        if target == "other":
            raise ProfileError("cost_model='auto' describes this device, but target='other' plans for another one; "
                               "name that device's profile (convrewrite profile -o FILE, run there).")
        return _auto(here)
    cm = CostModel.load(cost_model)
    return _trusted(cm, here, target, str(cost_model), warn)


def _trusted(cm: CostModel, here: dict, target: str, source: str, warn: bool) -> CostModel:
    """`cm` as a plan for `target` may use it: as is, calibrated, or replaced by a profile measured here."""
    if device.same_device(cm.fingerprint, here):
        cm.trust = "this device"
        return cm
    if target == "other" or (target == "auto" and not device.same_class(cm.fingerprint, here)):
        _mark_unverified(cm, here, source, warn)
        return cm
    if device.same_class(cm.fingerprint, here):
        cal = calibrate(cm, here)
        if cal.accepted:
            return cm
        why = cal.describe()
    else:  # target "here" with another machine class's profile: nothing of it can describe this device
        why = "another machine class: " + "; ".join(device.differences(cm.fingerprint, here)[:2])
    if warn:
        warnings.warn(f"Profile '{source}' does not describe this device ({why}); using this device's own profile "
                      f"instead (measured now if there is none yet: about a minute, cached in {cost.CACHE_DIR}).",
                      stacklevel=4)
    return _this_device(here)


def _mark_unverified(cm: CostModel, here: dict, source: str, warn: bool):
    cm.trust = "unverified"
    diffs = device.differences(cm.fingerprint, here)
    cm.match_note = (f"another device's profile, not checked here: predictions describe "
                     f"{device.describe(cm.fingerprint)}")
    if warn:
        _warn_once(("unverified", source, device.fingerprint_id(here)), (
            f"Profile '{source}' was measured on another device ({'; '.join(diffs[:3])}); planning for that device "
            f"as asked, so predicted times describe it and are not checked here (unverified)."), stacklevel=5)


def _auto(here: dict) -> CostModel:
    """The profile `auto` plans with on this device: one of this exact device, else a calibrated one of its
    class (closest first, at most MAX_CALIBRATIONS tried), else a quick profile measured now."""
    fid = device.fingerprint_id(here)
    if fid in _AUTO_CACHE:
        return _AUTO_CACHE[fid]
    candidates = _class_profiles(here)
    chosen = _exact(candidates, here)
    if chosen is None:
        candidates.sort(key=lambda cm: len(device.differences(cm.fingerprint, here)))
        for cm in candidates[:MAX_CALIBRATIONS]:
            if calibrate(cm, here).accepted:
                chosen = cm
                break
        if chosen is None:
            tried = "; ".join(f"'{cm.path}': {cm.calibration.describe()}" for cm in candidates[:MAX_CALIBRATIONS])
            warnings.warn(f"No profile describes this device ({device.describe(here)})"
                          + (f" (calibration refused {tried})" if tried else "")
                          + f"; measuring a quick one now and caching it in {cost.CACHE_DIR}.", stacklevel=3)
            chosen = _measure_here(here)
    _AUTO_CACHE[fid] = chosen
    return chosen


def _this_device(here: dict) -> CostModel:
    """This device's own profile: one `auto` already chose in this process, one measured earlier and cached
    under the full fingerprint, else a quick one measured now."""
    fid = device.fingerprint_id(here)
    if fid in _AUTO_CACHE and _AUTO_CACHE[fid].trust == "this device":
        return _AUTO_CACHE[fid]
    return _exact(_class_profiles(here), here) or _measure_here(here)


def _class_profiles(here: dict) -> List[CostModel]:
    """The profiles in `shipped_profiles()` of this device's machine class, loaded read-only (an
    unreadable one is skipped with a warning)."""
    out = []
    for path in shipped_profiles():
        try:
            cm = CostModel.load(path)
        except ProfileError as exc:
            warnings.warn(f"Skipping unreadable profile: {exc}", stacklevel=4)
            continue
        if device.same_class(cm.fingerprint, here):
            cm.read_only = True
            out.append(cm)
    return out


def _exact(profiles: List[CostModel], here: dict) -> Optional[CostModel]:
    """The first of `profiles` measured on this very device (trust "this device"), or None."""
    for cm in profiles:
        if device.same_device(cm.fingerprint, here):
            cm.trust = "this device"
            return cm
    return None


def _measure_here(here: dict) -> CostModel:
    """A quick profile of this device, measured now (progress bar) and saved in the user cache under the
    full fingerprint, where `auto` finds it as this device's next time (a cache that cannot be written
    costs a warning: the profile is used in this process only)."""
    cm = profiling.profile_device(mode="quick")
    path = cost.CACHE_DIR / f"auto-{device.slug(here)}.json"
    try:
        cm.save(path)
    except OSError as exc:
        warnings.warn(f"Could not save this device's profile to '{path}' ({exc}); it is used in this process only "
                      f"and measured again next time (set CONVREWRITE_CACHE to a writable folder).", stacklevel=4)
    cm.read_only = True
    cm.trust = "this device"
    _AUTO_CACHE[device.fingerprint_id(here)] = cm
    return cm


# ---- calibration --------------------------------------------------------------------------------
def _profile_key(cm: CostModel) -> str:
    """Identity of a calibration's inputs: the profile's numbers (fingerprint, fits, canaries, grid size),
    the canary set and tolerance this version uses, and its version; for the calibration cache."""
    from .version import __version__

    body = {"fingerprint": cm.fingerprint, "fits": sorted((k, v.weights) for k, v in cm.fits.items()),
            "canaries": cm.canaries, "n": len(cm.measurements), "tolerance": calib.CALIBRATION_TOLERANCE,
            "canary_set": [(s.to_json(), i) for s, i in calib.canary_pairs()], "version": __version__}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _calibration_cache(here: dict) -> Path:
    return cost.CACHE_DIR / "calibrations" / f"{device.fingerprint_id(here)}.json"


def calibrate(cm: CostModel, here: Optional[dict] = None, use_cache: bool = True) -> "calib.Calibration":
    """Time the canaries here and compare them with `cm` (see calibration.py); sets `cm.calibration` and
    `cm.trust` ("calibrated" if accepted), and `cm.match_note`. An acceptance is cached per (device,
    profile, canary set, tolerance, convrewrite version); a refusal is not."""
    here = here or device.fingerprint()
    path, key = _calibration_cache(here), _profile_key(cm)
    cached = _read_json(path) if use_cache else {}
    if key in cached:
        result = calib.Calibration.from_dict(cached[key])
    else:
        start = time.perf_counter()
        known = set(cm.fits) | {m["impl"] for m in cm.canaries} | {m["impl"] for m in cm.measurements}
        measured = profiling.time_canaries(allow=sorted(known), with_samples=True)  # what the profile speaks of
        result = calib.compare(cm, measured, time.perf_counter() - start, device.fingerprint_id(here))
        for _ in range(calib.CALIBRATION_RETIMES):  # not shown within: more samples before deciding
            again = calib.undecided(result)
            if not again:
                break
            measured = calib.pool_timings(measured, profiling.time_canaries(pairs=again, with_samples=True))
            result = calib.compare(cm, measured, time.perf_counter() - start, device.fingerprint_id(here))
        if result.accepted:  # a refusal is checked again next time (it may have met a busy machine)
            cached[key] = result.to_dict()
            _write_json(path, cached)
    cm.calibration = result
    if result.accepted:
        cm.trust = "calibrated"
        cm.match_note = (f"measured on {device.describe(cm.fingerprint)}; {result.describe()}")
        _supplement(cm, here, key)
        if cm.supplement:
            cm.match_note += f"; {cm.describe_supplement()}"
    else:
        cm.trust = "unverified"
        cm.match_note = f"measured on {device.describe(cm.fingerprint)}; {result.describe()}"
    return result


def missing_implementations(cm: CostModel, here: dict) -> List[str]:
    """Implementations chosen for speed that run on this device (`runs_on`) but that `cm` has no fit for (a
    profile measured before they existed, or on a device where they do not run: bfloat16 variants)."""
    out = []
    for name in implementations.names():
        impl = implementations.get(name)
        if impl.chosen_for_speed and name not in cm.fits and impl.runs_on(here)[0]:
            out.append(name)
    return out


def _supplement(cm: CostModel, here: dict, key: str):
    """Measure here what a calibrated profile lacks (`missing_implementations`): their canaries and the quick
    grid's specs they apply to, timed for them alone (cached per device and profile in the user cache), and
    add them to `cm` (`CostModel.add_supplement`), so that a calibrated profile never silently leaves out a
    choice this device offers."""
    missing = missing_implementations(cm, here)
    if not missing:
        return
    path = cost.CACHE_DIR / "supplements" / f"{device.fingerprint_id(here)}.json"
    cached = _read_json(path)
    entry = cached.get(key)
    if not entry or sorted(entry.get("implementations", ())) != sorted(missing):
        _warn_once(("supplement", key), (
            f"Profile '{cm.path or cm.name}' was calibrated here but has no timings of {', '.join(missing)}, which run "
            f"on this device; measuring them here now (cached in {cost.CACHE_DIR})."), stacklevel=5)
        start = time.perf_counter()
        specs = [spec for spec in profiling.grid("quick") if any(
            implementations.get(n).applicable(spec)[0] and implementations.get(n).profile_applicable(spec)
            for n in missing)]
        rows = profiling.time_grid(specs, missing, "measuring what the profile lacks")
        rows += profiling.time_canaries(allow=missing)
        entry = {"implementations": missing, "measurements": rows, "seconds": time.perf_counter() - start}
        cached[key] = entry
        _write_json(path, cached)
    cm.add_supplement(entry["implementations"], entry["measurements"], entry["seconds"])


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache, or an unreadable one: calibrate again (it is rewritten)


def _write_json(path: Path, data: dict):
    try:
        write_json_atomically(path, data)
    except OSError as exc:
        warnings.warn(f"Could not write the cache file '{path}' ({exc}); calibrating (and measuring what a profile "
                      f"lacks) again next time.", stacklevel=4)


# ---- tactic timing ------------------------------------------------------------------------------
def measure_tactics(cm: CostModel, specs, allow=None, batch: int = 8, progress: bool = True, save: bool = True,
                    memory_limit=None) -> CostModel:
    """Time every applicable implementation on these exact specs on this device and add the timings to
    `cm`'s tactic cache (see CostModel.record_tactics: keyed by this device's fingerprint, persisted in the
    profile file the user named, else in the user cache). Specs already timed on this device are not timed
    again. A profile of another device class is left as is (warning): this device's times would not
    describe the device planned for.

    allow: implementation names to time (default all applicable; `direct` always); batch: where a spec
    has none; memory_limit: bytes or "2GB": implementations estimated to need more are not timed."""
    limit = parse_memory_limit(memory_limit)
    here = device.fingerprint()
    if not device.same_class(cm.fingerprint, here):
        diffs = "; ".join(device.differences(cm.fingerprint, here)[:3])
        warnings.warn(
            f"measure=True times this device, but profile {cm.name!r}{f' ({cm.path})' if cm.path else ''} describes "
            f"another device ({diffs}); nothing is measured or written, and the plan uses that profile's "
            f"predictions for its device.", stacklevel=3)
        return cm
    timings = {}
    for spec in progress_bar(cm.untimed_specs(specs, batch), "measuring model specs", progress):
        names = [n for n in implementations.names() if allow is None or n in allow or n == "direct"]
        if limit is not None:
            names = [n for n in names if not constraint_violation(n, spec, limit)]
        timings[spec] = profiling.time_spec(spec, allow=names)
    return cm.record_tactics(timings, save=save)
