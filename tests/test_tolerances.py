"""Pinned tolerances and verification reports.

A replacement whose kernel is scaled by (1 + delta) (bias-free, so its output is exactly (1 + delta) times the
original's and its normwise relative error is delta) must fall back to `direct` for delta just above the
dtype's tolerance (float32 1e-5, float16 1e-2, bfloat16 3e-2) and must be kept just below it; `rtol` moves the
bar. verify's reported errors equal a normwise error computed here by hand, and VerificationError reaches the
Python API caller with its report when falling back cannot help.
"""

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import implementations
from conftest import rel_error


def _grouped_model(policy="float32", seed=0):
    keras.mixed_precision.set_global_policy(policy)
    try:
        x = keras.Input((9, 8, 4))
        model = keras.Model(x, keras.layers.Conv2D(8, 3, groups=4, padding="same", use_bias=False, name="g")(x))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(seed)
    model.get_layer("g").kernel.assign(rng.standard_normal((3, 3, 1, 8)).astype("float32"))
    return model


def _scale_kernel(monkeypatch, name, delta):
    """Make implementation `name` move the kernel in scaled by (1 + delta)."""
    impl = implementations.get(name)
    original = impl.transfer_weights

    def scaled(old, new, spec):
        original(old, new, spec)
        w = new.get_weights()
        w[0] = (w[0].astype(np.float64) * (1.0 + delta)).astype(w[0].dtype)
        new.set_weights(w)

    monkeypatch.setattr(impl, "transfer_weights", scaled)


# Measured reported errors / tolerance for (below, above): float32 0.79, 1.20; float16 0.84, 1.18; bfloat16
# 0.68, 1.35 (the kernel's bfloat16 rounding moves delta in steps). Unperturbed, both layers agree exactly.
CASES = [("float32", 1e-5, 0.8, 1.2), ("mixed_float16", 1e-2, 0.8, 1.2), ("mixed_bfloat16", 3e-2, 0.8, 1.3)]


@pytest.mark.parametrize("policy,tol,below,above", CASES, ids=[c[0] for c in CASES])
def test_default_tolerance_is_pinned_per_dtype(policy, tol, below, above, monkeypatch):
    model = _grouped_model(policy)
    for factor, falls_back in ((below, False), (above, True)):
        with monkeypatch.context() as m:
            _scale_kernel(m, "depthwise", factor * tol)
            plan = convrewrite.plan(model, cost_model=None)
            assert plan.row("g").choice == "depthwise"
            fast = convrewrite.optimize(model, plan=plan, check_speed=False)
        report = fast.convrewrite_report
        site = next(c for c in report.sites if c.name == "g")
        assert site.tolerance == tol
        if falls_back:
            assert fast.convrewrite_plan.row("g").choice == "direct", (policy, factor)
            assert [f["site"] for f in report.fallbacks] == ["g"]
            assert type(fast.get_layer("g")) is keras.layers.Conv2D
        else:
            assert fast.convrewrite_plan.row("g").choice == "depthwise", (policy, factor, site.rel_error)
            assert report.fallbacks == [] and site.passed
            assert isinstance(fast.get_layer("g"), keras.layers.DepthwiseConv2D)
            if policy == "float32":  # the reported error is delta (the output is (1 + delta) x the original's)
                assert site.rel_error == pytest.approx(factor * tol, rel=0.05)
        assert report.passed


def test_rtol_is_the_verification_tolerance(monkeypatch):
    model = _grouped_model()
    delta = 1e-3
    _scale_kernel(monkeypatch, "depthwise", delta)
    plan = convrewrite.plan(model, cost_model=None)
    kept = convrewrite.optimize(model, plan=plan, rtol=1.5 * delta, check_speed=False)
    assert kept.convrewrite_plan.row("g").choice == "depthwise"
    assert all(c.tolerance == 1.5 * delta for c in kept.convrewrite_report.checks)
    fell = convrewrite.optimize(model, plan=plan, rtol=0.5 * delta, check_speed=False)
    assert fell.convrewrite_plan.row("g").choice == "direct"
    assert all(c.tolerance == 0.5 * delta for c in fell.convrewrite_report.checks)


