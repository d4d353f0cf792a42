"""The matmul transform of the FFT layers (`transform="matmul"`, implementation `fft-matmul`): equivalence
with the float64 reference and Keras on random configurations, the spectrum cache, `.keras`, mixed
precision, bad arguments and the registry entry (gradients, fit and a forced plan: test_fft, parametrized
over both transforms)."""

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import implementations, reference
from convrewrite.layers import FFTConv2D, FFTDepthwiseConv2D, dft_matmul, fft
from convrewrite.spec import ConvSpec, spec_from_layer
import test_fft as fft_tests
from conftest import random_cases, rel_error
from test_fft import _check_config, _random_config

TOL = 1e-5


def _matmul_twin(fcls):
    """fcls's constructor with transform="matmul" (what `_check_config` builds from Keras's config)."""
    def make(tile_size=None, **config):
        return fcls(**config, tile_size=tile_size, transform="matmul")

    make.__name__ = f"{fcls.__name__}[matmul]"
    return make


def test_random_configs_match_keras_and_reference():
    """The FFT layers' random configurations (dense, grouped, depthwise with multipliers; SAME/VALID; strides
    and dilations up to 3; channels_first; kernels up to 16 on inputs up to 20; inputs smaller than the
    kernel under SAME), full image, through the matmul transform: equal to the float64 numpy reference and
    to Keras (where Keras itself is right, see `_check_config`) to 1e-5."""
    rng = np.random.default_rng(4321)
    n = random_cases(60)
    compared = []
    for i in range(n):
        cls, fcls, kwargs, shape, _ = _random_config(rng)
        compared.append(_check_config(rng, cls, _matmul_twin(fcls), kwargs, shape, "full", where=f"config {i}"))
    assert sum(compared) >= n - n // 6


@pytest.mark.parametrize("kind, kwargs, shape", [
    ("dense", dict(filters=7, kernel_size=(21, 5), strides=(3, 2), padding="same"), (2, 31, 17, 5)),
    ("grouped", dict(filters=6, kernel_size=9, groups=3, dilation_rate=(2, 1), padding="valid"), (1, 23, 19, 6)),
    ("depthwise", dict(kernel_size=(13, 31), depth_multiplier=3, padding="same"), (2, 30, 41, 3)),
])
def test_large_kernels_against_reference(rng, kind, kwargs, shape):
    """Large and non-square kernels, strides applied by the inverse matrices (the dropped outputs are never
    computed), dilation, multiplier: against float64."""
    cls, fcls = ((keras.layers.DepthwiseConv2D, FFTDepthwiseConv2D) if kind == "depthwise"
                 else (keras.layers.Conv2D, FFTConv2D))
    _check_config(rng, cls, _matmul_twin(fcls), dict(kwargs, use_bias=True, bias_initializer="random_normal"),
                  shape, "full", where=kind)


def test_minimal_transform_length_and_matrices():
    """The matmul layout keeps each axis at its minimum length (any length: its work grows with P, not with
    P's factors); the DFT matrices agree with numpy's FFT."""
    layout = fft.matmul_layout(64, 64, (21, 21), (1, 1), "same")
    assert layout.fft_shape == (74, 74)  # the `fft` transform rounds up to 75
    assert fft.choose_fft_layout(64, 64, (21, 21), (1, 1), "same", "full").fft_shape == (75, 75)
    layout = fft.matmul_layout(9, 7, (3, 3), (2, 3), "valid")
    m = dft_matmul.dft_matrices(layout, 9, 7)
    p, q = layout.fft_shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 7))
    want = np.fft.rfft2(x, (p, q))  # (P, Q//2+1)
    t = m["forward_w"] @ x.T  # (2F, H): rows (re/im, f)
    f = q // 2 + 1
    t = np.stack([t[:f].T, t[f:].T], 1).reshape(2 * 9, f)  # (2H, F): rows (h, re/im)
    got = (m["forward_h"] @ t).reshape(p, 2, f)
    np.testing.assert_allclose(got[:, 0] + 1j * got[:, 1], want, atol=1e-4)


def _pair(rng, depthwise=False):
    return fft_tests._pair(rng, depthwise, transform="matmul")


@pytest.mark.tensorflow_only("spectra are cached between calls on TensorFlow; JAX recomputes them in each call")
def test_cache_is_reused_and_never_stale(rng):
    conv, ref_model, layer, model, x = _pair(rng, depthwise=True)
    assert rel_error(model.predict(x, verbose=0), ref_model.predict(x, verbose=0)) <= TOL
    cache = layer._spectrum_cache
    assert tuple(cache.value.shape) == layer.fft_bins_shape(layer.fft_layout)
    cache.value.assign(cache.value * 2)  # behind the cache's back: the output changes, so it is read
    assert rel_error(model(x), ref_model(x)) > 0.1
    new = [rng.standard_normal(w.shape).astype("float32") for w in conv.get_weights()]
    layer.set_weights(new)
    conv.set_weights(new)
    assert rel_error(model(x), ref_model(x)) <= TOL


def test_keras_file_round_trip(rng, tmp_path):
    """The model saves and loads through .keras with its transform (fit and gradients: test_fft, both
    transforms)."""
    conv, ref_model, layer, model, x = _pair(rng)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    again = loaded.layers[-1]
    assert type(again) is FFTConv2D and again.transform == "matmul"
    assert rel_error(loaded.predict(x, verbose=0), ref_model.predict(x, verbose=0)) <= TOL


