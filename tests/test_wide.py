"""WideDepthwiseConv2D and the depthwise-wide implementation: a depthwise kernel run at a wider size with zero taps.

Checked against the float64 oracle (`convrewrite.reference`) on seeded random configurations (padding, strides,
dilation, multiplier, run sizes, data formats, unknown sizes), against Keras's layer where inputs hold NaN/Inf,
and for config/.keras round trips, fit() and the registry entry. Gradients and the optimize path are in
test_gradients.py and test_optimize_matrix.py with the other implementations.
"""

import os

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import implementations, reference
from convrewrite.layers.wide import WideDepthwiseConv2D, axis_plan, default_run_kernel
from convrewrite.spec import ConvSpec
from convrewrite.timing import compiled
from conftest import random_cases, rel_error

TOL = 1e-5


def _reference(layer, x):
    """What Keras's DepthwiseConv2D with `layer`'s config and weights computes on x, in float64 numpy."""
    cf = layer.data_format == "channels_first"
    w = [np.asarray(v, np.float64) for v in layer.get_weights()]
    x = np.transpose(x, (0, 2, 3, 1)) if cf else x
    y = reference.depthwise_conv2d(np.asarray(x, np.float64), w[0], w[1] if layer.use_bias else None,
                                   strides=layer.strides, padding=layer.padding, dilation=layer.dilation_rate)
    y = np.maximum(y, 0.0) if layer.get_config()["activation"] == "relu" else y
    return np.transpose(y, (0, 3, 1, 2)) if cf else y


