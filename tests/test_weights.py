"""Weight files between an original model and its optimized version, both ways, by layer identity; files
that do not fit are refused before anything is assigned; transfer_weights by layer name."""

import keras
import numpy as np
import pytest

import convrewrite


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 12, 4))
    h = keras.layers.Conv2D(4, 3, padding="same", name="a")(inp)
    h = keras.layers.Dropout(0.1, name="drop")(h)
    h = keras.layers.Conv2D(4, 7, padding="same", groups=4, name="g")(h)
    h = keras.layers.Conv2D(4, 3, padding="same", name="b")(h)  # same shapes as 'a': a misfiled kernel would fit
    h = keras.layers.Conv2D(2, 9, padding="same", name="c")(h)
    return keras.Model(inp, h, name="net")


def _plan(model):
    return convrewrite.plan(model, cost_model=None).force("a", "fft").force("g", "depthwise").force("c", "fft-tiled")


def _weights_by_name(model):
    return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in model.layers if layer.get_weights()}


def _x():
    return np.random.default_rng(0).standard_normal((2, 12, 12, 4)).astype("float32")


def _assert_same_function(a, b):
    x = _x()
    ya, yb = np.asarray(a(x)), np.asarray(b(x))
    assert np.abs(ya - yb).max() <= 1e-5 * np.abs(ya).max()


def test_original_weight_file_loads_into_optimized_model(tmp_path):
    """Issue 15 reproduction: m.save_weights(...); fast.load_weights(...) failed inside Keras ("Layer 'b'
    expected 2 variables, but received 0"), and where shapes lined up a layer could get another's weights."""
    m = _model(0)
    fast = convrewrite.build(_model(1), _plan(m))  # same architecture, other weights
    m.save_weights(tmp_path / "m.weights.h5")
    fast.load_weights(tmp_path / "m.weights.h5")
    _assert_same_function(fast, m)
    mine, want = _weights_by_name(fast), _weights_by_name(m)
    for name in ("a", "b", "c"):
        for u, v in zip(mine[name], want[name]):
            np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(mine["g"][0].reshape(want["g"][0].shape), want["g"][0])


def test_optimized_weight_file_loads_into_original_model(tmp_path):
    m = _model(0)
    fast = convrewrite.optimize(m, plan=_plan(m))
    fast.save_weights(tmp_path / "fast.weights.h5")
    other = _model(1)
    other.load_weights(tmp_path / "fast.weights.h5")  # Keras's own loader
    for name, ws in _weights_by_name(m).items():
        for u, v in zip(_weights_by_name(other)[name], ws):
            np.testing.assert_array_equal(u, v)
    # and the optimized model reads its own files
    again = convrewrite.build(_model(2), _plan(m))
    again.load_weights(tmp_path / "fast.weights.h5")
    _assert_same_function(again, m)


def test_after_training_the_checkpoint_moves_across(tmp_path):
    m = _model(0)
    fast = convrewrite.optimize(m, plan=_plan(m))
    fast.compile("sgd", "mse")
    x = _x()
    fast.fit(x, np.zeros((2, 12, 12, 2), "float32"), epochs=1, verbose=0)
    fast.save_weights(tmp_path / "t.weights.h5")
    m.load_weights(tmp_path / "t.weights.h5")
    _assert_same_function(m, fast)


def test_a_file_that_does_not_fit_is_refused_before_anything_is_assigned(tmp_path):
    m = _model(0)
    fast = convrewrite.optimize(m, plan=_plan(m))
    before = _weights_by_name(fast)
    inp = keras.Input((12, 12, 4))
    h = keras.layers.Conv2D(4, 3, padding="same")(inp)
    h = keras.layers.Conv2D(4, 5, padding="same")(h)
    keras.Model(inp, h).save_weights(tmp_path / "other.weights.h5")
    with pytest.raises(convrewrite.WeightFileError, match="does not fit optimized model 'net'.*Nothing was loaded"):
        fast.load_weights(tmp_path / "other.weights.h5")
    for name, ws in before.items():
        for u, v in zip(_weights_by_name(fast)[name], ws):
            np.testing.assert_array_equal(u, v)
    with pytest.raises(convrewrite.WeightFileError, match="skip_mismatch"):
        fast.load_weights(tmp_path / "other.weights.h5", skip_mismatch=True)
    with pytest.raises(convrewrite.WeightFileError, match="max_shard_size"):
        fast.save_weights(tmp_path / "s.weights.json", max_shard_size=1)


def test_keras_file_round_trip_and_optimizing_twice_keep_the_layout(tmp_path):
    m = _model(0)
    fast = convrewrite.optimize(m, plan=_plan(m))
    fast.save(tmp_path / "fast.keras")
    loaded = keras.models.load_model(tmp_path / "fast.keras")
    assert isinstance(loaded, convrewrite.RewrittenModel)
    _assert_same_function(loaded, m)
    m.save_weights(tmp_path / "m.weights.h5")
    twice = convrewrite.optimize(loaded, cost_model=None)
    other = _model(3)
    twice.save_weights(tmp_path / "twice.weights.h5")
    other.load_weights(tmp_path / "twice.weights.h5")
    _assert_same_function(other, m)


def test_nested_and_sequential_originals(tmp_path):
    inner = keras.Sequential([keras.Input((10, 10, 3)), keras.layers.Conv2D(3, 5, padding="same", name="ic"),
                              keras.layers.Conv2D(3, 3, name="ic2")], name="inner")
    inp = keras.Input((10, 10, 3))
    out = keras.layers.Conv2D(2, 3, name="head")(inner(keras.layers.Conv2D(3, 3, padding="same", name="stem")(inp)))
    m = keras.Model(inp, out)
    plan = convrewrite.plan(m, cost_model=None).force("inner/ic", "fft").force("stem", "fft")
    fast = convrewrite.optimize(m, plan=plan)
    fast.save_weights(tmp_path / "f.weights.h5")
    clone = keras.models.clone_model(m)
    clone.load_weights(tmp_path / "f.weights.h5")
    x = np.random.default_rng(1).standard_normal((1, 10, 10, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(clone(x)), np.asarray(m(x)), rtol=1e-6, atol=1e-6)
    m.save_weights(tmp_path / "m.weights.h5")
    fresh = convrewrite.build(keras.models.clone_model(m), plan)
    fresh.load_weights(tmp_path / "m.weights.h5")
    assert np.abs(np.asarray(fresh(x)) - np.asarray(m(x))).max() <= 1e-5 * np.abs(np.asarray(m(x))).max()


def test_transfer_weights_by_layer_name():
    m = _model(0)
    fast = convrewrite.build(_model(1), _plan(m))
    copied = convrewrite.transfer_weights(m, fast)
    assert sorted(copied) == ["a", "b", "c", "g"]
    _assert_same_function(fast, m)
    back = _model(2)
    convrewrite.transfer_weights(fast, back)
    _assert_same_function(back, m)
    inp = keras.Input((12, 12, 4))
    stranger = keras.Model(inp, keras.layers.Conv2D(4, 3, padding="same", name="zz")(inp))
    with pytest.raises(convrewrite.WeightFileError, match="no layer 'zz'.*Nothing was copied"):
        convrewrite.transfer_weights(m, stranger)
