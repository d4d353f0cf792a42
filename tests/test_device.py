"""Device trust: a fingerprint that tells hardware apart, calibration of profiles measured elsewhere,
provenance of every prediction, and the measured speed check of optimize. No test asserts a time: timers
are replaced where a test needs timings of a given size."""

import copy
import json
import re
import warnings

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import calibration, cost, device, implementations, profiles
from convrewrite import profile as profiling
from convrewrite.cost import CostModel
from convrewrite.spec import ConvSpec
from conftest import host_sleep, with_native_bf16


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """A user cache of each test's own, no shipped profiles unless a test puts some there, fresh registries."""
    monkeypatch.setattr(cost, "CACHE_DIR", tmp_path_factory.mktemp("user-cache"))
    monkeypatch.setattr(cost, "SHIPPED_DIRS", [tmp_path_factory.mktemp("shipped")])
    monkeypatch.setattr(profiles, "_AUTO_CACHE", {})
    monkeypatch.setattr(profiles, "_WARNED", set())
    monkeypatch.delenv("CONVREWRITE_COST_MODELS", raising=False)


def _spec(**kw):
    base = dict(kind="conv2d", in_channels=8, filters=8, kernel=(3, 3), height=16, width=16, batch=2, padding="same")
    return ConvSpec(**{**base, **kw})


def _model():
    x = keras.Input((20, 20, 8))
    y = keras.layers.Conv2D(8, 3, padding="same", groups=8, name="g")(x)
    y = keras.layers.Conv2D(8, 5, padding="same", name="d")(y)
    return keras.Model(x, y)


def _rows(seconds_by_impl, specs):
    return [{"spec": s.to_json(), "impl": i, "seconds": t} for s in specs for i, t in seconds_by_impl.items()
            if implementations.get(i).applicable(s)[0]]


@pytest.fixture(scope="module")
def canary_rows():
    """Canary timings as a profile measured on "its" device stores them (invented, so no test depends on
    this machine's speed): every canary pair at 2 ms, except depthwise-kind work at 1 ms."""
    return [{"spec": s.to_json(), "impl": i, "seconds": 1e-3 if "dw" in s.short() else 2e-3}
            for s, i in calibration.canary_pairs() if i != "pac"]


def _other_device_profile(canary_rows, **fp_changes):
    """A profile of this machine class measured on other hardware, with fits and canaries."""
    here = device.fingerprint()
    fp = copy.deepcopy(here)
    fp["hardware"]["cpu"]["model"] = _another_value(here["hardware"]["cpu"]["model"])
    fp.update(fp_changes)
    specs = [_spec(), _spec(kernel=(5, 5)), _spec(kernel=(7, 7), height=24, width=24), _spec(groups=8),
             _spec(groups=8, kernel=(5, 5)), _spec(groups=8, height=24, width=24), _spec(in_channels=16, filters=16)]
    rows = _rows({"direct": 2e-3, "depthwise": 1e-3, "fft": 3e-3, "fft-tiled": 4e-3}, specs)
    cm = CostModel(fp, rows, name="elsewhere", canaries=canary_rows)
    return cm.fit(holdout=0)


def _fake_timer(canary_rows, scale, calls):
    """A stand-in for profile.time_spec_samples: the canaries' stored timings x scale (what this device
    "measures"), each sample alike."""
    table = {(r["spec"], r["impl"]): r["seconds"] for r in canary_rows}

    def fake(spec, allow=None, repeats=3, **kw):
        calls.append((spec, tuple(allow or ())))
        out = {}
        for name in allow or implementations.names():
            if (spec.to_json(), name) in table:
                value = table[(spec.to_json(), name)] * (scale(name, spec) if callable(scale) else scale)
                out[name] = [value] * repeats
        return out

    return fake


def _another_value(value) -> str:
    """A CPU family / model / stepping that is not `value`, whatever CPU runs the suite."""
    return next(v for v in ("25", "6", "23", "0") if v != str(value))


# ---- fingerprint ----------------------------------------------------------------------------------
def test_fingerprint_identifies_hardware_not_the_name():
    here = device.fingerprint()
    cpu = here["hardware"]["cpu"]
    for key in ("vendor", "family", "model", "stepping", "isa", "cache_kib"):
        assert key in cpu
    assert "TF_ENABLE_ONEDNN_OPTS" in here["settings"]
    assert device.same_device(here, copy.deepcopy(here))
    other_family = copy.deepcopy(here)
    other_family["hardware"]["cpu"]["family"] = _another_value(cpu["family"])  # never this CPU's own family
    assert not device.same_device(other_family, here) and device.same_class(other_family, here)
    one_flag = copy.deepcopy(here)
    one_flag["hardware"]["cpu"]["isa"] = sorted(set(cpu["isa"]) ^ {"avx512f"})  # with or without AVX-512
    assert not device.same_device(one_flag, here)
    assert any("avx512f" in d for d in device.differences(one_flag, here))
    onednn_off = copy.deepcopy(here)
    onednn_off["settings"]["TF_ENABLE_ONEDNN_OPTS"] = "0"
    assert not device.same_device(onednn_off, here)
    assert device.fingerprint_id(one_flag) != device.fingerprint_id(here)
    assert cpu["vendor"] in device.describe(here) and "threads" in device.describe(here)