def test_verify_reports_hand_computed_normwise_errors(monkeypatch, rng):
    a = keras.Input((9, 8, 4), name="a")
    y = keras.layers.Conv2D(8, 3, groups=4, padding="same", use_bias=False, name="g")(a)
    model = keras.Model(a, {"out": y, "plus": keras.layers.Add(name="add")([y, keras.layers.Conv2D(8, 1, name="p")(a)])})
    for v in model.weights:
        v.assign(rng.standard_normal(tuple(v.shape)).astype("float32"))
    delta = 3e-4
    _scale_kernel(monkeypatch, "depthwise", delta)
    plan = convrewrite.plan(model, cost_model=None)
    new = convrewrite.build(model, plan)
    x = rng.standard_normal((3, 9, 8, 4)).astype("float32")
    report = convrewrite.verify(model, new, inputs=x, rtol=1e-2)
    assert report.passed
    want, got = model(x), new(x)
    by_name = {c.name: c for c in report.outputs}  # outputs are named by the layer that makes them
    assert set(by_name) == {"g", "add"}
    for name, key in (("g", "out"), ("add", "plus")):
        e, a_ = np.asarray(want[key], np.float64), np.asarray(got[key], np.float64)
        hand = np.max(np.abs(a_ - e)) / np.max(np.abs(e))
        assert by_name[name].rel_error == pytest.approx(hand, rel=1e-9)
        assert by_name[name].max_abs == pytest.approx(np.max(np.abs(a_ - e)), rel=1e-9)
        assert by_name[name].tolerance == 1e-2
    assert by_name["g"].rel_error == pytest.approx(delta, rel=0.05)
    sites = {c.name: c for c in report.sites}
    assert set(sites) == {"g", "p"}
    assert sites["g"].rel_error == pytest.approx(delta, rel=0.05)  # its own random input; the error is delta
    assert sites["p"].rel_error <= 1e-6  # untouched `direct` site
    assert sites["g"].rel_error_new_vs_reference == pytest.approx(delta, rel=0.05)
    assert sites["g"].rel_error_original_vs_reference <= 1e-6
    assert report.to_dict()["checks"][0]["rel_error"] == report.checks[0].rel_error
    strict = convrewrite.verify(model, new, inputs=x, rtol=delta / 2)
    assert not strict.passed and "g" in strict.failing_sites and "FAIL" in strict.summary()


class _Noisy(keras.layers.Layer):
    """Adds fresh noise on every call, so no rebuild can ever equal the original."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed = keras.random.SeedGenerator(3)  # JAX traces only seeded random ops

    def call(self, x):
        return x + keras.random.normal(keras.ops.shape(x), stddev=0.1, seed=self.seed)


def test_verification_error_from_the_api_carries_the_report(monkeypatch, rng):
    """When falling back cannot help (here: a layer adds fresh noise), optimize raises and the original is intact."""
    x_in = keras.Input((9, 8, 4))
    model = keras.Model(x_in, _Noisy()(keras.layers.Conv2D(8, 3, groups=4, padding="same", name="g")(x_in)))
    before = [np.array(w) for w in model.get_weights()]
    _scale_kernel(monkeypatch, "depthwise", 1e-2)
    with pytest.raises(convrewrite.VerificationError) as info:
        convrewrite.optimize(model, cost_model=None, check_speed=False)
    report = info.value.report
    assert isinstance(report, convrewrite.VerificationReport) and not report.passed
    assert report.fallbacks and report.fallbacks[0]["site"] == "g" and report.fallbacks[0]["to"] == "direct"
    assert report.failing_sites == [] and [c.kind for c in report.checks if not c.passed] == ["output"]
    assert "differs from the original beyond tolerance" in str(info.value)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    x = rng.standard_normal((2, 9, 8, 4)).astype("float32")
    assert type(model.get_layer("g")) is keras.layers.Conv2D
