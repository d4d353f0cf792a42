"""Device fingerprints and measured cost models.

A CostModel predicts, per implementation, the seconds one call takes on a ConvSpec. The prediction is a
non-negative combination of the implementation's own features (`Implementation.features(spec)`: MACs
per kernel family, bytes moved, FFT work, per-call overhead), fitted on timings from `profile.py`.
Where the exact spec has been timed (the tactic cache filled by `measure_specs`), the timing wins.

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
import hashlib
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
VERSION = 2
"""2: the tactic cache ("measured") is keyed by device fingerprint. Version 1 files still load (see
`_migrate_v1`)."""
TACTICS_FORMAT = "convrewrite-tactics"
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


def _threads() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (taskset, cpusets, container
    CPU pinning), else all of the machine's. os.cpu_count() counts the machine's CPUs, which overstates a
    pinned process; TensorFlow sizes its CPU thread pools by the affinity mask too."""
    try:
        return len(os.sched_getaffinity(0)) or (os.cpu_count() or 1)
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def fingerprint() -> dict:
    """What a timing depends on: backend, device kind and name, threads (CPUs this process may use),
    library versions."""
    import keras

    fp = {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "arch": platform.machine(),
        "device_kind": "cpu",
        "device_name": _cpu_name(),
        "threads": _threads(),
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
    """Whether a profile describes this device's class: backend, device kind, architecture and thread
    count agree (and the GPU name on GPUs). CPU model and library versions may differ: see `exact_mismatch`."""
    here = here or fingerprint()
    keys = CLASS_KEYS + (("device_name",) if here.get("device_kind") != "cpu" else ())
    return all(profile_fp.get(k) == here.get(k) for k in keys)


EXACT_KEYS = ("device_name", "compute_capability", "tensorflow", "jax", "keras")
"""Keys beyond the class that a same-class profile may still differ in (CPU model, library versions)."""


def exact_mismatch(profile_fp: dict, here: Optional[dict] = None) -> Dict[str, tuple]:
    """{key: (profile's value, this device's)} for the non-class keys that differ."""
    here = here or fingerprint()
    return {k: (profile_fp.get(k), here.get(k)) for k in EXACT_KEYS if profile_fp.get(k) != here.get(k)}


def fingerprint_id(fp: dict) -> str:
    """A short stable id of a whole fingerprint (16 hex digits of the SHA-256 of its sorted JSON): the
    tactic cache's key, so a timing is reused only on the exact device and library versions that made it."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def tactic_cache_path(fp: Optional[dict] = None) -> Path:
    """The user-cache file holding this device's tactic timings measured with a shipped/`auto` profile."""
    return CACHE_DIR / "tactics" / f"{fingerprint_id(fp or fingerprint())}.json"


def _is_shipped(path: Path) -> bool:
    """Whether `path` lies in a folder of shipped (package, git-tracked) profiles: never written to."""
    try:
        path = Path(path).resolve()
    except OSError:
        return False
    return any(d.is_dir() and path.is_relative_to(d.resolve()) for d in SHIPPED_DIRS)


_WARNED = set()  # (kind, profile, device) already warned about in this process


def _warn_once(key, message: str, stacklevel: int = 3):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=stacklevel)


