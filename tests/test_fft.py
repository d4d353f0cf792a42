"""FFT convolution layers: transform sizes, equivalence with Keras and the numpy reference, the kernel
spectrum cache (reuse, never stale), gradients, serialization, mixed precision, the registry entries."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import implementations, reference
from convrewrite.layers import FFTConv2D, FFTDepthwiseConv2D
from convrewrite.layers import fft
from convrewrite.spec import ConvSpec, spec_from_layer

from convrewrite.timing import compiled
from conftest import gradients, random_cases, rel_error

TOL = 1e-5


# ---- transform sizes ------------------------------------------------------------------------------
def test_fast_lengths():
    fast = [n for n in range(1, 200) if fft.is_fast_length(n)]
    assert fast[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14]
    assert not fft.is_fast_length(74) and not fft.is_fast_length(0) and not fft.is_fast_length(11)
    assert fft.next_fast_length(74) == 75
    assert fft.next_fast_length(74, even=True) == 80
    for n in range(1, 300):
        m = fft.next_fast_length(n)
        assert m >= n and fft.is_fast_length(m)
        assert not any(fft.is_fast_length(j) for j in range(n, m))
        e = fft.next_fast_length(n, even=True)
        assert e % 2 == 0 and fft.is_fast_length(e) and e >= n


def test_full_plans_use_odd_lengths_too():
    """Full-image plans take any fast length on both axes: fewer bins (the per-bin products and the
    transposes scale with them) at the same transform speed; tiled plans keep even column lengths."""
    plan = fft.choose_fft_layout(64, 64, (21, 21), padding="same", tile_size="full")
    assert plan.fft_shape == (75, 75) and plan.bins == 75 * 38
    assert fft.choose_fft_layout(64, 64, (21, 21), padding="same", tile_size=30).fft_shape[1] % 2 == 0


def test_complex_views_and_real_block_matmul(rng):
    """The interleaved (re, im) views are exact inverses, the real block product equals the complex one,
    and gradients through the views equal those through the real and imaginary parts of a complex matmul."""
    from convrewrite.layers import backend

    def c(*shape):
        return keras.ops.convert_to_tensor((rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype("complex64"))

    a, b = c(5, 2, 3, 4), c(5, 2, 4, 6)
    r = backend.complex_as_real(a)
    assert tuple(r.shape) == (5, 2, 3, 8) and keras.backend.standardize_dtype(r.dtype) == "float32"
    r_np, a_np, b_np = (keras.ops.convert_to_numpy(t) for t in (r, a, b))
    np.testing.assert_array_equal(r_np[..., 0::2], np.real(a_np))
    np.testing.assert_array_equal(r_np[..., 1::2], np.imag(a_np))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(backend.real_as_complex(r)), a_np)
    block = backend.real_block(b)
    assert tuple(block.shape) == (5, 2, 8, 12)
    got = keras.ops.convert_to_numpy(backend.real_block_matmul(a, block))
    want = np.matmul(a_np.astype(np.complex128), b_np.astype(np.complex128))
    assert got.dtype == np.complex64 and np.abs(got - want).max() <= TOL * np.abs(want).max()
    w = rng.standard_normal((5, 2, 3, 12)).astype("float32")

    def via_views(ab):
        return backend.complex_as_real(backend.real_block_matmul(ab[0], backend.real_block(ab[1]))) * w

    def via_parts(ab):
        y = keras.ops.matmul(ab[0], ab[1])
        return keras.ops.real(y) * w[..., 0::2] + keras.ops.imag(y) * w[..., 1::2]

    (ga1, gb1), = gradients(via_views, (a, b))
    (ga2, gb2), = gradients(via_parts, (a, b))
    for g1, g2 in ((ga1, ga2), (gb1, gb2)):
        g1, g2 = keras.ops.convert_to_numpy(g1), keras.ops.convert_to_numpy(g2)
        assert np.abs(g1 - g2).max() <= 1e-5 * np.abs(g2).max()


def _circular_valid(n, k, s, padding, plan):
    """Correlate a random 1-D signal through a length-plan.fft circular correlation, the way the layer does."""
    rng = np.random.default_rng(n * 1000 + k)
    x, w = rng.standard_normal(n), rng.standard_normal(k)
    p = plan.fft
    kp = np.roll(np.pad(w, (0, p - k)), -plan.pad_before)
    c = np.fft.irfft(np.fft.rfft(x, p) * np.conj(np.fft.rfft(kp)), p)
    got = c[: plan.span : s]
    want = reference.conv2d(x[None, :, None, None], w[:, None, None, None], strides=(s, 1), padding=padding)[0, :, 0, 0]
    return got, want


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_full_axis_plan_never_aliases(padding):
    """The transform is as small as the algebra allows and wrap-around never reaches a kept output."""
    for n in range(1, 30):
        for k in range(1, 12):
            for s in (1, 2, 3):
                if padding == "valid" and k > n:
                    continue
                plan = fft.full_axis_layout(n, k, s, padding)
                assert fft.is_fast_length(plan.fft) and plan.fft >= n
                got, want = _circular_valid(n, k, s, padding, plan)
                assert got.shape == want.shape
                np.testing.assert_allclose(got, want, atol=1e-9)
    # SAME needs n + pad, not the n + k - 1 of a linear convolution; VALID needs just n.
    assert fft.full_axis_layout(64, 21, 1, "same").fft == fft.next_fast_length(74)
    assert fft.full_axis_layout(64, 21, 1, "valid").fft == 64


def test_tiled_axis_plan_and_auto_choice():
    a = fft.tiled_axis_layout(21, 30)
    assert a.fft == fft.next_fast_length(50) and a.tile == a.fft - 20 and a.tile >= 30
    with pytest.raises(ValueError, match="tile_size=0"):
        fft.tiled_axis_layout(3, 0)
    # Spectra depend on the tile, not on the image.
    small = fft.choose_fft_layout(64, 64, (9, 9), tile_size=16)
    large = fft.choose_fft_layout(512, 512, (9, 9), tile_size=16)
    assert small.fft_shape == large.fft_shape
    # Automatic: full for a small image, tiled for a huge one or an unknown size.
    assert not fft.choose_fft_layout(32, 32, (7, 7), padding="same").tiled
    assert fft.choose_fft_layout(1024, 1024, (5, 5), padding="same").tiled
    assert fft.choose_fft_layout(None, None, (5, 5)).tiled
    with pytest.raises(ValueError, match="tile_size='full'"):
        fft.choose_fft_layout(None, 8, (3, 3), tile_size="full")


# ---- equivalence over random configurations -------------------------------------------------------
def _random_config(rng):
    """(Keras class, FFT class, kwargs, input shape, tile_size) of one random configuration.

    No activation: outputs are compared before it (a saturating activation such as tanh caps the
    normwise error's denominator at 1 while the error itself scales with the pre-activation, which is
    what `test_activation_is_applied_after_the_convolution` checks instead)."""
    depthwise = rng.random() < 0.4
    kh, kw = (int(v) for v in rng.integers(1, 17, size=2))
    if rng.random() < 0.5:
        kw = kh
    strides = (1, 1)
    dilation = (1, 1)
    r = rng.random()
    if r < 0.4:
        strides = tuple(int(v) for v in rng.integers(1, 4, size=2))
    elif r < 0.6:
        dilation = tuple(int(v) for v in rng.integers(1, 4, size=2))
        kh, kw = min(kh, 6), min(kw, 6)  # keep the effective kernel small
    if rng.random() < 0.3:  # small kernels make the effective tile (fft - k + 1) small too
        kh, kw = min(kh, 3), min(kw, 3)
    # Tiles of 1-2 outputs, fewer than the stride, mostly under VALID (where the input may extend past
    # what the last tile reads): the regime where overlap-save bookkeeping goes wrong first.
    tiny_tiles = max(strides) > 1 and rng.random() < 0.5
    padding = "same" if rng.random() < (0.3 if tiny_tiles else 0.55) else "valid"
    eh, ew = (kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1
    lo_h, lo_w = (1, 1) if padding == "same" else (eh, ew)  # SAME takes inputs smaller than the kernel
    h = int(rng.integers(lo_h, max(lo_h, 20) + 1))
    w = int(rng.integers(lo_w, max(lo_w, 20) + 1))
    batch = int(rng.integers(1, 4))
    data_format = "channels_first" if rng.random() < 0.25 else "channels_last"
    common = dict(kernel_size=(kh, kw), strides=strides, dilation_rate=dilation, padding=padding,
                  use_bias=bool(rng.random() < 0.7), data_format=data_format, bias_initializer="random_normal")
    if depthwise:
        cin = int(rng.integers(1, 5))
        cls, fcls = keras.layers.DepthwiseConv2D, FFTDepthwiseConv2D
        kwargs = dict(depth_multiplier=int(rng.integers(1, 4)), **common)
    else:
        groups = int(rng.choice([1, 1, 2, 3]))
        cin = groups * int(rng.integers(1, 4))
        cls, fcls = keras.layers.Conv2D, FFTConv2D
        kwargs = dict(filters=groups * int(rng.integers(1, 4)), groups=groups, **common)
    tile = [None, "full", int(rng.integers(1, 12))][int(rng.integers(0, 3))]
    if tiny_tiles:
        tile = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    shape = (batch, cin, h, w) if data_format == "channels_first" else (batch, h, w, cin)
    return cls, fcls, kwargs, shape, tile


def _check_config(rng, cls, fcls, kwargs, shape, tile, where):
    """Build the Keras layer with N(0, 1) weights and its FFT twin. The FFT output must equal the float64
    reference to TOL (normwise), and Keras's own output to TOL wherever Keras computes this configuration
    correctly. Returns whether the Keras comparison ran.

    TF's CPU convolutions (oneDNN, TF 2.21) return wrong values for some configurations that Keras
    accepts: some channels_first ones, e.g. Conv2D(3, 3, data_format="channels_first") on (1, 2, 10, 5)
    is 0.3 off in eager mode (without oneDNN TF refuses NCHW on CPU), and some channels_last ones with
    unequal strides on one narrow channel, e.g. Conv2D(1, 5, strides=(1, 3), padding="same") on
    (2, 20, 2, 1) is 0.9 off. Keras is only compared where it agrees with the reference itself."""
    original = cls(**kwargs)
    x = rng.standard_normal(shape).astype("float32")
    original.build(shape)
    original.set_weights([rng.standard_normal(w.shape).astype("float32") for w in original.get_weights()])
    layer = fcls(**original.get_config(), tile_size=tile)
    layer.build(shape)
    layer.set_weights(original.get_weights())
    got = np.asarray(layer(x))
    where = f"{where}: {fcls.__name__}({kwargs}, tile_size={tile}) on {shape}"
    cl_shape = (shape[0], shape[2], shape[3], shape[1]) if kwargs.get("data_format") == "channels_first" else shape
    spec = spec_from_layer(original, shape)
    assert spec.height == cl_shape[1]
    want = reference.spec_forward(spec, x, original.get_weights())  # float64
    assert rel_error(got, want) <= TOL, where
    keras_out = np.asarray(original(x))
    if rel_error(keras_out, want) > TOL:  # TF got this one wrong (see above)
        return False
    assert rel_error(got, keras_out) <= TOL, where
    return True


def test_random_configs_match_keras_and_reference():
    """60 seeded random configurations (30 on JAX: `random_cases`), compared before the activation: every FFT layer equals the float64
    numpy reference and Keras's own layer (channels_first and unequal strides included, except where TF
    itself is wrong; see `_check_config`) to 1e-5 in float32. Over 1200 configurations from 20 other
    seeds the FFT error against float64 had median 1.5e-7 and 99th percentile 3e-7; one exceeded 1e-6
    (6.6e-6: on a 2x10x1 single-channel input no tap of the dilated kernel reaches the one column, so the
    output is the bias alone, max 0.04, and the other taps' round-off, 2.8e-7 absolute, is large next to it)."""
    rng = np.random.default_rng(1234)
    n = random_cases(60)
    compared = [_check_config(rng, *_random_config(rng), where=f"config {i}") for i in range(n)]
    assert sum(compared) >= n - n // 6  # TF's wrong answers stay the exception, not a way to skip the comparison


@pytest.mark.parametrize("cls, fcls, kwargs, shape, tile", [
    # overlap-save tiles smaller than the stride under VALID: the input runs past what the tiles read
    (keras.layers.Conv2D, FFTConv2D, dict(filters=2, kernel_size=3, strides=3, padding="valid"), (1, 10, 10, 2), 1),
    (keras.layers.DepthwiseConv2D, FFTDepthwiseConv2D, dict(kernel_size=3, strides=2, padding="valid"),
     (1, 8, 8, 2), 1),
    (keras.layers.Conv2D, FFTConv2D, dict(filters=1, kernel_size=1, strides=(3, 1), padding="valid"),
     (2, 5, 2, 1), (1, 3)),
    (keras.layers.Conv2D, FFTConv2D, dict(filters=2, kernel_size=2, strides=3, padding="valid",
                                          data_format="channels_first"), (1, 2, 11, 9), 1),
])
def test_tiles_smaller_than_stride(rng, cls, fcls, kwargs, shape, tile):
    _check_config(rng, cls, fcls, kwargs, shape, tile, where="small tile")


def test_tiles_smaller_than_stride_unknown_size(rng):
    """Same, with the spatial size unknown until run time (the slicing bounds are tensors)."""
    inp = keras.Input((None, None, 2))
    conv = keras.layers.Conv2D(3, 3, strides=3, padding="valid")
    ref_model = keras.Model(inp, conv(inp))
    layer = FFTConv2D(**conv.get_config(), tile_size=1)
    model = keras.Model(inp, layer(inp))
    layer.set_weights(conv.get_weights())
    for h, w in ((10, 10), (11, 7), (3, 5)):
        x = rng.standard_normal((2, h, w, 2)).astype("float32")
        assert rel_error(model.predict(x, verbose=0), ref_model.predict(x, verbose=0)) <= TOL


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_activation_is_applied_after_the_convolution(rng, activation):
    """The activation is Keras's own, applied to the biased FFT output; against Keras the error is judged
    relative to the pre-activation scale (these activations are 1-Lipschitz, so they cannot amplify it)."""
    conv = keras.layers.DepthwiseConv2D((14, 15), depth_multiplier=2, padding="same", activation=activation,
                                        bias_initializer="random_normal")
    shape = (3, 14, 17, 4)
    conv.build(shape)
    conv.set_weights([rng.standard_normal(w.shape).astype("float32") for w in conv.get_weights()])
    layer = FFTDepthwiseConv2D(**conv.get_config())
    linear = FFTDepthwiseConv2D(**{**conv.get_config(), "activation": "linear", "name": "lin"})
    for lyr in (layer, linear):
        lyr.build(shape)
        lyr.set_weights(conv.get_weights())
    x = rng.standard_normal(shape).astype("float32")
    pre = np.asarray(linear(x))
    got = np.asarray(layer(x))
    np.testing.assert_array_equal(got, np.asarray(keras.activations.get(activation)(pre)))
    scale = np.abs(pre).max()
    assert np.abs(got - np.asarray(conv(x))).max() <= TOL * scale


def test_weights_config_and_bookkeeping():
    conv = keras.layers.Conv2D(4, 5, padding="same", groups=2, name="conv")
    conv.build((None, 12, 12, 6))
    layer = FFTConv2D(**conv.get_config(), tile_size=(7, 9))
    layer.build((None, 12, 12, 6))
    assert [w.shape for w in layer.weights] == [w.shape for w in conv.weights]
    assert [w.name for w in layer.weights] == ["kernel", "bias"]  # the spectrum cache is not a weight
    layer.set_weights(conv.get_weights())
    config = layer.get_config()
    assert config["tile_size"] == [7, 9]
    again = FFTConv2D.from_config(config)
    assert again.get_config() == config
    dw = FFTDepthwiseConv2D(**keras.layers.DepthwiseConv2D(3, depth_multiplier=2).get_config())
    assert dw.get_config()["tile_size"] is None


def test_invalid_tile_size_is_named():
    with pytest.raises(ValueError, match=r"tile_size=-3 for FFTConv2D 'c'; expected"):
        FFTConv2D(2, 3, tile_size=-3, name="c")
    with pytest.raises(ValueError, match=r"tile_size='big'"):
        FFTDepthwiseConv2D(3, tile_size="big")


def test_unknown_spatial_size(rng):
    inp = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(4, 7, padding="same", strides=2)
    ref_model = keras.Model(inp, conv(inp))
    layer = FFTConv2D(**conv.get_config())
    model = keras.Model(inp, layer(inp))
    layer.set_weights(conv.get_weights())
    assert layer.fft_layout.tiled
    for h, w in ((9, 13), (40, 23), (1, 2)):
        x = rng.standard_normal((2, h, w, 3)).astype("float32")
        assert rel_error(model.predict(x, verbose=0), ref_model.predict(x, verbose=0)) <= TOL


def test_other_size_than_built_for(rng):
    """A full-image layer called on another size re-plans (correct, just not cached)."""
    conv = keras.layers.DepthwiseConv2D(5, padding="same")
    layer = FFTDepthwiseConv2D(**conv.get_config(), tile_size="full")
    conv.build((1, 10, 10, 2))
    layer.build((1, 10, 10, 2))
    layer.set_weights(conv.get_weights())
    x = rng.standard_normal((1, 17, 6, 2)).astype("float32")
    assert rel_error(layer(x), conv(x)) <= TOL


# ---- the spectrum cache ---------------------------------------------------------------------------
def _pair(rng, depthwise=False, tile_size=None, transform="fft"):
    if depthwise:
        conv = keras.layers.DepthwiseConv2D(9, padding="same", depth_multiplier=2)
        cls = FFTDepthwiseConv2D
    else:
        conv = keras.layers.Conv2D(3, 9, padding="same")
        cls = FFTConv2D
    inp = keras.Input((16, 16, 2))
    ref_model = keras.Model(inp, conv(inp))
    layer = cls(**conv.get_config(), tile_size=tile_size, transform=transform)
    model = keras.Model(inp, layer(inp))
    layer.set_weights(conv.get_weights())
    x = rng.standard_normal((2, 16, 16, 2)).astype("float32")
    return conv, ref_model, layer, model, x


def _check(model, ref_model, x):
    assert rel_error(model(x), ref_model(x)) <= TOL  # eager
    assert rel_error(model.predict(x, verbose=0), ref_model.predict(x, verbose=0)) <= TOL  # tf.function


@pytest.mark.tensorflow_only("spectra are cached between calls on TensorFlow; JAX recomputes them in each call")
@pytest.mark.parametrize("tile_size", [None, 5])
def test_cache_is_reused(rng, tile_size):
    """Proof of reuse: corrupt the cached spectrum behind the cache's back (key unchanged) and the
    output changes; change the kernel and the cache is rebuilt."""
    conv, ref_model, layer, model, x = _pair(rng, tile_size=tile_size)
    _check(model, ref_model, x)
    cache = layer._spectrum_cache
    assert bool(cache.valid.numpy())
    np.testing.assert_array_equal(cache.key.numpy(), layer.kernel.numpy())
    cache.value.assign(cache.value * 2)
    assert rel_error(model(x), ref_model(x)) > 0.1
    layer.kernel.assign(layer.kernel * 1.0 + 0.0)  # same bits: still the (corrupted) cache
    assert rel_error(model(x), ref_model(x)) > 0.1
    new = rng.standard_normal(layer.kernel.shape).astype("float32")
    layer.kernel.assign(new)
    conv.kernel.assign(new)
    _check(model, ref_model, x)


@pytest.mark.parametrize("depthwise", [False, True])
def test_not_stale_after_assign_set_weights_and_load_weights(rng, depthwise, tmp_path):
    conv, ref_model, layer, model, x = _pair(rng, depthwise)
    _check(model, ref_model, x)
    # variable assign, then inference inside an already-traced tf.function (predict) and eagerly
    new = [rng.standard_normal(w.shape).astype("float32") for w in conv.get_weights()]
    layer.kernel.assign(new[0])
    conv.kernel.assign(new[0])
    _check(model, ref_model, x)
    # set_weights
    new = [rng.standard_normal(w.shape).astype("float32") for w in conv.get_weights()]
    layer.set_weights(new)
    conv.set_weights(new)
    _check(model, ref_model, x)
    # load_weights
    path = str(tmp_path / "w.weights.h5")
    saved = [rng.standard_normal(w.shape).astype("float32") for w in conv.get_weights()]
    layer.set_weights(saved)
    model.save_weights(path)
    layer.set_weights([w + 1 for w in saved])
    _check_after = model(x)  # cache the +1 kernel
    model.load_weights(path)
    conv.set_weights(saved)
    assert rel_error(model(x), _check_after) > 1e-3
    _check(model, ref_model, x)


def test_not_stale_after_fit(rng):
    conv, ref_model, layer, model, x = _pair(rng)
    _check(model, ref_model, x)  # warm the cache
    y = rng.standard_normal((2, 16, 16, 3)).astype("float32")
    before = layer.kernel.numpy().copy()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, epochs=2, verbose=0)
    assert np.abs(layer.kernel.numpy() - before).max() > 1e-4
    conv.set_weights(layer.get_weights())
    _check(model, ref_model, x)