def test_other_size_than_built_for_and_channels_first(rng):
    conv = keras.layers.DepthwiseConv2D(5, strides=2, padding="same", data_format="channels_first")
    layer = FFTDepthwiseConv2D(**conv.get_config(), transform="matmul")
    conv.build((1, 2, 10, 10))
    layer.build((1, 2, 10, 10))
    layer.set_weights(conv.get_weights())
    for shape in ((1, 2, 10, 10), (2, 2, 17, 6)):
        x = rng.standard_normal(shape).astype("float32")
        spec = spec_from_layer(conv, shape)
        assert rel_error(layer(x), reference.spec_forward(spec, x, conv.get_weights())) <= TOL


def test_mixed_precision(rng):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        conv, ref_model, layer, model, x = _pair(rng, depthwise=True)
        got = np.asarray(model(x))
        assert got.dtype == np.float16
        exact = reference.spec_forward(spec_from_layer(conv, x.shape), x.astype(np.float16).astype(np.float32),
                                       conv.get_weights())
        assert rel_error(got, exact) <= rel_error(ref_model(x), exact)
    finally:
        keras.config.set_dtype_policy(previous)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"transform='dft' for FFTConv2D 'c'; expected one of 'fft', 'matmul'"):
        FFTConv2D(2, 3, transform="dft", name="c")
    with pytest.raises(ValueError, match=r"tile_size=8 with transform='matmul'.*expected None or 'full'"):
        FFTDepthwiseConv2D(3, tile_size=8, transform="matmul")
    layer = FFTConv2D(2, 3, transform="matmul", name="u")
    with pytest.raises(ValueError, match=r"FFTConv2D 'u': Received unknown spatial size None"):
        layer.build((1, None, None, 3))


def test_registry_entry(rng):
    impl = implementations.get("fft-matmul")
    spec = ConvSpec("conv2d", in_channels=8, filters=16, kernel=(11, 11), height=32, width=32, batch=4,
                    padding="same", groups=2)
    assert impl.applicable(spec) == (True, "")
    assert impl.applicable(ConvSpec("conv2d", 8, 16, (11, 11)))[0] is False
    assert impl.applicable(ConvSpec("conv2d", 2, 2, (3, 3), 8, 8, dtype="float64"))[0] is False
    assert impl.applicable(ConvSpec("conv1d", 2, 2, (1, 3), 1, 8))[0] is False
    f = impl.features(spec)
    assert f["transform_flops"] > 0 and f["product_flops"] > 0 and f["elementwise_bytes"] == 0
    dw = impl.features(ConvSpec("depthwise_conv2d", 8, 8, (11, 11), 32, 32, batch=4, padding="same", groups=8))
    assert dw["product_flops"] == 0 and dw["elementwise_bytes"] > 0 and dw["transpose_bytes"] == 0
    assert impl.workspace_bytes(spec) > f["spectrum_bytes"]
    conv = keras.layers.Conv2D(16, 11, padding="same", groups=2, name="big_conv")
    conv.build((4, 32, 32, 8))
    new = impl.make_layer(conv, spec)
    assert isinstance(new, FFTConv2D) and new.transform == "matmul" and new.name == "big_conv"
    new.build((4, 32, 32, 8))
    impl.transfer_weights(conv, new, spec)
    x = rng.standard_normal((4, 32, 32, 8)).astype("float32")
    assert rel_error(new(x), conv(x)) <= TOL
    # which implementation made a layer: told apart from `fft` by the layer's transform
    assert implementations.for_layer(new).name == "fft-matmul"
    assert implementations.for_layer(implementations.get("fft").make_layer(conv, spec)).name == "fft"


def test_replanning_an_optimized_model(rng):
    """An optimized model's matmul-transform layers are sites again: re-planned as `fft` / `fft-tiled` they
    run the FFT transform (the matmul layer's own options do not leak into the new layer), as `direct` /
    `depthwise-wide` Keras's and the wide layer; every rebuild stays equivalent."""
    inp = keras.Input((20, 20, 3))
    h = keras.layers.Conv2D(6, 13, padding="same", name="big")(inp)
    h = keras.layers.DepthwiseConv2D(13, padding="same", name="dw")(h)
    model = keras.Model(inp, h)
    x = rng.standard_normal((2, 20, 20, 3)).astype("float32")
    want = model.predict(x, verbose=0)
    plan = convrewrite.plan(model, cost_model=None).force("big", "fft-matmul").force("dw", "fft-matmul")
    fast = convrewrite.optimize(model, plan=plan)
    assert fast.get_layer("big").transform == fast.get_layer("dw").transform == "matmul"
    again = convrewrite.plan(fast, cost_model=None).force("big", "fft").force("dw", "fft-tiled", tile_size=6)
    back = convrewrite.optimize(fast, plan=again)
    assert back.get_layer("big").transform == back.get_layer("dw").transform == "fft"
    assert back.get_layer("dw").tile_size == (6, 6)
    assert implementations.for_layer(back.get_layer("big")).name == "fft"
    keras_plan = convrewrite.plan(fast, cost_model=None).force("big", "direct").force("dw", "depthwise-wide")
    plain = convrewrite.optimize(fast, plan=keras_plan)
    assert type(plain.get_layer("big")) is keras.layers.Conv2D
    assert type(plain.get_layer("dw")).__name__ == "WideDepthwiseConv2D"
    for m in (fast, back, plain):
        assert rel_error(m.predict(x, verbose=0), want) <= TOL
