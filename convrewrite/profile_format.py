"""The profile file format: versions, field-by-field validation, migration, atomic writes, tactic files.

Described for users in `cost_models/README.md`. A hand-edited, truncated or foreign file fails here with
the file and the field named, never later with a wrong prediction.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Dict

from . import device
from .errors import ProfileError
from .spec import ConvSpec

FORMAT = "convrewrite-profile"


VERSION = 4
"""4: an optional "training" section (forward + backward timings and their fits: `convrewrite profile
--training`), which `plan(mode="training")` predicts from. 3: the fingerprint records the hardware ("hardware") and kernel settings, and the profile carries its
canaries ("canaries": timings of `calibration.canary_pairs()` measured with the grid). 2: the tactic cache
("measured") is keyed by device fingerprint. Versions 1 and 2 still load: version 2 as "hardware
unknown" with no canaries (calibration then compares against the fit), version 1 through `migrate_v1`;
versions before 4 have no training section."""


TACTICS_FORMAT = "convrewrite-tactics"


REQUIRED_FINGERPRINT_KEYS = ("backend", "device_kind", "arch", "threads")
"""What a profile must say of its device for `auto` to decide whether it could describe this one."""


def write_json_atomically(path, data) -> Path:
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


def read_tactic_file(path: Path) -> Dict[str, dict]:
    """{fingerprint id: entry} from a user-cache tactic file; {} where there is none. An unreadable
    file only costs re-measuring, so it is reported and ignored (it is rewritten on the next save)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != TACTICS_FORMAT:
            raise ValueError(f"no \"format\": \"{TACTICS_FORMAT}\"")
        check_measured(data.get("measured"), path)
        return {device.fingerprint_id(v["fingerprint"]): v for v in data["measured"].values()}
    except (OSError, UnicodeDecodeError, ValueError, ProfileError) as exc:
        warnings.warn(f"Ignoring unreadable tactic cache '{path}' ({exc}); its specs are measured again.", stacklevel=4)
        return {}


def migrate_v1(data: dict, path) -> dict:
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


def check_profile(data: dict, path):
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
    _check_fits(fits, path, '"fits"')
    for field in ("measurements", "canaries"):
        _check_rows(data.get(field, []), path, f'"{field}"')
    if not isinstance(data.get("validation", {}), dict):
        raise _bad(path, '"validation"', "an object", data.get("validation"))
    check_measured(data.get("measured", {}), path)
    check_training(data.get("training"), path)
    if not fits and not data.get("measurements"):
        raise ProfileError(f"Profile '{path}' has no fits and no measurements, so it predicts nothing; re-create it "
                           f"with `convrewrite profile`.")


def _check_fits(fits, path, field: str):
    """{implementation: fit} as ImplFit stores it; `field` names it in the error ('"fits"')."""
    if not isinstance(fits, dict):
        raise _bad(path, field, "an object {implementation: fit}", fits)
    for name, fit in fits.items():
        if not isinstance(fit, dict):
            raise _bad(path, f'{field}."{name}"', 'an object {"features", "weights", "n_samples", "median_rel_error"}', fit)
        feats, weights = fit.get("features"), fit.get("weights")
        if not isinstance(feats, list) or not all(isinstance(f, str) for f in feats):
            raise _bad(path, f'{field}."{name}"."features"', "a list of feature names", feats)
        if not isinstance(weights, list) or len(weights) != len(feats) or not all(_number(w) and w >= 0 for w in weights):
            raise _bad(path, f'{field}."{name}"."weights"', f"a list of {len(feats)} finite numbers >= 0, one per feature", weights)
        for key in ("median_rel_error", "p90_rel_error"):
            if fit.get(key) is not None and not (_number(fit[key]) and fit[key] >= 0):
                raise _bad(path, f'{field}."{name}"."{key}"', "a finite number >= 0", fit[key])
        if not (isinstance(fit.get("n_samples"), int) and fit["n_samples"] >= 0):
            raise _bad(path, f'{field}."{name}"."n_samples"', "an integer >= 0", fit.get("n_samples"))


def _check_rows(rows, path, field: str):
    """A list of timings {"spec", "impl", "seconds"}; `field` names it in the error ('"measurements"')."""
    if not isinstance(rows, list):
        raise _bad(path, field, 'a list of {"spec", "impl", "seconds"}', rows)
    for i, m in enumerate(rows):
        if not (isinstance(m, dict) and isinstance(m.get("spec"), str) and isinstance(m.get("impl"), str)
                and _number(m.get("seconds")) and m["seconds"] > 0):
            raise _bad(path, f'{field}[{i}]', 'an object {"spec": ConvSpec JSON, "impl": name, "seconds": > 0}', m)
        _check_spec(m["spec"], path, f'{field}[{i}]."spec"')


def check_training(section, path):
    """The optional training section (version 4): {"measurements": [forward + backward timings], "fits":
    {implementation: fit}, "validation": {...}}, checked like the inference fields; None where absent."""
    if section is None:
        return
    if not isinstance(section, dict):
        raise _bad(path, '"training"', 'an object {"measurements", "fits", "validation"} (forward + backward timings)', section)
    _check_rows(section.get("measurements", []), path, '"training"."measurements"')
    _check_fits(section.get("fits", {}), path, '"training"."fits"')
    if not isinstance(section.get("validation", {}), dict):
        raise _bad(path, '"training"."validation"', "an object", section.get("validation"))


def _check_spec(text, path, field):
    try:
        ConvSpec.from_json(text)
    except Exception as exc:  # whatever ConvSpec rejects, the file is what is wrong
        raise ProfileError(f"Profile '{path}' has {field} = {text[:60]!r}, which is not a ConvSpec JSON ({exc}); "
                           f"re-create it with `convrewrite profile`.") from None


def check_measured(measured, path):
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