@pytest.mark.parametrize("transform", fft.TRANSFORMS)
def test_fit_matches_conv2d_training(rng, transform):
    """Training differentiates through the kernel: two SGD steps give Conv2D's weights."""
    conv, ref_model, layer, model, x = _pair(rng, transform=transform)
    y = rng.standard_normal((2, 16, 16, 3)).astype("float32")
    for m in (model, ref_model):
        m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        m.fit(x, y, epochs=2, batch_size=2, shuffle=False, verbose=0)
    for a, b in zip(layer.get_weights(), conv.get_weights()):
        assert rel_error(a, b) <= 1e-5


@pytest.mark.parametrize("transform", fft.TRANSFORMS)
@pytest.mark.parametrize("training", [True, None])
@pytest.mark.parametrize("depthwise", [False, True])
def test_gradients_match(rng, training, depthwise, transform):
    """Gradients w.r.t. kernel, bias and input equal Keras's, in training mode (uncached) and in
    inference mode (through the cache's custom gradient), eagerly and compiled (tf.function / jax.jit),
    through either transform."""
    conv, _, layer, _, x = _pair(rng, depthwise, transform=transform)
    target = rng.standard_normal(conv(x).shape).astype("float32")

    def grads(lyr):
        return gradients(lambda t: lyr(t, training=training) * target, x, lyr.trainable_weights)

    def grads_compiled(lyr):
        return compiled(lambda: grads(lyr), [lyr])()

    layer(x)  # fill the cache first so the inference path takes the cached branch
    for fn in (grads, grads_compiled):
        got, want = fn(layer), fn(conv)
        for g, w in zip(got, want):
            assert g is not None
            assert rel_error(g, w) <= TOL


