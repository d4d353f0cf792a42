"""Cost models: profiling, fitting, persistence, bad files, device mismatch, planner constraints."""

import json
import warnings

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import cost, implementations
from convrewrite.cost import CostModel
from convrewrite.planner import DIRECT_MARGIN
from convrewrite.profile import grid, profile_device
from convrewrite.spec import ConvSpec


def _spec(**kw):
    base = dict(kind="conv2d", in_channels=8, filters=8, kernel=(3, 3), height=16, width=16, batch=2, padding="same")
    base.update(kw)
    return ConvSpec(**base)


@pytest.fixture(scope="module")
def tiny_profile():
    """A real (small) profile measured on this machine: direct and depthwise on a few specs."""
    specs = [_spec(), _spec(kernel=(5, 5), in_channels=4), _spec(groups=8, kernel=(7, 7)),
             _spec(kind="depthwise_conv2d", groups=8, kernel=(3, 3)), _spec(in_channels=16, filters=4, height=24, width=24),
             _spec(groups=8, kernel=(3, 3), height=20, width=20), _spec(groups=8, kernel=(5, 5), batch=1)]
    return profile_device(specs=specs, progress=False, allow=["direct", "depthwise"])


def test_fingerprint_describes_device():
    fp = convrewrite.fingerprint()
    for key in ("backend", "device_kind", "device_name", "threads", "keras", "arch"):
        assert key in fp
    assert fp["backend"] == keras.backend.backend()


def test_profile_fits_and_predicts(tiny_profile):
    assert {"direct", "depthwise"} <= set(tiny_profile.fits)
    for name, fit in tiny_profile.fits.items():
        assert all(w >= 0 for w in fit.weights)
    pred = tiny_profile.predict_ms("direct", _spec(kernel=(5, 5)))
    assert pred is not None and pred > 0
    assert tiny_profile.predict_ms("depthwise", _spec()) is None  # not applicable to a dense conv
    assert tiny_profile.predict_ms("direct", _spec(height=None, width=None)) is None


def test_save_load_round_trip(tiny_profile, tmp_path):
    path = tiny_profile.save(tmp_path / "dev.json")
    loaded = CostModel.load(path)
    spec = _spec(kernel=(5, 5), height=20, width=20)
    assert loaded.predict_ms("direct", spec) == pytest.approx(tiny_profile.predict_ms("direct", spec))
    assert loaded.fingerprint == tiny_profile.fingerprint
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ('{"format": "convrewrite-profile", "version": 1, "fingerprint": {}', "not valid JSON"),  # truncated
    ('{"hello": 1}', "not a convrewrite profile"),
    ('{"format": "convrewrite-profile", "version": 99, "fingerprint": {}, "fits": {}}', "version 99"),
    ('{"format": "convrewrite-profile", "version": 1, "fingerprint": {}, "fits": {"direct": {"features": ["a"]}}}', "corrupt"),
    (b"\xff\xfe\x00binary", "not valid JSON"),
])
def test_bad_profiles_get_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(convrewrite.ProfileError, match=match) as info:
        CostModel.load(path)
    assert "bad.json" in str(info.value)
    with pytest.raises(convrewrite.ProfileError):
        convrewrite.plan(keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(2, 3)]), cost_model=str(path))


def test_missing_profile(tmp_path):
    with pytest.raises(convrewrite.ProfileError, match="does not exist"):
        CostModel.load(tmp_path / "nope.json")


def test_other_device_profile_warns_and_is_used(tiny_profile, tmp_path):
    other = CostModel(dict(tiny_profile.fingerprint, device_kind="gpu", device_name="Some GPU", threads=1),
                      tiny_profile.measurements, tiny_profile.fits)
    path = other.save(tmp_path / "gpu.json")
    with pytest.warns(UserWarning, match="another device"):
        cm = cost.resolve(str(path))
    assert cm.fingerprint["device_name"] == "Some GPU"