@pytest.mark.parametrize("name", sorted(device.SIMULATED_DEVICES))
def test_a_simulated_device_is_what_convrewrite_sees(name, monkeypatch):
    """CONVREWRITE_SIMULATE_DEVICE puts a description over this device's fingerprint: another device (never
    this machine's caches), with the native precisions and machine class the description says."""
    from convrewrite import precision

    monkeypatch.delenv(device.SIMULATE_ENV, raising=False)
    real = device.fingerprint()
    monkeypatch.setenv(device.SIMULATE_ENV, name)
    fp = device.fingerprint()
    fields = device.SIMULATED_DEVICES[name]
    assert fp["simulated"] == name and f"(simulated: {name})" in device.describe(fp)
    assert device.fingerprint_id(fp) != device.fingerprint_id(real)
    for key in ("threads", "device_kind", "device_name", "compute_capability"):
        if key in fields:
            assert fp[key] == fields[key]
    for key, value in fields.get("hardware", {}).get("cpu", {}).items():
        assert fp["hardware"]["cpu"][key] == value
    bf16 = {"amd-zen4": True, "avx2-no-bf16": False, "gpu": True}.get(name, "bfloat16" in precision.native_precisions(real))
    assert ("bfloat16" in precision.native_precisions(fp)) == bf16
    assert implementations.get("direct-bf16").runs_on(fp)[0] == bf16
    assert device.same_class(fp, real) == (name in ("amd-zen4", "avx2-no-bf16"))


def test_a_simulated_device_from_a_file_and_a_bad_name(tmp_path, monkeypatch):
    path = tmp_path / "pinned.json"
    path.write_text(json.dumps({"threads": 3, "hardware": {"cpu": {"isa": ["avx2"]}}}))
    monkeypatch.setenv(device.SIMULATE_ENV, str(path))
    fp = device.fingerprint()
    assert fp["threads"] == 3 and fp["hardware"]["cpu"]["isa"] == ["avx2"] and fp["simulated"] == "pinned"
    assert fp["hardware"]["cpu"]["vendor"] == device.cpu_hardware()["vendor"]  # the rest is this device's
    for value, match in (("zen9", "expected one of"), (str(tmp_path / "missing.json"), "expected one of"),
                         ("[]", "expected one of")):
        monkeypatch.setenv(device.SIMULATE_ENV, value)
        with pytest.raises(ValueError, match=re.escape(f"CONVREWRITE_SIMULATE_DEVICE={value!r}") + f".*{match}"):
            device.fingerprint()
    path.write_text("[1, 2]")
    monkeypatch.setenv(device.SIMULATE_ENV, str(path))
    with pytest.raises(ValueError, match="a JSON list; expected an object"):
        device.fingerprint()


def test_profiles_without_hardware_load_as_hardware_unknown(tmp_path, canary_rows):
    old = _other_device_profile(canary_rows)
    data = old.to_dict()
    data["version"] = 2
    del data["canaries"]
    data["fingerprint"] = {k: v for k, v in data["fingerprint"].items() if k not in ("hardware", "settings")}
    data["fingerprint"]["device_name"] = device.fingerprint()["device_name"]  # the same marketing name
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(data))
    cm = CostModel.load(path)
    assert not device.hardware_known(cm.fingerprint)
    assert not device.same_device(cm.fingerprint, device.fingerprint())  # the same name is not the same device
    assert "hardware unknown" in device.describe(cm.fingerprint)
    assert all(f.p90_rel_error is not None for f in cm.fits.values())  # bands computed for old fits
    assert cm.canaries == [] and cm.trust == "unverified"