def test_keras_file_round_trip_in_fresh_process(rng, tmp_path):
    conv, ref_model, layer, model, x = _pair(rng)
    model(x)  # cache filled; it must not be what is saved
    path = tmp_path / "m.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.asarray(ref_model(x)))
    import zipfile

    with zipfile.ZipFile(path) as z:
        import h5py

        z.extract("model.weights.h5", tmp_path)
    with h5py.File(tmp_path / "model.weights.h5") as h5:
        shapes = []
        h5.visititems(lambda name, obj: shapes.append(obj.shape) if isinstance(obj, h5py.Dataset) else None)
    assert sorted(shapes) == sorted([tuple(w.shape) for w in conv.weights])  # spatial kernel + bias only
    script = textwrap.dedent(f"""
        import numpy as np, keras, convrewrite
        m = keras.saving.load_model({str(path)!r})
        layer = m.layers[-1]
        assert type(layer).__name__ == "FFTConv2D", type(layer)
        x, y = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'y.npy')!r})
        out = m.predict(x, verbose=0)
        err = np.abs(out - y).max() / np.abs(y).max()
        assert err <= 1e-5, err
        assert bool(layer._spectrum_cache.valid.numpy())
        print("OK", err)
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def _two_layer_model(n, tile_size=None):
    inp = keras.Input((n, n, 2))
    h = FFTConv2D(3, 9, padding="same", name="c", tile_size=tile_size)(inp)
    return keras.Model(inp, FFTDepthwiseConv2D(5, padding="same", name="dw")(h))


def _keras_twin(model, n):
    inp = keras.Input((n, n, 2))
    c, dw = keras.layers.Conv2D(3, 9, padding="same"), keras.layers.DepthwiseConv2D(5, padding="same")
    twin = keras.Model(inp, dw(c(inp)))
    c.set_weights(model.get_layer("c").get_weights())
    dw.set_weights(model.get_layer("dw").get_weights())
    return twin


@pytest.mark.tensorflow_only("tf.train.Checkpoint")
def test_checkpoint_excludes_cache_and_restores_at_another_size(rng, tmp_path):
    """tf.train.Checkpoint holds the kernels and biases only, so it restores into the same architecture
    built for another input size (whose full-image spectra have another shape)."""
    import tensorflow as tf

    small = _two_layer_model(16)
    small(rng.standard_normal((1, 16, 16, 2)).astype("float32"))  # caches filled
    path = tf.train.Checkpoint(model=small).save(str(tmp_path / "ck"))
    names = [name for name, _ in tf.train.list_variables(path)]
    assert not any("value" in n or "key" in n or "valid" in n for n in names), names
    assert sum("VARIABLE_VALUE" in n for n in names) == 5  # 2 kernels, 2 biases, save_counter
    large = _two_layer_model(24)
    x = rng.standard_normal((2, 24, 24, 2)).astype("float32")
    large(x)  # caches filled with the initial (random) kernels: the restore must not leave them in use
    tf.train.Checkpoint(model=large).restore(path).assert_existing_objects_matched()
    assert rel_error(large(x), _keras_twin(small, 24)(x)) <= TOL


@pytest.mark.tensorflow_only("tf.saved_model.load of the export")
def test_saved_model_export_keeps_working(rng, tmp_path):
    """model.export (SavedModel) takes the kernel spectra as constants computed at export (the current
    kernels, not the cache's state) and serves the right outputs after a reload."""
    import tensorflow as tf

    model = _two_layer_model(16, tile_size=5)
    x = rng.standard_normal((2, 16, 16, 2)).astype("float32")
    want = np.asarray(_keras_twin(model, 16)(x))
    assert rel_error(model(x), want) <= TOL
    model.export(str(tmp_path / "sm"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    for _ in range(2):
        assert rel_error(loaded.serve(x), want) <= TOL


def test_mixed_precision(rng):
    """Under mixed_float16 the FFT computes in float32 from the float32 kernel; Keras computes in
    float16, so the two agree to float16 accuracy (~1e-3), and the FFT is the closer to float64."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        for depthwise in (False, True):
            conv, ref_model, layer, model, x = _pair(rng, depthwise)
            got = np.asarray(model(x))
            assert got.dtype == np.float16
            assert np.asarray(layer.kernel).dtype == np.float32
            exact = reference.spec_forward(spec_from_layer(conv, x.shape), x.astype(np.float16).astype(np.float32),
                                           conv.get_weights())
            assert rel_error(got, ref_model(x)) <= 1e-2
            assert rel_error(got, exact) <= rel_error(ref_model(x), exact)
            # the closer: its float16 output is float64's correctly rounded almost everywhere (measured
            # >= 99.6%), Keras's float16 arithmetic only at ~60% of the outputs
            rounded = exact.astype(np.float16)
            assert np.mean(got == rounded) >= 0.99 > np.mean(np.asarray(ref_model(x)) == rounded)
    finally:
        keras.config.set_dtype_policy(previous)


# ---- registry ---------------------------------------------------------------------------------------
def test_registry_entries(rng):
    spec = ConvSpec("conv2d", in_channels=8, filters=16, kernel=(11, 11), height=32, width=32, batch=4,
                    padding="same", groups=2)
    impl, tiled = implementations.get("fft"), implementations.get("fft-tiled")
    assert impl.applicable(spec) == (True, "")
    unknown = ConvSpec("conv2d", in_channels=8, filters=16, kernel=(11, 11))
    assert impl.applicable(unknown)[0] is False and "unknown" in impl.applicable(unknown)[1]
    assert tiled.applicable(unknown) == (True, "")
    assert impl.applicable(ConvSpec("conv2d", 2, 2, (3, 3), 8, 8, dtype="float64"))[0] is False
    f = impl.features(spec)
    for key in ("fft_h", "fft_w", "bins", "forward_transforms", "inverse_transforms", "matmul_m", "matmul_k",
                "matmul_n", "matmul_batch", "fft_flops", "matmul_flops", "flops", "spectrum_bytes"):
        assert f[key] > 0, key
    assert f["matmul_k"] == 4 and f["matmul_n"] == 8 and f["matmul_batch"] == f["bins"] * 2
    big = spec.with_input(height=512, width=512)
    assert tiled.features(big)["fft_h"] == tiled.features(spec.with_input(height=2048, width=2048))["fft_h"]
    assert tiled.features(big, tile_size=8)["fft_h"] == fft.next_fast_length(8 + 10)
    # make_layer + transfer_weights
    conv = keras.layers.Conv2D(16, 11, padding="same", groups=2, name="big_conv")
    conv.build((4, 32, 32, 8))
    for which, options in ((impl, {}), (tiled, {"tile_size": 9})):
        new = which.make_layer(conv, spec, **options)
        assert isinstance(new, FFTConv2D) and new.name == "big_conv" and not new.built
        new.build((4, 32, 32, 8))
        which.transfer_weights(conv, new, spec)
        x = rng.standard_normal((4, 32, 32, 8)).astype("float32")
        assert rel_error(new(x), conv(x)) <= TOL
        assert new.kernel is not conv.kernel
    with pytest.raises(convrewrite.PlanError, match="tile"):
        impl.make_layer(conv, spec, tiles=3)


@pytest.mark.parametrize("forced, transform", [
    ({"big": ("fft", {}), "dw": ("fft-tiled", {"tile_size": 6}), "strided": ("fft", {})}, "fft"),
    ({name: ("fft-matmul", {}) for name in ("big", "dw", "strided")}, "matmul"),
])
def test_optimize_with_forced_fft_plan(rng, forced, transform):
    """End to end: a large-kernel model with every conv forced to an FFT layer is equivalent (<= 1e-5)."""
    inp = keras.Input((24, 24, 3))
    h = keras.layers.Conv2D(8, 13, padding="same", activation="relu", name="big")(inp)
    h = keras.layers.DepthwiseConv2D(15, padding="same", name="dw")(h)
    h = keras.layers.Conv2D(4, 9, strides=2, name="strided")(h)
    model = keras.Model(inp, h)
    plan = convrewrite.plan(model, cost_model=None)
    for name, (impl, options) in forced.items():
        plan.force(name, impl, **options)
    fast = convrewrite.optimize(model, plan=plan)
    kinds = {layer.name: type(layer).__name__ for layer in fast.layers}
    assert kinds["big"] == "FFTConv2D" and kinds["dw"] == "FFTDepthwiseConv2D" and kinds["strided"] == "FFTConv2D"
    assert all(fast.get_layer(name).transform == transform for name in forced)
    x = rng.standard_normal((2, 24, 24, 3)).astype("float32")
    assert rel_error(fast.predict(x, verbose=0), model.predict(x, verbose=0)) <= TOL