def _describe(fp: dict) -> str:
    return f"{fp.get('device_name')!r} ({fp.get('arch')}, {fp.get('threads')} threads)"


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

    Attributes: fingerprint (dict, the device the profile measured), measurements (list of {"spec",
    "impl", "seconds"}), fits ({impl: ImplFit}), measured (the tactic cache: {fingerprint id:
    {"fingerprint": dict, "timings": {spec json: {impl: seconds}}}}), validation (dict), read_only (True:
    tactic timings go to the user cache, not to `path`; set for shipped and `auto`-chosen profiles),
    match_note (set by `resolve` where the profile is another device's: shown in plan summaries).
    """

    def __init__(self, fingerprint: dict, measurements=None, fits=None, measured=None, validation=None,
                 name: Optional[str] = None, path: Optional[Path] = None, mode: str = "", read_only: bool = False):
        self.fingerprint = fingerprint
        self.measurements = list(measurements or [])
        self.fits: Dict[str, ImplFit] = dict(fits or {})
        self.measured: Dict[str, dict] = {k: {"fingerprint": v["fingerprint"], "timings": dict(v["timings"])}
                                          for k, v in (measured or {}).items()}
        self.validation = dict(validation or {})
        self.name = name or fingerprint.get("device_name", "device")
        self.path = Path(path) if path else None
        self.mode = mode
        self.read_only = read_only
        self.match_note: Optional[str] = None
        self._user_cache_read = set()  # fingerprint ids whose user-cache file was merged in

    # -- prediction --
    def predict_seconds(self, impl_name: str, spec: ConvSpec) -> Optional[float]:
        """Seconds per call: a timing where this exact spec was measured (this device's tactic cache, or
        the profile's own grid), else the fitted model."""
        if spec.height is None or spec.width is None:
            return None
        spec = spec if spec.batch else spec.with_input(batch=1)
        key = _spec_key(spec)
        for table in (self.tactics(), self._profiled()):
            if impl_name in table.get(key, {}):
                return table[key][impl_name]
        fit = self.fits.get(impl_name)
        if fit is None:
            return None
        impl = implementations.get(impl_name)
        ok, _ = impl.applicable(spec)
        if not ok:
            return None
        return max(fit.predict(regression_terms(impl, spec)), 1e-7)

    def tactics(self, here: Optional[dict] = None) -> Dict[str, Dict[str, float]]:
        """This device's tactic timings ({spec json: {impl: seconds}}), or {} where the profile describes
        another device class: there they would mix this device's times into another device's plan."""
        here = here or fingerprint()
        if not same_class(self.fingerprint, here):
            return {}
        return self._tactic_entry(here)["timings"]

    def _tactic_entry(self, here: dict) -> dict:
        fid = fingerprint_id(here)
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
            measured = {fingerprint_id(v["fingerprint"]): v for v in data.get("measured", {}).values()}
            cm = cls(data["fingerprint"], data.get("measurements", []), fits, measured,
                     data.get("validation", {}), data.get("name"), path, data.get("mode", ""),
                     read_only=_is_shipped(path))
            cm._check_fit_features(path)
            cm._refit_if_features_changed()
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

    # -- measured mode --
    def measure_specs(self, specs, allow=None, batch: int = 8, progress: bool = True, save: bool = True,
                      memory_limit=None):
        """Time every applicable implementation on these exact specs on this device (the tactic cache),
        keyed by this device's fingerprint, and persist it: in this profile's file if the user named it,
        else (shipped or `auto` profiles, or none) in `tactic_cache_path()`. Specs already timed on this
        device are not measured again; specs with unknown spatial size are skipped. A profile of another
        device class is left as is (warning): this device's times would not describe the device planned for.
        allow: implementation names to time (default all applicable); batch: where a spec has none;
        memory_limit: bytes or "2GB": implementations estimated to need more are not timed (see planner)."""
        from .planner import constraint_violation, parse_memory_limit
        from .profile import time_spec

        limit = parse_memory_limit(memory_limit)
        here = fingerprint()
        if not same_class(self.fingerprint, here):
            diffs = "; ".join(fingerprint_mismatch(self.fingerprint, here)[:3])
            warnings.warn(
                f"measure=True times this device, but profile {self.name!r}"
                f"{f' ({self.path})' if self.path else ''} describes another device ({diffs}); nothing is "
                f"measured or written, and the plan uses that profile's predictions for its device.", stacklevel=3)
            return self
        timings = self._tactic_entry(here)["timings"]
        todo = []
        for spec in dict.fromkeys(specs):
            if spec.height is None or spec.width is None:
                continue
            spec = spec.with_input(batch=spec.batch or batch)
            if _spec_key(spec) not in timings:
                todo.append(spec)
        for spec in _progress(todo, "measuring model specs", progress):
            names = [n for n in implementations.names() if allow is None or n in allow or n == "direct"]
            if limit is not None:
                names = [n for n in names if not constraint_violation(n, spec, limit)]
            timings[_spec_key(spec)] = time_spec(spec, allow=names)
        if todo and save:
            self._save_tactics(here)
        return self

    def _save_tactics(self, here: dict):
        """Persist this device's tactic timings: into this profile's file (merged with what other
        processes wrote there since it was loaded) or into the user cache file."""
        fid = fingerprint_id(here)
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
        return {fingerprint_id(v["fingerprint"]): v for v in data["measured"].values()}
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
    for key in ("backend", "device_kind", "device_name", "arch"):
        if key in fp and not isinstance(fp[key], str):
            raise _bad(path, f'"fingerprint"."{key}"', "a string", fp[key])
    if "threads" in fp and not (isinstance(fp["threads"], int) and not isinstance(fp["threads"], bool)):
        raise _bad(path, '"fingerprint"."threads"', "an integer", fp["threads"])
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
        if not isinstance(weights, list) or len(weights) != len(feats) or not all(_number(w) for w in weights):
            raise _bad(path, f'"fits"."{name}"."weights"', f"a list of {len(feats)} finite numbers, one per feature", weights)
    rows = data.get("measurements", [])
    if not isinstance(rows, list):
        raise _bad(path, '"measurements"', 'a list of {"spec", "impl", "seconds"}', rows)
    for i, m in enumerate(rows):
        if not (isinstance(m, dict) and isinstance(m.get("spec"), str) and isinstance(m.get("impl"), str)
                and _number(m.get("seconds")) and m["seconds"] > 0):
            raise _bad(path, f'"measurements"[{i}]', 'an object {"spec": ConvSpec JSON, "impl": name, "seconds": > 0}', m)
        _check_spec(m["spec"], path, f'"measurements"[{i}]."spec"')
    if not isinstance(data.get("validation", {}), dict):
        raise _bad(path, '"validation"', "an object", data.get("validation"))
    _check_measured(data.get("measured", {}), path)


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

    "auto": a profile of this device's class (backend, device kind, arch, threads) from the shipped
    folders, CONVREWRITE_COST_MODELS or the user cache, preferring one of this exact device (CPU model and
    library versions too); if there is none, a quick profile is measured now (about a minute) and cached,
    never a different class's numbers. A class profile measured on another CPU model (or other library
    versions) is used with one warning per process naming both, and a note in plan summaries.
    The profile `auto` returns is read-only: measure=True timings go to the user cache.
    A profile named explicitly is used even if it describes another device (converting for a target
    device), with a warning saying so.
    """
    if cost_model is None or hasattr(cost_model, "predict_ms"):
        return cost_model  # a CostModel, or any object predicting milliseconds per (implementation, spec)
    here = fingerprint()
    if cost_model == "auto":
        key = json.dumps({k: here.get(k) for k in CLASS_KEYS}, sort_keys=True)
        if key in _AUTO_CACHE:
            return _AUTO_CACHE[key]
        matches = []
        for path in shipped_profiles():
            try:
                cm = CostModel.load(path)
            except ProfileError as exc:
                warnings.warn(f"Skipping unreadable profile: {exc}", stacklevel=2)
                continue
            if same_class(cm.fingerprint, here):
                matches.append(cm)
        if matches:
            cm = min(matches, key=lambda m: len(exact_mismatch(m.fingerprint, here)))  # exact device first
            cm.read_only = True
            _note_class_match(cm, here, "auto")
            _AUTO_CACHE[key] = cm
            return cm
        warnings.warn(
            f"No profile for this device ({here['device_kind']} {here['device_name']!r}, {here['threads']} threads); "
            f"measuring a quick one now and caching it in {CACHE_DIR}.", stacklevel=2)
        from .profile import profile_device

        cm = profile_device(mode="quick")
        cm.save(CACHE_DIR / f"auto-{here['arch']}-{here['device_kind']}-{here['threads']}t.json")
        cm.read_only = True
        _AUTO_CACHE[key] = cm
        return cm
    cm = CostModel.load(cost_model)
    if not same_class(cm.fingerprint, here):
        diffs = "; ".join(fingerprint_mismatch(cm.fingerprint, here)[:3])
        cm.match_note = f"another device's profile: predictions describe {_describe(cm.fingerprint)}, not this device"
        if warn:
            warnings.warn(
                f"Profile '{cost_model}' was measured on another device ({diffs}); planning for that device as "
                f"asked, so predicted times describe it, not this one.", stacklevel=2)
    else:
        _note_class_match(cm, here, str(cost_model), warn)
    return cm


def _note_class_match(cm: CostModel, here: dict, source: str, warn: bool = True):
    """Where a same-class profile was measured on another CPU model / GPU or with other library versions:
    set `cm.match_note` (plan summaries show it) and warn once per process, naming both sides."""
    diff = exact_mismatch(cm.fingerprint, here)
    if not diff:
        return
    parts = [f"{k} {a!r} there, {b!r} here" for k, (a, b) in diff.items() if k != "device_name"]
    there, mine = cm.fingerprint.get("device_name"), here.get("device_name")
    device = f"measured on {there!r}, this device is {mine!r}" if there != mine else f"measured on this device model {mine!r}"
    cm.match_note = f"class match: {device}" + (f" ({'; '.join(parts)})" if parts else "")
    where = f"'{cm.path}'" if cm.path else repr(cm.name)
    if warn:
        _warn_once(("class", str(cm.path), fingerprint_id(here)), (
            f"Using profile {where} ({source}) for this device's class ({here.get('backend')} {here.get('device_kind')}, "
            f"{here.get('arch')}, {here.get('threads')} threads): it was {device}"
            + (f"; {'; '.join(parts)}" if parts else "")
            + ". Its predictions describe that device and may rank implementations differently here; "
            "`convrewrite profile -o FILE` (or convrewrite.profile_device()) measures this exact device: pass "
            f"cost_model=FILE, or save it in {CACHE_DIR} where 'auto' prefers it."), stacklevel=4)


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
