"""Conv3D sites: the spec's depth fields, the numpy reference against Keras, FFTConv3D (randomized
configurations against the float64 reference, cache, gradients, .keras round trip, non-finite inputs) and the
path through plan / optimize."""

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import implementations, reference
from convrewrite.layers import FFTConv3D
from convrewrite.spec import ConvSpec, spec_from_layer

from convrewrite.timing import compiled
from conftest import BACKEND, gradients, random_cases, rel_error

TOL = 1e-5


def test_spec_from_conv3d_layer():
    conv = keras.layers.Conv3D(8, (3, 5, 7), strides=(1, 2, 2), padding="same", groups=2)
    spec = spec_from_layer(conv, (2, 16, 32, 30, 4))
    assert (spec.kind, spec.depth, spec.height, spec.width) == ("conv3d", 16, 32, 30)
    assert (spec.kernel_depth, spec.kernel, spec.stride_depth, spec.strides) == (3, (5, 7), 1, (2, 2))
    assert spec.output_depth() == 16 and spec.output_hw() == (16, 15)
    assert spec.macs() == 2 * 16 * 16 * 15 * 8 * 2 * 3 * 5 * 7
    assert spec.short() == "conv3d g2 3x5x7 s1x2x2 same 4->8 @16x32x30"
    assert ConvSpec.from_json(spec.to_json()) == spec
    # 2-D specs serialize without the depth fields (profiles on disk hold them so) and refuse them
    flat = ConvSpec("conv2d", 2, 2, (3, 3), 8, 8)
    assert "depth" not in flat.to_dict() and ConvSpec.from_json(flat.to_json()) == flat
    with pytest.raises(ValueError, match="depth"):
        ConvSpec("conv2d", 2, 2, (3, 3), 8, 8, depth=4)


def _random_config(rng):
    k = tuple(int(v) for v in rng.integers(1, 6, 3))
    dilation = tuple(int(v) for v in rng.choice([1, 1, 2], 3))
    strides = tuple(int(v) for v in rng.choice([1, 1, 2], 3)) if dilation == (1, 1, 1) else (1, 1, 1)
    padding = str(rng.choice(["same", "valid"]))
    eff = [(a - 1) * d + 1 for a, d in zip(k, dilation)]
    size = tuple(int(rng.integers(e if padding == "valid" else 1, max(e, 10) + 1)) for e in eff)
    groups = int(rng.choice([1, 1, 2]))
    cin = groups * int(rng.integers(1, 3))
    data_format = "channels_first" if rng.random() < 0.25 else "channels_last"
    kwargs = dict(filters=groups * int(rng.integers(1, 3)), kernel_size=k, strides=strides, dilation_rate=dilation,
                  padding=padding, groups=groups, use_bias=bool(rng.random() < 0.7), data_format=data_format,
                  bias_initializer="random_normal")
    batch = int(rng.integers(1, 3))
    shape = (batch, cin, *size) if data_format == "channels_first" else (batch, *size, cin)
    return kwargs, shape


def _keras_channels_last(layer, x):
    """Keras's Conv3D output, through a channels_last twin for a channels_first layer (TF's CPU kernels are
    wrong for some channels_first convolutions; see tests/test_fft1d.py)."""
    if layer.data_format != "channels_first":
        return np.asarray(layer(x))
    twin = keras.layers.Conv3D.from_config({**layer.get_config(), "data_format": "channels_last"})
    xl = x.transpose(0, 2, 3, 4, 1)
    twin.build(xl.shape)
    twin.set_weights(layer.get_weights())
    return np.asarray(twin(xl)).transpose(0, 4, 1, 2, 3)


def test_random_configs_match_reference_and_keras():
    """25 seeded random configurations (groups, strides, dilation, same / valid, both data formats): the
    reference equals Keras, and FFTConv3D equals both within 1e-5."""
    rng = np.random.default_rng(33)
    for i in range(random_cases(25)):
        kwargs, shape = _random_config(rng)
        original = keras.layers.Conv3D(**kwargs)
        original.build(shape)
        original.set_weights([rng.standard_normal(w.shape).astype("float32") for w in original.get_weights()])
        layer = FFTConv3D(**original.get_config())
        layer.build(shape)
        layer.set_weights(original.get_weights())
        x = rng.standard_normal(shape).astype("float32")
        want = reference.spec_forward(spec_from_layer(original, shape), x, original.get_weights())
        where = f"config {i}: {kwargs} on {shape}"
        keras_out = _keras_channels_last(original, x)
        assert rel_error(keras_out, want) <= TOL, where
        got = np.asarray(layer(x))
        assert rel_error(got, want) <= TOL, where
        assert rel_error(got, keras_out) <= TOL, where


