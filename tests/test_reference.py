"""The numpy oracle against Keras on randomized configurations."""

import keras
import numpy as np
import pytest

from convrewrite import reference
from conftest import rel_error


def _random_config(rng):
    groups = int(rng.choice([1, 1, 2, 3]))
    cin = groups * int(rng.integers(1, 4))
    filters = groups * int(rng.integers(1, 4))
    kernel = (int(rng.integers(1, 6)), int(rng.integers(1, 6)))
    dilation = int(rng.choice([1, 1, 2]))
    strides = 1 if dilation > 1 else int(rng.integers(1, 4))
    padding = str(rng.choice(["same", "valid"]))
    eff = [(k - 1) * dilation + 1 for k in kernel]  # valid padding needs the input to cover the kernel
    h, w = int(rng.integers(eff[0], 14)), int(rng.integers(eff[1], 14))
    return dict(groups=groups, cin=cin, filters=filters, kernel=kernel, dilation=dilation, strides=strides,
                padding=padding, h=h, w=w, use_bias=bool(rng.integers(0, 2)))


@pytest.mark.parametrize("seed", range(24))
def test_conv2d_matches_keras(seed):
    rng = np.random.default_rng(seed)
    c = _random_config(rng)
    layer = keras.layers.Conv2D(c["filters"], c["kernel"], strides=c["strides"], padding=c["padding"],
                                dilation_rate=c["dilation"], groups=c["groups"], use_bias=c["use_bias"])
    x = rng.standard_normal((2, c["h"], c["w"], c["cin"])).astype("float32")
    layer.build(x.shape)
    weights = [rng.standard_normal(w.shape).astype("float32") for w in layer.get_weights()]
    layer.set_weights(weights)
    expected = keras.ops.convert_to_numpy(layer(x))
    got = reference.conv2d(x, weights[0], weights[1] if c["use_bias"] else None, strides=c["strides"],
                           padding=c["padding"], dilation=c["dilation"], groups=c["groups"], dtype=np.float64)
    assert rel_error(got, expected) <= 1e-5, c


@pytest.mark.parametrize("seed", range(12))
def test_depthwise_matches_keras(seed):
    rng = np.random.default_rng(100 + seed)
    c = _random_config(rng)
    m = int(rng.integers(1, 4))
    layer = keras.layers.DepthwiseConv2D(c["kernel"], strides=c["strides"], padding=c["padding"],
                                         dilation_rate=c["dilation"], depth_multiplier=m, use_bias=c["use_bias"])
    x = rng.standard_normal((2, c["h"], c["w"], c["cin"])).astype("float32")
    layer.build(x.shape)
    weights = [rng.standard_normal(w.shape).astype("float32") for w in layer.get_weights()]
    layer.set_weights(weights)
    expected = keras.ops.convert_to_numpy(layer(x))
    got = reference.depthwise_conv2d(x, weights[0], weights[1] if c["use_bias"] else None, strides=c["strides"],
                                     padding=c["padding"], dilation=c["dilation"], dtype=np.float64)
    assert rel_error(got, expected) <= 1e-5, c


@pytest.mark.parametrize("size,kernel,stride", [(7, 2, 1), (8, 3, 2), (9, 4, 3), (5, 6, 1), (1, 3, 1)])
def test_same_padding_is_tf_asymmetric(size, kernel, stride):
    before, after = reference.same_padding(size, kernel, stride)
    out = -(-size // stride)
    assert before + after == max((out - 1) * stride + kernel - size, 0)
    assert after - before in (0, 1)  # the odd element goes after


def test_input_smaller_than_kernel_same_padding(rng):
    x = rng.standard_normal((1, 2, 3, 2)).astype("float32")
    k = rng.standard_normal((5, 5, 2, 3)).astype("float32")
    layer = keras.layers.Conv2D(3, 5, padding="same", use_bias=False)
    layer.build(x.shape)
    layer.set_weights([k])
    assert rel_error(reference.conv2d(x, k, padding="same"), keras.ops.convert_to_numpy(layer(x))) <= 1e-5


def test_bad_groups_is_a_clear_error(rng):
    with pytest.raises(ValueError, match="groups"):
        reference.conv2d(rng.standard_normal((1, 4, 4, 3)), rng.standard_normal((3, 3, 2, 4)), groups=2)


@pytest.mark.parametrize("h,w,kernel,strides", [(11, 4, 5, (3, 4)), (3, 9, 5, 2), (2, 2, 3, 1)])
def test_empty_output_along_one_axis_keeps_the_other(h, w, kernel, strides):
    """VALID with the input smaller than the kernel along one axis: empty there, full size along the other."""
    import tensorflow as tf

    rng = np.random.default_rng(h * 100 + w)
    x = rng.standard_normal((2, h, w, 3))
    k = rng.standard_normal((kernel, kernel, 3, 2))
    expected = tf.nn.conv2d(x, k, strides=strides, padding="VALID").numpy()
    assert reference.conv2d(x, k, strides=strides, padding="valid").shape == expected.shape
