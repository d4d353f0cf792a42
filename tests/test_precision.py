"""Reduced precision as a per-site choice under an error budget (convrewrite.precision)."""

import copy

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import device, implementations, precision
from convrewrite.spec import ConvSpec
from conftest import with_native_bf16


def _spec(**kw):
    base = dict(kind="conv2d", in_channels=16, filters=16, kernel=(3, 3), height=16, width=16, batch=2, padding="same")
    return ConvSpec(**{**base, **kw})


class _Bf16IsFaster:
    """A cost model predicting every bfloat16 variant 2x faster than its float32 base."""

    name = "fake"

    def predict_ms(self, impl, spec):
        return {"direct": 2.0, "depthwise": 1.0, "direct-bf16": 1.0, "depthwise-bf16": 0.5}.get(impl)


def _model(rng, first_padding="same"):
    x = keras.Input((16, 16, 8))
    y = keras.layers.Conv2D(16, 3, padding=first_padding, activation="relu", name="a")(x)
    y = keras.layers.Conv2D(16, 3, padding="same", groups=16, name="g")(y)
    y = keras.layers.Conv2D(8, 1, name="b")(y)
    model = keras.Model(x, y)
    for layer in model.layers[1:]:
        layer.set_weights([rng.standard_normal(w.shape).astype("float32") for w in layer.get_weights()])
    return model


@pytest.fixture
def native_bf16(monkeypatch):
    """This device as one with native bfloat16 (a CPU with avx512_bf16, a GPU of compute capability 8.0)."""
    here = with_native_bf16(device.fingerprint(), True)
    monkeypatch.setattr(device, "fingerprint", lambda: copy.deepcopy(here))


def test_native_precisions_come_from_the_device():
    fp = {"device_kind": "cpu", "hardware": {"cpu": {"isa": ["avx2", "avx512f"]}}}
    assert precision.native_precisions(fp) == set()
    fp["hardware"]["cpu"]["isa"].append("amx_bf16")
    assert precision.native_precisions(fp) == {"bfloat16"}
    assert precision.native_precisions({"device_kind": "gpu", "compute_capability": [8, 0]}) == {"bfloat16"}
    assert precision.native_precisions({"device_kind": "gpu", "compute_capability": [7, 5]}) == set()


def test_a_device_without_native_bf16_gets_no_bf16_candidates(monkeypatch):
    here = with_native_bf16(device.fingerprint(), False)
    monkeypatch.setattr(device, "fingerprint", lambda: copy.deepcopy(here))
    ok, why = implementations.get("direct-bf16").runs_on(device.fingerprint())
    assert not ok and "no native bfloat16" in why
    plan = convrewrite.plan(_model(np.random.default_rng(0)), cost_model=_Bf16IsFaster(), rtol=1e-2)
    assert set(plan.choices().values()) <= {"direct", "depthwise"}
    assert "no native bfloat16" in plan.row("a").candidates["direct-bf16"]
    with pytest.raises(convrewrite.PlanError, match="no native bfloat16"):
        plan.force("a", "direct-bf16")


def test_converting_for_another_device_asks_that_device(monkeypatch):
    """Native precision is the target's: a plan for a bf16 device made on one without (and vice versa)."""
    from convrewrite.planner import target_fingerprint

    other = with_native_bf16(device.fingerprint(), False)
    cm = _Bf16IsFaster()
    cm.trust, cm.fingerprint = "unverified", other
    assert target_fingerprint(cm) is other
    ok, why = implementations.get("direct-bf16").runs_on(target_fingerprint(cm))
    assert not ok
    cm.trust = "this device"
    assert target_fingerprint(cm) == device.fingerprint()


def test_default_tolerance_never_changes_precision(native_bf16, rng):
    model = _model(rng)
    plan = convrewrite.plan(model, cost_model=_Bf16IsFaster())
    assert set(plan.choices().values()) <= {"direct", "depthwise"}
    assert "only under an error budget" in plan.row("a").candidates["direct-bf16"]


