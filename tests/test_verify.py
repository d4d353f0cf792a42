"""Verification: NaN-aware comparisons, per-site checks on the user's own inputs, truthful failure messages."""

import importlib

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite.verify import Check, VerificationReport, relative_error

verify_module = importlib.import_module("convrewrite.verify")  # the module (convrewrite.verify is the function)


def test_relative_error_requires_the_same_non_finite_pattern():
    a = np.array([1.0, np.nan, np.inf, -np.inf, 2.0])
    nonfinite_mismatches = verify_module.nonfinite_mismatches
    assert relative_error(a, a.copy()) == 0.0 and nonfinite_mismatches(a, a) == 0
    for other in ([1.0, 0.0, np.inf, -np.inf, 2.0],  # NaN replaced by a number
                  [1.0, np.nan, np.nan, -np.inf, 2.0],  # +Inf by NaN
                  [1.0, np.nan, -np.inf, -np.inf, 2.0],  # +Inf by -Inf
                  [np.nan, np.nan, np.inf, -np.inf, 2.0]):  # an extra NaN
        assert relative_error(np.array(other), a) == float("inf")
        assert nonfinite_mismatches(np.array(other), a) == 1
    # finite parts: normwise over the positions both hold finite values
    assert relative_error(np.array([1.0, np.nan, 2.2]), np.array([1.0, np.nan, 2.0])) == pytest.approx(0.1)
    assert relative_error(np.full(3, np.nan), np.full(3, np.nan)) == 0.0


def _model():
    inp = keras.Input((12, 12, 3))
    h = keras.layers.Conv2D(4, 5, padding="same", name="a")(inp)
    h = keras.layers.Conv2D(2, 3, name="b")(h)
    return keras.Model(inp, h)


def _nan_input(rng):
    x = rng.standard_normal((2, 12, 12, 3)).astype("float32")
    x[0, 3, 3, 0] = np.nan
    x[1, 5, 5, 2] = np.inf
    return x


def test_verify_same_model_with_nan_inputs_passes(rng):
    """Issue 15 reproduction: `verify(m, m, inputs=x_with_nan).passed` was False."""
    m = _model()
    report = convrewrite.verify(m, m, inputs=_nan_input(rng))
    assert report.passed, report.summary()
    assert {c.inputs for c in report.checks} == {"given"}
    assert "inputs: the given inputs" in report.summary()


def test_optimize_direct_with_nan_inputs_does_not_raise(rng):
    """Issue 15 reproduction: `optimize(m, allow=["direct"], inputs=x)` raised a VerificationError saying it
    fell back although report.fallbacks == []."""
    m = _model()
    fast = convrewrite.optimize(m, allow=["direct"], inputs=_nan_input(rng), cost_model=None)
    assert fast.convrewrite_report.passed and fast.convrewrite_report.fallbacks == []


def test_fft_sites_verified_on_nan_inputs(rng):
    m = _model()
    plan = convrewrite.plan(m, cost_model=None).force("a", "fft").force("b", "fft-tiled")
    fast = convrewrite.optimize(m, plan=plan, inputs=_nan_input(rng))
    assert fast.convrewrite_report.passed and fast.convrewrite_report.fallbacks == []


class _NanToZeroConv2D(keras.layers.Conv2D):
    """A wrong replacement: correct on finite inputs, but it hides NaN and Inf."""

    def call(self, x):
        x = keras.ops.where(keras.ops.isfinite(x), x, keras.ops.zeros_like(x))
        return super().call(x)


def test_site_checks_use_what_each_site_sees_on_the_given_inputs(rng):
    """Issue 15 reproduction: per-site checks used random inputs even when `inputs=` was given, so a
    replacement wrong only on the user's data passed its site check."""
    m = _model()
    x = _nan_input(rng)
    seen = verify_module.site_inputs(m, x)
    np.testing.assert_array_equal(seen["a"], x)
    np.testing.assert_array_equal(seen["b"], np.asarray(m.get_layer("a")(x)))
    inp = keras.Input((12, 12, 3))
    h = _NanToZeroConv2D(**m.get_layer("a").get_config())(inp)
    h = keras.layers.Conv2D(**m.get_layer("b").get_config())(h)
    bad = keras.Model(inp, h)
    bad.set_weights(m.get_weights())
    assert convrewrite.verify(m, bad).passed  # random finite inputs cannot see it
    report = convrewrite.verify(m, bad, inputs=x)
    assert report.failing_sites == ["a"]  # b is fed what it sees in the original: it is right
    assert all(c.nonfinite_mismatches > 0 for c in report.checks if not c.passed) and not report.passed
    assert "NaN/Inf pattern" in report.summary()


def test_site_inputs_of_nested_models(rng):
    inner_in = keras.Input((8, 8, 4))
    inner = keras.Model(inner_in, keras.layers.Conv2D(3, 3, name="ic")(inner_in), name="inner")
    inp = keras.Input((10, 10, 2))
    h = keras.layers.Conv2D(4, 3, name="oc")(inp)
    out = inner(h)
    m = keras.Model(inp, out)
    x = rng.standard_normal((1, 10, 10, 2)).astype("float32")
    seen = verify_module.site_inputs(m, x)
    assert set(seen) == {"oc", "inner/ic"}
    np.testing.assert_allclose(seen["inner/ic"], np.asarray(m.get_layer("oc")(x)), rtol=1e-6)
    assert convrewrite.verify(m, m, inputs=x).passed


def _report(checks, fallbacks=()):
    return VerificationReport(checks, list(fallbacks))


def test_failure_message_is_truthful_about_fallbacks():
    from convrewrite.api import _failure_message

    m = _model()
    out = Check("output_0", "output", float("inf"), 0.0, 1e-5, False, nonfinite_mismatches=3)
    msg = _failure_message(m, _report([Check("a", "site", 0.0, 0.0, 1e-5, True, "fft"), out]))
    assert "no site fell back" in msg and "every per-site check passed" in msg and "after falling back" not in msg
    assert "NaN/Inf pattern differs at ['output_0']" in msg
    site = Check("a", "site", 1.0, 1.0, 1e-5, False, "direct")
    msg = _failure_message(m, _report([site, out]))
    assert "already runs Keras's own layer" in msg and "after falling back" not in msg
    msg = _failure_message(m, _report([site, out], [{"site": "a", "from": "fft", "to": "direct", "why": "x"}]))
    assert "even after falling back to direct at ['a']" in msg
