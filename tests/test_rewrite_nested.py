"""The rewrite stage inside nested models, on functional sums (x + y, keras.ops.add) and on leaky ReLUs:
exact at training=False with randomized BN statistics, and what is not exact is left alone."""

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import rewrite
from convrewrite.rewrite import fuse_activation
from convrewrite.verify import relative_error

from test_rewrite import RTOL, randomize

L = keras.layers


def _randomize_all(model):
    randomize(model)
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _randomize_all(layer)
    return model


def _run(model, seed=1):
    """(expected at training=False, rewritten output, records, rewritten model)."""
    _randomize_all(model)
    new, records = rewrite.apply(model)
    shape = [2 if d is None else d for d in model.inputs[0].shape]
    x = np.random.default_rng(seed).standard_normal(shape).astype("float32")
    return np.asarray(model(x, training=False)), np.asarray(new(x, training=False)), records, new


def _rep_block(name, channels=4):
    """A RepVGG-style block as a model of its own: 3x3 + BN, 1x1 + BN, identity BN, summed with `+`, ReLU."""
    inp = keras.Input((8, 8, channels))
    a = L.BatchNormalization(name="bn3")(L.Conv2D(channels, 3, padding="same", use_bias=False, name="c3")(inp))
    b = L.BatchNormalization(name="bn1")(L.Conv2D(channels, 1, padding="same", use_bias=False, name="c1")(inp))
    return keras.Model(inp, L.ReLU(name="relu")(a + b + L.BatchNormalization(name="bnid")(inp)), name=name)


def _classifier(backbone):
    inp = keras.Input((8, 8, 4))
    y = L.GlobalAveragePooling2D(name="pool")(backbone(inp))
    return keras.Model(inp, L.Dense(3, name="fc")(y))


def test_nested_functional_and_sequential_are_rewritten_exactly(tmp_path):
    head = keras.Sequential([keras.Input((8, 8, 4)), L.Conv2D(5, 3, padding="same", name="hc"),
                             L.BatchNormalization(name="hbn"), L.LeakyReLU(0.2, name="hact")], name="head")
    inp = keras.Input((8, 8, 4))
    model = keras.Model(inp, L.GlobalAveragePooling2D()(head(_rep_block("backbone")(inp))))
    expected, actual, records, new = _run(model)
    assert relative_error(actual, expected) <= RTOL
    assert {r.site for r in rewrite.by_site(records)} == {"backbone/c3", "head/hc"}
    assert [type(layer).__name__ for layer in new.get_layer("backbone").layers] == ["InputLayer", "Conv2D"]
    fast = convrewrite.optimize(model, cost_model=None, check_speed=False)
    report = fast.convrewrite_report
    assert report.passed and {c.name for c in report.checks if c.kind == "rewrite"} == {"backbone/c3", "head/hc"}
    path = tmp_path / "fast.keras"
    fast.save(path)
    x = np.random.default_rng(2).standard_normal((2, 8, 8, 4)).astype("float32")
    loaded = keras.models.load_model(path)
    assert relative_error(np.asarray(loaded(x)), np.asarray(model(x, training=False))) <= RTOL


def test_doubly_nested_model_keeps_its_path():
    inp = keras.Input((8, 8, 4))
    middle = keras.Model(inp, _rep_block("inner")(inp), name="middle")
    expected, actual, records, _ = _run(_classifier(middle))
    assert relative_error(actual, expected) <= RTOL
    assert {r.site for r in records} == {"middle/inner/c3", "middle/inner/c1"}


def test_nested_model_called_twice_or_in_training_is_left_alone():
    block = _rep_block("shared")
    inp = keras.Input((8, 8, 4))
    twice = keras.Model(inp, block(block(inp)))
    assert rewrite.apply(twice)[1] == []
    inp = keras.Input((8, 8, 4))
    training = keras.Model(inp, _rep_block("bb")(inp, training=True))
    assert rewrite.apply(training)[1] == []


@pytest.mark.parametrize("add", [lambda a, b: a + b, keras.ops.add], ids=["plus", "ops_add"])
def test_functional_sum_merges_branches(add):
    inp = keras.Input((9, 9, 3))
    a = L.Conv2D(6, 5, padding="same", name="k5")(inp)
    b = L.Conv2D(6, 3, padding="same", dilation_rate=2, name="k3d2")(inp)
    c = L.Conv2D(6, 1, name="k1")(inp)
    expected, actual, records, new = _run(keras.Model(inp, add(add(a, b), c)))
    assert relative_error(actual, expected) <= RTOL
    assert [r.kind for r in records] == ["merge_branches", "merge_branches"]
    assert [type(layer).__name__ for layer in new.layers] == ["InputLayer", "Conv2D"]


def test_functional_sum_that_is_no_branch_sum_is_left_alone():
    x1, x2 = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    two_inputs = keras.Model([x1, x2], L.Conv2D(3, 3, padding="same")(x1) + L.Conv2D(3, 1)(x2))
    assert rewrite.apply(two_inputs)[1] == []
    inp = keras.Input((8, 8, 3))
    constant = keras.Model(inp, L.Conv2D(3, 3, padding="same")(inp) + 1.0)
    assert rewrite.apply(constant)[1] == []
    product = keras.Model(inp, L.Conv2D(3, 3, padding="same")(inp) * L.Conv2D(3, 1)(inp))
    assert rewrite.apply(product)[1] == []


@pytest.mark.parametrize("act", [lambda: L.LeakyReLU(0.2), lambda: L.ReLU(negative_slope=0.2)], ids=["leaky", "relu_slope"])
def test_leaky_relu_with_slope_02_fuses_exactly(act):
    inp = keras.Input((8, 8, 3))
    expected, actual, records, new = _run(keras.Model(inp, act()(L.Conv2D(4, 3, padding="same")(inp))))
    assert [r.kind for r in records] == ["fuse_activation"]
    assert new.layers[-1].get_config()["activation"] == "leaky_relu"
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("act", [lambda: L.LeakyReLU(), lambda: L.LeakyReLU(0.1), lambda: L.ReLU(max_value=3.0),
                                 lambda: L.ReLU(negative_slope=0.2, max_value=6.0), lambda: L.ReLU(threshold=0.5)],
                         ids=["leaky_default_0.3", "leaky_0.1", "relu_max3", "relu_slope_max", "relu_threshold"])
def test_activation_no_named_activation_computes_is_left_alone(act):
    assert fuse_activation.activation_of(act()) is None
    inp = keras.Input((8, 8, 3))
    assert rewrite.apply(keras.Model(inp, act()(L.Conv2D(4, 3, padding="same")(inp))))[1] == []
