"""keras.applications models end to end, and saving the optimized model."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite.verify import random_inputs
from conftest import rel_error


def _check(model, tol=1e-5):
    inputs = random_inputs(model, batch=2, seed=3)
    before = keras.ops.convert_to_numpy(model(inputs))
    weights = [np.array(w) for w in model.get_weights()]
    fast = convrewrite.optimize(model, cost_model=None)
    assert rel_error(keras.ops.convert_to_numpy(fast(inputs)), before) <= tol
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(inputs)), before)
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    return fast


def test_mobilenet_v2():
    model = keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), alpha=0.35)
    fast = _check(model)
    plan = fast.convrewrite_plan
    assert len(plan) == sum(type(l) in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D) for l in model.layers)


def test_convnext_tiny_grouped_convs_become_depthwise():
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3), include_top=False)
    # Freshly built ConvNeXt scales every block's branch by 1e-6 (layer scale), which would hide any
    # difference in the grouped convs from the end-to-end check: give the branches real weight.
    rng = np.random.default_rng(0)
    scaled = [l for l in model.layers if "layer_scale" in l.name]
    assert scaled
    for layer in scaled:
        layer.set_weights([rng.uniform(0.5, 1.0, w.shape).astype("float32") for w in layer.get_weights()])
    fast = _check(model)
    choices = fast.convrewrite_plan.choices()
    grouped = [l.name for l in model.layers if type(l) is keras.layers.Conv2D and l.groups > 1]
    assert grouped and all(choices[name] == "depthwise" for name in grouped)
    assert all(isinstance(fast.get_layer(n), keras.layers.DepthwiseConv2D) for n in grouped)


def test_saved_optimized_model_loads_in_a_fresh_process(tmp_path):
    x = keras.Input((12, 12, 4), name="img")
    y = keras.layers.Conv2D(8, 3, groups=4, padding="same", name="g")(x)
    y = keras.layers.Conv2D(3, 3, strides=2, name="c")(y)
    model = keras.Model(x, y)
    fast = convrewrite.optimize(model, cost_model=None)
    path = tmp_path / "fast.keras"
    fast.save(path)
    data = np.random.default_rng(5).standard_normal((2, 12, 12, 4)).astype("float32")
    np.save(tmp_path / "x.npy", data)
    np.save(tmp_path / "y.npy", keras.ops.convert_to_numpy(fast(data)))
    script = textwrap.dedent(f"""
        import numpy as np, keras, convrewrite
        m = keras.models.load_model({str(path)!r})
        got = keras.ops.convert_to_numpy(m(np.load({str(tmp_path / 'x.npy')!r})))
        want = np.load({str(tmp_path / 'y.npy')!r})
        assert np.array_equal(got, want), np.abs(got - want).max()
        print("ok", type(m.get_layer("g")).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok DepthwiseConv2D" in out.stdout


def test_convnext_optimized_with_this_backends_profile_saves_and_reloads(tmp_path):
    """ConvNeXtTiny planned with `auto` (the active backend's profile: on JAX the grouped 7x7 convs may go to
    FFT, on TensorFlow to depthwise) is equivalent, and a .keras round trip gives the same outputs and layers."""
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3), include_top=False)
    rng = np.random.default_rng(1)
    for layer in [l for l in model.layers if "layer_scale" in l.name]:
        layer.set_weights([rng.uniform(0.5, 1.0, w.shape).astype("float32") for w in layer.get_weights()])
    x = rng.standard_normal((2, 32, 32, 3)).astype("float32")
    fast = convrewrite.optimize(model, inputs=x, check_speed=False)
    want = keras.ops.convert_to_numpy(model(x))
    got = keras.ops.convert_to_numpy(fast(x))
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    path = tmp_path / "convnext_fast.keras"
    fast.save(path)
    loaded = keras.models.load_model(path)
    assert [type(l).__name__ for l in loaded.layers] == [type(l).__name__ for l in fast.layers]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), got, rtol=0, atol=1e-6 * np.max(np.abs(got)))