def test_rtol_admits_bf16_verifies_it_and_the_result_saves_with_its_policies(native_bf16, rng, tmp_path):
    model = _model(rng)
    fast = convrewrite.optimize(model, cost_model=_Bf16IsFaster(), rtol=1e-2, check_speed=False)
    assert fast.convrewrite_plan.choices() == {"a": "direct-bf16", "g": "depthwise-bf16", "b": "direct-bf16"}
    assert fast.get_layer("a").dtype_policy.name == "mixed_bfloat16"
    x = rng.standard_normal((2, 16, 16, 8)).astype("float32")
    expected = np.asarray(model(x))
    err = np.max(np.abs(np.asarray(fast(x), dtype="float64") - expected)) / np.max(np.abs(expected))
    assert 1e-5 < err <= 1e-2  # really computed in bfloat16, and within the budget
    fast.save(tmp_path / "fast.keras")
    again = keras.models.load_model(tmp_path / "fast.keras")
    assert again.get_layer("g").dtype_policy.name == "mixed_bfloat16"
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(fast(x)), rtol=1e-6, atol=1e-6)


def test_a_site_whose_lower_precision_breaks_the_budget_falls_back(native_bf16, rng):
    """Site 'a' sees inputs with a large common offset and has zero-sum filters: its output is what is left
    after cancelling the offset, which bfloat16's rounding of the inputs (spacing 4 at 1e3) swamps."""
    model = _model(rng, first_padding="valid")  # no zero border, where the filters would not cancel
    kernel, bias = model.get_layer("a").get_weights()
    model.get_layer("a").set_weights([kernel - kernel.mean(axis=(0, 1, 2), keepdims=True), bias])
    x = (1e3 + rng.standard_normal((2, 16, 16, 8))).astype("float32")
    fast = convrewrite.optimize(model, cost_model=_Bf16IsFaster(), rtol=1e-2, inputs=x, check_speed=False)
    choices = fast.convrewrite_plan.choices()
    assert choices["a"] == "direct" and choices["g"] == "depthwise-bf16"  # only the sensitive site went back
    assert [f["site"] for f in fast.convrewrite_report.fallbacks] == ["a"]
    assert fast.convrewrite_report.passed


def test_sites_fall_back_one_by_one_until_the_whole_model_is_within_rtol(native_bf16, rng):
    """32 bfloat16 convs in a chain: each site's error (~4e-3) passes rtol=1e-2 alone, but their errors
    compound (~sqrt(n)) beyond it end to end, so sites go back to float32, largest error first, until the
    model is within rtol; not all of them need to."""
    x = keras.Input((12, 12, 8))
    y = x
    for i in range(32):
        y = keras.layers.Conv2D(8, 3, padding="same", name=f"c{i}")(y)
    model = keras.Model(x, y)
    for layer in model.layers[1:]:  # variance-preserving random weights, from the test's seed
        kernel, bias = layer.get_weights()
        layer.set_weights([rng.standard_normal(kernel.shape).astype("float32") / np.sqrt(72.0),
                           0.1 * rng.standard_normal(bias.shape).astype("float32")])
    data = rng.standard_normal((2, 12, 12, 8)).astype("float32")
    fast = convrewrite.optimize(model, cost_model=_Bf16IsFaster(), rtol=1e-2, inputs=data, check_speed=False)
    report = fast.convrewrite_report
    assert report.passed and report.fallbacks
    assert all("model beyond tolerance" in f["why"] and f["to"] == "direct" for f in report.fallbacks)
    assert list(fast.convrewrite_plan.choices().values()).count("direct-bf16") >= 16  # most stayed bf16
    errors = [float(f["why"].rsplit(" ", 1)[1]) for f in report.fallbacks]
    assert errors == sorted(errors, reverse=True)  # largest site error first
    assert max(c.rel_error for c in report.outputs) <= 1e-2