def test_auto_uses_matching_profile_and_never_a_foreign_one(tiny_profile, tmp_path, monkeypatch):
    foreign = CostModel(dict(tiny_profile.fingerprint, arch="riscv", threads=64), tiny_profile.measurements, tiny_profile.fits,
                        name="foreign")
    foreign.save(tmp_path / "foreign.json")
    monkeypatch.setattr(cost, "SHIPPED_DIRS", [tmp_path])
    monkeypatch.setattr(cost, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(cost, "_AUTO_CACHE", {})
    measured = []

    def fake_profile(mode="quick", **kw):
        measured.append(mode)
        return CostModel(cost.fingerprint(), tiny_profile.measurements, tiny_profile.fits, name="measured-now")

    import convrewrite.profile as prof

    monkeypatch.setattr(prof, "profile_device", fake_profile)
    with pytest.warns(UserWarning, match="measuring a quick one"):
        cm = cost.resolve("auto")
    assert cm.name == "measured-now" and measured == ["quick"]
    # the freshly measured profile is cached, and a matching one is found next time without measuring
    monkeypatch.setattr(cost, "_AUTO_CACHE", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cost.resolve("auto").name == "measured-now"
    assert measured == ["quick"]


def test_fit_weighs_relative_error_and_validates():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        spec = _spec(kernel=(int(rng.integers(1, 8)),) * 2, in_channels=int(rng.integers(1, 64)),
                     height=int(rng.integers(8, 64)), width=32)
        f = implementations.get("direct").features(spec)
        seconds = 2e-5 + 1e-10 * f["dense_macs"]
        rows.append({"spec": spec.to_json(), "impl": "direct", "seconds": seconds * float(rng.uniform(0.95, 1.05))})
    cm = CostModel(cost.fingerprint(), rows).fit()
    fit = cm.fits["direct"]
    w = dict(zip(fit.features, fit.weights))
    assert w["calls"] == pytest.approx(2e-5, rel=0.2) and w["dense_macs"] == pytest.approx(1e-10, rel=0.2)
    assert fit.median_rel_error < 0.05
    assert cm.validation["held_out_specs"] == 10


class _FakeCost:
    name = "fake"

    def __init__(self, table):
        self.table = table

    def predict_ms(self, impl, spec):
        return self.table.get(impl)


def _grouped_model():
    x = keras.Input((12, 12, 8))
    y = keras.layers.Conv2D(8, 3, groups=8, padding="same", name="g")(x)
    return keras.Model(x, keras.layers.Conv2D(4, 3, name="c")(y))


def test_planner_follows_predictions_and_constraints():
    model = _grouped_model()
    plan = convrewrite.plan(model, cost_model=_FakeCost({"direct": 1.0, "depthwise": 2.0}))
    assert plan.row("g").choice == "direct"  # predicted faster, so kept
    plan = convrewrite.plan(model, cost_model=_FakeCost({"direct": 3.0, "depthwise": 2.0}))
    assert plan.row("g").choice == "depthwise" and plan.row("g").speedup == pytest.approx(1.5)
    plan = convrewrite.plan(model, cost_model=_FakeCost({"direct": 3.0, "depthwise": 2.0}), allow=["direct"])
    assert plan.row("g").choice == "direct"
    assert "predicted conv time" in plan.summary()
    with pytest.raises(convrewrite.PlanError, match="warp"):
        convrewrite.plan(model, cost_model=None, allow=["warp"])


def test_measure_mode_caches_in_profile_file(tiny_profile, tmp_path, monkeypatch):
    cm = CostModel(tiny_profile.fingerprint, tiny_profile.measurements, tiny_profile.fits)
    path = cm.save(tmp_path / "dev.json")
    model = _grouped_model()
    fast = convrewrite.optimize(model, cost_model=str(path), measure=True, batch=2)
    saved = CostModel.load(path)
    assert len(saved.measured) == 2  # two distinct specs, each measured once
    for row in fast.convrewrite_plan:
        measured = saved.measured[row.spec.with_input(batch=2).to_json()]
        times = {k: v for k, v in measured.items() if k != "pac"}  # pac is timed for budgets, chosen only by policy
        fastest = min(times, key=times.get)
        assert times[row.choice] <= DIRECT_MARGIN * times[fastest], (row.site, times)
        simpler = implementations.names()[:implementations.names().index(row.choice)]
        assert all(times[s] > DIRECT_MARGIN * times[fastest] for s in simpler if s in times), (row.site, times)
    import convrewrite.profile as prof

    def boom(*a, **k):
        raise AssertionError("cached specs must not be measured again")

    monkeypatch.setattr(prof, "time_spec", boom)
    convrewrite.optimize(model, cost_model=str(path), measure=True, batch=2)


def test_grids_cover_the_space():
    quick, full = grid("quick"), grid("full")
    assert 20 <= len(quick) < len(full)
    kernels = {s.kernel[0] for s in full}
    assert min(kernels) == 1 and max(kernels) == 51
    assert {s.kind for s in full} == {"conv2d", "depthwise_conv2d"}
    assert any(s.groups > 1 and s.kind == "conv2d" for s in full) and any(s.strides == (2, 2) for s in full)
    assert max(s.in_channels for s in full) >= 512
    with pytest.raises(ValueError, match="mode"):
        grid("medium")


def test_plot_predicted_vs_measured(tiny_profile, tmp_path):
    pytest.importorskip("matplotlib")  # the `plot` extra; the `test` extra installs it
    path = cost.plot(tiny_profile, tmp_path / "fit.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _PerKernelCost:
    """direct costs 1 ms everywhere; pac costs 1 + kernel/10 ms (so bigger kernels cost more)."""

    name = "fake-per-kernel"

    def predict_ms(self, impl, spec):
        return {"direct": 1.0, "pac": 1.0 + spec.kernel[0] / 10}.get(impl)


def test_pac_budget_converts_cheapest_sites_within_budget():
    x = keras.Input((10, 10, 3))
    y = keras.layers.Conv2D(4, 1, padding="same", name="k1")(x)
    y = keras.layers.Conv2D(4, 3, padding="same", name="k3")(y)
    y = keras.layers.Conv2D(4, 5, padding="same", name="k5")(y)
    y = keras.layers.Conv2D(4, 9, padding="same", name="k9")(y)
    model = keras.Model(x, y)
    plan = convrewrite.plan(model, cost_model=_PerKernelCost(), pac={"layers": "k.*", "guidance": "self", "budget": 1.3})
    # base 4 ms, limit 5.2 ms: k1 (+0.1), k3 (+0.3), k5 (+0.5) fit (4.9 ms); k9 (+0.9) does not
    assert plan.choices() == {"k1": "pac", "k3": "pac", "k5": "pac", "k9": "direct"}
    assert plan.pac_overhead == pytest.approx(4.9 / 4)
    assert "exceed the 1.3x budget" in plan.row("k9").reason
    assert "PAC overhead 1.22x" in plan.summary()  # 4.9 / 4 = 1.225
    with pytest.raises(convrewrite.PlanError, match="cost model"):
        convrewrite.plan(model, cost_model=None, pac={"layers": "k.*", "guidance": "self", "budget": 1.3})
    with pytest.raises(convrewrite.PlanError, match="budget"):
        convrewrite.plan(model, cost_model=_PerKernelCost(), pac={"layers": "k.*", "budget": 0.5})
    with pytest.raises(convrewrite.PlanError, match="name no conv site"):
        convrewrite.plan(model, cost_model=None, pac={"layers": ["nope"], "guidance": "self"})


@pytest.mark.parametrize("predicted,expected", [
    ({"direct": 1.05, "fft": 1.0}, "direct"),
    ({"direct": 2.0, "depthwise": 1.05, "fft": 1.0}, "depthwise"),
    ({"direct": 2.0, "depthwise": 1.5, "fft": 1.0}, "fft"),
    ({"direct": 1.0, "fft": 0.5, "fft-tiled": 0.52}, "fft"),
])
def test_choice_prefers_simpler_implementations_within_margin(predicted, expected):
    from convrewrite.planner import _choose

    assert _choose(predicted)[0] == expected