# ---- calibration ----------------------------------------------------------------------------------
def test_auto_refuses_a_profile_whose_canaries_are_3x_off_and_measures_this_device(tmp_path, canary_rows, monkeypatch):
    _other_device_profile(canary_rows).save(cost.SHIPPED_DIRS[0] / "elsewhere.json")
    calls, measured = [], []
    monkeypatch.setattr(profiling, "time_spec_samples", _fake_timer(canary_rows, 3.0, calls))

    def quick_profile(mode="quick", **kw):
        measured.append(mode)
        return CostModel(device.fingerprint(), [], _other_device_profile(canary_rows).fits, name="measured here")

    monkeypatch.setattr(profiling, "profile_device", quick_profile)
    with pytest.warns(UserWarning, match=r"calibration refused .*3\.00x \[3\.00, 3\.00\], tolerance 1\.5x.*measuring a quick one"):
        cm = profiles.resolve("auto")
    assert measured == ["quick"] and cm.name == "measured here" and cm.trust == "this device"
    assert {impl for _, allow in calls for impl in allow} >= {"direct", "fft"}  # the canaries were timed
    # the measured profile is cached under the full fingerprint and found as this device's next time
    monkeypatch.setattr(profiles, "_AUTO_CACHE", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = profiles.resolve("auto")
    assert again.name == "measured here" and measured == ["quick"]


def test_auto_accepts_a_profile_whose_canaries_agree_and_scales_its_predictions(canary_rows, monkeypatch):
    _other_device_profile(canary_rows).save(cost.SHIPPED_DIRS[0] / "elsewhere.json")
    calls = []
    # this device: direct 1.2x slower than the profile says, everything else as the profile says
    monkeypatch.setattr(profiling, "time_spec_samples",
                        _fake_timer(canary_rows, lambda impl, spec: 1.2 if impl == "direct" else 1.0, calls))
    monkeypatch.setattr(profiling, "profile_device", lambda **kw: pytest.fail("a good profile must not be re-measured"))
    cm = profiles.resolve("auto")
    assert cm.trust == "calibrated" and cm.calibration.accepted
    assert cm.calibration.scale("direct") == pytest.approx(1.2) and cm.calibration.scale("fft") == pytest.approx(1.0)
    spec = _spec(kernel=(7, 7), height=24, width=24)
    unscaled = CostModel.load(cost.SHIPPED_DIRS[0] / "elsewhere.json")
    p = cm.prediction("direct", spec)
    assert p.source == "calibrated timing" and p.ms == pytest.approx(1.2 * 1e3 * unscaled.profile_seconds("direct", spec))
    # provenance in the plan: summary and JSON
    plan = convrewrite.plan(_model(), cost_model=cm)
    tail = plan.summary().splitlines()[-1]
    assert "predicted conv time" in tail and "+-" in tail and "calibrated" in tail
    data = json.loads(plan.to_json())
    assert data["trust"] == "calibrated" and data["calibration"]["accepted"]
    assert data["predicted_speedup"]["band"] is not None and data["predicted_speedup"]["sources"]
    row = data["rows"][0]
    assert row["provenance"][row["choice"]]["source"].startswith("calibrated")
    # calibrated once per (device, profile): a new process reads the cached calibration, times nothing
    n = len(calls)
    monkeypatch.setattr(profiles, "_AUTO_CACHE", {})
    assert profiles.resolve("auto").trust == "calibrated" and len(calls) == n


def test_one_noisy_canary_is_timed_again_before_refusing(canary_rows, monkeypatch):
    cm = _other_device_profile(canary_rows)
    first = {"noisy": True}
    calls = []

    def scale(impl, spec):
        if impl == "depthwise" and first["noisy"]:
            first["noisy"] = False
            return 4.0  # one slow sample, as on a busy shared machine
        return 1.0

    monkeypatch.setattr(profiling, "time_spec_samples", _fake_timer(canary_rows, scale, calls))
    result = profiles.calibrate(cm)
    assert result.accepted
    timed = [impl for _, allow in calls for impl in allow]
    assert 2 <= timed.count("depthwise") <= 1 + calibration.CALIBRATION_RETIMES
    assert timed.count("direct") == sum(impl == "direct" for _, impl in calibration.canary_pairs())  # once each


@pytest.mark.parametrize("true_ratio,accepted", [(1.5, True), (3.0, False), (1.2, True)])
def test_calibration_decides_the_same_run_after_run_on_noisy_canaries(true_ratio, accepted, canary_rows, monkeypatch):
    """Five calibrations on a noisy machine (each sample +-25%, a fresh seed each run): a device exactly at
    the tolerance is never refused (no canary is shown outside it), one 3x off always is."""
    decisions = []
    for run in range(5):
        rng = np.random.default_rng(run)
        table = {(r["spec"], r["impl"]): r["seconds"] for r in canary_rows}

        def noisy(spec, allow=None, repeats=3, **kw):
            return {name: [table[(spec.to_json(), name)] * true_ratio * float(rng.uniform(0.75, 1.25))
                           for _ in range(repeats)]
                    for name in allow or () if (spec.to_json(), name) in table}

        monkeypatch.setattr(profiling, "time_spec_samples", noisy)
        result = profiles.calibrate(_other_device_profile(canary_rows), use_cache=False)
        decisions.append(result.accepted)
        assert all(c["interval"][0] <= c["ratio"] <= c["interval"][1] for c in result.canaries)
    assert decisions == [accepted] * 5


@pytest.mark.parametrize("has_bf16", [True, False])
def test_a_calibrated_profile_is_completed_with_what_it_lacks_here(has_bf16, canary_rows, monkeypatch):
    """A profile without bfloat16 timings, calibrated on a CPU with bf16 units: the bf16 variants (and every
    implementation the profile has no fit for) are measured here, canaries and quick grid, predicted from
    those timings with provenance saying so, and cached: an rtol plan gets its bf16 sites. On a CPU without
    bf16 nothing bf16 is measured."""
    here = with_native_bf16(device.fingerprint(), has_bf16)
    monkeypatch.setattr(device, "fingerprint", lambda: copy.deepcopy(here))
    _other_device_profile(canary_rows).save(cost.SHIPPED_DIRS[0] / "elsewhere.json")
    table = {(r["spec"], r["impl"]): r["seconds"] for r in canary_rows}
    timed = []

    def timer(spec, allow=None, repeats=3, **kw):  # canaries as the profile says; bf16 4x faster than direct
        timed.extend((spec, name) for name in allow or ())
        out = {}
        for name in allow or implementations.names():
            if implementations.get(name).applicable(spec)[0]:
                out[name] = [table.get((spec.to_json(), name), 5e-4 if "bf16" in name else 2e-3)] * repeats
        return out

    monkeypatch.setattr(profiling, "time_spec_samples", timer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = profiles.resolve("auto")
    assert cm.trust == "calibrated" and cm.supplement is not None
    measured = set(cm.supplement["implementations"])
    assert measured == set(profiles.missing_implementations(_other_device_profile(canary_rows), here))
    assert ("direct-bf16" in measured) == has_bf16 and "fft-matmul" in measured and "pac" not in measured
    assert "direct" in cm.fits and not measured & set(cm.fits)  # what the profile fits stays the profile's
    assert {name for _, name in timed} >= measured
    assert any("has no timings of" in str(w.message) for w in caught)
    assert "measured here, not in the profile" in cm.match_note
    x = keras.Input((20, 20, 8))
    model = keras.Model(x, keras.layers.Conv2D(8, 3, padding="same", name="d")(x))
    plan = convrewrite.plan(model, cost_model=cm, rtol=1e-2)
    row = plan.row("d")
    if has_bf16:
        assert row.choice == "direct-bf16"
        assert row.provenance["direct-bf16"]["source"] in CostModel.SUPPLEMENT_SOURCES
        assert row.provenance["direct"]["source"].startswith("calibrated")
    else:
        assert row.choice == "direct" and "direct-bf16" not in row.predicted_ms
    # a new process: the calibration and what was measured beside it come from the user cache
    n = len(timed)
    monkeypatch.setattr(profiles, "_AUTO_CACHE", {})
    again = profiles.resolve("auto")
    assert len(timed) == n and set(again.supplement["implementations"]) == measured


def test_target_other_never_times_anything_here(tmp_path, canary_rows, monkeypatch):
    path = _other_device_profile(canary_rows).save(tmp_path / "server.json")
    monkeypatch.setattr(profiling, "time_spec_samples", lambda *a, **k: pytest.fail("timed on the converting machine"))
    monkeypatch.setattr(profiling, "profile_device", lambda *a, **k: pytest.fail("measured the converting machine"))
    with pytest.warns(UserWarning, match="unverified"):
        fast = convrewrite.optimize(_model(), cost_model=str(path), target="other", check_speed=True)
    plan = fast.convrewrite_plan
    assert plan.trust == "unverified" and "unverified" in plan.summary().splitlines()[-1]
    assert fast.convrewrite_speed.measured is None and "another device's" in fast.convrewrite_speed.not_measured
    assert not list(cost.CACHE_DIR.rglob("*.json"))  # no calibration, profile or timing cached here
    with pytest.raises(convrewrite.ProfileError, match="target='other'"):
        convrewrite.plan(_model(), cost_model="auto", target="other")


def test_a_named_profile_for_this_device_is_calibrated_too(tmp_path, canary_rows, monkeypatch):
    path = _other_device_profile(canary_rows).save(tmp_path / "colleague.json")
    monkeypatch.setattr(profiling, "time_spec_samples", _fake_timer(canary_rows, 1.0, []))
    cm = profiles.resolve(str(path))
    assert cm.trust == "calibrated"


# ---- the speed check --------------------------------------------------------------------------------
class _SleepyConv(keras.layers.Conv2D):
    """Conv2D that also sleeps 20 ms per call: a replacement that is deliberately slow."""

    def call(self, x):
        y = super().call(x)
        return host_sleep(y, 0.02) + 0 * y


class _Sleepy(implementations.Implementation):
    name = "sleepy"
    description = "test-only: Keras's Conv2D plus a 20 ms sleep"
    layer_classes = (_SleepyConv,)

    def applicable(self, spec):
        return (spec.kind == "conv2d" and spec.groups == 1), "dense Conv2D only"

    def make_layer(self, layer, spec, **options):
        extra = getattr(layer, "convrewrite_extra_config", ())  # an FFT layer's own options (tile_size, transform)
        config = {k: v for k, v in layer.get_config().items() if k not in extra}
        return _SleepyConv.from_config(config)


@pytest.fixture
def sleepy():
    implementations.register(_Sleepy())
    yield
    implementations.unregister("sleepy")


class _BelievesSleepyIsFast:
    """A cost model that predicts the sleepy implementation 4x faster than direct."""

    name = "optimist"

    def predict_ms(self, impl, spec):
        return {"direct": 4.0, "sleepy": 1.0}.get(impl)


def test_speed_check_replans_from_real_timings_when_the_optimized_model_is_slower(sleepy):
    model = _model()
    fast = convrewrite.optimize(model, cost_model=_BelievesSleepyIsFast(), allow=["direct", "sleepy"], check_speed=True)
    speed = fast.convrewrite_speed
    assert fast.convrewrite_plan.row("d").choice == "direct"  # the slow replacement did not survive
    assert speed.history and speed.history[0]["measured"] < 1  # the first plan measured slower ...
    assert "re-planned" in speed.action  # ... so the replaced site was timed here and re-planned
    assert fast.convrewrite_plan.row("d").provenance["sleepy"]["source"] == "timed here"
    assert fast.convrewrite_report.speed["action"] == speed.action
    assert "speed: " in fast.convrewrite_report.summary()
    x = np.random.default_rng(0).standard_normal((2, 20, 20, 8)).astype("float32")
    np.testing.assert_allclose(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_speed_check_keeps_the_original_implementations_of_a_given_plan(sleepy):
    model = _model()
    plan = convrewrite.plan(model, cost_model=None).force("d", "sleepy")
    fast = convrewrite.optimize(model, plan=plan, check_speed=True)
    assert fast.convrewrite_plan.row("d").choice == "direct"
    assert fast.convrewrite_speed.action.startswith("kept the original implementations")
    assert plan.row("d").choice == "sleepy"  # the caller's plan is left as given
    off = convrewrite.optimize(model, plan=plan, check_speed=False)
    assert off.convrewrite_plan.row("d").choice == "sleepy" and off.convrewrite_speed.measured is None


def test_speed_check_reports_measured_next_to_predicted():
    x = keras.Input((24, 24, 16))
    model = keras.Model(x, keras.layers.Conv2D(16, 3, padding="same", groups=16, name="g")(x))

    class Predicts:
        name = "fake"

        def predict_ms(self, impl, spec):
            return {"direct": 3.0, "depthwise": 1.0}.get(impl)

    fast = convrewrite.optimize(model, cost_model=Predicts(), check_speed=True)
    speed = fast.convrewrite_speed
    assert speed.predicted == pytest.approx(3.0) and speed.measured is not None and speed.rounds >= 2
    assert "measured" in speed.describe() and "predicted 3.00x" in speed.describe()


def test_offline_cli_convert_for_another_device_never_measures(tmp_path, canary_rows, monkeypatch, capsys):
    """`convrewrite convert --cost-model server.json --target other` on this machine: no canary, no
    profile, no speed timing here; the output says the speed was not measured and why."""
    from convrewrite import cli

    path = _other_device_profile(canary_rows).save(tmp_path / "server.json")
    _model().save(tmp_path / "m.keras")
    monkeypatch.setattr(profiling, "time_spec_samples", lambda *a, **k: pytest.fail("timed on the converting machine"))
    monkeypatch.setattr(profiling, "profile_device", lambda *a, **k: pytest.fail("measured the converting machine"))
    monkeypatch.setattr(convrewrite.speed, "measure", lambda *a, **k: pytest.fail("speed timed on the converting machine"))
    monkeypatch.setenv("CONVREWRITE_CHECK_SPEED", "1")
    code = cli.main(["convert", str(tmp_path / "m.keras"), str(tmp_path / "fast.keras"), "--cost-model", str(path),
                     "--target", "other", "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "speed: not measured (the profile is another device's" in out and "unverified" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["plan"]["trust"] == "unverified"
    assert not list(cost.CACHE_DIR.rglob("*.json"))


# ---- what a review found: target="other" everywhere, re-measuring, policy sites, uncalibrated impls ----
def test_target_other_refuses_measure_and_skips_the_speed_check_of_a_given_plan(tmp_path, canary_rows, monkeypatch):
    path = _other_device_profile(canary_rows).save(tmp_path / "server.json")
    monkeypatch.setattr(profiling, "time_spec_samples", lambda *a, **k: pytest.fail("timed on the converting machine"))
    monkeypatch.setattr(convrewrite.speed, "measure", lambda *a, **k: pytest.fail("speed timed on the converting machine"))
    with pytest.raises(convrewrite.PlanError, match="measure=True times this device, but target='other'"):
        convrewrite.optimize(_model(), cost_model=str(path), target="other", measure=True)
    before = path.read_bytes()
    with pytest.warns(UserWarning, match="unverified"):
        plan = convrewrite.plan(_model(), cost_model=str(path), target="other")
    for given_target in ("other", "auto"):  # a plan made for another device stays that plan
        fast = convrewrite.optimize(_model(), plan=plan, target=given_target, check_speed=True)
        assert fast.convrewrite_plan.choices() == plan.choices() and fast.convrewrite_speed.measured is None
    assert path.read_bytes() == before


def test_an_unverified_profile_ignores_this_devices_tactic_timings(canary_rows):
    cm = _other_device_profile(canary_rows)
    spec = _spec(kernel=(7, 7), height=24, width=24)
    cm.record_tactics({spec: {"direct": 9.0}}, save=False)  # this device's timing, 9 s
    cm.trust = "unverified"
    p = cm.prediction("direct", spec)
    assert p.source == "unverified timing" and p.ms != 9000.0
    cm.trust = "this device"
    assert cm.prediction("direct", spec).source == "timed here" and cm.prediction("direct", spec).ms == 9000.0


def test_a_refused_named_profile_is_replaced_by_this_devices_profile_once(tmp_path, canary_rows, monkeypatch):
    path = _other_device_profile(canary_rows).save(tmp_path / "colleague.json")
    monkeypatch.setattr(profiling, "time_spec_samples", _fake_timer(canary_rows, 3.0, []))
    measured = []

    def quick_profile(mode="quick", **kw):
        measured.append(mode)
        return CostModel(device.fingerprint(), [], _other_device_profile(canary_rows).fits, name="measured here")

    monkeypatch.setattr(profiling, "profile_device", quick_profile)
    for _ in range(2):
        monkeypatch.setattr(profiles, "_AUTO_CACHE", {})  # a new process: only the disk cache is left
        with pytest.warns(UserWarning, match="does not describe this device"):
            assert profiles.resolve(str(path)).name == "measured here"
    assert measured == ["quick"]
    # target "here" with another machine class's profile: this device's own profile, not an offline plan
    other_class = _other_device_profile(canary_rows, threads=64).save(tmp_path / "big.json")
    with pytest.warns(UserWarning, match="another machine class"):
        assert profiles.resolve(str(other_class), target="here").trust == "this device"
    assert measured == ["quick"]


def test_calibration_allows_for_the_fit_error_of_a_profile_without_canaries(canary_rows, monkeypatch):
    cm = _other_device_profile(canary_rows)
    cm.canaries = []  # an old profile: calibration compares against its fit
    for fit in cm.fits.values():
        fit.p90_rel_error = 0.5
    monkeypatch.setattr(profiling, "time_spec_samples", _fake_timer(canary_rows, 1.0, []))
    # what this device measures is 1.8x what the fit predicts for direct: within 1.5 x (1 + 0.5)
    timed = {(r["spec"], r["impl"]): r["seconds"] for r in canary_rows}
    monkeypatch.setattr(cm, "profile_seconds", lambda impl, spec: timed[(spec.to_json(), impl)] / 1.8
                        if impl in cm.fits and (spec.to_json(), impl) in timed else None)
    result = profiles.calibrate(cm, use_cache=False)
    assert result.accepted and all(c["tolerance"] == pytest.approx(2.25) for c in result.canaries)
    for fit in cm.fits.values():
        fit.p90_rel_error = 0.0
    assert not profiles.calibrate(cm, use_cache=False).accepted


def test_an_implementation_without_canaries_stays_unverified_in_a_calibrated_profile(canary_rows):
    cm = _other_device_profile(canary_rows)
    spec = _spec(kernel=(7, 7), height=24, width=24)
    direct_only = [{"spec": r["spec"], "impl": "direct", "profile_s": r["seconds"], "measured_s": r["seconds"] * 1.1,
                    "ratio": 1.1} for r in canary_rows if r["impl"] == "direct"]
    cm.calibration = calibration.Calibration(direct_only, 1.0, True, [], device.fingerprint_id(device.fingerprint()))
    cm.trust = "calibrated"
    assert cm.prediction("direct", spec).source == "calibrated timing"
    assert cm.prediction("fft", spec).source == "unverified timing"  # no fft canary was timed here


def test_a_policy_site_does_not_stop_the_speed_check_from_reverting_slow_sites(sleepy):
    x = keras.Input((20, 20, 8))
    y = keras.layers.Conv2D(8, 3, padding="same", name="p")(x)
    model = keras.Model(x, keras.layers.Conv2D(8, 5, padding="same", name="d")(y))
    plan = convrewrite.plan(model, cost_model=None, pac={"layers": ["p"], "guidance": "self"}).force("d", "sleepy")
    fast = convrewrite.optimize(model, plan=plan, check_speed=True)
    assert fast.convrewrite_plan.choices() == {"p": "pac", "d": "direct"}  # PAC kept: the user's choice
    assert fast.convrewrite_speed.action.startswith("kept the original implementations")


def test_re_optimizing_an_optimized_model_keeps_what_it_ran_as_the_baseline(sleepy):
    """The speed check of optimize(fast) compares with `fast` (its FFT layer), and reverting a slow site
    puts back that FFT layer, not Keras's Conv2D."""
    from convrewrite.layers.fft import FFTConv2D

    x = keras.Input((24, 24, 8))
    model = keras.Model(x, keras.layers.Conv2D(8, 9, padding="same", name="c")(x))
    fast = convrewrite.optimize(model, plan=convrewrite.plan(model, cost_model=None).force("c", "fft", tile_size=12),
                                check_speed=False)
    assert isinstance(fast.get_layer("c"), FFTConv2D)
    again = convrewrite.optimize(fast, plan=convrewrite.plan(fast, cost_model=None).force("c", "sleepy"),
                                 check_speed=True)
    assert again.convrewrite_speed.action.startswith("kept the original implementations")
    assert isinstance(again.get_layer("c"), FFTConv2D) and again.get_layer("c").tile_size == fast.get_layer("c").tile_size
    assert again.convrewrite_plan.row("c").choice == "fft"
    # and a plan that changes nothing for speed is not timed
    same = convrewrite.optimize(fast, plan=convrewrite.plan(fast, cost_model=None).force("c", "fft", tile_size=12),
                                check_speed=True)
    assert same.convrewrite_speed.measured is None and "no site was replaced" in same.convrewrite_speed.not_measured


def test_speed_check_times_finite_data_shaped_like_the_users_inputs(monkeypatch):
    x = keras.Input((None, None, 8))
    model = keras.Model(x, keras.layers.Conv2D(8, 3, padding="same", groups=8, name="g")(x))
    data = np.random.default_rng(0).standard_normal((3, 20, 20, 8)).astype("float32")
    data[0, 0, 0, 0] = np.nan
    seen = []
    real = convrewrite.speed.measure

    def spy(original, optimized, inputs, **kw):
        seen.append(np.asarray(inputs))
        return real(original, optimized, inputs, **kw)

    monkeypatch.setattr(convrewrite.speed, "measure", spy)
    fast = convrewrite.optimize(model, cost_model=None, inputs=data, check_speed=True)
    assert fast.convrewrite_plan.row("g").choice == "depthwise" and seen
    assert seen[0].shape == data.shape and np.isfinite(seen[0]).all()


def test_force_checks_the_plans_limits_at_every_size_and_the_planned_batch():
    """A shared 9x9 conv at 16x16 and 256x256 under a 20 MB limit: the plan leaves fft out at the large
    size (batch 8), and forcing it there is refused the same way."""
    a, b = keras.Input((16, 16, 4)), keras.Input((256, 256, 4))
    conv = keras.layers.Conv2D(4, 9, padding="same", name="c")
    model = keras.Model([a, b], [conv(a), conv(b)])
    plan = convrewrite.plan(model, cost_model=None, memory_limit="20MB")
    assert "memory_limit" in plan.row("c").candidates["fft"]
    with pytest.raises(convrewrite.PlanError, match=r"@256x256.*memory_limit"):
        plan.force("c", "fft")
    again = type(plan).from_dict(json.loads(plan.to_json()))
    assert len(again.row("c").specs) == 2 and all(s.batch == 8 for s in again.row("c").specs)


# ---- the speed check's interval and margin (timings stubbed: no test asserts a time) -------------------
def _stub_rounds(monkeypatch, slowdown: float, noise: float, float32_slowdown: float = None):
    """Replace the speed check's timer: per round, the original takes 10 ms and the optimized model
    `slowdown` x that (a float32 counterpart `float32_slowdown` x), each times 1 +- `noise` (seeded)."""
    rng = np.random.default_rng(0)
    factors = {"original": 1.0, "optimized": slowdown, "float32": float32_slowdown}

    def fake(fns, repeats=1, warmup=0, **kw):
        return {name: {"samples": [1e-2 * factors[name] * (1 + noise * rng.uniform(-1, 1)) for _ in range(repeats)]}
                for name in fns}

    monkeypatch.setattr(convrewrite.speed, "time_interleaved", fake)


def _grouped_model():
    x = keras.Input((20, 20, 8))
    return keras.Model(x, keras.layers.Conv2D(8, 3, padding="same", groups=8, name="g")(x))


@pytest.mark.parametrize("slowdown,noise,kept", [
    (1.10, 0.01, False),  # 10% slower: reverted
    (1.00, 0.01, True),   # the same speed, within noise: kept
    (1.04, 0.10, False),  # maybe 4% slower, too noisy to show it is within 5%: reverted
    (0.90, 0.01, True),   # faster: kept
])
def test_the_speed_check_keeps_only_what_it_shows_is_not_slower(slowdown, noise, kept, monkeypatch):
    _stub_rounds(monkeypatch, slowdown, noise)
    monkeypatch.setattr(convrewrite.speed, "SPEED_BUDGET_S", 1.0)
    fast = convrewrite.optimize(_grouped_model(), cost_model=None, check_speed=True)
    speed = fast.convrewrite_speed
    lo, hi = speed.interval
    assert lo <= speed.measured <= hi and speed.rounds >= convrewrite.speed.SPEED_MIN_ROUNDS
    assert f"[{lo:.2f}, {hi:.2f}]" in speed.describe() and "95% interval" in speed.describe()
    assert (fast.convrewrite_plan.row("g").choice == "depthwise") == kept, speed.describe()
    assert speed.action == "kept" if kept else speed.action.startswith("kept the original implementations")


def test_the_speed_rule_at_its_margin():
    keeps = convrewrite.speed.keeps
    assert keeps((1 / 1.05, 1.0)) and keeps((0.96, 1.2)) and keeps((1.2, 1.5))
    assert not keeps((0.94, 1.01))   # may be 6% slower: not shown within the margin
    assert not keeps((0.96, 0.99))   # within 5%, but shown slower
    interval = convrewrite.speed.median_interval(list(range(1, 21)))
    assert interval == (6, 15)  # n = 20: the 6th smallest and the 6th largest (95%)


@pytest.mark.parametrize("bf16_vs_float32,kept", [(1.10, False), (0.80, True)])
def test_an_rtol_plan_is_kept_only_where_it_is_as_fast_as_its_float32_counterpart(bf16_vs_float32, kept, monkeypatch):
    """A plan with bfloat16 sites is timed beside the same plan in float32; where reduced precision is
    not shown at least as fast, the float32 plan is what optimize returns."""
    here = with_native_bf16(device.fingerprint(), True)
    monkeypatch.setattr(device, "fingerprint", lambda: copy.deepcopy(here))
    _stub_rounds(monkeypatch, 0.8 * bf16_vs_float32, 0.01, float32_slowdown=0.8)
    monkeypatch.setattr(convrewrite.speed, "SPEED_BUDGET_S", 1.0)

    class Bf16IsFastest:
        name = "bf16 fastest"

        def predict_ms(self, impl, spec):
            return {"direct": 4.0, "depthwise": 3.0, "direct-bf16": 2.0, "depthwise-bf16": 1.0}.get(impl)

    fast = convrewrite.optimize(_grouped_model(), cost_model=Bf16IsFastest(), rtol=1e-2, check_speed=True)
    speed = fast.convrewrite_speed
    assert speed.float32 is not None and speed.float32["kept"] == kept
    assert fast.convrewrite_plan.row("g").choice == ("depthwise-bf16" if kept else "depthwise")
    assert "vs float32" in speed.describe()
    if not kept:
        assert "float32 plan kept" in speed.action and speed.measured == pytest.approx(1 / 0.8, rel=0.05)
        assert fast.get_layer("g").dtype_policy.name == "float32"