def _random_config(rng):
    kh, kw = int(rng.integers(1, 6)), int(rng.integers(1, 8))
    strides = (int(rng.integers(1, 4)), int(rng.integers(1, 4))) if rng.random() < 0.5 else (1, 1)
    dilation = (1, 1) if max(strides) > 1 else (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    padding = str(rng.choice(["same", "valid"]))
    run = (kh + int(rng.integers(0, 3)), kw + int(rng.integers(0, 4)))
    h = int(rng.integers((kh - 1) * dilation[0] + 1, 15))
    w = int(rng.integers((kw - 1) * dilation[1] + 1, 17))
    return dict(kernel_size=(kh, kw), strides=strides, dilation_rate=dilation, padding=padding,
                depth_multiplier=int(rng.choice([1, 2])), use_bias=bool(rng.random() < 0.7),
                activation=str(rng.choice(["linear", "relu"])), run_kernel_size=run), (h, w)


def _randomize(layer, rng):
    layer.set_weights([rng.standard_normal(v.shape).astype("float32") for v in layer.get_weights()])


def test_random_configs_match_reference():
    rng = np.random.default_rng(11)
    for _ in range(random_cases(30)):
        config, (h, w) = _random_config(rng)
        # channels_first only with equal strides: Keras's own DepthwiseConv2D disagrees with the oracle on
        # channels_first with strides (3, 2) (TF 2.21 CPU), and the wide layer computes what Keras's does
        cf = rng.random() < 0.2 and config["strides"][0] == config["strides"][1]
        shape = (2, 3, h, w) if cf else (2, h, w, 3)
        layer = WideDepthwiseConv2D(**config, data_format="channels_first" if cf else "channels_last")
        x = rng.standard_normal(shape).astype("float32")
        layer(x)
        _randomize(layer, rng)
        want = _reference(layer, x)
        assert rel_error(layer(x), want) <= TOL, config
        assert rel_error(compiled(layer, [layer])(x), want) <= TOL, config


def test_unknown_spatial_size_and_other_sizes(rng):
    inp = keras.Input((None, None, 3))
    layer = WideDepthwiseConv2D((3, 12), padding="same", depth_multiplier=2)
    model = keras.Model(inp, layer(inp))
    _randomize(layer, rng)
    for h, w in ((9, 14), (12, 12), (5, 20)):
        x = rng.standard_normal((2, h, w, 3)).astype("float32")
        assert rel_error(model(x), _reference(layer, x)) <= TOL


def test_strided_same_at_unknown_size_runs_keras_kernel(rng):
    inp = keras.Input((None, None, 3))
    layer = WideDepthwiseConv2D((3, 12), strides=2, padding="same")
    model = keras.Model(inp, layer(inp))
    _randomize(layer, rng)
    x = rng.standard_normal((1, 11, 15, 3)).astype("float32")
    assert rel_error(model(x), _reference(layer, x)) <= TOL


def test_axis_plan_uses_tf_same_at_stride_one():
    assert axis_plan(None, 13, 14, 1, 1, "same") == (0, (6, 7), True)  # the zero column goes last
    assert axis_plan(56, 12, 14, 1, 1, "same") == (1, (6, 7), True)
    assert axis_plan(56, 13, 13, 1, 1, "same") == (0, (6, 6), True)
    assert axis_plan(20, 13, 14, 1, 1, "valid") == (0, (0, 1), False)
    assert axis_plan(None, 13, 14, 1, 2, "same") is None
    assert default_run_kernel((13, 13)) == (13, 14) and default_run_kernel((7, 9)) == (7, 9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_inputs_give_keras_result(rng, bad):
    """A zero tap times NaN/Inf is NaN: such calls run Keras's own kernel, so NaN/Inf land where Keras puts them."""
    ref = keras.layers.DepthwiseConv2D((3, 13), padding="same")
    layer = WideDepthwiseConv2D.from_config({**ref.get_config(), "run_kernel_size": (3, 14)})
    x = rng.standard_normal((1, 8, 20, 2)).astype("float32")
    x[0, 3, 13, 1] = bad  # read by the extra zero column of output column 6, not by Keras's window there
    ref(x)
    layer(x)
    layer.set_weights(ref.get_weights())
    got, want = np.asarray(layer(x)), np.asarray(ref(x))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    assert rel_error(got[finite], want[finite]) <= TOL


def test_config_keras_file_and_fit(rng, tmp_path):
    inp = keras.Input((9, 16, 4))
    layer = WideDepthwiseConv2D((3, 13), padding="same", name="wide")
    model = keras.Model(inp, layer(inp))
    _randomize(layer, rng)
    assert layer.get_config()["run_kernel_size"] == [3, 14]
    assert [tuple(w.shape) for w in layer.weights] == [(3, 13, 4, 1), (4,)]  # Keras's weights, nothing derived
    x = rng.standard_normal((4, 9, 16, 4)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.get_layer("wide")) is WideDepthwiseConv2D
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=0, atol=0)
    twin_in = keras.Input((9, 16, 4))
    twin_layer = keras.layers.DepthwiseConv2D((3, 13), padding="same")
    twin = keras.Model(twin_in, twin_layer(twin_in))
    twin_layer.set_weights(layer.get_weights())
    y = rng.standard_normal((4, 9, 16, 4)).astype("float32")
    for m in (model, twin):
        m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        m.fit(x, y, epochs=1, batch_size=2, shuffle=False, verbose=0)
    for g, w in zip(layer.get_weights(), twin_layer.get_weights()):
        assert rel_error(g, w) <= TOL
    assert rel_error(model(x), _reference(layer, x)) <= TOL  # the new weights are used: nothing cached


def test_invalid_run_kernel_size_is_named():
    with pytest.raises(ValueError, match=r"run_kernel_size=\(13, 12\).*expected sizes >= kernel_size=\(13, 13\)"):
        WideDepthwiseConv2D(13, run_kernel_size=(13, 12))
    with pytest.raises(ValueError, match="run_kernel_size"):
        WideDepthwiseConv2D(13, run_kernel_size=0)


def _dw_spec(k, **kw):
    common = dict(in_channels=8, filters=8, kernel=k, height=20, width=20, batch=2, padding="same", groups=8)
    return ConvSpec(kind="depthwise_conv2d", **{**common, **kw})


def test_registry_entry(rng):
    impl = implementations.get("depthwise-wide")
    assert impl.applicable(_dw_spec((13, 13)))[0] and impl.applicable(_dw_spec((5, 12)))[0]
    for k in ((13, 15), (11, 11)):
        ok, why = impl.applicable(_dw_spec(k))
        assert not ok and "slow band" in why
    assert not impl.applicable(_dw_spec((13, 13), strides=(2, 2), height=None, width=None))[0]
    assert not impl.applicable(ConvSpec(kind="conv2d", in_channels=8, filters=8, kernel=(13, 13), groups=2))[0]
    assert impl.canary_specs() and all(impl.applicable(s)[0] for s in impl.canary_specs())
    f_same, f_valid = impl.features(_dw_spec((13, 13))), impl.features(_dw_spec((13, 13), padding="valid"))
    assert f_same["dw_macs"] == pytest.approx(_dw_spec((13, 13)).macs() * 14 / 13) and f_same["copy_bytes"] == 0
    assert f_valid["copy_bytes"] > 0
    # a grouped Conv2D with one input channel per group: weights map by a reshape
    inp = keras.Input((14, 15, 4))
    conv = keras.layers.Conv2D(8, (3, 12), groups=4, padding="same", name="c")
    model = keras.Model(inp, conv(inp))
    _randomize(conv, rng)
    plan = convrewrite.plan(model, cost_model=None).force("c", "depthwise-wide", run_kernel_size=(4, 14))
    fast = convrewrite.optimize(model, plan=plan)
    layer = fast.get_layer("c")
    assert type(layer) is WideDepthwiseConv2D and layer.run_kernel_size == (4, 14)
    assert impl.options_of(layer) == {"run_kernel_size": (4, 14)}
    x = rng.standard_normal((2, 14, 15, 4)).astype("float32")
    assert rel_error(fast(x), model(x)) <= TOL and fast.convrewrite_report.fallbacks == []


def test_profiler_times_it_on_its_canary():
    from convrewrite import profile

    spec = implementations.get("depthwise-wide").canary_specs()[0].with_input(batch=1, height=16, width=16)
    times = profile.time_spec(spec, allow=["direct", "depthwise-wide"], repeats=1, max_time=0.5)
    assert set(times) == {"direct", "depthwise-wide"} and all(t > 0 for t in times.values())


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow", reason="TF mixed precision")
def test_mixed_precision(rng):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = WideDepthwiseConv2D((3, 13), padding="same")
        x = rng.standard_normal((2, 9, 17, 3)).astype("float32")
        y = layer(x)
        assert y.dtype == "float16"
        _randomize(layer, rng)
        assert rel_error(np.asarray(layer(x), np.float32), _reference(layer, x)) <= 3e-3
    finally:
        keras.mixed_precision.set_global_policy("float32")