def _pair(rng, **kwargs):
    conv = keras.layers.Conv3D(4, 5, padding="same", **kwargs)
    conv.build((2, 8, 9, 10, 3))
    conv.set_weights([rng.standard_normal(w.shape).astype("float32") for w in conv.get_weights()])
    layer = FFTConv3D(**conv.get_config())
    layer.build((2, 8, 9, 10, 3))
    layer.set_weights(conv.get_weights())
    return conv, layer, rng.standard_normal((2, 8, 9, 10, 3)).astype("float32")


def test_cache_reused_never_stale_and_other_sizes(rng):
    conv, layer, x = _pair(rng)
    assert rel_error(layer(x), conv(x)) <= TOL
    if BACKEND == "tensorflow":  # (JAX keeps no spectrum between calls)
        layer._spectrum_cache.value.assign(layer._spectrum_cache.value * 2)
        assert rel_error(layer(x), conv(x)) > 0.1  # the cached spectrum is what runs
    new = [rng.standard_normal(w.shape).astype("float32") for w in conv.get_weights()]
    layer.set_weights(new)
    conv.set_weights(new)
    assert rel_error(layer(x), conv(x)) <= TOL
    other = rng.standard_normal((1, 5, 6, 7, 3)).astype("float32")  # another size than built: correct, uncached
    assert rel_error(layer(other), conv(other)) <= TOL
    inp = keras.Input((None, None, None, 3))  # unknown size: Keras's own Conv3D
    model = keras.Model(inp, FFTConv3D(4, 3, padding="same")(inp))
    assert model.predict(other, verbose=0).shape == (1, 5, 6, 7, 4)
    with pytest.raises(ValueError, match="tile_size"):
        FFTConv3D(4, 3, tile_size=8)


@pytest.mark.parametrize("training", [True, None])
def test_gradients_match(rng, training):
    conv, layer, x = _pair(rng, strides=(1, 2, 1), activation="tanh")
    target = rng.standard_normal(conv(x).shape).astype("float32")

    def grads(lyr):
        return gradients(lambda t: lyr(t, training=training) * target, x, lyr.trainable_weights)

    def grads_compiled(lyr):
        return compiled(lambda: grads(lyr), [lyr])()

    layer(x)
    for fn in (grads, grads_compiled):
        for g, w in zip(fn(layer), fn(conv)):
            assert g is not None and rel_error(g, w) <= TOL


def test_keras_file_round_trip_and_nonfinite(rng, tmp_path):
    conv, layer, x = _pair(rng)
    inp = keras.Input((8, 9, 10, 3))
    model = keras.Model(inp, layer(inp))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.layers[-1]).__name__ == "FFTConv3D"
    assert rel_error(loaded.predict(x, verbose=0), conv(x)) <= TOL
    bad = x.copy()
    bad[0, 4, 4, 4, 1] = np.nan
    got, want = np.asarray(layer(bad)), np.asarray(conv(bad))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))  # NaN only where Keras puts it
    assert np.isfinite(got[1]).all()


def test_registry_plan_and_optimize(rng):
    inp = keras.Input((10, 12, 12, 2))
    h = keras.layers.Conv3D(4, 5, padding="same", activation="relu", name="big")(inp)
    h = keras.layers.Conv3D(3, 3, strides=2, name="small")(h)
    model = keras.Model(inp, h)
    plan = convrewrite.plan(model, cost_model=None)
    assert {r.site: r.spec.kind for r in plan.rows} == {"big": "conv3d", "small": "conv3d"}
    assert implementations.get("fft-tiled").applicable(plan.row("big").spec)[0] is False
    assert implementations.get("fft").features(plan.row("big").spec)["bins"] > 0
    fast = convrewrite.optimize(model, plan=plan.force("big", "fft").force("small", "fft"))
    assert {type(layer).__name__ for layer in fast.layers[1:]} == {"FFTConv3D"}
    x = rng.standard_normal((2, 10, 12, 12, 2)).astype("float32")
    assert rel_error(fast.predict(x, verbose=0), model.predict(x, verbose=0)) <= TOL
    assert fast.convrewrite_report.passed
    back = implementations.get("direct").make_layer(fast.get_layer("big"), plan.row("big").spec)
    assert type(back) is keras.layers.Conv3D


def test_mixed_precision(rng):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        conv, layer, x = _pair(rng)
        got = np.asarray(layer(x))
        assert got.dtype == np.float16 and np.asarray(layer.kernel).dtype == np.float32
        exact = reference.conv3d(x.astype(np.float16).astype(np.float64), *conv.get_weights(), padding="same")
        assert rel_error(got, conv(x)) <= 1e-2
        assert rel_error(got, exact) <= rel_error(conv(x), exact)
    finally:
        keras.config.set_dtype_policy(previous)
