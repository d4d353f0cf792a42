"""The numpy reference over the whole range it is the oracle for: kernels up to 16, dilation up to 3, sizes up
to 40, channels_first, grouped and depthwise, through `reference.spec_forward` (what verify uses) against Keras.

tests/test_reference.py covers kernels <= 5, dilation <= 2, sizes <= 13 and channels_last only."""

import keras
import numpy as np
import pytest

from convrewrite import reference
from convrewrite.graph import walk
from conftest import rel_error


def _config(rng):
    kind = str(rng.choice(["conv", "grouped", "depthwise"]))
    kernel = (int(rng.integers(6, 17)), int(rng.integers(1, 17)))
    dilation = int(rng.choice([1, 2, 3]))
    strides = 1 if dilation > 1 else int(rng.integers(1, 4))
    padding = str(rng.choice(["same", "valid"]))
    eff = [(k - 1) * dilation + 1 for k in kernel]
    h = int(rng.integers(eff[0] if padding == "valid" else 1, max(eff[0], 40) + 1))
    w = int(rng.integers(eff[1] if padding == "valid" else 1, max(eff[1], 40) + 1))
    fmt = str(rng.choice(["channels_last", "channels_first"]))
    return dict(kind=kind, kernel=kernel, dilation=dilation, strides=strides, padding=padding, h=h, w=w, fmt=fmt)


def _layer(c):
    common = dict(strides=c["strides"], padding=c["padding"], dilation_rate=c["dilation"], data_format=c["fmt"])
    if c["kind"] == "depthwise":
        return keras.layers.DepthwiseConv2D(c["kernel"], depth_multiplier=2, **common), 3
    if c["kind"] == "grouped":
        return keras.layers.Conv2D(4, c["kernel"], groups=2, **common), 4
    return keras.layers.Conv2D(3, c["kernel"], **common), 2


@pytest.mark.parametrize("seed", range(10))
def test_spec_forward_matches_keras_over_the_oracle_range(seed):
    rng = np.random.default_rng(1600 + seed)
    c = _config(rng)
    layer, cin = _layer(c)
    shape = (cin, c["h"], c["w"]) if c["fmt"] == "channels_first" else (c["h"], c["w"], cin)
    x_in = keras.Input(shape)
    model = keras.Model(x_in, layer(x_in))
    weights = [rng.standard_normal(tuple(w.shape)).astype("float32") for w in layer.weights]
    layer.set_weights(weights)
    x = rng.standard_normal((2,) + shape).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x))
    spec = walk(model).sites[0].spec
    assert (spec.kernel, spec.dilation[0], spec.data_format) == (c["kernel"], c["dilation"], c["fmt"])
    got = reference.spec_forward(spec, x, weights)
    assert got.shape == expected.shape
    assert rel_error(got, expected) <= 1e-5, c


def test_the_sample_reaches_the_range():
    configs = [_config(np.random.default_rng(1600 + s)) for s in range(10)]
    assert max(max(c["kernel"]) for c in configs) >= 14
    assert {c["dilation"] for c in configs} >= {3}
    assert {c["fmt"] for c in configs} == {"channels_last", "channels_first"}
    assert {c["kind"] for c in configs} == {"conv", "grouped", "depthwise"}
    assert max(max(c["h"], c["w"]) for c in configs) >= 30
