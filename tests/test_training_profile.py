"""Training-time profiles: forward + backward timings per implementation in the profile (format version 4),
fitted like inference times and used by plan(mode="training") without measuring."""

import json

import keras
import pytest

import convrewrite
from convrewrite import cost, device, profiles, training_cost
from convrewrite.cost import CostModel
from convrewrite.profile import MAX_DIRECT_MACS, TRAINING_COST, profile_device, training_grid
from convrewrite.spec import ConvSpec

L = keras.layers


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(cost, "CACHE_DIR", tmp_path_factory.mktemp("user-cache"))
    monkeypatch.setattr(profiles, "_AUTO_CACHE", {})
    monkeypatch.delenv("CONVREWRITE_COST_MODELS", raising=False)


def _grid():
    return [ConvSpec(kind="conv2d", in_channels=c, filters=c, kernel=(k, k), height=hw, width=hw, batch=2, padding="same")
            for k in (5, 9, 13) for hw in (16, 32) for c in (4, 16)]


def _rows(per_impl):
    """Synthetic timings: seconds = factor[impl] * MACs * 1e-10."""
    return [{"spec": s.to_json(), "impl": impl, "seconds": f * s.macs() * 1e-10}
            for s in _grid() for impl, f in per_impl.items()]


def _synthetic(training=True):
    """FFT 4x faster than direct forward, 4x slower forward + backward (so the two plans must differ)."""
    trained = {"measurements": _rows({"direct": 1.0, "fft": 4.0})} if training else None
    return CostModel(device.fingerprint(), _rows({"direct": 4.0, "fft": 1.0}), training=trained).fit()


def _model():
    inp = keras.Input((24, 24, 8))
    return keras.Model(inp, L.Conv2D(8, 9, padding="same", name="wide")(inp))


def test_training_fits_make_the_training_plan_differ():
    cm = _synthetic()
    assert cm.has_training and set(cm.training_fits) == {"direct", "fft"}
    inference = convrewrite.plan(_model(), cost_model=cm, allow=["fft"], batch=2)
    training = convrewrite.plan(_model(), cost_model=cm, allow=["fft"], batch=2, mode="training")
    assert inference.row("wide").choice == "fft" and training.row("wide").choice == "direct"
    sources = training.prediction_sources()
    assert sources and all(s.endswith(cost.FORWARD_BACKWARD) for s in sources)
    assert training.prediction_note == training_cost.WITH_TRAINING and training_cost.WITH_TRAINING in training.summary()
    assert inference.prediction_note is None
    assert convrewrite.Plan.from_dict(json.loads(training.to_json())).prediction_note == training_cost.WITH_TRAINING


def test_profile_without_training_keeps_inference_predictions_and_says_so():
    plan = convrewrite.plan(_model(), cost_model=_synthetic(training=False), allow=["fft"], batch=2, mode="training")
    assert plan.row("wide").choice == "fft"
    assert plan.prediction_note == training_cost.WITHOUT_TRAINING
    assert not any(s.endswith(cost.FORWARD_BACKWARD) for s in plan.prediction_sources())


def test_training_section_round_trips_and_older_profiles_load(tmp_path):
    cm = _synthetic()
    spec = _grid()[0].with_input(height=20, width=20)  # off the grid: a fitted number
    loaded = CostModel.load(cm.save(tmp_path / "p.json"))
    assert loaded.has_training and loaded.training_validation == cm.training_validation
    for training in (False, True):
        assert loaded.prediction("fft", spec, training=training) == cm.prediction("fft", spec, training=training)
    assert loaded.prediction("direct", spec, training=True).source == "fitted" + cost.FORWARD_BACKWARD
    data = json.loads((tmp_path / "p.json").read_text())
    del data["training"]
    data["version"] = 3
    (tmp_path / "v3.json").write_text(json.dumps(data))
    old = CostModel.load(tmp_path / "v3.json")
    assert not old.has_training and old.prediction("fft", spec, training=True) is None


def test_unverified_training_prediction_says_so():
    cm = _synthetic()
    cm.trust = "unverified"
    view = training_cost.TrainingCostModel(cm)
    assert view.trust == "unverified" and view.prediction("direct", _grid()[0]).source.startswith("unverified")


@pytest.mark.parametrize("change, field", [
    (lambda t: t.__setitem__("fits", {"direct": {"features": ["a"], "weights": [-1.0], "n_samples": 3,
                                                 "median_rel_error": 0.1}}), '"training"."fits"."direct"."weights"'),
    (lambda t: t["measurements"][0].__setitem__("seconds", "slow"), '"training"."measurements"\\[0\\]'),
    (lambda t: t["measurements"][1].__setitem__("spec", "{not a spec"), '"training"."measurements"\\[1\\]."spec"'),
    (lambda t: t.clear() or t.update({"measurements": {}}), '"training"."measurements"'),
])
def test_corrupt_training_section_is_one_profile_error(tmp_path, change, field):
    data = _synthetic().to_dict()
    change(data["training"])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(convrewrite.ProfileError, match=field) as info:
        CostModel.load(path)
    assert "\n" not in str(info.value) and "bad.json" in str(info.value)


def test_training_section_that_is_no_object_is_refused(tmp_path):
    data = _synthetic().to_dict()
    data["training"] = [1, 2]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(convrewrite.ProfileError, match='"training" = list'):
        CostModel.load(tmp_path / "bad.json")


def test_training_grid_is_shrunk_for_forward_backward():
    budget = MAX_DIRECT_MACS["quick"] / TRAINING_COST
    for spec in training_grid("quick"):
        assert spec.macs() <= budget / (30 if spec.kind == "conv2d" and spec.groups > 1 else 1)


def test_profile_device_times_forward_backward():
    specs = _grid()[:3] + [_grid()[6]]
    cm = profile_device(specs=specs, progress=False, allow=["direct"], training=True)
    assert {m["impl"] for m in cm.training_measurements} == {"direct"} and len(cm.training_measurements) == 4
    assert "direct" in cm.training_fits
    p = cm.prediction("direct", specs[0], training=True)
    assert p.source == "timed here" + cost.FORWARD_BACKWARD and p.ms > 0


def test_calibrated_profile_scales_training_predictions_by_its_canaries():
    from convrewrite.calibration import Calibration

    spec = _grid()[0].with_input(height=20, width=20)
    here = _synthetic().prediction("direct", spec, training=True)
    cm = _synthetic()
    cm.calibration = Calibration([{"spec": spec.to_json(), "impl": "direct", "profile_s": 1.0, "measured_s": 2.0,
                                   "ratio": 2.0}], 0.1, True, [], "here")
    cm._trust = None  # as a profile of another fingerprint would be, once calibrated
    cm.fingerprint = {**cm.fingerprint, "device_name": "another"}
    p = training_cost.TrainingCostModel(cm).prediction("direct", spec)
    assert cm.trust == "calibrated" and p.source == "calibrated fit" + cost.FORWARD_BACKWARD
    assert p.ms == pytest.approx(2.0 * here.ms)
